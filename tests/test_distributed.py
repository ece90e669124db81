"""The parameter-server launcher, on loopback only."""
import os
import sys
import textwrap

import pytest

from recognition.distributed import free_port, launch, plan, read_hostfile
from recognition.utils import UserError

WORKER = textwrap.dedent('''
    import os, signal, sys
    import mxnet as mx
    kv = mx.kv.create('dist_sync')
    index = int(os.environ['FAIRFACE_LAUNCH_INDEX'])
    out_dir = sys.argv[1]
    kv.set_optimizer(mx.optimizer.SGD(learning_rate=1.0, rescale_grad=1.0))
    kv.init(0, mx.nd.zeros((4,)))
    for step in range(3):
        if index == 1 and step == 1 and os.environ.get('DIE'):
            os.kill(os.getpid(), signal.SIGKILL)
        kv.push(0, mx.nd.ones((4,)) * (kv.rank + 1))
        value = mx.nd.zeros((4,))
        kv.pull(0, out=value)
        # A training step's next gradient depends on the pulled weights; without that wait a worker
        # could push step k+1 before the server merged step k.
        value.wait_to_read()
    with open(os.path.join(out_dir, 'rank%d' % kv.rank), 'w') as f:
        f.write('%d %s' % (kv.num_workers, ' '.join(str(v) for v in value.asnumpy())))
    print('worker done', kv.rank)
''')


VOTER = textwrap.dedent('''
    import os, signal, sys, time
    import mxnet as mx
    from recognition.distributed import StopVote
    kv = mx.kv.create('dist_sync')
    vote = StopVote(kv, kv.rank, kv.num_workers)
    seen = []
    for step in range(5):
        if kv.rank == 1:
            time.sleep(0.3)   # rank 0 runs ahead and waits in its pushpull
        got = vote(signal.SIGTERM if kv.rank == 1 and step >= 2 else None)
        seen.append(','.join('%d:%s' % (r, s.name) for r, s in sorted(got.items())) or '-')
    print('votes', kv.rank, ' '.join(seen))
''')


def _job_processes(port):
    """PIDs of live processes launched for the job on `port` (found by their DMLC environment)."""
    marker = f'DMLC_PS_ROOT_PORT={port}'.encode()
    pids = []
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            with open(f'/proc/{name}/environ', 'rb') as f:
                if marker in f.read().split(b'\0'):
                    with open(f'/proc/{name}/stat') as s:
                        if s.read().split()[2] != 'Z':
                            pids.append(int(name))
        except OSError:
            continue
    return pids


def _port_free(port):
    """No socket listens on `port` any more (TIME_WAIT leftovers do not count)."""
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(':', 1)[1], 16) == port and fields[3] == '0A':
                    return False
    return True


@pytest.fixture
def worker_script(tmp_path):
    path = tmp_path / 'worker.py'
    path.write_text(WORKER)
    return path


def test_two_workers_one_server_agree(tmp_path, worker_script, capfd):
    port = free_port()
    assert launch([sys.executable, str(worker_script), str(tmp_path)], 2, 1, port=port, timeout=120) == 0
    results = sorted(p.read_text() for p in tmp_path.glob('rank*'))
    # The server applies SGD(lr 1) to the summed gradients (1 + 2) three times: 0 - 3 * 3 = -9.
    assert results == ['2 -9.0 -9.0 -9.0 -9.0'] * 2
    out = capfd.readouterr().out
    assert '[worker 0] worker done' in out and '[worker 1] worker done' in out
    assert _job_processes(port) == [] and _port_free(port)


def test_killed_worker_stops_everything(tmp_path, worker_script, monkeypatch):
    monkeypatch.setenv('DIE', '1')
    port = free_port()
    with pytest.raises(UserError, match=r'worker 1 failed with signal 9'):
        launch([sys.executable, str(worker_script), str(tmp_path)], 2, 1, port=port, timeout=120)
    assert _job_processes(port) == []
    assert _port_free(port)


