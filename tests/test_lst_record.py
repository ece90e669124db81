"""The .lst format and the identity-indexed rec layout, checked against raw mx.recordio."""
import os

import mxnet as mx
import numpy as np
import pytest

from recognition.data.lst import LstItem, dir_to_lst, list_images, read_lst, write_lst
from recognition.data.record import (IdentityRecordWriter, RecordFile, read_attributes, read_layout,
                                     read_property)
from recognition.utils import UserError

MAGIC = b'\x0a\x23\xd7\xce'


def test_lst_round_trip_keeps_insightface_columns(tmp_path):
    lmk = np.array([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]], np.float32)
    items = [LstItem(1, 'a/1.jpg', 0), LstItem(0, 'b/2.jpg', 1, np.array([1, 2, 30, 40]), lmk)]
    path = tmp_path / 'x.lst'
    write_lst(path, items)
    cols = path.read_text().splitlines()[1].split('\t')
    assert len(cols) == 17 and float(cols[7]) == pytest.approx(38.3) and float(cols[12]) == pytest.approx(51.7)
    back = read_lst(path)
    assert [(i.aligned, i.path, i.label) for i in back] == [(1, 'a/1.jpg', 0), (0, 'b/2.jpg', 1)]
    assert back[0].landmarks is None and back[1].bbox.tolist() == [1, 2, 30, 40]
    np.testing.assert_allclose(back[1].landmarks, lmk, atol=1e-3)


def test_bad_lst_line_is_a_user_error(tmp_path):
    path = tmp_path / 'bad.lst'
    path.write_text('1\tonly-two\n')
    with pytest.raises(UserError, match='bad.lst:1'):
        read_lst(path)
    with pytest.raises(UserError, match='no such'):
        read_lst(tmp_path / 'missing.lst')


def test_dir_to_lst_labels_sorted_folders(tmp_path):
    for name in ['zed', 'amy', 'empty']:
        (tmp_path / name).mkdir()
    (tmp_path / 'zed' / '1.jpg').write_bytes(b'x')
    (tmp_path / 'amy' / '2.png').write_bytes(b'x')
    (tmp_path / 'amy' / 'notes.txt').write_text('x')
    items = dir_to_lst(tmp_path, root=tmp_path)
    assert [(i.path, i.label) for i in items] == [(os.path.join('amy', '2.png'), 0), (os.path.join('zed', '1.jpg'), 1)]



def test_one_image_lister_for_every_tool(tmp_path):
    """Alignment, extraction and prediction share the lister: every case and type OpenCV reads
    (.tif, .webp too), sorted '/' paths, an excluded output folder, or only the top level."""
    for rel in ['b.TIF', 'a.webp', 'sub/deep/c.jpg', 'sub/notes.txt', 'out/d.png']:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b'x')
    assert list_images(tmp_path) == ['a.webp', 'b.TIF', 'out/d.png', 'sub/deep/c.jpg']
    assert list_images(tmp_path, exclude=tmp_path / 'out') == ['a.webp', 'b.TIF', 'sub/deep/c.jpg']
    assert list_images(tmp_path, recursive=False) == ['a.webp', 'b.TIF']
    with pytest.raises(UserError, match='nothing: image folder not found'):
        list_images(tmp_path / 'nothing')

def _write_demo(prefix, identities, names=('gender',), codes=None):
    with IdentityRecordWriter(prefix, attribute_names=list(names), attribute_codes=codes or {}) as w:
        for identity, images in identities:
            w.add_identity(identity, images)


