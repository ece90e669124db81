"""Faults injected into the data tools through their CLIs: signals, a second packer, mixed shard sets,
disagreeing `property` files, unusable `.bin` sets, a bad `.idx`, a full disk.

Each case checks the exit status, a one-line message naming the file, that the previous outputs are
byte-identical and that no temporary file is left.
"""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from recognition.data.bin import write_bin
from recognition.data.lst import LstItem, write_lst
from recognition.data.shards import training_recs
from recognition.utils import UserError

from test_packer import make_faces

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACE2REC = os.path.join(ROOT, 'data_process', 'face2rec2.py')
TRAIN = os.path.join(ROOT, 'train', 'train.py')
VERIFY = os.path.join(ROOT, 'test', 'verification.py')
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)


def run(*args, cwd=None):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd)


def one_error_line(result):
    """The `error: ...` line of a failed CLI: exit status 2, no traceback, nothing else on stderr
    but log lines."""
    assert result.returncode == 2, result.stderr
    assert 'Traceback' not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1, result.stderr
    return errors[0]


def snapshot(folder):
    """{name: bytes} of every file in `folder` (the outputs that must survive a failed run)."""
    return {f: open(os.path.join(folder, f), 'rb').read() for f in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, f))}


def temps(folder):
    return [f for f in os.listdir(folder) if f.endswith('.tmp')]


