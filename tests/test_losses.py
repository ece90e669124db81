"""Margin heads against a float64 numpy reference of insightface's formulas (logits and gradients)."""
import math
import re

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

from recognition.config import HEAD_ARGS
from recognition.config import loss as loss_presets
from recognition.losses import (HEAD_TYPES, ArcCircleHead, AttributeHead, CenterLoss, FixArcCircleHead,
                                FusionHead, MarginHead, SoftmaxCircleHead, SvxSoftmaxHead, TripletHead,
                                build_head, head_preset, triplet_batches)
from recognition.utils import UserError

N, EMB, C = 4, 8, 6
LIMIT = 1.0 - 1e-6


def reference_logits(emb, weight, bias, label, loss_name, **over):
    """insightface's target-logit arithmetic, written independently in numpy (float64)."""
    cfg = dict(head_preset(loss_name)[1], **over)
    rows = np.arange(len(label))
    kind = loss_presets[loss_name].loss_name
    if kind in SEED_REFERENCES:
        x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        w = weight / np.linalg.norm(weight, axis=1, keepdims=True)
        cos = x @ w.T
        target = np.zeros(cos.shape, bool)
        target[rows, label] = True
        return SEED_REFERENCES[kind](cos, np.arccos(np.clip(cos, -LIMIT, LIMIT)), target, rows, label, cfg)
    if loss_name == 'arc_circle':
        x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        w = weight / np.linalg.norm(weight, axis=1, keepdims=True)
        theta = np.arccos(np.clip(x @ w.T, -LIMIT, LIMIT))
        m, target = cfg['margin'], np.zeros(theta.shape, bool)
        target[rows, label] = True
        out = np.where(target,
                       np.cos(np.clip(theta + m, 0, np.pi)) * np.maximum(theta + np.pi - m, 0),
                       np.cos(np.clip(theta + np.pi - m, 0, np.pi)) * np.maximum(m - theta, 0))
        return out * cfg['gamma']
    s = cfg.get('s')
    if not s:
        return emb @ weight.T + bias
    m1, m2, m3 = cfg.get('m1', 1.0), cfg.get('m2', 0.0), cfg.get('m3', 0.0)
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    logits = s * (x @ w.T)
    cos_t = np.clip(logits[rows, label] / s, -LIMIT, LIMIT)
    if m1 == 1.0 and m2 == 0.0:
        target = s * (cos_t - m3)
    else:
        target = s * (np.cos(m1 * np.arccos(cos_t) + m2) - m3)
        if m1 == 1.0 and m3 == 0.0:      # ArcFace: train_softmax's guard / easy margin
            if cfg.get('easy_margin'):
                target = np.where(cos_t > 0, target, s * cos_t)
            else:
                target = np.where(cos_t > np.cos(np.pi - m2), target, s * (cos_t - m2 * np.sin(m2)))
    logits[rows, label] = target
    return logits


def svx_reference(cos, theta, target, rows, label, cfg):
    """The seed's svx_softmax (class_level_loss.py), read off its graph."""
    m1, m2, m3, t = cfg['m1'], cfg['m2'], cfg['m3'], cfg['mask']
    nm1, nm2, nm3 = cfg['nm1'], cfg['nm2'], cfg['nm3']
    y = np.cos(m1 * theta[rows, label] + m2) - m3 if (m1, m2) != (1.0, 0.0) else cos[rows, label] - m3
    other = np.cos(theta / nm1 - nm2) + nm3 if (nm1, nm2, nm3) != (1.0, 0.0, 0.0) else cos
    hard = (cos >= y[:, None]) & ~target
    other = np.where(hard, t * other + t - 1, other)
    return np.where(target, y[:, None], other) * cfg['s']


def softmax_circle_reference(cos, theta, target, rows, label, cfg):
    m, c = cfg['margin'], (cos + 1) / 2
    return np.where(target, np.maximum(1 + m - c, 0) * (c - 1 + m), np.maximum(c + m, 0) * (c - m)) * cfg['gamma']


def fix_arc_circle_reference(cos, theta, target, rows, label, cfg):
    m, d = cfg['margin'], 0.1 * (2 * np.pi - 2 * cfg['margin'])
    return np.where(target, np.cos(np.clip(theta + m, 0, np.pi)) * np.maximum(theta + np.pi - m, 0) + d,
                    np.cos(np.clip(theta - m, 0, np.pi)) * np.maximum(2 * np.pi - m - theta, 0) - d) * cfg['gamma']


