"""IJB-B/C 1:1 protocol: meta parsing and its errors, media-then-template pooling, insightface's TAR@FAR reading,
unenrolled templates, the linked-template bootstrap, and test/ijb.py end to end on a generated IJB-C set."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_curve
from sklearn.preprocessing import normalize

from recognition.data.demo_sets import DemoSizes, build_demo
from recognition.evaluation import ijb
from recognition.utils import UserError
from test_inference import make_checkpoint
from test_predict import load_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(ROOT, 'test', 'ijb.py')
POINTS = ' '.join(['30 50 80 50 55 70 35 90 75 90'])


def write_meta(root, faces, pairs, points=None, target='ijbc'):
    """Meta files in insightface's layout; `faces` rows (name, template, media)."""
    meta = root / 'meta'
    meta.mkdir(parents=True, exist_ok=True)
    (meta / f'{target}_face_tid_mid.txt').write_text(''.join(f'{n} {t} {m}\n' for n, t, m in faces))
    (meta / f'{target}_template_pair_label.txt').write_text(''.join(f'{a} {b} {c}\n' for a, b, c in pairs))
    lines = points if points is not None else [f'{n} {POINTS} 0.9\n' for n, _, _ in faces]
    (meta / f'{target}_name_5pts_score.txt').write_text(''.join(lines))
    return root


FACES = [('1.jpg', 1, 10), ('2.jpg', 1, 10), ('3.jpg', 2, 11), ('4.jpg', 3, 12)]
PAIRS = [(1, 2, 1), (1, 3, 0), (2, 3, 0)]


def test_meta_files_are_parsed_and_joined_by_name(tmp_path):
    points = [f'{n} {POINTS} {s}\n' for (n, _, _), s in zip(FACES[::-1], (0.1, 0.2, 0.3, 0.4))]
    p = ijb.load_protocol(write_meta(tmp_path, FACES, PAIRS, points), 'IJBC')
    assert p.names == ['1.jpg', '2.jpg', '3.jpg', '4.jpg']
    np.testing.assert_array_equal(p.templates, [1, 1, 2, 3])
    np.testing.assert_array_equal(p.medias, [10, 10, 11, 12])
    np.testing.assert_allclose(p.faceness, [0.4, 0.3, 0.2, 0.1])   # by name, not by line
    np.testing.assert_allclose(p.landmarks[0], [[30, 50], [80, 50], [55, 70], [35, 90], [75, 90]])
    np.testing.assert_array_equal(p.labels, [1, 0, 0])
    assert p.image_dir == str(tmp_path / 'loose_crop')
    # IJB-B: the same layout with ijbb_ names.
    assert ijb.load_protocol(write_meta(tmp_path / 'b', FACES, PAIRS, target='ijbb'), 'IJBB').names == p.names


@pytest.mark.parametrize('kind, text, message', [
    ('face_tid_mid', '1.jpg 1 10\n2.jpg one 10\n', r'ijbc_face_tid_mid.txt:2: expected "image template_id media_id"'),
    ('face_tid_mid', '1.jpg 1 10\n1.jpg 2 11\n', r'ijbc_face_tid_mid.txt:2: image 1.jpg listed twice \(first on line 1\)'),
    ('template_pair_label', '1 2 1\n1 3 2\n', r'ijbc_template_pair_label.txt:2: label 2 is not 0 or 1'),
    ('template_pair_label', '1 2 1\n1 2\n', r'ijbc_template_pair_label.txt:2: expected "template_id template_id 0\|1"'),
    ('template_pair_label', '1 2 1\n', r'every pair has label 1'),
    ('name_5pts_score', f'1.jpg {POINTS}\n', r'ijbc_name_5pts_score.txt:1: expected "image x1 y1 ... x5 y5 score"'),
    ('name_5pts_score', f'1.jpg {POINTS} nan\n', r'ijbc_name_5pts_score.txt:1: landmarks and score must be finite'),
    ('name_5pts_score', f'1.jpg {POINTS} 0.9\n', r'no landmarks for image 2.jpg \(line 2 of .*ijbc_face_tid_mid.txt; '
                                                  r'3 images without points in all\)'),
])
def test_malformed_meta_files_name_the_file_and_line(tmp_path, kind, text, message):
    write_meta(tmp_path, FACES, PAIRS)
    (tmp_path / 'meta' / f'ijbc_{kind}.txt').write_text(text)
    with pytest.raises(UserError, match=message):
        ijb.load_protocol(tmp_path, 'IJBC')


