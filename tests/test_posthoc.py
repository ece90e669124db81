"""Post-hoc fair calibration (FSN, FairCal): planted cluster shifts removed, unshifted scores left alone,
the saved state round-trips, test/predict.py fits, saves, reloads and refuses bad input."""
import json
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

from recognition.evaluation import posthoc
from recognition.evaluation.fairness import fmr_threshold
from recognition.utils import UserError
from test_inference import make_checkpoint
from test_predict import load_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREDICT = os.path.join(ROOT, 'test', 'predict.py')
FMR = 1e-2


def planted(seed, shift, impostors_only=True, n_ids=50):
    """Two clusters of embeddings (4 images per identity), all within-cluster pairs; cluster 1's impostor
    scores (or all its scores) raised by `shift`. Returns features, i1, i2, labels, scores, clusters."""
    rng = np.random.RandomState(seed)
    ids = np.repeat(np.arange(n_ids), 4)
    cluster = (ids >= n_ids // 2).astype(int)
    x = np.eye(8)[cluster] * 3 + rng.randn(len(ids), 8) * 0.3
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    i1, i2 = np.triu_indices(len(ids), 1)
    within = cluster[i1] == cluster[i2]
    i1, i2 = i1[within], i2[within]
    labels = ids[i1] == ids[i2]
    scores = np.where(labels, rng.normal(0.5, 0.1, len(i1)), rng.normal(0.1, 0.1, len(i1)))
    scores += np.where((~labels | (not impostors_only)) & (cluster[i1] == 1), shift, 0.0)
    return [x.astype(np.float32)], i1, i2, labels, scores, cluster


def cluster_fmr(scores, labels, i1, cluster):
    """Each cluster's FMR at the global threshold of FMR 1e-2."""
    t = fmr_threshold(scores, labels, FMR)
    return np.array([(scores[~labels & (cluster[i1] == c)] >= t).mean() for c in (0, 1)])


def fit_and_apply(method, shift, impostors_only=True):
    """Fitted on one draw, applied to a fresh one (fit on one split, apply on another)."""
    feats, i1, i2, labels, scores, _ = planted(0, shift, impostors_only)
    state = posthoc.fit(method, 2, feats, i1, i2, labels, scores, seed=0, fmr=FMR)
    feats, i1, i2, labels, scores, cluster = planted(1, shift, impostors_only)
    return state, scores, posthoc.apply(state, feats, i1, i2, scores), labels, i1, cluster


def test_fsn_removes_a_planted_impostor_shift_and_leaves_an_unshifted_set():
    _, raw, out, labels, i1, cluster = fit_and_apply('fsn', 0.15)
    before, after = cluster_fmr(raw, labels, i1, cluster), cluster_fmr(out, labels, i1, cluster)
    assert before[1] - before[0] > 0.015            # 0.0004 vs 0.0196: cluster 1's impostors match
    assert abs(after[1] - after[0]) < 0.3 * (before[1] - before[0])
    shifted = out[cluster[i1] == 1] - raw[cluster[i1] == 1]
    assert np.allclose(shifted, shifted[0]) and -0.17 < shifted[0] - (out - raw)[cluster[i1] == 0][0] < -0.10
    _, raw, out, labels, i1, cluster = fit_and_apply('fsn', 0.0)
    assert np.abs(out - raw).max() < 0.01


def test_faircal_removes_a_planted_cluster_shift_and_keeps_the_order_of_an_unshifted_set():
    from scipy.stats import kendalltau
    _, raw, out, labels, i1, cluster = fit_and_apply('faircal', 0.15, impostors_only=False)
    before, after = cluster_fmr(raw, labels, i1, cluster), cluster_fmr(out, labels, i1, cluster)
    assert before[1] - before[0] > 0.015
    assert abs(after[1] - after[0]) < 0.3 * (before[1] - before[0])
    # Calibration equalises the probability a score means, not the FMR: an impostor-only shift narrows
    # the FMR gap without closing it (docs/metrics.md).
    _, raw, out, labels, i1, cluster = fit_and_apply('faircal', 0.15)
    before, after = cluster_fmr(raw, labels, i1, cluster), cluster_fmr(out, labels, i1, cluster)
    assert after[1] - after[0] < 0.85 * (before[1] - before[0])
    _, raw, out, labels, i1, cluster = fit_and_apply('faircal', 0.0)
    assert kendalltau(out, raw)[0] > 0.97
    assert np.abs(np.diff(cluster_fmr(out, labels, i1, cluster))) < 0.008


def test_faircal_is_the_pair_count_weighted_mean_of_the_two_cluster_maps():
    from recognition.evaluation.faircal import calibrate, unit_scores
    maps = np.array([[2.0, 1.0, -0.5], [0.5, 3.0, 1.0]])
    pairs, score_range = np.array([30, 10]), np.array([-1.0, 1.0])
    s = np.array([-0.3, 0.2, 0.6])
    u = unit_scores(s, *score_range)
    p = [1 / (1 + np.exp(-(m[0] * np.log(u) - m[1] * np.log(1 - u) + m[2]))) for m in maps]
    mixed = 0.75 * p[0] + 0.25 * p[1]
    got = calibrate(s, np.zeros(3, int), np.ones(3, int), maps, pairs, score_range)
    np.testing.assert_allclose(got, np.log(mixed / (1 - mixed)), rtol=1e-10)


@pytest.mark.parametrize('method', ['fsn', 'faircal'])
def test_saved_state_round_trips_bit_identically(tmp_path, method):
    state, raw, out, labels, i1, cluster = fit_and_apply(method, 0.15)
    feats, i1, i2, _, scores, _ = planted(1, 0.15)
    path = tmp_path / 'p.calibration.npz'
    posthoc.save_state(str(path), {**state, 'scores_of': {'models': ['m']}, 'fitted_on': 'fitted on x'})
    loaded = posthoc.load_state(str(path))
    assert loaded['scores_of'] == {'models': ['m']} and loaded['k'] == 2 and loaded['method'] == method
    assert np.array_equal(posthoc.apply(loaded, feats, i1, i2, scores), out)
    assert not [f for f in os.listdir(tmp_path) if f != 'p.calibration.npz']  # atomic: no temporaries left


def test_bad_state_files_are_one_line_errors(tmp_path):
    state = fit_and_apply('fsn', 0.0)[0]
    good = tmp_path / 'good.npz'
    posthoc.save_state(str(good), state)
    (tmp_path / 'junk.npz').write_bytes(b'not a zip file')
    (tmp_path / 'cut.npz').write_bytes(good.read_bytes()[:200])
    with np.load(good) as z:
        entries = {k: z[k] for k in z.files}
    np.savez(tmp_path / 'shape.npz', **{**entries, 'thresholds': np.zeros(3)})
    np.savez(tmp_path / 'nan.npz', **{**entries, 'global_threshold': np.array(np.nan)})
    np.savez(tmp_path / 'pickled.npz', **{**entries, 'thresholds': np.array([{}, {}], dtype=object)})
    np.savez(tmp_path / 'nometa.npz', centroids=entries['centroids'])
    for name, why in [('junk', 'cannot read it as NPZ'), ('cut', 'cannot read it as NPZ'),
                      ('shape', 'thresholds has shape (3,)'), ('nan', 'global_threshold'),
                      ('pickled', 'cannot read it as NPZ'), ('nometa', 'missing or wrong entry')]:
        with pytest.raises(UserError, match=re.escape(why)) as e:
            posthoc.load_state(str(tmp_path / f'{name}.npz'))
        assert str(e.value).startswith(str(tmp_path / f'{name}.npz')) and '\n' not in str(e.value)
    with pytest.raises(UserError, match='no such calibration state'):
        posthoc.load_state(str(tmp_path / 'absent.npz'))
    feats, i1, i2, _, scores, _ = planted(1, 0.0)
    with pytest.raises(UserError, match='fitted on 8-dimensional features, these models give 16'):
        posthoc.apply(state, [feats[0], feats[0]], i1, i2, scores, source='s.npz')


@pytest.fixture(scope='module')
def split(tmp_path_factory):
    """Two tiny models and a calibration split of 16 aligned crops (8 identities x 2) with ground truth."""
    root = tmp_path_factory.mktemp('posthoc')
    for name, size, seed in [('a_model', 8, 0), ('b_model', 6, 1)]:
        (root / 'models' / name).mkdir(parents=True)
        make_checkpoint(str(root / 'models' / name / 'model'), emb_size=size, seed=seed)
        (root / 'models' / name / 'model.json').write_text(json.dumps({'prefix': 'model', 'epoch': 3}))
    images = root / 'val' / 'images'
    images.mkdir(parents=True)
    rng = np.random.RandomState(0)
    tids = [f'{i}{j}' for i in range(1, 9) for j in 'ab']
    for t in tids:
        base = rng.randint(0, 256, (112, 112, 3)) if t.endswith('a') else base + rng.randint(-20, 20, (112, 112, 3))
        cv2.imwrite(str(images / f'{t}.png'), np.clip(base, 0, 255).astype(np.uint8))
    pairs = [(a, b) for n, a in enumerate(tids) for b in tids[n + 1:]]
    (root / 'val' / 'ground_truth.csv').write_text('TEMPLATE_ID1,TEMPLATE_ID2,LABEL\n' + ''.join(
        f'{a},{b},{int(a[:-1] == b[:-1])}\n' for a, b in pairs))
    (root / 'val' / 'predictions.csv').write_text('TEMPLATE_ID1,TEMPLATE_ID2,SCORE\n' + ''.join(
        f'{a},{b},\n' for a, b in pairs))
    return root


def predict_args(root, out, *extra, models='models'):
    return ['--images', str(root / 'val' / 'images'), '--already-aligned', '--template',
            str(root / 'val' / 'predictions.csv'), '--models', str(root / models), '--out', str(root / out), *extra]


def predict(root, out, *extra, models='models'):
    """test/predict.py's main in this process (the subprocess test below checks the one-line exit)."""
    load_cli(PREDICT).main(predict_args(root, out, *extra, models=models))


@pytest.mark.parametrize('method', ['fsn', 'faircal'])
def test_predict_fits_saves_reloads_deterministically(split, method):
    for n in (1, 2):
        predict(split, f'{method}{n}/predictions.csv', f'--{method}', '3', '--seed', '5')
    first, second = split / f'{method}1', split / f'{method}2'
    for name in ('predictions.csv', 'predictions.calibration.npz', 'predictions.raw.csv'):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    record = json.loads((first / 'predictions.json').read_text())
    assert record['posthoc']['method'] == method and record['posthoc']['k'] == 3 and record['posthoc']['seed'] == 5
    assert record['posthoc']['fitted_on'].endswith(os.path.join('val', 'ground_truth.csv'))
    assert record['post_processing'][-1].startswith(posthoc.METHODS[method])
    assert record['raw_scores'] == 'predictions.raw.csv'
    from recognition.evaluation.report import provenance_lines
    shown = provenance_lines({'provenance': record})[-1]
    assert f'{posthoc.METHODS[method]} ({method}, K=3, seed 5' in shown and 'state predictions.calibration.npz' in shown
    # The saved state, applied again to the same images, gives the same bytes.
    state = str(first / 'predictions.calibration.npz')
    predict(split, f'{method}3/predictions.csv', '--calibration-state', state)
    assert (split / f'{method}3' / 'predictions.csv').read_bytes() == (first / 'predictions.csv').read_bytes()
    assert not (split / f'{method}3' / 'predictions.calibration.npz').exists()
    assert json.loads((split / f'{method}3' / 'predictions.json').read_text())['posthoc']['state'] == state
    raw = np.loadtxt(first / 'predictions.raw.csv', delimiter=',', skiprows=1, usecols=2)
    assert not np.allclose(np.loadtxt(first / 'predictions.csv', delimiter=',', skiprows=1, usecols=2), raw)


def test_predict_bad_posthoc_input(split):
    with pytest.raises(UserError, match=re.escape('--fsn 17: more clusters than the 16 calibration images of')):
        predict(split, 'bad/p.csv', '--fsn', '17')
    with pytest.raises(UserError, match='nope.*ground_truth.csv'):
        predict(split, 'bad/p.csv', '--faircal', '2', '--calibration', str(split / 'nope'))
    predict(split, 'fitted/p.csv', '--fsn', '2')
    state = str(split / 'fitted' / 'p.calibration.npz')
    with pytest.raises(UserError, match=re.escape(state) + '.*fitted on scores of.*b_model'):
        predict(split, 'bad/p.csv', '--calibration-state', state, models=os.path.join('models', 'a_model'))
    with pytest.raises(UserError, match='holds fsn with K=2, not the --faircal 2'):
        predict(split, 'bad/p.csv', '--calibration-state', state, '--faircal', '2')
    (split / 'junk.npz').write_bytes(b'junk')
    proc = subprocess.run([sys.executable, PREDICT, *predict_args(split, 'bad/p.csv', '--calibration-state',
                                                                   str(split / 'junk.npz'))],
                          capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith('error: ') and str(split / 'junk.npz') in lines[-1], proc.stderr
    assert 'not a usable calibration state' in lines[-1] and 'Traceback' not in proc.stderr
    assert not (split / 'bad').exists() or not os.listdir(split / 'bad')
