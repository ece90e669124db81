"""The seed's pair-wise losses, fusions and label smoothing against float64 numpy references (value and
gradient), the triplet sampler's layout and determinism, and a triplet finetune through train/train.py."""
import math
import os
import subprocess
import sys

import cv2
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

from recognition.data.dataset import FaceRecordDataset
from recognition.data.record import IdentityRecordWriter
from recognition.data.triplets import TripletLoader, TripletSampler, check_triplet_batch
from recognition.losses import HeadLoss, SoftmaxLoss, TripletHead, build_head
from recognition.utils import UserError
from test_losses import numeric_grad

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = 1.0 - 1e-6
T, EMB, C = 4, 6, 5
N = 3 * T
MARGIN = 0.65 * math.pi


def mined(x, label, mining):
    """Index of each anchor's negative: hardest = most similar other-label sample; semihard = most similar one
    less similar than the positive, else the least similar one."""
    a, p = x[:T], x[T:2 * T]
    sim, cos_ap = a @ x.T, (a * p).sum(1)
    out = []
    for i in range(T):
        cands = np.flatnonzero(label != label[i])
        if mining == 'semihard':
            easier = cands[sim[i, cands] < cos_ap[i]]
            out.append(easier[np.argmax(sim[i, easier])] if easier.size else cands[np.argmin(sim[i, cands])])
        else:
            out.append(cands[np.argmax(sim[i, cands])])
    return np.array(out)


def circle(cos_ap, cos_an, gamma, fixed):
    m = MARGIN
    tp, tn = np.arccos(np.clip(cos_ap, -LIMIT, LIMIT)), np.arccos(np.clip(cos_an, -LIMIT, LIMIT))
    sp = gamma * np.maximum(tp + np.pi - m, 0) * np.cos(np.clip(tp + m, 0, np.pi))
    if fixed:
        sn = gamma * np.maximum(2 * np.pi - m - tn, 0) * np.cos(np.clip(tn - m, 0, np.pi))
    else:
        sn = gamma * np.maximum(m - tn, 0) * np.cos(np.clip(tn + np.pi - m, 0, np.pi))
    return sp, sn


def pair_reference(emb, label, kind, mining, alpha=0.3, gamma=64.0):
    """The seed's pair_wise_loss.py per triplet (per batch for arc_circle_triplet), one value per sample."""
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    a, p, n = x[:T], x[T:2 * T], x[mined(x, label, mining)]
    cos_ap, cos_an = (a * p).sum(1), (a * n).sum(1)
    if kind == 'triplet':
        loss = np.maximum(((a - p) ** 2).sum(1) - ((a - n) ** 2).sum(1) + alpha, 0)
    elif kind == 'atriplet':
        loss = np.maximum(np.arccos(np.clip(cos_ap, -LIMIT, LIMIT)) - np.arccos(np.clip(cos_an, -LIMIT, LIMIT))
                          + alpha, 0)
    elif kind == 'fix_arc_circle_triplet':
        sp, sn = circle(cos_ap, cos_an, gamma, fixed=True)
        loss = np.maximum(sn - sp, 0)
    else:
        sp, sn = circle(cos_ap, cos_an, gamma / np.pi, fixed=False)
        return np.full(N, np.log1p(np.exp(sn).sum() * np.exp(-sp).sum()))
    return np.tile(loss, 3)


def triplet_case(seed):
    """Anchors near their positives, negative slots and a second image of some anchors' identities in the
    batch (so the same-label mask matters)."""
    rng = np.random.RandomState(seed)
    centers = rng.normal(size=(C, EMB))
    label = np.concatenate([np.arange(T), np.arange(T), (np.arange(T) + 1) % T])
    label[-1] = C - 1
    emb = centers[label] + rng.normal(size=(N, EMB)) * 0.9
    return emb, label


