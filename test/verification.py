"""insightface's verification CLI: 10-fold accuracy with flip TTA on `.bin` pair sets.

    python test/verification.py --data-dir datasets/demo_emore --model models/x/model,1|2 --target lfw,cfp_fp
"""
import argparse
import os

from recognition.checkpoint import parse_pretrained
from recognition.data.bin import load_verification_set
from recognition.evaluation.verification import format_result, test_bin
from recognition.inference import add_backend_arg, backend_devices, load_embedder
from recognition.model_folder import INPUT_SCALES
from recognition.utils import UserError, add_device_args, run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', required=True, help='folder holding <target>.bin')
    p.add_argument('--model', required=True, help='prefix,epoch[|epoch2...]')
    p.add_argument('--target', default='lfw,cfp_fp,agedb_30', help='comma-separated .bin names')
    p.add_argument('--nfolds', type=int, default=10)
    p.add_argument('--image-size', default='112,112', help='height,width of the network input')
    p.add_argument('--layer', default='fc1_output', help='embedding layer of the symbol')
    p.add_argument('--bgr', action='store_true', help='the model was trained on BGR input')
    p.add_argument('--input-scale', default='raw', choices=INPUT_SCALES,
                   help="raw: 0..255 (normalised in the graph); normalized: (x-127.5)/128; unit: x/255")
    add_device_args(p, batch_size=32)
    add_backend_arg(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    prefix, epochs = parse_pretrained(args.model, '--model', several=True)
    try:
        image_size = tuple(int(v) for v in args.image_size.split(','))
    except ValueError:
        raise UserError(f'--image-size {args.image_size!r}: expected height,width') from None
    ctx = backend_devices(args.backend, args.gpus, args.ctx)
    sets = []
    for name in [t for t in args.target.split(',') if t]:
        data_list, issame = load_verification_set(os.path.join(args.data_dir, name + '.bin'), image_size,
                                                  args.nfolds)
        sets.append((name, data_list, issame))
        print(f'loaded {name}: {len(issame)} pairs', flush=True)
    for epoch in epochs:
        embedder = load_embedder(prefix, epoch, layer=args.layer, ctx=ctx, bgr=args.bgr,
                                 input_scale=args.input_scale, batch_size=args.batch_size,
                                 backend=args.backend)
        print(f'model {prefix},{epoch}', flush=True)
        for name, data_list, issame in sets:
            result = test_bin(data_list, issame, embedder.forward, args.batch_size, nfolds=args.nfolds)
            for line in format_result(name, result):
                print(line, flush=True)


if __name__ == '__main__':
    run_cli(main)
