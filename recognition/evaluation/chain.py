"""The FairFace finetune chain's evaluation: a checkpoint scored on the validation pairs, the step-3 choice
of the most discriminated protected group, and the chain table.

`evaluate_checkpoint` scores a checkpoint on FairFace-style validation pairs and measures bias;
`choose_group` turns that into the step-3 choice; `append_chain_row` keeps every step's numbers and
scores, and its changes against the previous step and the pretrained model with paired intervals.
"""
import hashlib
import json
import os

from recognition.evaluation.bootstrap import REPLICATES, compare
from recognition.evaluation.fairness import (evaluate_pairs, evaluate_predictions, group_badness, load_pairs,
                                             worst_group)
from recognition.groups import GENDER_SKIN, GROUP_CODES, GROUPS
from recognition.utils import UserError, atomic_open, write_json


# --- evaluation on the validation pairs and the step-3 choice -------------------------------------------
def group_numbers(result, attr=GENDER_SKIN):
    """Per group: AUC, FMR and FNMR at the global EER threshold, and the rank badness."""
    rates = result['bias'][attr]['error_rates']['eer']
    badness = group_badness(result, attr, 'rank')
    return {g: {'auc': result['group_auc'][attr].get(g), 'fmr_eer': rates['fmr'].get(g),
                'fnmr_eer': rates['fnmr'].get(g), 'badness': badness.get(g)} for g in rates['fmr']}


def summarise(result, attr=GENDER_SKIN):
    """The numbers of one evaluation the chain table keeps (accuracy, per-group numbers, bias spreads)."""
    bias = result['bias'][attr]
    eer_rates = bias['error_rates']['eer']
    group_auc = [v for v in result['group_auc'][attr].values() if v is not None]
    return {'auc': result['accuracy']['auc'],
            'tar_at_far_1e-3': result['accuracy']['tar_at_far'].get('1e-03'),
            'eer': result['accuracy']['eer'],
            'groups': group_numbers(result, attr),
            'group_auc_gap': max(group_auc) - min(group_auc) if len(group_auc) > 1 else None,
            'rank_bias_positive': bias['positive']['rank']['spread'],
            'rank_bias_negative': bias['negative']['rank']['spread'],
            'fmr_ratio_at_eer': eer_rates['fmr_ratio'],
            'fnmr_ratio_at_eer': eer_rates['fnmr_ratio'],
            'worst_group': result['worst_group']}


def choose_group(result, criterion='auc', attr=GENDER_SKIN):
    """The step-3 choice: the most discriminated group of `attr` (`fairness.worst_group` by `criterion`)
    and the numbers behind it. On the synthetic demo the `rank` criterion does not pick the planted
    dark-female group, which has the lowest AUC and the highest FMR; `auc` (the default) does.
    """
    group = worst_group(result, attr, criterion)
    if group is None:
        raise UserError('validation pairs: no group has both genuine and impostor pairs; cannot choose one')
    return {'group': group, 'codes': GROUP_CODES[group], 'attribute': attr, 'criterion': criterion,
            **summarise(result, attr)}


def val_files(val_dir):
    """The FairFace-style validation folder's files, checked: images/, landmarks.txt, predictions.csv
    (the pair template), ground_truth.csv, metadata.csv."""
    files = {'images': os.path.join(val_dir, 'images'), 'landmarks': os.path.join(val_dir, 'landmarks.txt'),
             'template': os.path.join(val_dir, 'predictions.csv'),
             'ground_truth': os.path.join(val_dir, 'ground_truth.csv'),
             'metadata': os.path.join(val_dir, 'metadata.csv')}
    for key, path in files.items():
        if key != 'landmarks' and not os.path.exists(path):
            raise UserError(f'{path}: missing (a validation folder holds images/, predictions.csv, '
                            f'ground_truth.csv, metadata.csv and optionally landmarks.txt)')
    if not os.path.isfile(files['landmarks']):
        files['landmarks'] = None
    return files


