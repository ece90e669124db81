"""The trainer on tiny data: multi-device equality, exact resume, learning, export, bad input.

Data: synthetic faces (recognition.data.synthetic_faces) resized to 32x32, packed into an identity-indexed rec,
plus an `lfw.bin` of pairs from identities held apart from training. Network: the registry's `demo`
LResNet-IR at 32x32 with an nsoftmax head (s=16). The multi-device test uses a small conv net without
dropout and with BatchNorm on running statistics instead: per-device dropout masks and per-device batch
statistics differ from single-device ones by design, so only that way are the two runs comparable.
"""
import os
import signal
import subprocess
import sys

import cv2
import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

from recognition import checkpoint
from recognition.config import generate_config
from recognition.data import synthetic_faces as synthetic
from recognition.data.bin import write_bin
from recognition.data.record import IdentityRecordWriter
from recognition.losses import build_head
from recognition.models import get_model
from recognition.training import TrainingDiverged, TrainingSession
from recognition.utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 40  # the demo net at 32x32 reaches 1x1 maps, where MKLDNN corrupts memory (see report)


class TinyNet(nn.HybridBlock):
    """conv0/bn0 -> 2 conv stages -> bn1 -> pre_fc1 -> fc1 (BN, fixed gamma); insightface names."""

    def __init__(self, emb_size=32, global_stats=False, width=8):
        super().__init__(prefix='')
        bn = dict(epsilon=2e-5, momentum=0.9, use_global_stats=global_stats)
        with self.name_scope():
            self.body = nn.HybridSequential(prefix='')
            self.body.add(nn.Conv2D(width, 3, 1, 1, use_bias=False, prefix='conv0_'),
                          nn.BatchNorm(prefix='bn0_', **bn), nn.Activation('relu'),
                          nn.Conv2D(width * 2, 3, 2, 1, use_bias=False, prefix='stage1_unit1_conv1_'),
                          nn.BatchNorm(prefix='stage1_unit1_bn1_', **bn), nn.Activation('relu'),
                          nn.Conv2D(width * 2, 3, 2, 1, use_bias=False, prefix='stage2_unit1_conv1_'),
                          nn.BatchNorm(prefix='bn1_', **bn), nn.Activation('relu'),
                          nn.Dense(emb_size, prefix='pre_fc1_'),
                          nn.BatchNorm(scale=False, prefix='fc1_', **bn))

    def hybrid_forward(self, F, x):
        return self.body((x - 127.5) * 0.0078125)


def _encode(img):
    img = cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    return cv2.imencode('.png', img)[1].tobytes()


