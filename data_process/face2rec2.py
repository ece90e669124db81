"""Pack every PREFIX*.lst into insightface's identity-indexed RecordIO (PREFIX.rec/.idx + property).

    python data_process/face2rec2.py datasets/demo_fairface/train --attributes train_attributes.csv

With --num-shards S the shards PREFIX_0.rec ... are committed as one set by PREFIX.shards.json. One
packer per output folder at a time (its .lock); SIGTERM or Ctrl-C removes the temporary files and
exits non-zero, and a re-run removes those a SIGKILLed run left. `property` is per folder: a list that needs
another one than the folder's other recs is refused.
"""
import argparse
import logging

from recognition.data.packer import pack
from recognition.utils import run_cli, sigterm_raises


def image_size(text):
    try:
        h, w = (int(v) for v in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected H,W, got {text!r}') from None
    return h, w


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('prefix', help='PREFIX: every PREFIX*.lst is packed to <list name>.rec')
    parser.add_argument('--num-thread', type=int, default=1, help='encoding processes')
    parser.add_argument('--quality', type=int, default=95, help='JPEG quality (PNG: compression x10)')
    parser.add_argument('--encoding', default='.jpg', help='.jpg or .png for images that are re-encoded')
    parser.add_argument('--num-shards', type=int, default=1, help='write S complete shards PREFIX_0.rec ...')
    parser.add_argument('--attributes', default=None,
                        help='CSV with a path column (and optional SUBJECT_ID); other columns become label[2:]')
    parser.add_argument('--attribute-codes', default=None,
                        help='JSON {column: {code: meaning}} (default: <csv stem>.codes.json beside the CSV)')
    parser.add_argument('--image-size', type=image_size, default=(112, 112), help='H,W of the stored faces')
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format='%(levelname)s: %(message)s')
    with sigterm_raises():   # SIGTERM unwinds like Ctrl-C: temporary files and workers are cleaned up
        summary = pack(args.prefix, num_threads=args.num_thread, quality=args.quality, encoding=args.encoding,
                       num_shards=args.num_shards, attributes=args.attributes, image_size=args.image_size,
                       codes=args.attribute_codes)
    print('packed %(images)d images of %(identities)d identities into %(shards)d rec(s), '
          'skipped %(skipped)d, in %(seconds).1fs' % summary)
    for path in summary['outputs']:
        print(path)


if __name__ == '__main__':
    run_cli(main)
