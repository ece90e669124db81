"""The accuracy and bias report: report.json, report.md, PNG plots and one self-contained HTML page.

Every file is written atomically; report.json is written last, so its presence means a complete report.
"""
import base64
import html
import os

import numpy as np

from recognition.evaluation.fairness import ATTRIBUTES, Ranked, group_roc
from recognition.utils import atomic_open, atomic_path, write_json

ATTR_TITLES = {'gender': 'gender', 'skin': 'skin colour', 'gender_skin': 'gender x skin colour'}


def _fmt(v, digits=4):
    if v is None:
        return 'n/a'
    if isinstance(v, float):
        return f'{v:.{digits}f}' if abs(v) >= 10 ** -digits or v == 0 else f'{v:.2e}'
    return str(v)


def summary_rows(result):
    """The headline table: one row per protected attribute."""
    head = ['attribute', 'rank bias +', 'rank bias -', 'adjusted bias +', 'adjusted bias -',
            'FMR ratio @FMR1e-3', 'FNMR ratio @FMR1e-3', 'FMR ratio @EER', 'FNMR ratio @EER']
    rows = []
    for attr in ATTRIBUTES:
        b = result['bias'][attr]
        rates = b['error_rates']
        rows.append([ATTR_TITLES[attr], _fmt(b['positive']['rank']['spread']), _fmt(b['negative']['rank']['spread']),
                     _fmt(b['positive']['adjusted']['spread']), _fmt(b['negative']['adjusted']['spread']),
                     _fmt(rates['fmr_1e-3']['fmr_ratio'], 2), _fmt(rates['fmr_1e-3']['fnmr_ratio'], 2),
                     _fmt(rates['eer']['fmr_ratio'], 2), _fmt(rates['eer']['fnmr_ratio'], 2)])
    return head, rows


def group_rows(result, attr):
    """Per-group numbers of one attribute."""
    b = result['bias'][attr]
    head = ['group', 'pos pairs', 'neg pairs', 'AUC', 'mean rank +', 'mean rank -', 'adj. effect +',
            'adj. effect -', 'FMR @FMR1e-3', 'FNMR @FMR1e-3', 'FMR @EER', 'FNMR @EER']
    rows = []
    for g in ATTRIBUTES[attr]:
        r1, r2 = b['error_rates']['fmr_1e-3'], b['error_rates']['eer']
        rows.append([g, b['positive']['pairs'][g], b['negative']['pairs'][g],
                     _fmt(result['group_auc'][attr].get(g)),
                     _fmt(b['positive']['mean_rank'][g]), _fmt(b['negative']['mean_rank'][g]),
                     _fmt(b['positive']['adjusted_effect'][g]), _fmt(b['negative']['adjusted_effect'][g]),
                     _fmt(r1['fmr'][g]), _fmt(r1['fnmr'][g]), _fmt(r2['fmr'][g]), _fmt(r2['fnmr'][g])])
    return head, rows


def accuracy_rows(result):
    acc = result['accuracy']
    head = ['pairs (+/-)', 'AUC-ROC'] + [f'TAR@FAR={k}' for k in acc['tar_at_far']] + ['EER', 'worst group']
    p = result['pairs']
    return head, [[f'{p["positive"]}/{p["negative"]}', _fmt(acc['auc'], 5)]
                  + [_fmt(v) for v in acc['tar_at_far'].values()] + [_fmt(acc['eer']), result['worst_group']]]


def text_table(head, rows):
    """A fixed-width table for the terminal."""
    cells = [head] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    line = lambda r: '  '.join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return '\n'.join([line(head), '  '.join('-' * w for w in widths)] + [line(r) for r in cells[1:]])


def summary_text(result):
    """What the CLI prints: accuracy, bias per attribute, then the gender x skin colour groups' numbers."""
    return '\n\n'.join([text_table(*accuracy_rows(result)), text_table(*summary_rows(result)),
                        text_table(*group_rows(result, 'gender_skin'))])


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
    import matplotlib
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
    sections = [('Accuracy', accuracy_rows(result)), ('Bias summary', summary_rows(result))]
    sections += [(f'Groups: {ATTR_TITLES[a]} ({result["mixed_pairs"][a]} mixed pairs in no group)',
                  group_rows(result, a)) for a in ATTRIBUTES]
    note = ('Definitions: docs/metrics.md. "+" = positive (same person) pairs, "-" = negative pairs. '
            'Bias (a) = spread of mean normalised score rank between groups; (b) = spread of group effects '
            'after a linear adjustment for the legitimate attributes; ratios = max/min per-group error rate '
            'at a global threshold (n/a when a group has no errors).')
    md = [f'# {title}', '', note, '']
    for name, (head, rows) in sections:
        md += [f'## {name}', '', _md_table(head, rows), '']
    md += ['## Plots', ''] + [f'![{cap}]({f})\n\n{cap}\n' for f, cap in plots.items()]
    with atomic_open(os.path.join(out_dir, 'report.md')) as f:
        f.write('\n'.join(md))
    body = [f'<h1>{html.escape(title)}</h1>', f'<p>{html.escape(note)}</p>']
    for name, (head, rows) in sections:
        body += [f'<h2>{html.escape(name)}</h2>', _html_table(head, rows)]
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
