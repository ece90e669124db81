"""The training-time bias mitigations: group-balanced sampling, per-group margins, the FPR-consistency penalty.

The heads and the penalty against float64 numpy references (values and gradients); the sampler's group,
identity and image proportions over many batches, its determinism and exact resume; the bad inputs; the
methods a run records for model.json and the chain table; determinism through the CLI.
"""
import json
import math
import os
import subprocess
import sys

import cv2
import mxnet as mx
import numpy as np
import pytest
from easydict import EasyDict
from mxnet import autograd

from recognition import checkpoint
from recognition.config import generate_config
from recognition.data.dataset import FaceRecordDataset
from recognition.data.record import IdentityRecordWriter
from recognition.data.sampler import balanced_sampler, parse_sampler
from recognition.evaluation.chain import chain_markdown
from recognition.evaluation.report import provenance_lines
from recognition.groups import GROUPS, group_members, parse_group_values
from recognition.model_folder import install_model, model_methods, read_model_json
from recognition.losses import build_group_margin_head, fpr_penalty
from recognition.training import TrainingSession
from recognition.utils import UserError
from test_losses import numeric_grad

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODES = {'gender': {0: 'female', 1: 'male'}, 'skin_colour': {0: 'light', 1: 'dark'}}
# (gender, skin) -> identities: an imbalanced set, 12 light males down to 2 dark females.
SHARES = {(1, 0): 12, (0, 0): 6, (1, 1): 4, (0, 1): 2}
SIZE = 40


