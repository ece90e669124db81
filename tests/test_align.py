"""Alignment fallbacks, the landmarks file, align_dataset_mtcnn.py and make_bin.py."""
import csv
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from skimage import data

import recognition.alignment.fallbacks as align
from recognition.alignment.fallbacks import align_face, select_face
from recognition.alignment.folder import REPORT_HEADER, REPORT_NAME, align_folder
from recognition.alignment.geometry import template, transform_points
from recognition.alignment.landmarks_file import read_landmarks_file
from recognition.data.bin import read_bin
from recognition.utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def env(private_weight_cache):
    """Subprocess environment with the suite's private weight cache, one thread per process."""
    return dict(os.environ, OMP_NUM_THREADS='1')


@pytest.fixture(scope='module')
def detector(env):
    from recognition.detection import MTCNNDetector
    return MTCNNDetector()


def face_photo():
    """A 250x250 'photo' around the astronaut's face (BGR)."""
    return np.ascontiguousarray(data.astronaut()[20:270, 100:350, ::-1])


def run(env, script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'data_process', script), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=300)


def test_select_face_prefers_large_central():
    boxes = np.array([[0, 0, 60, 60, 0.9],          # large but in the corner
                      [70, 70, 130, 130, 0.8],      # as large, centred
                      [95, 95, 105, 105, 0.99]])    # centred but tiny
    assert select_face(boxes, (200, 200, 3)) == 1
    # area - 2*offset^2 can prefer an off-centre face when it is much larger
    assert select_face(np.array([[0, 0, 150, 150], [90, 90, 110, 110]]), (200, 200)) == 0
    with pytest.raises(ValueError):
        select_face(np.zeros((0, 5)), (10, 10))


def test_given_landmarks_are_warped_onto_template():
    """Dots drawn at the given points of a rotated, scaled face land on the template's points."""
    angle, scale, shift = np.deg2rad(20), 1.7, np.array([40.0, 25.0])
    R = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = template(112) @ R.T + shift
    img = np.zeros((260, 240, 3), np.uint8)
    for x, y in points:
        cv2.circle(img, (int(round(x)), int(round(y))), 3, (255, 255, 255), -1)
    result = align_face(img, landmarks=points)
    assert result.status == 'given' and result.score is None and result.image.shape == (112, 112, 3)
    for x, y in template(112):
        assert result.image[int(round(y)), int(round(x))].min() > 200
    assert result.image[5, 5].max() == 0


def test_detected_then_rotation_retry_maps_landmarks_back(detector, monkeypatch):
    img = face_photo()
    upright = align_face(img, detector=detector)
    assert upright.status == 'detected' and upright.score > 0.9 and upright.image.shape == (112, 112, 3)
    h, w = img.shape[:2]
    M = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), 70, 1.0)
    rotated = cv2.warpAffine(img, M, (w, h))
    assert len(detector.detect(rotated)[0]) == 0     # too tilted for MTCNN itself
    monkeypatch.setattr(align, 'RETRY_MAX_SIDES', ())  # so only the rotation retry can find it
    assert align_face(rotated, detector=detector, fallbacks=False).status == 'failed'
    found = align_face(rotated, detector=detector)
    assert found.status == 'detected'
    expected = transform_points(M, upright.landmarks)
    assert np.abs(found.landmarks - expected).max() < 20     # back in the rotated photo's pixels
    eye_dist = np.linalg.norm(expected[0] - expected[1])
    assert np.linalg.norm(found.landmarks[0] - expected[0]) < 0.3 * eye_dist


def test_blank_image_is_forced_center_crop(detector):
    blank = np.full((90, 120, 3), 200, np.uint8)
    blank[40:50, 55:65] = 0
    forced = align_face(blank, detector=detector)
    assert forced.status == 'forced' and forced.landmarks is None and forced.image.shape == (112, 112, 3)
    assert forced.image[56, 56].max() < 50 and forced.image[2, 2].min() > 150   # centred
    failed = align_face(blank, detector=detector, fallbacks=False)
    assert failed.status == 'failed' and failed.image is None