def test_missing_meta_file_is_named(tmp_path):
    write_meta(tmp_path, FACES, PAIRS)
    os.remove(tmp_path / 'meta' / 'ijbc_template_pair_label.txt')
    with pytest.raises(UserError, match=r'meta/ijbc_template_pair_label.txt: meta file not found'):
        ijb.load_protocol(tmp_path, 'IJBC')
    with pytest.raises(UserError, match=r"--target 'IJBA'"):
        ijb.meta_files(tmp_path, 'IJBA')


def test_media_are_averaged_before_the_template_sum():
    rng = np.random.RandomState(0)
    f = rng.randn(6, 4)
    templates = np.array([7, 7, 7, 7, 3, 3])
    medias = np.array([1, 1, 1, 2, 5, 6])   # template 7: three frames of medium 1 and one image of medium 2
    pooled, uniq = ijb.pool_templates(f, templates, medias)
    np.testing.assert_array_equal(uniq, [3, 7])
    np.testing.assert_allclose(pooled[1], normalize([f[:3].mean(0) + f[3]])[0], rtol=1e-12)
    np.testing.assert_allclose(pooled[0], normalize([f[4] + f[5]])[0], rtol=1e-12)
    assert not np.allclose(pooled[1], normalize([f[:4].mean(0)])[0])   # not one mean over the faces
    # A media id shared by two templates is two media (pooling is within the template).
    shared, _ = ijb.pool_templates(f[:2], np.array([1, 2]), np.array([9, 9]))
    np.testing.assert_allclose(shared, normalize(f[:2]))


def test_face_inputs_norm_and_detector_score():
    raw = np.array([[3.0, 4.0], [0.0, 2.0]])
    score = np.array([0.5, 1.0])
    np.testing.assert_allclose(ijb.face_inputs(raw, score), [[1.5, 2.0], [0.0, 2.0]])   # N1 D1
    np.testing.assert_allclose(ijb.face_inputs(raw, score, norm_images=True), [[0.3, 0.4], [0.0, 1.0]])
    np.testing.assert_allclose(ijb.face_inputs(raw, score, detector_score=False), raw)


def insightface_reading(labels, scores, targets):
    """The eval_ijbc loop as written there: flip the ROC, min over (|fpr - target|, index) tuples."""
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    return {t: tpr[min(zip(abs(fpr - t), range(len(fpr))))[1]] for t in targets}


