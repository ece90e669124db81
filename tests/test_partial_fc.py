"""Partial FC (recognition.partial_fc): sampled columns, the heads on them, the lazy SGD step, sharding over
contexts, training equal to the full head at R = 1, exact resume, insightface checkpoints, bad input.

Tolerances: float32 sums in another order (per-shard partial sums of exponentials, the row-sparse update
against the Trainer's fused dense one) keep losses and gradients within 1e-5 relative and parameters after 4
SGD steps within 1e-4 of each tensor's largest magnitude (the bound test_train.py uses for 2 contexts).
"""
import math
import os
import subprocess
import sys
import textwrap

import mxnet as mx
import numpy as np
import pytest

from recognition.losses import build_head
from recognition.partial_fc import ClassSampler, PartialFC, check_ratio, shard_bounds
from recognition.training import TrainingSession
from recognition.utils import UserError

from test_train import ROOT, TinyNet, build_dataset, make_opts, params_of

HEADS = ['softmax', 'nsoftmax', 'arcface', 'cosface', 'combined', 'arc_circle']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return build_dataset(str(tmp_path_factory.mktemp('faces')), train_ids=64, per_id=4, val_ids=4, pairs=8)


def test_sampler_keeps_the_batch_classes_and_is_seeded():
    logged = []
    sampler = ClassSampler(1000, 0.1, seed=7, batch=64, log=logged.append)
    labels = np.random.default_rng(0).integers(0, 1000, 64)
    got = sampler.sample(3, labels)
    assert len(got) == 100 and np.all(np.diff(got) > 0) and set(labels) <= set(got)
    assert got.min() >= 0 and got.max() < 1000 and not logged
    np.testing.assert_array_equal(got, ClassSampler(1000, 0.1, 7, 64).sample(3, labels))
    assert not np.array_equal(got, sampler.sample(4, labels))
    assert not np.array_equal(got, ClassSampler(1000, 0.1, 8, 64).sample(3, labels))
    # The draw outside the batch is uniform: over many steps every other class comes up about equally.
    counts = np.bincount(np.concatenate([sampler.sample(s, labels[:4]) for s in range(2000)]), minlength=1000)
    others = np.delete(counts, labels[:4])
    expected = 2000 * 96 / 996
    assert abs(others.mean() - expected) < 1e-6 and others.std() < 4 * math.sqrt(expected)
    # R too small for a batch's own classes: raised to fit, and said so.
    small = ClassSampler(1000, 0.01, 7, 64, log=logged.append)
    assert small.size == 64 and 'sampling 64 classes per step' in logged[0]
    assert set(labels) <= set(small.sample(0, labels))
    for bad in (0, -0.5, 1.5, float('nan'), 'x'):
        with pytest.raises(UserError, match='--sample-ratio'):
            check_ratio(bad)
    # Shards: uneven sizes differ by one row and are logged; fewer classes than contexts is an error.
    assert shard_bounds(10, 3, log=logged.append) == [(0, 4), (4, 7), (7, 10)]
    assert 'do not divide into 3 contexts: shards of 4 and 3 rows' in logged[-1]
    with pytest.raises(UserError, match='2 classes cannot be sharded over 3 contexts'):
        shard_bounds(2, 3)


def _head(name, classes, emb):
    scale = {'softmax': {}, 'arc_circle': {'gamma': 16.0}}.get(name, {'s': 16.0})
    return build_head(name, classes, emb, **scale)


def _reference(name, weight, bias, emb, label):
    """Loss and gradients of an ordinary head over the given class rows (SoftmaxCrossEntropyLoss)."""
    head = _head(name, weight.shape[0], weight.shape[1])
    head.initialize()
    head.fc7_weight.set_data(weight)
    if bias is not None:
        head.fc7_bias.set_data(bias)
    x = emb.copy()
    x.attach_grad()
    with mx.autograd.record():
        loss = mx.gluon.loss.SoftmaxCrossEntropyLoss()(head(x, label), label)
    loss.backward()
    grads = {'fc7_weight': head.fc7_weight.grad().asnumpy()}
    if bias is not None:
        grads['fc7_bias'] = head.fc7_bias.grad().asnumpy()
    return loss.asnumpy(), x.grad.asnumpy(), grads