def run_head(head, emb, label, proj):
    x = mx.nd.array(emb)
    x.attach_grad()
    with autograd.record():
        loss, hit = head(x, mx.nd.array(label))
        (loss * mx.nd.array(proj)).sum().backward()
    return loss.asnumpy(), hit.asnumpy(), x.grad.asnumpy()


@pytest.mark.parametrize('kind', ['triplet', 'atriplet', 'arc_circle_triplet', 'fix_arc_circle_triplet'])
@pytest.mark.parametrize('mining', ['hardest', 'semihard'])
def test_pair_losses_match_reference(kind, mining):
    emb, label = triplet_case(0)
    head = build_head(kind, C, EMB, triplet_mining=mining)
    head.initialize()
    head.hybridize()
    proj = np.random.RandomState(1).normal(size=N)
    loss, hit, grad = run_head(head, emb, label, proj)
    ref = pair_reference(emb, label, kind, mining, alpha=head.alpha)
    np.testing.assert_allclose(loss, ref, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(ref).max()))
    assert ref.any()        # the case is not one where every triplet is already satisfied

    def objective():
        return float((pair_reference(emb, label, kind, mining, alpha=head.alpha) * proj).sum())
    g = numeric_grad(objective, emb)
    np.testing.assert_allclose(grad, g, rtol=2e-3, atol=2e-3 * np.abs(g).max())
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    best = np.array([(x[i] * x[T + i]).sum() > max((x[i] * x[j]).sum() for j in range(N) if label[j] != label[i])
                     for i in range(T)])
    np.testing.assert_array_equal(hit, np.tile(best, 3))


def test_mining_picks_the_documented_negative():
    """Anchor [1, 0], positive at cos 0.5, three negatives: hardest takes the most similar one, semihard the
    most similar one below 0.5, or the least similar one when all are above."""
    def unit(c):
        return [c, math.sqrt(1 - c * c)]
    for mining, negs, expected in (('hardest', [0.9, 0.3, 0.1], 0.9), ('semihard', [0.9, 0.3, 0.1], 0.3),
                                   ('semihard', [0.9, 0.8, 0.7], 0.7)):
        # T = 3: anchors and positives all of identity 0, the three negative slots of identities 1..3.
        rows = np.array([[1.0, 0.0]] * 3 + [unit(0.5)] * 3 + [unit(c) for c in negs])
        labels = np.array([0] * 6 + [1, 2, 3])
        head = TripletHead(4, 2, 'triplet', alpha=1.0, mining=mining)
        loss = head(mx.nd.array(rows), mx.nd.array(labels))[0].asnumpy()
        assert loss[0] == pytest.approx((2 - 2 * 0.5) - (2 - 2 * expected) + 1.0, abs=1e-5), (mining, negs)


def arc_circle_logits(emb, weight, label, gamma=64.0, m=MARGIN):
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    theta = np.arccos(np.clip(x @ w.T, -LIMIT, LIMIT))
    target = np.zeros(theta.shape, bool)
    target[np.arange(len(label)), label] = True
    return gamma * np.where(target, np.cos(np.clip(theta + m, 0, np.pi)) * np.maximum(theta + np.pi - m, 0),
                            np.cos(np.clip(theta + np.pi - m, 0, np.pi)) * np.maximum(m - theta, 0))


