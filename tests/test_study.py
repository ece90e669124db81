"""test/fairness_study.py on two planted chains: step 3 lowers dark-female impostor scores in both seeds,
so its paired change in that group's AUC excludes 0 every time (and an untouched group's does not), and
the mean ± spread rows are the seeds' own numbers."""
import json
import os
import subprocess
import sys

import numpy as np

from recognition.evaluation.fairness import evaluate_pairs, load_pairs
from test_bootstrap import ROOT, identities

DARK_FEMALE = 2   # skin * 2 + gender


def write_scores(path, a, b, scores):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write('TEMPLATE_ID1,TEMPLATE_ID2,SCORE\n' + ''.join(f'{x},{y},{s:.6f}\n' for x, y, s in zip(a, b, scores)))


def test_study_table_of_planted_chains(tmp_path):
    val = tmp_path / 'val'
    val.mkdir()
    runs = []
    for seed in (0, 1):
        meta, a, b, labels, base = identities(seed=0, n_subjects=60, n_pairs=4000)
        _, _, _, _, shifted = identities(seed=0, n_subjects=60, n_pairs=4000, shift=(DARK_FEMALE, False, -0.1))
        noise = np.random.RandomState(seed).randn(len(base)) * 0.01
        root = tmp_path / 'study' / f'seed_{seed}'
        steps = {'fairface-step1/pretrained_group_eval': base + noise,
                 'fairface-step1/protected_group_eval': base + noise,
                 'fairface-step2/protected_group_eval': base + 2 * noise,
                 'fairface-step3/protected_group_eval': shifted + 2 * noise}
        for folder, scores in steps.items():
            write_scores(str(root / folder / 'predictions.csv'), a, b, scores)
        runs.append(str(root))
    cols = list(meta)
    (val / 'metadata.csv').write_text(','.join(cols) + '\n' + ''.join(
        ','.join(str(meta[c][i]) for c in cols) + '\n' for i in range(len(meta['TEMPLATE_ID']))))
    (val / 'ground_truth.csv').write_text('TEMPLATE_ID1,TEMPLATE_ID2,LABEL\n' + ''.join(
        f'{x},{y},{int(l)}\n' for x, y, l in zip(a, b, labels)))

    out = tmp_path / 'study' / 'table'
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'test', 'fairness_study.py'), '--runs', *runs,
                           '--val-dir', str(val), '--out', str(out), '--bootstrap', '200'],
                          capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stderr[-2000:]
    study = json.loads((tmp_path / 'study' / 'table.json').read_text())
    assert study['seeds'] == ['seed_0', 'seed_1'] and study['steps'] == ['pretrained', 'step1', 'step2', 'step3']
    for name in study['seeds']:
        change = study['changes']['step3 vs step2'][name]
        assert change['FMR@EER dark_female']['difference'] < 0
        auc = change['AUC dark_female']
        assert auc['difference'] > 0 and auc['excludes_0'] and auc['interval'][0] > 0
        assert change['AUC light_male']['difference'] == 0 and not change['AUC light_male']['excludes_0']
    # the rows are each seed's own evaluation
    one = evaluate_pairs(load_pairs(os.path.join(runs[1], 'fairface-step3/protected_group_eval/predictions.csv'),
                                    str(val / 'ground_truth.csv'), str(val / 'metadata.csv')))
    assert study['values']['step3']['AUC'][1] == one['accuracy']['auc']
    text = (tmp_path / 'study' / 'table.md').read_text()
    assert 'step3 vs step2: paired change per seed' in text and 'AUC dark_female 2/2' in text

    missing = subprocess.run([sys.executable, os.path.join(ROOT, 'test', 'fairness_study.py'), '--runs',
                              str(tmp_path / 'nothing'), '--val-dir', str(val), '--out', str(out)],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip().startswith('error: ')
    assert 'pretrained_group_eval' in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
