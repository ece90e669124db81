"""face2rec2: layout, attributes, shards, bad input, determinism, interruption."""
import logging
import os
import subprocess
import sys

import cv2
import mxnet as mx
import numpy as np
import pytest

from recognition.alignment.geometry import bbox_crop, template
from recognition.data import packer
from recognition.data.lst import LstItem, dir_to_lst, write_lst
from recognition.data.record import IdentityRecordWriter, read_attributes
from recognition.utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_faces(root, identities=5, per_identity=3, seed=0):
    """identity folders of 112x112 JPEGs, a .lst beside them and a FairFace-style attribute CSV."""
    rng = np.random.default_rng(seed)
    rows = ['path,SUBJECT_ID,GENDER,SKIN_COLOUR,AGE,GLASSES,HEAD_POSE']
    for k in range(identities):
        os.makedirs(os.path.join(root, 'train', 'p%02d' % k))
        for j in range(per_identity):
            img = cv2.resize((rng.random((14, 14, 3)) * 255).astype(np.uint8), (112, 112))
            cv2.imwrite(os.path.join(root, 'train', 'p%02d' % k, '%d.jpg' % j), img)
            rows.append('p%02d/%d.jpg,s%d,%d,%d,%d,%s,%s' % (k, j, k, k % 2, k // 3, 20 + j, ['no', 'yes'][j % 2],
                                                             ['frontal', 'left', 'right'][j]))
    write_lst(os.path.join(root, 'train.lst'), dir_to_lst(os.path.join(root, 'train'), root=root))
    csv_path = os.path.join(root, 'train_attributes.csv')
    with open(csv_path, 'w') as f:
        f.write('\n'.join(rows) + '\n')
    return csv_path


def raw_records(prefix):
    rec = mx.recordio.MXIndexedRecordIO(prefix + '.idx', prefix + '.rec', 'r')
    out = {k: mx.recordio.unpack(rec.read_idx(k)) for k in rec.keys}
    rec.close()
    return out


def check_layout(prefix):
    """Assert insightface's layout with raw mx.recordio; return {identity: [image bodies]}."""
    records = raw_records(prefix)
    header = records[0][0]
    first, stop = int(header.label[0]), int(header.label[1])
    assert sorted(records) == list(range(stop))
    by_identity = {}
    for key in range(first, stop):
        a, b = (int(v) for v in records[key][0].label)
        ids = {int(records[k][0].label[0]) for k in range(a, b)}
        assert len(ids) == 1
        by_identity[ids.pop()] = [records[k][1] for k in range(a, b)]
    assert sum(len(v) for v in by_identity.values()) == first - 1
    return by_identity, records


def test_pack_round_trip_with_attributes(tmp_path):
    csv_path = make_faces(str(tmp_path))
    summary = packer.pack(str(tmp_path / 'train'), attributes=csv_path)
    assert (summary['images'], summary['identities'], summary['skipped'], summary['shards']) == (15, 5, 0, 1)
    by_identity, records = check_layout(str(tmp_path / 'train'))
    assert sorted(by_identity) == [0, 1, 2, 3, 4]
    # aligned images keep their original bytes, as insightface
    assert by_identity[2][1] == (tmp_path / 'train' / 'p02' / '1.jpg').read_bytes()
    h, _ = records[1 + 3 * 3 + 2]   # identity 3, image 2: [id, aligned, gender, skin, age, glasses, head_pose]
    assert h.flag == 7 and h.label.tolist() == [3, 1, 1, 1, 22, 0, 2]
    names, codes = read_attributes(str(tmp_path / 'train.attributes.json'))
    assert names == ['gender', 'skin_colour', 'age', 'glasses', 'head_pose']
    assert codes['gender'] == {0: 'female', 1: 'male'} and codes['skin_colour'] == {0: 'light', 1: 'dark'}
    assert codes['glasses'] == {0: 'no', 1: 'yes'} and codes['head_pose'] == {0: 'frontal', 1: 'left', 2: 'right'}
    assert (tmp_path / 'property').read_text().strip() == '5,112,112'


