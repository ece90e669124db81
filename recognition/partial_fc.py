"""Partial FC (An et al. 2021; insightface's `sample_rate`) with model-parallel fc7 (insightface's MXNet
`train_parall.py`): a sampled, sharded classifier for millions of identities.

Sampling (`--sample-ratio R`): each step keeps every class of the global batch plus classes drawn uniformly
from the others, `k = ceil(R * classes)` in all (raised to the batch's largest possible class count when R
is smaller, with a log line). The draw is a function of (seed, step, the batch's labels) only, so a resumed
run draws the same columns. The margin head runs unchanged on the sampled rows of `fc7_weight` (and
`fc7_bias`) with the labels remapped to their positions: every head of `losses.py` whose `hybrid_forward`
takes `(emb, label, fc7_weight[, fc7_bias])` and reads `self.num_classes` works on sampled columns.

Sharding: with n contexts, context j holds rows `[lo_j, hi_j)` of fc7 and of its momentum. The batch's
embeddings are gathered to every shard, each shard computes the logits of its sampled rows, and the softmax
normalisation is combined across shards (row max, then the sum of exponentials), so the loss and all
gradients equal those of one softmax over all sampled columns.

Optimizer: SGD with the Trainer's lr, wd and momentum and fc7's lr / wd multipliers, as MXNet's lazy
row-sparse update: only the sampled rows move, and momentum and weight decay apply only to them (Partial
FC's semantics); an unsampled row keeps its weight and momentum unchanged for that step. At R = 1 every row
is sampled and this is the dense SGD step of the full head.

Parameter server (`--kvstore dist_sync`): fc7 is a row_sparse key on the servers, which run the update
(`ServerUpdate`); each worker `row_sparse_pull`s its step's sampled rows and pushes their row-sparse
gradient. The workers exchange their labels through the kvstore first, so all of them sample the same
columns from the global batch. The momentum of fc7 then lives on the servers, which cannot save it: a
dist resume restarts fc7's momentum (the other parameters' momentum is restored as before).

Checkpoints stay insightface's: the head's `fc7_weight` Parameter (in host memory) is the merged copy,
refreshed from the shards by `sync_params` before every save.
"""
import copy
import math

import mxnet as mx
import numpy as np

from recognition.utils import UserError

# kvstore keys: above the Trainer's parameter indices and distributed.StopVote.KEY (100000).
LABEL_KEY = 100001
ROW_KEY = 100002


def check_ratio(ratio):
    """`--sample-ratio`: a float in (0, 1]."""
    try:
        ratio = float(ratio)
    except (TypeError, ValueError):
        raise UserError(f'--sample-ratio {ratio!r}: expected a number in (0, 1]') from None
    if not 0.0 < ratio <= 1.0 or not math.isfinite(ratio):
        raise UserError(f'--sample-ratio {ratio:g}: must be in (0, 1] (1 = the full fc7)')
    return ratio


class ClassSampler:
    """The sampled classes of a step: the batch's own classes plus a uniform draw without replacement from
    the others, `size` in all, sorted; the draw is seeded by (seed, step)."""

    def __init__(self, num_classes, ratio, seed, batch, log=print):
        self.num_classes = int(num_classes)
        self.seed = int(seed) % 2 ** 32
        self.size = min(self.num_classes, int(math.ceil(check_ratio(ratio) * self.num_classes)))
        fit = min(self.num_classes, int(batch))
        if self.size < fit:
            log(f'--sample-ratio {ratio:g}: {self.size} of {self.num_classes} classes cannot hold the up to '
                f'{fit} classes of a batch of {batch}; sampling {fit} classes per step '
                f'(ratio {fit / self.num_classes:.4g})')
            self.size = fit

    def sample(self, step, labels):
        """Sorted int64 class ids: the classes in `labels` and `size - len(them)` drawn from the rest."""
        positive = np.unique(np.asarray(labels, dtype=np.int64))
        need = self.size - len(positive)
        if need <= 0:
            return positive
        rng = np.random.default_rng([self.seed, int(step)])
        ranks = np.sort(rng.choice(self.num_classes - len(positive), size=need, replace=False))
        # The r-th class not in `positive` is r + #{p_j : p_j - j <= r}.
        negative = ranks + np.searchsorted(positive - np.arange(len(positive)), ranks, side='right')
        return np.union1d(positive, negative)


