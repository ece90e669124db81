"""The synthetic FairFace-shaped generator: determinism, planted imbalance, true landmarks, file formats."""
import csv
import hashlib
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from recognition.alignment.geometry import norm_crop
from recognition.data import demo_sets, synthetic_faces as faces
from recognition.data.bin import read_bin
from recognition.utils import UserError

TINY = demo_sets.DemoSizes(emore_ids=8, emore_images=4, emore_ver_ids=8, ver_pairs=20, train_ids=8, train_images=4,
                   eval_ids=8, eval_images=3, eval_pairs=40)


def _hashes(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, 'rb') as f:
                out[os.path.relpath(path, folder)] = hashlib.sha1(f.read()).hexdigest()
    return out


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo')
    summary = demo_sets.build_demo(out, seed=0, sizes=TINY, workers=1, log=lambda *a: None)
    return out, summary


def _identity(seed, i, group=(0, 0)):
    return faces.sample_identity(np.random.default_rng([seed, i]), *group, i)


def test_render_is_deterministic_per_seed():
    ident = _identity(3, 0)
    var = faces.sample_variation(ident, np.random.default_rng(7))
    a, la = faces.render_aligned(ident, var)
    b, lb = faces.render_aligned(ident, faces.sample_variation(ident, np.random.default_rng(7)))
    assert a.shape == (112, 112, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    c, _ = faces.render_aligned(ident, faces.sample_variation(ident, np.random.default_rng(8)))
    assert np.abs(a.astype(int) - c).mean() > 3
    p1, l1, box1 = faces.render_photo(ident, var)
    p2, l2, box2 = faces.render_photo(ident, var)
    assert p1.shape == (250, 250, 3) and np.array_equal(p1, p2) and np.array_equal(l1, l2) and box1 == box2


def test_photo_landmarks_map_to_the_face():
    """Aligning a photo with its true landmarks reproduces the aligned rendering of the same image;
    landmarks shifted by 15% of the eye distance do clearly worse."""
    ratios = []
    inner = (slice(46, 98), slice(36, 76))   # between the eyes and the mouth in the 112x112 template
    for i in range(8):
        ident = _identity(1, i, faces.GROUPS[i % 4])
        var = faces.sample_variation(ident, np.random.default_rng([1, i, 0]))
        aligned, _ = faces.render_aligned(ident, var)
        photo, lmk, box = faces.render_photo(ident, var)
        assert ((lmk >= 0) & (lmk < 250)).all() and 20 < box < 250
        eye = np.linalg.norm(lmk[1] - lmk[0])

        def mad(points):
            return np.abs(norm_crop(photo, points)[inner].astype(float) - aligned[inner]).mean()

        true = mad(lmk)
        shifted = min(mad(lmk + np.array(d) * eye) for d in ([0.15, 0], [-0.15, 0], [0, 0.15]))
        assert true < shifted
        ratios.append(true / shifted)
    assert np.mean(ratios) < 0.6


def test_identities_separable_but_not_identical():
    """Pixel space: images of one identity are closer than images of different identities (so the
    data is learnable), yet they differ (so it is not trivial)."""
    feats, ids = [], []
    for i in range(12):
        ident = _identity(5, i, faces.GROUPS[i % 4])
        for j in range(5):
            img, _ = faces.render_aligned(ident, faces.sample_variation(ident, np.random.default_rng([5, i, j])))
            x = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[24:104:2, 16:96:2].astype(np.float64).ravel()
            x -= x.mean()
            feats.append(x / np.linalg.norm(x))
            ids.append(i)
    X, ids = np.array(feats), np.array(ids)
    sim = X @ X.T
    same = (ids[:, None] == ids[None, :]) & ~np.eye(len(ids), dtype=bool)
    diff = ids[:, None] != ids[None, :]
    assert sim[same].mean() > sim[diff].mean() + 0.15
    np.fill_diagonal(sim, -2)
    nearest = ids[sim.argmax(1)]
    assert (nearest == ids).mean() > 0.4          # chance is 4/59
    assert sim[same].max() < 0.995                # no two images of a person are copies


def test_group_shares_and_planted_minority():
    emore = demo_sets.make_identities(0, 'emore', 200, demo_sets.EMORE_SHARES)
    counts = {g: sum(i.group == g for i in emore) for g in faces.GROUPS}
    assert counts == demo_sets.apportion(200, demo_sets.EMORE_SHARES) and sum(counts.values()) == 200
    assert counts[faces.MINORITY] == min(counts.values()) and counts[(1, 0)] == max(counts.values())
    val = demo_sets.make_identities(0, 'val', 40, demo_sets.BALANCED_SHARES)
    assert {g: sum(i.group == g for i in val) for g in faces.GROUPS} == {g: 10 for g in faces.GROUPS}
    # The minority is drawn from a narrower distribution: its identities are more alike.
    people = [faces.sample_identity(np.random.default_rng([9, n]), *g, n) for g in faces.GROUPS for n in range(60)]
    keys = ('face_w', 'face_top', 'face_bot', 'eye_x', 'eye_y', 'eye_w', 'nose_y', 'nose_w', 'mouth_y', 'mouth_w')

    def spread(group):
        v = np.array([[getattr(p, k) for k in keys] + list(p.skin_bgr / 100) for p in people if p.group == group])
        return v.std(0).mean()

    minority = spread(faces.MINORITY)
    assert all(minority < 0.7 * spread(g) for g in faces.GROUPS if g != faces.MINORITY)


def test_pairs_balanced_and_hard():
    rng = np.random.default_rng(0)
    members = {s: [f'{s}_{j}' for j in range(5)] for s in range(16)}
    group_of = {s: faces.GROUPS[s % 4] for s in members}
    pairs = demo_sets.make_pairs(rng, members, members, group_of, 200)
    labels = [same for _, _, same in pairs]
    assert len(pairs) == 200 and labels[0::2] == [1] * 100 and labels[1::2] == [0] * 100
    key_group = {k: group_of[s] for s, ks in members.items() for k in ks}
    pos_groups = [key_group[a] for a, b, same in pairs if same]
    assert {g: pos_groups.count(g) for g in faces.GROUPS} == {g: 25 for g in faces.GROUPS}
    negatives = [(a, b) for a, b, same in pairs if not same]
    assert all(a.split('_')[0] != b.split('_')[0] for a, b in negatives)
    assert sum(key_group[a] == key_group[b] for a, b in negatives) > 0.7 * len(negatives)
    assert len({tuple(sorted(p)) for p in negatives}) == len(negatives)


def test_emore_layout_with_raw_recordio(demo):
    import mxnet as mx
    out, _ = demo
    folder = out / 'demo_emore'
    assert sorted(os.listdir(folder)) == sorted(demo_sets.EMORE_FILES + (demo_sets.SUMMARY_FILE,))
    rec = mx.recordio.MXIndexedRecordIO(str(folder / 'train.idx'), str(folder / 'train.rec'), 'r')
    header, _ = mx.recordio.unpack(rec.read_idx(0))
    first, end = int(header.label[0]), int(header.label[1])
    num_ids = end - first
    assert num_ids == 8 and (folder / 'property').read_text().strip() == '8,112,112'
    position = 1
    for key in range(first, end):
        h, _ = mx.recordio.unpack(rec.read_idx(key))
        a, b = int(h.label[0]), int(h.label[1])
        assert a == position and b > a
        for k in range(a, b):
            hk, img = mx.recordio.unpack_img(rec.read_idx(k))
            assert img.shape == (112, 112, 3) and int(hk.label[0]) == key - first and hk.label[1] == 1
            assert len(hk.label) == 2 + 5
        position = b
    assert position == first
    side = json.loads((folder / 'train.attributes.json').read_text())
    assert side['names'] == ['gender', 'skin_colour', 'age', 'glasses', 'head_pose']
    assert side['codes'] == {'gender': {'0': 'female', '1': 'male'}, 'skin_colour': {'0': 'light', '1': 'dark'},
                             'age': {'0': '18-34', '1': '35-54', '2': '55+'}, 'glasses': {'0': 'no', '1': 'yes'},
                             'head_pose': {'0': 'frontal', '1': 'non-frontal'}}
    for name in ('lfw', 'cfp_fp'):
        bins, issame = read_bin(folder / f'{name}.bin')
        assert len(bins) == 2 * len(issame) and sum(issame) * 2 == len(issame)
        assert cv2.imdecode(np.frombuffer(bins[0], np.uint8), cv2.IMREAD_COLOR).shape == (112, 112, 3)


def _read_csv(path):
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_fairface_layout(demo):
    import mxnet as mx
    out, summary = demo
    folder = out / 'demo_fairface'
    header, rows = _read_csv(folder / 'train_attributes.csv')
    assert header == list(demo_sets.TRAIN_COLUMNS)
    for path, *_ in rows:
        assert cv2.imread(str(folder / 'train' / path)).shape == (112, 112, 3)
    rec = mx.recordio.MXIndexedRecordIO(str(folder / 'train.idx'), str(folder / 'train.rec'), 'r')
    h0, _ = mx.recordio.unpack(rec.read_idx(0))
    assert int(h0.label[0]) == len(rows) + 1
    h1, _ = mx.recordio.unpack(rec.read_idx(1))
    first = rows[0]        # identity folders sort like the subject ids, so label == SUBJECT_ID
    assert list(h1.label) == [float(first[1]), 1.0] + [float(v) for v in first[2:]]
    assert len(os.listdir(folder / 'train')) == 8
    # the generator states what its codes mean; the packer copied them into the rec's sidecar
    codes = json.loads((folder / 'train_attributes.codes.json').read_text())
    assert sorted(codes) == sorted(demo_sets.TRAIN_COLUMNS[2:]) and codes['AGE']['2'] == '55+'
    side = json.loads((folder / 'train.attributes.json').read_text())
    assert side['codes']['head_pose'] == {'0': 'frontal', '1': 'non-frontal'}
    assert {int(r[4]) for r in rows} <= {int(k) for k in codes['AGE']}

    subjects = {}
    for split in ('val', 'test'):
        d = folder / split
        meta_header, meta = _read_csv(d / 'metadata.csv')
        assert meta_header == list(demo_sets.METADATA_COLUMNS)
        assert json.loads((d / 'metadata.codes.json').read_text())['SOURCE'] == {'0': 'still', '1': 'video-frame'}
        assert len(meta) == 8 * 3 == len(os.listdir(d / 'images'))
        subjects[split] = {m[1] for m in meta}
        lines = (d / 'landmarks.txt').read_text().splitlines()
        assert len(lines) == len(meta)
        name, *values = lines[0].split()
        assert name == f'{meta[0][0]}.jpg' and len(values) == 10
        assert cv2.imread(str(d / 'images' / name)).shape == (250, 250, 3)
        pred_header, pred = _read_csv(d / 'predictions.csv')
        gt_header, gt = _read_csv(d / 'ground_truth.csv')
        assert pred_header == ['TEMPLATE_ID1', 'TEMPLATE_ID2', 'SCORE']
        assert gt_header == ['TEMPLATE_ID1', 'TEMPLATE_ID2', 'LABEL']
        assert [r[:2] for r in pred] == [r[:2] for r in gt] and len(gt) == 40
        assert sum(int(r[2]) for r in gt) == 20
        group = {m[0]: (m[4], m[3]) for m in meta}
        assert len({group[r[0]] for r in gt if r[2] == '1'}) == 4     # positives in every group
        subject = {m[0]: m[1] for m in meta}
        assert all((subject[a] == subject[b]) == (label == '1') for a, b, label in gt)
    train_subjects = {r[1] for r in rows}
    assert not (train_subjects & subjects['val']) and not (subjects['val'] & subjects['test'])
    bins, issame = read_bin(folder / 'val.bin')
    _, gt = _read_csv(folder / 'val' / 'ground_truth.csv')
    assert issame == [r[2] == '1' for r in gt]
    assert summary['fairface']['val']['pairs'] == 40


def test_build_is_deterministic_and_skips_complete_sets(demo, tmp_path):
    out, _ = demo
    demo_sets.build_demo(tmp_path / 'a', seed=0, only='fairface', sizes=TINY, workers=2, log=lambda *a: None)
    assert _hashes(tmp_path / 'a' / 'demo_fairface') == _hashes(out / 'demo_fairface')
    messages = []
    assert demo_sets.build_demo(tmp_path / 'a', seed=0, only='fairface', sizes=TINY, log=messages.append) == {}
    assert 'kept' in messages[0]
    demo_sets.build_demo(tmp_path / 'a', seed=1, only='fairface', sizes=TINY, force=True, log=lambda *a: None)
    other, first = _hashes(tmp_path / 'a' / 'demo_fairface'), _hashes(out / 'demo_fairface')
    assert other['train.rec'] != first['train.rec'] and other['val.bin'] != first['val.bin']
    assert [p for p in os.listdir(tmp_path / 'a') if p.startswith('.')] == []


def test_bad_sizes_are_user_errors(tmp_path):
    with pytest.raises(UserError, match='--train-ids'):
        demo_sets.build_demo(tmp_path, sizes=demo_sets.DemoSizes(train_ids=2))
    proc = subprocess.run([sys.executable, 'data_process/make_demo_data.py', '--out', str(tmp_path),
                           '--eval-images', '1'], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 2 and proc.stderr.startswith('error: --eval-images')
