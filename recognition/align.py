"""Five-point face alignment to insightface's 112x112 arcface template.

Landmark order everywhere: left eye, right eye, nose tip, left mouth corner, right mouth corner,
in image pixel coordinates (x, y).
"""
import cv2
import numpy as np
from skimage.transform import SimilarityTransform

# insightface's 96x112 template (width 96, height 112).
SRC_112x96 = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366],
                       [33.5493, 92.3655], [62.7299, 92.2041]], dtype=np.float32)
# insightface's arcface_src: the same points shifted 8 px right for a 112x112 crop.
ARCFACE_SRC = SRC_112x96 + np.array([8.0, 0.0], dtype=np.float32)


def template(image_size=112, width=None):
    """The 5-point template for an `image_size` x `width` crop (112x112 or 112x96), scaled if needed."""
    width = image_size if width is None else width
    if width == 96 and image_size == 112:
        return SRC_112x96.copy()
    if width != image_size:
        raise ValueError(f'no template for {image_size}x{width}; use 112x112 or 112x96')
    return ARCFACE_SRC * (image_size / 112.0)


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
