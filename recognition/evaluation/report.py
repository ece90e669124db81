"""The accuracy and bias report: report.json, report.md, PNG plots and one self-contained HTML page.

Every file is written atomically; report.json is written last, so its presence means a complete report.
"""
import base64
import html
import os

import numpy as np

from recognition.evaluation.bootstrap import value_at
from recognition.evaluation.fairness import Ranked, group_roc
from recognition.groups import ATTRIBUTES
from recognition.utils import atomic_open, atomic_path, write_json

ATTR_TITLES = {'gender': 'gender', 'skin': 'skin colour', 'gender_skin': 'gender x skin colour'}


def _fmt(v, digits=4):
    if v is None:
        return 'n/a'
    if isinstance(v, float):
        return f'{v:.{digits}f}' if abs(v) >= 10 ** -digits or v == 0 else f'{v:.2e}'
    return str(v)


def _cell(result, path, digits=4):
    """The value at `path` (bootstrap.value_at), with its 95% interval when the report has intervals."""
    text = _fmt(value_at(result, path), digits)
    intervals = result.get('intervals')
    if intervals and path in intervals['values']:
        iv = intervals['values'][path].get('interval')
        text += ' [n/a]' if iv is None else f' [{_fmt(iv[0], digits)}, {_fmt(iv[1], digits)}]'
    return text


def summary_rows(result):
    """The headline table: one row per protected attribute."""
    head = ['attribute', 'rank bias +', 'rank bias -', 'adjusted bias +', 'adjusted bias -', 'cell AUC bias +',
            'cell AUC bias -', 'FMR ratio @FMR1e-3', 'FNMR ratio @FMR1e-3', 'FMR ratio @EER', 'FNMR ratio @EER']
    rows = []
    for attr in ATTRIBUTES:
        b = f'bias/{attr}'
        rows.append([ATTR_TITLES[attr]] + [_cell(result, f'{b}/{pol}/{m}/spread') for m in ('rank', 'adjusted', 'cell')
                                           for pol in ('positive', 'negative')]
                    + [_cell(result, f'{b}/error_rates/{t}/{r}_ratio', 2) for t in ('fmr_1e-3', 'eer')
                       for r in ('fmr', 'fnmr')])
    return head, rows


def group_rows(result, attr):
    """Per-group numbers of one attribute."""
    b = result['bias'][attr]
    head = ['group', 'pos pairs', 'neg pairs', 'AUC', 'mean rank +', 'mean rank -', 'adj. effect +',
            'adj. effect -', 'cell AUC +', 'cell AUC -', 'FMR @FMR1e-3', 'FNMR @FMR1e-3', 'FMR @EER', 'FNMR @EER']
    rows = []
    for g in ATTRIBUTES[attr]:
        base = f'bias/{attr}'
        rows.append([g, b['positive']['pairs'][g], b['negative']['pairs'][g], _cell(result, f'group_auc/{attr}/{g}')]
                    + [_cell(result, f'{base}/{pol}/{m}/{g}') for m in ('mean_rank', 'adjusted_effect', 'cell_auc')
                       for pol in ('positive', 'negative')]
                    + [_cell(result, f'{base}/error_rates/{t}/{r}/{g}') for t in ('fmr_1e-3', 'eer')
                       for r in ('fmr', 'fnmr')])
    return head, rows


def accuracy_rows(result):
    acc = result['accuracy']
    head = ['pairs (+/-)', 'AUC-ROC'] + [f'TAR@FAR={k}' for k in acc['tar_at_far']] + ['EER', 'worst group']
    p = result['pairs']
    return head, [[f'{p["positive"]}/{p["negative"]}', _cell(result, 'accuracy/auc', 5)]
                  + [_cell(result, f'accuracy/tar_at_far/{k}') for k in acc['tar_at_far']]
                  + [_cell(result, 'accuracy/eer'), result['worst_group']]]


def worst_group_text(result):
    """The worst group with its AUC interval and the runner-up's, and whether the data resolve the order."""
    w = (result.get('intervals') or {}).get('worst_group')
    if not w:
        return None
    fmt_iv = lambda iv: 'n/a' if iv is None else f'[{_fmt(iv[0])}, {_fmt(iv[1])}]'
    text = (f'worst group ({ATTR_TITLES[w["attribute"]]}, lowest AUC): {w["group"]} {_fmt(w["auc"])} '
            f'{fmt_iv(w["interval"])}; runner-up {w["runner_up"]} {_fmt(w["runner_up_auc"])} '
            f'{fmt_iv(w["runner_up_interval"])}; ')
    if w['resolved'] is None:
        text += 'an interval is n/a, so the ranking is not tested'
    elif w['resolved']:
        text += 'the intervals do not overlap'
    else:
        text += 'the intervals overlap: the ranking is not resolved by the data'
    share = w.get('share_of_replicates')
    return text + ('' if share is None else f' ({w["group"]} is the worst in {100 * share:.0f}% of the replicates)')


