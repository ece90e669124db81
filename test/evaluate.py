"""Accuracy and bias report of FairFace-style predictions (definitions in docs/metrics.md), with 95%
subject-level bootstrap intervals; with --compare, the paired differences against a second predictions file
on the same pairs.

    python test/evaluate.py --predictions predictions.csv --ground-truth val/ground_truth.csv \\
        --metadata val/metadata.csv --out reports/val [--bootstrap 1000 --seed 0] [--compare other.csv]
"""
import argparse
import os

from recognition.evaluation.bootstrap import REPLICATES, bootstrap, compare
from recognition.evaluation.predictions import provenance_path
from recognition.evaluation.fairness import evaluate_pairs, load_pairs
from recognition.evaluation.report import comparison_text, summary_text, write_comparison, write_report
from recognition.utils import UserError, read_json, run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--predictions', required=True, help='TEMPLATE_ID1,TEMPLATE_ID2,SCORE')
    p.add_argument('--ground-truth', required=True, help='TEMPLATE_ID1,TEMPLATE_ID2,LABEL (1 = same person)')
    p.add_argument('--metadata', required=True,
                   help='TEMPLATE_ID,SUBJECT_ID,AGE,SKIN_COLOUR,GENDER,HEAD_POSE,SOURCE,GLASSES,BOUNDING_BOX_SIZE')
    p.add_argument('--out', required=True, help='report folder')
    p.add_argument('--bootstrap', type=int, default=REPLICATES,
                   help='subject-level bootstrap replicates for the 95%% intervals (0: none)')
    p.add_argument('--seed', type=int, default=0, help='seed of the bootstrap resamples')
    p.add_argument('--compare', default='', metavar='OTHER_PREDICTIONS',
                   help='also compare with these predictions of the same pairs (OTHER minus --predictions), '
                        'written to OUT/comparison.{json,md}')
    return p.parse_args(argv)


def add_provenance(result, pairs, args):
    """What test/predict.py recorded beside the predictions (models, fusion, post-processing), and the
    figures of its raw fused scores with the post-processing's paired change, when it kept them."""
    path = provenance_path(args.predictions)
    if not os.path.isfile(path):
        return
    result['provenance'] = read_json(path, 'cannot read')
    raw_name = result['provenance'].get('raw_scores')
    if not raw_name:
        return
    raw_path = os.path.join(os.path.dirname(os.path.abspath(args.predictions)), raw_name)
    if not os.path.isfile(raw_path):
        raise UserError(f'{path}: names raw scores {raw_name}, which are not beside it')
    raw_pairs = load_pairs(raw_path, args.ground_truth, args.metadata)
    raw = evaluate_pairs(raw_pairs)
    result['before_post_processing'] = {
        'scores': raw_path, 'accuracy': raw['accuracy'], 'worst_group': raw['worst_group'],
        'comparison': compare(raw_pairs, raw, pairs, result, args.bootstrap, args.seed,
                              names=('raw fused', 'post-processed')) if args.bootstrap else None}


def main(argv=None):
    args = parse_args(argv)
    if args.bootstrap < 0:
        raise UserError(f'--bootstrap {args.bootstrap}: give a number of replicates >= 0')
    if args.compare and not args.bootstrap:
        raise UserError('--compare needs --bootstrap > 0 (its intervals come from the resamples)')
    pairs = load_pairs(args.predictions, args.ground_truth, args.metadata)
    other = load_pairs(args.compare, args.ground_truth, args.metadata) if args.compare else None
    result = evaluate_pairs(pairs)
    if args.bootstrap:
        result['intervals'] = bootstrap(pairs, result, args.bootstrap, args.seed)
    add_provenance(result, pairs, args)
    paths = write_report(pairs, result, args.out)
    print(summary_text(result))
    print(f'\nreport: {paths["html"]}')
    if other is not None:
        comparison = compare(pairs, result, other, evaluate_pairs(other), args.bootstrap, args.seed,
                             names=(args.predictions, args.compare))
        written = write_comparison(comparison, args.out)
        print('\n' + comparison_text(comparison))
        print(f'\ncomparison: {written["md"]}')


if __name__ == '__main__':
    run_cli(main)
