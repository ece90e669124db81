"""Faults around run folders and checkpoints, through the CLIs: crafted or truncated resume files, two
runs on one folder, stale locks, a full disk, broken checkpoints, predict.py's template problems and
--gpus on the CPU build. Each checks the exit code, the one-line message naming the file, and that the
previous outputs are byte-identical with no temporary or orphaned files left.

Data: test_train's tiny synthetic rec (40x40 faces, 64 identities) and lfw.bin.
"""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import cv2
import mxnet as mx
import numpy as np
import pytest

from recognition import checkpoint
from recognition.locking import LOCK_NAME, folder_lock
from recognition.utils import UserError, atomic_open, atomic_path
from test_inference import make_checkpoint
from test_predict import PREDICT, load_cli, smooth_face
from test_train import build_dataset, make_opts, params_of, session

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, 'train', 'train.py')
EXTRACT = os.path.join(ROOT, 'test', 'extract_features.py')
RUN = 'demo-nsoftmax-demo'
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}


def train_cmd(data_dir, models_root, *extra, steps=2, ctx=('--ctx', 'cpu:1')):
    return [sys.executable, TRAIN, '--network', 'demo', '--loss', 'nsoftmax', '--dataset', 'demo',
            '--data-dir', data_dir, '--val-targets', 'lfw', '--models-root', str(models_root), *ctx,
            '--per-batch-size', '16', '--max-steps', str(steps), '--verbose', '2', '--frequent', '100',
            '--ckpt', '2', '--num-workers', '0', '--lr-steps', '', '--emb-size', '32', *extra]


def run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)


def one_error_line(proc, *words):
    """The process failed with exit 2, no traceback, and one stderr line `error: ...` (its last) that
    contains `words` (MXNet's engine log line and warnings aside)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and 'engine.cc' not in line]
    errors = [line for line in lines if line.startswith('error: ')]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def folder_bytes(folder):
    """{relative path: bytes} of every file under `folder` (the lock and logs included)."""
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            with open(path, 'rb') as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def assert_unchanged(before, folder):
    """Every file of `before` byte-identical in `folder` and no file added, but for the logs: train.log
    only appended to, and mxboard's event files under logs/."""
    after = folder_bytes(folder)

    def outputs(files):
        return {k: v for k, v in files.items() if k != 'train.log' and not k.startswith('logs' + os.sep)}
    assert outputs(after) == outputs(before)
    assert after['train.log'].startswith(before['train.log'])


def no_temporaries(folder):
    return [p for p in folder_bytes(folder) if p.endswith('.tmp') or LOCK_NAME in p]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return build_dataset(str(tmp_path_factory.mktemp('faces')))


