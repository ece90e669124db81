"""A lock on a folder, so two processes never write one run folder at once.

The lock is a file created with O_CREAT|O_EXCL (atomic on local file systems and NFSv3+) holding the
owner's host, PID and command. A lock whose PID is dead on this host is stale (the owner was killed) and
is taken over; a lock from another host cannot be checked and is left to the user.
"""
import contextlib
import json
import os
import socket
import sys
import time

from recognition.utils import UserError

LOCK_NAME = '.lock'
# Seconds after which a lock file without an owner record counts as left by a killed writer.
UNWRITTEN_GRACE = 10


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, another user's
        return True
    return True


def _read_owner(lock_path):
    """The owner record of a lock file; None when the file vanished, {} when it holds no valid record."""
    try:
        with open(lock_path) as f:
            owner = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    valid = isinstance(owner, dict) and isinstance(owner.get('pid'), int) and owner['pid'] > 0
    return owner if valid else {}


def _is_stale(owner, lock_path):
    if owner is None:
        return True
    if not owner:   # no record: being written right now, or its writer was killed in that instant
        try:
            return time.time() - os.path.getmtime(lock_path) > UNWRITTEN_GRACE
        except FileNotFoundError:
            return True
    return owner.get('host') == socket.gethostname() and not _pid_alive(owner['pid'])


def _try_create(lock_path, record):
    try:
        fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, 'w') as f:
        json.dump(record, f)
    return True


@contextlib.contextmanager
def folder_lock(path, what):
    """Hold `path/.lock` for the block; UserError naming the folder, the owner and `what` when another
    live process holds it. Released when the block exits in any way (a killed process leaves a stale
    lock, which the next run takes over)."""
    os.makedirs(path, exist_ok=True)
    lock_path = os.path.join(path, LOCK_NAME)
    record = {'host': socket.gethostname(), 'pid': os.getpid(), 'command': ' '.join(sys.argv)}
    if not _try_create(lock_path, record):
        owner = _read_owner(lock_path)
        if not _is_stale(owner, lock_path):
            who = (f'pid {owner.get("pid")} on {owner.get("host")}: {owner.get("command", "")[:120]}'
                   if owner else 'an unreadable lock')
            raise UserError(f'{path}: in use by another {what} ({who}); wait for it to end, use another '
                            f'folder, or delete {lock_path} if no such process runs')
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock_path)
        if not _try_create(lock_path, record):
            raise UserError(f'{path}: another {what} took the stale lock {lock_path} at the same moment')
    try:
        yield lock_path
    finally:
        if (_read_owner(lock_path) or {}).get('pid') == record['pid']:   # never another's lock
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock_path)
