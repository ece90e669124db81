"""Export a checkpoint's embedding graph (`fc1_output`) to ONNX and check it against MXNet.

    python train/export_onnx.py --model models/r100-arcface-emore/model,1 [--out model.onnx]

The export fails unless onnxruntime's embeddings of a random batch agree with MXNet's within
`--tolerance` (largest absolute difference relative to the largest embedding magnitude; default 1e-4).
The work is `recognition.export.export_onnx`.
"""
import argparse

from recognition.checkpoint import parse_pretrained
from recognition.export import export_onnx
from recognition.utils import run_cli


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', required=True, help='prefix,epoch of the checkpoint')
    p.add_argument('--out', default='', help='ONNX file (default PREFIX-EPOCH.onnx)')
    p.add_argument('--image-size', type=int, default=112)
    p.add_argument('--batch-size', type=int, default=4, help='batch of the MXNet/onnxruntime check')
    p.add_argument('--tolerance', type=float, default=1e-4)
    args = p.parse_args(argv)
    prefix, epoch = parse_pretrained(args.model, '--model')
    out = args.out or '%s-%04d.onnx' % (prefix, epoch)
    diff = export_onnx(prefix, epoch, out, args.image_size, args.batch_size, args.tolerance)
    print(f'wrote {out}: onnxruntime matches MXNet to {diff:.2e} of the embedding scale '
          f'(tolerance {args.tolerance:g}, batch {args.batch_size})')
    return 0


if __name__ == '__main__':
    run_cli(main)