@pytest.fixture(scope='module')
def base_run(data_dir, tmp_path_factory):
    """A 2-step CLI run: model-0001 checkpoint and a resume snapshot at step 2."""
    root = tmp_path_factory.mktemp('base')
    proc = run(train_cmd(data_dir, root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / RUN


def copy_run(base_run, models_root):
    shutil.copytree(base_run, models_root / RUN)
    return models_root / RUN


def test_resume_state_holds_no_pickle(base_run):
    """The optimizer state is an NDArray file (momentum per parameter index) plus JSON scalars."""
    record = json.loads((base_run / 'model-resume.json').read_text())
    states = base_run / record['states']
    assert states.name == 'model-resume-00000002.states'
    assert states.read_bytes()[:1] != b'\x80'   # pickle protocol 2+ starts so
    arrays = mx.nd.load(str(states))
    opt = record['optimizer']
    assert opt['format'] == checkpoint.OPTIMIZER_FORMAT and opt['num_update'] == 2 and opt['momentum'] == 0.9
    assert len(opt['updaters']) == 1 and len(arrays) == len(opt['params']) == len(opt['updaters'][0])
    assert all(float(np.abs(a.asnumpy()).max()) > 0 for a in arrays.values())   # momentum after 2 steps


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def test_crafted_pickled_states_is_refused(base_run, data_dir, tmp_path):
    run_dir = copy_run(base_run, tmp_path)
    marker = tmp_path / 'pwned'
    states = run_dir / 'model-resume-00000002.states'
    states.write_bytes(pickle.dumps({0: Exploit(str(marker))}))
    before = folder_bytes(run_dir)
    proc = run(train_cmd(data_dir, tmp_path, '--resume', steps=4))
    one_error_line(proc, str(states), 'pickle')
    assert not marker.exists()
    assert_unchanged(before, run_dir)
    # An old snapshot (MXNet's pickled save_states, no "optimizer" record) is refused the same way.
    record = json.loads((run_dir / 'model-resume.json').read_text())
    del record['optimizer']
    (run_dir / 'model-resume.json').write_text(json.dumps(record))
    proc = run(train_cmd(data_dir, tmp_path, '--resume', steps=4))
    one_error_line(proc, str(states), 'old or unknown format')
    assert not marker.exists()


def test_truncated_states_names_the_file(base_run, data_dir, tmp_path):
    run_dir = copy_run(base_run, tmp_path)
    states = run_dir / 'model-resume-00000002.states'
    states.write_bytes(states.read_bytes()[:1000])
    before = folder_bytes(run_dir)
    one_error_line(run(train_cmd(data_dir, tmp_path, '--resume', steps=4)), str(states), 'Invalid NDArray file')
    assert_unchanged(before, run_dir)


def test_malformed_or_mismatched_optimizer_record(base_run, tmp_path):
    run_dir = copy_run(base_run, tmp_path)
    resume = run_dir / 'model-resume.json'
    record = json.loads(resume.read_text())
    broken = dict(record, optimizer={k: v for k, v in record['optimizer'].items() if k != 'num_update'})
    resume.write_text(json.dumps(broken))
    with pytest.raises(UserError, match=rf'^{resume}: malformed "optimizer" record \(no valid num_update\)$'):
        checkpoint.load_resume(str(run_dir / 'model'), {})
    named = dict(record, optimizer=dict(record['optimizer'], updaters=[[[0, '0:999']]]))
    resume.write_text(json.dumps(named))
    with pytest.raises(UserError, match=r'model-resume-00000002\.states: lacks the array 0:999 that '):
        checkpoint.load_resume(str(run_dir / 'model'), {})


@pytest.mark.parametrize('ctx, on_kvstore, updaters', [('cpu:1', '1', 1), ('cpu:2', '1', 1), ('cpu:2', '0', 2)])
def test_resume_is_bit_identical(data_dir, tmp_path, monkeypatch, ctx, on_kvstore, updaters):
    """3 steps + resume 3 == 6 straight, to the bit, momentum included: on one context, on two with the
    kvstore updating, and on two with one Gluon updater per device (as dist_sync workers update)."""
    monkeypatch.setenv('MXNET_UPDATE_ON_KVSTORE', on_kvstore)
    per = 16 if ctx == 'cpu:1' else 8
    mx.random.seed(1)
    straight = session(make_opts(data_dir, tmp_path / 's', max_steps=6, ctx=ctx, per_batch_size=per))
    init = params_of(straight)
    straight.run()
    first = session(make_opts(data_dir, tmp_path / 'r', max_steps=3, ctx=ctx, per_batch_size=per))
    for name, p in first.params.items():
        p.set_data(mx.nd.array(init[name]))
    first.run()
    resumed = session(make_opts(data_dir, tmp_path / 'r', max_steps=6, ctx=ctx, per_batch_size=per, resume=True))
    assert resumed.step == 3
    resumed.run()
    a, b = params_of(straight), params_of(resumed)
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    want, meta = checkpoint.optimizer_state(straight.trainer)
    got, _ = checkpoint.optimizer_state(resumed.trainer)
    assert len(meta['updaters']) == updaters and meta['num_update'] == 6
    assert sorted(want) == sorted(got) and want
    for key in want:
        np.testing.assert_array_equal(got[key].asnumpy(), want[key].asnumpy(), err_msg=key)


def test_snapshot_before_the_first_step_resumes(data_dir, tmp_path):
    """A run stopped before any update saves an optimizer without state; resuming it starts cleanly."""
    first = session(make_opts(data_dir, tmp_path, max_steps=2))
    first.save_resume()
    first.close()
    assert mx.nd.load(os.path.join(first.run_dir, 'model-resume-00000000.states')) == []
    resumed = session(make_opts(data_dir, tmp_path, max_steps=2, resume=True))
    assert resumed.step == 0
    assert resumed.run()['step'] == 2


def test_second_run_on_one_folder_is_refused(base_run, data_dir, tmp_path):
    """The first run is paused while holding the lock; the second is refused and the first finishes."""
    first = subprocess.Popen(train_cmd(data_dir, tmp_path, steps=4), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV)
    lock = tmp_path / RUN / LOCK_NAME
    deadline = time.time() + 120
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert lock.exists(), 'the first run never took the lock'
    first.send_signal(signal.SIGSTOP)
    try:
        log_before = (tmp_path / RUN / 'train.log').read_bytes() if (tmp_path / RUN / 'train.log').exists() else b''
        second = run(train_cmd(data_dir, tmp_path, steps=2))
        line = one_error_line(second, str(tmp_path / RUN), 'in use by another training run', f'pid {first.pid}')
        assert 'train.py' in line
        log_after = (tmp_path / RUN / 'train.log').read_bytes() if (tmp_path / RUN / 'train.log').exists() else b''
        assert log_after == log_before
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert json.loads((tmp_path / RUN / 'model-resume.json').read_text())['step'] == 4
    assert sorted(f for f in os.listdir(tmp_path / RUN) if 'resume-' in f) == [
        'model-resume-00000004.params', 'model-resume-00000004.states']
    assert not lock.exists()


def test_stale_lock_is_taken_over(base_run, data_dir, tmp_path):
    """A lock left by a killed run (dead PID on this host) does not block: the resumed run continues."""
    run_dir = copy_run(base_run, tmp_path)
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    import socket
    (run_dir / LOCK_NAME).write_text(json.dumps({'host': socket.gethostname(), 'pid': dead.pid,
                                                 'command': 'train/train.py (killed)'}))
    proc = run(train_cmd(data_dir, tmp_path, '--resume', steps=4))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / 'model-resume.json').read_text())['step'] == 4
    assert not (run_dir / LOCK_NAME).exists()


