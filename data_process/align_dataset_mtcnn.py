"""Align a folder of photos to 112x112 (or 112x96) faces: `align_dataset_mtcnn.py INPUT_DIR OUTPUT_DIR`.

Mirrors the folder tree as JPEGs and writes OUTPUT_DIR/align_report.csv
(`path,status,score,x1,y1,...,x5,y5,detector`; landmarks in input pixels; detector `mtcnn` or `mmod`
for detected faces). Faces come from --landmarks (`relative/path x1 y1 ... x5 y5` lines) or from the
MTCNN detector with the seed's fallbacks (more scales, rotations, then with --detector mtcnn+mmod one
pass of dlib's MMOD CNN, finally a centre crop reported as 'forced'). Existing outputs are skipped,
so an interrupted run resumes; unreadable images are reported as 'failed' and the run goes on.
"""
import argparse
import collections
import sys

from recognition.alignment.folder import REPORT_NAME, align_folder
from recognition.alignment.geometry import crop_size
from recognition.alignment.landmarks_file import read_landmarks_file
from recognition.detection.choice import add_detector_args, detectors_from_args
from recognition.utils import parse_contexts, run_cli


def status_summary(rows):
    """'3 detected (2 mtcnn, 1 mmod), 1 forced': how the faces were found."""
    counts = collections.Counter(r.status for r in rows)
    by_detector = collections.Counter(r.detector for r in rows if r.status == 'detected')
    parts = []
    for status in sorted(counts):
        detail = ', '.join(f'{by_detector[d]} {d}' for d in sorted(by_detector)) if status == 'detected' else ''
        parts.append(f'{counts[status]} {status}' + (f' ({detail})' if detail else ''))
    return ', '.join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('input_dir')
    parser.add_argument('output_dir')
    parser.add_argument('--image-size', type=crop_size, default=(112, 112), metavar='H[,W]',
                        help='aligned crop: 112 (the arcface 112x112 template) or 112,96 (the 96-wide one)')
    parser.add_argument('--landmarks', default=None, help='5-point landmarks file; listed images are not detected')
    parser.add_argument('--num-workers', type=int, default=1, help='worker processes')
    parser.add_argument('--min-face-size', type=int, default=20, help='MTCNN minimum face size in pixels')
    parser.add_argument('--no-skip-existing', action='store_true', help='redo images that already have an output')
    parser.add_argument('--gpus', default='', help='MTCNN GPU, e.g. 0 (default CPU)')
    add_detector_args(parser)
    args = parser.parse_args(argv)

    landmarks = read_landmarks_file(args.landmarks) if args.landmarks else None
    mtcnn_config = {}
    if args.min_face_size != 20 or args.gpus:
        mtcnn_config = dict(ctx=parse_contexts(args.gpus)[0], min_face_size=args.min_face_size)
    detector = detectors_from_args(args, mtcnn_config)
    height, width = args.image_size
    rows = align_folder(args.input_dir, args.output_dir, image_size=height, width=width, landmarks=landmarks,
                        detector=detector, num_workers=args.num_workers,
                        skip_existing=not args.no_skip_existing,
                        log=lambda message: print(f'warning: {message}', file=sys.stderr, flush=True))
    summary = status_summary(rows)
    print(f'{len(rows)} images: {summary or "none found"}; report {args.output_dir}/{REPORT_NAME}')


if __name__ == '__main__':
    run_cli(main)
