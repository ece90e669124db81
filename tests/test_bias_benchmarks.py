"""RFW and BFW protocols: the weighted 10-fold accuracy against verification.evaluate, the BFW thresholds against
fairness.fmr_threshold, the bootstrap, bad input, and test/bias_benchmarks.py end to end on generated sets."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from recognition.data.demo_sets import DemoSizes, build_demo
from recognition.evaluation import bias_benchmarks as bb
from recognition.evaluation.fairness import fmr_threshold
from recognition.evaluation.verification import evaluate
from recognition.utils import UserError
from test_inference import make_checkpoint
from test_predict import load_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(ROOT, 'test', 'bias_benchmarks.py')


def embeddings_for(dist):
    """Unit rows whose consecutive pairs have these squared distances (0..4)."""
    cos = 1 - dist / 2
    a = np.tile([1.0, 0.0], (len(dist), 1))
    b = np.stack([cos, np.sqrt(np.clip(1 - cos ** 2, 0, None))], axis=1)
    return np.stack([a, b], axis=1).reshape(-1, 2)


def test_fold_accuracy_with_unit_weights_is_insightface_protocol():
    rng = np.random.RandomState(0)
    for n in (200, 137):
        issame = rng.rand(n) < 0.5
        dist = np.clip(np.where(issame, 1.0, 1.6) + 0.4 * rng.randn(n), 0, 4)
        dist[:5] = np.round(dist[:5], 2)   # some distances exactly on a threshold
        fa = bb.FoldAccuracy(dist, issame)
        ref = evaluate(embeddings_for(dist), issame)['acc']
        assert fa(np.ones((1, n)))[0] == pytest.approx(ref, abs=1e-12)
        w = rng.poisson(1.0, (3, n)).astype(float)
        got = fa(w)
        assert got.shape == (3,) and np.all((got >= 0) & (got <= 1)) and not np.allclose(got, ref)


def test_rfw_measures_mean_std_and_skewed_error_ratio():
    rng = np.random.RandomState(1)
    subsets = {}
    for name, shift in zip(bb.RFW_SUBSETS, (0.2, 0.5, 0.8, 1.1)):
        issame = np.tile([True, False], 50)
        subsets[name] = (np.clip(np.where(issame, 1.0, 1.0 + shift) + 0.3 * rng.randn(100), 0, 4), issame)
    out = bb.rfw_measures(subsets)(np.ones((1, 400)))
    acc = np.array([evaluate(embeddings_for(d), s)['acc'] for d, s in subsets.values()])
    np.testing.assert_allclose([out[f'accuracy/{n}'][0] for n in bb.RFW_SUBSETS], acc, atol=1e-12)
    assert out['mean'][0] == pytest.approx(acc.mean()) and out['std'][0] == pytest.approx(acc.std())
    assert out['ser'][0] == pytest.approx((1 - acc).max() / (1 - acc).min())


def test_bfw_thresholds_follow_fmr_threshold_and_rates_are_shares():
    rng = np.random.RandomState(2)
    n = 400
    labels = rng.rand(n) < 0.4
    scores = np.round(np.where(labels, 0.6, 0.2) + 0.2 * rng.randn(n), 2)   # ties on purpose
    groups = np.array(['g1', 'g2', ''])[rng.randint(0, 3, n)]
    names = ['g1', 'g2']
    for far in (0.01, 0.1, 0.3):
        out = bb.bfw_measures(scores, labels, groups, names, (far,))(np.ones((1, n)))
        t = fmr_threshold(scores, labels, far)
        assert out[f'far_{far:.0e}/tar_global/all'][0] == pytest.approx(np.mean(scores[labels] >= t))
        for g in names:
            m = groups == g
            own = fmr_threshold(scores[m], labels[m], far)
            assert out[f'far_{far:.0e}/far_global/{g}'][0] == pytest.approx(np.mean(scores[m & ~labels] >= t))
            assert out[f'far_{far:.0e}/tar_global/{g}'][0] == pytest.approx(np.mean(scores[m & labels] >= t))
            assert out[f'far_{far:.0e}/tar_own/{g}'][0] == pytest.approx(np.mean(scores[m & labels] >= own))
            assert np.mean(scores[m & ~labels] >= own) <= far
        fars = [out[f'far_{far:.0e}/far_global/{g}'][0] for g in names]
        assert out[f'far_{far:.0e}/far_global_spread'][0] == pytest.approx(max(fars) - min(fars))
    # integer weights are copies of pairs
    w = rng.randint(0, 3, n).astype(float)
    rep = np.repeat(np.arange(n), w.astype(int))
    a = bb.bfw_measures(scores, labels, groups, names, (0.1,))(w[None])
    b = bb.bfw_measures(scores[rep], labels[rep], groups[rep], names, (0.1,))(np.ones((1, len(rep))))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], equal_nan=True)


def test_bootstrap_intervals_repeat_and_cover_the_estimate():
    rng = np.random.RandomState(3)
    ids = np.arange(60)
    id1 = rng.choice(ids, 600)
    same = rng.rand(600) < 0.5
    id2 = np.where(same, id1, rng.choice(ids, 600))
    labels = id1 == id2
    scores = np.where(labels, 0.5, 0.2) + 0.2 * rng.randn(600)
    groups = np.where(id1 % 2 == id2 % 2, np.where(id1 % 2, 'odd', 'even'), '')
    run = lambda seed: bb.evaluate_bfw(scores, labels, id1, id2, groups, (0.1,), replicates=60, seed=seed)
    a = run(5)
    assert a == run(5) and a['numbers'] != run(6)['numbers']
    entry = a['numbers']['far_1e-01/tar_global/all']
    assert entry['interval'][0] <= entry['value'] <= entry['interval'][1]
    assert a['subgroups'] == {g: {'genuine': int((labels & (groups == g)).sum()),
                                  'impostor': int((~labels & (groups == g)).sum())} for g in ('even', 'odd')}
    assert a['mixed_pairs'] == int((groups == '').sum())


def test_bad_pair_files_are_named(tmp_path):
    table = tmp_path / 'bfw.csv'
    table.write_text('p1,p2,label,id1,id2,att1\n')
    with pytest.raises(UserError, match=r'bfw.csv: missing columns att2'):
        bb.read_bfw(str(table))
    table.write_text('p1,p2,label,id1,id2,att1,att2\na.jpg,b.jpg,1,0,0,x,x\na.jpg,c.jpg,yes,0,1,x,x\n')
    with pytest.raises(UserError, match=r"bfw.csv:3: label 'yes' is not 0 or 1"):
        bb.read_bfw(str(table))
    table.write_text('p1,p2,label,id1,id2,att1,att2\na.jpg,,1,0,0,x,x\n')
    with pytest.raises(UserError, match=r'bfw.csv:2: empty p2'):
        bb.read_bfw(str(table))
    with pytest.raises(UserError, match=r'nope.csv: BFW datatable not found'):
        bb.read_bfw(str(tmp_path / 'nope.csv'))
    (tmp_path / 'txts' / 'Asian').mkdir(parents=True)
    (tmp_path / 'txts' / 'Asian' / 'Asian_pairs.txt').write_text('m.a\t1\t2\nm.a\t1\n')
    with pytest.raises(UserError, match=r'Asian_pairs.txt:2: expected "name n1 n2"'):
        bb.read_rfw(str(tmp_path), ['Asian'])
    with pytest.raises(UserError, match=r'African_pairs.txt: cannot read pairs file'):
        bb.read_rfw(str(tmp_path), ['African'])


@pytest.fixture(scope='module')
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp('bias')
    sizes = DemoSizes(rfw_ids=4, bfw_ids=4, bench_images=4)
    for only in ('rfw', 'bfw'):
        build_demo(root, seed=0, only=only, sizes=sizes, log=lambda *a: None)
    (root / 'm').mkdir()
    make_checkpoint(str(root / 'm' / 'model'), emb_size=8, seed=0)
    return root


def test_generated_layouts_read_back(sets):
    data = bb.read_rfw(str(sets / 'demo_rfw'))
    assert list(data) == list(bb.RFW_SUBSETS)
    for name, (p1, p2, issame, s1, s2) in data.items():
        assert len(issame) == 40 and issame.sum() == 20   # 10 folds of 2 positive then 2 negative lines
        assert np.array_equal(issame[:8], [True, True, False, False] * 2)
        assert all(os.path.isfile(p) for p in p1 + p2) and np.array_equal(issame, s1 == s2)
    p1, p2, labels, id1, id2, groups = bb.read_bfw(str(sets / 'demo_bfw' / 'bfw-datatable.csv'))
    assert sorted(set(groups)) == sorted(f'{e}_{g}' for e in ('asian', 'black', 'indian', 'white')
                                         for g in ('females', 'males'))
    assert np.array_equal(labels, id1 == id2) and all(os.path.isfile(sets / 'demo_bfw' / p) for p in p1)


def test_cli_rfw_and_bfw_end_to_end(sets, tmp_path):
    model = f'{sets / "m" / "model"},3'
    r = subprocess.run([sys.executable, CLI, '--protocol', 'rfw', '--root', str(sets / 'demo_rfw'), '--model', model,
                        '--out', str(tmp_path / 'rfw'), '--bootstrap', '50', '--ctx', 'cpu:1'],
                       capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-1500:]
    assert '| model | African | Asian | Caucasian | Indian | mean | std | SER |' in r.stdout
    report = json.loads((tmp_path / 'rfw.json').read_text())
    numbers = report['results']['model,3']['numbers']
    assert set(numbers) == {f'accuracy/{s}' for s in bb.RFW_SUBSETS} | {'mean', 'std', 'ser'}
    accs = [numbers[f'accuracy/{s}']['value'] for s in bb.RFW_SUBSETS]
    assert numbers['mean']['value'] == pytest.approx(np.mean(accs))
    assert report['results']['model,3']['replicates'] == 50
    cli = load_cli(CLI)
    cli.main(['--protocol', 'rfw', '--root', str(sets / 'demo_rfw'), '--model', model, '--out', str(tmp_path / 'again'),
              '--bootstrap', '50', '--ctx', 'cpu:1'])
    assert (tmp_path / 'again.json').read_bytes() == (tmp_path / 'rfw.json').read_bytes()
    assert (tmp_path / 'again.md').read_text() == (tmp_path / 'rfw.md').read_text()
    cli.main(['--protocol', 'bfw', '--root', str(sets / 'demo_bfw'), '--model', model, '--out', str(tmp_path / 'bfw'),
              '--bootstrap', '20', '--far', '0.1', '--ctx', 'cpu:1'])
    bfw = json.loads((tmp_path / 'bfw.json').read_text())['results']['model,3']
    assert bfw['far_targets'] == [0.1] and len(bfw['subgroups']) == 8 and bfw['mixed_pairs'] == 0
    assert 'far_1e-01/far_global_spread' in bfw['numbers']
    md = (tmp_path / 'bfw.md').read_text()
    assert '| subgroup | TAR, global threshold | FAR, global threshold | TAR, own threshold | gain |' in md
    with pytest.raises(SystemExit):
        cli.parse_args(['--protocol', 'bfw', '--root', 'x', '--model', 'm,1', '--out', 'o', '--far', '2'])