def smoothed_ce(logits, label, alpha):
    """-sum_j q_j log softmax_j with q = 1 - alpha on the label, alpha / (K - 1) elsewhere."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    q = np.full(logits.shape, alpha / (logits.shape[1] - 1))
    q[np.arange(len(label)), label] = 1 - alpha
    return -(q * logp).sum(axis=1)


@pytest.mark.parametrize('loss_name,kind', [('triplet_fusion_arc_circle', 'triplet'),
                                            ('arc_circle_triplet_fusion_arc_circle', 'arc_circle_triplet')])
def test_fusion_is_class_loss_plus_weighted_pair_loss(loss_name, kind):
    emb, label = triplet_case(2)
    weight = np.random.RandomState(3).normal(size=(C, EMB))
    head = build_head(loss_name, C, EMB, triplet_weight=0.7, triplet_mining='hardest')
    head.initialize()
    fc7 = head.collect_params()['fc7_weight']
    fc7.set_data(mx.nd.array(weight))
    head.hybridize()
    criterion = HeadLoss(head, label_smoothing=0.1)
    proj = np.random.RandomState(4).normal(size=N)
    x = mx.nd.array(emb)
    x.attach_grad()
    with autograd.record():
        loss, hit = criterion(x, mx.nd.array(label))
        (loss * mx.nd.array(proj)).sum().backward()

    def reference():
        logits = arc_circle_logits(emb, weight, label)
        return smoothed_ce(logits, label, 0.1) + 0.7 * pair_reference(emb, label, kind, 'hardest'), logits
    ref, logits = reference()
    np.testing.assert_allclose(loss.asnumpy(), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(hit.asnumpy(), logits.argmax(axis=1) == label)

    def objective():
        return float((reference()[0] * proj).sum())
    g_emb, g_w = numeric_grad(objective, emb), numeric_grad(objective, weight)
    np.testing.assert_allclose(x.grad.asnumpy(), g_emb, rtol=2e-3, atol=2e-3 * np.abs(g_emb).max())
    np.testing.assert_allclose(fc7.grad().asnumpy(), g_w, rtol=2e-3, atol=2e-3 * np.abs(g_w).max())


@pytest.mark.parametrize('loss_name', ['arcface', 'marginface', 'softmax_circle', 'fix_arc_circle', 'softmax'])
def test_label_smoothing_value_and_gradient(loss_name):
    """--label-smoothing on any softmax-family head: the smoothed cross-entropy and its gradient
    softmax - q on the logits; 0 is gluon's SoftmaxCrossEntropyLoss."""
    rng = np.random.RandomState(5)
    logits, label = rng.normal(size=(N, C)) * 3, rng.randint(0, C, size=N)
    z = mx.nd.array(logits)
    z.attach_grad()
    with autograd.record():
        loss = SoftmaxLoss(C, 0.1)(z, mx.nd.array(label))
    loss.backward()
    np.testing.assert_allclose(loss.asnumpy(), smoothed_ce(logits, label, 0.1), rtol=1e-5)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    q = np.full(p.shape, 0.1 / (C - 1))
    q[np.arange(N), label] = 0.9
    np.testing.assert_allclose(z.grad.asnumpy(), p - q, rtol=1e-4, atol=1e-6)
    head = build_head(loss_name, C, EMB)
    head.initialize()
    emb, lab = mx.nd.array(rng.normal(size=(N, EMB))), mx.nd.array(label)
    out = head(emb, lab)
    smooth, hit = HeadLoss(head, 0.1)(emb, lab)
    np.testing.assert_allclose(smooth.asnumpy(), smoothed_ce(out.asnumpy().astype(np.float64), label, 0.1),
                               rtol=1e-4, atol=1e-4)
    plain = HeadLoss(head, 0.0)(emb, lab)[0]
    np.testing.assert_allclose(plain.asnumpy(), smoothed_ce(out.asnumpy().astype(np.float64), label, 0.0),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(hit.asnumpy(), out.asnumpy().argmax(axis=1) == label)


def test_label_smoothing_bad_values():
    head = build_head('arcface', C, EMB)
    with pytest.raises(UserError, match=r'^--label-smoothing 1: must be in \[0, 1\)'):
        HeadLoss(head, 1.0)
    with pytest.raises(UserError, match='^--label-smoothing 0.1: the pair-wise loss triplet has no softmax'):
        HeadLoss(build_head('triplet', C, EMB), 0.1)


def make_rec(folder, per_identity=(3, 1, 4, 2, 5, 2), size=40):
    """A rec of solid-colour faces; identity i has per_identity[i] images (identity 1 has one)."""
    os.makedirs(folder, exist_ok=True)
    with IdentityRecordWriter(os.path.join(folder, 'train'), image_size=(size, size)) as w:
        for i, n in enumerate(per_identity):
            w.add_identity(i, [(cv2.imencode('.png', np.full((size, size, 3), 20 * i + j, np.uint8))[1].tobytes(), 1,
                                None) for j in range(n)])
    return os.path.join(folder, 'train.rec')


def test_sampler_layout_and_determinism(tmp_path):
    ds = FaceRecordDataset(make_rec(str(tmp_path)))
    labels = ds.labels
    sampler = TripletSampler(ds, per_context=6, contexts=2, seed=7)
    # pairs per epoch: 3//2 + 0 + 4//2 + 2//2 + 5//2 + 2//2 = 7; batches of 2 contexts x 2 triplets
    assert sampler.num_pairs == 7 and len(sampler) == 1
    batches = sampler.batches(0)
    assert len(batches) == 1 and len(batches[0]) == 12
    for chunk in (batches[0][:6], batches[0][6:]):
        a, p, n = np.array(chunk[:2]), np.array(chunk[2:4]), np.array(chunk[4:])
        assert (labels[a] == labels[p]).all() and (a != p).all() and (labels[n] != labels[a]).all()
        assert 1 not in labels[a]          # the one-image identity is never an anchor
    assert sampler.batches(0) == batches and TripletSampler(ds, 6, 2, seed=7).batches(0) == batches
    assert sampler.batches(1) != batches and TripletSampler(ds, 6, 2, seed=8).batches(0) != batches
    # an epoch's pairs use every image at most once (anchor or positive)
    single = TripletSampler(ds, per_context=3, contexts=1, seed=7)
    used = [i for b in single.batches(0) for i in b[:2]]
    assert len(used) == len(set(used)) == 14
    # resume: set_epoch(e, skip) continues that epoch's order; iteration advances the epoch
    single.set_epoch(3, 2)
    assert list(single) == single.batches(3)[2:] and single.epoch == 4
    # dist workers: disjoint strided shares of the same pairs
    shares = [TripletSampler(ds, 3, 1, seed=7, part=(r, 2)) for r in range(2)]
    firsts = [set(i for b in s.batches(0) for i in b[:2]) for s in shares]
    assert not firsts[0] & firsts[1] and len(shares[0]) == len(shares[1]) == 3
    # the loader reads those batches as images and labels
    loader = TripletLoader(ds, TripletSampler(ds, 6, 2, seed=7))
    data, label = next(iter(loader))
    assert data.shape == (12, 3, 40, 40) and label.asnumpy().tolist() == labels[batches[0]].tolist()


def test_sampler_refusals(tmp_path):
    with pytest.raises(UserError, match=r'^--per-batch-size 32: --loss triplet trains on \(anchor, positive, '
                                        r'negative\) triplets, .* multiple of 3 \(e.g. 30 or 33\)$'):
        check_triplet_batch(32, 'triplet')
    check_triplet_batch(30, 'triplet')
    ds = FaceRecordDataset(make_rec(str(tmp_path / 'singles'), per_identity=(1, 1, 1)))
    with pytest.raises(UserError, match='no identity with 2 or more images'):
        TripletSampler(ds, 3)
    ds = FaceRecordDataset(make_rec(str(tmp_path / 'one'), per_identity=(4,)))
    with pytest.raises(UserError, match='at least 2 identities'):
        TripletSampler(ds, 3)


def train_cli(data_dir, models_root, *extra):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'train', 'train.py'), '--network', 'demo',
                           '--dataset', 'demo', '--data-dir', data_dir, '--val-targets', '', '--models-root',
                           str(models_root), '--ctx', 'cpu:2', '--max-steps', '3', '--verbose', '3', '--frequent',
                           '1', '--ckpt', '2', '--num-workers', '0', '--lr-steps', '', '--lr', '0.05', '--seed', '5',
                           *extra], capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})


