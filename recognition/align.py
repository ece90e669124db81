"""Five-point face alignment to insightface's 112x112 arcface template.

Landmark order everywhere: left eye, right eye, nose tip, left mouth corner, right mouth corner,
in image pixel coordinates (x, y).
"""
import argparse
import csv
import functools
import multiprocessing
import os
import posixpath
from collections import namedtuple

import cv2
import numpy as np
from skimage.transform import SimilarityTransform

from .data.lst import list_images
from .utils import UserError, atomic_open

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


# ---------------------------------------------------------------------------------------------
# Detection with the FairFace seed's fallbacks, folder alignment and the landmarks-file format.

AlignResult = namedtuple('AlignResult', 'image status landmarks score')
AlignResult.__doc__ = """An aligned crop (or None), how it was obtained ('given', 'detected', 'forced',
'failed'), the 5x2 landmarks used (input pixels; None when forced/failed) and the detection score."""

ReportRow = namedtuple('ReportRow', 'path status score landmarks')
ReportRow.__doc__ = """One line of align_report.csv: input path relative to the input folder (with
'/'), status, detection score (None unless detected) and the 5x2 landmarks (or None)."""

# The seed's first pass caps the longer side at 640 px; its scale retry tries these longer sides.
FIRST_MAX_SIDE = 640
RETRY_MAX_SIDES = (160, 320, 480, 800, 960)
RETRY_ANGLES = (-15, 15, -30, 30, -45, 45)
# insightface's no-landmark crop: a centre crop with 1/16 of the side cut on each border.
FORCED_MARGIN = 0.0625
REPORT_NAME = 'align_report.csv'
REPORT_HEADER = ['path', 'status', 'score'] + [f'{c}{i}' for i in range(1, 6) for c in 'xy']


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


@functools.lru_cache(maxsize=1)
def default_detector():
    """One shared MTCNN detector per process, built on first use (loading it costs ~1 s)."""
    from .detection import MTCNNDetector
    return MTCNNDetector()


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


# insightface's face_preprocess: a box without landmarks is widened by this many pixels in total.
BBOX_MARGIN = 44


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


def align_face(img_bgr, detector=None, landmarks=None, image_size=112, fallbacks=True, width=None):
    """Align one BGR image to an image_size x width crop (112x112, or 112x96 with width=96): from
    given landmarks, else by detection; with `fallbacks`, retry at more scales, then on rotations,
    then take a centre crop ('forced'). Never raises for a faceless image."""
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
    detector = detector or default_detector()
    attempts = [functools.partial(detect_at_size, detector, img, FIRST_MAX_SIDE)]
    if fallbacks:
        attempts += [functools.partial(detect_at_size, detector, img, s) for s in RETRY_MAX_SIDES]
        attempts += [functools.partial(detect_rotated, detector, img, a) for a in RETRY_ANGLES]
    for attempt in attempts:
        found = attempt()
        if found is not None:
            points, score = found
            try:
                return AlignResult(norm_crop(img, points, image_size, width), 'detected', points, score)
            except ValueError:  # degenerate points: try the next fallback
                continue
    if fallbacks:
        return AlignResult(center_crop(img, image_size, width=width), 'forced', None, None)
    return AlignResult(None, 'failed', None, None)


def relative_key(path):
    """Canonical relative path: '/' separators, no './'."""
    return posixpath.normpath(str(path).replace(os.sep, '/')).lstrip('/')


def read_landmarks_file(path):
    """{relative path: 5x2 array} from lines `relative/path x1 y1 x2 y2 ... x5 y5` (LFW layout).

    Blank lines and lines starting with '#' are skipped; paths may contain spaces.
    """
    try:
        with open(path, encoding='utf-8') as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f'{path}: cannot read landmarks file ({e})') from e
    points = {}
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        parts = line.rsplit(None, 10)
        try:
            values = np.array([float(v) for v in parts[1:]], dtype=np.float64)
        except ValueError:
            values = np.zeros(0)
        if len(parts) != 11 or not np.all(np.isfinite(values)):
            raise UserError(f'{path}:{lineno}: expected "relative/path x1 y1 ... x5 y5", got {line[:80]!r}')
        key = relative_key(parts[0])
        if key in points:
            raise UserError(f'{path}:{lineno}: {key} listed twice')
        points[key] = values.reshape(5, 2)
    return points


def output_name(rel_path):
    """Where the aligned crop of `rel_path` goes inside the output folder: same path, .jpg."""
    return posixpath.splitext(rel_path)[0] + '.jpg'


def _format_row(row):
    score = '' if row.score is None else f'{row.score:.6f}'
    points = [''] * 10 if row.landmarks is None else [f'{v:.2f}' for v in np.ravel(row.landmarks)]
    return [row.path, row.status, score] + points


def _parse_row(values):
    path, status, score = values[:3]
    coords = values[3:13]
    landmarks = np.array([float(v) for v in coords]).reshape(5, 2) if all(coords) and len(coords) == 10 else None
    return ReportRow(path, status, float(score) if score else None, landmarks)


def write_report(path, rows):
    """align_report.csv: a header row, then one row per image (see REPORT_HEADER)."""
    with atomic_open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(REPORT_HEADER)
        writer.writerows(_format_row(r) for r in rows)