def test_tar_at_far_matches_a_hand_computed_roc():
    # By score: G .9, I .85, G .8, G .7, I .6, I .5, G .4, then 7 impostors. sklearn keeps the corners
    # (0,0) (0,.25) (.1,.25) (.1,.75) (.3,.75) (.3,1) (1,1).
    labels = np.array([1, 0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    scores = np.array([.9, .85, .8, .7, .6, .5, .4, .3, .2, .1, .05, 0, -.1, -.2])
    targets = (1e-6, 1e-2, 0.1, 0.2, 0.35)
    got = ijb.tar_at_far(labels, scores, targets)
    # FPR 0 is nearest below 0.05 (highest TPR there: .25); 0.1 has two points, the higher one wins;
    # 0.2 is equally far from .1 and .3: the reversed curve's first, (.3, 1); 0.35 is nearest .3.
    assert got == {1e-6: 0.25, 1e-2: 0.25, 0.1: 0.75, 0.2: 1.0, 0.35: 1.0}
    assert got == insightface_reading(labels, scores, targets)
    assert list(ijb.tar_at_far(labels, scores)) == list(ijb.FAR_LABELS)
    # Weights are counts: weight 2 on a pair is that pair twice.
    w = np.ones(len(labels))
    w[1] = 2
    dup = np.r_[scores, scores[1]], np.r_[labels, labels[1]]
    assert ijb.tar_at_far(labels, scores, targets, sample_weight=w) == ijb.tar_at_far(dup[1], dup[0], targets)


def test_unenrolled_templates_are_reported_and_rejected(tmp_path):
    p = ijb.load_protocol(write_meta(tmp_path, FACES, PAIRS + [(9, 1, 1), (3, 8, 0)]), 'IJBC')
    feats = np.eye(4)[[0, 0, 1, 2]] + 0.1
    r = ijb.evaluate(p, [feats, feats[:, ::-1]], ['a', 'b'], replicates=0)
    assert r['unenrolled_templates'] == [8, 9] and r['pairs_with_unenrolled'] == 2
    for scores in r['scores'].values():   # a, b and fused
        np.testing.assert_array_equal(scores[3:], ijb.MISSING_SCORE)
        assert scores[:3].min() > ijb.MISSING_SCORE
    assert set(r['scores']) == {'a', 'b', 'fused'} and r['intervals'] is None
    np.testing.assert_allclose(r['scores']['fused'][:3], (r['scores']['a'][:3] + r['scores']['b'][:3]) / 2)


def test_linked_templates_are_one_bootstrap_unit_and_intervals_repeat():
    t1 = np.array([1, 2, 1, 5, 6, 3])
    t2 = np.array([2, 3, 5, 6, 7, 9])
    labels = np.array([1, 1, 0, 1, 0, 0])
    s1, s2, n = ijb.linked_subjects(t1, t2, labels)
    assert n == 4   # {1,2,3} {5,6} {7} {9}
    assert s1[0] == s2[0] == s1[1] == s2[1] == s1[5] and s1[3] == s2[3] == s1[4] and len({s1[0], s1[3], s2[4], s2[5]}) == 4
    # 30 people with two templates each, every enrolment template against three others' second ones
    t1 = np.r_[np.arange(30), np.repeat(np.arange(30), 3)]
    t2 = np.r_[np.arange(30) + 100, (np.repeat(np.arange(30), 3) + np.tile([1, 2, 3], 30)) % 30 + 100]
    labels = np.r_[np.ones(30, int), np.zeros(90, int)]
    rng = np.random.RandomState(1)
    scores = {'m': rng.rand(120) + 0.5 * labels, 'n': rng.rand(120)}
    a = ijb.bootstrap_tar(labels, scores, t1, t2, replicates=40, seed=3, far_labels=(0.1,))
    assert a == ijb.bootstrap_tar(labels, scores, t1, t2, replicates=40, seed=3, far_labels=(0.1,))
    assert a != ijb.bootstrap_tar(labels, scores, t1, t2, replicates=40, seed=4, far_labels=(0.1,))
    point = ijb.tar_at_far(labels, scores['m'], (0.1,))[0.1]
    lo, hi = a['m'][0.1]['interval']
    assert 0 <= lo <= point <= hi <= 1 and hi > lo
    # a weighting without impostors has no TAR
    assert np.isnan(ijb.tar_at_far(labels, scores['m'], (0.1,), sample_weight=labels.astype(float))[0.1])


@pytest.fixture(scope='module')
def ijb_set(tmp_path_factory):
    root = tmp_path_factory.mktemp('ijb')
    build_demo(root, seed=0, only='ijbc', sizes=DemoSizes(ijbc_ids=8), log=lambda *a: None)
    for name, size, seed in [('a', 8, 0), ('b', 6, 1)]:
        (root / name).mkdir()
        make_checkpoint(str(root / name / 'model'), emb_size=size, seed=seed)
    return root


def cli_args(root, out, *extra):
    return ['--image-path', str(root / 'demo_ijbc'), '--model', f'{root / "a" / "model"},3',
            '--model', f'{root / "b" / "model"},3', '--result-dir', str(out), '--bootstrap', '30', '--ctx', 'cpu:1',
            *extra]


@pytest.fixture(scope='module')
def cli_runs(ijb_set):
    """The CLI in a fresh process into out0/, and its main() in this one into out1/ with the same arguments."""
    r = subprocess.run([sys.executable, CLI, *cli_args(ijb_set, ijb_set / 'out0')], capture_output=True, text=True,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-1500:]
    load_cli(CLI).main(cli_args(ijb_set, ijb_set / 'out1'))
    return r


def test_cli_end_to_end_is_deterministic(ijb_set, cli_runs):
    assert '| Methods | 1e-06 | 1e-05 | 1e-04 | 1e-03 | 1e-02 | 1e-01 |' in cli_runs.stdout
    assert 'IJBC: ' in cli_runs.stdout and '| fused-IJBC |' in cli_runs.stdout
    out = ijb_set / 'out0'
    files = sorted(os.listdir(out))
    # both models are named model,3: told apart by their position
    assert files == ['IJBC_0_model_3.npy', 'IJBC_1_model_3.npy', 'IJBC_fused.npy', 'IJBC_roc.png',
                     'IJBC_tar_far.json', 'IJBC_tar_far.md']
    for f in files:
        if not f.endswith('.png'):
            assert (out / f).read_bytes() == (ijb_set / 'out1' / f).read_bytes(), f
    report = json.loads((out / 'IJBC_tar_far.json').read_text())
    labels = np.loadtxt(ijb_set / 'demo_ijbc' / 'meta' / 'ijbc_template_pair_label.txt', dtype=int)[:, 2]
    fused = np.load(out / 'IJBC_fused.npy', allow_pickle=False)
    assert report['pairs'] == len(labels) == 32 and report['genuine'] == 8 and report['templates'] == 16
    assert report['unenrolled_templates'] == [] and set(report['table']) == {'0_model,3', '1_model,3', 'fused'}
    expect = ijb.tar_at_far(labels, fused.astype(np.float64))
    assert report['table']['fused'] == pytest.approx({f'{k:.0e}': v for k, v in expect.items()})
    assert set(report['intervals']['fused']['1e-01']) == {'interval'}
    assert report['options']['detector_score'] and not report['options']['norm_images']


def test_cli_options_change_the_scores_and_bad_input_is_one_line(ijb_set, cli_runs, tmp_path, capsys):
    cli = load_cli(CLI)
    cli.main(['--image-path', str(ijb_set / 'demo_ijbc'), '--model', f'{ijb_set / "a" / "model"},3',
              '--result-dir', str(tmp_path / 'd0'), '--bootstrap', '0', '--no-detector-score', '--norm-images',
              '--no-flip', '--ctx', 'cpu:1'])
    d0 = np.load(tmp_path / 'd0' / 'IJBC_model_3.npy')
    default = np.load(ijb_set / 'out0' / 'IJBC_0_model_3.npy')
    assert d0.shape == default.shape and not np.allclose(d0, default)
    assert not os.path.exists(tmp_path / 'd0' / 'IJBC_fused.npy')
    assert json.loads((tmp_path / 'd0' / 'IJBC_tar_far.json').read_text())['intervals'] is None
    bad = tmp_path / 'bad'
    os.makedirs(bad / 'meta')
    for name in os.listdir(ijb_set / 'demo_ijbc' / 'meta'):
        (bad / 'meta' / name).write_bytes((ijb_set / 'demo_ijbc' / 'meta' / name).read_bytes())
    with open(bad / 'meta' / 'ijbc_face_tid_mid.txt', 'a') as f:
        f.write('999.jpg 1\n')
    n_lines = len((bad / 'meta' / 'ijbc_face_tid_mid.txt').read_text().splitlines())
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.run_cli(lambda: cli.main(cli_args(ijb_set, tmp_path / 'x', '--image-path', str(bad))))
    assert exit_.value.code == 2 and capsys.readouterr().err.splitlines() == [
        f'error: {bad}/meta/ijbc_face_tid_mid.txt:{n_lines}: expected "image template_id media_id", got \'999.jpg 1\'']
    # a face whose loose crop is missing is named
    os.makedirs(bad / 'loose_crop')
    (bad / 'meta' / 'ijbc_face_tid_mid.txt').write_text('1.jpg 1 1\n')
    with pytest.raises(UserError, match=r'loose_crop/1.jpg: cannot read image'):
        cli.main(cli_args(ijb_set, tmp_path / 'x', '--image-path', str(bad)))


def test_generated_layouts_are_seeded(tmp_path):
    sizes = DemoSizes(ijbc_ids=4, rfw_ids=4, bfw_ids=4, bench_images=2)
    trees = []
    for name, seed in (('a', 0), ('b', 0), ('c', 1)):
        for only in ('ijbc', 'rfw', 'bfw'):
            build_demo(tmp_path / name, seed=seed, only=only, sizes=sizes, log=lambda *a: None)
        files = sorted(os.path.relpath(os.path.join(d, f), tmp_path / name)
                       for d, _, fs in os.walk(tmp_path / name) for f in fs)
        trees.append({f: (tmp_path / name / f).read_bytes() for f in files})
    assert trees[0] == trees[1] and trees[0] != trees[2]
    assert {'demo_ijbc/meta/ijbc_face_tid_mid.txt', 'demo_rfw/txts/Indian/Indian_pairs.txt',
            'demo_bfw/bfw-datatable.csv'} <= set(trees[0])
    # the emore and fairface sets are not built unless named
    assert not os.path.exists(tmp_path / 'a' / 'demo_emore')


def test_replicate_roc_is_sklearns_weighted_roc():
    rng = np.random.RandomState(4)
    n, ids = 3000, 400
    labels = (rng.rand(n) < 0.1).astype(int)
    scores = np.round(rng.rand(n) + 0.3 * labels, 3)   # many ties
    s1, s2 = rng.randint(0, ids, n), rng.randint(0, ids + 1, n)   # ids: the counts' last column, 1
    ranked = ijb.SortedPairs(labels, scores, s1, s2)
    targets = (1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.5)
    for r in range(3):
        counts = np.r_[rng.poisson(1.0, ids) if r else np.ones(ids), 1].astype(np.float64)
        w = counts[s1] * counts[s2]
        assert ranked.tar_at_far(counts, targets) == ijb.tar_at_far(labels, scores, targets, sample_weight=w)
    no_impostor = np.r_[np.zeros(ids), 1]
    assert np.isnan(ijb.SortedPairs(labels, scores, np.where(labels == 1, ids, 0), np.full(n, ids))
                    .tar_at_far(no_impostor, targets)[0.1])
