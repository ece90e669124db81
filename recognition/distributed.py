"""Launcher for MXNet's parameter-server kvstore (`dist_sync`, `dist_device_sync`, `dist_async`), and how the
processes of such a job stop together.

Starts one scheduler, S servers and W workers with the DMLC environment ps-lite reads, either all on this
machine (`local`) or across machines over ssh (`ssh`, hosts from a hostfile). Every output line is prefixed
with the process's role and launch index (`worker 1`: the second worker started; the kvstore assigns the
ranks itself, and rank 0 says so in its log); if any process fails, the others are stopped and the launch
fails, naming the process. Over ssh each host runs the command in the same folder with that folder's
`.venv` first on PATH, under a remote terminal (`ssh -tt`), so that stopping the local ssh hangs up the
remote terminal and the remote process gets SIGHUP. Scheduler and servers run `serve()`, whose `import
mxnet` serves the kvstore and returns when the workers finish (as MXNet's own tools/launch.py starts them).

Stopping (SIGINT, SIGTERM or SIGHUP to any process of the job, the launcher included): a process that gets
one prints `STOP_LINE` at once (`StopSignals`); the launcher, reading every line, forwards the signal to
the other workers (to all of them when it got the signal itself; over ssh it stops the local ssh, and the
remote worker gets SIGHUP). In `dist_sync` the workers must stop after the same step, or one waits forever
for the others' gradients: after every step they add the signals they got through a kvstore key
(`StopVote`), so all of them read the same answer after the same step; the chief then writes the resume
snapshot and every worker exits. Servers keep serving until the workers are done. Children run in their
own process groups, get SIGTERM when the launcher dies however it dies (PR_SET_PDEATHSIG), so they stop as
above, and exit at most `STOP_GRACE` s after a stop signal even if the job is stuck.
"""
import ctypes
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from recognition.utils import UserError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
SERVER_COMMAND = [sys.executable, '-c', 'from recognition.distributed import serve; serve()']
REMOTE_SERVER_COMMAND = ['python', '-c', 'from recognition.distributed import serve; serve()']
# How long scheduler and servers may take to exit after the last worker finished.
SHUTDOWN_GRACE = 30.0
# How long a process of the job may take to stop after a stop signal (one step, the snapshot, the exit)
# before it exits anyway; the launcher waits a little longer before killing what is left.
STOP_GRACE = 120.0
# The line a process of the job prints the moment it gets a stop signal, for the launcher.
STOP_LINE = 'fairface-dist: got {}, stopping the job'
STOP_LINE_RE = re.compile(r'fairface-dist: got (SIG[A-Z]+), stopping the job')
PR_SET_PDEATHSIG = 1
_PRCTL = getattr(ctypes.CDLL(None), 'prctl', None)   # Linux only


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