def evaluate_checkpoint(model, val_dir, out_dir, aligned_dir=None, ctx=None, batch_size=64, backend='mxnet'):
    """Score `model` (`prefix,epoch`; layer and input from a model.json beside it that names it, as for any
    `--model`) on the validation pairs (align, flip TTA, cosine) and measure them.

    Writes `out_dir/predictions.csv` and `out_dir/eval.json`; returns the evaluation result dict.
    Aligned crops go to `aligned_dir` (default `out_dir/aligned`) and are reused when present. `backend`
    and `ctx` as `inference.load_embedder` takes them (`inference.backend_devices`).
    """
    # here: the study and the table tools read chain tables without a model; these load mxnet (~2 s)
    from recognition.alignment.folder import align_folder
    from recognition.evaluation.predictions import predict
    from recognition.model_folder import model_spec
    from recognition.inference import load_embedder, template_images
    files = val_files(val_dir)
    embedder = load_embedder(**model_spec(model), ctx=ctx, batch_size=batch_size, backend=backend)
    os.makedirs(out_dir, exist_ok=True)
    aligned_dir = aligned_dir or os.path.join(out_dir, 'aligned')
    align_folder(files['images'], aligned_dir, image_size=112, landmarks=files['landmarks'], skip_existing=True)
    predictions = os.path.join(out_dir, 'predictions.csv')
    predict(files['template'], template_images(aligned_dir), [embedder], predictions, batch_size=batch_size)
    result = evaluate_predictions(predictions, files['ground_truth'], files['metadata'])
    write_json(os.path.join(out_dir, 'eval.json'), result)
    return result


# --- the chain table ------------------------------------------------------------------------------------
def _fmt(v, digits=4):
    return 'n/a' if v is None else (f'{v:.{digits}f}' if isinstance(v, float) else str(v))


def chain_markdown(rows):
    """The chain table as markdown: one row per step (with the bias-mitigation methods that trained its
    model, `model_folder.model_methods`), accuracy then bias."""
    head = (['step', 'model', 'methods', 'AUC', 'TAR@FAR1e-3'] + [f'AUC {g}' for g in GROUPS]
            + ['group AUC gap', 'FMR@EER dark_female', 'FMR ratio@EER', 'FNMR ratio@EER', 'rank bias +',
               'rank bias -'])
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        s = r['summary']
        groups = s['groups']
        cells = ([r['step'], '/'.join(r['model'].split('/')[-2:]), '; '.join(r.get('methods') or []) or '-',
                  _fmt(s['auc'], 5), _fmt(s['tar_at_far_1e-3'])]
                 + [_fmt(groups.get(g, {}).get('auc')) for g in GROUPS]
                 + [_fmt(s['group_auc_gap']), _fmt(groups.get('dark_female', {}).get('fmr_eer')),
                    _fmt(s['fmr_ratio_at_eer'], 2), _fmt(s['fnmr_ratio_at_eer'], 2),
                    _fmt(s['rank_bias_positive']), _fmt(s['rank_bias_negative'])])
        lines.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
    return '\n'.join(lines) + '\n'


# The chain table's columns that get a paired change with its interval: (label, bootstrap path).
CHANGE_MEASURES = (('AUC', 'accuracy/auc'), ('TAR@FAR1e-3', 'accuracy/tar_at_far/1e-03'),
                   *[(f'AUC {g}', f'group_auc/{GENDER_SKIN}/{g}') for g in GROUPS],
                   ('group AUC gap', f'group_auc_gap/{GENDER_SKIN}'),
                   ('FMR@EER dark_female', f'bias/{GENDER_SKIN}/error_rates/eer/fmr/dark_female'),
                   ('FMR ratio@EER', f'bias/{GENDER_SKIN}/error_rates/eer/fmr_ratio'),
                   ('FNMR ratio@EER', f'bias/{GENDER_SKIN}/error_rates/eer/fnmr_ratio'),
                   ('rank bias +', f'bias/{GENDER_SKIN}/positive/rank/spread'),
                   ('rank bias -', f'bias/{GENDER_SKIN}/negative/rank/spread'))


