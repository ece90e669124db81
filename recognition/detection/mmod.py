"""dlib's MMOD CNN face detector with its 68-point shape predictor, behind the MTCNN detector's
interface (`detect(img_bgr)` -> boxes N x 5, landmarks N x 5 x 2): the second detector of the
alignment fallbacks, tried before a photo becomes a forced centre crop.

The models ship in the `face_recognition_models` package and dlib in the `dlib-bin` wheel; nothing
downloads at run time. dlib is imported on first use (`import_dlib`), so an environment without it
keeps MTCNN and everything else working, and asking for MMOD there is a one-line error saying how to
install it.
"""
import functools
import importlib.util
import os

import numpy as np

from recognition.utils import UserError

INSTALL_HINT = 'pip install dlib-bin face_recognition_models (both are in requirements.txt)'
MODELS_PACKAGE = 'face_recognition_models'
DETECTOR_FILE = 'mmod_human_face_detector.dat'
PREDICTOR_FILE = 'shape_predictor_68_face_landmarks.dat'
UPSAMPLES = (0, 1)

# The five arcface points in dlib's (iBUG 300-W) 68-point layout, 0-based: the image-left eye is
# the contour 36-41, the image-right eye 42-47, the nose tip 30, the mouth corners 48 and 54.
LEFT_EYE, RIGHT_EYE = slice(36, 42), slice(42, 48)
NOSE_TIP, LEFT_MOUTH, RIGHT_MOUTH = 30, 48, 54


def five_points(shape68):
    """The 5x2 arcface landmarks of a 68x2 point set: eye centres (means of the eye contours), nose
    tip, left and right mouth corners."""
    p = np.asarray(shape68, dtype=np.float64).reshape(68, 2)
    return np.stack([p[LEFT_EYE].mean(axis=0), p[RIGHT_EYE].mean(axis=0), p[NOSE_TIP], p[LEFT_MOUTH],
                     p[RIGHT_MOUTH]])


def import_dlib():
    """The dlib module, or a one-line UserError saying how to install it.

    Imported here rather than at the top: dlib is only needed when MMOD runs (see the module docstring)."""
    try:
        import dlib
    except ImportError:
        raise UserError(f'--detector mmod needs dlib, which is not installed: {INSTALL_HINT}') from None
    return dlib


def model_dir():
    """The folder of the packaged dlib models, found without importing the package (its __init__
    imports the deprecated pkg_resources)."""
    spec = importlib.util.find_spec(MODELS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f'--detector mmod needs the {MODELS_PACKAGE} package (dlib\'s model files), '
                        f'which is not installed: {INSTALL_HINT}')
    return os.path.join(list(spec.submodule_search_locations)[0], 'models')


def check_available():
    """Raise the one-line install UserError unless dlib and its models package are installed."""
    import_dlib()
    model_dir()


def available():
    """Whether MMOD can run here (the default `--detector` depends on it)."""
    try:
        check_available()
    except UserError:
        return False
    return True


def _load(kind, path):
    loader = getattr(import_dlib(), kind)
    if not os.path.isfile(path):
        raise UserError(f'{path}: dlib model file missing; reinstall: pip install --force-reinstall {MODELS_PACKAGE}')
    try:
        return loader(path)
    except RuntimeError as e:
        why = ' '.join(str(e).split())
        raise UserError(f'{path}: corrupt dlib model file ({why}); reinstall: '
                        f'pip install --force-reinstall {MODELS_PACKAGE}') from None


@functools.lru_cache(maxsize=4)
def load_detector(path):
    """The MMOD CNN of one model file, loaded once per process (10 ms)."""
    return _load('cnn_face_detection_model_v1', path)


@functools.lru_cache(maxsize=4)
def load_predictor(path):
    """The 68-point shape predictor of one model file, loaded once per process when a face is first
    found (1.5 s for the 99 MB file)."""
    return _load('shape_predictor', path)


class MMODDetector:
    """dlib's MMOD CNN face detector with the 68-point shape predictor reduced to the five arcface points.

    `detect(img_bgr)` returns (boxes N x 5 [x1, y1, x2, y2, score], landmarks N x 5 x 2) in input pixels
    like `MTCNNDetector.detect`; the score is MMOD's confidence (a margin, about 1 for a clear face, not
    a probability). `upsample` 1 doubles the image first: faces down to about 40 px instead of 80 px,
    four times the time. The model files are read on the first detection.
    """
    name = 'mmod'

    def __init__(self, upsample=1, detector_model=None, landmark_model=None):
        if upsample not in UPSAMPLES:
            raise ValueError(f'upsample must be 0 or 1, got {upsample}')
        self.upsample = int(upsample)
        self.detector_model = detector_model or os.path.join(model_dir(), DETECTOR_FILE)
        self.landmark_model = landmark_model or os.path.join(model_dir(), PREDICTOR_FILE)
        import_dlib()

    def config(self):
        """Constructor arguments, so worker processes can build an equal detector."""
        return dict(upsample=self.upsample, detector_model=self.detector_model, landmark_model=self.landmark_model)

    def detect_68(self, img_bgr):
        """(boxes N x 5, 68-point landmarks N x 68 x 2) in input pixels."""
        img = np.asarray(img_bgr)
        rgb = np.ascontiguousarray(img if img.ndim == 2 else img[:, :, 2::-1], dtype=np.uint8)
        found = load_detector(self.detector_model)(rgb, self.upsample)
        boxes = np.array([[d.rect.left(), d.rect.top(), d.rect.right() + 1, d.rect.bottom() + 1, d.confidence]
                          for d in found], dtype=np.float32).reshape(-1, 5)
        if not found:
            return boxes, np.zeros((0, 68, 2), np.float32)
        predictor = load_predictor(self.landmark_model)
        shapes = [[(p.x, p.y) for p in predictor(rgb, d.rect).parts()] for d in found]
        return boxes, np.array(shapes, dtype=np.float32)

    def detect(self, img_bgr):
        """(boxes N x 5, landmarks N x 5 x 2), landmarks ordered left eye, right eye, nose, left mouth
        corner, right mouth corner (image left/right), as MTCNN's."""
        boxes, shapes = self.detect_68(img_bgr)
        return boxes, np.array([five_points(s) for s in shapes], dtype=np.float32).reshape(-1, 5, 2)
