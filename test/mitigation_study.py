"""The table of the mitigation study (`shell/mitigation_study.sh`): every method against one reference step
(the seed's step 2) on the same pairs, with 95% paired subject-level bootstrap intervals.

    python test/mitigation_study.py --runs models/study/seed_0 models/study/seed_1 \\
        --split-dir datasets/demo_fairface/test --reference fairface-step2 \\
        --methods fairface-step3 balanced fsn --out models/study/mitigation_study

Each run folder is a chain's MODELS_ROOT; the study reads `<run>/mitigation/<method>/predictions.csv`, the
predictions of the split's pairs that the study script wrote for each model or post-hoc method.
"""
import argparse
import os

from recognition.evaluation.bootstrap import REPLICATES
from recognition.evaluation.study import method_table, run_study, study_markdown
from recognition.utils import UserError, atomic_open, run_cli, write_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--runs', nargs='+', required=True, help="each seed's chain folder (its MODELS_ROOT)")
    p.add_argument('--split-dir', required=True, help='ground_truth.csv and metadata.csv of the pairs predicted')
    p.add_argument('--reference', default='fairface-step2', help='the method every other is compared with')
    p.add_argument('--methods', nargs='+', required=True, help='the methods, as named under <run>/mitigation/')
    p.add_argument('--out', required=True, help='writes OUT.md and OUT.json')
    p.add_argument('--bootstrap', type=int, default=REPLICATES, help='replicates of the paired bootstrap')
    p.add_argument('--seed', type=int, default=0, help='seed of the bootstrap resamples')
    return p.parse_args(argv)


def method_predictions(root, methods):
    """{method: predictions CSV} of one chain folder."""
    files = {m: os.path.join(root, 'mitigation', m, 'predictions.csv') for m in methods}
    for method, path in files.items():
        if not os.path.isfile(path):
            raise UserError(f'{path}: no predictions of {method} in {root} (run shell/mitigation_study.sh first)')
    return files


def main(argv=None):
    args = parse_args(argv)
    if args.bootstrap < 1:
        raise UserError(f'--bootstrap {args.bootstrap}: a study needs at least one replicate')
    methods = [args.reference] + [m for m in args.methods if m != args.reference]
    runs = {os.path.basename(os.path.normpath(r)): method_predictions(r, methods) for r in args.runs}
    if len(runs) != len(args.runs):
        raise UserError('--runs: two run folders have the same name; name each seed\'s folder differently')
    study = run_study(runs, os.path.join(args.split_dir, 'ground_truth.csv'), os.path.join(args.split_dir, 'metadata.csv'),
                      against=[(m, args.reference) for m in methods[1:]], replicates=args.bootstrap, seed=args.seed)
    study['reference'] = args.reference
    n = len(study['seeds'])
    text = (f'Every method against {args.reference} on the pairs of {args.split_dir}, over {n} seed'
            f'{"s" if n != 1 else ""}: the reference row gives values (mean ± standard deviation over the seeds), '
            f'every other row its paired change ({"the change and its" if n == 1 else "the mean change, and in how many seeds the"} '
            f'95% subject-level bootstrap interval{"" if n == 1 else " excludes 0, by direction"}; '
            f'{study["replicates"]} replicates{"; * = the interval excludes 0" if n == 1 else ""}).\n\n'
            + method_table(study, args.reference) + '\n' + study_markdown(study))
    with atomic_open(args.out + '.md', 'w') as f:
        f.write(text)
    write_json(args.out + '.json', study)
    print(text, end='')
    print(f'wrote {args.out}.md, {args.out}.json')


if __name__ == '__main__':
    run_cli(main)
