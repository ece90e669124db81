"""The subject-level bootstrap against explicit resampling, the paired comparison, measure (d) against
sklearn, the n/a cases, and the evaluation CLI's input checks."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from recognition.evaluation.bootstrap import (WeightedEvaluation, bootstrap, compare, subject_counts,
                                              value_at)
from recognition.evaluation.chain import append_chain_row
from recognition.evaluation.fairness import evaluate_pairs, legitimate_cells, make_pairs
from recognition.groups import ATTRIBUTES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def identities(seed=0, n_subjects=24, per_subject=5, n_pairs=900, shift=None, round_to=None):
    """Images of identities with fixed gender/skin and per-image glasses/pose; genuine and impostor pairs.

    Returns (metadata dict, image index of both images, labels, scores). shift: (group code skin*2+gender,
    polarity, amount) added to that group's scores.
    """
    rng = np.random.RandomState(seed)
    subject = np.repeat(np.arange(n_subjects), per_subject)
    n = len(subject)
    gender, skin = rng.randint(0, 2, n_subjects)[subject], rng.randint(0, 2, n_subjects)[subject]
    gender[:per_subject * 4] = np.repeat([0, 1, 0, 1], per_subject)  # every gender x skin group has people
    skin[:per_subject * 4] = np.repeat([0, 0, 1, 1], per_subject)
    meta = {'TEMPLATE_ID': np.array([str(i) for i in range(n)], dtype=object),
            'SUBJECT_ID': np.array([f's{v}' for v in subject], dtype=object),
            'GENDER': np.array([str(v) for v in gender], dtype=object),
            'SKIN_COLOUR': np.array([str(v) for v in skin], dtype=object),
            'GLASSES': np.array([str(v) for v in rng.randint(0, 2, n)], dtype=object),
            'HEAD_POSE': np.array([str(v) for v in rng.randint(0, 2, n)], dtype=object)}
    a = rng.randint(0, n, n_pairs)
    same = rng.rand(n_pairs) < 0.5
    mate = subject[a] * per_subject + rng.randint(0, per_subject, n_pairs)
    b = np.where(same, mate, rng.randint(0, n, n_pairs))
    _, first = np.unique(np.minimum(a, b) * n + np.maximum(a, b), return_index=True)
    keep = np.sort(first[a[first] != b[first]])  # each pair once
    a, b = a[keep], b[keep]
    labels = subject[a] == subject[b]
    scores = np.where(labels, 0.6, 0.25) + 0.15 * rng.randn(len(a))
    if shift:
        code, positive, amount = shift
        combo = skin * 2 + gender
        scores += amount * ((combo[a] == code) & (combo[b] == code) & (labels == positive))
    if round_to:
        scores = np.round(scores, round_to)
    return meta, a, b, labels, scores


def test_bootstrap_equals_explicit_resampling_of_identities():
    """Each replicate's numbers are the module's own numbers (and sklearn's AUCs) on the pair list
    rebuilt by hand from the drawn identities: a pair of two identities drawn k1 and k2 times k1*k2
    times, a pair within one identity drawn k times k times. Rounded scores give ties."""
    meta, a, b, labels, scores = identities(round_to=2)
    pairs = make_pairs(scores, labels, a, b, meta)
    ev = WeightedEvaluation(pairs)
    counts = subject_counts(pairs.subjects[2], 7, 0, 4)
    got = ev.measures(counts)
    s1, s2, n_subjects = pairs.subjects
    checked = 0
    for r in range(4):
        k = counts[r, :n_subjects].astype(int)
        times = np.where(s1 == s2, k[s1], k[s1] * k[s2])
        rep = np.repeat(np.arange(len(scores)), times)
        want = evaluate_pairs(make_pairs(scores[rep], labels[rep], a[rep], b[rep], meta))
        assert got['accuracy/auc'][r] == pytest.approx(roc_auc_score(labels[rep], scores[rep]), abs=1e-12)
        g = pairs.groups['gender_skin'][rep]
        for j, name in enumerate(ATTRIBUTES['gender_skin']):
            m = g == j
            if not 0 < labels[rep][m].sum() < m.sum():
                assert not np.isfinite(got[f'group_auc/gender_skin/{name}'][r])
                continue
            assert got[f'group_auc/gender_skin/{name}'][r] == pytest.approx(
                roc_auc_score(labels[rep][m], scores[rep][m]), abs=1e-12)
        for path, values in got.items():
            ref = value_at(want, path)
            if ref is None:
                assert not np.isfinite(values[r]), path
            else:
                assert values[r] == pytest.approx(ref, rel=1e-9, abs=1e-12), path
                checked += 1
    assert checked > 400


def test_wide_integer_path_gives_the_same_numbers(monkeypatch):
    """Chunks whose doubled sums could overflow int32 run in int64, with the same results."""
    import recognition.evaluation.bootstrap as bootstrap_module
    meta, a, b, labels, scores = identities(seed=8, round_to=2)
    ev = WeightedEvaluation(make_pairs(scores, labels, a, b, meta))
    counts = subject_counts(ev.n_subjects, 1, 0, 3)
    narrow = ev.measures(counts)
    assert ev._buffers['cp'].dtype == np.int32
    monkeypatch.setattr(bootstrap_module, 'INT32_LIMIT', 10)
    wide = ev.measures(counts)
    assert ev._buffers['cp'].dtype == np.int64
    for path in narrow:
        np.testing.assert_array_equal(narrow[path], wide[path], err_msg=path)


def test_intervals_are_reproducible_and_cover_the_estimates():
    meta, a, b, labels, scores = identities(seed=1, n_subjects=40, n_pairs=2000)
    pairs = make_pairs(scores, labels, a, b, meta)
    result = evaluate_pairs(pairs)
    one, two = bootstrap(pairs, result, 200, seed=3), bootstrap(pairs, result, 200, seed=3)
    assert one['values'] == two['values']
    assert bootstrap(pairs, result, 200, seed=4)['values'] != one['values']
    lo, hi = one['values']['accuracy/auc']['interval']
    assert lo < result['accuracy']['auc'] < hi and hi - lo < 0.1
    for g in ATTRIBUTES['gender_skin']:
        lo, hi = one['values'][f'group_auc/gender_skin/{g}']['interval']
        assert lo <= result['group_auc']['gender_skin'][g] <= hi
    w = one['worst_group']
    assert w['group'] == result['worst_group'] and w['runner_up'] != w['group']
    assert w['resolved'] is False  # exchangeable groups: the order is noise


def test_paired_comparison_finds_a_planted_change_and_nothing_on_identical_scores():
    meta, a, b, labels, scores = identities(seed=2, n_subjects=40, n_pairs=2000)
    first = make_pairs(scores, labels, a, b, meta)
    better = identities(seed=2, n_subjects=40, n_pairs=2000, shift=(2, True, 0.25))[4]  # dark female genuine up
    second = make_pairs(better, labels, a, b, meta)
    r1, r2 = evaluate_pairs(first), evaluate_pairs(second)
    same = compare(first, r1, make_pairs(scores.copy(), labels, a, b, meta), r1, 200)['values']
    for path, v in same.items():
        if v['interval'] is not None:
            assert v['interval'] == [0.0, 0.0] and not v['excludes_0'], path
    diff = compare(first, r1, second, r2, 200)['values']
    change = diff['group_auc/gender_skin/dark_female']
    assert change['difference'] > 0 and change['excludes_0'] and change['interval'][0] > 0
    assert diff['accuracy/auc']['excludes_0']
    assert not diff['group_auc/gender_skin/light_male']['excludes_0']  # untouched group
    with pytest.raises(Exception, match='not scored on the same pairs'):
        compare(first, r1, make_pairs(scores[:-1], labels[:-1], a[:-1], b[:-1], meta), r1, 10)


def test_cell_auc_against_sklearn():
    """(d): each cell's positives against all negatives, each cell's negatives against all positives."""
    meta, a, b, labels, scores = identities(seed=3, n_subjects=40, n_pairs=3000, round_to=2)
    pairs = make_pairs(scores, labels, a, b, meta)
    result = evaluate_pairs(pairs)
    cells, names = legitimate_cells(pairs)
    checked = 0
    for attr in ATTRIBUTES:
        for pol, positive in (('positive', True), ('negative', False)):
            block = result['bias'][attr][pol]
            for cell in block['cells']:
                m = (cells == names.index(cell['legitimate'])) & (pairs.groups[attr] == ATTRIBUTES[attr].index(
                    cell['group'])) & (labels == positive)
                other = labels != positive
                y = np.r_[np.ones(m.sum()), np.zeros(other.sum())] if positive else \
                    np.r_[np.zeros(m.sum()), np.ones(other.sum())]
                want = roc_auc_score(y, np.r_[scores[m], scores[other]])
                assert cell['auc'] == pytest.approx(want, abs=1e-12) and cell['pairs'] == m.sum()
                checked += 1
            # the group value: the mean over the combinations where every group has a cell
            by = {}
            for cell in block['cells']:
                by.setdefault(cell['legitimate'], {})[cell['group']] = cell['auc']
            full = [c for c in by.values() if len(c) == len(ATTRIBUTES[attr])]
            assert block['cell']['combinations'] == len(full)
            for g in ATTRIBUTES[attr]:
                if full:
                    assert block['cell_auc'][g] == pytest.approx(np.mean([c[g] for c in full]))
    assert checked > 50


def test_groups_without_support_get_na_with_the_reason():
    meta, a, b, labels, scores = identities(seed=4, n_subjects=30, n_pairs=1500)
    combo = meta['SKIN_COLOUR'].astype(int) * 2 + meta['GENDER'].astype(int)
    subject = meta['SUBJECT_ID']
    # dark_male: one identity only; light_male: no impostor pairs inside the group
    lone = subject[combo == 3][0]
    meta['GENDER'] = np.where((combo == 3) & (subject != lone), '0', meta['GENDER']).astype(object)
    combo = meta['SKIN_COLOUR'].astype(int) * 2 + meta['GENDER'].astype(int)
    keep = ~((combo[a] == 1) & (combo[b] == 1) & ~labels)
    pairs = make_pairs(scores[keep], labels[keep], a[keep], b[keep], meta)
    result = evaluate_pairs(pairs)
    iv = bootstrap(pairs, result, 50)['values']
    assert 'identity in dark_male' in iv['group_auc/gender_skin/dark_male']['n/a']
    assert iv['group_auc/gender_skin/light_male']['n/a'] == 'no negative pairs in light_male'
    assert result['group_auc']['gender_skin'].get('light_male') is None
    assert 'no negative pairs' in iv['bias/gender_skin/error_rates/eer/fmr/light_male']['n/a']
    assert 'interval' in iv['group_auc/gender_skin/light_female']


def write_case(folder, n_pairs=300):
    """metadata.csv, ground_truth.csv and predictions.csv of a small identity case; returns their paths."""
    meta, a, b, labels, scores = identities(seed=5, n_subjects=20, n_pairs=n_pairs)
    cols = list(meta)
    (folder / 'metadata.csv').write_text(','.join(cols) + '\n' + ''.join(
        ','.join(str(meta[c][i]) for c in cols) + '\n' for i in range(len(meta['TEMPLATE_ID']))))
    (folder / 'gt.csv').write_text('TEMPLATE_ID1,TEMPLATE_ID2,LABEL\n' + ''.join(
        f'{x},{y},{int(l)}\n' for x, y, l in zip(a, b, labels)))
    rows = [f'{x},{y},{s:.6f}' for x, y, s in zip(a, b, scores)]
    (folder / 'pred.csv').write_text('TEMPLATE_ID1,TEMPLATE_ID2,SCORE\n' + '\n'.join(rows) + '\n')
    return rows


def evaluate_cli(folder, *extra, predictions='pred.csv'):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'test', 'evaluate.py'),
                           '--predictions', str(folder / predictions), '--ground-truth', str(folder / 'gt.csv'),
                           '--metadata', str(folder / 'metadata.csv'), '--out', str(folder / 'out'), *extra],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg'})


def one_line_error(proc):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
    return lines[0]


def test_cli_refuses_bad_inputs_with_one_line(tmp_path):
    rows = write_case(tmp_path)
    pred = tmp_path / 'pred.csv'
    head = 'TEMPLATE_ID1,TEMPLATE_ID2,SCORE\n'
    pred.write_text(head + '\n'.join(rows[:-41]) + '\n')
    assert f'41 ground-truth pairs have no prediction (of {len(rows)};' in one_line_error(evaluate_cli(tmp_path))
    for bad in ('inf', 'nan', '-inf'):
        broken = rows[:]
        broken[10] = broken[10].rsplit(',', 1)[0] + ',' + bad
        pred.write_text(head + '\n'.join(broken) + '\n')
        msg = one_line_error(evaluate_cli(tmp_path))
        assert f'pred.csv: line 12: SCORE' in msg and 'not a finite number' in msg
    x, y, _ = rows[3].split(',')
    pred.write_text(head + '\n'.join(rows + [f'{y},{x},0.5']) + '\n')  # listed again, ids swapped
    msg = one_line_error(evaluate_cli(tmp_path))
    assert f'line {len(rows) + 2}: pair {y},{x} already scored on line 5' in msg
    pred.write_text(head + '\n'.join(rows) + '\n')
    gt = tmp_path / 'gt.csv'
    lines = gt.read_text().splitlines()
    x, y, label = lines[7].split(',')
    gt.write_text('\n'.join(lines + [f'{x},{y},{1 - int(label)}']) + '\n')
    msg = one_line_error(evaluate_cli(tmp_path))
    assert f'gt.csv: pair {x},{y} labelled {label} on line 8 and {1 - int(label)} on line {len(lines) + 1}' in msg


def test_cli_warns_about_extra_predictions_and_reproduces_intervals(tmp_path):
    rows = write_case(tmp_path)
    (tmp_path / 'pred.csv').write_text('TEMPLATE_ID1,TEMPLATE_ID2,SCORE\n' + '\n'.join(
        rows + ['0,99,0.5', '1,98,0.4', '2,97,0.3']) + '\n')
    first = evaluate_cli(tmp_path, '--bootstrap', '60', '--seed', '5')
    assert first.returncode == 0, first.stderr
    assert '3 predicted pairs are not in' in first.stderr
    assert 'subject-level bootstrap' in first.stdout and 'worst group' in first.stdout
    report = json.loads((tmp_path / 'out' / 'report.json').read_text())
    again = evaluate_cli(tmp_path, '--bootstrap', '60', '--seed', '5')
    assert again.returncode == 0
    assert json.loads((tmp_path / 'out' / 'report.json').read_text())['intervals'] == report['intervals']
    assert report['intervals']['replicates'] == 60 and report['intervals']['seed'] == 5
    lo, hi = report['intervals']['values']['accuracy/auc']['interval']
    assert lo <= report['accuracy']['auc'] <= hi
    # --compare on the same pairs; a file lacking pairs is refused
    (tmp_path / 'pred.csv').write_text('TEMPLATE_ID1,TEMPLATE_ID2,SCORE\n' + '\n'.join(rows) + '\n')
    (tmp_path / 'other.csv').write_text('TEMPLATE_ID1,TEMPLATE_ID2,SCORE\n' + '\n'.join(rows) + '\n')
    same = evaluate_cli(tmp_path, '--bootstrap', '30', '--compare', str(tmp_path / 'other.csv'))
    assert same.returncode == 0, same.stderr
    saved = json.loads((tmp_path / 'out' / 'comparison.json').read_text())
    assert saved['values']['accuracy/auc']['difference'] == 0.0
    (tmp_path / 'other.csv').write_text('TEMPLATE_ID1,TEMPLATE_ID2,SCORE\n' + '\n'.join(rows[5:]) + '\n')
    msg = one_line_error(evaluate_cli(tmp_path, '--bootstrap', '30', '--compare', str(tmp_path / 'other.csv')))
    assert 'other.csv: 5 ground-truth pairs have no prediction' in msg


def test_chain_table_shows_paired_changes(tmp_path):
    val = tmp_path / 'val'
    val.mkdir()
    meta, a, b, labels, scores = identities(seed=6, n_subjects=40, n_pairs=2000)
    cols = list(meta)
    (val / 'metadata.csv').write_text(','.join(cols) + '\n' + ''.join(
        ','.join(str(meta[c][i]) for c in cols) + '\n' for i in range(len(meta['TEMPLATE_ID']))))
    (val / 'ground_truth.csv').write_text('TEMPLATE_ID1,TEMPLATE_ID2,LABEL\n' + ''.join(
        f'{x},{y},{int(l)}\n' for x, y, l in zip(a, b, labels)))
    better = identities(seed=6, n_subjects=40, n_pairs=2000, shift=(2, True, -0.25))[4]
    table = str(tmp_path / 'models' / 'chain_table')
    for step, s in (('pretrained', scores), ('step1', scores), ('step2', better)):
        pred = tmp_path / f'{step}.csv'
        pred.write_text('TEMPLATE_ID1,TEMPLATE_ID2,SCORE\n' + ''.join(f'{x},{y},{v:.6f}\n' for x, y, v in zip(a, b, s)))
        result = evaluate_pairs(make_pairs(np.round(s, 6), labels, a, b, meta))
        markdown = append_chain_row(table, step, f'models/{step}/model,1', result, predictions=str(pred),
                                    val_dir=str(val), replicates=200)
    rows = json.load(open(table + '.json'))['rows']
    assert sorted(os.listdir(tmp_path / 'models' / 'chain_table_scores')) == ['pretrained.csv', 'step1.csv',
                                                                              'step2.csv']
    assert 'changes' not in rows[0] or not rows[0]['changes']
    step1, step2 = rows[1]['changes'], rows[2]['changes']
    assert 'pretrained' not in step1  # its previous row is the pretrained one: shown once
    assert step1['previous']['values']['AUC']['difference'] == 0.0 and not step1['previous']['values']['AUC']['excludes_0']
    loss = step2['previous']['values']['AUC dark_female']
    assert loss['difference'] < 0 and loss['excludes_0'] and step2['pretrained']['against'] == 'pretrained'
    assert not step2['previous']['values']['AUC light_male']['excludes_0']
    assert 'step2 | step1 (previous)' in markdown and '*' in markdown.split('Changes')[1]
    # a re-run step1 with other scores: step2's change against it is recomputed
    stamp = step2['previous']['stamp']
    pred = tmp_path / 'step1.csv'
    pred.write_text('TEMPLATE_ID1,TEMPLATE_ID2,SCORE\n' + ''.join(f'{x},{y},{v:.6f}\n' for x, y, v in zip(a, b, better)))
    append_chain_row(table, 'step1', 'models/step1/model,1', evaluate_pairs(make_pairs(np.round(better, 6), labels, a,
                     b, meta)), predictions=str(pred), val_dir=str(val), replicates=200)
    rows = json.load(open(table + '.json'))['rows']
    assert rows[2]['changes']['previous']['stamp'] != stamp
    assert rows[2]['changes']['previous']['values']['AUC']['difference'] == 0.0
