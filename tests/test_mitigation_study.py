"""test/mitigation_study.py on planted methods: one lowers dark-female impostor scores in both seeds (its
paired change in that group's AUC excludes 0 upwards in 2 of 2 seeds), one only adds noise (no change beyond
its interval in the untouched groups), and the reference row carries the seeds' own values."""
import json
import os
import subprocess
import sys

import numpy as np

from recognition.evaluation.fairness import evaluate_pairs, load_pairs
from test_bootstrap import ROOT, identities
from test_study import DARK_FEMALE, write_scores


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'test', 'mitigation_study.py'), *args],
                          capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})


def test_mitigation_table_of_planted_methods(tmp_path):
    split = tmp_path / 'test'
    split.mkdir()
    runs = []
    for seed in (0, 1):
        meta, a, b, labels, base = identities(seed=0, n_subjects=60, n_pairs=4000)
        _, _, _, _, shifted = identities(seed=0, n_subjects=60, n_pairs=4000, shift=(DARK_FEMALE, False, -0.1))
        noise = np.random.RandomState(seed).randn(len(base)) * 0.01
        root = tmp_path / 'study' / f'seed_{seed}'
        for method, scores in {'fairface-step2': base + noise, 'fsn': shifted + noise,
                               'balanced': base + 1.5 * noise}.items():
            write_scores(str(root / 'mitigation' / method / 'predictions.csv'), a, b, scores)
        runs.append(str(root))
    cols = list(meta)
    (split / 'metadata.csv').write_text(','.join(cols) + '\n' + ''.join(
        ','.join(str(meta[c][i]) for c in cols) + '\n' for i in range(len(meta['TEMPLATE_ID']))))
    (split / 'ground_truth.csv').write_text('TEMPLATE_ID1,TEMPLATE_ID2,LABEL\n' + ''.join(
        f'{x},{y},{int(l)}\n' for x, y, l in zip(a, b, labels)))

    out = tmp_path / 'study' / 'mitigation'
    proc = run_cli('--runs', *runs, '--split-dir', str(split), '--methods', 'fsn', 'balanced', '--out', str(out),
                   '--bootstrap', '200')
    assert proc.returncode == 0, proc.stderr[-2000:]
    study = json.loads(out.with_suffix('.json').read_text())
    assert study['steps'] == ['fairface-step2', 'fsn', 'balanced'] and study['reference'] == 'fairface-step2'
    for name in study['seeds']:
        fsn = study['changes']['fsn vs fairface-step2'][name]
        assert fsn['AUC dark_female']['excludes_0'] and fsn['AUC dark_female']['interval'][0] > 0
        assert fsn['AUC light_male']['difference'] == 0 and not fsn['AUC light_male']['excludes_0']
    one = evaluate_pairs(load_pairs(os.path.join(runs[1], 'mitigation/fsn/predictions.csv'),
                                    str(split / 'ground_truth.csv'), str(split / 'metadata.csv')))
    assert study['values']['fsn']['AUC'][1] == one['accuracy']['auc']
    assert len(study['worst_group']['fsn']) == 2
    table = out.with_suffix('.md').read_text().split('\n\n')[1].splitlines()
    header = [c.strip() for c in table[0].strip('|').split('|')]
    fsn_row = [c.strip() for c in next(r for r in table if r.startswith('| fsn ')).strip('|').split('|')]
    assert fsn_row[header.index('AUC dark_female')].endswith('(0 down, 2 up of 2)')
    assert next(r for r in table if r.startswith('| fairface-step2 (values) '))

    missing = run_cli('--runs', runs[0], '--split-dir', str(split), '--methods', 'faircal', '--out', str(out))
    assert missing.returncode == 2 and missing.stderr.strip().startswith('error: ')
    assert 'faircal' in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
