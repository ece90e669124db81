"""Build the synthetic demo datasets: `python data_process/make_demo_data.py [--out datasets] [--seed 0]`.

datasets/demo_emore (MS1M-shaped pretraining rec + lfw.bin/cfp_fp.bin) and datasets/demo_fairface
(FairFace-shaped train/val/test); see datasets/README.md. `--only ijbc|rfw|bfw` builds a small set in
the IJB-C, RFW or BFW layout for test/ijb.py and test/bias_benchmarks.py instead. Deterministic from --seed; an existing
complete set is kept unless --force.
"""
import argparse
import dataclasses
import os

from recognition.data.demo_sets import OPTIONAL_SETS, DemoSizes, build_demo
from recognition.utils import run_cli


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='datasets', help='folder that receives demo_emore/ and demo_fairface/')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--only', choices=('emore', 'fairface') + OPTIONAL_SETS,
                        help='build one set; ijbc, rfw and bfw (the benchmark layouts, small) only when named')
    parser.add_argument('--force', action='store_true', help='rebuild sets that already exist')
    parser.add_argument('--workers', type=int, default=min(4, os.cpu_count() or 1),
                        help='render processes (the output does not depend on it)')
    sizes = parser.add_argument_group('sizes')
    for field in dataclasses.fields(DemoSizes):
        sizes.add_argument('--' + field.name.replace('_', '-'), type=int, default=field.default,
                           help=f'default {field.default}')
    args = parser.parse_args()
    demo_sizes = DemoSizes(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoSizes)})
    build_demo(args.out, seed=args.seed, only=args.only, force=args.force, sizes=demo_sizes,
               workers=max(1, args.workers))


if __name__ == '__main__':
    run_cli(main)