def dots_photo(points, shape=(260, 240, 3)):
    img = np.zeros(shape, np.uint8)
    for x, y in points:
        cv2.circle(img, (int(round(x)), int(round(y))), 3, (255, 255, 255), -1)
    return img


def test_112x96_crops_land_on_the_96_wide_template(tmp_path, env):
    """align_face, align_dataset_mtcnn.py and make_bin.py with --image-size 112,96: the given
    landmarks end on insightface's 96-wide template, not the 112x112 one."""
    points = template(112) * 1.5 + np.array([30.0, 40.0])
    photo = dots_photo(points)
    crop = align_face(photo, landmarks=points, width=96).image
    assert crop.shape == (112, 96, 3)
    for x, y in template(112, 96):
        assert crop[int(round(y)), int(round(x))].min() > 200
    assert crop[int(round(template(112)[0, 1])), int(round(template(112)[0, 0]))].max() < 50   # 8 px left

    (tmp_path / 'in' / 'A').mkdir(parents=True)
    for name in ('A_0001.jpg', 'A_0002.jpg'):
        cv2.imwrite(str(tmp_path / 'in' / 'A' / name), photo)
    lmk = tmp_path / 'lmk.txt'
    lmk.write_text(''.join(f'A/{name} ' + ' '.join(f'{v:.2f}' for v in points.ravel()) + '\n'
                           for name in ('A_0001.jpg', 'A_0002.jpg')))
    done = run(env, 'align_dataset_mtcnn.py', tmp_path / 'in', tmp_path / 'out', '--image-size', '112,96',
               '--landmarks', lmk)
    assert done.returncode == 0, done.stderr
    pairs = tmp_path / 'pairs.txt'
    pairs.write_text('A/A_0001.jpg A/A_0002.jpg 1\n')
    done = run(env, 'make_bin.py', '--pairs', pairs, '--images', tmp_path / 'in', '--out', tmp_path / 'a.bin',
               '--landmarks', lmk, '--image-size', '112,96')
    assert done.returncode == 0, done.stderr
    faces = [cv2.imread(str(tmp_path / 'out' / 'A' / 'A_0001.jpg'))]
    faces += [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) for b in read_bin(tmp_path / 'a.bin')[0]]
    for face in faces:
        assert face.shape == (112, 96, 3)
        for x, y in template(112, 96):
            assert face[int(round(y)), int(round(x))].min() > 150

    bad = run(env, 'make_bin.py', '--pairs', pairs, '--images', tmp_path / 'in', '--out', tmp_path / 'b.bin',
              '--image-size', '112,80')
    assert bad.returncode == 2 and 'use 112 (112x112) or 112,96' in bad.stderr
    assert not (tmp_path / 'b.bin').exists()


def test_forced_crop_keeps_the_crop_shape():
    """The centre crop of a 112x96 request is the central 112:96 box, not a stretched square."""
    img = np.zeros((200, 300, 3), np.uint8)
    img[:, 150 - 43:150 + 43] = 255      # a bright band 86 px wide around the centre
    crop = align.center_crop(img, 112, width=96)
    assert crop.shape == (112, 96, 3)
    # box 200 x 171 px minus 12 and 11 px per side (6.25%): columns 75..223; the band is its middle 86 px
    assert crop[:, 48].min() > 200 and crop[:, 2].max() < 50 and crop[:, 93].max() < 50
    square = align.center_crop(img, 112)
    np.testing.assert_array_equal(square, align.center_crop(img, 112, width=112))


def test_read_landmarks_file(tmp_path):
    path = tmp_path / 'landmarks.txt'
    path.write_text('# comment\n./a/x y.jpg 1 2 3 4 5 6 7 8 9 10\n\nb.png 0 0 1 1 2 2 3 3 4 4\n')
    points = read_landmarks_file(path)
    assert sorted(points) == ['a/x y.jpg', 'b.png']
    np.testing.assert_array_equal(points['a/x y.jpg'], np.arange(1, 11).reshape(5, 2))
    path.write_text('a.jpg 1 2 3\n')
    with pytest.raises(UserError, match='landmarks.txt:1'):
        read_landmarks_file(path)
    path.write_text('a.jpg 1 2 3 4 5 6 7 8 9 10\na.jpg 1 2 3 4 5 6 7 8 9 10\n')
    with pytest.raises(UserError, match='twice'):
        read_landmarks_file(path)
    with pytest.raises(UserError, match='missing.txt'):
        read_landmarks_file(tmp_path / 'missing.txt')