def test_cli_triplet_finetune_is_deterministic(tmp_path):
    """train/train.py --loss triplet on two contexts: trains (finite loss, embedding-only checkpoint: no fc7),
    and the same seed gives the same bits (the refusal of a batch of 8 is test_sampler_refusals' line)."""
    data_dir = os.path.dirname(make_rec(str(tmp_path / 'data'), per_identity=(4, 3, 4, 2, 5, 4, 1, 4)))
    flags = ['--loss', 'triplet', '--per-batch-size', '6', '--triplet-mining', 'hardest', '--triplet-alpha', '0.5']
    runs = []
    for name in ('a', 'b'):
        proc = train_cli(data_dir, tmp_path / name, *flags)
        assert proc.returncode == 0, proc.stderr[-2000:]
        losses = [float(line.split(' loss=')[1].split()[0]) for line in proc.stdout.splitlines() if ' loss=' in line]
        assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
        params = mx.nd.load(str(tmp_path / name / 'demo-triplet-demo' / 'model-0001.params'))
        assert params and not any('fc7' in k for k in params)
        graph = mx.sym.load(str(tmp_path / name / 'demo-triplet-demo' / 'model-symbol.json'))
        assert graph.list_outputs() == ['fc1_output']
        runs.append(params)
    assert sorted(runs[0]) == sorted(runs[1])
    assert all((runs[0][k].asnumpy() == runs[1][k].asnumpy()).all() for k in runs[0])


