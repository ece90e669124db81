"""Align one image by detection, with the FairFace seed's fallbacks: the main face of MTCNN's first
pass, else MTCNN's retries at more scales, then on rotations, then (with `--detector mtcnn+mmod`)
one pass of dlib's MMOD CNN, then a centre crop reported as 'forced'."""
import functools
from collections import namedtuple

import cv2
import numpy as np

from recognition.detection.choice import build_detectors
from recognition.alignment.geometry import FORCED_MARGIN, norm_crop, transform_points

AlignResult = namedtuple('AlignResult', 'image status landmarks score detector', defaults=(None,))
AlignResult.__doc__ = """An aligned crop (or None), how it was obtained ('given', 'detected', 'forced',
'failed'), the 5x2 landmarks used (input pixels; None when forced/failed), the detection score (on the
detector's own scale) and the name of the detector that found the face ('mtcnn', 'mmod'; else None)."""

# The seed's first pass caps the longer side at 640 px; its scale retry tries these longer sides.
FIRST_MAX_SIDE = 640
RETRY_MAX_SIDES = (160, 320, 480, 800, 960)
RETRY_ANGLES = (-15, 15, -30, 30, -45, 45)
# Detectors that get the scale and rotation retries. MMOD runs once: its upsampling stands in for the
# scale retry, and at 1-5 s a pass (issue 19) six rotations would cost half a minute per photo.
RETRIED = ('mtcnn',)


def select_face(boxes, image_shape):
    """Index of the main face: the largest `area - 2 * offset^2` (offset of the box centre from the
    image centre), the seed's and facenet's rule for images with several detections."""
    boxes = np.atleast_2d(np.asarray(boxes, dtype=np.float64))
    if boxes.size == 0:
        raise ValueError('select_face: no boxes')
    height, width = image_shape[:2]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    offset2 = ((boxes[:, 0] + boxes[:, 2]) / 2 - width / 2) ** 2 \
        + ((boxes[:, 1] + boxes[:, 3]) / 2 - height / 2) ** 2
    return int(np.argmax(area - 2.0 * offset2))


def _main_face(detector, img, scale=1.0, shape=None):
    """(landmarks, score) of the selected face in `img`, mapped back by 1/scale; None if no face."""
    boxes, landmarks = detector.detect(img)
    if len(boxes) == 0:
        return None
    boxes = boxes.astype(np.float64)
    boxes[:, :4] /= scale
    i = select_face(boxes, shape or img.shape)
    return landmarks[i].astype(np.float64) / scale, float(boxes[i, 4])


def detect_at_size(detector, img, max_side):
    """Detect after padding to a square (black, bottom/right) and resizing its side to `max_side`;
    images already no larger than a first-pass `max_side` are used as they are."""
    height, width = img.shape[:2]
    side = max(height, width)
    if max_side == FIRST_MAX_SIDE and side <= max_side:
        return _main_face(detector, img)
    square = cv2.copyMakeBorder(img, 0, side - height, 0, side - width, cv2.BORDER_CONSTANT, value=0)
    scale = max_side / side
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(square, (max_side, max_side), interpolation=interp)
    return _main_face(detector, resized, scale, img.shape)


def detect_rotated(detector, img, angle):
    """Detect on `img` rotated by `angle` degrees about its centre; landmarks mapped back."""
    height, width = img.shape[:2]
    M = cv2.getRotationMatrix2D(((width - 1) / 2.0, (height - 1) / 2.0), angle, 1.0)
    rotated = cv2.warpAffine(img, M, (width, height), borderValue=0)
    found = detect_at_size(detector, rotated, FIRST_MAX_SIDE)
    if found is None:
        return None
    return transform_points(cv2.invertAffineTransform(M), found[0]), found[1]


def center_crop(img, image_size=112, margin=FORCED_MARGIN, width=None):
    """The last resort: the largest central box of the crop's shape (a square unless `width`
    differs), minus `margin` of its size on each border, resized to image_size x width."""
    width = image_size if width is None else width
    img_h, img_w = img.shape[:2]
    scale = min(img_h / image_size, img_w / width)
    box_h, box_w = int(round(image_size * scale)), int(round(width * scale))
    cut_h, cut_w = int(round(box_h * margin)), int(round(box_w * margin))
    top, left = (img_h - box_h) // 2 + cut_h, (img_w - box_w) // 2 + cut_w
    crop = img[top:top + box_h - 2 * cut_h, left:left + box_w - 2 * cut_w]
    return cv2.resize(crop, (width, image_size), interpolation=cv2.INTER_AREA)


def attempts(detector, img, fallbacks=True):
    """The detection passes of one detector, in order: the first pass (the longer side capped at
    FIRST_MAX_SIDE), then for RETRIED detectors with `fallbacks` the scale and rotation retries."""
    yield functools.partial(detect_at_size, detector, img, FIRST_MAX_SIDE)
    if fallbacks and detector.name in RETRIED:
        yield from (functools.partial(detect_at_size, detector, img, s) for s in RETRY_MAX_SIDES)
        yield from (functools.partial(detect_rotated, detector, img, a) for a in RETRY_ANGLES)


def align_face(img_bgr, detector=None, landmarks=None, image_size=112, fallbacks=True, width=None):
    """Align one BGR image to an image_size x width crop (112x112, or 112x96 with width=96): from
    given landmarks, else by detection. `detector`: one detector or a list tried in order (default:
    the default `--detector` choice, MTCNN then MMOD when dlib is installed). With `fallbacks`, MTCNN
    retries at more scales and on rotations, the next detector runs, then a centre crop is taken
    ('forced'); without, only the first detector's first pass. Never raises for a faceless image."""
    img = np.asarray(img_bgr)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if landmarks is not None:
        landmarks = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
        try:
            return AlignResult(norm_crop(img, landmarks, image_size, width), 'given', landmarks, None)
        except ValueError:
            if not fallbacks:
                return AlignResult(None, 'failed', landmarks, None)
    if detector is None:
        detector = build_detectors()
    detectors = list(detector) if isinstance(detector, (list, tuple)) else [detector]
    for det in detectors if fallbacks else detectors[:1]:
        for attempt in attempts(det, img, fallbacks):
            found = attempt()
            if found is None:
                continue
            points, score = found
            try:
                return AlignResult(norm_crop(img, points, image_size, width), 'detected', points, score, det.name)
            except ValueError:  # degenerate points: try the next fallback
                continue
    if fallbacks:
        return AlignResult(center_crop(img, image_size, width=width), 'forced', None, None)
    return AlignResult(None, 'failed', None, None)
