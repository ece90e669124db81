"""The Gluon dataset over identity-indexed rec shards, the epoch-seeded sampler and the train loader.

Only the index lives in memory (keys, shard of each sample, identity ranges): images are read with
`pread` and decoded with cv2 on demand, so the dataset opens MS1M-sized recs in seconds and forks
cheaply into DataLoader workers.
"""
import ctypes
import glob
import logging
import os

import cv2
import numpy as np
from mxnet import gluon, nd
from mxnet.base import _LIB, check_call
import mxnet as mx

from recognition.data.record import RecordFile, check_classes, property_path, read_layout, unpack_header
from recognition.data.shards import check_against_manifest, rec_order, set_totals
from recognition.data.transforms import sample_rng, to_chw
from recognition.utils import UserError

log = logging.getLogger(__name__)


def expand_rec_paths(paths):
    """A rec path, a glob ('train_*.rec') or a list of either -> existing rec paths, a glob's in `rec_order`.

    A shard whose prefix has a manifest (`recognition.data.shards`) must be one it names, at its size.
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out = []
    for p in items:
        p = os.fspath(p)
        if glob.has_magic(p):
            found = rec_order(glob.glob(p))
            if not found:
                raise UserError(f'{p}: no rec file matches')
            out += found
        else:
            out.append(p if p.endswith('.rec') else p + '.rec')
    if not out:
        raise UserError('no rec file given')
    check_against_manifest(out)
    return out


def _stored_image_size(record, layout):
    """(H, W) of the rec's first image as stored, or None if it does not decode."""
    if not layout.num_images:
        return None
    body = unpack_header(record.read(int(layout.image_keys[0])))[2]
    img = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)
    return None if img is None else tuple(img.shape[:2])