SEED_REFERENCES = {'svx_softmax': svx_reference, 'softmax_circle': softmax_circle_reference,
                   'fix_arc_circle': fix_arc_circle_reference}
# Heads whose output is a loss on triplet batches (tests/test_triplet.py checks them against numpy).
CLASS_LEVEL = sorted(n for n in loss_presets if not triplet_batches(n))


def numeric_grad(f, arr, eps=1e-6):
    grad = np.zeros_like(arr)
    for idx in np.ndindex(arr.shape):
        keep = arr[idx]
        arr[idx] = keep + eps
        hi = f()
        arr[idx] = keep - eps
        lo = f()
        arr[idx] = keep
        grad[idx] = (hi - lo) / (2 * eps)
    return grad


def make_case(seed, guard=False):
    rng = np.random.RandomState(seed)
    weight = rng.normal(size=(C, EMB))
    label = rng.randint(0, C, size=N)
    emb = rng.normal(size=(N, EMB))
    if guard:  # targets pointing away from their class (theta near pi): theta + m > pi
        emb[:2] = -weight[label[:2]] + 0.05 * rng.normal(size=(2, EMB))
        emb[2] = 0.6 * weight[label[2]] + rng.normal(size=EMB) * 0.3  # a normal-region sample
    return emb, weight, rng.normal(size=C) * 0.1, label


def check_head(loss_name, emb, weight, bias, label, **over):
    head = build_head(loss_name, C, EMB, **over)
    head.initialize()
    head.fc7_weight.set_data(mx.nd.array(weight))
    if getattr(head, 'fc7_bias', None) is not None:
        head.fc7_bias.set_data(mx.nd.array(bias))
    proj = np.random.RandomState(7).normal(size=(N, C))
    x = mx.nd.array(emb)
    x.attach_grad()
    with autograd.record():
        logits = head(x, mx.nd.array(label))
        (logits * mx.nd.array(proj)).sum().backward()
    ref = reference_logits(emb, weight, bias, label, loss_name, **over)
    np.testing.assert_allclose(logits.asnumpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())

    def objective():
        return float((reference_logits(emb, weight, bias, label, loss_name, **over) * proj).sum())
    g_emb, g_w = numeric_grad(objective, emb), numeric_grad(objective, weight)
    np.testing.assert_allclose(x.grad.asnumpy(), g_emb, rtol=2e-3, atol=2e-3 * np.abs(g_emb).max())
    np.testing.assert_allclose(head.fc7_weight.grad().asnumpy(), g_w, rtol=2e-3, atol=2e-3 * np.abs(g_w).max())
    return ref


@pytest.mark.parametrize('loss_name', CLASS_LEVEL)
def test_presets_match_reference(loss_name):
    emb, weight, bias, label = make_case(0)
    ref = check_head(loss_name, emb, weight, bias, label)
    plain = reference_logits(emb, weight, bias, label, 'nsoftmax')
    rows = np.arange(N)
    if loss_name in ('arcface', 'cosface', 'combined'):  # the margin lowers every target logit
        assert np.all(ref[rows, label] < plain[rows, label] - 1.0)


@pytest.mark.parametrize('easy_margin', [False, True])
def test_arcface_guard_and_easy_margin(easy_margin):
    emb, weight, bias, label = make_case(1, guard=True)
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    cos_t = (x @ w.T)[np.arange(N), label]
    assert np.all(cos_t[:2] < math.cos(math.pi - 0.5)) and cos_t[2] > 0.2  # both regions covered
    ref = check_head('arcface', emb, weight, bias, label, easy_margin=easy_margin)
    expected = 64 * cos_t[:2] if easy_margin else 64 * (cos_t[:2] - 0.5 * math.sin(0.5))
    np.testing.assert_allclose(ref[np.arange(2), label[:2]], expected, rtol=1e-12)


@pytest.mark.parametrize('over', [dict(mask=1.5), dict(mask=1.2, nm1=1.2, nm2=0.1, nm3=0.05),
                                  dict(m2=0.0, m3=0.35, mask=1.3), dict(m1=1.2, m2=0.2, m3=0.1, mask=2.0)])
def test_marginface_mask_and_non_target_margins(over):
    """svx_softmax with the mask and non-target margins on: logits and gradients against the seed's formula;
    the case has hard negatives (cos_j >= margined target), where the mask changes the logit."""
    emb, weight, bias, label = make_case(4)
    ref = check_head('marginface', emb, weight, bias, label, **over)
    plain = check_head('marginface', emb, weight, bias, label, **dict(over, mask=1.0))
    assert (ref != plain).any() and (ref[np.arange(N), label] == plain[np.arange(N), label]).all()


