"""Build an insightface verification .bin: `make_bin.py --pairs PAIRS --images DIR --out NAME.bin`.

PAIRS is LFW's pairs.txt (a header `folds pairs_per_fold` or `pairs`, then `name n1 n2` same-person
and `name1 n1 name2 n2` different-person lines, images at DIR/name/name_%04d.jpg) or simple
`path1 path2 0|1` lines with paths relative to DIR. Each image is aligned to 112x112 (or 112x96
with --image-size 112,96) from --landmarks (`relative/path x1 y1 ... x5 y5`) or by detection
with fallbacks (--detector: MTCNN, then dlib's MMOD before the forced crop), JPEG-encoded, and
stored in pair order with the issame list.
"""
import argparse
import collections
import os
import sys

import cv2

from recognition.alignment.fallbacks import align_face
from recognition.alignment.geometry import crop_size
from recognition.alignment.landmarks_file import read_landmarks_file, relative_key
from recognition.data.bin import check_pairs, write_bin
from recognition.data.pairs import parse_pairs
from recognition.detection.choice import add_detector_args, detectors_from_args
from recognition.utils import UserError, run_cli


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--pairs', required=True, help="LFW pairs.txt or 'path1 path2 0|1' lines")
    parser.add_argument('--images', required=True, help='folder the pair paths are relative to')
    parser.add_argument('--out', required=True, help='output .bin')
    parser.add_argument('--landmarks', default=None, help='5-point landmarks file (paths relative to --images)')
    parser.add_argument('--image-size', type=crop_size, default=(112, 112), metavar='H[,W]',
                        help='aligned crop: 112 (112x112) or 112,96 (height,width)')
    add_detector_args(parser)
    args = parser.parse_args(argv)
    detector = detectors_from_args(args)

    pairs = parse_pairs(args.pairs)
    landmarks = read_landmarks_file(args.landmarks) if args.landmarks else {}
    paths = list(dict.fromkeys(p for pair in pairs for p in pair[:2]))
    missing = [p for p in paths if not os.path.isfile(os.path.join(args.images, p))]
    if missing:
        raise UserError(f'{args.images}: {len(missing)} of {len(paths)} images of {args.pairs} missing, '
                        f'e.g. {", ".join(missing[:5])}')
    encoded, statuses = {}, collections.Counter()
    for rel in paths:
        src = os.path.join(args.images, rel)
        img = cv2.imread(src, cv2.IMREAD_COLOR)
        if img is None:
            raise UserError(f'{src}: unreadable image')
        result = align_face(img, detector=detector, landmarks=landmarks.get(relative_key(rel)),
                            image_size=args.image_size[0], width=args.image_size[1])
        statuses[result.status if result.detector is None else f'{result.status} by {result.detector}'] += 1
        encoded[rel] = cv2.imencode('.jpg', result.image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
    bins = [encoded[p] for pair in pairs for p in pair[:2]]
    write_bin(args.out, bins, [pair[2] for pair in pairs])
    summary = ', '.join(f'{statuses[s]} {s}' for s in sorted(statuses))
    print(f'wrote {args.out}: {len(pairs)} pairs ({sum(p[2] for p in pairs)} same), '
          f'{len(paths)} images ({summary})')
    try:
        check_pairs(args.out, [pair[2] for pair in pairs])
    except UserError as e:   # written anyway (a smoke-test set), but the trainer will refuse it
        print(f'warning: {e}; train/train.py and test/verification.py refuse it', file=sys.stderr)


if __name__ == '__main__':
    run_cli(main)