def _partial(name, weight, bias, emb, label, ratio, contexts, step=0):
    """PartialFC's loss and gradients (embedding, the sampled rows) and its sampled class ids."""
    head = _head(name, weight.shape[0], weight.shape[1])
    head.initialize(ctx=mx.cpu())
    head.fc7_weight.set_data(weight)
    if bias is not None:
        head.fc7_bias.set_data(bias)
    pfc = PartialFC(head, contexts, ratio, seed=5, global_batch=len(label), wd=0.0,
                    momentum=0.0, log=lambda m: None)
    halves = np.array_split(np.arange(len(label)), len(contexts))
    xs = [emb[h[0]:h[-1] + 1].copyto(c) for h, c in zip(halves, contexts)]
    ys = [label[h[0]:h[-1] + 1].copyto(c) for h, c in zip(halves, contexts)]
    for x in xs:
        x.attach_grad()
    with mx.autograd.record():
        losses, _ = pfc.forward(xs, ys, step)
    mx.autograd.backward(losses)
    index = pfc.sampler.sample(step, label.asnumpy())
    grads = {}
    for attr in pfc.rows:
        grads[attr] = np.concatenate([leaves[attr].grad.asnumpy() for _, leaves, _ in pfc._step if leaves])
    loss = np.concatenate([l.asnumpy() for l in losses])
    return loss, np.concatenate([x.grad.asnumpy() for x in xs]), grads, index


@pytest.mark.parametrize('name', HEADS)
def test_heads_on_sampled_columns(name):
    """Every margin head: R = 1 (one and two shards) equals the full head; R = 0.25 on two shards equals the
    ordinary head over the sampled rows with the labels remapped (loss, embedding and row gradients)."""
    rng = np.random.default_rng(1)
    classes, emb_size, batch = 40, 8, 12
    weight = mx.nd.array(rng.normal(0, 0.5, (classes, emb_size)))
    bias = mx.nd.array(rng.normal(0, 0.1, classes)) if name == 'softmax' else None
    emb = mx.nd.array(rng.normal(0, 1, (batch, emb_size)))
    label = mx.nd.array(rng.integers(0, classes, batch))

    def close(a, b):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(b).max())))

    want = _reference(name, weight, bias, emb, label)
    for contexts in ([mx.cpu(0)], [mx.cpu(0), mx.cpu(1)]):
        loss, demb, grads, index = _partial(name, weight, bias, emb, label, 1.0, contexts)
        np.testing.assert_array_equal(index, np.arange(classes))
        close(loss, want[0])
        close(demb, want[1])
        for attr in grads:
            close(grads[attr], want[2][attr])

    loss, demb, grads, index = _partial(name, weight, bias, emb, label, 0.25, [mx.cpu(0), mx.cpu(1)], step=9)
    assert len(index) == 12 and set(label.asnumpy().astype(int)) <= set(index)
    ids = mx.nd.array(index, dtype='int64')
    remapped = mx.nd.array(np.searchsorted(index, label.asnumpy()))
    sub = _reference(name, mx.nd.take(weight, ids), None if bias is None else mx.nd.take(bias, ids), emb, remapped)
    close(loss, sub[0])
    close(demb, sub[1])
    for attr in grads:
        close(grads[attr], sub[2][attr])


