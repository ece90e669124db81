"""Contact sheet of a rec: `python data_process/show_record.py --rec train.rec --out grid.png [--shuffle] [--n 64]`.

Each face is captioned with its identity and attribute values (meanings from the sidecar), a quick
check that a packed rec holds what was meant.
"""
import argparse

import cv2
import numpy as np

from recognition.data.dataset import FaceRecordDataset, contact_sheet
from recognition.utils import UserError, atomic_path, run_cli


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--rec', required=True, help='PREFIX.rec, or a glob of shards')
    parser.add_argument('--out', required=True, help='output image (.png or .jpg)')
    parser.add_argument('--n', type=int, default=64, help='number of faces')
    parser.add_argument('--shuffle', action='store_true', help='random records instead of the first ones')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--columns', type=int, default=8)
    args = parser.parse_args()
    dataset = FaceRecordDataset(args.rec)
    n = min(args.n, len(dataset))
    if n <= 0:
        raise UserError(f'{args.rec}: no records to show')
    indices = (np.random.default_rng(args.seed).choice(len(dataset), n, replace=False) if args.shuffle
               else np.arange(n))
    sheet = contact_sheet(dataset, indices, columns=min(args.columns, n))
    ext = '.' + args.out.rsplit('.', 1)[-1] if '.' in args.out else '.png'
    ok, buf = cv2.imencode(ext, sheet)
    if not ok:
        raise UserError(f'{args.out}: cannot write this image format')
    with atomic_path(args.out) as tmp:
        buf.tofile(tmp)
    print(f'{args.out}: {n} of {len(dataset)} records')


if __name__ == '__main__':
    run_cli(main)
