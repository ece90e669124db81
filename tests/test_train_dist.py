"""Training on MXNet's parameter server (dist_sync) over loopback, against one process.

Two workers (1 CPU context, 4 images each) and one server must end with identical parameters, equal
(within 1e-4 of each tensor's scale) to one process with 2 CPU contexts of 4 images: the same global
batch of 8, and the same 8 samples per step because each worker takes a strided half of every epoch's
order. The network keeps BatchNorm on running statistics so per-device batch statistics cannot differ.
A distributed run stopped at step 4 and resumed to step 8 must reach the same parameters: the momentum
is restored (dropping it moves the result by far more than the tolerance).
"""
import os
import sys
import textwrap

import numpy as np
import pytest

from recognition.data.dataset import EpochSampler
from recognition.distributed import free_port, launch
from recognition.training.kvstore import Topology
from recognition.training.loop import training_recs
from recognition.utils import UserError

from test_distributed import _job_processes, _port_free
from test_train import build_dataset

TESTS = os.path.dirname(os.path.abspath(__file__))

WORKER = textwrap.dedent('''
    import os, sys
    import mxnet as mx
    import numpy as np
    from recognition.losses import build_head
    from recognition.training import TrainingSession
    from test_train import TinyNet, make_opts

    data_dir, out, kvstore, ctx, max_steps, resume = sys.argv[1:7]
    opts = make_opts(data_dir, os.path.join(out, 'models'), kvstore=kvstore, ctx=ctx, per_batch_size=4,
                     max_steps=int(max_steps), lr=0.01, lr_steps='6', warmup=2, verbose=1000, ckpt=0,
                     val_targets=[], resume=resume == 'resume')
    session = TrainingSession(opts, net=TinyNet(global_stats=True), head=build_head('nsoftmax', 8, 32, s=16.0))

    def fixed_loss():
        """Mean loss on the same 8 training images (one per identity), before and after training."""
        idx = [session.dataset.id2range[i][0] for i in range(8)]
        x = mx.nd.array(np.stack([session.dataset[i][0] for i in idx]))
        y = mx.nd.array([session.dataset.labels[i] for i in idx])
        out = session.head(session.net(x), y)
        return float(mx.gluon.loss.SoftmaxCrossEntropyLoss()(out, y).mean().asscalar())

    before = fixed_loss()
    summary = session.run()
    after = fixed_loss()
    rank = session.topology.rank
    params = {n: p.list_data()[0].asnumpy() for n, p in session.params.items()}
    np.savez(os.path.join(out, 'params_%s_rank%d.npz' % (kvstore, rank)), **params)
    np.save(os.path.join(out, 'losses_%s_rank%d.npy' % (kvstore, rank)), np.array([before, after]))
    print('rank', rank, 'of', session.topology.num_workers, 'steps', summary['step'])
''')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    # 8 identities x 4 images: two epochs in 8 steps of 8, so the loss visibly falls.
    return build_dataset(str(tmp_path_factory.mktemp('faces')), train_ids=8, per_id=4, val_ids=4, pairs=8)


def _launch_dist(script, data_dir, out, max_steps, resume, capfd):
    port = free_port()
    launch([sys.executable, str(script), data_dir, str(out), 'dist_sync', 'cpu:1', str(max_steps), resume],
           2, 1, port=port, timeout=240)
    log = capfd.readouterr().out
    assert '[worker 0] rank' in log and '[worker 1] rank' in log and f'of 2 steps {max_steps}' in log
    assert _job_processes(port) == [] and _port_free(port)
    w0, w1 = np.load(out / 'params_dist_sync_rank0.npz'), np.load(out / 'params_dist_sync_rank1.npz')
    for name in w0.files:
        np.testing.assert_array_equal(w0[name], w1[name], err_msg=name)
    return w0


def _assert_close(got, want):
    assert set(got.files) == set(want.files)
    for name in want.files:
        scale = max(float(np.abs(want[name]).max()), 1e-3)
        error = np.abs(got[name] - want[name]).max() / scale
        assert error <= 1e-4, (name, error)


def test_dist_sync_matches_one_process_and_resumes(data_dir, tmp_path, monkeypatch, capfd):
    script = tmp_path / 'worker.py'
    script.write_text(WORKER)
    monkeypatch.setenv('PYTHONPATH', TESTS + os.pathsep + os.environ.get('PYTHONPATH', ''))
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    import subprocess
    subprocess.run([sys.executable, str(script), data_dir, str(tmp_path), 'device', 'cpu:2', '8', 'new'],
                   check=True, env=dict(os.environ))
    one = np.load(tmp_path / 'params_device_rank0.npz')

    straight = tmp_path / 'straight'
    _assert_close(_launch_dist(script, data_dir, straight, 8, 'new', capfd), one)
    # The loss on a fixed set of training images fell on both workers.
    for rank in (0, 1):
        before, after = np.load(straight / f'losses_dist_sync_rank{rank}.npy')
        assert after < 0.8 * before, (before, after)

    resumed = tmp_path / 'resumed'
    _launch_dist(script, data_dir, resumed, 4, 'new', capfd)
    _assert_close(_launch_dist(script, data_dir, resumed, 8, 'resume', capfd), one)


