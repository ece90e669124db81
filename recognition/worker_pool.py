"""The one way the library starts worker processes for its own jobs."""
import multiprocessing


def spawn_pool(processes, initializer=None, initargs=()):
    """A multiprocessing Pool of spawned, not forked, workers: a fork of a process whose OpenCV or
    MXNet thread pool is already running can deadlock in the child. Workers import what they need
    afresh, so their per-process state comes from `initializer(*initargs)`."""
    return multiprocessing.get_context('spawn').Pool(processes, initializer, initargs)
