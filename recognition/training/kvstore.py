"""Devices and kvstore: which contexts this process trains on, how gradients are reduced, who is chief.

`device` and `local` reduce the gradients of this process's contexts (on the devices or on the CPU).
The distributed kvstores (`dist_sync`, `dist_device_sync`, `dist_async`) add rank and world size; only
rank 0 (the chief) verifies, logs to mxboard and writes checkpoints.

Data: each worker reads its own part: whole shards per rank when the rec has at least as many shards as
there are workers (`shard_plan`), else every worker opens all of it and takes a strided slice of each
epoch's permutation (`part`). Gradients: every worker's batch is `per_batch_size x contexts`; the update
uses the sum over all workers divided by the global batch (`per_batch_size x contexts x workers`), so
`--lr` means the same per-sample step as on one machine and a larger cluster takes larger global batches.
"""
from dataclasses import dataclass, field
from typing import Any, List

from recognition.utils import UserError, parse_contexts

LOCAL_KVSTORES = ('device', 'local')
DIST_KVSTORES = ('dist_sync', 'dist_device_sync', 'dist_async')


@dataclass
class Topology:
    contexts: List[Any]
    kvstore: Any                  # a kvstore name for Trainer, or a created mx.kv.KVStore
    rank: int = 0
    num_workers: int = 1
    name: str = field(default='device')

    @property
    def is_chief(self):
        return self.rank == 0

    @property
    def on_gpu(self):
        return self.contexts[0].device_type == 'gpu'

    @property
    def distributed(self):
        return self.name in DIST_KVSTORES

    @property
    def update_on_kvstore(self):
        """Where the optimizer runs: on the workers for the synchronous kvstores (each worker holds the
        momentum, so `--resume` restores it as on one machine), on the servers for `dist_async` (MXNet
        requires it there; servers cannot save optimizer state, so an async resume restarts the momentum).
        None lets MXNet choose for the local kvstores."""
        if self.name == 'dist_async':
            return True
        return False if self.distributed else None

    @property
    def server_updates(self):
        return bool(self.update_on_kvstore) and self.distributed

    def shard_plan(self, num_shards):
        """The shard indices this worker reads, or None when the samples are partitioned instead."""
        if self.num_workers > 1 and num_shards >= self.num_workers:
            return list(range(self.rank, num_shards, self.num_workers))
        return None

    @property
    def part(self):
        """(rank, num_workers) for a strided partition of each epoch's sample order."""
        return (self.rank, self.num_workers)

    def describe(self):
        where = ', '.join(str(c) for c in self.contexts)
        dist = f', rank {self.rank} of {self.num_workers}' if self.num_workers > 1 else ''
        return f'contexts [{where}], kvstore {self.name}{dist}'


def setup(gpus='', ctx='', kvstore='device'):
    """Contexts from `--gpus`/`--ctx` and the kvstore named by `--kvstore`."""
    import mxnet as mx   # here: see the note on imports in training/loop.py
    contexts = parse_contexts(gpus, ctx)
    if kvstore in LOCAL_KVSTORES:
        return Topology(contexts, kvstore, name=kvstore)
    if kvstore in DIST_KVSTORES:
        kv = mx.kv.create(kvstore)
        return Topology(contexts, kv, rank=kv.rank, num_workers=kv.num_workers, name=kvstore)
    raise UserError(f'--kvstore {kvstore!r}: choose from {", ".join(LOCAL_KVSTORES + DIST_KVSTORES)}')