@pytest.mark.parametrize('loss_name,over,flag', [
    ('marginface', dict(loss_mask=0.5), '--loss-mask 0.5'), ('marginface', dict(loss_m2=-0.1), '--loss-m2 -0.1'),
    ('marginface', dict(loss_nm1=0.8), '--loss-nm1 0.8'), ('marginface', dict(loss_nm3=-0.2), '--loss-nm3 -0.2'),
    ('marginface', dict(loss_m1=0.9), '--loss-m1 0.9'), ('softmax_circle', dict(loss_margin=0.6), '--loss-margin 0.6'),
    ('fix_arc_circle', dict(loss_margin=-1.0), '--loss-margin -1'), ('triplet', dict(triplet_alpha=-0.1),
                                                                     '--triplet-alpha -0.1'),
    ('arc_circle_triplet', dict(loss_gamma=0.0), '--loss-gamma 0'),
    ('triplet_fusion_arc_circle', dict(triplet_weight=-1.0), '--triplet-weight -1'),
    ('atriplet', dict(triplet_mining='random'), "--triplet-mining 'random'"),
    ('arcface', dict(loss_mask=2.0), '--loss-mask does not apply to --loss arcface'),
    ('triplet', dict(loss_s=64.0), '--loss-s does not apply to --loss triplet')])
def test_bad_loss_parameters_name_the_flag(loss_name, over, flag):
    with pytest.raises(UserError, match='^' + re.escape(flag)):
        build_head(loss_name, C, EMB, **over)


def test_cosine_and_softmax_bias_names():
    head = build_head('softmax', C, EMB, fc7_lr_mult=2.0)
    assert sorted(head.collect_params().keys()) == ['fc7_bias', 'fc7_weight']
    assert head.fc7_weight.lr_mult == 2.0 and head.fc7_bias.wd_mult == 0.0
    arc = build_head('arcface', C, EMB, loss_s=32.0)
    assert arc.s == 32.0 and list(arc.collect_params().keys()) == ['fc7_weight']
    arc.initialize()
    emb = mx.nd.random.normal(shape=(N, EMB))
    cos = arc.cosine(emb).asnumpy()
    ref = reference_logits(emb.asnumpy().astype(np.float64), arc.fc7_weight.data().asnumpy().astype(np.float64),
                           None, np.zeros(N, int), 'nsoftmax') / 64.0
    np.testing.assert_allclose(cos, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError):
        build_head('sphereface', C, EMB)
    with pytest.raises(ValueError):
        MarginHead(C, EMB, m3=0.35, easy_margin=True)


def test_margin_head_hybridized_trains():
    """Hybridized arcface head + SoftmaxCrossEntropyLoss: the loss falls on separable data."""
    rng = np.random.RandomState(3)
    centers = rng.normal(size=(C, EMB)) * 3
    label = np.arange(24) % C
    emb = mx.nd.array(centers[label] + rng.normal(size=(24, EMB)) * 0.3)
    head = MarginHead(C, EMB, s=16.0, m2=0.3)
    head.initialize(mx.init.Normal(0.01))
    head.hybridize()
    trainer = gluon.Trainer(head.collect_params(), 'sgd', {'learning_rate': 0.5})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    losses = []
    for _ in range(30):
        with autograd.record():
            loss = loss_fn(head(emb, mx.nd.array(label)), mx.nd.array(label))
        loss.backward()
        trainer.step(24)
        losses.append(loss.mean().asscalar())
    assert losses[-1] < 0.5 * losses[0]


