"""insightface's identity-indexed RecordIO layout, in one place.

    key 0          header record: label [N+1, N+1+K], empty body
    keys 1..N      image records: label [identity, aligned, *attributes] (a vector, so flag = len)
    keys N+1..N+K  identity records: label [start, end), the half-open key range of its images
    PREFIX.idx     "key<TAB>offset" lines (mx.recordio)
    property       "K,H,W" in the rec's folder
    PREFIX.attributes.json  {"names": [...], "codes": {name: {code: meaning}}}: what label[2:] means

Reading goes through `RecordFile`, which parses the .idx into numpy arrays and reads records with
`os.pread`: a 5.8M-image rec opens in seconds in ~100 MB (mx.recordio's reader builds a Python dict
of every key), and forked DataLoader workers can share it safely (no shared file position).
Recs written by insightface itself are read too: vector labels (flag 2), scalar labels (flag 0,
rec_builder) and recs without identity index (all records are images).
"""
import contextlib
import json
import os
import struct
from dataclasses import dataclass, field

import numpy as np

from recognition.groups import GENDER, GENDER_NAMES, SKIN, SKIN_NAMES
from recognition.utils import UserError, atomic_open, atomic_path, write_json

# The codes the FairFace challenge uses; the sidecar records them so label[2:] is self-describing.
KNOWN_CODES = {GENDER: dict(enumerate(GENDER_NAMES)), SKIN: dict(enumerate(SKIN_NAMES))}

_MAGIC = 0xced7230a
_MAGIC_BYTES = struct.pack('<I', _MAGIC)
_LENGTH_MASK = (1 << 29) - 1
_IR_FORMAT = 'IfQQ'
_IR_SIZE = struct.calcsize(_IR_FORMAT)
_HEAD_READ = 8 + _IR_SIZE + 4 * 16   # enough for a header with up to 16 label values


def split_prefix(path):
    """`a/train.rec`, `a/train.idx` or `a/train` -> `a/train`."""
    path = os.fspath(path)
    for ext in ('.rec', '.idx'):
        if path.endswith(ext):
            return path[:-len(ext)]
    return path


def sidecar_path(prefix):
    return split_prefix(prefix) + '.attributes.json'


def property_path(prefix):
    return os.path.join(os.path.dirname(os.path.abspath(split_prefix(prefix))), 'property')


def write_property(path, num_classes, image_size=(112, 112)):
    """Write insightface's `property` file: `K,H,W`."""
    with atomic_open(path) as f:
        f.write('%d,%d,%d\n' % (num_classes, image_size[0], image_size[1]))


