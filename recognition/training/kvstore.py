"""Devices and kvstore: which contexts this process trains on, how gradients are reduced, who is chief.

`device` and `local` reduce the gradients of this process's contexts (on the devices or on the CPU).
The distributed kvstores (`dist_sync`, `dist_device_sync`, `dist_async`) add rank and world size; only
rank 0 (the chief) verifies, logs to mxboard and writes checkpoints.
"""
from dataclasses import dataclass, field
from typing import Any, List

from ..utils import UserError, parse_contexts

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

    def describe(self):
        where = ', '.join(str(c) for c in self.contexts)
        dist = f', rank {self.rank} of {self.num_workers}' if self.num_workers > 1 else ''
        return f'contexts [{where}], kvstore {self.name}{dist}'


def setup(gpus='', ctx='', kvstore='device'):
    """Contexts from `--gpus`/`--ctx` and the kvstore named by `--kvstore`."""
    import mxnet as mx
    contexts = parse_contexts(gpus, ctx)
    if kvstore in LOCAL_KVSTORES:
        return Topology(contexts, kvstore, name=kvstore)
    if kvstore in DIST_KVSTORES:
        kv = mx.kv.create(kvstore)
        return Topology(contexts, kv, rank=kv.rank, num_workers=kv.num_workers, name=kvstore)
    raise UserError(f'--kvstore {kvstore!r}: choose from {", ".join(LOCAL_KVSTORES + DIST_KVSTORES)}')