def read_report(path):
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    assert rows[0] == REPORT_HEADER
    return {r[0]: r for r in rows[1:]}


def test_align_dataset_cli(tmp_path, env):
    src, out = tmp_path / 'in', tmp_path / 'out'
    (src / 'p1').mkdir(parents=True)
    (src / 'p2').mkdir()
    photo = face_photo()
    cv2.imwrite(str(src / 'p1' / 'a.jpg'), photo)
    cv2.imwrite(str(src / 'p2' / 'b.png'), cv2.resize(photo, (160, 160)))
    (src / 'p2' / 'broken.jpg').write_bytes(b'not a jpeg')
    (src / 'notes.txt').write_text('ignored')
    first = run(env, 'align_dataset_mtcnn.py', src, out, '--image-size', '112', '--num-workers', '2')
    assert first.returncode == 0, first.stderr
    assert 'broken.jpg' in first.stderr
    report = read_report(out / 'align_report.csv')
    assert sorted(report) == ['p1/a.jpg', 'p2/b.png', 'p2/broken.jpg']
    assert report['p1/a.jpg'][1] == 'detected' and float(report['p1/a.jpg'][2]) > 0.9
    assert report['p2/broken.jpg'][1] == 'failed'
    points = np.array(report['p1/a.jpg'][3:13], dtype=float).reshape(5, 2)
    assert report['p1/a.jpg'][13] == 'mtcnn' and report['p2/broken.jpg'][13] == ''   # the detector column
    assert points[0, 1] < points[2, 1] < points[3, 1]        # eye above nose above mouth, input pixels
    assert cv2.imread(str(out / 'p2' / 'b.jpg')).shape == (112, 112, 3)
    assert not (out / 'p2' / 'broken.jpg').exists()

    # Resumable: existing crops are kept (same bytes, same report rows) and only new images are done.
    stamp = os.stat(out / 'p1' / 'a.jpg').st_mtime_ns
    cv2.imwrite(str(src / 'p2' / 'c.jpg'), photo[::-1])      # upside down, aligned from given points
    lmk_file = tmp_path / 'lmk.txt'
    lmk_file.write_text('p2/c.jpg 104 169.5 147.4 166.4 125 141 101.5 130.6 144.8 127.5\n')
    second = run(env, 'align_dataset_mtcnn.py', src, out, '--landmarks', lmk_file)
    assert second.returncode == 0, second.stderr
    again = read_report(out / 'align_report.csv')
    assert again['p1/a.jpg'] == report['p1/a.jpg'] and again['p2/c.jpg'][1] == 'given'
    assert os.stat(out / 'p1' / 'a.jpg').st_mtime_ns == stamp

    bad = run(env, 'align_dataset_mtcnn.py', tmp_path / 'nowhere', out)
    assert bad.returncode == 2 and 'nowhere' in bad.stderr and 'Traceback' not in bad.stderr


def test_align_folder_workers_match_one_process(tmp_path, detector):
    """Spawned workers, started from a process whose MXNet engine already runs (the detector was used
    here), write the same crops and report rows as the in-process run."""
    src = tmp_path / 'in'
    (src / 'p').mkdir(parents=True)
    photo = face_photo()
    align_face(photo, detector=detector)
    points = template(112) * 1.5 + np.array([30.0, 40.0])
    cv2.imwrite(str(src / 'p' / 'a.jpg'), photo)
    cv2.imwrite(str(src / 'p' / 'b.png'), cv2.resize(photo, (160, 160)))
    cv2.imwrite(str(src / 'p' / 'c.jpg'), dots_photo(points))
    cv2.imwrite(str(src / 'blank.jpg'), np.full((90, 120, 3), 200, np.uint8))
    runs = {n: align_folder(src, tmp_path / f'out{n}', landmarks={'p/c.jpg': points}, num_workers=n) for n in (1, 2)}
    assert [r.status for r in runs[1]] == ['forced', 'detected', 'detected', 'given']
    assert (tmp_path / 'out1' / REPORT_NAME).read_bytes() == (tmp_path / 'out2' / REPORT_NAME).read_bytes()
    for row in runs[1]:
        name = os.path.splitext(row.path)[0] + '.jpg'
        assert (tmp_path / 'out1' / name).read_bytes() == (tmp_path / 'out2' / name).read_bytes()