def test_lock_of_a_live_process_and_release(tmp_path):
    with folder_lock(str(tmp_path), 'test') as lock:
        owner = json.loads(open(lock).read())
        assert owner['pid'] == os.getpid()
        with pytest.raises(UserError, match=rf'in use by another test \(pid {os.getpid()} '):
            with folder_lock(str(tmp_path), 'test'):
                pass
        assert os.path.exists(lock)
    assert not os.path.exists(lock)
    with pytest.raises(RuntimeError):
        with folder_lock(str(tmp_path), 'test'):
            raise RuntimeError('boom')
    assert not os.path.exists(lock)


def test_pruning_tolerates_a_vanished_snapshot(tmp_path, monkeypatch):
    """Another process removed an old snapshot file between the listing and the removal."""
    prefix = str(tmp_path / 'model')
    param = mx.gluon.Parameter('w', shape=(2,))
    param.initialize()
    for name in ('model-resume-00000001.params', 'model-resume-00000001.states'):
        (tmp_path / name).write_bytes(b'old')
    real_glob = checkpoint.glob.glob
    monkeypatch.setattr(checkpoint.glob, 'glob',
                        lambda pattern: real_glob(pattern) + [str(tmp_path / 'model-resume-00000000.states')])
    checkpoint.save_resume(prefix, {'w': param}, None, {'step': 2})
    assert sorted(os.listdir(tmp_path)) == ['model-resume-00000002.params', 'model-resume.json']


def test_failed_snapshot_leaves_no_orphan(tmp_path, monkeypatch):
    """The disk fills while the optimizer state is written: the new parameter file goes too, and the
    previous snapshot is byte-identical."""
    param = mx.gluon.Parameter('w', shape=(3,))
    param.initialize(mx.init.One())
    trainer = mx.gluon.Trainer({'w': param}, 'sgd', {'learning_rate': 0.1, 'momentum': 0.9})
    with mx.autograd.record():
        loss = (param.data() * 2).sum()
    loss.backward()
    trainer.step(1)
    prefix = str(tmp_path / 'model')
    checkpoint.save_resume(prefix, {'w': param}, trainer, {'step': 1})
    before = folder_bytes(tmp_path)
    real_save = mx.nd.save

    def full_at_states(path, data):
        if '.states' in path:
            raise mx.base.MXNetError('FileStream.Write incomplete')
        real_save(path, data)
    monkeypatch.setattr(checkpoint.mx.nd, 'save', full_at_states)
    with pytest.raises(UserError, match=r'model-resume-00000002\.states: disk full'):
        checkpoint.save_resume(prefix, {'w': param}, trainer, {'step': 2})
    assert folder_bytes(tmp_path) == before