class FaceRecordDataset(gluon.data.Dataset):
    """Faces from one or many rec shards; sample i -> (CHW float32 RGB 0..255, label).

    label is the identity (float32) or, with `return_attributes`, float32 [identity, *attributes].
    `images_filter` drops identities with fewer images (insightface's `images_filter`);
    `identities` keeps only the given identity ids. Labels are never renumbered: they are the ids
    the classifier (fc7) is indexed by, with `num_classes` from `property`.
    """

    def __init__(self, paths, images_filter=0, transform=None, identities=None, return_attributes=False):
        self.rec_paths = expand_rec_paths(paths)
        self.transform = transform
        self.return_attributes = return_attributes
        self._files = [RecordFile(p) for p in self.rec_paths]
        layouts = [read_layout(p, f) for p, f in zip(self.rec_paths, self._files)]
        first = layouts[0]
        for lay in layouts[1:]:
            if lay.attribute_names != first.attribute_names or lay.label_width != first.label_width:
                raise UserError(f'{lay.rec_path}: labels differ from {first.rec_path} '
                                f'({lay.attribute_names} vs {first.attribute_names})')
        self.attribute_names = list(first.attribute_names)
        self.attribute_codes = dict(first.attribute_codes)
        self.label_width = first.label_width
        # The images are the truth for their size: a `property` that says otherwise is reported and overruled.
        stored = _stored_image_size(self._files[0], first)
        if stored and first.image_size and stored != tuple(first.image_size):
            log.warning('%s: says %dx%d images, %s stores %dx%d: using %dx%d', property_path(first.rec_path),
                        *first.image_size, first.rec_path, *stored, *stored)
        self.image_size = stored or first.image_size or (112, 112)

        # One row per (shard, identity range); rows of the same identity are merged by a stable sort.
        shard = np.concatenate([np.full(lay.num_identities, s, np.int64) for s, lay in enumerate(layouts)])
        ident = np.concatenate([lay.identities for lay in layouts])
        starts = np.concatenate([lay.ranges[:, 0] for lay in layouts])
        sizes = np.concatenate([lay.ranges[:, 1] - lay.ranges[:, 0] for lay in layouts])
        _, inverse = np.unique(ident, return_inverse=True)
        keep = np.bincount(inverse, weights=sizes, minlength=1)[inverse] >= max(images_filter, 1)
        if identities is not None:
            keep &= np.isin(ident, np.asarray(list(identities), dtype=np.int64))
        order = np.argsort(ident, kind='stable')
        order = order[keep[order]]
        shard, ident, starts, sizes = shard[order], ident[order], starts[order], sizes[order]

        keys = [lay.image_keys for lay in layouts]
        self._keys = (np.concatenate([keys[s][a:a + n] for s, a, n in zip(shard, starts, sizes)])
                      if sizes.size else np.zeros(0, np.int64))
        small = np.int32 if max(int(self._keys.max(initial=0)), int(ident.max(initial=0))) < 2 ** 31 else np.int64
        self._keys = self._keys.astype(small, copy=False)
        self._shard = np.repeat(shard, sizes).astype(np.int16 if len(layouts) < 32768 else np.int64)
        self._labels = np.repeat(ident.astype(small), sizes)
        ends = np.cumsum(sizes)
        self.identities = np.unique(ident)
        self.id2range = {}
        for i, a, b in zip(ident.tolist(), (ends - sizes).tolist(), ends.tolist()):
            self.id2range[i] = (self.id2range[i][0], b) if i in self.id2range else (a, b)
        self.num_classes = self._check_classes(layouts)
        self._sample_attributes = None

    def _check_classes(self, layouts):
        """`property`'s class count, checked against the identities of the whole set (one rec, or the
        shard set's manifest); the largest identity id + 1 without `property`."""
        ids = np.unique(np.concatenate([lay.identities for lay in layouts]))
        max_id = int(ids.max()) if ids.size else -1
        totals = set_totals(self.rec_paths)
        whole = totals is not None or len(layouts) == 1
        n, set_max = totals if totals is not None else (ids.size, max_id)
        what = self.rec_paths[0] if len(self.rec_paths) == 1 else 'the shard set of ' + self.rec_paths[0]
        for lay in layouts:
            if lay.num_classes is not None:
                check_classes(property_path(lay.rec_path), lay.num_classes, n, max(set_max, max_id), what, whole)
        property_classes = [lay.num_classes for lay in layouts if lay.num_classes is not None]
        return max(property_classes) if property_classes else max_id + 1

    def __len__(self):
        return int(self._keys.size)

    @property
    def labels(self):
        """Identity id of every sample (int array), without reading any image."""
        return self._labels

    def _record(self, i):
        record = self._files[self._shard[i]]
        return record, int(self._keys[i])

    def read_raw(self, i):
        """(encoded image bytes, float32 label [identity, aligned, *attributes]) of sample i."""
        record, key = self._record(i)
        flag, label, body = unpack_header(record.read(key))
        return body, self._full_label(flag, label)

    @staticmethod
    def _full_label(flag, label):
        if flag == 0:   # insightface rec_builder: scalar identity label, images aligned
            return np.array([label, 1.0], dtype=np.float32)
        if flag == 1:
            return np.array([label[0], 1.0], dtype=np.float32)
        return np.array(label, dtype=np.float32)

    def decode(self, body, where=''):
        """Encoded bytes -> RGB HWC uint8 at the dataset's image size."""
        img = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise UserError(f'{where}: image does not decode')
        h, w = self.image_size
        if img.shape[:2] != (h, w):
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)

    def sample(self, i, seed=0, epoch=0):
        """(transformed RGB HWC image, label) of sample i: uint8, or float32 after colour jitter.

        The augmentation draws from `sample_rng(seed, epoch, i)`: the same sample in the same epoch of
        the same run is augmented the same way, whichever process reads it and whenever.
        """
        body, label = self.read_raw(i)
        img = self.decode(body, f'{self._files[self._shard[i]].rec_path} record {int(self._keys[i])}')
        if self.transform is not None:
            img = self.transform(img, sample_rng(seed, epoch, i))
        if self.return_attributes:
            return img, np.concatenate([label[:1], label[2:]])
        return img, np.float32(self._labels[i])

    def __getitem__(self, i):
        img, label = self.sample(i)
        return to_chw(img), label

    @property
    def sample_attributes(self):
        """(N, A) float32 attributes of every sample, read from record headers (no decoding; cached)."""
        if self._sample_attributes is None:
            width = len(self.attribute_names)
            out = np.zeros((len(self), width), dtype=np.float32)
            if width:
                for i in range(len(self)):
                    record, key = self._record(i)
                    out[i] = record.read_label(key)[1][2:]
            self._sample_attributes = out
        return self._sample_attributes

    def identity_attributes(self, identity):
        """Attributes of an identity, taken from its first image (gender, skin colour are per identity)."""
        record, key = self._record(self.id2range[int(identity)][0])
        flag, label = record.read_label(key)
        return self._full_label(flag, label)[2:]

    def identities_where(self, **conditions):
        """Sorted identity ids whose attributes match, e.g. identities_where(skin_colour=1, gender='female').

        Values are codes or their meanings from the sidecar; a list matches any of its values.
        """
        columns = []
        for name, wanted in conditions.items():
            if name not in self.attribute_names:
                raise UserError(f'{self.rec_paths[0]}: no attribute {name!r} (have {self.attribute_names})')
            meanings = {v: k for k, v in self.attribute_codes.get(name, {}).items()}
            wanted = wanted if isinstance(wanted, (list, tuple, set)) else [wanted]
            codes = []
            for w in wanted:
                if isinstance(w, str):
                    if w not in meanings:
                        raise UserError(f'{self.rec_paths[0]}: {name} has no value {w!r} '
                                        f'(have {sorted(meanings)})')
                    w = meanings[w]
                codes.append(float(w))
            columns.append((self.attribute_names.index(name), codes))
        out = []
        for identity in self.identities.tolist():
            attrs = self.identity_attributes(identity)
            if all(attrs[c] in codes for c, codes in columns):
                out.append(identity)
        return out

    def indices_of(self, identities):
        """Sample indices of the given identities (in identity-range order)."""
        parts = [np.arange(*self.id2range[int(i)]) for i in identities if int(i) in self.id2range]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class EpochSampler(gluon.data.Sampler):
    """Sample indices in an order fixed by (seed, epoch), so a resumed run repeats it exactly.

    Each iteration uses the current epoch and then advances it; `set_epoch(e, skip)` jumps to epoch
    e and drops its first `skip` indices (for resuming mid-epoch).
    """

    def __init__(self, indices, shuffle=True, seed=0, part=None):
        self.indices = np.asarray(indices, dtype=np.int64)
        self.shuffle = shuffle
        self.seed = seed
        # (rank, parts): this worker's strided slice of every epoch's order, all slices equally long,
        # so the workers of a distributed run see disjoint samples and run the same number of steps.
        self.rank, self.parts = part or (0, 1)
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self._skip = int(epoch), int(skip)

    def order(self, epoch):
        order = self.indices
        if self.shuffle:
            order = order[np.random.default_rng([self.seed, epoch]).permutation(order.size)]
        return order[self.rank::self.parts][:order.size // self.parts]

    def __iter__(self):
        order, skip = self.order(self.epoch), self._skip
        self.epoch, self._skip = self.epoch + 1, 0
        return iter(order[skip:].tolist())

    def __len__(self):
        return max(self.indices.size // self.parts - self._skip, 0)


def _numpy_view(array):
    """A writable numpy array over a CPU NDArray's own memory (no copy; keep `array` alive)."""
    ptr = ctypes.c_void_p()
    check_call(_LIB.MXNDArrayGetData(array.handle, ctypes.byref(ptr)))
    dtype = np.dtype(array.dtype)
    size = int(np.prod(array.shape)) * dtype.itemsize
    return np.frombuffer((ctypes.c_uint8 * size).from_address(ptr.value), dtype=dtype).reshape(array.shape)


class _BatchReader(gluon.data.Dataset):
    """A dataset whose items are whole batches: reader[(epoch, indices)] -> (B x H x W x 3 images, labels).

    Each image is decoded, transformed and written straight into its slot of the batch. In a worker
    process the batch is an NDArray in shared memory, so only a handle crosses to the main process;
    it stays HWC uint8 (4x less memory than float32) and is converted once per batch in the main one.
    """

    def __init__(self, dataset, shared, seed):
        self.dataset = dataset
        self.shared = shared
        self.seed = seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        epoch, indices = item
        data = labels = out = None
        for j, i in enumerate(indices):
            img, label = self.dataset.sample(i, self.seed, epoch)
            if out is None:   # the first sample fixes the dtype (float32 after colour jitter)
                shape = (len(indices),) + img.shape
                if self.shared:
                    data = nd.empty(shape, ctx=mx.Context('cpu_shared', 0), dtype=img.dtype)
                    out = _numpy_view(data)
                else:
                    data = out = np.empty(shape, img.dtype)
                labels = np.empty((len(indices),) + np.shape(label), np.float32)
            out[j] = img
            labels[j] = label
        return data, labels


def _whole_batch(samples):
    """batchify_fn for _BatchReader: the one item already is the batch."""
    return samples[0]


class _WholeBatches(gluon.data.Sampler):
    """Each batch of indices wrapped as a single item `(epoch, indices)`, so one worker task reads one
    whole batch and knows the epoch that keys its augmentation."""

    def __init__(self, batch_sampler, sampler):
        self.batch_sampler = batch_sampler
        self.sampler = sampler

    def __iter__(self):
        epoch = self.sampler.epoch   # read before the batch sampler's iteration advances it
        for batch in self.batch_sampler:
            yield [(epoch, batch)]

    def __len__(self):
        return len(self.batch_sampler)


def batch_to_nchw(batch):
    """B x H x W x C images (numpy or CPU NDArray) -> NDArray B x C x H x W float32, one pass per channel.

    numpy writes into a fresh array that MXNet then wraps without copying: MXNet's own cast and
    transpose run ~5x slower here, and a new NDArray buffer per batch costs page faults.
    """
    src = _numpy_view(batch) if isinstance(batch, nd.NDArray) else batch
    n, h, w, c = src.shape
    out = np.empty((n, c, h, w), np.float32)
    for ch in range(c):
        out[:, ch] = src[..., ch]
    return nd.from_numpy(out, zero_copy=True)


class BatchLoader:
    """What every training loader shares: whole batches of `batches` (lists of sample indices) read in the
    worker processes of a gluon DataLoader, a batch a task, and yielded as (data NDArray Bx3xHxW float32, label
    NDArray); `sampler` holds the epoch (`set_epoch`, `epoch`)."""

    def __init__(self, dataset, batches, sampler, seed, num_workers=0):
        self.sampler = sampler
        self._loader = gluon.data.DataLoader(_BatchReader(dataset, shared=num_workers > 0, seed=seed),
                                             batch_sampler=_WholeBatches(batches, sampler),
                                             batchify_fn=_whole_batch, num_workers=num_workers)

    @property
    def epoch(self):
        return self.sampler.epoch

    def __iter__(self):
        for data, label in self._loader:
            yield batch_to_nchw(data), nd.array(label, dtype=np.float32)


class FaceLoader(BatchLoader):
    """Batches (data NDArray Bx3xHxW float32, label NDArray) from a FaceRecordDataset."""

    def __init__(self, dataset, batch_size, num_workers=0, shuffle=True, seed=0, identities=None,
                 last_batch='discard', start_batch=0, epoch=0, part=None, sampler=None):
        self.batch_size = batch_size
        if sampler is None:
            indices = dataset.indices_of(identities) if identities is not None else np.arange(len(dataset))
            if indices.size == 0:
                raise UserError(f'{dataset.rec_paths[0]}: no samples to load')
            sampler = EpochSampler(indices, shuffle=shuffle, seed=seed, part=part)
        sampler.set_epoch(epoch, start_batch * batch_size)
        self.batch_sampler = gluon.data.BatchSampler(sampler, batch_size, last_batch)
        super().__init__(dataset, self.batch_sampler, sampler, seed, num_workers)

    def set_epoch(self, epoch, start_batch=0):
        """The next iteration yields epoch `epoch`'s order from batch `start_batch` on."""
        self.sampler.set_epoch(epoch, start_batch * self.batch_size)

    def __len__(self):
        return len(self.batch_sampler)


def train_loader(dataset, batch_size, num_workers=0, shuffle=True, seed=0, identities=None,
                 last_batch='discard', start_batch=0, epoch=0, part=None, sampler=None):
    """The training loader: gluon DataLoader with worker processes, an epoch-seeded order, an optional
    identity subset (step 3, hard samples) and an optional `part=(rank, workers)` slice (dist kvstore).
    `sampler` (an EpochSampler, e.g. `sampler.BalancedSampler`) replaces the uniform order."""
    return FaceLoader(dataset, batch_size, num_workers=num_workers, shuffle=shuffle, seed=seed,
                      identities=identities, last_batch=last_batch, start_batch=start_batch, epoch=epoch,
                      part=part, sampler=sampler)


def _caption(dataset, label, width, scale):
    """Caption words (identity, then attribute=meaning) wrapped greedily to the tile width; a pair too
    wide for one line breaks after its '='."""
    def fits(text):
        return cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] <= width - 4

    words = ['id %d' % label[0]]
    for name, value in zip(dataset.attribute_names, label[2:]):
        meaning = dataset.attribute_codes.get(name, {}).get(int(value)) if float(value).is_integer() else None
        word = '%s=%s' % (name, meaning or ('%g' % value))
        words += [word] if fits(word) else [name + '=', meaning or ('%g' % value)]
    lines = ['']
    for word in words:
        candidate = (lines[-1] + ' ' + word).strip()
        if lines[-1] and (lines[-1].endswith('=') or not fits(candidate)):
            lines.append(word)
        else:
            lines[-1] = candidate
    return lines


def contact_sheet(dataset, indices, columns=8, scale=0.33):
    """A BGR grid of the given samples, each captioned with identity and attribute values."""
    tile_h, tile_w = dataset.image_size
    samples = [dataset.read_raw(int(i)) for i in indices]
    captions = [_caption(dataset, label, tile_w, scale) for _, label in samples]
    caption_h = 12 * max(len(c) for c in captions) + 4
    rows = max(1, (len(samples) + columns - 1) // columns)
    sheet = np.full((rows * (tile_h + caption_h), columns * tile_w, 3), 255, np.uint8)
    for n, ((body, _), lines) in enumerate(zip(samples, captions)):
        y, x = (n // columns) * (tile_h + caption_h), (n % columns) * tile_w
        sheet[y:y + tile_h, x:x + tile_w] = cv2.cvtColor(dataset.decode(body), cv2.COLOR_RGB2BGR)
        for j, text in enumerate(lines):
            cv2.putText(sheet, text, (x + 2, y + tile_h + 11 + 12 * j), cv2.FONT_HERSHEY_SIMPLEX, scale,
                        (0, 0, 0), 1, cv2.LINE_AA)
    return sheet