def interval_notes(result):
    """How the intervals were made, and every number without one with the reason."""
    iv = result.get('intervals')
    if not iv:
        return ['No intervals (--bootstrap 0).']
    lines = [f'95% percentile intervals from {iv["replicates"]} subject-level bootstrap replicates (seed '
             f'{iv["seed"]}): {iv["rule"]}.']
    missing = [(p, v['n/a']) for p, v in iv['values'].items() if 'n/a' in v and value_at(result, p) is not None]
    lines += [f'no interval for {p}: {why}' for p, why in missing]
    return lines


def cell_rows(result):
    """(d) per attribute and polarity: combinations used, pairs in cells, and why a spread is missing."""
    head = ['attribute', 'polarity', 'pairs in cells', 'combinations with every group', 'spread', 'best', 'worst',
            'note']
    rows = []
    for attr in ATTRIBUTES:
        for pol in ('positive', 'negative'):
            c = result['bias'][attr][pol]['cell']
            rows.append([ATTR_TITLES[attr], pol, c['pairs_in_cells'], c['combinations'],
                         _cell(result, f'bias/{attr}/{pol}/cell/spread'), c['high'] or 'n/a', c['low'] or 'n/a',
                         c['reason'] or ''])
    return head, rows


COMPARISON_PATHS = ('accuracy/auc', 'accuracy/tar_at_far/1e-03', 'accuracy/tar_at_far/1e-04', 'accuracy/eer')


def comparison_rows(comparison, everything=False):
    """Paired differences (second minus first): value of each, difference, interval; `*` marks an
    interval that excludes 0. Without `everything`: accuracy, the group AUCs and every bias spread."""
    a, b = comparison['names']
    head = ['measure', a, b, 'difference', '95% interval', 'excludes 0']
    rows = []
    for path, v in comparison['values'].items():
        keep = everything or path in COMPARISON_PATHS or path.startswith(('group_auc', 'group_auc_gap')) \
            or path.endswith(('/spread', '_ratio', '_diff'))
        if not keep:
            continue
        iv = v['interval']
        rows.append([path, _fmt(v['first']), _fmt(v['second']), _fmt(v['difference']),
                     'n/a: ' + v['interval_na'] if iv is None else f'[{_fmt(iv[0])}, {_fmt(iv[1])}]',
                     '' if v['excludes_0'] is None else ('*' if v['excludes_0'] else '')])
    return head, rows


def provenance_lines(result):
    """Which models, fusion and post-processing produced the scores (from test/predict.py's record)."""
    prov = result.get('provenance')
    if not prov:
        return []
    lines = [f'model {m["name"]}: {m["checkpoint"]} ({m["layer"]})'
             + (f'; trained with {", ".join(m["methods"])}' if m.get('methods') else '') for m in prov.get('models', [])]
    lines.append(f'fusion: {prov.get("fusion")}; post-processing: {", ".join(prov.get("post_processing") or []) or "none"}')
    if prov.get('missing_pairs'):
        lines.append(f'{prov["missing_pairs"]} pairs without an image scored {prov.get("missing_score")}')
    return lines


def post_processing_rows(result):
    """The raw fused scores' accuracy beside the post-processed ones, with the paired change."""
    before = result.get('before_post_processing')
    if not before:
        return None
    raw = {'accuracy': before['accuracy'], 'worst_group': before['worst_group'], 'pairs': result['pairs']}
    head, rows = accuracy_rows(raw)
    rows = [['raw fused'] + rows[0], ['post-processed'] + accuracy_rows(result)[1][0]]
    head = ['scores'] + head
    if before.get('comparison'):
        c = before['comparison']['values']
        change = ['change (paired 95% interval)', '']
        for path in ['accuracy/auc'] + [f'accuracy/tar_at_far/{k}' for k in result['accuracy']['tar_at_far']] + ['accuracy/eer']:
            v, iv = c[path], c[path]['interval']
            change.append(_fmt(v['difference']) + (' [n/a]' if iv is None else f' [{_fmt(iv[0])}, {_fmt(iv[1])}]')
                          + ('*' if v['excludes_0'] else ''))
        rows.append(change + [''])
    return head, rows


def comparison_text(comparison):
    note = (f'Paired comparison, {comparison["names"][1]} minus {comparison["names"][0]}: both score sets under '
            f'the same {comparison["replicates"]} subject-level resamples (seed {comparison["seed"]}); '
            f'* = the 95% interval of the difference excludes 0.')
    return note + '\n\n' + text_table(*comparison_rows(comparison))


