"""Accuracy and bias report of FairFace-style predictions (definitions in docs/metrics.md).

    python test/evaluate.py --predictions predictions.csv --ground-truth val/ground_truth.csv \\
        --metadata val/metadata.csv --out reports/val
"""
import argparse

from recognition.evaluation.fairness import evaluate_pairs, load_pairs
from recognition.evaluation.report import summary_text, write_report
from recognition.utils import run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--predictions', required=True, help='TEMPLATE_ID1,TEMPLATE_ID2,SCORE')
    p.add_argument('--ground-truth', required=True, help='TEMPLATE_ID1,TEMPLATE_ID2,LABEL (1 = same person)')
    p.add_argument('--metadata', required=True,
                   help='TEMPLATE_ID,SUBJECT_ID,AGE,SKIN_COLOUR,GENDER,HEAD_POSE,SOURCE,GLASSES,BOUNDING_BOX_SIZE')
    p.add_argument('--out', required=True, help='report folder')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    pairs = load_pairs(args.predictions, args.ground_truth, args.metadata)
    result = evaluate_pairs(pairs)
    paths = write_report(pairs, result, args.out)
    print(summary_text(result))
    print(f'\nreport: {paths["html"]}')


if __name__ == '__main__':
    run_cli(main)