def write_train_rec(folder):
    """16 synthetic identities x 8 aligned 112x112 faces as `folder/train.rec` (the demo net's input)."""
    import cv2
    from recognition.data import synthetic
    from recognition.data.record import IdentityRecordWriter
    rng = np.random.default_rng(0)
    with IdentityRecordWriter(os.path.join(folder, 'train')) as writer:
        for i in range(16):
            ident = synthetic.sample_identity(rng, i % 2, (i // 2) % 2, i)
            writer.add_identity(i, [(cv2.imencode('.jpg', synthetic.render_aligned(
                ident, synthetic.sample_variation(ident, rng))[0])[1].tobytes(), 1, None) for _ in range(8)])


def train_command(data_dir, models_root, max_steps, *extra):
    """train/train.py with dist_sync on the demo net, 16 images per worker, no verification."""
    return [sys.executable, os.path.join(os.path.dirname(TESTS), 'train', 'train.py'), '--network', 'demo',
            '--loss', 'nsoftmax', '--dataset', 'demo', '--data-dir', str(data_dir), '--val-targets', '',
            '--models-root', str(models_root), '--max-steps', str(max_steps), '--per-batch-size', '16',
            '--ctx', 'cpu:1', '--kvstore', 'dist_sync', '--ckpt', '0', '--num-workers', '0', '--verbose',
            '100', *extra]


def test_cli_workers_exit_cleanly(tmp_path, monkeypatch):
    """train/train.py under the launcher: the non-chief worker, which saves nothing, must still send its
    last gradients before exiting, or the chief waits for them forever (MXNet drops queued work at exit).
    Before the fix this set-up (the demo net at 112x112, 16 per worker, 8 steps) hung every time."""
    write_train_rec(str(tmp_path))
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    port = free_port()
    launch(train_command(tmp_path, tmp_path / 'models', 8), 2, 1, port=port, timeout=120)
    assert _job_processes(port) == [] and _port_free(port)
    assert os.path.isfile(tmp_path / 'models' / 'demo-nsoftmax-demo' / 'model-resume.json')


def test_dist_async_trains_and_resumes(data_dir, tmp_path, monkeypatch, capfd):
    """dist_async updates on the servers: the optimizer (with its gradient scale and schedule) is sent there
    before the first step, training runs, and a resume says the momentum restarts."""
    script = tmp_path / 'worker.py'
    script.write_text(WORKER)
    monkeypatch.setenv('PYTHONPATH', TESTS + os.pathsep + os.environ.get('PYTHONPATH', ''))
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    for steps, mode in ((3, 'new'), (6, 'resume')):
        port = free_port()
        launch([sys.executable, str(script), data_dir, str(tmp_path), 'dist_async', 'cpu:1', str(steps), mode],
               2, 1, port=port, timeout=240)
        log = capfd.readouterr()
        assert log.out.count(f'of 2 steps {steps}') == 2
        assert _job_processes(port) == [] and _port_free(port)
    assert 'the momentum restarts' in log.out + log.err
    for rank in (0, 1):
        params = np.load(tmp_path / f'params_dist_async_rank{rank}.npz')
        assert all(np.isfinite(params[n]).all() for n in params.files)


def test_strided_partition_is_disjoint_and_even():
    indices = np.arange(103)
    parts = [EpochSampler(indices, seed=5, part=(r, 2)) for r in range(2)]
    for p in parts:
        p.set_epoch(3)
    a, b = (list(iter(p)) for p in parts)
    assert len(a) == len(b) == 51 and not set(a) & set(b)
    whole = EpochSampler(indices, seed=5).order(3)
    assert sorted(a + b) == sorted(whole[:102].tolist())
    assert len(parts[0]) == 51


def test_shards_are_read_whole_per_rank(tmp_path):
    for i in (2, 0, 10, 1):
        (tmp_path / f'train_{i}.rec').write_bytes(b'')
    recs = [os.path.basename(p) for p in training_recs(str(tmp_path), 'demo')]
    assert recs == ['train_0.rec', 'train_1.rec', 'train_2.rec', 'train_10.rec']
    assert Topology([], 'dist_sync', rank=1, num_workers=2, name='dist_sync').shard_plan(4) == [1, 3]
    # Fewer shards than workers: every worker opens all and takes a strided part of the samples.
    assert Topology([], 'dist_sync', rank=1, num_workers=3, name='dist_sync').shard_plan(2) is None
    assert Topology([], 'device').shard_plan(4) is None
    with pytest.raises(UserError, match='training rec not found'):
        training_recs(str(tmp_path / 'missing'), 'demo')


def test_synchronous_runs_update_on_the_workers():
    for name in ('dist_sync', 'dist_device_sync'):
        topology = Topology([], name, name=name)
        assert topology.update_on_kvstore is False and not topology.server_updates
    # MXNet requires dist_async to update on the servers.
    assert Topology([], 'dist_async', name='dist_async').server_updates
    assert Topology([], 'device').update_on_kvstore is None and not Topology([], 'device').server_updates