# insightface's numbers (sample_config.py) and the FairFace seed's arc_circle_loss, written out here so that a
# change to a preset in recognition/config.py is a visible decision, not a side effect.
EXPECTED_HEADS = {
    'softmax': (MarginHead, dict(s=0.0, m1=1.0, m2=0.0, m3=0.0, easy_margin=False), ['fc7_bias', 'fc7_weight']),
    'nsoftmax': (MarginHead, dict(s=64.0, m1=1.0, m2=0.0, m3=0.0, easy_margin=False), ['fc7_weight']),
    'arcface': (MarginHead, dict(s=64.0, m1=1.0, m2=0.5, m3=0.0, easy_margin=False), ['fc7_weight']),
    'cosface': (MarginHead, dict(s=64.0, m1=1.0, m2=0.0, m3=0.35, easy_margin=False), ['fc7_weight']),
    'combined': (MarginHead, dict(s=64.0, m1=1.0, m2=0.3, m3=0.2, easy_margin=False), ['fc7_weight']),
    'arc_circle': (ArcCircleHead, dict(gamma=64.0, margin=0.65 * math.pi), ['fc7_weight']),
    'marginface': (SvxSoftmaxHead, dict(s=64.0, m1=1.0, m2=0.5, m3=0.0, nm1=1.0, nm2=0.0, nm3=0.0, mask=1.0),
                   ['fc7_weight']),
    'softmax_circle': (SoftmaxCircleHead, dict(gamma=64.0, margin=0.25), ['fc7_weight']),
    'fix_arc_circle': (FixArcCircleHead, dict(gamma=64.0, margin=0.65 * math.pi), ['fc7_weight']),
    'triplet': (TripletHead, dict(kind='triplet', alpha=0.3, mining='semihard'), []),
    'atriplet': (TripletHead, dict(kind='atriplet', alpha=0.35, mining='semihard'), []),
    'arc_circle_triplet': (TripletHead, dict(kind='arc_circle_triplet', gamma=64.0, margin=0.65 * math.pi,
                                             mining='semihard'), []),
    'fix_arc_circle_triplet': (TripletHead, dict(kind='fix_arc_circle_triplet', gamma=64.0, margin=0.65 * math.pi,
                                                 mining='semihard'), []),
    'triplet_fusion_arc_circle': (FusionHead, dict(gamma=64.0, margin=0.65 * math.pi, alpha=0.3, mining='semihard',
                                                   weight=1.0), ['fc7_weight']),
    'arc_circle_triplet_fusion_arc_circle': (FusionHead, dict(gamma=64.0, margin=0.65 * math.pi, mining='semihard',
                                                              weight=1.0), ['fc7_weight']),
}


@pytest.mark.parametrize('loss_name', sorted(loss_presets))
def test_every_loss_preset_builds_its_head(loss_name):
    """Each --loss preset of recognition/config.py resolves in the head builder with the preset's own values."""
    settings = loss_presets[loss_name]
    assert settings.loss_name in HEAD_TYPES and set(settings) - {'loss_name'} <= set(HEAD_ARGS)
    head = build_head(loss_name, C, EMB)
    cls, values, params = EXPECTED_HEADS[loss_name]
    assert type(head) is cls and sorted(head.collect_params().keys()) == params
    assert {k: getattr(head, k) for k in values} == values
    for key, arg in HEAD_ARGS.items():      # what the preset says is what the head got
        if key in settings:
            assert getattr(head, arg) == settings[key]


def test_every_loss_has_a_preset():
    assert sorted(loss_presets) == sorted(EXPECTED_HEADS)


def test_arc_circle_defaults_and_config_aliases():
    head = ArcCircleHead(C, EMB)
    assert head.gamma == 64.0 and abs(head.margin - 0.65 * math.pi) < 1e-12
    head = build_head('arc_circle', C, EMB, loss_gamma=32.0, loss_margin=2.0, fc7_wd_mult=10.0)
    assert (head.gamma, head.margin, head.fc7_weight.wd_mult) == (32.0, 2.0, 10.0)


def test_center_loss_updates_centers_on_every_context():
    ctxs = [mx.cpu(0), mx.cpu(1)]
    loss = CenterLoss(3, 2, alpha=0.5)
    loss.initialize(ctx=ctxs)
    emb = mx.nd.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]], ctx=ctxs[0])
    label = mx.nd.array([0, 0, 2], ctx=ctxs[0])
    emb.attach_grad()
    with autograd.record():
        value = loss(emb, label)
        value.sum().backward()
    np.testing.assert_allclose(value.asnumpy(), [0.5, 4.5, 2.0])
    np.testing.assert_allclose(emb.grad.asnumpy(), emb.asnumpy())       # d/dx 0.5||x - c||^2, c = 0
    expected = np.array([[0.5 * 4.0 / 3.0, 0.0], [0.0, 0.0], [0.0, 0.5 * 2.0 / 2.0]])
    for copy in loss.centers.list_data():
        np.testing.assert_allclose(copy.asnumpy(), expected, rtol=1e-6)
    loss(emb, label)  # outside training mode: no update
    np.testing.assert_allclose(loss.centers.data(ctxs[1]).asnumpy(), expected, rtol=1e-6)


def test_attribute_head_shapes_and_names():
    head = AttributeHead(EMB, 2, hidden=(16,), prefix='gender_')
    head.initialize()
    head.hybridize()
    assert head(mx.nd.random.normal(shape=(N, EMB))).shape == (N, 2)
    assert all(k.startswith('gender_') for k in head.collect_params().keys())
