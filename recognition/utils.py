"""Small shared helpers: user-facing errors, atomic file output and disk-full errors, signal handling, CLI entry wrapper, contexts."""
import contextlib
import errno
import json
import os
import shutil
import signal
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


def _human_size(nbytes):
    """A size for messages: MB with one decimal, KB below 1 MB."""
    return f'{nbytes / 2 ** 20:.1f} MB' if nbytes >= 2 ** 20 else f'{nbytes / 2 ** 10:.0f} KB'


def is_disk_full(error):
    """ENOSPC/EDQUOT, or MXNet's writer, which reports a short write as 'FileStream.Write incomplete'."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return 'Write incomplete' in str(error)


def ensure_free_space(path, nbytes, margin=1 << 16):
    """UserError naming `path` unless its folder has room for `nbytes` (plus headers): checked before a
    large write, so a full disk stops a run with nothing half written."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < nbytes + margin:
        raise UserError(f'{path}: not enough free space ({_human_size(nbytes + margin)} needed, '
                        f'{_human_size(free)} free in {folder})')


def no_space_error(path, needed):
    """The UserError for a disk that filled up while writing `path`: the free space and about how much
    the write needs (the caller's estimate), in one line."""
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free
    return UserError(f'{path}: disk full (about {_human_size(needed)} needed, {_human_size(free)} free in '
                     f'{folder}; free some space and run again)')


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    An interrupted or failed write leaves no half file under the final name, nor the temporary; a full
    disk is a UserError naming `path` and the space it had.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
        os.close(fd)
        # mkstemp makes 0600 files; give the output the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        yield tmp
        os.replace(tmp, path)
    except Exception as e:
        if not is_disk_full(e):
            raise
        written = os.path.getsize(tmp) if tmp and os.path.exists(tmp) else 0
        had = shutil.disk_usage(folder).free + written
        raise UserError(f'{path}: disk full (needs more than the {_human_size(had)} that were free in {folder}; '
                        f'free some space and run again)') from None
    finally:
        if tmp and os.path.exists(tmp):
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

    The same list serves GPUs and several CPU contexts, so the multi-device path is one code path. GPUs
    this MXNet build cannot use are a one-line error saying which build is installed.
    """
    import mxnet as mx   # here: utils is imported by every CLI and by mxnet-free modules (config, the packer)
    if ctx:
        kind, _, n = ctx.partition(':')
        if kind not in ('cpu', 'gpu') or not (n or '1').isdigit() or int(n or 1) < 1:
            raise UserError(f'--ctx {ctx!r}: expected cpu:N or gpu:N')
        n = int(n or 1)
        if kind == 'cpu':
            return [mx.cpu(i) for i in range(n)]
        return _gpus(list(range(n)), f'--ctx {ctx}')
    if not gpus:
        gpus = os.environ.get('CUDA_VISIBLE_DEVICES', '') if mx.context.num_gpus() > 0 else ''
        if gpus:
            return [mx.gpu(i) for i in range(len(gpus.split(',')))]
        return [mx.cpu()]
    try:
        ids = [int(i) for i in gpus.split(',') if i.strip() != '']
    except ValueError:
        raise UserError(f'--gpus {gpus!r}: expected GPU ids such as 0 or 0,1') from None
    return _gpus(ids, f'--gpus {gpus}')


def _gpus(ids, option):
    """`mx.gpu(i)` for each id, after checking that this MXNet build sees that many GPUs."""
    import mxnet as mx   # here: see parse_contexts
    count = mx.context.num_gpus()
    if ids and max(ids) >= count:
        cuda = mx.runtime.Features().is_enabled('CUDA')
        build = (f'mxnet {mx.__version__} is built with CUDA but sees {count} GPU(s)' if cuda else
                 f'mxnet {mx.__version__} is the CPU-only build')
        fix = ('check the driver and CUDA_VISIBLE_DEVICES' if cuda else
               'install the GPU build with `pip install -r requirements-cu112.txt` (README, "GPUs")')
        raise UserError(f'{option}: {build}; {fix}, or train on the CPU with --ctx cpu:N')
    return [mx.gpu(i) for i in ids]
