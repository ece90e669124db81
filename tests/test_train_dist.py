"""Training on MXNet's parameter server (dist_sync) over loopback, against one process.

Two workers (1 CPU context, 4 images each) and one server must end with identical parameters, equal
(within 1e-4 of each tensor's scale) to one process with 2 CPU contexts of 4 images: the same global
batch of 8, and the same 8 samples per step because each worker takes a strided half of every epoch's
order. The network keeps BatchNorm on running statistics so per-device batch statistics cannot differ.
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

    data_dir, out, kvstore, ctx = sys.argv[1:5]
    opts = make_opts(data_dir, os.path.join(out, 'models'), kvstore=kvstore, ctx=ctx, per_batch_size=4,
                     max_steps=8, lr=0.01, lr_steps='6', warmup=2, verbose=1000, ckpt=0, val_targets=[])
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


def test_dist_sync_matches_one_process(data_dir, tmp_path, monkeypatch, capfd):
    script = tmp_path / 'worker.py'
    script.write_text(WORKER)
    monkeypatch.setenv('PYTHONPATH', TESTS + os.pathsep + os.environ.get('PYTHONPATH', ''))
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    port = free_port()
    launch([sys.executable, str(script), data_dir, str(tmp_path), 'dist_sync', 'cpu:1'], 2, 1, port=port,
           timeout=240)
    out = capfd.readouterr().out
    assert '[worker 0] rank' in out and '[worker 1] rank' in out and 'of 2 steps 8' in out
    assert _job_processes(port) == [] and _port_free(port)

    import subprocess
    subprocess.run([sys.executable, str(script), data_dir, str(tmp_path), 'device', 'cpu:2'], check=True,
                   env=dict(os.environ))
    w0 = np.load(tmp_path / 'params_dist_sync_rank0.npz')
    w1 = np.load(tmp_path / 'params_dist_sync_rank1.npz')
    one = np.load(tmp_path / 'params_device_rank0.npz')
    assert set(w0.files) == set(one.files)
    for name in one.files:
        np.testing.assert_array_equal(w0[name], w1[name], err_msg=name)
        scale = max(float(np.abs(one[name]).max()), 1e-3)
        assert np.abs(w0[name] - one[name]).max() <= 1e-4 * scale, name
    # The same warmup and step decay reached the servers (they update there): equal to one process.
    # The loss on a fixed set of training images fell on both workers.
    for rank in (0, 1):
        before, after = np.load(tmp_path / f'losses_dist_sync_rank{rank}.npy')
        assert after < 0.8 * before, (before, after)


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


def test_distributed_runs_update_on_the_servers():
    for name in ('dist_sync', 'dist_device_sync', 'dist_async'):
        assert Topology([], name, name=name).update_on_kvstore is True
    assert Topology([], 'device').update_on_kvstore is None
