"""Align a folder tree of photos in worker processes: crops mirror the tree as JPEGs, and
align_report.csv records how each face was found; an interrupted run resumes."""
import csv
import os
import posixpath
from collections import namedtuple

import cv2
import numpy as np

from recognition.data.lst import list_images
from recognition.detection.choice import LazyDetector, build_detectors
from recognition.utils import UserError, atomic_open
from recognition.worker_pool import spawn_pool
from recognition.alignment.fallbacks import align_face
from recognition.alignment.geometry import template
from recognition.alignment.landmarks_file import read_landmarks_file, relative_key

ReportRow = namedtuple('ReportRow', 'path status score landmarks detector', defaults=(None,))
ReportRow.__doc__ = """One line of align_report.csv: input path relative to the input folder (with
'/'), status, detection score (None unless detected), the 5x2 landmarks (or None) and the detector
that found the face ('mtcnn', 'mmod'; None unless detected)."""

REPORT_NAME = 'align_report.csv'
REPORT_HEADER = ['path', 'status', 'score'] + [f'{c}{i}' for i in range(1, 6) for c in 'xy'] + ['detector']


def output_name(rel_path):
    """Where the aligned crop of `rel_path` goes inside the output folder: same path, .jpg."""
    return posixpath.splitext(rel_path)[0] + '.jpg'


def _format_row(row):
    score = '' if row.score is None else f'{row.score:.6f}'
    points = [''] * 10 if row.landmarks is None else [f'{v:.2f}' for v in np.ravel(row.landmarks)]
    return [row.path, row.status, score] + points + [row.detector or '']


def _parse_row(values):
    path, status, score = values[:3]
    coords = values[3:13]
    landmarks = np.array([float(v) for v in coords]).reshape(5, 2) if all(coords) and len(coords) == 10 else None
    detector = values[13] if len(values) > 13 and values[13] else None
    return ReportRow(path, status, float(score) if score else None, landmarks, detector)


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
            # Reports written before the detector column have one value less; their rows still resume.
            if values and values != REPORT_HEADER and len(REPORT_HEADER) - 1 <= len(values) <= len(REPORT_HEADER):
                try:
                    rows.append(_parse_row(values))
                except ValueError:  # a torn last line of an interrupted run
                    continue
    return rows


_WORKER = {}


def _worker_init(input_dir, output_dir, crop_size, detectors=None, specs=()):
    """Per-process state (crop_size: (image_size, width)). Worker processes get the detectors as
    (name, config) `specs` and build their own, lazily (landmark runs need none)."""
    detectors = detectors or [LazyDetector(name, config) for name, config in specs]
    _WORKER.update(input_dir=input_dir, output_dir=output_dir, crop_size=crop_size, detectors=detectors)


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
    result = align_face(img, detector=_WORKER['detectors'], landmarks=points, image_size=image_size, width=width)
    if result.image is None:
        return ReportRow(rel, 'failed', None, result.landmarks), f'{src}: no face'
    ok, buf = cv2.imencode('.jpg', result.image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        return ReportRow(rel, 'failed', None, None), f'{src}: JPEG encoding failed'
    with atomic_open(os.path.join(_WORKER['output_dir'], output_name(rel)), 'wb') as f:
        f.write(buf.tobytes())
    return ReportRow(rel, result.status, result.score, result.landmarks, result.detector), None


def align_folder(input_dir, output_dir, image_size=112, landmarks=None, detector=None, num_workers=1,
                 skip_existing=True, log=None, width=None):
    """Align every image under `input_dir` into `output_dir` (same tree, .jpg, image_size x width
    crops: 112x112, or 112x96 with width=96) and write `output_dir/align_report.csv`; returns the
    ReportRows sorted by path.

    `landmarks`: {relative path: 5x2} (or a landmarks file path); listed images are warped from
    their points, the others detected with fallbacks by `detector`: one detector or a list in the
    order tried (default: the default `--detector` choice, `detection.choice.build_detectors`).
    Resumable: with `skip_existing`, images whose output exists are skipped and keep their row from
    the previous (possibly interrupted) run's report ('skipped' if it has none). Unreadable images become 'failed' rows; `log` gets a message.
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
    if detector is None:
        detector = build_detectors()
    detectors = list(detector) if isinstance(detector, (list, tuple)) else [detector]
    init_args = (input_dir, output_dir, (image_size, width), detectors)
    with open(partial, 'a', newline='', encoding='utf-8') as progress:
        writer = csv.writer(progress)
        if num_workers == 1 or len(tasks) <= 1:
            _worker_init(*init_args)
            results = map(_align_task, tasks)
            pool = None
        else:
            # Workers build their own detectors: MXNet state is not shared across processes.
            specs = [(d.name, d.config()) for d in detectors]
            pool = spawn_pool(num_workers, _worker_init, init_args[:3] + (None, specs))
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
