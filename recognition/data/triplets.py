"""Triplet batches over a rec for the pair-wise losses (`losses.TripletHead`, `losses.FusionHead`).

Each epoch pairs up the images of every identity with at least two (shuffled, consecutive pairs, so an
identity of n images gives n // 2 (anchor, positive) pairs), shuffles all pairs, and gives each pair a
negative slot: a random image of another identity. A batch is one chunk per context, each chunk
`[anchors | positives | negative slots]` of T = per-context batch / 3 rows, so the split over contexts
(`split_and_load`, contiguous slices) hands every context whole triplets. The loss mines each anchor's
negative among all samples of its chunk; the slot only guarantees there are candidates.

Every draw comes from `np.random.default_rng([seed, epoch, TRIPLET_STREAM])`: the same seed and epoch give
the same batches, and a resumed run skips whole batches of that order. Images are read and augmented by the
train loader's `_BatchReader`, so each sample's augmentation stays keyed by (seed, epoch, index).
"""
import numpy as np
from mxnet import gluon

from recognition.data.dataset import BatchLoader
from recognition.utils import UserError

# The third entry of the generator key: keeps this sampler's stream apart from the epoch order's [seed, epoch].
TRIPLET_STREAM = 3


def check_triplet_batch(per_batch_size, loss):
    """One line refusing a per-context batch that is not whole (anchor, positive, negative) triplets."""
    if per_batch_size < 3 or per_batch_size % 3:
        low = max(3, per_batch_size // 3 * 3)
        raise UserError(f'--per-batch-size {per_batch_size}: --loss {loss} trains on (anchor, positive, negative) '
                        f'triplets, so the batch per context must be a multiple of 3 (e.g. {low} or {low + 3})')


class TripletSampler(gluon.data.Sampler):
    """Batches of sample indices, each `contexts` chunks of `[anchors | positives | negatives]`.

    `identities` restricts the pool (step 3, hard samples); `part=(rank, workers)` keeps this worker's strided
    share of every epoch's pairs. Iterating yields the current epoch's batches, then advances the epoch;
    `set_epoch(e, skip)` jumps to epoch e and drops its first `skip` batches (resume).
    """

    def __init__(self, dataset, per_context, contexts=1, seed=0, identities=None, part=None):
        self.per_context, self.contexts, self.seed = int(per_context), int(contexts), int(seed)
        self.triplets = self.per_context // 3
        wanted = dataset.identities if identities is None else np.asarray(list(identities), np.int64)
        ranges = [dataset.id2range[int(i)] for i in wanted if int(i) in dataset.id2range]
        self.groups = [np.arange(a, b) for a, b in ranges if b - a >= 2]
        self.pool = np.concatenate([np.arange(a, b) for a, b in ranges]) if ranges else np.zeros(0, np.int64)
        self.labels = np.asarray(dataset.labels)
        where = dataset.rec_paths[0] if hasattr(dataset, 'rec_paths') else 'dataset'
        if not self.groups:
            raise UserError(f'{where}: no identity with 2 or more images, so no (anchor, positive) pair for a '
                            f'triplet loss')
        if len(ranges) < 2:
            raise UserError(f'{where}: a triplet loss needs at least 2 identities (negatives), found {len(ranges)}')
        self.rank, self.parts = part or (0, 1)
        self.num_pairs = sum(len(g) // 2 for g in self.groups) // self.parts
        self.epoch, self._skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self._skip = int(epoch), int(skip)

    def batches(self, epoch):
        """This worker's batches of `epoch` (lists of dataset indices), a pure function of (seed, epoch)."""
        rng = np.random.default_rng([self.seed, int(epoch), TRIPLET_STREAM])
        pairs = []
        for group in self.groups:
            images = group[rng.permutation(group.size)]
            pairs.append(images[:images.size // 2 * 2].reshape(-1, 2))
        pairs = np.concatenate(pairs)
        pairs = pairs[rng.permutation(len(pairs))][self.rank::self.parts][:self.num_pairs]
        negatives = self.pool[rng.integers(0, self.pool.size, len(pairs))]
        clash = self.labels[negatives] == self.labels[pairs[:, 0]]
        while clash.any():   # redraw the slots that hit the anchor's own identity
            negatives[clash] = self.pool[rng.integers(0, self.pool.size, int(clash.sum()))]
            clash = self.labels[negatives] == self.labels[pairs[:, 0]]
        t = self.triplets
        out = []
        for b in range(len(self)):
            batch = []
            for c in range(self.contexts):
                rows = slice((b * self.contexts + c) * t, (b * self.contexts + c + 1) * t)
                batch += pairs[rows, 0].tolist() + pairs[rows, 1].tolist() + negatives[rows].tolist()
            out.append(batch)
        return out

    def __iter__(self):
        batches, skip = self.batches(self.epoch), self._skip
        self.epoch, self._skip = self.epoch + 1, 0
        return iter(batches[skip:])

    def __len__(self):
        """Whole batches per epoch (the pairs left over are dropped, like the train loader's last batch)."""
        return self.num_pairs // (self.triplets * self.contexts)


class TripletLoader(BatchLoader):
    """A :class:`TripletSampler`'s batches with the train loader's interface (`set_epoch`, `epoch`, iteration
    of (data, label) NDArrays); the sampler yields whole batches itself."""

    def __init__(self, dataset, sampler, num_workers=0):
        super().__init__(dataset, sampler, sampler, sampler.seed, num_workers)

    def set_epoch(self, epoch, start_batch=0):
        self.sampler.set_epoch(epoch, start_batch)

    def __len__(self):
        return len(self.sampler)