def _sha256(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def _keep_scores(table, step, predictions):
    """Copy a step's validation predictions beside the table (`<table>_scores/<step>.csv`), atomically."""
    if not step or os.sep in step or step.startswith('.'):
        raise UserError(f'--step {step!r}: a chain step name is a plain file name')
    path = os.path.join(table + '_scores', step + '.csv')
    with open(predictions, 'rb') as src, atomic_open(path, 'wb') as dst:
        dst.write(src.read())
    return path


def _change(ref, row, replicates, seed, loaded):
    """The paired changes of `row` against the row `ref`: {label: {difference, interval, excludes_0}}."""
    def pairs_of(r):
        if r['step'] not in loaded:
            base = os.path.dirname(r['_table'])
            pairs = load_pairs(os.path.join(base, r['scores']), r['ground_truth'], r['metadata'])
            loaded[r['step']] = (pairs, evaluate_pairs(pairs))
        return loaded[r['step']]
    (pa, ra), (pb, rb) = pairs_of(ref), pairs_of(row)
    values = compare(pa, ra, pb, rb, replicates, seed, names=(ref['step'], row['step']))['values']
    return {label: {k: values[path][k] for k in ('difference', 'interval', 'interval_na', 'excludes_0')}
            for label, path in CHANGE_MEASURES}


def update_changes(table, rows, replicates=REPLICATES, seed=0):
    """Give every row with kept scores its change against the previous row and against the pretrained
    row (the row `pretrained`, else the first), recomputed only when either score file changed."""
    kept = [r for r in rows if r.get('scores')]
    if not kept:
        return
    reference = next((r for r in kept if r['step'] == 'pretrained'), kept[0])
    loaded = {}
    for r in kept:
        r['_table'] = table
    for i, row in enumerate(kept):
        changes = row.setdefault('changes', {})
        previous = kept[i - 1] if i else None
        for kind, ref in (('previous', previous), ('pretrained', reference)):
            if ref is None or ref is row or (kind == 'pretrained' and ref is previous):  # no row twice
                changes.pop(kind, None)
                continue
            stamp = [ref['step'], ref['scores_sha256'], row['scores_sha256'], replicates, seed]
            if changes.get(kind, {}).get('stamp') != stamp:
                changes[kind] = {'against': ref['step'], 'stamp': stamp,
                                 'values': _change(ref, row, replicates, seed, loaded)}
    for r in kept:
        del r['_table']


def change_cell(v):
    """One paired change as the tables print it: `+0.0150 [-0.0023, +0.0338]`, `*` when the interval excludes 0."""
    if v['difference'] is None:
        return 'n/a'
    if v['interval'] is None:
        return f'{v["difference"]:+.4f} [n/a]'
    lo, hi = v['interval']
    return f'{v["difference"]:+.4f} [{lo:+.4f}, {hi:+.4f}]' + ('*' if v['excludes_0'] else '')


def changes_markdown(rows):
    """Each step's change against the previous step and the pretrained model, with 95% paired bootstrap
    intervals; `*` marks a change whose interval excludes 0."""
    head = ['step', 'against'] + [label for label, _ in CHANGE_MEASURES]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        for kind in ('previous', 'pretrained'):
            c = r.get('changes', {}).get(kind)
            if not c:
                continue
            cells = [r['step'], f'{c["against"]} ({kind})'] + [change_cell(c['values'][label])
                                                               for label, _ in CHANGE_MEASURES]
            lines.append('| ' + ' | '.join(cells) + ' |')
    if len(lines) == 2:
        return ''
    return ('\nChanges with 95% paired subject-level bootstrap intervals (both steps under the same resamples; '
            '* = the interval excludes 0):\n\n' + '\n'.join(lines) + '\n')


def append_chain_row(table, step, model, result, predictions=None, val_dir=None, replicates=REPLICATES, seed=0,
                     **extra):
    """Record `step`'s numbers in `table.json` and rewrite `table.md`; a re-run step replaces its row.

    With `predictions` (the step's validation predictions) and `val_dir`, the scores are kept beside the
    table and the table also shows each step's paired change against the previous step and the pretrained
    model. Rows keep the order in which steps first ran. Returns the markdown table.
    """
    path = table + '.json'
    rows = []
    if os.path.isfile(path):
        try:
            with open(path) as f:
                rows = json.load(f)['rows']
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f'{path}: not a chain table ({e})') from None
    row = {'step': step, 'model': model, 'summary': summarise(result), **extra}
    if predictions:
        kept = _keep_scores(table, step, predictions)
        row.update({'scores': os.path.relpath(kept, os.path.dirname(os.path.abspath(table))),
                    'scores_sha256': _sha256(kept),
                    'ground_truth': os.path.abspath(os.path.join(val_dir, 'ground_truth.csv')),
                    'metadata': os.path.abspath(os.path.join(val_dir, 'metadata.csv'))})
    at = next((i for i, r in enumerate(rows) if r['step'] == step), None)
    if at is None:
        rows.append(row)
    else:
        rows[at] = row
    update_changes(os.path.abspath(table), rows, replicates, seed)
    markdown = chain_markdown(rows) + changes_markdown(rows)
    write_json(path, {'rows': rows})
    with atomic_open(table + '.md') as f:
        f.write(markdown)
    return markdown