def make_people(root):
    """LFW-style folder: two photos of A (shifted crops), one of B (mirrored), and their landmarks."""
    full = np.ascontiguousarray(data.astronaut()[:, :, ::-1])
    photos = {'A/A_0001.jpg': full[20:270, 100:350], 'A/A_0002.jpg': full[10:260, 90:340],
              'B/B_0001.jpg': full[20:270, 100:350][:, ::-1]}
    lines = []
    base = np.array([[104, 80.5], [147.4, 83.6], [125, 109], [101.5, 119.4], [144.8, 122.5]])
    for rel, img in photos.items():
        os.makedirs(root / os.path.dirname(rel), exist_ok=True)
        cv2.imwrite(str(root / rel), np.ascontiguousarray(img))
        pts = base + (10 if rel == 'A/A_0002.jpg' else 0)
        if rel.startswith('B'):
            pts = np.array([[249 - x, y] for x, y in pts])[[1, 0, 2, 4, 3]]
        lines.append(rel + ' ' + ' '.join(f'{v:.1f}' for v in pts.ravel()))
    (root / 'landmarks.txt').write_text('\n'.join(lines) + '\n')


def test_make_bin_both_pair_formats(tmp_path, env):
    make_people(tmp_path)
    lfw = tmp_path / 'pairs.txt'
    lfw.write_text('1\t1\nA\t1\t2\nA\t1\tB\t1\n')
    out = tmp_path / 'lfw.bin'
    done = run(env, 'make_bin.py', '--pairs', lfw, '--images', tmp_path, '--out', out,
               '--landmarks', tmp_path / 'landmarks.txt')
    assert done.returncode == 0, done.stderr
    bins, issame = read_bin(out)
    assert issame == [True, False] and len(bins) == 4
    faces = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) for b in bins]
    assert all(f.shape == (112, 112, 3) for f in faces)
    np.testing.assert_array_equal(faces[0], faces[2])          # A_0001 encoded once, used twice

    simple = tmp_path / 'pairs_label.txt'
    simple.write_text('A/A_0002.jpg B/B_0001.jpg 0\nA/A_0001.jpg A/A_0002.jpg 1\n')
    out2 = tmp_path / 'simple.bin'
    done = run(env, 'make_bin.py', '--pairs', simple, '--images', tmp_path, '--out', out2)   # detector
    assert done.returncode == 0, done.stderr
    assert '3 detected' in done.stdout
    bins, issame = read_bin(out2)
    assert issame == [False, True] and len(bins) == 4


def test_make_bin_errors(tmp_path, env):
    make_people(tmp_path)
    pairs = tmp_path / 'pairs.txt'
    pairs.write_text('C/C_0001.jpg A/A_0001.jpg 0\nD/x.jpg E/y.jpg 1\n')
    missing = run(env, 'make_bin.py', '--pairs', pairs, '--images', tmp_path, '--out', tmp_path / 'x.bin')
    assert missing.returncode == 2
    assert '3 of 4 images' in missing.stderr and 'C/C_0001.jpg' in missing.stderr and 'E/y.jpg' in missing.stderr
    assert not (tmp_path / 'x.bin').exists()
    pairs.write_text('10\t300\nA\t1\t2\n')
    wrong = run(env, 'make_bin.py', '--pairs', pairs, '--images', tmp_path, '--out', tmp_path / 'x.bin')
    assert wrong.returncode == 2 and 'promises 6000 pairs, found 1' in wrong.stderr