def shard_bounds(num_classes, num_shards, log=print):
    """`[lo, hi)` row ranges of `num_shards` shards, sizes differing by at most one row (logged when uneven)."""
    if num_classes < num_shards:
        raise UserError(f'--sample-ratio: {num_classes} classes cannot be sharded over {num_shards} contexts '
                        f'(at least one class per context)')
    sizes = [num_classes // num_shards + (j < num_classes % num_shards) for j in range(num_shards)]
    if num_classes % num_shards:
        log(f'fc7: {num_classes} classes do not divide into {num_shards} contexts: shards of {sizes[0]} and '
            f'{sizes[-1]} rows')
    edges = np.concatenate([[0], np.cumsum(sizes)])
    return [(int(edges[j]), int(edges[j + 1])) for j in range(num_shards)]


class ServerUpdate(mx.optimizer.SGD):
    """The servers' optimizer in a dist_sync Partial FC run: SGD (lazy, row-sparse) on the fc7 keys; every
    other key keeps the sum of the workers' pushes, which is what a server without an optimizer stores
    (the Trainer's gradients, `StopVote`, the label exchange), so the rest of the training is unchanged."""

    def __init__(self, row_keys, **kwargs):
        super().__init__(lazy_update=True, **kwargs)
        self.row_keys = set(row_keys)
        self.aggregate_num = 0

    def create_state_multi_precision(self, index, weight):
        return self.create_state(index, weight) if index in self.row_keys else None

    def update_multi_precision(self, index, weight, grad, state):
        if index in self.row_keys:
            super().update(index, weight, grad, state)
        else:
            weight[:] = grad


class PartialFC:
    """The sampled (and sharded) fc7 of a TrainingSession; see the module docstring.

    `head`: a margin head whose class rows (`fc7_weight`, `fc7_bias`) this object takes over from the
    Trainer. `kvstore`: a dist_sync kvstore (rank, num_workers) to keep fc7 on the servers, else None.
    """

    def __init__(self, head, contexts, ratio, seed, global_batch, wd, momentum, log=print,
                 kvstore=None, rank=0, num_workers=1, lr_scheduler=None, begin_step=0):
        self.contexts = list(contexts)
        self.num_classes = int(head.num_classes)
        self.global_batch = int(global_batch)
        self.wd, self.momentum = float(wd), float(momentum)
        self.log = log
        # Gluon's own map from hybrid_forward's argument names to the head's parameters.
        rows = dict(head._reg_params)
        if 'fc7_weight' not in rows:
            raise UserError(f'--sample-ratio: the {type(head).__name__} head has no fc7_weight of its own to sample')
        others = [p.name for p in rows.values() if p.shape[0] != self.num_classes]
        if others:
            raise UserError(f'--sample-ratio: the head has parameters that are not class rows ({others[0]}); '
                            f'Partial FC samples only fc7 rows')
        self.rows = rows
        self.sampler = ClassSampler(self.num_classes, ratio, seed, global_batch, log)
        self.bounds = shard_bounds(self.num_classes, len(self.contexts), log)
        self.head = copy.copy(head)   # a private copy whose num_classes is set per shard and step
        for p in rows.values():
            p.grad_req = 'null'       # the Trainer does not see them: no dense gradient, no dense update
            if p.list_ctx() != [mx.cpu()]:
                p.reset_ctx(mx.cpu())  # the merged copy, for checkpoints (the trainer builds it there)
        self.kv, self.rank, self.num_workers = kvstore, rank, num_workers
        self.keys = {attr: ROW_KEY + i for i, attr in enumerate(sorted(rows))}
        self._step = None
        self.weights = [{} for _ in self.contexts]
        self.moments = [{} for _ in self.contexts]
        if self.kv is None:
            self.load()
        else:
            self._join_servers(lr_scheduler, begin_step)

    # --- storage ------------------------------------------------------------------------------------
    def _shared(self):
        """One shard on the CPU: it is the head's parameter array itself (updated in place, no copy)."""
        return len(self.contexts) == 1 and self.contexts[0] == mx.cpu()

    def load(self, arrays=None):
        """Shards from the head's (merged) parameters; momentum from `arrays` (`momentum_arrays`) or zero."""
        arrays = arrays or {}
        for j, (ctx, (lo, hi)) in enumerate(zip(self.contexts, self.bounds)):
            for attr, p in self.rows.items():
                master = p.data(mx.cpu())
                self.weights[j][attr] = master if self._shared() else master[lo:hi].copyto(ctx)
                saved = arrays.get(self._momentum_key(p))
                if saved is not None and tuple(saved.shape) != tuple(master.shape):
                    raise UserError(f'resume: {self._momentum_key(p)} has shape {tuple(saved.shape)}, fc7 here '
                                    f'{tuple(master.shape)}')
                self.moments[j][attr] = (saved[lo:hi].copyto(ctx) if saved is not None
                                         else mx.nd.zeros((hi - lo,) + master.shape[1:], ctx=ctx))

    @staticmethod
    def _momentum_key(param):
        return f'partial_fc:{param.name}:momentum'

    def momentum_arrays(self):
        """name -> merged momentum (CPU) of every class-row parameter, for the resume snapshot; none in dist
        (the servers hold it)."""
        if self.kv is not None or not self.momentum:
            return {}
        return {self._momentum_key(p): mx.nd.concat(*[m[attr].copyto(mx.cpu()) for m in self.moments], dim=0)
                for attr, p in self.rows.items()}

    def sync_params(self):
        """Write the shards (or the servers' rows) into the head's merged parameters before a save."""
        if self.kv is not None:
            everything = mx.nd.arange(self.num_classes, dtype='int64')
            for attr, p in self.rows.items():
                out = mx.nd.sparse.zeros('row_sparse', self._kv_shape(p))
                self.kv.row_sparse_pull(self.keys[attr], out=out, row_ids=everything)
                p.set_data(out.tostype('default').reshape(p.shape))
        elif not self._shared():
            for attr, p in self.rows.items():
                master = p.data(mx.cpu())
                for (lo, hi), w in zip(self.bounds, self.weights):
                    master[lo:hi] = w[attr].copyto(mx.cpu())
        mx.nd.waitall()

    # --- the parameter server -----------------------------------------------------------------------
    @staticmethod
    def _kv_shape(param):
        """Row-sparse keys are 2-D: fc7_bias travels as (classes, 1)."""
        return (param.shape[0], int(np.prod(param.shape[1:], dtype=np.int64)))

    def _join_servers(self, lr_scheduler, begin_step):
        """Collective, once per job: the chief gives the servers `ServerUpdate` (its schedule resumed at
        `begin_step`) and its rows, which become row_sparse keys; every worker waits for both."""
        kv = self.kv
        if self.rank == 0:
            opt = ServerUpdate(self.keys.values(), learning_rate=lr_scheduler.base_lr, wd=self.wd,
                               momentum=self.momentum, rescale_grad=1.0 / self.global_batch,
                               lr_scheduler=lr_scheduler, begin_num_update=begin_step)
            opt.num_update = begin_step
            opt.lr_mult = {self.keys[a]: p.lr_mult for a, p in self.rows.items()}
            opt.wd_mult = {self.keys[a]: p.wd_mult for a, p in self.rows.items()}
            kv.set_optimizer(opt)
        kv.init(LABEL_KEY, mx.nd.zeros((self.global_batch,)))
        self._labels = mx.nd.zeros((self.global_batch,))
        for attr, p in sorted(self.rows.items()):
            shape = self._kv_shape(p)
            value = mx.nd.sparse.row_sparse_array(
                (p.data(mx.cpu()).reshape(shape), mx.nd.arange(shape[0], dtype='int64')), shape=shape)
            kv.init(self.keys[attr], value)
        mx.nd.waitall()
        kv._barrier()   # MXNet 1.9's worker barrier has no public name

    def _global_labels(self, labels):
        """Every worker's labels of this step (rank-major), through one small pushpull."""
        mine = np.zeros(self.global_batch, dtype=np.float32)
        n = len(labels)
        mine[self.rank * n:(self.rank + 1) * n] = labels
        # A new array each time: the dist kvstore writes the round's sum into the pushed array too.
        self.kv.pushpull(LABEL_KEY, mx.nd.array(mine), out=self._labels)
        return self._labels.asnumpy().astype(np.int64)

    # --- one step -----------------------------------------------------------------------------------
    def forward(self, embs, ys, step):
        """Per-sample loss slices (one per context, as `embs`) and the count of correct argmaxes over the
        sampled columns. Call under `autograd.record`; `update` applies the step after the backward pass."""
        autograd = mx.autograd
        labels = np.concatenate([y.asnumpy() for y in ys]).astype(np.int64)
        with autograd.pause():
            index = self.sampler.sample(step, labels if self.kv is None else self._global_labels(labels))
            self._step = [self._gather(index, j) for j in range(len(self.contexts))]
        c0 = self.contexts[0]
        parts = []   # (ctx, logits, local labels, has target)
        for j, (ctx, (lo, hi)) in enumerate(zip(self.contexts, self.bounds)):
            sel, leaves, _ = self._step[j]
            if not len(sel):
                continue
            pos = np.searchsorted(sel, labels - lo)
            has = (pos < len(sel)) & (sel[np.minimum(pos, len(sel) - 1)] == labels - lo)
            local = np.where(has, pos, len(sel))   # out of range: no column is this sample's target here
            emb = embs[0] if len(embs) == 1 and embs[0].context == ctx else mx.nd.concat(
                *[e.as_in_context(ctx) for e in embs], dim=0)
            head = self.head
            head.num_classes = len(sel)
            label = mx.nd.array(local, ctx=ctx)
            logits = head.hybrid_forward(mx.nd, emb, label, **leaves)
            parts.append((ctx, logits, label, mx.nd.array(has, ctx=ctx), len(sel)))
        top = None
        for ctx, logits, _, _, _ in parts:
            m = logits.max(axis=1).detach().as_in_context(c0)
            top = m if top is None else mx.nd.maximum(top, m)
        total, target = 0, 0
        for ctx, logits, label, has, k in parts:
            shifted = mx.nd.broadcast_sub(logits, top.as_in_context(ctx).reshape((-1, 1)))
            total = total + mx.nd.exp(shifted).sum(axis=1).as_in_context(c0)
            target = target + (mx.nd.pick(logits, mx.nd.clip(label, 0, k - 1), axis=1) * has).as_in_context(c0)
        loss = mx.nd.log(total) + top - target
        correct = int((target >= top).sum().asscalar())
        out, start = [], 0
        for e in embs:
            out.append(loss[start:start + e.shape[0]].as_in_context(e.context))
            start += e.shape[0]
        return out, correct

    def _gather(self, index, j):
        """Shard j's part of a step: (its sampled class ids relative to the shard, {attr: those rows with a
        gradient buffer}, the ids as an NDArray: relative to the shard locally, global on the servers)."""
        ctx, (lo, hi) = self.contexts[j], self.bounds[j]
        sel = index[(index >= lo) & (index < hi)]
        if not len(sel):
            return sel - lo, {}, None
        ids = mx.nd.array(sel if self.kv is not None else sel - lo, ctx=ctx, dtype='int64')
        leaves = {}
        for attr, p in self.rows.items():
            if self.kv is None:
                rows = mx.nd.take(self.weights[j][attr], ids)
            else:
                out = mx.nd.sparse.zeros('row_sparse', self._kv_shape(p), ctx=ctx)
                self.kv.row_sparse_pull(self.keys[attr], out=out, row_ids=ids)
                rows = out.data.reshape((len(sel),) + p.shape[1:])
            rows.attach_grad()
            leaves[attr] = rows
        return sel - lo, leaves, ids

    def update(self, lr):
        """The SGD step on the sampled rows (lazy: momentum and weight decay only there)."""
        if self.kv is not None:
            return self._push()
        for j, (_, leaves, ids) in enumerate(self._step):
            for attr, rows in leaves.items():
                p, weight = self.rows[attr], self.weights[j][attr]
                grad = mx.nd.sparse.row_sparse_array((rows.grad, ids), shape=weight.shape)
                kwargs = dict(out=weight, lr=lr * p.lr_mult, wd=self.wd * p.wd_mult, lazy_update=True,
                              rescale_grad=1.0 / self.global_batch)
                if self.momentum:
                    mx.nd.sgd_mom_update(weight, grad, self.moments[j][attr], momentum=self.momentum, **kwargs)
                else:
                    mx.nd.sgd_update(weight, grad, **kwargs)
        self._step = None

    def _push(self):
        """dist: one row-sparse gradient per key (all shards' rows) to the servers, which update."""
        c0 = self.contexts[0]
        for attr, p in self.rows.items():
            shape = self._kv_shape(p)
            grads = [leaves[attr].grad.reshape((-1, shape[1])).as_in_context(c0)
                     for _, leaves, _ in self._step if leaves]
            ids = [i.as_in_context(c0) for _, _, i in self._step if i is not None]
            grad = mx.nd.sparse.row_sparse_array((mx.nd.concat(*grads, dim=0), mx.nd.concat(*ids, dim=0)),
                                                 shape=shape, ctx=c0)
            self.kv.push(self.keys[attr], grad)
        self._step = None
