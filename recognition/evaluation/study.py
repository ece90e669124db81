"""A multi-seed study of the finetune chain: every step's numbers over the seeds (mean and spread), and
per seed the paired bootstrap change of the last step against the ones it should improve on. The
mitigation study (`method_table`) puts every method in one row against one reference step.

The point values and the paired changes are those of the chain table (`chain.CHANGE_MEASURES`,
`bootstrap.compare`), so a study row and a chain-table row of the same model agree. The seeds' runs share
the validation pairs; each seed's comparison uses its own models' scores under the same identity resamples.
"""
import numpy as np

from recognition.evaluation.bootstrap import compare, value_at
from recognition.evaluation.chain import CHANGE_MEASURES, change_cell
from recognition.evaluation.fairness import evaluate_pairs, load_pairs, worst_group


def run_study(runs, ground_truth, metadata, against, replicates=1000, seed=0):
    """`runs`: {seed name: {step: predictions CSV}} with the same steps for every seed; `against`:
    (step, reference step) pairs to compare. Returns {'steps', 'seeds', 'values', 'changes'}."""
    steps = list(next(iter(runs.values())))
    values = {step: {label: [] for label, _ in CHANGE_MEASURES} for step in steps}
    worst = {step: [] for step in steps}
    changes = {f'{b} vs {a}': {} for b, a in against}
    for name, files in runs.items():
        loaded = {}
        for step in steps:
            pairs = load_pairs(files[step], ground_truth, metadata)
            loaded[step] = (pairs, evaluate_pairs(pairs))
            for label, path in CHANGE_MEASURES:
                values[step][label].append(value_at(loaded[step][1], path))
            worst[step].append(worst_group(loaded[step][1]))
        for later, reference in against:
            (pa, ra), (pb, rb) = loaded[reference], loaded[later]
            paired = compare(pa, ra, pb, rb, replicates, seed, names=(reference, later))['values']
            changes[f'{later} vs {reference}'][name] = {
                label: {k: paired[path][k] for k in ('difference', 'interval', 'interval_na', 'excludes_0')}
                for label, path in CHANGE_MEASURES}
    return {'seeds': list(runs), 'steps': steps, 'replicates': replicates, 'bootstrap_seed': seed,
            'values': values, 'worst_group': worst, 'changes': changes}


def _mean_spread(vals):
    ok = [v for v in vals if v is not None]
    if not ok:
        return 'n/a'
    if len(vals) == 1:
        return f'{ok[0]:.4f}'
    sd = float(np.std(ok, ddof=1)) if len(ok) > 1 else 0.0
    return f'{np.mean(ok):.4f} ± {sd:.4f}'


def study_markdown(study):
    """Mean ± sample standard deviation over the seeds per step, then each seed's paired changes."""
    labels = [label for label, _ in CHANGE_MEASURES]
    n = len(study['seeds'])
    lines = [f'Over {n} seed{"s" if n != 1 else ""} ({", ".join(study["seeds"])}): mean ± standard deviation '
             f'over the seeds.', '', '| step | ' + ' | '.join(labels) + ' |', '|' + '---|' * (len(labels) + 1)]
    for step in study['steps']:
        lines.append(f'| {step} | ' + ' | '.join(_mean_spread(study['values'][step][l]) for l in labels) + ' |')
    for title, per_seed in study['changes'].items():
        lines += ['', f'{title}: paired change per seed, 95% subject-level bootstrap interval '
                      f'({study["replicates"]} replicates; * = the interval excludes 0)', '',
                  '| seed | ' + ' | '.join(labels) + ' |', '|' + '---|' * (len(labels) + 1)]
        for name, change in per_seed.items():
            lines.append(f'| {name} | ' + ' | '.join(change_cell(change[label]) for label in labels) + ' |')
        excluded = {label: sum(bool(c[label]['excludes_0']) for c in per_seed.values()) for label in labels}
        lines += ['', 'interval excludes 0 in: ' + ', '.join(f'{label} {k}/{len(per_seed)}'
                                                           for label, k in excluded.items())]
    return '\n'.join(lines) + '\n'


def _summary_cell(changes):
    """Over the seeds: the mean paired change and in how many seeds its interval excludes 0, by direction; with
    one seed, that seed's change and interval."""
    if len(changes) == 1:
        return change_cell(changes[0])
    known = [c['difference'] for c in changes if c['difference'] is not None]
    if not known:
        return 'n/a'
    down = sum(bool(c['excludes_0']) and c['difference'] < 0 for c in changes)
    up = sum(bool(c['excludes_0']) and c['difference'] > 0 for c in changes)
    return f'{np.mean(known):+.4f} ({down} down, {up} up of {len(changes)})'


def method_table(study, reference):
    """One row per method: the reference step's values (mean ± spread over the seeds), then each method's
    paired change against it (mean change and how many seeds' 95% intervals exclude 0 in each direction; one
    seed: the change and its interval), and the worst group (lowest group AUC) in each seed."""
    labels = [label for label, _ in CHANGE_MEASURES]
    lines = ['| method | ' + ' | '.join(labels) + ' | worst group (AUC), per seed |', '|' + '---|' * (len(labels) + 2)]
    worst = study['worst_group']
    lines.append(f'| {reference} (values) | '
                 + ' | '.join(_mean_spread(study['values'][reference][l]) for l in labels)
                 + f' | {", ".join(str(g) for g in worst[reference])} |')
    for step in study['steps']:
        if step == reference:
            continue
        per_seed = study['changes'][f'{step} vs {reference}']
        cells = [_summary_cell([per_seed[name][label] for name in study['seeds']]) for label in labels]
        lines.append(f'| {step} | ' + ' | '.join(cells) + f' | {", ".join(str(g) for g in worst[step])} |')
    return '\n'.join(lines) + '\n'