def read_property(path):
    """(K, H, W) from a `property` file, or None if there is none."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    try:
        values = tuple(int(v) for v in text.split(','))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise UserError(f'{path}: expected "num_classes,height,width", got {text!r}')
    return values


def check_classes(prop_path, num_classes, num_identities, max_identity, what, whole=True):
    """Refuse a `property` class count that does not fit the identities of `what` (a rec or shard set).

    fc7 has one row per class, indexed by identity id: the count must exceed every id, and when the
    ids of the whole set (`whole`) are exactly 0..n-1 (a packed list) it must be n. More classes than
    identities stays valid for sparse ids: a subset of a bigger set (hard-sample recs) keeps its
    source's count.
    """
    if num_identities == 0:
        return
    if max_identity >= num_classes:
        raise UserError(f'{prop_path}: says {num_classes} classes, but {what} holds identity ids up to '
                        f'{max_identity} ({max_identity + 1} classes needed); fix it or re-pack with face2rec2')
    if whole and max_identity + 1 == num_identities and num_classes != num_identities:
        raise UserError(f'{prop_path}: says {num_classes} classes, but {what} holds {num_identities} identities '
                        f'(ids 0..{max_identity}); fix it or re-pack with face2rec2')


def write_attributes(path, names, codes):
    """Write the attribute sidecar: names in label order (label[2:]) and code meanings."""
    codes = {n: {str(k): v for k, v in codes.get(n, {}).items()} for n in names}
    write_json(path, {'names': list(names), 'codes': codes})


def read_attributes(path):
    """(names, codes) from a sidecar; codes as {name: {int code: meaning}}. ([], {}) if absent."""
    if not os.path.isfile(path):
        return [], {}
    try:
        with open(path) as f:
            doc = json.load(f)
        names = [str(n) for n in doc['names']]
        codes = {n: {int(k): str(v) for k, v in doc.get('codes', {}).get(n, {}).items()} for n in names}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f'{path}: not an attribute sidecar ({e})') from None
    return names, codes


def pack_record(label, key, body=b''):
    """A record payload as `mx.recordio.pack(IRHeader(0, label, key, 0), body)` builds it:
    a vector label sets flag = len(label) and is stored as float32 before the body.
    """
    if isinstance(label, np.ndarray):
        label = label.reshape(-1).tolist()
    n = len(label)
    return struct.pack('<IfQQ%df' % n, n, 0.0, key, 0, *label) + body


def unpack_header(payload):
    """(flag, label, body) of a record payload; label is a float or a float32 vector."""
    flag, label, _, _ = struct.unpack_from(_IR_FORMAT, payload)
    if flag > 0:
        label = np.frombuffer(payload, dtype=np.float32, count=flag, offset=_IR_SIZE)
        return flag, label, payload[_IR_SIZE + 4 * flag:]
    return flag, label, payload[_IR_SIZE:]


def read_index(idx_path):
    """(keys, offsets) int64 arrays from a `.idx` file, parsed by numpy (no per-line Python objects)."""
    if not os.path.isfile(idx_path):
        raise UserError(f'{idx_path}: missing .idx file (the rec is read by key)')
    with open(idx_path, 'rb') as f:
        text = f.read()
    values = np.fromstring(text.decode('ascii', 'replace'), dtype=np.int64, sep=' ')
    if values.size % 2 or values.size != 2 * text.count(b'\n', 0, len(text.rstrip())) + 2 * bool(text.strip()):
        raise UserError(f'{idx_path}: malformed index (expected "key<TAB>offset" lines)')
    values = values.reshape(-1, 2)
    return np.ascontiguousarray(values[:, 0]), np.ascontiguousarray(values[:, 1])


class RecordFile:
    """Random access to a RecordIO file through its .idx, with only numpy arrays in memory.

    Picklable: the file is reopened lazily in each process (DataLoader workers).
    """

    def __init__(self, rec_path):
        self.rec_path = os.fspath(rec_path)
        if not os.path.isfile(self.rec_path):
            raise UserError(f'{self.rec_path}: no such .rec file')
        self.idx_path = split_prefix(self.rec_path) + '.idx'
        keys, offsets = read_index(self.idx_path)
        size = os.path.getsize(self.rec_path)
        past = np.flatnonzero((offsets < 0) | (offsets + 8 > size))
        if past.size:
            line = int(past[0])
            raise UserError(f'{self.idx_path}:{line + 1}: offset {int(offsets[line])} of key {int(keys[line])} is '
                            f'past the end of {self.rec_path} ({size} bytes); the rec is truncated or '
                            f'the .idx belongs to another rec')
        if keys.size > 1 and not (keys[1:] > keys[:-1]).all():
            order = np.argsort(keys, kind='stable')
            keys, offsets = keys[order], offsets[order]
        # Keys 0..M-1 (every rec we write): the key is the position, so only offsets are kept.
        self._dense = bool(keys.size) and keys[0] == 0 and keys[-1] == keys.size - 1
        self._keys = None if self._dense else keys
        self._offsets = offsets
        self._fd = None
        self._pid = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state['_fd'] = state['_pid'] = None
        return state

    def __len__(self):
        return int(self._offsets.size)

    @property
    def keys(self):
        """All record keys, sorted."""
        return np.arange(self._offsets.size, dtype=np.int64) if self._dense else self._keys

    def __contains__(self, key):
        return self._position(key) is not None

    def _position(self, key):
        if self._dense:
            return int(key) if 0 <= key < self._offsets.size else None
        i = int(np.searchsorted(self._keys, key))
        return i if i < self._keys.size and self._keys[i] == key else None

    def _file(self):
        if self._pid != os.getpid():
            self._fd = os.open(self.rec_path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def close(self):
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = self._pid = None

    def offset(self, key):
        i = self._position(key)
        if i is None:
            raise KeyError(f'{self.rec_path}: no record with key {key}')
        return int(self._offsets[i])

    def _where(self, key):
        """`train.idx:LINE (key K)`: the index line that points at record `key` (scanned on error only)."""
        keys, _ = read_index(self.idx_path)
        lines = np.flatnonzero(keys == key)
        return f'{self.idx_path}:{int(lines[0]) + 1} (key {key})' if lines.size else f'{self.idx_path} key {key}'

    def _chunk(self, key, pos, head=None):
        head = head if head is not None else os.pread(self._file(), 8, pos)
        if len(head) < 8:
            raise UserError(f'{self._where(key)}: {self.rec_path} is truncated at offset {pos}')
        magic, lrec = struct.unpack_from('<II', head)
        if magic != _MAGIC:
            raise UserError(f'{self._where(key)}: no record at offset {pos} of {self.rec_path} '
                            f'(index and rec do not match)')
        return lrec >> 29, lrec & _LENGTH_MASK

    def _part(self, key, pos, length):
        data = os.pread(self._file(), length, pos + 8)
        if len(data) < length:
            raise UserError(f'{self._where(key)}: record {key} of {self.rec_path} is truncated '
                            f'({len(data)} of {length} bytes)')
        return data

    def read(self, key):
        """The payload (IRHeader + label + body) of record `key`, joined if dmlc split it."""
        pos = self.offset(key)
        cflag, length = self._chunk(key, pos)
        data = self._part(key, pos, length)
        if cflag == 0:
            return data
        # dmlc splits a payload at every aligned magic word: parts 1, 2.., 3 joined by the magic.
        parts = [data]
        pos += 8 + ((length + 3) & ~3)
        while cflag != 3:
            cflag, length = self._chunk(key, pos)
            parts.append(self._part(key, pos, length))
            pos += 8 + ((length + 3) & ~3)
        return _MAGIC_BYTES.join(parts)

    def read_label(self, key):
        """(flag, label) of record `key` without reading its image bytes."""
        pos = self.offset(key)
        chunk = os.pread(self._file(), _HEAD_READ, pos)
        cflag, length = self._chunk(key, pos, chunk[:8])
        payload = chunk[8:8 + length]
        if cflag != 0 or len(payload) < _IR_SIZE:
            payload = self.read(key)
        flag = struct.unpack_from('I', payload)[0]
        if flag > 0 and len(payload) < _IR_SIZE + 4 * flag:
            payload = self.read(key)
        flag, label, _ = unpack_header(payload)
        return flag, label

    def unpack(self, key):
        """(flag, label, body bytes) of record `key`."""
        return unpack_header(self.read(key))


@dataclass
class RecordLayout:
    """What a rec holds: image keys grouped by identity and what the labels mean."""
    rec_path: str
    indexed: bool                      # has insightface's header + identity records
    image_keys: np.ndarray             # keys of image records, grouped by identity
    ranges: np.ndarray                 # (K, 2) [start, end) positions into image_keys
    identities: np.ndarray             # (K,) identity id of each range
    label_width: int                   # 0 scalar labels, else length of the label vector
    attribute_names: list = field(default_factory=list)
    attribute_codes: dict = field(default_factory=dict)
    num_classes: int = None            # from `property` (None if absent)
    image_size: tuple = None           # (H, W) from `property` (None if absent)

    @property
    def num_images(self):
        return int(self.image_keys.size)

    @property
    def num_identities(self):
        return int(self.identities.size)


def _identity_of(label):
    return int(label if np.ndim(label) == 0 else label[0])


def read_layout(rec_path, record=None):
    """The layout of a rec: header, identity ranges, label width, attribute names, property.

    Identity-indexed recs cost K+2 small reads; recs without identity index need every image
    header (no image decoding) and are grouped by label (stable).
    """
    record = record or RecordFile(rec_path)
    path = record.rec_path
    if len(record) == 0:
        raise UserError(f'{path}: empty record file')
    indexed = False
    if 0 in record:
        flag, label, body = record.unpack(0)
        indexed = flag == 2 and len(body) == 0
    if indexed:
        first, stop = int(label[0]), int(label[1])
        raw = np.array([record.read_label(k)[1][:2] for k in range(first, stop)], dtype=np.int64)
        raw = raw.reshape(-1, 2)
        if raw.size and (raw[:, 0].min() < 1 or raw[:, 1].max() > first or (raw[:, 1] < raw[:, 0]).any()):
            raise UserError(f'{path}: identity records point outside the image records')
        raw = raw[raw[:, 1] > raw[:, 0]]
        image_keys = np.concatenate([np.arange(a, b) for a, b in raw]) if raw.size else np.zeros(0, np.int64)
        sizes = raw[:, 1] - raw[:, 0]
        ends = np.cumsum(sizes)
        ranges = np.stack([ends - sizes, ends], axis=1) if raw.size else np.zeros((0, 2), np.int64)
        heads = [record.read_label(int(a)) for a in raw[:, 0]]
        identities = np.array([_identity_of(lab) for _, lab in heads], dtype=np.int64)
        width = heads[0][0] if heads else 2
    else:
        keys = record.keys
        heads = [record.read_label(int(k)) for k in keys]
        labels = np.array([_identity_of(lab) for _, lab in heads], dtype=np.int64)
        order = np.argsort(labels, kind='stable')
        image_keys, labels = keys[order], labels[order]
        starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
        ranges = np.stack([starts, np.r_[starts[1:], labels.size]], axis=1)
        identities = labels[starts]
        width = heads[0][0]
    names, codes = read_attributes(sidecar_path(path))
    extra = max(width - 2, 0)
    if len(names) != extra:
        if names:
            raise UserError(f'{sidecar_path(path)}: names {len(names)} attributes, '
                            f'but the labels hold {extra}')
        names = ['label_%d' % (i + 2) for i in range(extra)]
    prop = read_property(property_path(path))
    return RecordLayout(path, indexed, image_keys.astype(np.int64), ranges.astype(np.int64), identities,
                        int(width), names, codes,
                        num_classes=prop[0] if prop else None,
                        image_size=(prop[1], prop[2]) if prop else None)


def frame_record(payload):
    """The bytes dmlc's RecordIOWriter writes for one payload (what mx.recordio reads back).

    Each chunk is `magic, lrecord(cflag << 29 | length), data`; a magic word at an aligned position
    inside the payload splits it (cflag 1 first, 2 middle, 3 last) and is dropped, the reader
    re-inserts it; the record is zero-padded to 4 bytes.
    """
    i = payload.find(_MAGIC_BYTES)
    if i < 0:   # the usual case: one chunk
        return b''.join((_MAGIC_BYTES, struct.pack('<I', len(payload)), payload, b'\0' * (-len(payload) % 4)))
    chunks, start = [], 0
    while 0 <= i <= len(payload) - 4:
        if i % 4 == 0:
            chunks.append((1 if start == 0 else 2, payload[start:i]))
            start = i + 4
            i = payload.find(_MAGIC_BYTES, i + 4)
        else:
            i = payload.find(_MAGIC_BYTES, i + 1)
    chunks.append((3 if start else 0, payload[start:]))
    out = b''.join(_MAGIC_BYTES + struct.pack('<I', (cflag << 29) | len(data)) + data for cflag, data in chunks)
    return out + b'\0' * (-len(payload) % 4)


class IdentityRecordWriter:
    """Write a rec in the identity-indexed layout, one identity at a time.

    Everything goes to temporary names and is renamed at `close()`; the `.rec` is renamed last, so
    an interrupted run leaves no rec that looks complete. Identity ids are stored as given (global
    ids across shards or subsets). Use as a context manager or call `close()` / `abort()`.
    """

    def __init__(self, prefix, image_size=(112, 112), attribute_names=None, attribute_codes=None,
                 num_classes=None, write_property=True):
        self.prefix = split_prefix(prefix)
        self.image_size = tuple(image_size)
        self.attribute_names = [str(n) for n in (attribute_names or [])]
        self.attribute_codes = dict(attribute_codes or {})
        self.num_classes = num_classes
        self._write_property = write_property
        self._stack = contextlib.ExitStack()
        self._rec_tmp = self._stack.enter_context(atomic_path(self.prefix + '.rec'))
        self._sidecar_tmp = (self._stack.enter_context(atomic_path(sidecar_path(self.prefix)))
                             if self.attribute_names else None)
        self._idx_tmp = self._stack.enter_context(atomic_path(self.prefix + '.idx'))
        # Big buffers: one write syscall per ~1 MB instead of one per record.
        self._rec = self._stack.enter_context(open(self._rec_tmp, 'wb', buffering=1 << 20))
        self._idx = self._stack.enter_context(open(self._idx_tmp, 'w', buffering=1 << 16))
        # Placeholder header of the final size; patched in place at close() when N and K are known.
        self._pos = 0   # bytes written to the rec so far (no tell() per record)
        self._write(0, pack_record([0, 0], 0))
        self._ranges, self._identities, self._seen = [], [], set()
        self._next = 1
        self._open = True
        self._summary = None

    def _write(self, key, payload):
        framed = frame_record(payload)
        self._idx.write('%d\t%d\n' % (key, self._pos))
        self._rec.write(framed)
        self._pos += len(framed)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    @property
    def num_images(self):
        return self._next - 1

    def add_identity(self, identity, images):
        """Append one identity's images: an iterable of (encoded bytes, aligned, attributes).

        Returns the number of images written; an identity with none gets no identity record.
        """
        identity = int(identity)
        if identity in self._seen:
            raise ValueError(f'{self.prefix}: identity {identity} added twice (identities must be contiguous)')
        start = self._next
        for encoded, aligned, attrs in images:
            attrs = list(attrs) if attrs is not None else []
            if len(attrs) != len(self.attribute_names):
                raise ValueError(f'{self.prefix}: {len(attrs)} attributes given, '
                                 f'expected {len(self.attribute_names)}')
            label = [identity, int(aligned)] + [float(a) for a in attrs]
            self._write(self._next, pack_record(label, self._next, bytes(encoded)))
            self._next += 1
        if self._next > start:
            self._seen.add(identity)
            self._ranges.append((start, self._next))
            self._identities.append(identity)
        return self._next - start

    def finish(self):
        """Write identity records, patch the header and write idx/sidecar/property, all under their
        temporary names; returns the summary, with the temporary files' sizes. `commit()` renames."""
        if self._summary is not None or not self._open:
            return self._summary
        try:
            n, k = self._next - 1, len(self._ranges)
            for i, (a, b) in enumerate(self._ranges):
                key = n + 1 + i
                self._write(key, pack_record([a, b], key))
            self._rec.seek(8)   # record 0 sits at offset 0; its payload starts after magic + length
            self._rec.write(pack_record([n + 1, n + 1 + k], 0))
            self._rec.close()
            self._idx.close()
            if self._sidecar_tmp:
                write_attributes(self._sidecar_tmp, self.attribute_names, self.attribute_codes)
            if self._write_property:
                num_classes = self.num_classes if self.num_classes is not None else \
                    (max(self._identities) + 1 if self._identities else 0)
                write_property(property_path(self.prefix), num_classes, self.image_size)
        except BaseException:
            self.abort()
            raise
        self._summary = {'rec': self.prefix + '.rec', 'images': n, 'identities': k,
                         'first_identity': self._identities[0] if k else None,
                         'max_identity': max(self._identities) if k else None,
                         'rec_bytes': os.path.getsize(self._rec_tmp), 'idx_bytes': os.path.getsize(self._idx_tmp)}
        return self._summary

    def commit(self):
        """Rename the finished files onto their final names: idx, then sidecar, then rec."""
        summary = self.finish()
        if not self._open:
            return summary
        try:
            if os.path.exists(self.prefix + '.rec'):
                os.remove(self.prefix + '.rec')   # never pair an old rec with the new idx
        except BaseException:
            self.abort()
            raise
        self._open = False
        self._stack.close()   # renames idx, then sidecar, then rec (reverse order of creation)
        return summary

    def close(self):
        """`finish()` and `commit()`: the rec is complete under its final name."""
        return self.commit()

    def abort(self):
        """Drop everything written so far; the final names are left untouched."""
        if not self._open:
            return
        self._open = False
        # Closing flushes buffered bytes, which fails again on a full disk (atomic_path reports it as a
        # UserError); the temporaries go anyway, and the caller reports its own error.
        with contextlib.suppress(OSError, UserError):
            self._stack.__exit__(RuntimeError, RuntimeError('aborted'), None)