def _die_with_parent(sig):
    """preexec_fn: the kernel sends `sig` to this child when the launcher dies, however it dies."""
    if _PRCTL is None:
        return None
    parent = os.getpid()   # the launcher, evaluated before the fork

    def arm():
        _PRCTL(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:   # the launcher died before the prctl
            os.kill(os.getpid(), sig)
    return arm


class Process:
    """One launched role: its name for log prefixes, its Popen, the thread copying its output and the stop
    signal it announced (`STOP_LINE`), if any."""

    def __init__(self, name, argv, env):
        self.name = name
        self.is_worker = name.startswith('worker')
        self.over_ssh = argv[0] == 'ssh'
        self.announced = None
        self.forwarded = False
        # Own process group (a signal to the launcher's group does not reach it; stop() ends it whole);
        # workers get SIGTERM when the launcher vanishes, so they stop cleanly, servers keep serving them.
        self.popen = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True,
                                      preexec_fn=_die_with_parent(signal.SIGTERM))
        self.pump = threading.Thread(target=self._copy_output, daemon=True)
        self.pump.start()

    def _copy_output(self):
        for raw in iter(self.popen.stdout.readline, b''):
            line = raw.decode('utf-8', 'replace').rstrip('\r\n')
            found = STOP_LINE_RE.search(line)
            if found and self.announced is None:
                self.announced = signal.Signals[found.group(1)]
            sys.stdout.write(f'[{self.name}] {line}\n')
            sys.stdout.flush()
        self.popen.stdout.close()

    def send(self, sig):
        """Signal the process itself (a worker, or the ssh that runs it), not its children: a worker's
        data-loader processes must live until it stops."""
        self.forwarded = True
        if self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, sig)
            except ProcessLookupError:
                pass

    def stopped_cleanly(self, code):
        """Whether exit status `code` of a worker is part of a clean stop: 128 + a stop signal (train.py),
        death by the signal it was sent (a command that does not catch it), or any status of an ssh that
        was sent the signal (ssh exits 255 and the remote worker, hung up, stops on its SIGHUP)."""
        return self.is_worker and (_stop_exit(code) or (self.forwarded and (self.over_ssh or -code in STOP_SIGNALS)))

    def stop(self, sig=signal.SIGTERM):
        """Signal the whole process group (ssh and the remote shell included)."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass


def _child_of_a_stopping_process():
    """After a fork in a process whose stop signals `StopSignals` handles (the data loader's workers of a
    training process): SIGTERM and SIGHUP back to their default and no wakeup fd, so the SIGTERM the loader's
    pool sends its workers at exit ends them (with the inherited handler they ignored it and the trainer
    waited for them forever); SIGINT ignored, as a Ctrl-C to the terminal's group is the parent's to handle."""
    if not StopSignals.active:
        return
    StopSignals.active = False
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


os.register_at_fork(after_in_child=_child_of_a_stopping_process)


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP go to `handler`. With `announce` (a process of a dist job) a watcher thread
    reacts at once even when the main thread is blocked inside MXNet, where Python runs no handler (the
    C-level handler writes the signal number to a wakeup fd): it prints `STOP_LINE` for the launcher and
    exits the process `STOP_GRACE` s after the first signal if it has not ended by then (a job that cannot
    stop, e.g. a peer died, must still leave no process behind)."""

    active = False   # whether this process's stop signals are handled here (see _child_of_a_stopping_process)

    def __init__(self, handler, announce=True, grace=STOP_GRACE):
        self.old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
        StopSignals.active = True
        self.wakeup = None
        if announce:
            read_end, self.wakeup = os.pipe()
            os.set_blocking(self.wakeup, False)
            signal.set_wakeup_fd(self.wakeup)
            threading.Thread(target=self._watch, args=(read_end, grace), daemon=True).start()

    @staticmethod
    def _watch(read_end, grace):
        sig = signal.Signals(os.read(read_end, 1)[0])
        try:
            sys.stdout.write(STOP_LINE.format(sig.name) + '\n')
            sys.stdout.flush()
        except (OSError, ValueError):
            pass     # nobody reads any more (ssh gone)
        time.sleep(grace)
        try:
            sys.stderr.write(f'{sig.name}: not stopped within {grace:.0f} s, exiting\n')
        except (OSError, ValueError):
            pass
        os._exit(128 + sig)

    def restore(self):
        """Back to the previous handlers. A process of a dist job keeps ignoring stop signals instead, and
        the watcher its deadline: it is about to exit, and a signal the launcher forwards after the workers
        already agreed to stop must not kill it on the way out."""
        for s, h in self.old.items():
            signal.signal(s, h if self.wakeup is None else _ignore)
        StopSignals.active = self.wakeup is not None


class StopVote:
    """dist_sync / dist_device_sync: after every step each worker writes the stop signal it got (0 for none)
    into its rank's slot of a small kvstore key and pushpulls it; the servers sum the pushes of a round, so
    every worker reads the same signals after the same step and they all stop after it. A worker one
    pushpull ahead just waits for the others, as for a gradient. Not for dist_async, whose servers run the
    optimizer on every key."""

    # Above any Trainer's parameter index; MXNet picks a key's server as (key * 9973) % servers in int32.
    KEY = 100000

    def __init__(self, kvstore, rank, num_workers):
        import mxnet as mx   # here, not at the top: the launcher itself never needs MXNet
        self.nd = mx.nd
        self.kvstore = kvstore
        self.rank = rank
        self.num_workers = num_workers
        self.total = mx.nd.zeros((num_workers,))
        kvstore.init(self.KEY, mx.nd.zeros((num_workers,)))   # collective: all workers at the same point
        mx.nd.waitall()

    def __call__(self, signum):
        """{rank: signal} of every worker that got a stop signal, identical on every worker."""
        mine = [0] * self.num_workers
        mine[self.rank] = int(signum or 0)
        # A new array each time: the dist kvstore writes the round's sum into the pushed array too.
        self.kvstore.pushpull(self.KEY, self.nd.array(mine), out=self.total)
        return {rank: signal.Signals(int(s)) for rank, s in enumerate(self.total.asnumpy()) if s}


