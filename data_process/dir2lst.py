"""Print an insightface .lst for a folder of identity folders: `python data_process/dir2lst.py IMAGE_DIR > train.lst`.

Labels are 0..K-1 in sorted folder order; every image is marked aligned (1).
"""
import argparse
import sys

from recognition.data.lst import dir_to_lst, format_lst_line
from recognition.utils import run_cli


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('image_dir', help='folder with one sub-folder of aligned images per identity')
    parser.add_argument('--root', default=None,
                        help='write paths relative to this folder (e.g. where the .lst will live)')
    args = parser.parse_args()
    for item in dir_to_lst(args.image_dir, root=args.root):
        sys.stdout.write(format_lst_line(item) + '\n')


if __name__ == '__main__':
    run_cli(main)