def test_code_meanings_from_a_file_beside_the_csv_or_an_argument(tmp_path):
    csv_path = make_faces(str(tmp_path))
    packer.write_codes(packer.codes_path(csv_path), {'AGE': {20: '20 years', 21: '21 years', 22: '22 years'},
                                                     'GENDER': {0: 'female', 1: 'male'}})
    assert packer.codes_path(csv_path) == str(tmp_path / 'train_attributes.codes.json')
    packer.pack(str(tmp_path / 'train'), attributes=csv_path)
    _, codes = read_attributes(str(tmp_path / 'train.attributes.json'))
    assert codes['age'] == {20: '20 years', 21: '21 years', 22: '22 years'}
    assert codes['gender'] == {0: 'female', 1: 'male'} and codes['skin_colour'] == {0: 'light', 1: 'dark'}
    assert codes['head_pose'] == {0: 'frontal', 1: 'left', 2: 'right'}   # text column: its own codes

    # an explicit argument replaces the file beside the CSV
    packer.pack(str(tmp_path / 'train'), attributes=csv_path, codes={'age': {20: 'a', 21: 'b', 22: 'c'}})
    assert read_attributes(str(tmp_path / 'train.attributes.json'))[1]['age'] == {20: 'a', 21: 'b', 22: 'c'}

    bad = [({'AGE': {20: 'x'}}, 'no meaning for code.*21, 22'),
           ({'GENDER': {0: 'male'}}, 'contradict'),
           ({'HEIGHT': {0: 'short'}}, 'no column for'),
           ({'GLASSES': {0: 'no'}}, 'non-integer')]
    for codes, message in bad:
        with pytest.raises(UserError, match=message):
            packer.pack(str(tmp_path / 'train'), attributes=csv_path, codes=codes)
    (tmp_path / 'train_attributes.codes.json').write_text('[1, 2]')
    with pytest.raises(UserError, match='train_attributes.codes.json: not an attribute codes file'):
        packer.pack(str(tmp_path / 'train'), attributes=csv_path)


