"""Mine the hard samples of a training rec (the FairFace seed's hard-sample branch).

Runs the model's fc7 classifier over every image of the rec, keeps the images whose argmax differs from
their label, expands them to all images of those identities and writes `OUT.rec/.idx/.lst`,
`OUT.attributes.json`, `property` (if the folder has none) and `OUT.report.json`: samples, identities
and their spread over the protected groups.

    python train/mine_hard_samples.py --model models/ff-step1/model,1 \\
        --rec datasets/demo_fairface/train.rec --out datasets/demo_fairface_hard/train
"""
import argparse

from recognition.hard_samples import format_hard_report, mine_hard_samples
from recognition.utils import add_device_args, parse_contexts, run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', required=True, help='prefix,epoch of a checkpoint with fc7 for this rec\'s classes')
    p.add_argument('--rec', required=True, help='the training rec (PREFIX.rec)')
    p.add_argument('--out', required=True, help='output prefix (PREFIX_hard or <folder>/train)')
    p.add_argument('--lst', default=None, help='the source .lst to filter (default: <rec prefix>.lst if present)')
    add_device_args(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    report = mine_hard_samples(args.model, args.rec, args.out, ctx=parse_contexts(args.gpus, args.ctx),
                               batch_size=args.batch_size, lst=args.lst)
    print(format_hard_report(report))
    print(f'wrote {report["out"]}' + (f', {report["lst"]}' if report['lst'] else ' (no source .lst: no .lst)')
          + f', {report["out"][:-4]}.report.json')


if __name__ == '__main__':
    run_cli(main)