def test_update_moves_only_the_sampled_rows():
    """The stated optimizer semantics: SGD with momentum and weight decay on the sampled rows only; an
    unsampled row keeps its weight and its momentum."""
    rng = np.random.default_rng(2)
    classes, emb_size, batch, lr, wd, mom = 30, 6, 8, 0.1, 0.05, 0.9
    head = _head('arcface', classes, emb_size)
    head.initialize(ctx=mx.cpu())
    weight = rng.normal(0, 0.5, (classes, emb_size)).astype(np.float32)
    head.fc7_weight.set_data(mx.nd.array(weight))
    momentum = rng.normal(0, 0.1, (classes, emb_size)).astype(np.float32)
    pfc = PartialFC(head, [mx.cpu(0), mx.cpu(1)], 0.4, seed=1, global_batch=batch, wd=wd,
                    momentum=mom, log=lambda m: None)
    pfc.load({'partial_fc:fc7_weight:momentum': mx.nd.array(momentum)})
    label = mx.nd.array(rng.integers(0, classes, batch))
    xs = [mx.nd.array(rng.normal(0, 1, (batch // 2, emb_size)), ctx=c) for c in pfc.contexts]
    with mx.autograd.record():
        losses, _ = pfc.forward(xs, [label[:batch // 2], label[batch // 2:].copyto(mx.cpu(1))], 0)
    mx.autograd.backward(losses)
    index = pfc.sampler.sample(0, label.asnumpy())
    grad = np.concatenate([leaves['fc7_weight'].grad.asnumpy() for _, leaves, _ in pfc._step if leaves])
    pfc.update(lr)
    pfc.sync_params()
    new_mom = momentum.copy()
    new_mom[index] = mom * momentum[index] - lr * (grad / batch + wd * weight[index])
    new_weight = weight.copy()
    new_weight[index] += new_mom[index]
    got_mom = pfc.momentum_arrays()['partial_fc:fc7_weight:momentum'].asnumpy()
    np.testing.assert_allclose(got_mom, new_mom, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(head.fc7_weight.data().asnumpy(), new_weight, rtol=1e-6, atol=1e-7)
    others = np.setdiff1d(np.arange(classes), index)
    assert len(others) == 18
    np.testing.assert_array_equal(got_mom[others], momentum[others])
    np.testing.assert_array_equal(head.fc7_weight.data().asnumpy()[others], weight[others])


def _session(data_dir, root, init=None, **kw):
    opts = make_opts(data_dir, root, **{'max_steps': 4, 'val_targets': [], 'ckpt': 0, 'lr': 0.02, **kw})
    sess = TrainingSession(opts, net=TinyNet(global_stats=True), head=build_head('arcface', 64, 32, s=16.0))
    if init is not None:
        for name, p in sess.params.items():
            p.set_data(mx.nd.array(init[name]))
        if sess.pfc is not None:
            sess.pfc.load()
    return sess


def _assert_close(got, want):
    assert set(got) == set(want)
    for name in want:
        scale = max(float(np.abs(want[name]).max()), 1e-3)
        assert np.abs(got[name] - want[name]).max() / scale <= 1e-4, name


def test_training_at_r1_equals_the_full_head_and_shards_equal_one_context(data_dir, tmp_path):
    """4 steps: R = 1 on one context and on two (8 images each) == today's full fc7 on one context; R = 0.25
    on two contexts == R = 0.25 on one (the same columns: the draw does not depend on the shards)."""
    full = _session(data_dir, tmp_path / 'full')
    init = params_of(full)
    losses = full.run()['losses']
    want = params_of(full)
    assert np.abs(want['fc7_weight'] - init['fc7_weight']).max() > 1e-3
    for tag, ctx, per in (('one', 'cpu:1', 16), ('two', 'cpu:2', 8)):
        sess = _session(data_dir, tmp_path / tag, init, sample_ratio=1.0, ctx=ctx, per_batch_size=per)
        assert len(sess.pfc.bounds) == int(ctx[-1])
        np.testing.assert_allclose(sess.run()['losses'], losses, rtol=1e-5)
        _assert_close(params_of(sess), want)
    one = _session(data_dir, tmp_path / 'q1', init, sample_ratio=0.25)
    one.run()
    two = _session(data_dir, tmp_path / 'q2', init, sample_ratio=0.25, ctx='cpu:2', per_batch_size=8)
    assert [w['fc7_weight'].shape[0] for w in two.pfc.weights] == [32, 32]
    two.run()
    sampled = params_of(one)
    _assert_close(params_of(two), sampled)
    assert np.abs(sampled['fc7_weight'] - want['fc7_weight']).max() > 1e-3   # sampling changed training


def test_freeze_block_1_trains_only_the_sampled_fc7(data_dir, tmp_path):
    """--freeze-block 1 (the chain's step 1) with Partial FC: no Trainer is left, fc7 alone moves."""
    sess = _session(data_dir, tmp_path, sample_ratio=0.5, freeze_block=1, max_steps=2)
    before = params_of(sess)
    assert sess.trainer is None
    sess.run()
    after = params_of(sess)
    assert np.abs(after['fc7_weight'] - before['fc7_weight']).max() > 1e-4
    for name in before:
        if name != 'fc7_weight':
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_resume_with_sampling_is_bit_identical_and_checkpoint_is_insightface(data_dir, tmp_path):
    """R = 0.25 on 2 contexts: 2 steps + resume 2 == 4 straight, bit for bit (weights, the shards' momentum,
    the columns); the merged fc7 in prefix-0001.params loads in plain MXNet (Module) and scores as it."""
    straight = _session(data_dir, tmp_path / 's', sample_ratio=0.25, ctx='cpu:2', per_batch_size=8)
    init = params_of(straight)
    straight.run()
    first = _session(data_dir, tmp_path / 'r', init, sample_ratio=0.25, ctx='cpu:2', per_batch_size=8,
                     max_steps=2)
    first.run()
    resumed = _session(data_dir, tmp_path / 'r', sample_ratio=0.25, ctx='cpu:2', per_batch_size=8, resume=True)
    assert resumed.step == 2
    resumed.run()
    a, b = params_of(straight), params_of(resumed)
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    ma, mb = straight.pfc.momentum_arrays(), resumed.pfc.momentum_arrays()
    np.testing.assert_array_equal(mb['partial_fc:fc7_weight:momentum'].asnumpy(),
                                  ma['partial_fc:fc7_weight:momentum'].asnumpy())
    with pytest.raises(UserError, match=r'^--sample-ratio 1.5: must be in \(0, 1\]'):
        _session(data_dir, tmp_path / 'bad', sample_ratio=1.5)
    with pytest.raises(UserError, match='does not combine with --label-smoothing'):
        _session(data_dir, tmp_path / 'bad', sample_ratio=0.5, label_smoothing=0.1)
    with pytest.raises(UserError, match='resume needs the same --sample-ratio'):
        _session(data_dir, tmp_path / 'r', ctx='cpu:2', per_batch_size=8, resume=True)

    straight.save_model(1)
    sym, arg, aux = mx.model.load_checkpoint(straight.prefix, 1)
    merged = np.concatenate([w['fc7_weight'].asnumpy() for w in straight.pfc.weights])
    np.testing.assert_array_equal(arg['fc7_weight'].asnumpy(), merged)
    assert arg['fc7_weight'].shape == (64, 32)
    x, y = mx.nd.array(np.random.default_rng(0).uniform(0, 255, (2, 3, 40, 40))), mx.nd.array([3, 60])
    mod = mx.mod.Module(sym, data_names=['data'], label_names=['softmax_label'], context=mx.cpu())
    mod.bind([('data', x.shape)], [('softmax_label', y.shape)], for_training=False)
    mod.set_params(arg, aux)
    mod.forward(mx.io.DataBatch([x], [y]), is_train=False)
    emb, prob = (o.asnumpy() for o in mod.get_outputs())
    want = straight.head(straight.net(x), y).softmax(axis=1).asnumpy()
    np.testing.assert_allclose(prob, want, rtol=1e-4, atol=1e-6)
    # The next step of a chain may train without Partial FC: --pretrained reads the merged fc7.
    full = _session(data_dir, tmp_path / 'next', pretrained=f'{straight.prefix},1')
    np.testing.assert_array_equal(full.head.fc7_weight.data().asnumpy(), merged)


def test_cli_sampling_is_deterministic(data_dir, tmp_path):
    """train/train.py --sample-ratio twice with one seed: the same bits (a ratio too small is raised, logged)."""
    def train(folder, *extra):
        return subprocess.run(
            [sys.executable, os.path.join(ROOT, 'train', 'train.py'), '--network', 'demo', '--loss', 'arcface',
             '--loss-s', '16', '--dataset', 'demo', '--data-dir', data_dir, '--val-targets', '',
             '--models-root', str(folder), '--ctx', 'cpu:2', '--per-batch-size', '4', '--max-steps', '2',
             '--ckpt', '0', '--num-workers', '0', '--emb-size', '32', *extra],
            capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    runs = [train(tmp_path / str(i), '--sample-ratio', '0.05', '--seed', '4') for i in (0, 1)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    assert '--sample-ratio 0.05: 4 of 64 classes cannot hold the up to 8 classes' in runs[0].stdout
    assert 'Partial FC: 8 of 64 classes per step' in runs[0].stdout
    snaps = [mx.nd.load(str(tmp_path / str(i) / 'demo-arcface-demo' / 'model-resume-00000002.params'))
             for i in (0, 1)]
    assert set(snaps[0]) == set(snaps[1]) and 'partial_fc:fc7_weight:momentum' in snaps[0]
    for name in snaps[0]:
        np.testing.assert_array_equal(snaps[0][name].asnumpy(), snaps[1][name].asnumpy(), err_msg=name)


WORKER = textwrap.dedent('''
    import os, sys
    import numpy as np
    from recognition.losses import build_head
    from recognition.training import TrainingSession
    from test_train import TinyNet, make_opts

    data_dir, out, kvstore, ctx, max_steps, resume = sys.argv[1:7]
    opts = make_opts(data_dir, os.path.join(out, 'models'), kvstore=kvstore, ctx=ctx, per_batch_size=4,
                     max_steps=int(max_steps), lr=0.05, lr_steps='3', warmup=1, verbose=1000, ckpt=0,
                     val_targets=[], sample_ratio=0.25, resume=resume == 'resume')
    session = TrainingSession(opts, net=TinyNet(global_stats=True), head=build_head('arcface', 32, 32, s=16.0))
    summary = session.run()
    rank = session.topology.rank
    np.savez(os.path.join(out, 'params_%s_rank%d.npz' % (kvstore, rank)),
             **{n: p.list_data()[0].asnumpy() for n, p in session.params.items()})
    print('rank', rank, 'of', session.topology.num_workers, 'steps', summary['step'])
''')


def test_row_sparse_dist_on_loopback_equals_local(tmp_path, monkeypatch, capfd):
    """dist_sync, 2 workers x 4 images, 1 server, R = 0.25 of 32 classes: fc7 row_sparse on the server, each
    worker pulling 8 rows a step, equals one process with 2 contexts x 4 (same columns, same lazy SGD)."""
    from test_train_dist import _launch_dist
    data = build_dataset(str(tmp_path / 'faces'), train_ids=32, per_id=2, val_ids=4, pairs=8)
    script = tmp_path / 'worker.py'
    script.write_text(WORKER)
    monkeypatch.setenv('PYTHONPATH', os.path.dirname(os.path.abspath(__file__)) + os.pathsep
                       + os.environ.get('PYTHONPATH', ''))
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    subprocess.run([sys.executable, str(script), data, str(tmp_path), 'device', 'cpu:2', '6', 'new'],
                   check=True, env=dict(os.environ))
    local = np.load(tmp_path / 'params_device_rank0.npz')
    dist = _launch_dist(script, data, tmp_path / 'dist', 6, 'new', capfd)
    _assert_close({n: dist[n] for n in dist.files}, {n: local[n] for n in local.files})
