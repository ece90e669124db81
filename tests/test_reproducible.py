"""Same seed, same machine => the same bits, through `train/train.py` with every augmentation on.

Straight runs with 0 and 2 loader workers, two runs on 2 contexts, and a run stopped by SIGTERM and
resumed (with another worker count) end with bit-identical parameters; another seed does not.
"""
import json
import os
import signal
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

from test_train import ROOT, build_dataset

STEPS = 30   # 256 images in batches of 16: the runs cross an epoch boundary at step 16


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return build_dataset(str(tmp_path_factory.mktemp('faces')))


def command(data_dir, root, *extra):
    return [sys.executable, os.path.join(ROOT, 'train', 'train.py'), '--network', 'demo', '--loss', 'nsoftmax',
            '--dataset', 'demo', '--data-dir', data_dir, '--val-targets', '', '--models-root', str(root),
            '--per-batch-size', '16', '--max-steps', str(STEPS), '--verbose', str(STEPS), '--frequent', '2',
            '--ckpt', '2', '--lr-steps', '20', '--warmup', '0', '--data-color', '2', '--data-cutoff', '12',
            '--emb-size', '32', *extra]


def train(data_dir, root, *extra):
    proc = subprocess.run(command(data_dir, root, *extra), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return final_params(root)


def final_params(root):
    arrays = mx.nd.load(os.path.join(str(root), 'demo-nsoftmax-demo', 'model-0001.params'))
    return {k: v.asnumpy() for k, v in arrays.items()}


def assert_same_bits(a, b):
    assert sorted(a) == sorted(b)
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, f'{len(different)} of {len(a)} tensors differ: {different[:5]}'


def test_straight_runs_are_bit_identical_whatever_the_loader_workers(data_dir, tmp_path):
    base = train(data_dir, tmp_path / 'w0', '--num-workers', '0')
    assert_same_bits(base, train(data_dir, tmp_path / 'w0b', '--num-workers', '0'))
    assert_same_bits(base, train(data_dir, tmp_path / 'w2', '--num-workers', '2'))
    other = train(data_dir, tmp_path / 'seed1', '--num-workers', '0', '--seed', '1')
    assert not np.array_equal(other['arg:fc7_weight'], base['arg:fc7_weight'])


def test_two_context_runs_are_bit_identical(data_dir, tmp_path):
    args = ('--ctx', 'cpu:2', '--per-batch-size', '8', '--num-workers', '2')
    assert_same_bits(train(data_dir, tmp_path / 'a', *args), train(data_dir, tmp_path / 'b', *args))


def test_sigterm_then_resume_equals_the_straight_run(data_dir, tmp_path):
    straight = train(data_dir, tmp_path / 'straight', '--num-workers', '0')
    root = tmp_path / 'stopped'
    proc = subprocess.Popen(command(data_dir, root, '--num-workers', '2'), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if 'Batch[4]' in line:   # mid-epoch, well before the end
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, out[-2000:]
    stopped_at = int(out.split('SIGTERM at step ')[1].split(':')[0])
    assert 4 <= stopped_at < STEPS
    assert_same_bits(straight, train(data_dir, root, '--num-workers', '0', '--resume'))


def test_resume_with_another_thread_count_is_warned(data_dir, tmp_path):
    """MKLDNN's results depend on OMP_NUM_THREADS on some machines (docs/reproducibility.md): the snapshot
    records it and a resume with another count says that it will not be bit-identical."""
    def run(threads, steps, *extra):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        cmd = command(data_dir, tmp_path, '--num-workers', '0', *extra, '--max-steps', str(steps))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout + proc.stderr

    run('1', 4)
    assert 'saved with OMP_NUM_THREADS=1, this run has 2' in run('2', 6, '--resume')
    assert 'OMP_NUM_THREADS' not in run('2', 8, '--resume')
    assert json.loads((tmp_path / 'demo-nsoftmax-demo' / 'model-resume.json').read_text())['step'] == 8
