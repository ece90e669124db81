"""Features of an image folder or list for one or more models: OUT/<model>.npy rows in OUT/index.txt order.

Images must be aligned crops. Features are L2-normalised, with flip TTA unless --no-flip.
    python test/extract_features.py --images aligned/ --models final_eval_models --out features/
    python test/extract_features.py --list images.txt --model models/x/model,3 --out features/
"""
import argparse
import os

import numpy as np

from recognition.checkpoint import parse_pretrained
from recognition.data.lst import list_images
from recognition.inference import add_backend_arg, backend_devices, extract_features, load_embedder, load_models
from recognition.model_folder import INPUT_SCALES
from recognition.utils import UserError, add_device_args, atomic_open, atomic_path, run_cli


def image_paths(args):
    """Image paths from --list (one per line, relative to the list's folder) or --images (recursive)."""
    if args.list:
        base = os.path.dirname(os.path.abspath(args.list))
        try:
            with open(args.list) as f:
                names = [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise UserError(f'{args.list}: cannot read ({e.strerror})') from None
        return [n if os.path.isabs(n) else os.path.join(base, n) for n in names]
    return [os.path.join(args.images, rel) for rel in list_images(args.images)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--images', help='folder of aligned crops (searched recursively)')
    src.add_argument('--list', help='text file with one image path per line')
    p.add_argument('--models', default='', help='model folder(s) with model.json, as for test/predict.py')
    p.add_argument('--model', action='append', default=[], help='prefix,epoch (repeatable)')
    p.add_argument('--layer', default='fc1_output', help='layer for --model checkpoints')
    p.add_argument('--bgr', action='store_true', help='--model checkpoints were trained on BGR')
    p.add_argument('--input-scale', default='raw', choices=INPUT_SCALES)
    p.add_argument('--out', required=True, help='output folder')
    p.add_argument('--image-size', type=int, default=112)
    p.add_argument('--no-flip', action='store_true')
    add_device_args(p)
    add_backend_arg(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    ctx = backend_devices(args.backend, args.gpus, args.ctx)
    embedders = (load_models(args.models, ctx=ctx, batch_size=args.batch_size, backend=args.backend)
                 if args.models else [])
    for ref in args.model:
        prefix, epochs = parse_pretrained(ref, '--model', several=True)
        embedders += [load_embedder(prefix, e, layer=args.layer, ctx=ctx, bgr=args.bgr,
                                    input_scale=args.input_scale, batch_size=args.batch_size,
                                    name=f'{os.path.basename(prefix)}-{e:04d}', backend=args.backend) for e in epochs]
    if not embedders:
        raise UserError('no model: pass --models and/or --model')
    names = [e.name for e in embedders]
    if len(set(names)) != len(names):
        raise UserError(f'models with the same name {names}: their .npy files would collide')
    paths = image_paths(args)
    feats = extract_features(embedders, paths, args.batch_size, args.image_size, flip=not args.no_flip,
                             progress=True)
    os.makedirs(args.out, exist_ok=True)
    for name, f in zip(names, feats):
        with atomic_path(os.path.join(args.out, f'{name}.npy')) as tmp:
            with open(tmp, 'wb') as fh:
                np.save(fh, f)
        print(f'{name}: {f.shape[0]} x {f.shape[1]}')
    with atomic_open(os.path.join(args.out, 'index.txt')) as f:
        f.write(''.join(p + '\n' for p in paths))
    print(f'wrote {len(names)} feature files and index.txt to {args.out}')


if __name__ == '__main__':
    run_cli(main)