def build_dataset(folder, train_ids=64, per_id=4, val_ids=20, pairs=200, seed=0):
    """train.rec (identities 0..train_ids-1) and lfw.bin (pairs of held-apart identities)."""
    rng = np.random.default_rng(seed)
    people = [synthetic.sample_identity(rng, i % 2, (i // 2) % 2, i) for i in range(train_ids + val_ids)]

    def face(ident):
        return _encode(synthetic.render_aligned(ident, synthetic.sample_variation(ident, rng, pose='frontal'))[0])

    os.makedirs(folder, exist_ok=True)
    with IdentityRecordWriter(os.path.join(folder, 'train'), image_size=(SIZE, SIZE)) as w:
        for i in range(train_ids):
            w.add_identity(i, [(face(people[i]), 1, None) for _ in range(per_id)])
    held = people[train_ids:]
    bins, issame = [], []
    for p in range(pairs):
        a = held[p % val_ids]
        b = a if p % 2 == 0 else held[(p % val_ids + 1 + p // val_ids % (val_ids - 1)) % val_ids]
        bins += [face(a), face(b)]
        issame.append(p % 2 == 0)
    write_bin(os.path.join(folder, 'lfw.bin'), bins, issame)
    return folder


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return build_dataset(str(tmp_path_factory.mktemp('faces')))


def make_opts(data_dir, models_root, **kw):
    config, default = generate_config('r18', 'demo', 'nsoftmax')
    opts = dict(config)
    opts.update(default)
    opts.update(dataset_path=data_dir, val_targets=['lfw'], image_shape=[SIZE, SIZE, 3], models_root=str(models_root),
                emb_size=32, per_batch_size=16, lr=0.1, wd=5e-4, mom=0.9, lr_steps='', warmup=0, verbose=1000,
                frequent=5, max_steps=6, num_workers=0, data_rand_mirror=False, ckpt=2, seed=3,
                progress_bar=False, ctx='cpu:1', kvstore='device')
    opts.update(kw)
    from easydict import EasyDict
    return EasyDict(opts)


def session(opts, net=None):
    """A session on the registry's demo network (32x32 input, 32-d) and an nsoftmax head."""
    net = net or get_model('demo', emb_size=32, input_size=SIZE)
    return TrainingSession(opts, net=net, head=build_head('nsoftmax', 64, 32, s=16.0))


def params_of(sess):
    return {n: p.list_data()[0].asnumpy().copy() for n, p in sess.params.items()}


def test_two_contexts_match_one_context(data_dir, tmp_path):
    """cpu:2 with 8 per context == cpu:1 with 16 (same global batch); BN on running statistics."""
    one = session(make_opts(data_dir, tmp_path / 'a', ctx='cpu:1', per_batch_size=16, max_steps=2),
                  net=TinyNet(global_stats=True))
    two = session(make_opts(data_dir, tmp_path / 'b', ctx='cpu:2', per_batch_size=8, max_steps=2),
                  net=TinyNet(global_stats=True))
    # Same initial weights: copy one's into two.
    for name, p in two.params.items():
        p.set_data(one.params[name].data(mx.cpu(0)))
    one.run()
    two.run()
    a, b = params_of(one), params_of(two)
    start = params_of(session(make_opts(data_dir, tmp_path / 'c'), net=TinyNet(global_stats=True)))
    moved = max(float(np.abs(a['fc7_weight'] - start['fc7_weight']).max()), 0)
    assert moved > 1e-3, 'training did not change the parameters'
    worst = max(float(np.abs(b[n] - a[n]).max() / (np.abs(a[n]).max() + 1e-3)) for n in a)
    print(f'2 contexts vs 1: largest difference {worst:.2e} of the tensor scale')
    # Float32 sums in a different order (per-device partial sums, then the kvstore sum): after 2 SGD
    # steps the parameters agree to 1e-4 of each tensor's largest magnitude.
    assert worst < 1e-4
    # The contexts hold identical copies.
    for name, p in two.params.items():
        np.testing.assert_array_equal(p.data(mx.cpu(0)).asnumpy(), p.data(mx.cpu(1)).asnumpy())


def test_resume_equals_straight_run(data_dir, tmp_path):
    """3 steps + resume 3 steps == 6 steps straight (parameters, momentum, data order, dropout seed)."""
    mx.random.seed(1)
    straight = session(make_opts(data_dir, tmp_path / 's', max_steps=6))
    init = params_of(straight)
    straight.run()

    first = session(make_opts(data_dir, tmp_path / 'r', max_steps=3))
    for name, p in first.params.items():
        p.set_data(mx.nd.array(init[name]))
    first.run()
    resumed = session(make_opts(data_dir, tmp_path / 'r', max_steps=6, resume=True))
    assert resumed.step == 3
    result = resumed.run()
    assert result['step'] == 6
    a, b = params_of(straight), params_of(resumed)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_short_run_learns(data_dir, tmp_path):
    """Loss falls and verification on held-apart identities rises clearly above chance (0.5).

    Measured (seed 3, demo net at 40x40): loss 6.9 -> 1.0, accuracy on 200 pairs of 20 unseen identities
    0.705 (random init) -> 0.855 after 100 steps of batch 32.
    """
    opts = make_opts(data_dir, tmp_path, max_steps=100, verbose=100, lr=0.2, lr_steps='75', per_batch_size=32,
                     frequent=50, ckpt=3)
    sess = session(opts)
    before = sess.verify()[0]
    result = sess.run()
    first, last = np.mean(result['losses'][:5]), np.mean(result['losses'][-5:])
    after = result['verification'][-1][1][0]
    print(f'loss {first:.3f} -> {last:.3f}; lfw accuracy {before:.3f} -> {after:.3f}')
    assert last < 0.4 * first
    assert after >= 0.78 and after >= before + 0.08
    # --ckpt 3 saved model-0001 and pointed `latest` at it.
    prefix, epoch = checkpoint.read_latest(sess.run_dir)
    assert epoch == 1 and os.path.isfile(prefix + '-0001.params')


def test_cli_trains_on_two_contexts(data_dir, tmp_path):
    """train/train.py end to end: demo preset, 2 CPU contexts, log lines, checkpoint, latest, mxboard."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'train', 'train.py'),
                           '--network', 'demo', '--loss', 'nsoftmax', '--dataset', 'demo', '--data-dir', data_dir,
                           '--val-targets', 'lfw', '--models-root', str(tmp_path), '--ctx', 'cpu:2',
                           '--per-batch-size', '8', '--max-steps', '4', '--verbose', '4', '--frequent', '2',
                           '--ckpt', '2', '--num-workers', '0', '--lr-steps', '2', '--warmup', '0'],
                          capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert 'Epoch[0] Batch[2] Speed: ' in out and ' loss=' in out and ' acc=' in out and ' lr=0.1' in out
    assert 'Epoch[0] Batch[4] Speed: ' in out and ' lr=0.01' in out
    assert '[lfw][4]XNorm: ' in out and '[lfw][4]Accuracy-Flip: ' in out
    run = tmp_path / 'demo-nsoftmax-demo'
    assert checkpoint.read_latest(str(run)) == (str(run / 'model'), 1)
    assert (run / 'model-0001.params').is_file() and (run / 'model-symbol.json').is_file()
    assert any(f.startswith('events.out.tfevents') for f in os.listdir(run / 'logs'))


def test_nan_loss_stops_naming_the_step(data_dir, tmp_path):
    """A diverging lr: the run stops with the step in the message and writes nothing."""
    sess = session(make_opts(data_dir, tmp_path, max_steps=5, lr=1e30, verbose=1000))
    with pytest.raises(TrainingDiverged, match=r'step \d+: loss is (nan|inf)'):
        sess.run()
    assert not [f for f in os.listdir(sess.run_dir) if f.endswith(('.params', '.json', '.states'))]


def test_nan_after_a_checkpoint_keeps_the_good_state(data_dir, tmp_path):
    sess = session(make_opts(data_dir, tmp_path, max_steps=5, verbose=2, ckpt=2))
    original = sess._forward_backward

    def nan_at_step_3(data, label):
        loss, correct = original(data, label)
        return (float('nan') if sess.step == 2 else loss), correct

    sess._forward_backward = nan_at_step_3
    with pytest.raises(TrainingDiverged, match=r'step 3: loss is nan.*model-resume\.json'):
        sess.run()
    assert sorted(f for f in os.listdir(sess.run_dir) if f.startswith('model-0')) == ['model-0001.params']
    resumed = session(make_opts(data_dir, tmp_path, max_steps=5, verbose=2, ckpt=2, resume=True))
    assert resumed.step == 2


def test_missing_rec_and_bin_are_clear_errors(data_dir, tmp_path):
    with pytest.raises(UserError, match=r'train\.rec: training rec not found'):
        session(make_opts(str(tmp_path / 'nothing'), tmp_path))
    with pytest.raises(UserError, match=r'agedb_30\.bin: verification target'):
        session(make_opts(data_dir, tmp_path, val_targets=['lfw', 'agedb_30']))


def test_sigterm_saves_resume_state(data_dir, tmp_path):
    sess = session(make_opts(data_dir, tmp_path, max_steps=50))
    original = sess._forward_backward

    def step_then_signal(data, label):
        if sess.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(data, label)

    sess._forward_backward = step_then_signal
    result = sess.run()
    assert result['interrupted'] == signal.SIGTERM and result['step'] == 3
    resumed = session(make_opts(data_dir, tmp_path, max_steps=50, resume=True))
    assert resumed.step == 3


def _snapshot(sess):
    return {n: p.list_data()[0].asnumpy().copy() for n, p in sess.params.items()}


@pytest.mark.parametrize('block', [1, 2])
def test_freeze_block(data_dir, tmp_path, block):
    """--freeze-block 1: only fc7 moves, BN statistics too stay; 2: frozen up to bn1, pre_fc1/fc1 train."""
    sess = session(make_opts(data_dir, tmp_path, max_steps=3, freeze_block=block))
    before = _snapshot(sess)
    sess.run()
    after = _snapshot(sess)
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert 'fc7_weight' in changed
    assert 'bn0_moving_mean' not in changed and 'conv0_weight' not in changed and 'bn1_moving_var' not in changed
    if block == 1:
        assert changed == {'fc7_weight'}
    else:
        assert {'pre_fc1_weight', 'fc1_beta', 'fc1_moving_mean'} <= changed
        assert all(n.startswith(('fc7', 'pre_fc1', 'fc1_')) for n in changed)
