"""Accuracy and confusion matrix of a multi-task model's attribute heads (gender, age group) on labelled photos.

    python test/attributes.py --model models/demo-nsoftmax-demo_fairface/model,1 \\
        --images datasets/demo_fairface/val/images --landmarks datasets/demo_fairface/val/landmarks.txt \\
        --metadata datasets/demo_fairface/val/metadata.csv --out attributes_val

--model is `prefix,epoch` or a model folder (model.json). Images are named <TEMPLATE_ID>.<ext>; they are
aligned first (given landmarks, else --detector with fallbacks) unless --already-aligned. Writes
attributes.json, attributes.csv and confusion_<attribute>.png into --out.
"""
import argparse
import os

from recognition.alignment.folder import align_folder
from recognition.detection.choice import add_detector_args, detectors_from_args
from recognition.evaluation.attributes import attribute_heads, evaluate_attributes, metadata_codes
from recognition.inference import add_backend_arg, backend_devices, load_embedder, template_images
from recognition.model_folder import model_spec
from recognition.utils import UserError, add_device_args, run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', required=True, help='prefix,epoch or a model folder with model.json')
    p.add_argument('--images', required=True, help='folder of photos named <TEMPLATE_ID>.<ext>')
    p.add_argument('--metadata', required=True, help='CSV with TEMPLATE_ID and the attribute columns (GENDER, AGE)')
    p.add_argument('--out', required=True, help='output folder')
    p.add_argument('--attributes', default='', help='heads to evaluate, e.g. gender (default: all of the model)')
    p.add_argument('--landmarks', default='', help='"<file> x1 y1 ... x5 y5" lines: align with these points')
    p.add_argument('--already-aligned', action='store_true', help='--images holds aligned 112x112 crops')
    p.add_argument('--aligned-dir', default='', help='where aligned crops go (default: <out>/aligned)')
    p.add_argument('--no-flip', action='store_true', help='no mirrored-crop averaging')
    p.add_argument('--image-size', type=int, default=112, help='network input size (crops are resized to it)')
    p.add_argument('--workers', type=int, default=1, help='alignment worker processes')
    add_detector_args(p)
    add_device_args(p)
    add_backend_arg(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    spec = model_spec(args.model)
    prefix = spec['prefix']
    heads = attribute_heads(prefix)
    if args.attributes:
        wanted = [a.strip() for a in args.attributes.split(',') if a.strip()]
        unknown = [a for a in wanted if a not in heads]
        if unknown:
            raise UserError(f'{prefix}-symbol.json: no attribute head {unknown[0]!r} (has {", ".join(heads)})')
        heads = {a: heads[a] for a in wanted}
    ids, codes = metadata_codes(args.metadata, list(heads))
    image_dir = args.images
    if not args.already_aligned:
        image_dir = args.aligned_dir or os.path.join(args.out, 'aligned')
        align_folder(args.images, image_dir, image_size=args.image_size, landmarks=args.landmarks or None,
                     detector=detectors_from_args(args), num_workers=args.workers, skip_existing=True)
    images = template_images(image_dir)
    missing = [t for t in ids if t not in images]
    if missing:
        raise UserError(f'{args.metadata}: {len(missing)} TEMPLATE_IDs without an image in {image_dir}: '
                        f'{", ".join(missing[:5])}{" ..." if len(missing) > 5 else ""}')
    embedder = load_embedder(**{**spec, 'layer': [layer for layer, _ in heads.values()]},
                             ctx=backend_devices(args.backend, args.gpus, args.ctx), batch_size=args.batch_size,
                             backend=args.backend)
    summary = evaluate_attributes(embedder, heads, ids, [images[t] for t in ids], codes, args.out,
                                  batch_size=args.batch_size, flip=not args.no_flip, metadata=args.metadata,
                                  image_size=args.image_size, progress=True)
    for attr, r in summary['attributes'].items():
        print(f'{attr}: accuracy {r["accuracy"]:.4f} (balanced {r["balanced_accuracy"]:.4f}, majority class '
              f'{r["chance"]:.4f}) on {r["n"]} images, {r["unknown"]} unknown; {os.path.join(args.out, r["plot"])}')
    print(f'wrote {os.path.join(args.out, "attributes.json")}')


if __name__ == '__main__':
    run_cli(main)
