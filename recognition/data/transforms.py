"""insightface's training augmentations on decoded RGB HWC uint8 faces: random mirror, colour
jitter, JPEG-compress and cutoff, each switchable. Output stays HWC in 0..255 (uint8, or float32
after colour jitter; normalisation is inside the network): the dataset turns single samples into CHW
float32, while the loader stacks HWC batches and converts whole batches, which is much cheaper than
a float CHW copy per sample. Everything is numpy/cv2 on one sample: no per-sample NDArray overhead.

A transform holds no generator: every call is given one. The loader keys it by (seed, epoch, sample
index), so the augmentation of a sample never depends on which worker process read it, in what order,
or where a resumed run started.
"""
import cv2
import numpy as np

# insightface's ColorJitterAug uses 0.125 for brightness, contrast and saturation.
DEFAULT_COLOR_STRENGTH = 0.125
DEFAULT_CUTOFF = 56
_GRAY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def to_chw(img):
    """HWC image -> contiguous CHW float32 in one copy."""
    return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)


def color_jitter(img, strength, rng):
    """Brightness, contrast and saturation, each scaled by 1 +- strength, in random order (float32)."""
    img = img.astype(np.float32)
    for op in rng.permutation(3):
        alpha = 1.0 + rng.uniform(-strength, strength)
        if op == 0:
            img *= alpha
        elif op == 1:
            mean = float((img @ _GRAY).mean())
            img *= alpha
            img += (1.0 - alpha) * mean
        else:
            gray = (img @ _GRAY)[:, :, None]
            img *= alpha
            img += (1.0 - alpha) * gray
    return np.clip(img, 0, 255, out=img)


def jpeg_compress(img, quality):
    """Re-encode as a low-quality JPEG, as insightface's compress augmentation (quality 2..20)."""
    ok, buf = cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if ok else img


def cutoff_square(img, size, rng):
    """Grey (128) square of `size` around a random centre, clipped to the image."""
    h, w = img.shape[:2]
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    half = size // 2
    img = img.copy()
    img[max(0, cy - half):min(h, cy + half), max(0, cx - half):min(w, cx + half), :] = 128
    return img


class TrainTransform:
    """Random mirror (p=0.5), JPEG compress (p=0.5), colour jitter, cutoff (p=0.5) on HWC RGB.

    `color`: jitter strength (True means insightface's 0.125; 0 off). `cutoff`: square size in pixels
    (True means 56). Each call draws from the generator it is given (see `sample_rng`).
    """

    def __init__(self, mirror=True, color=0, cutoff=False, compress=False):
        self.mirror = bool(mirror)
        self.color = DEFAULT_COLOR_STRENGTH if color is True else float(color)
        self.cutoff = DEFAULT_CUTOFF if cutoff is True else int(cutoff)
        self.compress = bool(compress)

    def __call__(self, img, rng):
        if self.mirror and rng.random() < 0.5:
            img = img[:, ::-1]
        if self.compress and rng.random() < 0.5:
            img = jpeg_compress(np.ascontiguousarray(img), rng.integers(2, 21))
        if self.color > 0:
            img = color_jitter(img, self.color, rng)
        if self.cutoff > 0 and rng.random() < 0.5:
            img = cutoff_square(img, self.cutoff, rng)
        return img

    def __repr__(self):
        return (f'TrainTransform(mirror={self.mirror}, color={self.color}, cutoff={self.cutoff}, '
                f'compress={self.compress})')


def sample_rng(seed, epoch, index):
    """The generator of one sample's augmentation in one epoch: a pure function of its key."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def train_transform(mirror=True, color=0, cutoff=False, compress=False):
    """The training augmentation as insightface's FaceImageIter applies it."""
    return TrainTransform(mirror=mirror, color=color, cutoff=cutoff, compress=compress)