def slow_lst(folder, identities=40, per_identity=10):
    """A .lst whose every line is one 1600x1600 JPEG to be resized and re-encoded (~25 ms each)."""
    rng = np.random.default_rng(0)
    img = cv2.resize((rng.random((60, 60, 3)) * 255).astype(np.uint8), (1600, 1600))
    cv2.imwrite(os.path.join(folder, 'big.jpg'), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    write_lst(os.path.join(folder, 'train.lst'),
              [LstItem(1, 'big.jpg', k) for k in range(identities) for _ in range(per_identity)])


def children(pid):
    """PIDs of the child processes of `pid` (Linux /proc)."""
    out = []
    for task in glob.glob(f'/proc/{pid}/task/*/children'):
        with open(task) as f:
            out += [int(p) for p in f.read().split()]
    return out


def running(pid):
    try:
        with open(f'/proc/{pid}/status') as f:
            return 'State:\tZ' not in f.read()
    except FileNotFoundError:
        return False


def wait_for(condition, timeout=60):
    end = time.time() + timeout
    while not condition():
        assert time.time() < end, 'timed out'
        time.sleep(0.01)


def start_slow_packer(folder, threads=2):
    """The packer on a slow list, returned once its worker processes run and its temporaries exist."""
    proc = subprocess.Popen([sys.executable, FACE2REC, os.path.join(folder, 'train'), '--num-thread', str(threads)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    workers = threads if threads > 1 else 0   # one thread encodes in the packer itself
    wait_for(lambda: (temps(folder) and len(children(proc.pid)) >= workers) or proc.poll() is not None)
    assert proc.poll() is None, proc.communicate()
    return proc, children(proc.pid)


@pytest.fixture
def packed(tmp_path):
    """A folder with a packed train.rec (5 identities) whose bytes are the previous outputs."""
    folder = str(tmp_path / 'data')
    os.makedirs(folder)
    make_faces(folder)
    assert run(FACE2REC, os.path.join(folder, 'train')).returncode == 0
    return folder


def test_sigterm_removes_temporaries_workers_and_lock(packed):
    before = snapshot(packed)
    slow_lst(packed)
    before['train.lst'] = open(os.path.join(packed, 'train.lst'), 'rb').read()
    before['big.jpg'] = open(os.path.join(packed, 'big.jpg'), 'rb').read()
    proc, workers = start_slow_packer(packed)
    assert os.path.isfile(os.path.join(packed, '.lock'))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM and err.strip().splitlines()[-1] == 'terminated', err
    assert 'Traceback' not in err
    wait_for(lambda: not any(running(w) for w in workers), timeout=10)
    assert temps(packed) == []
    assert snapshot(packed) == before   # no lock left, the old rec/idx/property byte-identical


def test_sigkill_leaves_temporaries_the_rerun_removes(packed, tmp_path):
    slow_lst(packed)
    proc, workers = start_slow_packer(packed)
    proc.kill()
    proc.wait()
    wait_for(lambda: not any(running(w) for w in workers), timeout=10)   # no orphan workers
    left = temps(packed)
    assert any(f.startswith('.train.rec.') for f in left)
    with open(os.path.join(packed, '.lock')) as f:
        assert json.load(f)['pid'] == proc.pid   # a stale lock: its process is dead

    reference = str(tmp_path / 'reference')   # the same list packed in a clean folder
    os.makedirs(reference)
    make_faces(reference)
    assert run(FACE2REC, os.path.join(reference, 'train')).returncode == 0
    shutil.copy(os.path.join(reference, 'train.lst'), os.path.join(packed, 'train.lst'))
    rerun = run(FACE2REC, os.path.join(packed, 'train'))
    assert rerun.returncode == 0, rerun.stderr
    assert 'removed %d temporary files of an interrupted run' % len(left) in rerun.stderr
    assert temps(packed) == [] and not os.path.exists(os.path.join(packed, '.lock'))
    for name in ('train.rec', 'train.idx', 'property'):
        assert open(os.path.join(packed, name), 'rb').read() == open(os.path.join(reference, name), 'rb').read()


def test_a_second_packer_on_the_prefix_is_refused(packed):
    slow_lst(packed)
    before = snapshot(packed)
    proc, _ = start_slow_packer(packed, threads=1)
    try:
        second = run(FACE2REC, os.path.join(packed, 'train'))
        line = one_error_line(second)
        assert line.startswith(f'error: {packed}: in use by another face2rec2 (pid {proc.pid} on ')
        assert os.path.join(packed, '.lock') in line
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert snapshot(packed) == before and temps(packed) == []


def shards_of(folder, identities, per_identity, seed):
    """Pack `identities` identities into 4 shards; {file name: bytes} of the shard files."""
    for d in glob.glob(os.path.join(folder, 'train', '*')):
        shutil.rmtree(d)
    make_faces(folder, identities=identities, per_identity=per_identity, seed=seed)
    result = run(FACE2REC, os.path.join(folder, 'train'), '--num-shards', 4)
    assert result.returncode == 0, result.stderr
    return {f: open(os.path.join(folder, f), 'rb').read() for f in os.listdir(folder) if f.startswith('train_')}


def train_cli(folder, *extra):
    return run(TRAIN, '--network', 'demo', '--loss', 'nsoftmax', '--dataset', 'demo', '--data-dir', folder,
               '--models-root', os.path.join(folder, 'models'), '--max-steps', 1, '--per-batch-size', 4,
               '--ctx', 'cpu:1', '--num-workers', 0, *extra)


def test_a_mixed_shard_generation_is_refused_by_name(tmp_path):
    folder = str(tmp_path)
    old = shards_of(folder, identities=40, per_identity=2, seed=1)   # shards hold ids 0-9, 10-19, 20-29, 30-39
    new = shards_of(folder, identities=20, per_identity=2, seed=2)   # ids 0-4, 5-9, 10-14, 15-19
    assert sorted(old) == sorted(new) and old['train_2.rec'] != new['train_2.rec']
    assert os.path.isfile(os.path.join(folder, 'train.shards.json'))
    assert [os.path.basename(p) for p in training_recs(folder, 'demo')] == ['train_%d.rec' % s for s in range(4)]
    # What a kill between the shard renames leaves: new shards 0-1 beside old shards 2-3.
    for name in ('train_2.rec', 'train_2.idx', 'train_3.rec', 'train_3.idx'):
        with open(os.path.join(folder, name), 'wb') as f:
            f.write(old[name])
    line = one_error_line(train_cli(folder, '--val-targets', ''))
    assert 'train_2.rec' in line and 'mixed shard set' in line
    assert not glob.glob(os.path.join(folder, 'models', '*', '*.params'))   # refused before training

    def put(files, names):
        for name in names:
            with open(os.path.join(folder, name), 'wb') as f:
                f.write(files[name])

    put(new, new)
    os.remove(os.path.join(folder, 'train_3.rec'))   # killed before the last rename
    with pytest.raises(UserError, match=r'train_3.rec: missing, but .*train.shards.json names it'):
        training_recs(folder, 'demo')
    # Without manifest (packed before it existed): identity ids must follow on from shard to shard.
    os.remove(os.path.join(folder, 'train.shards.json'))
    put(old, ['train_2.rec', 'train_2.idx', 'train_3.rec', 'train_3.idx'])
    with pytest.raises(UserError, match=r'train_2.rec: starts at identity 20, but .*train_1.rec ends at 9'):
        training_recs(folder, 'demo')
    put(new, new)
    assert len(training_recs(folder, 'demo')) == 4   # a consistent old-style set is accepted


def test_a_second_lst_with_another_property_is_refused(packed):
    before = snapshot(packed)
    write_lst(os.path.join(packed, 'val.lst'), [LstItem(1, 'train/p00/0.jpg', 0), LstItem(1, 'train/p01/0.jpg', 1)])
    line = one_error_line(run(FACE2REC, os.path.join(packed, 'val')))
    assert 'property: says 5,112,112 for train.rec' in line and 'val.lst needs 2,112,112' in line
    assert snapshot(packed) == dict(before, **{'val.lst': open(os.path.join(packed, 'val.lst'), 'rb').read()})
    assert temps(packed) == []
    # Re-packing the prefix that owns the folder replaces its own property.
    write_lst(os.path.join(packed, 'train.lst'), [LstItem(1, 'train/p00/0.jpg', 0), LstItem(1, 'train/p01/0.jpg', 1)])
    os.remove(os.path.join(packed, 'val.lst'))
    assert run(FACE2REC, os.path.join(packed, 'train')).returncode == 0
    assert open(os.path.join(packed, 'property')).read() == '2,112,112\n'


def test_a_property_that_disagrees_with_the_rec(tmp_path, caplog):
    folder = str(tmp_path)
    make_faces(folder, identities=40, per_identity=1)
    assert run(FACE2REC, os.path.join(folder, 'train')).returncode == 0
    prop = os.path.join(folder, 'property')
    assert open(prop).read() == '40,112,112\n'
    for text, message in (('5,112,112', 'says 5 classes, but .*train.rec holds identity ids up to 39'),
                          ('500,112,112', 'says 500 classes, but .*train.rec holds 40 identities')):
        with open(prop, 'w') as f:
            f.write(text + '\n')
        line = one_error_line(train_cli(folder, '--val-targets', ''))
        assert line.startswith(f'error: {prop}: ') and re.search(message, line), line
    with open(prop, 'w') as f:
        f.write('40,64,64\n')
    from recognition.data.dataset import FaceRecordDataset
    with caplog.at_level('WARNING'):
        dataset = FaceRecordDataset(os.path.join(folder, 'train.rec'))
    assert dataset.image_size == (112, 112) and dataset[0][0].shape == (3, 112, 112)
    assert 'says 64x64 images' in caplog.text and 'stores 112x112' in caplog.text


def jpeg(value):
    return cv2.imencode('.jpg', np.full((112, 112, 3), value, np.uint8))[1]


@pytest.mark.parametrize('pairs, message', [(0, '0 same-person and 0 different-person pairs'),
                                            (3, '2 same-person and 1 different-person pairs')])
def test_an_unusable_val_bin_is_refused_before_step_1(packed, pairs, message):
    issame = [p % 2 == 0 for p in range(pairs)]
    write_bin(os.path.join(packed, 'lfw.bin'), [jpeg(p) for p in range(2 * pairs)], issame)
    line = one_error_line(train_cli(packed, '--val-targets', 'lfw'))
    assert line == (f'error: {os.path.join(packed, "lfw.bin")}: {message}; '
                    f'10-fold verification needs at least 10 of each')
    assert not glob.glob(os.path.join(packed, 'models', '*', '*.params'))
    line = one_error_line(run(VERIFY, '--data-dir', packed, '--model', os.path.join(packed, 'none') + ',1',
                              '--target', 'lfw'))
    assert 'lfw.bin' in line and message in line


def test_an_undecodable_val_image_is_refused_before_step_1(packed):
    bins = [jpeg(p) for p in range(40)]
    bins[7] = b'not a jpeg'
    write_bin(os.path.join(packed, 'lfw.bin'), bins, [p % 2 == 0 for p in range(20)])
    line = one_error_line(train_cli(packed, '--val-targets', 'lfw'))
    assert line == f'error: {os.path.join(packed, "lfw.bin")}: image 7 does not decode'


def test_an_idx_offset_past_the_end_names_the_index_line(packed):
    idx = os.path.join(packed, 'train.idx')
    lines = open(idx).read().splitlines()
    lines[3] = '3\t99999999'
    with open(idx, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    line = one_error_line(train_cli(packed, '--val-targets', ''))
    assert line.startswith(f'error: {idx}:4: offset 99999999 of key 3 is past the end of')


@pytest.fixture
def tiny_disk(tmp_path):
    """A 3 MB tmpfs (root only)."""
    folder = str(tmp_path / 'disk')
    os.makedirs(folder)
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=3m', 'tmpfs', folder], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip('cannot mount a tmpfs here: ' + mounted.stderr.decode().strip())
    yield folder
    subprocess.run(['umount', folder], check=True)


def test_disk_full_while_packing(tiny_disk, tmp_path):
    make_faces(tiny_disk)   # 15 small faces: the previous outputs fit
    assert run(FACE2REC, os.path.join(tiny_disk, 'train')).returncode == 0
    before = snapshot(tiny_disk)
    rng = np.random.default_rng(0)
    noise = str(tmp_path / 'noise.jpg')   # ~25 KB; 200 lines of it need ~5 MB
    cv2.imwrite(noise, (rng.random((112, 112, 3)) * 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 100])
    write_lst(os.path.join(tiny_disk, 'train.lst'), [LstItem(1, noise, k // 4) for k in range(200)])
    before['train.lst'] = open(os.path.join(tiny_disk, 'train.lst'), 'rb').read()
    line = one_error_line(run(FACE2REC, os.path.join(tiny_disk, 'train'), '--num-thread', 2))
    assert line.startswith(f'error: {os.path.join(tiny_disk, "train.rec")}: disk full (')
    assert re.search(r'\(about [0-9.]+ MB needed, [0-9.]+ MB free in ' + re.escape(tiny_disk), line), line
    assert temps(tiny_disk) == [] and snapshot(tiny_disk) == before