def write_comparison(comparison, out_dir):
    """comparison.json (every measure) and comparison.md (every measure, one table), atomically."""
    os.makedirs(out_dir, exist_ok=True)
    head, rows = comparison_rows(comparison, everything=True)
    with atomic_open(os.path.join(out_dir, 'comparison.md')) as f:
        f.write(f'# Paired comparison\n\n{comparison_text(comparison).splitlines()[0]}\n\n{_md_table(head, rows)}\n')
    write_json(os.path.join(out_dir, 'comparison.json'), comparison)
    return {'json': os.path.join(out_dir, 'comparison.json'), 'md': os.path.join(out_dir, 'comparison.md')}


def text_table(head, rows):
    """A fixed-width table for the terminal."""
    cells = [head] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    line = lambda r: '  '.join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return '\n'.join([line(head), '  '.join('-' * w for w in widths)] + [line(r) for r in cells[1:]])


def summary_text(result):
    """What the CLI prints: accuracy, bias per attribute, the gender x skin colour groups' numbers, the
    worst group's ranking and how the intervals were made."""
    parts = ['\n'.join(provenance_lines(result))] if result.get('provenance') else []
    parts += [text_table(*accuracy_rows(result))]
    if post_processing_rows(result):
        parts.append(text_table(*post_processing_rows(result)))
    parts += [text_table(*summary_rows(result)), text_table(*group_rows(result, 'gender_skin'))]
    worst = worst_group_text(result)
    return '\n\n'.join(parts + ([worst] if worst else []) + ['\n'.join(interval_notes(result)[:1])])


def _md_table(head, rows):
    out = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    return '\n'.join(out + ['| ' + ' | '.join(str(c) for c in r) + ' |' for r in rows])


def _html_table(head, rows):
    th = ''.join(f'<th>{html.escape(h)}</th>' for h in head)
    trs = ''.join('<tr>' + ''.join(f'<td>{html.escape(str(c))}</td>' for c in r) + '</tr>' for r in rows)
    return f'<table><tr>{th}</tr>{trs}</table>'


def _save(fig, path):
    # Fixed margins: tight_layout draws every figure an extra time and was most of the report's cost.
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.2, top=0.86, wspace=0.32)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=80)


def plot_all(pairs, result, out_dir):
    """ROC per group, score histograms per group and bias bars; returns {file name: caption}."""
    import matplotlib   # here: pyplot costs ~2.5 s to import, and the backend must be chosen before it
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    plots = {}
    ranked = Ranked(pairs.scores, pairs.labels)  # one sort for every curve
    fig, axes = plt.subplots(1, len(ATTRIBUTES), figsize=(5 * len(ATTRIBUTES), 4.2))
    fpr_all, tpr_all, _ = ranked.roc()
    for ax, attr in zip(axes, ATTRIBUTES):
        ax.plot(np.maximum(fpr_all, 1e-6), tpr_all, 'k--', lw=1, label=f'all ({result["accuracy"]["auc"]:.4f})')
        for g, (fpr, tpr, auc) in group_roc(pairs, attr, ranked).items():
            ax.plot(np.maximum(fpr, 1e-6), tpr, lw=1.3, label=f'{g} ({auc:.4f})')
        ax.set_xscale('log')
        ax.set_xlim(1e-5, 1)
        ax.set_xlabel('FPR (FMR)')
        ax.set_ylabel('TPR (1 - FNMR)')
        ax.set_title(f'ROC by {ATTR_TITLES[attr]}')
        ax.legend(fontsize=7, loc='lower right')
        ax.grid(alpha=0.3)
    _save(fig, os.path.join(out_dir, 'roc.png'))
    plt.close(fig)
    plots['roc.png'] = 'ROC curves per protected group (AUC in brackets); mixed pairs only in "all".'

    bins = np.linspace(pairs.scores.min(), pairs.scores.max(), 60)
    for attr, names in ATTRIBUTES.items():
        fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3), sharex=True, squeeze=False)
        for ax, (g, name) in zip(axes[0], enumerate(names)):
            m = pairs.groups[attr] == g
            # stepfilled: one patch per histogram instead of one per bar (far cheaper to draw)
            ax.hist(pairs.scores[m & pairs.labels], bins=bins, alpha=0.6, density=True, label='positive',
                    histtype='stepfilled')
            ax.hist(pairs.scores[m & ~pairs.labels], bins=bins, alpha=0.6, density=True, label='negative',
                    histtype='stepfilled')
            ax.set_title(name)
            ax.set_xlabel('score')
        axes[0][0].legend(fontsize=7)
        _save(fig, os.path.join(out_dir, f'hist_{attr}.png'))
        plt.close(fig)
        plots[f'hist_{attr}.png'] = f'Score histograms of positive and negative pairs by {ATTR_TITLES[attr]}.'

    for attr, names in ATTRIBUTES.items():
        b = result['bias'][attr]
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
        x = np.arange(len(names))
        val = lambda d: [np.nan if d[g] is None else d[g] for g in names]
        for ax, key, title in ((axes[0], 'mean_rank', '(a) mean normalised rank'),
                               (axes[1], 'adjusted_effect', '(b) adjusted group effect')):
            ax.bar(x - 0.2, val(b['positive'][key]), 0.4, label='positive pairs')
            ax.bar(x + 0.2, val(b['negative'][key]), 0.4, label='negative pairs')
            ax.set_title(title)
        axes[0].axhline(0.5, color='k', lw=0.8)
        rates = b['error_rates']['eer']
        axes[2].bar(x - 0.2, val(rates['fmr']), 0.4, label='FMR')
        axes[2].bar(x + 0.2, val(rates['fnmr']), 0.4, label='FNMR')
        axes[2].set_title('(c) FMR / FNMR at the global EER threshold')
        for ax in axes:
            ax.set_xticks(x)
            ax.set_xticklabels(names, fontsize=8)
            ax.legend(fontsize=7)
        _save(fig, os.path.join(out_dir, f'bias_{attr}.png'))
        plt.close(fig)
        plots[f'bias_{attr}.png'] = f'Bias measures per group of {ATTR_TITLES[attr]}.'
    return plots