def write_rec(folder, shares=SHARES, attributes=True, seed=0):
    """A small identity-indexed rec of noise images, 2..5 images per identity, gender/skin labels."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    names = ['gender', 'skin_colour'] if attributes else []
    with IdentityRecordWriter(os.path.join(folder, 'train'), image_size=(SIZE, SIZE), attribute_names=names,
                              attribute_codes=CODES if attributes else {}) as w:
        identity = 0
        for (gender, skin), count in shares.items():
            for _ in range(count):
                base = rng.integers(0, 256, (1, 1, 3))
                rows = []
                for _ in range(2 + identity % 4):
                    img = np.clip(base + rng.normal(0, 20, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
                    rows.append((cv2.imencode('.png', img)[1].tobytes(), 1, [gender, skin] if attributes else None))
                w.add_identity(identity, rows)
                identity += 1
    return folder


@pytest.fixture(scope='module')
def rec_dir(tmp_path_factory):
    return write_rec(str(tmp_path_factory.mktemp('fair')))


@pytest.fixture(scope='module')
def dataset(rec_dir):
    return FaceRecordDataset(os.path.join(rec_dir, 'train.rec'))


def group_of_samples(dataset):
    members, _ = group_members(dataset, 'gender_skin', 'test')
    by_identity = {i: g for g, ids in members.items() for i in ids}
    return np.array([GROUPS.index(by_identity[int(i)]) for i in dataset.labels])


# --- the sampler ------------------------------------------------------------------------------------------
def test_balanced_batches_hold_every_group_equally(dataset):
    sampler = balanced_sampler(dataset, 'gender_skin', 16, 16 * 400, seed=5)
    order = sampler.order(0)
    groups = group_of_samples(dataset)[order].reshape(400, 16)
    for g in range(4):   # 4 of each group in every batch of 16
        assert ((groups == g).sum(axis=1) == 4).all()
    members, _ = group_members(dataset, 'gender_skin', 'test')
    labels = dataset.labels[order]
    for g, ids in members.items():   # identities within a group uniformly: 1600 draws over len(ids) identities
        counts = np.array([(labels == i).sum() for i in ids])
        expected = 1600 / len(ids)
        assert np.abs(counts - expected).max() < 5 * math.sqrt(expected), (g, counts)
    big = members['light_male'][3]   # images within an identity uniformly
    start, end = dataset.id2range[big]
    hits = np.bincount(order[labels == big] - start, minlength=end - start)
    assert hits.size == end - start and hits.min() > 0.6 * hits.mean()


def test_batches_not_divisible_by_the_group_count_rotate_the_extra_slots(dataset):
    order = balanced_sampler(dataset, 'gender_skin', 10, 10 * 8, seed=1).order(3)
    groups = group_of_samples(dataset)[order].reshape(8, 10)
    per_batch = np.stack([(groups == g).sum(axis=1) for g in range(4)])
    assert set(per_batch.ravel()) == {2, 3}
    assert (per_batch.reshape(4, 2, 4).sum(axis=2) == 10).all()   # every 4 batches: 10 of each group


def test_sampler_order_is_a_function_of_seed_epoch_and_rank(dataset):
    def make(seed=0, rank=0):
        return balanced_sampler(dataset, 'gender_skin', 8, 64, seed=seed, rank=rank)
    a = make()
    assert np.array_equal(a.order(2), make().order(2))
    assert not np.array_equal(a.order(2), a.order(3))
    assert not np.array_equal(a.order(2), make(seed=1).order(2))
    assert not np.array_equal(a.order(2), make(rank=1).order(2))
    a.set_epoch(2, 24)   # a resumed run: the same epoch from batch 3 on
    assert len(a) == 40 and list(a) == a.order(2)[24:].tolist() and a.epoch == 3


def test_identity_subset_balances_the_groups_it_spans(dataset):
    members, _ = group_members(dataset, 'gender_skin', 'test')
    subset = members['dark_female'] + members['dark_male']
    sampler = balanced_sampler(dataset, 'gender_skin', 8, 800, seed=0, identities=subset)
    assert sampler.names == ['dark_female', 'dark_male']
    labels = dataset.labels[sampler.order(0)]
    assert set(labels.tolist()) == set(subset)
    assert np.isin(labels.reshape(100, 8), members['dark_female']).sum(axis=1).tolist() == [4] * 100
    gender = balanced_sampler(dataset, 'gender', 8, 80, identities=subset)
    assert gender.names == ['female', 'male']


def test_sampler_bad_input(dataset, tmp_path):
    assert parse_sampler('') is None and parse_sampler('uniform') is None
    assert parse_sampler('balanced') == 'gender_skin' and parse_sampler('balanced:skin_colour') == 'skin'
    with pytest.raises(UserError, match=r"--sampler 'shuffled': choose uniform or balanced\[:ATTR\]"):
        parse_sampler('shuffled')
    with pytest.raises(UserError, match=r"unknown protected attribute 'age' "
                                        r"\(have \['gender', 'gender_skin', 'skin'\]"):
        parse_sampler('balanced:age')
    plain = FaceRecordDataset(os.path.join(write_rec(str(tmp_path / 'plain'), {(0, 0): 3}, attributes=False),
                                           'train.rec'))
    with pytest.raises(UserError, match=r"train.rec has no 'gender' label, which gender_skin groups need "
                                        r"\(its labels: none\)"):
        balanced_sampler(plain, 'gender_skin', 8, 16)
    light = FaceRecordDataset(os.path.join(write_rec(str(tmp_path / 'light'), {(0, 0): 3, (1, 0): 3}), 'train.rec'))
    with pytest.raises(UserError, match=r'no identity in group dark_female, dark_male \(identities per group: '
                                        r'light_female 3, light_male 3, dark_female 0, dark_male 0\)'):
        balanced_sampler(light, 'gender_skin', 8, 16)
    assert balanced_sampler(light, 'gender', 8, 16).names == ['female', 'male']


# --- group margins -----------------------------------------------------------------------------------------
LIMIT = 1.0 - 1e-6


def reference_group_margin(emb, weight, label, m2, s, m1=1.0, m3=0.0, easy_margin=False):
    """insightface's margin logits with a per-sample m2, float64 numpy."""
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    logits = s * (x @ w.T)
    rows = np.arange(len(label))
    cos_t = np.clip(logits[rows, label] / s, -LIMIT, LIMIT)
    target = s * (np.cos(m1 * np.arccos(cos_t) + m2) - m3)
    if m1 == 1.0 and m3 == 0.0:
        if easy_margin:
            target = np.where(cos_t > 0, target, s * cos_t)
        else:
            target = np.where(cos_t > np.cos(np.pi - m2), target, s * (cos_t - m2 * np.sin(m2)))
    logits[rows, label] = target
    return logits