@pytest.fixture
def tiny_disk(tmp_path):
    """A 16 MB tmpfs (root only); skipped where mounting is not allowed."""
    mount = tmp_path / 'disk'
    mount.mkdir()
    proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=16m', 'tmpfs', str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here ({proc.stderr.decode().strip() or proc.returncode})')
    try:
        yield mount
    finally:
        subprocess.run(['umount', '-l', str(mount)], check=False)


def fill(folder, leave):
    """Fill the file system of `folder` up to `leave` free bytes."""
    free = shutil.disk_usage(folder).free
    with open(os.path.join(folder, 'filler'), 'wb') as f:
        f.write(b'\0' * max(0, free - leave))


def test_disk_full_keeps_the_previous_snapshot(base_run, data_dir, tiny_disk):
    run_dir = copy_run(base_run, tiny_disk)
    fill(tiny_disk, 300_000)   # far less than one snapshot of the demo net
    before = folder_bytes(run_dir)
    proc = run(train_cmd(data_dir, tiny_disk, '--resume', steps=4))
    line = one_error_line(proc, 'not enough free space', 'MB needed', str(run_dir))
    assert line.count('.params') == 1
    assert_unchanged(before, run_dir)
    assert not no_temporaries(run_dir)


def test_disk_full_while_writing_is_one_line_and_leaves_nothing(tiny_disk):
    """Python's ENOSPC and MXNet's 'FileStream.Write incomplete' both become one line naming the file."""
    fill(tiny_disk, 100_000)
    out = tiny_disk / 'big.bin'
    with pytest.raises(UserError, match=rf'^{out}: disk full \(needs more than the \d+ KB that were free'):
        with atomic_open(str(out), 'wb') as f:
            f.write(b'x' * 1_000_000)
    params = tiny_disk / 'big.params'
    with pytest.raises(UserError, match=rf'^{params}: disk full \(needs more than the \d+ KB that were free'):
        with atomic_path(str(params)) as tmp:
            mx.nd.save(tmp, {'w': mx.nd.ones((1000, 1000))})
    assert sorted(os.listdir(tiny_disk)) == ['filler']


def test_extract_features_on_a_full_disk(tiny_disk, tmp_path):
    model = tmp_path / 'm'
    model.mkdir()
    make_checkpoint(str(model / 'model'), emb_size=8)
    (model / 'model.json').write_text(json.dumps({'prefix': 'model', 'epoch': 3}))
    images = tmp_path / 'crops'
    images.mkdir()
    for i in range(40):
        cv2.imwrite(str(images / f'{i}.png'), smooth_face(i))
    out = tiny_disk / 'features'
    out.mkdir()
    (out / 'index.txt').write_text('previous\n')
    fill(tiny_disk, 500)
    proc = run([sys.executable, EXTRACT, '--images', str(images), '--models', str(model), '--out', str(out)])
    one_error_line(proc, str(out), 'disk full')
    assert sorted(os.listdir(out)) == ['index.txt'] and (out / 'index.txt').read_text() == 'previous\n'