def _ignore(signum, frame):
    """A Python-level handler that does nothing: the C-level one still wakes the watcher."""


def serve():
    """Scheduler or server of a launched job. `import mxnet` serves until the workers finish (MXNet then
    exits). A stop signal is announced to the launcher, which stops the workers, and serving goes on so they
    can finish their step and exit together (at most `STOP_GRACE` s)."""
    StopSignals(_ignore)
    import mxnet  # noqa: F401  (the import is the server; it returns when the workers have finished)


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
        remote = command if role == 'worker' else REMOTE_SERVER_COMMAND
        exports = ' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items())
        folder = shlex.quote(workdir)
        script = f'cd {folder} && PATH={folder}/.venv/bin:"$PATH" env {exports} {shlex.join(remote)}'
        out.append((name, ['ssh', '-tt', '-o', 'BatchMode=yes', host, script],
                    dict(base)))
    return out


class JobStopped(UserError):
    """A stop signal ended the job cleanly; `status` is 128 + the signal, like a process it killed."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.status = 128 + int(signum)


def _stop_exit(code):
    """Whether a worker's exit status is a clean stop on a signal (train.py exits 128 + the signal)."""
    return code is not None and code - 128 in STOP_SIGNALS


def launch(command, num_workers, num_servers=1, launcher='local', hostfile=None, forward_env=(),
           port=None, timeout=None):
    """Run the job; return 0 when every worker succeeded, else stop everyone and raise UserError
    (JobStopped when a stop signal to any process, the launcher included, stopped the job)."""
    hosts = read_hostfile(hostfile) if hostfile else None
    jobs = plan(command, num_workers, num_servers, launcher, hosts, forward_env, port)
    caught = []
    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in STOP_SIGNALS}
    procs = []
    try:
        for name, argv, env in jobs:
            procs.append(Process(name, argv, env))
        workers = [p for p in procs if p.is_worker]
        started = time.time()
        stop = None   # (who got the signal, the signal) once the job is stopping
        while True:
            if stop is None:
                stop = _stop_request(caught, procs)
                if stop is not None:
                    stop_deadline = time.time() + STOP_GRACE + 10
                    for w in workers:
                        if w.name != stop[0]:
                            w.send(stop[1])
            elif len(caught) > 1:
                raise JobStopped(f'the launcher got {signal.Signals(caught[-1]).name} again while stopping; '
                                 f'killed every process', caught[-1])
            for p in procs:
                code = p.popen.poll()
                if code not in (None, 0) and not (stop is not None and p.stopped_cleanly(code)):
                    how = f'signal {-code}' if code < 0 else f'exit status {code}'
                    during = f' while stopping ({stop[0]} got {stop[1].name})' if stop else ''
                    raise UserError(f'{p.name} failed with {how}{during}; stopped the other processes')
            if all(w.popen.poll() is not None for w in workers):
                break
            if stop is not None and time.time() > stop_deadline:
                raise UserError(f'{stop[0]} got {stop[1].name}, but the job did not stop within '
                                f'{STOP_GRACE:.0f} s; killed every process')
            if timeout is not None and time.time() - started > timeout:
                raise UserError(f'dist job did not finish within {timeout:.0f} s; stopped every process')
            time.sleep(0.1)
        deadline = time.time() + SHUTDOWN_GRACE
        for p in procs:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                raise UserError(f'{p.name} did not exit after the workers finished; stopped it')
        if stop is not None and any(w.popen.returncode for w in workers):
            raise JobStopped(f'{stop[0]} got {stop[1].name}: stopped the job, every process exited; '
                             f'continue with --resume', stop[1])
        return 0
    finally:
        for p in procs:
            p.stop()
        deadline = time.time() + 5   # one grace period for all: a worker blocked on a dead server never ends
        for p in procs:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.stop(signal.SIGKILL)
                p.popen.wait()
            p.pump.join(timeout=5)
        for s, h in old.items():
            signal.signal(s, h)


def _stop_request(caught, procs):
    """(who, signal) when the launcher got a stop signal, or a process announced one, or a worker exited
    on one without announcing it (a worker command other than train.py); else None."""
    if caught:
        return 'the launcher', signal.Signals(caught[0])
    for p in procs:
        if p.announced is not None:
            return p.name, p.announced
    for p in procs:
        code = p.popen.poll()
        if p.is_worker and _stop_exit(code):
            return p.name, signal.Signals(code - 128)
    return None