def gradient_scene(height=480, width=640):
    """BGR image whose blue channel encodes x and green encodes y, so a crop's edges tell its box."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return np.stack([x, y, np.full_like(x, 128)], axis=2).round().astype(np.uint8)


def box_levels(img):
    """(blue of the left column, blue of the right column, green of the top row, green of the bottom row)."""
    img = img.astype(np.float64)
    return np.array([img[:, 0, 0].mean(), img[:, -1, 0].mean(), img[0, :, 1].mean(), img[-1, :, 1].mean()])


def test_unaligned_rows_are_aligned_with_landmarks_or_cropped_as_insightface(tmp_path):
    photo = np.full((200, 240, 3), 40, np.uint8)
    lmk = template() * 1.4 + np.array([50.0, 20.0])   # face scaled and shifted in a bigger photo
    for x, y in lmk.astype(int):
        cv2.circle(photo, (x, y), 4, (255, 255, 255), -1)
    cv2.imwrite(str(tmp_path / 'photo.png'), photo)
    scene = gradient_scene()
    cv2.imwrite(str(tmp_path / 'scene.png'), scene)
    write_lst(tmp_path / 'u.lst', [LstItem(0, 'photo.png', 0, np.array([0, 0, 240, 200]), lmk),
                                   LstItem(0, 'scene.png', 1, np.array([100, 60, 180, 150])),
                                   LstItem(0, 'scene.png', 2)])
    assert len((tmp_path / 'u.lst').read_text().splitlines()[1].split('\t')) == 7   # bbox, no landmarks
    summary = packer.pack(str(tmp_path / 'u'))
    assert summary['images'] == 3 and summary['skipped'] == 0
    assert not (tmp_path / 'u.skipped.txt').exists()
    records = raw_records(str(tmp_path / 'u'))
    faces = [cv2.imdecode(np.frombuffer(records[k][1], np.uint8), cv2.IMREAD_COLOR) for k in (1, 2, 3)]
    assert [records[k][0].label.tolist() for k in (1, 2, 3)] == [[0, 0], [1, 0], [2, 0]]
    assert all(face.shape == (112, 112, 3) for face in faces)
    for x, y in template():   # landmarks: the bright dots land on the template points
        assert faces[0][int(round(y)), int(round(x))].mean() > 150
    # bbox 100,60,180,150 widened by 22 px on each side: columns 78..201, rows 38..171, stretched
    bbox_crop = cv2.resize(scene[38:172, 78:202], (112, 112))
    np.testing.assert_allclose(box_levels(faces[1]), box_levels(bbox_crop), atol=2)
    assert abs(box_levels(faces[1])[0] - 255 * 100 / 639) > 6   # not the bare box
    # no bbox: 640x480 minus 6.25% (40, 30 px) per side, then widened by 22 px: columns 18..621, rows 8..471
    centre_crop = cv2.resize(scene[8:472, 18:622], (112, 112))
    np.testing.assert_allclose(box_levels(faces[2]), box_levels(centre_crop), atol=2)
    assert abs(box_levels(faces[2])[0] - 255 * 40 / 639) > 6


def test_bbox_crop_clips_to_the_image_and_rejects_an_empty_box():
    scene = gradient_scene(100, 120)
    edge = bbox_crop(scene, np.array([5, 10, 60, 70]), 112, width=96)   # 112x96: H x W
    assert edge.shape == (112, 96, 3)
    np.testing.assert_allclose(box_levels(edge), box_levels(cv2.resize(scene[0:92, 0:82], (96, 112))), atol=1)
    with pytest.raises(ValueError, match='empty'):
        bbox_crop(scene, np.array([200, 200, 260, 260]))


def test_output_is_identical_for_any_number_of_processes(tmp_path):
    make_faces(str(tmp_path))
    lines = (tmp_path / 'train.lst').read_text().splitlines()
    write_lst(tmp_path / 'u.lst', [LstItem(0, line.split('\t')[1], int(line.split('\t')[2]), None,
                                           template() + 3.0) for line in lines])
    packer.pack(str(tmp_path / 'u'), num_threads=1)
    one = (tmp_path / 'u.rec').read_bytes()
    packer.pack(str(tmp_path / 'u'), num_threads=2)
    assert (tmp_path / 'u.rec').read_bytes() == one


def test_shards_are_complete_and_never_split_identities(tmp_path):
    csv_path = make_faces(str(tmp_path), identities=7)
    summary = packer.pack(str(tmp_path / 'train'), num_shards=3, attributes=csv_path)
    assert summary['shards'] == 3 and summary['images'] == 21
    seen = {}
    for s in range(3):
        prefix = str(tmp_path / ('train_%d' % s))
        by_identity, _ = check_layout(prefix)
        assert by_identity and not set(by_identity) & set(seen)
        seen.update(by_identity)
        assert read_attributes(prefix + '.attributes.json')[0][0] == 'gender'
    assert sorted(seen) == list(range(7)) and all(len(v) == 3 for v in seen.values())
    assert (tmp_path / 'property').read_text().strip() == '7,112,112'


def test_corrupt_images_are_skipped_and_listed(tmp_path):
    make_faces(str(tmp_path))
    (tmp_path / 'train' / 'p01' / '0.jpg').write_bytes(b'not an image')
    good = (tmp_path / 'train' / 'p03' / '2.jpg').read_bytes()
    (tmp_path / 'train' / 'p03' / '2.jpg').write_bytes(good[:len(good) // 2])
    (tmp_path / 'train' / 'p04' / '1.jpg').unlink()
    summary = packer.pack(str(tmp_path / 'train'))
    assert summary['skipped'] == 3 and summary['images'] == 12 and summary['identities'] == 5
    listed = dict(line.split('\t') for line in (tmp_path / 'train.skipped.txt').read_text().splitlines())
    truncated = listed.pop(os.path.join('train', 'p03', '2.jpg'))
    assert truncated in ('cannot decode', 'truncated JPEG')   # older OpenCV decodes a truncated JPEG
    assert listed == {os.path.join('train', 'p01', '0.jpg'): 'cannot decode',
                      os.path.join('train', 'p04', '1.jpg'): 'cannot read (No such file or directory)'}


def test_unsorted_lst_is_grouped_with_a_warning(tmp_path, caplog):
    make_faces(str(tmp_path), identities=3)
    lines = (tmp_path / 'train.lst').read_text().splitlines()
    (tmp_path / 'train.lst').write_text('\n'.join(lines[::2] + lines[1::2]) + '\n')
    with caplog.at_level(logging.WARNING):
        summary = packer.pack(str(tmp_path / 'train'))
    assert 'not grouped by label' in caplog.text
    assert summary['identities'] == 3
    by_identity, _ = check_layout(str(tmp_path / 'train'))
    assert {k: len(v) for k, v in by_identity.items()} == {0: 3, 1: 3, 2: 3}


def test_interrupted_packing_leaves_no_complete_looking_rec(tmp_path, monkeypatch):
    make_faces(str(tmp_path))
    calls = []

    def interrupt(self, identity, images):
        calls.append(identity)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, identity, images)

    original = IdentityRecordWriter.add_identity
    monkeypatch.setattr(IdentityRecordWriter, 'add_identity', interrupt)
    with pytest.raises(KeyboardInterrupt):
        packer.pack(str(tmp_path / 'train'), num_threads=2)
    leftovers = [f for f in os.listdir(tmp_path) if f.startswith(('train.', '.train'))]
    assert leftovers == ['train.lst']


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match='no .lst'):
        packer.pack(str(tmp_path / 'missing'))
    (tmp_path / 'bad.jpg').write_bytes(b'x')
    write_lst(tmp_path / 'zero.lst', [LstItem(1, 'bad.jpg', 0)])
    with pytest.raises(UserError, match='no usable images'):
        packer.pack(str(tmp_path / 'zero'))
    assert not (tmp_path / 'zero.rec').exists() and (tmp_path / 'zero.skipped.txt').exists()
    csv_path = make_faces(str(tmp_path / 'd'))
    with open(csv_path) as f:
        rows = f.read().splitlines()
    with open(csv_path, 'w') as f:
        f.write('\n'.join(rows[:-1]) + '\n')
    with pytest.raises(UserError, match='no row for 1 of 15'):
        packer.pack(str(tmp_path / 'd' / 'train'), attributes=csv_path)


def test_cli_exit_status(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, 'data_process', 'face2rec2.py'), str(tmp_path / 'none')],
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith('error: ') and 'none*.lst' in run.stderr
    make_faces(str(tmp_path))
    lst = subprocess.run([sys.executable, os.path.join(ROOT, 'data_process', 'dir2lst.py'), str(tmp_path / 'train'),
                          '--root', str(tmp_path)], capture_output=True, text=True, check=True).stdout
    assert lst == (tmp_path / 'train.lst').read_text()
    run = subprocess.run([sys.executable, os.path.join(ROOT, 'data_process', 'face2rec2.py'), str(tmp_path / 'train'),
                          '--num-thread', '2'], capture_output=True, text=True)
    assert run.returncode == 0 and 'packed 15 images of 5 identities' in run.stdout


def test_each_packing_run_replaces_the_prefixs_previous_generation(tmp_path):
    from recognition.data.dataset import FaceRecordDataset
    from recognition.data.shards import read_manifest, training_recs
    make_faces(str(tmp_path), identities=8)
    folder = str(tmp_path)

    def recs():
        return sorted(f for f in os.listdir(folder) if f.endswith(('.rec', '.idx', '.shards.json')))

    packer.pack(str(tmp_path / 'train'))
    packer.pack(str(tmp_path / 'train'), num_shards=4)   # shards supersede the single rec
    assert recs() == ['train.shards.json'] + ['train_%d.%s' % (s, e) for s in range(4) for e in ('idx', 'rec')]
    manifest = read_manifest(str(tmp_path / 'train'))
    assert [(s['rec'], s['first_identity'], s['max_identity']) for s in manifest['shards']] == \
        [('train_0.rec', 0, 1), ('train_1.rec', 2, 3), ('train_2.rec', 4, 5), ('train_3.rec', 6, 7)]
    assert manifest['identities'] == 8 and manifest['shards'][0]['rec_bytes'] == (tmp_path / 'train_0.rec').stat().st_size
    # A distributed rank opens some shards of the set: ids 0..1 of 8 classes is no property mismatch.
    assert FaceRecordDataset([str(tmp_path / 'train_0.rec')]).num_classes == 8
    packer.pack(str(tmp_path / 'train'), num_shards=2)   # shards of the old manifest beyond 2 go
    assert recs() == ['train.shards.json'] + ['train_%d.%s' % (s, e) for s in range(2) for e in ('idx', 'rec')]
    packer.pack(str(tmp_path / 'train'))                 # a single rec supersedes manifest and shards
    assert recs() == ['train.idx', 'train.rec']
    assert training_recs(folder, 'demo') == [str(tmp_path / 'train.rec')]
    assert (tmp_path / 'property').read_text() == '8,112,112\n'