def test_broken_checkpoint_names_the_right_file(tmp_path):
    prefix = str(tmp_path / 'model')
    make_checkpoint(prefix)
    sym_path, params_path = checkpoint.checkpoint_files(prefix, 3)
    good_params = open(params_path, 'rb').read()
    with open(params_path, 'wb') as f:
        f.write(good_params[:len(good_params) // 2])
    with pytest.raises(UserError) as e:
        checkpoint.load_checkpoint(prefix, 3)
    assert str(e.value).startswith(f'{params_path}: not a valid parameter file (Check failed')
    assert 'Invalid NDArray file format' in str(e.value) and '\n' not in str(e.value)
    with open(params_path, 'wb') as f:
        f.write(good_params)
    text = open(sym_path).read()
    with open(sym_path, 'w') as f:
        f.write(text[:len(text) // 2])
    with pytest.raises(UserError, match=rf'^{sym_path}: not a valid symbol file \(broken JSON: '):
        checkpoint.load_checkpoint(prefix, 3)
    with open(sym_path, 'w') as f:
        f.write('{"nodes": []}')
    with pytest.raises(UserError, match=rf'^{sym_path}: not a valid symbol file \(JSONReader: .*Missing field'):
        checkpoint.load_checkpoint(prefix, 3)


def test_broken_pretrained_through_the_cli(data_dir, tmp_path):
    prefix = str(tmp_path / 'model')
    make_checkpoint(prefix)
    params_path = checkpoint.checkpoint_files(prefix, 3)[1]
    with open(params_path, 'r+b') as f:
        f.truncate(200)
    proc = run(train_cmd(data_dir, tmp_path / 'models', '--pretrained', f'{prefix},3'))
    one_error_line(proc, params_path, 'Invalid NDArray file format')


@pytest.fixture
def predict_setup(tmp_path):
    model = tmp_path / 'models' / 'a_model'
    model.mkdir(parents=True)
    make_checkpoint(str(model / 'model'), emb_size=8)
    (model / 'model.json').write_text(json.dumps({'prefix': 'model', 'epoch': 3}))
    crops = tmp_path / 'crops'
    crops.mkdir()
    for tid in ('10', '11', '12'):
        cv2.imwrite(str(crops / f'{tid}.png'), smooth_face(int(tid)))
    return tmp_path, load_cli(PREDICT)


def test_predict_duplicate_rows_warn_and_keep_order(predict_setup, capsys):
    root, cli = predict_setup
    (root / 't.csv').write_text('TEMPLATE_ID1,TEMPLATE_ID2,SCORE\n10,11,\n11,12,\n10,11,\n11,10,\n')
    cli.main(['--images', str(root / 'crops'), '--already-aligned', '--template', str(root / 't.csv'),
              '--models', str(root / 'models'), '--out', str(root / 'out.csv')])
    assert "warning: " + str(root / 't.csv') + ": 2 duplicate pair rows" in capsys.readouterr().err
    rows = [line.split(',') for line in (root / 'out.csv').read_text().splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [('10', '11'), ('11', '12'), ('10', '11'), ('11', '10')]
    assert rows[0][2] == rows[2][2] == rows[3][2] != rows[1][2]


def test_predict_header_only_template(predict_setup):
    root, cli = predict_setup
    (root / 't.csv').write_text('TEMPLATE_ID1,TEMPLATE_ID2,SCORE\n')
    with pytest.raises(UserError, match=r't\.csv: no pairs \(only a header\)'):
        cli.main(['--images', str(root / 'crops'), '--already-aligned', '--template', str(root / 't.csv'),
                  '--models', str(root / 'models'), '--out', str(root / 'out.csv')])
    assert not (root / 'out.csv').exists()


def test_predict_photo_that_failed_alignment(predict_setup):
    """A photo that exists but cannot be aligned (here: not a decodable image) is named as such, with
    the alignment report, not as a template id without an image."""
    from recognition.align import template, transform_points
    root, cli = predict_setup
    photos = root / 'photos'
    photos.mkdir()
    lines = []
    for tid in ('20', '21'):
        M = cv2.getRotationMatrix2D((0, 0), 10, 1.5)
        M[:, 2] += (40, 30)
        cv2.imwrite(str(photos / f'{tid}.png'), cv2.warpAffine(smooth_face(int(tid)), M, (260, 240)))
        lines.append(f'{tid}.png ' + ' '.join(f'{v:.4f}' for v in transform_points(M, template(112)).ravel()))
    (root / 'landmarks.txt').write_text('\n'.join(lines) + '\n')
    (photos / '22.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
    (root / 't.csv').write_text('TEMPLATE_ID1,TEMPLATE_ID2,SCORE\n20,21,\n21,22,\n')
    out = root / 'out' / 'predictions.csv'
    args = ['--images', str(photos), '--landmarks', str(root / 'landmarks.txt'), '--template', str(root / 't.csv'),
            '--models', str(root / 'models'), '--out', str(out)]
    report = root / 'out' / 'aligned' / 'align_report.csv'
    with pytest.raises(UserError, match=rf'1 template ids whose photo failed alignment: 22\.jpg \(see {report};'):
        cli.main(args)
    assert not out.exists()


def test_gpus_on_the_cpu_build(data_dir, tmp_path):
    if mx.context.num_gpus() > 0:
        pytest.skip('this MXNet sees a GPU')
    proc = run(train_cmd(data_dir, tmp_path, '--gpus', '0', ctx=()))
    one_error_line(proc, '--gpus 0', f'mxnet {mx.__version__} is the CPU-only build',
                   'pip install -r requirements-cu112.txt')
    assert not (tmp_path / RUN).exists()
