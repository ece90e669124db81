"""insightface `.bin` verification sets: `pickle((bins, issame_list))`, encoded images in pairs.

insightface loads them with a plain `pickle.load`, which runs whatever code the file names; here a
restricted unpickler accepts only what the format needs (containers, bytes, bools, numpy arrays
and scalars, as files written by Python 2 or 3 hold) and refuses anything else.
"""
import io
import os
import pickle
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from recognition.utils import UserError, atomic_open

# Globals a .bin may reference: numpy array/scalar reconstruction (numpy 1.x and 2.x module names)
# and the codec Python 3 uses to pickle bytes with protocols < 3.
_ALLOWED = {
    ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
    ('numpy', 'ndarray'), ('numpy', 'dtype'),
    ('_codecs', 'encode'),
    ('builtins', 'bytearray'), ('__builtin__', 'bytearray'),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f'refusing {module}.{name}')


def write_bin(path, bins, issame_list):
    """Write a .bin atomically; `bins` are 2*P encoded images (bytes or uint8 arrays), in pairs."""
    bins = [bytes(b) if not isinstance(b, np.ndarray) else b.tobytes() for b in bins]
    issame_list = [bool(s) for s in issame_list]
    if len(bins) != 2 * len(issame_list):
        raise ValueError(f'{path}: {len(bins)} images for {len(issame_list)} pairs')
    with atomic_open(path, 'wb') as f:
        pickle.dump((bins, issame_list), f, protocol=pickle.HIGHEST_PROTOCOL)


def read_bin(path):
    """(bins as a list of bytes, issame_list as a list of bool) from a .bin, refusing foreign objects."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f'{path}: no such .bin file')
    with open(path, 'rb') as f:
        data = f.read()
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding='bytes').load()
    except pickle.UnpicklingError as e:
        raise UserError(f'{path}: not a verification .bin ({e})') from None
    except Exception as e:   # truncated or garbled pickles raise many kinds of errors
        raise UserError(f'{path}: not a readable .bin ({type(e).__name__}: {e})') from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise UserError(f'{path}: expected (bins, issame_list), got {type(obj).__name__}')
    bins, issame = obj
    try:
        bins = [b.tobytes() if isinstance(b, np.ndarray) else bytes(b) for b in bins]
        issame = [bool(s) for s in (issame.tolist() if isinstance(issame, np.ndarray) else issame)]
    except (TypeError, ValueError) as e:
        raise UserError(f'{path}: unexpected contents ({e})') from None
    if len(bins) != 2 * len(issame):
        raise UserError(f'{path}: {len(bins)} images for {len(issame)} pairs')
    return bins, issame


def check_pairs(path, issame, nfolds=10):
    """Refuse a set too small for `nfolds`-fold verification: each fold needs pairs of both kinds."""
    same = sum(issame)
    different = len(issame) - same
    if min(same, different) < nfolds:
        raise UserError(f'{path}: {same} same-person and {different} different-person pairs; '
                        f'{nfolds}-fold verification needs at least {nfolds} of each')


def load_verification_set(path, image_size=(112, 112), nfolds=10):
    """`load_bin` of a set checked to be usable (`check_pairs`, every image decodes), before any model runs:
    the trainer's `--val-targets` and test/verification.py load their sets here."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f'{path}: verification set not found')
    bins, issame = read_bin(path)
    check_pairs(path, issame, nfolds)
    return _decode(path, bins, issame, image_size)


def load_bin(path, image_size=(112, 112)):
    """([NDArray N x 3 x H x W, the same flipped horizontally], issame_list) as insightface's load_bin.

    Images are RGB float32 0..255, resized if they are not `image_size`.
    """
    return _decode(path, *read_bin(path), image_size)


def _without_huge_page_advice(allocate):
    """`allocate()` with numpy's madvise(MADV_HUGEPAGE) on large arrays off: where the kernel compacts memory
    on that advice (`transparent_hugepage/defrag` = madvise, as on the 2-core AMD VM of docs/benchmarks.md),
    the first touch of a 6,000-pair set's two 1.8 GB arrays took 6.8-9.9 s instead of 1.4-1.7 s, and got no
    huge page anyway (AnonHugePages 0 kB)."""
    toggle = getattr(np.core.multiarray, '_set_madvise_hugepage', None)   # numpy >= 1.20
    previous = toggle(False) if toggle else None
    try:
        return allocate()
    finally:
        if toggle:
            toggle(previous)


def _decode(path, bins, issame, image_size):
    """`load_bin`'s arrays from the images' encoded bytes, decoded on a thread per core (cv2 releases the GIL;
    every image has its own rows, so the result does not depend on the threads).

    cv2's `blobFromImage` (scale 1, no mean, swapRB) writes the same values as numpy's
    `img[:, :, ::-1].transpose(2, 0, 1)` (uint8 to float32 is exact) about 15x faster: the numpy copies
    were most of `load_bin`'s 6 s in a 25 s onnxruntime test/verification.py run on 6,000 pairs (py-spy;
    docs/benchmarks.md, inference run 5).
    """
    from mxnet import nd   # here: make_bin.py and the checks read and write .bin sets without MXNet (~2 s)
    h, w = image_size
    data, flipped = _without_huge_page_advice(lambda: [np.empty((len(bins), 3, h, w), np.float32) for _ in 'ab'])

    def decode(rows):
        for i in rows:
            img = cv2.imdecode(np.frombuffer(bins[i], np.uint8), cv2.IMREAD_COLOR)
            if img is None:
                raise UserError(f'{path}: image {i} does not decode')
            if img.shape[:2] != (h, w):
                img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
            data[i] = cv2.dnn.blobFromImage(img, swapRB=True)[0]
            flipped[i] = cv2.dnn.blobFromImage(cv2.flip(img, 1), swapRB=True)[0]

    threads = max(1, min(os.cpu_count() or 1, 8))
    chunks = [range(a, min(a + 256, len(bins))) for a in range(0, len(bins), 256)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(decode, chunks))   # list(): the first error of any chunk is raised here
    # zero-copy: nd.array would copy both 1.8 GB arrays of a 6,000-pair set again (8 of the 51 s of an
    # onnxruntime test/verification.py run, profiled with py-spy)
    return [nd.from_numpy(data, zero_copy=True), nd.from_numpy(flipped, zero_copy=True)], issame
