"""The geometry of five-point alignment: insightface's arcface template and the warps onto it.

Landmark order everywhere: left eye, right eye, nose tip, left mouth corner, right mouth corner,
in image pixel coordinates (x, y).
"""
import argparse

import cv2
import numpy as np
from skimage.transform import SimilarityTransform

# insightface's 96x112 template (width 96, height 112).
SRC_112x96 = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366],
                       [33.5493, 92.3655], [62.7299, 92.2041]], dtype=np.float32)
# insightface's arcface_src: the same points shifted 8 px right for a 112x112 crop.
ARCFACE_SRC = SRC_112x96 + np.array([8.0, 0.0], dtype=np.float32)
# insightface's no-landmark crop: a centre crop with 1/16 of the side cut on each border.
FORCED_MARGIN = 0.0625
# insightface's face_preprocess: a box without landmarks is widened by this many pixels in total.
BBOX_MARGIN = 44


def template(image_size=112, width=None):
    """The 5-point template for an `image_size` x `width` crop (112x112 or 112x96), scaled if needed."""
    width = image_size if width is None else width
    if width == 96 and image_size == 112:
        return SRC_112x96.copy()
    if width != image_size:
        raise ValueError(f'no template for {image_size}x{width}; use 112x112 or 112x96')
    return ARCFACE_SRC * (image_size / 112.0)


def crop_size(text):
    """(height, width) from a CLI's `--image-size`: '112' (= 112,112) or '112,96', the two crops
    insightface's face_preprocess accepts (an argparse `type`, so a bad value is a usage error)."""
    try:
        size = tuple(int(v) for v in str(text).split(','))
    except ValueError:
        size = ()
    size = size * 2 if len(size) == 1 else size
    if size not in ((112, 112), (112, 96)):
        raise argparse.ArgumentTypeError(f'{text}: use 112 (112x112) or 112,96 (height,width)')
    return size


def estimate_norm(landmarks, image_size=112, width=None):
    """2x3 similarity matrix that maps `landmarks` (5x2) onto the template (skimage's least squares)."""
    lmk = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    tform = SimilarityTransform()
    if not tform.estimate(lmk, template(image_size, width)):
        raise ValueError('degenerate landmarks: no similarity transform')
    return tform.params[0:2, :]


def norm_crop(img, landmarks, image_size=112, width=None):
    """Warp `img` so its landmarks land on the template: an aligned image_size x width crop."""
    width = image_size if width is None else width
    M = estimate_norm(landmarks, image_size, width)
    return cv2.warpAffine(img, M, (width, image_size), borderValue=0.0)


def transform_points(M, points):
    """Apply a 2x3 affine matrix to Nx2 points."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ np.asarray(M)[:, :2].T + np.asarray(M)[:, 2]


def bbox_crop(img, bbox=None, image_size=112, width=None, margin=BBOX_MARGIN):
    """insightface's crop for a face without landmarks (`face_preprocess.preprocess`): the box
    x1 y1 x2 y2, or without one the image minus FORCED_MARGIN of each side, widened by margin/2
    on every border and clipped to the image, then resized (stretched) to image_size x width."""
    width = image_size if width is None else width
    img_h, img_w = img.shape[:2]
    if bbox is None:
        cut_w, cut_h = int(img_w * FORCED_MARGIN), int(img_h * FORCED_MARGIN)
        bbox = (cut_w, cut_h, img_w - cut_w, img_h - cut_h)
    x1, y1, x2, y2 = (float(v) for v in np.ravel(bbox)[:4])
    left, top = int(max(x1 - margin / 2, 0)), int(max(y1 - margin / 2, 0))
    right, bottom = int(min(x2 + margin / 2, img_w)), int(min(y2 + margin / 2, img_h))
    if right <= left or bottom <= top:
        raise ValueError(f'bbox {x1:g} {y1:g} {x2:g} {y2:g} is empty inside a {img_w}x{img_h} image')
    return cv2.resize(img[top:bottom, left:right], (width, image_size))