def write_report(pairs, result, out_dir, title='Face verification: accuracy and bias'):
    """Write plots, report.md, report.html (images inlined) and report.json into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    plots = plot_all(pairs, result, out_dir)
    sections = [('Accuracy', accuracy_rows(result))]
    if post_processing_rows(result):
        sections.append(('Before and after post-processing', post_processing_rows(result)))
    sections.append(('Bias summary', summary_rows(result)))
    sections += [(f'Groups: {ATTR_TITLES[a]} ({result["mixed_pairs"][a]} mixed pairs in no group)',
                  group_rows(result, a)) for a in ATTRIBUTES]
    sections.append(('(d) per-cell AUC: cells used', cell_rows(result)))
    note = ('Definitions: docs/metrics.md. "+" = positive (same person) pairs, "-" = negative pairs. '
            'Bias (a) = spread of mean normalised score rank between groups; (b) = spread of group effects '
            'after a linear adjustment for the legitimate attributes; (d) = spread between groups of the '
            'organisers\' per-cell AUC (a cell = one combination of legitimate values x one group; its positive '
            'pairs against all negative pairs, or its negative pairs against all positive pairs), averaged over '
            'the combinations that every group has; ratios = max/min per-group error rate at a global '
            'threshold (n/a when a group has no errors). [lo, hi] = 95% subject-level bootstrap interval.')
    notes = ([worst_group_text(result)] if worst_group_text(result) else []) + interval_notes(result)
    produced = provenance_lines(result)
    md = [f'# {title}', '', note, ''] + (['## Produced by', ''] + [f'- {line}' for line in produced] + ['']
                                        if produced else [])
    for name, (head, rows) in sections:
        md += [f'## {name}', '', _md_table(head, rows), '']
    md += ['## Worst group and intervals', ''] + [f'- {line}' for line in notes] + ['']
    md += ['## Plots', ''] + [f'![{cap}]({f})\n\n{cap}\n' for f, cap in plots.items()]
    with atomic_open(os.path.join(out_dir, 'report.md')) as f:
        f.write('\n'.join(md))
    body = [f'<h1>{html.escape(title)}</h1>', f'<p>{html.escape(note)}</p>']
    if produced:
        body += ['<h2>Produced by</h2>', '<ul>' + ''.join(f'<li>{html.escape(line)}</li>' for line in produced) + '</ul>']
    for name, (head, rows) in sections:
        body += [f'<h2>{html.escape(name)}</h2>', _html_table(head, rows)]
    body += ['<h2>Worst group and intervals</h2>', '<ul>' + ''.join(f'<li>{html.escape(line)}</li>'
                                                                  for line in notes) + '</ul>']
    body.append('<h2>Plots</h2>')
    for fname, cap in plots.items():
        with open(os.path.join(out_dir, fname), 'rb') as f:
            data = base64.b64encode(f.read()).decode('ascii')
        body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(fname)}">'
                    f'<figcaption>{html.escape(cap)}</figcaption></figure>')
    style = ('body{font-family:sans-serif;max-width:1400px;margin:auto}table{border-collapse:collapse;'
             'margin-bottom:1em}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}'
             'td:first-child,th:first-child{text-align:left}img{max-width:100%}')
    with atomic_open(os.path.join(out_dir, 'report.html')) as f:
        f.write(f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
                f'<style>{style}</style></head><body>{"".join(body)}</body></html>')
    write_json(os.path.join(out_dir, 'report.json'), result)
    return {'json': os.path.join(out_dir, 'report.json'), 'md': os.path.join(out_dir, 'report.md'),
            'html': os.path.join(out_dir, 'report.html'), 'plots': sorted(plots)}
