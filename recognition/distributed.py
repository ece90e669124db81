"""Launcher for MXNet's parameter-server kvstore (`dist_sync`, `dist_device_sync`, `dist_async`).

Starts one scheduler, S servers and W workers with the DMLC environment ps-lite reads, either all on this
machine (`local`) or across machines over ssh (`ssh`, hosts from a hostfile). Every output line is prefixed
with the process's role and launch index (`worker 1`: the second worker started; the kvstore assigns the
ranks itself, and rank 0 says so in its log); if any process fails, the others are stopped and the launch
fails, naming the process. Over ssh each host runs the command in the same folder with that folder's
`.venv` first on PATH, under a remote terminal (`ssh -tt`), so that stopping the local ssh also ends
the remote process. Scheduler and servers run `import mxnet`, which serves the kvstore and returns when the
workers finish (that is how MXNet's own tools/launch.py starts them too).
"""
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from .utils import UserError

SERVER_COMMAND = [sys.executable, '-c', 'import mxnet']
# How long scheduler and servers may take to exit after the last worker finished.
SHUTDOWN_GRACE = 30.0


def free_port(host='127.0.0.1'):
    """A TCP port that is free on `host` now (the scheduler binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def read_hostfile(path):
    """Hosts from a hostfile: one host per line, `#` comments and blank lines ignored."""
    try:
        with open(path) as f:
            hosts = [line.split('#')[0].strip() for line in f]
    except OSError as e:
        raise UserError(f'{path}: cannot read hostfile ({e.strerror})')
    hosts = [h.split()[0] for h in hosts if h]
    if not hosts:
        raise UserError(f'{path}: hostfile lists no hosts')
    return hosts


class Process:
    """One launched role: its name for log prefixes, its Popen and the thread copying its output."""

    def __init__(self, name, argv, env):
        self.name = name
        self.popen = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        self.pump = threading.Thread(target=self._copy_output, daemon=True)
        self.pump.start()

    def _copy_output(self):
        for raw in iter(self.popen.stdout.readline, b''):
            line = raw.decode('utf-8', 'replace').rstrip('\n')
            sys.stdout.write(f'[{self.name}] {line}\n')
            sys.stdout.flush()
        self.popen.stdout.close()

    def stop(self, sig=signal.SIGTERM):
        """Signal the whole process group (ssh and the remote shell included)."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass


def dmlc_env(role, root_uri, root_port, num_workers, num_servers, node_host=None, index=0):
    """The environment ps-lite needs for one process of the job."""
    env = {
        'DMLC_ROLE': role,
        'DMLC_PS_ROOT_URI': root_uri,
        'DMLC_PS_ROOT_PORT': str(root_port),
        'DMLC_NUM_WORKER': str(num_workers),
        'DMLC_NUM_SERVER': str(num_servers),
        # The launch index, for logs and tests; the kvstore assigns the real rank.
        'FAIRFACE_LAUNCH_INDEX': str(index),
    }
    if node_host:
        env['DMLC_NODE_HOST'] = node_host
    return env


def plan(command, num_workers, num_servers, launcher='local', hosts=None, forward_env=(), port=None,
         workdir=None):
    """The (name, argv, env) of every process, scheduler first, without starting anything."""
    if num_workers < 1 or num_servers < 1:
        raise UserError('a dist launch needs at least one worker (-n) and one server (-s)')
    if not command:
        raise UserError('no worker command given')
    roles = [('scheduler', 'scheduler', 0)]
    roles += [(f'server {i}', 'server', i) for i in range(num_servers)]
    roles += [(f'worker {i}', 'worker', i) for i in range(num_workers)]
    base = dict(os.environ)
    if launcher == 'local':
        uri = '127.0.0.1'
        port = port or free_port(uri)
        out = []
        for name, role, index in roles:
            env = dict(base)
            env.update(dmlc_env(role, uri, port, num_workers, num_servers, node_host=uri, index=index))
            # Keep ps-lite on loopback: it would otherwise pick an external interface.
            env['DMLC_INTERFACE'] = 'lo'
            out.append((name, list(command) if role == 'worker' else list(SERVER_COMMAND), env))
        return out
    if launcher != 'ssh':
        raise UserError(f'unknown launcher {launcher!r}: use local or ssh')
    if not hosts:
        raise UserError('--launcher ssh needs --hostfile')
    uri = hosts[0]
    port = port or 9091
    workdir = workdir or os.getcwd()
    forwarded = {k: os.environ[k] for k in forward_env if k in os.environ}
    out = []
    for n, (name, role, index) in enumerate(roles):
        host = hosts[n % len(hosts)] if role != 'scheduler' else uri
        env = dict(forwarded)
        env.update(dmlc_env(role, uri, port, num_workers, num_servers, node_host=host, index=index))
        remote = command if role == 'worker' else ['python', '-c', 'import mxnet']
        exports = ' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items())
        folder = shlex.quote(workdir)
        script = f'cd {folder} && PATH={folder}/.venv/bin:"$PATH" env {exports} {shlex.join(remote)}'
        out.append((name, ['ssh', '-tt', '-o', 'BatchMode=yes', host, script],
                    dict(base)))
    return out


def launch(command, num_workers, num_servers=1, launcher='local', hostfile=None, forward_env=(),
           port=None, timeout=None):
    """Run the job; return 0 when every worker succeeded, else stop everyone and raise UserError."""
    hosts = read_hostfile(hostfile) if hostfile else None
    procs = []
    try:
        for name, argv, env in plan(command, num_workers, num_servers, launcher, hosts, forward_env, port):
            procs.append(Process(name, argv, env))
        workers = [p for p in procs if p.name.startswith('worker')]
        started = time.time()
        failed = None
        while failed is None:
            for p in procs:
                code = p.popen.poll()
                if code not in (None, 0):
                    failed = (p, code)
                    break
            if failed is None and all(w.popen.poll() == 0 for w in workers):
                break
            if timeout is not None and time.time() - started > timeout:
                raise UserError(f'dist job did not finish within {timeout:.0f} s; stopped every process')
            time.sleep(0.1)
        if failed is not None:
            p, code = failed
            how = f'signal {-code}' if code < 0 else f'exit status {code}'
            raise UserError(f'{p.name} failed with {how}; stopped the other processes')
        deadline = time.time() + SHUTDOWN_GRACE
        for p in procs:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                raise UserError(f'{p.name} did not exit after the workers finished; stopped it')
        return 0
    finally:
        for p in procs:
            p.stop()
        for p in procs:
            try:
                p.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.stop(signal.SIGKILL)
                p.popen.wait()
            p.pump.join(timeout=5)