@pytest.mark.parametrize('loss_name,over', [('arcface', {}), ('arcface', {'easy_margin': True}),
                                            ('combined', {}), ('nsoftmax', {'s': 8.0})])
def test_group_margin_head_matches_reference(loss_name, over):
    rng = np.random.RandomState(3)
    n, emb_size, classes = 5, 6, 4
    weight, label = rng.normal(size=(classes, emb_size)), np.array([0, 1, 2, 3, 1])
    emb = rng.normal(size=(n, emb_size))
    emb[0] = -weight[0] + 0.05 * rng.normal(size=emb_size)   # theta near pi: the ArcFace guard
    class_m2 = {0: 0.6, 1: 0.2, 3: 0.45}                      # class 2 keeps the preset's m2
    head = build_group_margin_head(loss_name, classes, emb_size, class_m2, **over)
    preset = head.m2
    m2 = np.array([class_m2.get(int(c), preset) for c in label])
    head.initialize()
    head.fc7_weight.set_data(mx.nd.array(weight))
    probe = rng.normal(size=(n, classes))
    cfg = dict(s=head.s, m1=head.m1, m3=head.m3, easy_margin=head.easy_margin)
    for hybrid in (False, True):
        if hybrid:
            head.hybridize()
        x = mx.nd.array(emb)
        x.attach_grad()
        with autograd.record():
            out = head(x, mx.nd.array(label))
            total = (out * mx.nd.array(probe)).sum()
        total.backward()
        want = reference_group_margin(emb, weight, label, m2, **cfg)
        np.testing.assert_allclose(out.asnumpy(), want, rtol=1e-4, atol=1e-4)
        e = emb.copy()
        grad = numeric_grad(lambda: (reference_group_margin(e, weight, label, m2, **cfg) * probe).sum(), e)
        np.testing.assert_allclose(x.grad.asnumpy(), grad, rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(head.fc7_weight.grad().asnumpy(),
                                   numeric_grad(lambda: (reference_group_margin(emb, weight, label, m2, **cfg)
                                                         * probe).sum(), weight), rtol=2e-3, atol=2e-3)
    symbol = head(mx.sym.var('data'), mx.sym.var('softmax_label'))   # the saved graph: the preset's m2
    assert isinstance(symbol, mx.sym.Symbol)


def test_group_margin_bad_input():
    assert parse_group_values('dark_female=0.6, dark male=0.55', 'x') == ('gender_skin',
                                                                        {'dark_female': 0.6, 'dark_male': 0.55})
    assert parse_group_values('female=0.6', 'x') == ('gender', {'female': 0.6})
    with pytest.raises(UserError, match=r"--group-margin: unknown group 'dark_elf' \(groups: gender: female, male; "
                                        r"skin: light, dark; gender_skin: light_female, "):
        parse_group_values('dark_elf=0.6', '--group-margin')
    with pytest.raises(UserError, match=r"\['dark', 'female'\] mix protected attributes"):
        parse_group_values('female=0.6,dark=0.5', '--group-margin')
    with pytest.raises(UserError, match=r"dark_female='wide' is not a number"):
        parse_group_values('dark_female=wide', '--group-margin')
    with pytest.raises(UserError, match='expected GROUP=VALUE'):
        parse_group_values('dark_female', '--group-margin')
    with pytest.raises(UserError, match='margin-softmax head .* not --loss arc_circle'):
        build_group_margin_head('arc_circle', 4, 6, {0: 0.5})
    with pytest.raises(UserError, match=r'm2 1.7 outside \[0, pi/2\)'):
        build_group_margin_head('arcface', 4, 6, {0: 1.7})


# --- the FPR penalty -------------------------------------------------------------------------------------
def reference_fpr_penalty(cos, label, target_fpr=0.0):
    """Xu et al.'s instance FPR at the batch threshold, soft-counted with (1 + cos)/2, float64 numpy."""
    n, c = cos.shape
    negative = np.ones_like(cos, bool)
    negative[np.arange(n), label] = False
    u = target_fpr or 1.0 / (c - 1)
    k = min(n * (c - 1), max(1, math.ceil(u * n * (c - 1))))
    t = np.sort(cos[negative])[::-1][k - 1]
    fpr = ((cos >= t) & negative).astype(float) * (1 + cos) / 2
    fpr = fpr.sum(axis=1) / (c - 1)
    return np.abs(fpr - fpr.mean()).mean() / fpr.mean()


@pytest.mark.parametrize('target_fpr', [0.0, 0.1])
def test_fpr_penalty_matches_reference(target_fpr):
    rng = np.random.RandomState(7)
    n, c = 6, 9
    cos = np.tanh(rng.normal(size=(n, c)))
    cos[:2, 1:] += 0.3                    # two instances with many false positives
    label = rng.randint(0, c, size=n)
    x = mx.nd.array(cos, dtype='float64')
    x.attach_grad()
    with autograd.record():
        penalty = fpr_penalty(x, mx.nd.array(label, dtype='float64'), target_fpr)
    penalty.backward()
    want = reference_fpr_penalty(cos, label, target_fpr)
    assert want > 0.2
    np.testing.assert_allclose(penalty.asnumpy(), [want], rtol=1e-9)
    np.testing.assert_allclose(x.grad.asnumpy(), numeric_grad(lambda: reference_fpr_penalty(cos, label, target_fpr),
                                                              cos), rtol=1e-5, atol=1e-7)
    same = np.tile(cos[:1], (n, 1))       # identical instances: identical FPRs, no penalty
    assert float(fpr_penalty(mx.nd.array(same), mx.nd.array(np.zeros(n)), target_fpr).asscalar()) == 0.0


# --- in the trainer ----------------------------------------------------------------------------------------
def make_opts(data_dir, models_root, **kw):
    config, default = generate_config('demo', 'demo', 'arcface')
    opts = EasyDict({**config, **default})
    opts.update(network='demo', loss='arcface', dataset='demo', dataset_path=data_dir, val_targets=[],
                models_root=str(models_root), per_batch_size=8, lr=0.05,
                lr_steps='', warmup=0, verbose=1000, frequent=1000, max_steps=4, num_workers=0, ckpt=0, seed=2,
                emb_size=16, progress_bar=False, ctx='cpu:1', kvstore='device', sampler='balanced',
                group_margin='dark_female=0.6', fpr_penalty=0.5)
    opts.update(kw)
    return opts


def params_of(sess):
    return {n: p.list_data()[0].asnumpy().copy() for n, p in sess.params.items()}


def test_resumed_balanced_run_equals_the_straight_run(rec_dir, tmp_path):
    straight = TrainingSession(make_opts(rec_dir, tmp_path / 'a'))
    straight.run()
    half = TrainingSession(make_opts(rec_dir, tmp_path / 'b', max_steps=2))
    half.run()
    resumed = TrainingSession(make_opts(rec_dir, tmp_path / 'b', resume=True))
    assert resumed.step == 2
    resumed.run()
    a, b = params_of(straight), params_of(resumed)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    state = json.load(open(checkpoint.resume_file(os.path.join(str(tmp_path / 'b'), 'demo-arcface-demo', 'model'))))
    assert state['methods'] == ['sampler balanced:gender_skin', 'group-margin dark_female=0.6', 'fpr-penalty 0.5']
    with pytest.raises(UserError, match=r"saved with the methods \[.*\], this run has "
                                        r"\['sampler balanced:gender_skin'\]"):
        TrainingSession(make_opts(rec_dir, tmp_path / 'b', resume=True, group_margin='', fpr_penalty=0))


def test_trainer_bad_input(rec_dir, tmp_path):
    light = write_rec(str(tmp_path / 'light'), {(0, 0): 3, (1, 0): 3})
    with pytest.raises(UserError, match=r'--group-margin dark_female=0.6: no identity in group dark_female '
                                        r'\(identities per group: light_female 3, light_male 3, dark_female 0'):
        TrainingSession(make_opts(light, tmp_path / 'm', sampler=''))
    with pytest.raises(UserError, match='margin-softmax head .* not --loss arc_circle'):
        TrainingSession(make_opts(rec_dir, tmp_path / 's', loss='arc_circle'))


def test_installed_model_and_chain_table_name_the_methods(tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'model-symbol.json').write_bytes(b'{"nodes": []}\n')
    (run / 'model-0003.params').write_bytes(b'params')
    checkpoint.write_latest(str(run), str(run / 'model'), 3)
    methods = ['selected-attributes dark_female', 'sampler balanced:gender_skin']
    (run / 'model-resume.json').write_text(json.dumps({'step': 9, 'methods': methods}))
    assert model_methods(f'{run}/model,3') == methods
    dest, _, _ = install_model(str(run), 'fair', str(tmp_path / 'final'))
    assert read_model_json(dest)['methods'] == methods and model_methods(dest) == methods
    summary = {'auc': 0.9, 'tar_at_far_1e-3': 0.5, 'groups': {}, 'group_auc_gap': 0.1, 'fmr_ratio_at_eer': 1.0,
               'fnmr_ratio_at_eer': 1.0, 'rank_bias_positive': 0.0, 'rank_bias_negative': 0.0}
    table = chain_markdown([{'step': 'step3', 'model': dest, 'summary': summary, 'methods': methods},
                            {'step': 'step2', 'model': dest, 'summary': summary}])
    assert '| methods |' in table.splitlines()[0]
    assert '| selected-attributes dark_female; sampler balanced:gender_skin |' in table
    assert '| step2 | final/fair | - |' in table
    # the report of predictions made with the folder names them too (test/predict.py records model_methods)
    record = {'models': [{'name': 'fair', 'checkpoint': f'{dest}/model,3', 'layer': 'fc1_output',
                          'methods': model_methods(dest)},
                         {'name': 'plain', 'checkpoint': 'plain/model,1', 'layer': 'fc1_output', 'methods': []}],
              'fusion': 'mean', 'post_processing': []}
    lines = provenance_lines({'provenance': record})
    assert lines[0].endswith('; trained with selected-attributes dark_female, sampler balanced:gender_skin')
    assert lines[1] == 'model plain: plain/model,1 (fc1_output)'


# --- through the CLI ---------------------------------------------------------------------------------------
def test_cli_balanced_runs_are_bit_identical(rec_dir, tmp_path):
    def run(root):
        cmd = [sys.executable, os.path.join(ROOT, 'train', 'train.py'), '--network', 'demo', '--loss', 'arcface',
               '--dataset', 'demo', '--data-dir', rec_dir, '--val-targets', '', '--models-root', str(root),
               '--per-batch-size', '8', '--max-steps', '2', '--verbose', '2', '--ckpt', '2', '--emb-size', '16',
               '--warmup', '0', '--lr-steps', '', '--ctx', 'cpu:1', '--sampler', 'balanced',
               '--group-margin', 'dark_female=0.6,dark_male=0.55', '--fpr-penalty', '0.5']
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT))
        assert proc.returncode == 0, proc.stderr[-2000:]
        return mx.nd.load(os.path.join(str(root), 'demo-arcface-demo', 'model-0001.params'))
    a, b = run(tmp_path / 'a'), run(tmp_path / 'b')
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k].asnumpy(), b[k].asnumpy()) for k in a)
    assert model_methods(str(tmp_path / 'a' / 'demo-arcface-demo' / 'model') + ',1') == [
        'sampler balanced:gender_skin', 'group-margin dark_female=0.6,dark_male=0.55', 'fpr-penalty 0.5']
