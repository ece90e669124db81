"""Small shared helpers: user-facing errors, atomic file output, run locks, signal handling, CLI entry wrapper, contexts."""
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading


class UserError(Exception):
    """A problem with the user's input: reported as one line naming the file, never as a traceback."""


class Terminated(BaseException):
    """SIGTERM arrived inside `sigterm_raises()`: unwinds like Ctrl-C so every cleanup block runs."""


_sigterm_received = []   # signals seen by `sigterm_raises`' handler, for `check_terminated`


@contextlib.contextmanager
def sigterm_raises():
    """Within the block, SIGTERM raises `Terminated` in the main thread; `run_cli` turns it into
    `terminated` and exit status 143. Later SIGTERMs are ignored while cleaning up.

    A handler's exception can land where Python swallows it (an at-fork hook, a `__del__`), so long
    loops also call `check_terminated()`, which raises it again.
    """
    def handler(signum, frame):
        _sigterm_received.append(signum)
        if len(_sigterm_received) == 1:
            raise Terminated()
    _sigterm_received.clear()
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        _sigterm_received.clear()


def check_terminated():
    """Raise `Terminated` if SIGTERM arrived inside `sigterm_raises()` (a no-op elsewhere)."""
    if _sigterm_received:
        raise Terminated()


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM arriving within the block are delivered when it ends, so a short critical
    step (renaming a set of files into place) is never cut in half. Main thread only; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    old = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's live process
        return True
    return True


@contextlib.contextmanager
def folder_lock(path, what):
    """Hold the lock file `path` (created with O_CREAT|O_EXCL, holding "PID HOST") for the block.

    A second holder is refused with a UserError naming `what` and the running PID. A lock left by a
    dead process of this host (SIGKILL, power loss) is stale and taken over; one from another host
    is refused, since its PID cannot be checked from here. The lock is removed on any exit of the
    block, including exceptions and `Terminated`. (Two processes that find the same stale lock in
    the same instant may both take it over: the check is for humans starting a second run, not a
    mutex between racing programs.)
    """
    path = os.fspath(path)
    host = socket.gethostname()
    mine = f'{os.getpid()} {host}\n'
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    text = f.read()
            except FileNotFoundError:   # released meanwhile
                continue
            fields = text.split()
            pid = int(fields[0]) if fields and fields[0].isdigit() else None
            other = fields[1] if len(fields) > 1 else host
            if pid is not None and other != host:
                raise UserError(f'{path}: {what} is locked by process {pid} on {other}; '
                                f'delete the lock if that run is over') from None
            if pid is not None and _pid_alive(pid):
                raise UserError(f'{path}: {what} is already running (process {pid}); '
                                f'wait for it or stop it') from None
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)   # stale: its process is gone
            continue
        with os.fdopen(fd, 'w') as f:
            f.write(mine)
        break
    else:
        raise UserError(f'{path}: cannot take the lock for {what}')
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            with open(path) as f:
                still_mine = f.read() == mine
            if still_mine:
                os.remove(path)


def no_space_error(path, needed=None):
    """The UserError for ENOSPC while writing `path`: names it, the free space and, if known, the need."""
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free
    need = f', about {needed / 2 ** 20:.1f} MB needed' if needed else ''
    return UserError(f'{path}: no space left on device ({free / 2 ** 20:.1f} MB free in {folder}{need})')


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    An interrupted or failed write leaves no half file under the final name.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    os.close(fd)
    # mkstemp makes 0600 files; give the output the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_open(path, mode='w', **kwargs):
    """Open a temporary file that replaces `path` when the block ends without error."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f


def jsonable(obj):
    """`obj` with numpy scalars as Python numbers and NaN/inf as None (JSON has neither)."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, 'item') and getattr(obj, 'ndim', None) == 0:
        obj = obj.item()
    if isinstance(obj, float) and obj != obj or obj in (float('inf'), float('-inf')):
        return None
    return obj


def read_json(path, missing):
    """The JSON object in `path`; a missing file says `missing`, broken JSON or a non-object says so."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError:
        raise UserError(f'{path}: {missing}') from None
    except json.JSONDecodeError as e:
        raise UserError(f'{path}: invalid JSON ({e})') from None
    if not isinstance(doc, dict):
        raise UserError(f'{path}: expected a JSON object')
    return doc


def write_json(path, doc):
    """Write `doc` as indented JSON, atomically."""
    with atomic_open(path) as f:
        json.dump(jsonable(doc), f, indent=1)
        f.write('\n')


def run_cli(main):
    """Run a CLI `main()`: a UserError becomes `error: <message>` on stderr and exit status 2."""
    try:
        code = main()
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print('terminated', file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    sys.exit(code or 0)


def add_device_args(parser, batch_size=64):
    """`--batch-size`, `--gpus` and `--ctx` (read with `parse_contexts(args.gpus, args.ctx)`), the same in
    every tool that runs a model."""
    parser.add_argument('--batch-size', type=int, default=batch_size, help='images per forward pass')
    parser.add_argument('--gpus', default='', help='GPU ids, e.g. 0,1 (default: CUDA_VISIBLE_DEVICES, else CPU)')
    parser.add_argument('--ctx', default='', help='cpu:N or gpu:N contexts instead of --gpus, e.g. cpu:2')
    return parser


def parse_contexts(gpus='', ctx=''):
    """Contexts from `--gpus 0,1` (or CUDA_VISIBLE_DEVICES) or `--ctx cpu:N`; one CPU by default.

    The same list serves GPUs and several CPU contexts, so the multi-device path is one code path.
    """
    import mxnet as mx
    if ctx:
        kind, _, n = ctx.partition(':')
        n = int(n or 1)
        if kind == 'cpu':
            return [mx.cpu(i) for i in range(n)]
        if kind == 'gpu':
            return [mx.gpu(i) for i in range(n)]
        raise UserError(f'--ctx {ctx!r}: expected cpu:N or gpu:N')
    if not gpus:
        gpus = os.environ.get('CUDA_VISIBLE_DEVICES', '') if mx.context.num_gpus() > 0 else ''
        if gpus:
            return [mx.gpu(i) for i in range(len(gpus.split(',')))]
        return [mx.cpu()]
    return [mx.gpu(int(i)) for i in gpus.split(',') if i.strip() != '']