def read_report(path):
    """ReportRows from an align_report.csv (or its in-progress twin); [] if there is none."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, newline='', encoding='utf-8') as f:
        for values in csv.reader(f):
            if values and values != REPORT_HEADER and len(values) == len(REPORT_HEADER):
                try:
                    rows.append(_parse_row(values))
                except ValueError:  # a torn last line of an interrupted run
                    continue
    return rows


_WORKER = {}


def _worker_init(input_dir, output_dir, crop_size, detector, detector_config):
    """Per-process state (crop_size: (image_size, width)); worker processes build their own
    detector lazily (landmark runs need none)."""
    _WORKER.update(input_dir=input_dir, output_dir=output_dir, crop_size=crop_size,
                   detector=detector, detector_config=detector_config)


def _worker_detector():
    if _WORKER['detector'] is None:
        from .detection import MTCNNDetector
        config = _WORKER['detector_config']
        _WORKER['detector'] = MTCNNDetector(**config) if config else default_detector()
    return _WORKER['detector']


class _LazyDetector:
    """Stands in for the detector so it is only built when an image has no given landmarks."""

    def detect(self, img):
        return _worker_detector().detect(img)


def _align_task(task):
    """Align one file; unreadable images become 'failed' rows instead of errors."""
    rel, points = task
    src = os.path.join(_WORKER['input_dir'], rel)
    try:
        img = cv2.imread(src, cv2.IMREAD_COLOR)
    except cv2.error:
        img = None
    if img is None:
        return ReportRow(rel, 'failed', None, None), f'{src}: unreadable image'
    image_size, width = _WORKER['crop_size']
    result = align_face(img, detector=_LazyDetector(), landmarks=points, image_size=image_size, width=width)
    if result.image is None:
        return ReportRow(rel, 'failed', None, result.landmarks), f'{src}: no face'
    ok, buf = cv2.imencode('.jpg', result.image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        return ReportRow(rel, 'failed', None, None), f'{src}: JPEG encoding failed'
    with atomic_open(os.path.join(_WORKER['output_dir'], output_name(rel)), 'wb') as f:
        f.write(buf.tobytes())
    return ReportRow(rel, result.status, result.score, result.landmarks), None


def align_folder(input_dir, output_dir, image_size=112, landmarks=None, detector=None, num_workers=1,
                 skip_existing=True, log=None, width=None):
    """Align every image under `input_dir` into `output_dir` (same tree, .jpg, image_size x width
    crops: 112x112, or 112x96 with width=96) and write `output_dir/align_report.csv`; returns the
    ReportRows sorted by path.

    `landmarks`: {relative path: 5x2} (or a landmarks file path); listed images are warped from
    their points, the others detected with fallbacks. Resumable: with `skip_existing`, images whose
    output exists are skipped and keep their row from the previous (possibly interrupted) run's
    report ('skipped' if it has none). Unreadable images become 'failed' rows; `log` gets a message.
    """
    if not os.path.isdir(input_dir):
        raise UserError(f'{input_dir}: not a folder')
    if num_workers < 1:
        raise UserError(f'num_workers must be >= 1, got {num_workers}')
    try:
        template(image_size, width)   # an unsupported crop shape fails before any work
    except ValueError as e:
        raise UserError(f'{output_dir}: {e}') from None
    if isinstance(landmarks, (str, os.PathLike)):
        landmarks = read_landmarks_file(landmarks)
    landmarks = {relative_key(k): v for k, v in (landmarks or {}).items()}
    os.makedirs(output_dir, exist_ok=True)
    images = list_images(input_dir, exclude=output_dir)
    outputs = {}
    for rel in images:
        out = output_name(rel)
        if out in outputs:
            raise UserError(f'{os.path.join(input_dir, rel)}: same output {out} as {outputs[out]}')
        outputs[out] = rel
    report = os.path.join(output_dir, REPORT_NAME)
    partial = report + '.partial'
    previous = {r.path: r for r in read_report(report) + read_report(partial)}
    rows, tasks = [], []
    for rel in images:
        if skip_existing and os.path.isfile(os.path.join(output_dir, output_name(rel))):
            rows.append(previous.get(rel) or ReportRow(rel, 'skipped', None, None))
        else:
            tasks.append((rel, landmarks.get(rel)))
    config = detector.config() if hasattr(detector, 'config') else None
    init_args = (input_dir, output_dir, (image_size, width), detector, config)
    with open(partial, 'a', newline='', encoding='utf-8') as progress:
        writer = csv.writer(progress)
        if num_workers == 1 or len(tasks) <= 1:
            _worker_init(*init_args)
            results = map(_align_task, tasks)
            pool = None
        else:
            methods = multiprocessing.get_all_start_methods()
            mp = multiprocessing.get_context('fork' if 'fork' in methods else None)
            # Workers build their own detector: MXNet state is not shared across processes.
            pool = mp.Pool(num_workers, _worker_init, init_args[:3] + (None, config))
            results = pool.imap(_align_task, tasks, chunksize=4)
        try:
            for row, message in results:
                rows.append(row)
                writer.writerow(_format_row(row))
                progress.flush()
                if message and log:
                    log(message)
        finally:
            if pool is not None:  # all results are in (or we are failing): stop the workers
                pool.terminate()
                pool.join()
    rows.sort(key=lambda r: r.path)
    write_report(report, rows)
    os.remove(partial)
    return rows