def test_checkpoints_of_pair_and_fusion_heads(tmp_path):
    """A pair-wise head has no fc7: its checkpoint is the embedding graph; a fusion keeps fc7 and the
    training graph over its class logits."""
    from mxnet.gluon import nn
    from recognition import checkpoint
    net = nn.HybridSequential(prefix='')
    net.add(nn.Flatten(), nn.Dense(EMB, prefix='fc1_'))
    net.initialize()
    net(mx.nd.zeros((3, 3, 4, 4)))
    for name, fc7 in (('triplet', False), ('triplet_fusion_arc_circle', True)):
        head = build_head(name, C, EMB)
        head.initialize()
        prefix = str(tmp_path / name)
        checkpoint.save_checkpoint(prefix, 1, net, head)
        sym, arg, _ = mx.model.load_checkpoint(prefix, 1)
        assert ('fc7_weight' in arg) == fc7 and ('softmax_output' in sym.list_outputs()) == fc7
        assert 'fc1_weight' in arg


def test_session_refuses_what_a_triplet_run_cannot_do(tmp_path):
    """--freeze-block 1 leaves a pair-wise loss nothing to train; a set with fewer pairs than one batch."""
    from easydict import EasyDict
    from mxnet.gluon import nn
    from recognition.config import generate_config
    from recognition.training import TrainingSession
    data_dir = os.path.dirname(make_rec(str(tmp_path / 'data'), per_identity=(2, 2, 3)))
    config, default = generate_config('demo', 'demo', 'triplet')
    base = EasyDict(dict(config, **default))
    base.update(loss='triplet', dataset_path=data_dir, val_targets=[], models_root=str(tmp_path / 'models'), per_batch_size=3,
                num_workers=0, progress_bar=False, ctx='cpu:1', kvstore='device', lr_steps='', seed=0)

    def net():
        block = nn.HybridSequential(prefix='')
        block.add(nn.Flatten(), nn.Dense(EMB, prefix='fc1_'))
        return block
    with pytest.raises(UserError, match='^--freeze-block 1 trains only fc7, and --loss triplet has none'):
        TrainingSession(EasyDict(base, freeze_block=1), net=net(), head=build_head('triplet', 3, EMB))
    with pytest.raises(UserError, match=r'3 \(anchor, positive\) pairs, fewer than one batch of 6 triplets$'):
        TrainingSession(EasyDict(base, per_batch_size=18), net=net(), head=build_head('triplet', 3, EMB))
    sess = TrainingSession(base, net=net(), head=build_head('triplet', 3, EMB))
    assert sess.steps_per_epoch == 3 and sess.triplets is not None
    sess.close()
