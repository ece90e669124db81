"""Choose the most discriminated protected group for finetune step 3 and record the step's numbers.

Evaluates a model on FairFace-style validation pairs (align, flip TTA, cosine; AUC and the bias measures
of recognition.evaluation.fairness) and writes the worst gender x skin-colour group with the numbers
behind the choice to a JSON that `train/train.py --selected-attributes auto[:file]` reads.

    python train/select_protected_group.py --model models/ff-step2/model,1 \\
        --val-dir datasets/demo_fairface/val --out models/protected_group.json \\
        [--table models/chain_table --step step2]
"""
import argparse
import os

from recognition.evaluation.chain import append_chain_row, choose_group, evaluate_checkpoint
from recognition.evaluation.fairness import WORST_GROUP_CRITERIA, evaluate_predictions
from recognition.groups import GROUP_FILE
from recognition.inference import add_backend_arg, backend_devices
from recognition.model_folder import model_methods
from recognition.utils import UserError, add_device_args, run_cli, write_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--model', help='prefix,epoch of the model to evaluate')
    src.add_argument('--predictions', help='an existing predictions CSV of the validation pairs instead')
    p.add_argument('--val-dir', default='datasets/demo_fairface/val',
                   help='images/, landmarks.txt, predictions.csv (template), ground_truth.csv, metadata.csv')
    p.add_argument('--out', default=os.path.join('models', GROUP_FILE), help='the choice JSON to write')
    p.add_argument('--eval-dir', default='', help='where predictions.csv and eval.json go '
                                                  '(default: beside --out, <out name>_eval/)')
    p.add_argument('--aligned-dir', default='', help='aligned validation crops, reused between runs '
                                                     '(default: <eval dir>/aligned)')
    p.add_argument('--criterion', default='auc', choices=WORST_GROUP_CRITERIA,
                   help='auc: lowest AUC within the group; errors: highest FMR+FNMR at the EER threshold; '
                        'rank: impostor minus genuine rank effect (docs/metrics.md)')
    p.add_argument('--table', default='', help='also record the numbers as a row of this chain table '
                                               '(PREFIX.json and PREFIX.md)')
    p.add_argument('--step', default='', help='the row name in --table')
    p.add_argument('--seed', type=int, default=0, help="seed of the chain table's bootstrap resamples")
    add_device_args(p)
    add_backend_arg(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.table and not args.step:
        raise UserError('--table needs --step (the row name)')
    predictions = args.predictions
    if args.model:
        eval_dir = args.eval_dir or os.path.splitext(args.out)[0] + '_eval'
        predictions = os.path.join(eval_dir, 'predictions.csv')
        result = evaluate_checkpoint(args.model, args.val_dir, eval_dir, aligned_dir=args.aligned_dir or None,
                                     ctx=backend_devices(args.backend, args.gpus, args.ctx), batch_size=args.batch_size,
                                     backend=args.backend)
        print(f'read {args.model} and {args.val_dir}; wrote {eval_dir}/predictions.csv, {eval_dir}/eval.json')
    else:
        result = evaluate_predictions(args.predictions, os.path.join(args.val_dir, 'ground_truth.csv'),
                                      os.path.join(args.val_dir, 'metadata.csv'))
    choice = choose_group(result, args.criterion)
    choice['model'] = args.model or args.predictions
    write_json(args.out, choice)
    print(f'AUC {choice["auc"]:.5f}')
    for group, n in choice['groups'].items():
        print(f'  {group:13s} ' + '  '.join(f'{k} {"n/a" if v is None else "%.4f" % v}' for k, v in n.items()))
    print(f'most discriminated group ({args.criterion}): {choice["group"]} {choice["codes"]}; wrote {args.out}')
    if args.table:
        methods = model_methods(args.model) if args.model else []
        print(append_chain_row(args.table, args.step, choice['model'], result, predictions=predictions,
                               val_dir=args.val_dir, seed=args.seed, methods=methods), end='')
        print(f'wrote {args.table}.json, {args.table}.md')


if __name__ == '__main__':
    run_cli(main)
