"""Faults injected into a real dist_sync job (the launcher CLI running train/train.py on loopback).

A stop signal to one worker, to the launcher or to a server must stop the whole job cleanly: every worker
stops after the same step, the chief writes the resume snapshot (which resumes), every process exits and
the launcher exits with 128 + the signal, naming who got it. Over ssh the remote processes end as well.
"""
import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from recognition.distributed import free_port

from test_distributed import _job_processes, _port_free
from test_train_dist import TESTS, train_command, write_train_rec

ROOT = os.path.dirname(TESTS)
LAUNCHER = [sys.executable, os.path.join(ROOT, 'train', 'launch_dist.py')]
RUN = os.path.join('demo-nsoftmax-demo', 'model-resume.json')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp('faces')
    write_train_rec(str(folder))
    return folder


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')


class Job:
    """A launcher started as its own process, its output read line by line."""

    def __init__(self, argv, port, env=None):
        self.port = port
        self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        self.lines = []
        self._partial = b''

    def _read(self, timeout):
        ready, _, _ = select.select([self.popen.stdout], [], [], timeout)
        if not ready:
            return False
        chunk = os.read(self.popen.stdout.fileno(), 65536)
        if not chunk:
            return None
        self._partial += chunk
        *done, self._partial = self._partial.split(b'\n')
        self.lines += [line.decode('utf-8', 'replace') for line in done]
        return True

    def wait_for(self, pattern, timeout=60):
        """The first output line matching `pattern`; fails after `timeout` s."""
        deadline = time.time() + timeout
        seen = 0
        while time.time() < deadline:
            for line in self.lines[seen:]:
                if re.search(pattern, line):
                    return line
            seen = len(self.lines)
            if self._read(0.2) is None:
                break
        self.kill()
        pytest.fail(f'no line matching {pattern!r} within {timeout} s:\n' + '\n'.join(self.lines[-40:]))

    def finish(self, timeout=90):
        """The launcher's exit status, after its output ended; kills the job after `timeout` s."""
        deadline = time.time() + timeout
        while time.time() < deadline and self._read(0.2) is not None:
            pass
        try:
            return self.popen.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail('the launcher did not exit:\n' + '\n'.join(self.lines[-40:]))

    def kill(self):
        for pid in _job_processes(self.port) + [self.popen.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def pid_of(self, role, index=0):
        """The pid of the job's process with DMLC_ROLE `role` and launch index `index`."""
        want = {b'DMLC_ROLE=' + role.encode(), b'FAIRFACE_LAUNCH_INDEX=%d' % index}
        for pid in _job_processes(self.port):
            try:
                with open(f'/proc/{pid}/environ', 'rb') as f:
                    if want <= set(f.read().split(b'\0')):
                        return pid
            except OSError:
                continue
        pytest.fail(f'no {role} {index} running for port {self.port}')

    def text(self):
        return '\n'.join(self.lines)


def _start(data_dir, models, *extra, steps=100000, launcher=(), port=None):
    port = port or free_port()
    command = train_command(data_dir, models, steps, '--frequent', '1', *extra)
    return Job([*LAUNCHER, '-n', '2', '-s', '1', '--port', str(port), '--timeout', '200', *launcher, '--',
                *command], port)


def _stopped_step(job):
    """The step both workers report stopping at (they must agree), from their stop messages."""
    steps = {}
    for line in job.lines:
        found = re.match(r'\[(worker \d)\] (SIG\w+ to rank \d.*) at step (\d+): (.*); continue with --resume', line)
        if found:
            steps[found.group(1)] = (int(found.group(3)), found.group(4))
    assert sorted(steps) == ['worker 0', 'worker 1'], job.text()[-3000:]
    (a, said_a), (b, said_b) = steps.values()
    assert a == b, steps
    assert sorted(said.split(' /')[0] for said in (said_a, said_b)) == ['saved', 'the chief saved'], steps
    return a


def _assert_gone(job):
    assert _job_processes(job.port) == [], 'processes of the job are left'
    assert _port_free(job.port)


def test_sigterm_to_one_worker_stops_the_job_and_resumes(data_dir, tmp_path):
    models = tmp_path / 'models'
    job = _start(data_dir, models)
    # The chief: it must still write the snapshot while the others are told to stop.
    chief = re.match(r'\[worker (\d)\]', job.wait_for(r'^\[worker \d\] contexts .* rank 0 of 2')).group(1)
    job.wait_for(r'^\[worker \d\] Epoch\[0\] Batch\[2\]')
    os.kill(job.pid_of('worker', int(chief)), signal.SIGTERM)
    assert job.finish() == 128 + signal.SIGTERM, job.text()[-3000:]
    step = _stopped_step(job)
    assert f'error: worker {chief} got SIGTERM' in job.text()
    snapshot = json.loads((models / RUN).read_text())
    assert snapshot['step'] == step >= 2
    assert os.path.isfile(models / 'demo-nsoftmax-demo' / snapshot['params'])
    _assert_gone(job)

    resumed = _start(data_dir, models, '--resume', steps=step + 2)
    assert resumed.finish() == 0, resumed.text()[-3000:]
    assert f'at step {step} (epoch' in resumed.text()
    assert json.loads((models / RUN).read_text())['step'] == step + 2
    _assert_gone(resumed)


def test_sigterm_to_the_launcher_stops_every_process(data_dir, tmp_path):
    """Through shell/launch_dist.sh (which execs the Python launcher, so its pid is the launcher's)."""
    models = tmp_path / 'models'
    port = free_port()
    job = Job([os.path.join(ROOT, 'shell', 'launch_dist.sh'), '-n', '2', '-s', '1', '--port', str(port),
               '--timeout', '200', '--', *train_command(data_dir, models, 100000, '--frequent', '1')], port)
    job.wait_for(r'^\[worker \d\] Epoch\[0\] Batch\[2\]')
    job.popen.send_signal(signal.SIGTERM)
    assert job.finish() == 128 + signal.SIGTERM, job.text()[-3000:]
    step = _stopped_step(job)
    assert 'error: the launcher got SIGTERM' in job.text()
    assert json.loads((models / RUN).read_text())['step'] == step
    _assert_gone(job)


def test_sigint_to_a_server_stops_the_job(data_dir, tmp_path):
    """The server announces the signal and keeps serving until the workers have stopped together."""
    models = tmp_path / 'models'
    job = _start(data_dir, models)
    job.wait_for(r'^\[worker \d\] Epoch\[0\] Batch\[2\]')
    os.kill(job.pid_of('server'), signal.SIGINT)
    assert job.finish() == 128 + signal.SIGINT, job.text()[-3000:]
    step = _stopped_step(job)
    assert 'error: server 0 got SIGINT' in job.text()
    assert json.loads((models / RUN).read_text())['step'] == step
    _assert_gone(job)


def test_killed_server_fails_the_job_naming_it(data_dir, tmp_path):
    """SIGKILL is no stop signal: the job cannot go on, the launcher kills the rest and names the server."""
    job = _start(data_dir, tmp_path / 'models')
    job.wait_for(r'^\[worker \d\] Epoch\[0\] Batch\[2\]')
    os.kill(job.pid_of('server'), signal.SIGKILL)
    assert job.finish() == 2, job.text()[-3000:]
    assert 'error: server 0 failed with signal 9; stopped the other processes' in job.text()
    _assert_gone(job)


def test_killed_launcher_leaves_no_process(data_dir, tmp_path):
    """SIGKILL to the launcher: its children get SIGTERM from the kernel (PR_SET_PDEATHSIG) and stop."""
    models = tmp_path / 'models'
    job = _start(data_dir, models)
    job.wait_for(r'^\[worker \d\] Epoch\[0\] Batch\[2\]')
    job.popen.kill()
    job.popen.wait()
    deadline = time.time() + 60
    while _job_processes(job.port) and time.time() < deadline:
        time.sleep(0.5)
    left = _job_processes(job.port)
    job.kill()
    assert left == []
    # The workers stopped cleanly: the chief wrote a snapshot.
    assert json.loads((models / RUN).read_text())['step'] >= 2


def test_sighup_to_an_ssh_launcher_ends_the_remote_processes(data_dir, tmp_path):
    """The ssh path with a stand-in `ssh` that runs the command here in its own session and, like sshd
    closing the remote terminal, sends it SIGHUP when the ssh client goes away; a signalled client exits
    255, as OpenSSH's does."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    fake = bin_dir / 'ssh'
    fake.write_text('#!/bin/bash\n'
                    'while [[ "$1" == -* ]]; do if [[ "$1" == -o ]]; then shift 2; else shift; fi; done\n'
                    'shift\n'
                    'setsid bash -c "$1" & remote=$!\n'
                    'trap \'kill -HUP -- -$remote 2>/dev/null\' EXIT\n'
                    'trap \'exit 255\' HUP INT TERM\n'
                    'wait $remote\n')
    fake.chmod(0o755)
    hostfile = tmp_path / 'hosts'
    hostfile.write_text('127.0.0.1\n')
    models = tmp_path / 'models'
    port = free_port()
    env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
    job = Job([*LAUNCHER, '-n', '2', '-s', '1', '--port', str(port), '--timeout', '200', '--launcher', 'ssh',
               '--hostfile', str(hostfile), '--', *train_command(data_dir, models, 100000, '--frequent', '1')],
              port, env=env)
    job.wait_for(r'^\[worker \d\] Epoch\[0\] Batch\[2\]')
    job.popen.send_signal(signal.SIGHUP)
    assert job.finish() == 128 + signal.SIGHUP, job.text()[-3000:]
    assert 'error: the launcher got SIGHUP' in job.text()
    deadline = time.time() + 30
    while _job_processes(port) and time.time() < deadline:
        time.sleep(0.5)
    left = _job_processes(port)
    job.kill()
    assert left == []
    assert json.loads((models / RUN).read_text())['step'] >= 2
