"""The table of a multi-seed chain study (`shell/fairness_study.sh`): every step's AUC and bias as mean ±
spread over the seeds, and per seed the paired bootstrap change of step 3 against step 2 and against the
pretrained model.

    python test/fairness_study.py --runs models/study/seed_0 models/study/seed_1 \\
        --val-dir datasets/demo_fairface/val --out models/study/study [--step3-run fairface-step3]

Each run folder is a chain's MODELS_ROOT: the validation predictions its evaluations wrote
(`fairface-step1/pretrained_group_eval/`, `<run>/protected_group_eval/` for steps 1-3) are read.
"""
import argparse
import os

from recognition.evaluation.bootstrap import REPLICATES
from recognition.evaluation.study import run_study, study_markdown
from recognition.utils import UserError, atomic_open, run_cli, write_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--runs', nargs='+', required=True, help="each seed's chain folder (its MODELS_ROOT)")
    p.add_argument('--val-dir', required=True, help='ground_truth.csv and metadata.csv of the validation pairs')
    p.add_argument('--out', required=True, help='writes OUT.md and OUT.json')
    p.add_argument('--step1-run', default='fairface-step1')
    p.add_argument('--step2-run', default='fairface-step2')
    p.add_argument('--step3-run', default='fairface-step3')
    p.add_argument('--bootstrap', type=int, default=REPLICATES, help='replicates of the paired bootstrap')
    p.add_argument('--seed', type=int, default=0, help='seed of the bootstrap resamples')
    return p.parse_args(argv)


def chain_predictions(root, args):
    """{step: validation predictions CSV} of one chain folder, in chain order."""
    files = {'pretrained': os.path.join(root, args.step1_run, 'pretrained_group_eval', 'predictions.csv'),
             'step1': os.path.join(root, args.step1_run, 'protected_group_eval', 'predictions.csv'),
             'step2': os.path.join(root, args.step2_run, 'protected_group_eval', 'predictions.csv'),
             'step3': os.path.join(root, args.step3_run, 'protected_group_eval', 'predictions.csv')}
    for step, path in files.items():
        if not os.path.isfile(path):
            raise UserError(f'{path}: no {step} evaluation in {root} (run its chain first)')
    return files


def main(argv=None):
    args = parse_args(argv)
    if args.bootstrap < 1:
        raise UserError(f'--bootstrap {args.bootstrap}: a study needs at least one replicate')
    runs = {os.path.basename(os.path.normpath(r)): chain_predictions(r, args) for r in args.runs}
    if len(runs) != len(args.runs):
        raise UserError('--runs: two run folders have the same name; name each seed\'s folder differently')
    study = run_study(runs, os.path.join(args.val_dir, 'ground_truth.csv'), os.path.join(args.val_dir, 'metadata.csv'),
                      against=[('step3', 'step2'), ('step3', 'pretrained')], replicates=args.bootstrap,
                      seed=args.seed)
    study['step3_run'] = args.step3_run
    text = study_markdown(study)
    with atomic_open(args.out + '.md', 'w') as f:
        f.write(f'Step 3 run: {args.step3_run}\n\n' + text)
    write_json(args.out + '.json', study)
    print(text, end='')
    print(f'wrote {args.out}.md, {args.out}.json')


if __name__ == '__main__':
    run_cli(main)