def test_layout_matches_insightface_with_raw_recordio(tmp_path):
    prefix = str(tmp_path / 'train')
    split_body = b'abcd' + MAGIC + MAGIC + b'xy' + MAGIC   # dmlc splits this record into parts
    _write_demo(prefix, [(7, [(b'img-a', 1, [0]), (b'img-b', 0, [1])]), (9, [(split_body, 1, [1])])],
                codes={'gender': {0: 'female', 1: 'male'}})
    rec = mx.recordio.MXIndexedRecordIO(prefix + '.idx', prefix + '.rec', 'r')
    assert sorted(rec.keys) == list(range(6))
    header, body = mx.recordio.unpack(rec.read_idx(0))
    assert header.flag == 2 and list(header.label) == [4, 6] and body == b''
    labels = [mx.recordio.unpack(rec.read_idx(k)) for k in (1, 2, 3)]
    assert [list(h.label) for h, _ in labels] == [[7, 1, 0], [7, 0, 1], [9, 1, 1]]
    assert all(h.flag == 3 for h, _ in labels)
    assert [b for _, b in labels] == [b'img-a', b'img-b', split_body]
    assert [list(mx.recordio.unpack(rec.read_idx(k))[0].label) for k in (4, 5)] == [[1, 3], [3, 4]]
    lines = open(prefix + '.idx').read().splitlines()
    assert all(len(line.split('\t')) == 2 for line in lines) and lines[0] == '0\t0'
    assert read_property(str(tmp_path / 'property')) == (10, 112, 112)
    assert read_attributes(prefix + '.attributes.json') == (['gender'], {'gender': {0: 'female', 1: 'male'}})
    own = RecordFile(prefix + '.rec')
    assert own.unpack(3)[2] == split_body and list(own.read_label(2)[1]) == [7, 0, 1]
    layout = read_layout(prefix + '.rec')
    assert layout.indexed and layout.identities.tolist() == [7, 9]
    assert layout.ranges.tolist() == [[0, 2], [2, 3]] and layout.image_keys.tolist() == [1, 2, 3]


def test_writer_refuses_split_identity_and_wrong_attribute_count(tmp_path):
    w = IdentityRecordWriter(str(tmp_path / 'x'), attribute_names=['gender'])
    w.add_identity(1, [(b'a', 1, [0])])
    with pytest.raises(ValueError, match='twice'):
        w.add_identity(1, [(b'b', 1, [0])])
    with pytest.raises(ValueError, match='attributes'):
        w.add_identity(2, [(b'b', 1, [])])
    w.abort()
    assert os.listdir(tmp_path) == []


def test_interrupted_writer_keeps_previous_outputs(tmp_path):
    prefix = str(tmp_path / 'train')
    _write_demo(prefix, [(0, [(b'old', 1, [0])])])
    before = open(prefix + '.rec', 'rb').read()
    with pytest.raises(KeyboardInterrupt):
        with IdentityRecordWriter(prefix, attribute_names=['gender']) as w:
            w.add_identity(0, [(b'new', 1, [1])])
            raise KeyboardInterrupt
    assert open(prefix + '.rec', 'rb').read() == before
    assert sorted(os.listdir(tmp_path)) == ['property', 'train.attributes.json', 'train.idx', 'train.rec']


def _insightface_rec(prefix, labels, indexed=True):
    """A rec as insightface's rec_builder writes it: scalar image labels (flag 0)."""
    rec = mx.recordio.MXIndexedRecordIO(prefix + '.idx', prefix + '.rec', 'w')
    first = 1 if indexed else 0
    for i, label in enumerate(labels):
        rec.write_idx(first + i, mx.recordio.pack(mx.recordio.IRHeader(0, float(label), first + i, 0), b'jpg%d' % i))
    if indexed:
        n = len(labels)
        runs = np.flatnonzero(np.r_[True, np.diff(labels) != 0]).tolist() + [n]
        for j, (a, b) in enumerate(zip(runs[:-1], runs[1:])):
            rec.write_idx(n + 1 + j, mx.recordio.pack(mx.recordio.IRHeader(0, [a + 1, b + 1], 0, 0), b''))
        rec.write_idx(0, mx.recordio.pack(mx.recordio.IRHeader(0, [n + 1, n + len(runs)], 0, 1), b''))
    rec.close()


def test_reads_insightface_scalar_label_recs(tmp_path):
    prefix = str(tmp_path / 'ins')
    _insightface_rec(prefix, [0, 0, 1, 2, 2, 2])
    layout = read_layout(prefix + '.rec')
    assert layout.indexed and layout.label_width == 0
    assert layout.identities.tolist() == [0, 1, 2] and layout.ranges.tolist() == [[0, 2], [2, 3], [3, 6]]
    assert layout.attribute_names == []


def test_reads_rec_without_identity_index(tmp_path):
    prefix = str(tmp_path / 'seq')
    _insightface_rec(prefix, [1, 0, 1, 0, 2], indexed=False)
    layout = read_layout(prefix + '.rec')
    assert not layout.indexed
    assert layout.identities.tolist() == [0, 1, 2]
    assert layout.image_keys.tolist() == [1, 3, 0, 2, 4]   # grouped by label, stable


def test_missing_idx_is_a_user_error(tmp_path):
    (tmp_path / 'x.rec').write_bytes(b'')
    with pytest.raises(UserError, match='x.idx'):
        RecordFile(str(tmp_path / 'x.rec'))