def test_stop_vote_gives_every_worker_the_same_answer_after_the_same_step(tmp_path, capfd):
    script = tmp_path / 'voter.py'
    script.write_text(VOTER)
    port = free_port()
    assert launch([sys.executable, str(script)], 2, 1, port=port, timeout=120) == 0
    votes = sorted(line.split('votes ')[1] for line in capfd.readouterr().out.splitlines() if 'votes' in line)
    assert votes == ['0 - - 1:SIGTERM 1:SIGTERM 1:SIGTERM', '1 - - 1:SIGTERM 1:SIGTERM 1:SIGTERM']
    assert _job_processes(port) == [] and _port_free(port)


def test_plan_environment_and_ssh_commands(tmp_path):
    local = plan(['python', 'train.py'], 2, 1, port=9999)
    assert [name for name, _, _ in local] == ['scheduler', 'server 0', 'worker 0', 'worker 1']
    env = local[2][2]
    assert (env['DMLC_ROLE'], env['DMLC_PS_ROOT_URI'], env['DMLC_PS_ROOT_PORT']) == ('worker', '127.0.0.1', '9999')
    assert (env['DMLC_NUM_WORKER'], env['DMLC_NUM_SERVER']) == ('2', '1')
    assert local[2][1] == ['python', 'train.py'] and local[0][1][-1].endswith('serve()')

    hostfile = tmp_path / 'hosts'
    hostfile.write_text('# cluster\nnode-a\nnode-b slots=8\n\n')
    hosts = read_hostfile(hostfile)
    assert hosts == ['node-a', 'node-b']
    remote = plan(['python', 'train.py', '--kvstore', 'dist_sync'], 2, 1, 'ssh', hosts, port=9091,
                  workdir='/srv/ff')
    assert all(argv[0] == 'ssh' for _, argv, _ in remote)
    scheduler_cmd = remote[0][1][-1]
    assert remote[0][1][:2] == ['ssh', '-tt'] and scheduler_cmd.startswith('cd /srv/ff && PATH=/srv/ff/.venv/bin:')
    assert remote[0][1][-2] == 'node-a' and 'DMLC_ROLE=scheduler' in scheduler_cmd
    assert 'DMLC_PS_ROOT_URI=node-a' in remote[3][1][-1] and "--kvstore dist_sync" in remote[3][1][-1]


def test_bad_input(tmp_path):
    (tmp_path / 'empty').write_text('# nothing\n\n')
    with pytest.raises(UserError, match='hostfile lists no hosts'):
        read_hostfile(tmp_path / 'empty')
    with pytest.raises(UserError, match='cannot read hostfile'):
        read_hostfile(tmp_path / 'missing')
    with pytest.raises(UserError, match='at least one worker'):
        plan(['python'], 0, 1)
    with pytest.raises(UserError, match='needs --hostfile'):
        plan(['python'], 1, 1, 'ssh')


def test_ssh_launcher_end_to_end_with_a_local_ssh(tmp_path, worker_script, monkeypatch, capfd):
    """The ssh path for real: a stand-in `ssh` on PATH runs the remote command here (over loopback)."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    fake = bin_dir / 'ssh'
    fake.write_text('#!/bin/bash\n'
                    'while [[ "$1" == -* ]]; do if [[ "$1" == -o ]]; then shift 2; else shift; fi; done\n'
                    'echo "$1" >> "$FAKE_SSH_LOG"; shift\n'
                    'exec bash -c "$1"\n')
    fake.chmod(0o755)
    monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
    monkeypatch.setenv('FAKE_SSH_LOG', str(tmp_path / 'hosts_used'))
    hostfile = tmp_path / 'hosts'
    hostfile.write_text('127.0.0.1\n')
    port = free_port()
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    assert launch([sys.executable, str(worker_script), str(out_dir)], 2, 1, launcher='ssh', hostfile=str(hostfile),
                  port=port, timeout=120) == 0
    assert sorted(p.read_text() for p in out_dir.glob('rank*')) == ['2 -9.0 -9.0 -9.0 -9.0'] * 2
    assert (tmp_path / 'hosts_used').read_text().split() == ['127.0.0.1'] * 4
    assert '[worker 1] worker done' in capfd.readouterr().out
    assert _job_processes(port) == [] and _port_free(port)
