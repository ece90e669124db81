"""FaceRecordDataset, transforms and the train loader over recs made here."""
import os
import pickle
import runpy
import sys

import cv2
import mxnet as mx
import numpy as np
import pytest

from recognition.data.dataset import _caption, FaceRecordDataset, batch_to_nchw, expand_rec_paths, train_loader
from recognition.data.record import IdentityRecordWriter
from recognition.data.shards import parse_shard, rec_order, shard_prefixes
from recognition.data.transforms import TrainTransform, sample_rng, train_transform
from recognition.utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [3, 1, 4, 2, 3]   # images per identity


def face(identity, j):
    """A 112x112 BGR face whose red channel encodes the identity and green the image number."""
    img = np.zeros((112, 112, 3), np.uint8)
    img[:, :, 2] = 40 * identity + 20
    img[:, :, 1] = 30 * j + 10
    img[:, :56, 0] = 200   # left half blue: shows mirroring
    return cv2.imencode('.png', img)[1].tobytes()


def write_rec(prefix, identities):
    codes = {'gender': {0: 'female', 1: 'male'}, 'skin_colour': {0: 'light', 1: 'dark'}}
    with IdentityRecordWriter(prefix, attribute_names=['gender', 'skin_colour'], attribute_codes=codes,
                              num_classes=len(SIZES)) as w:
        for k in identities:
            w.add_identity(k, [(face(k, j), 1, [k % 2, int(k >= 3)]) for j in range(SIZES[k])])


@pytest.fixture
def rec(tmp_path):
    write_rec(str(tmp_path / 'train'), range(5))
    return str(tmp_path / 'train.rec')


def test_dataset_reads_images_labels_and_ranges(rec):
    ds = FaceRecordDataset(rec)
    assert len(ds) == sum(SIZES) and ds.num_classes == 5
    assert ds.labels.tolist() == [k for k, n in enumerate(SIZES) for _ in range(n)]
    assert ds.id2range == {0: (0, 3), 1: (3, 4), 2: (4, 8), 3: (8, 10), 4: (10, 13)}
    img, label = ds[5]
    assert img.shape == (3, 112, 112) and img.dtype == np.float32 and label == 2
    assert img[0, 0, 0] == 100 and img[1, 0, 0] == 40 and img[2, 0, 0] == 200   # RGB, CHW
    assert ds.attribute_names == ['gender', 'skin_colour'] and ds.attribute_codes['gender'][1] == 'male'
    assert ds.sample_attributes.tolist()[8] == [1, 1]
    _, vec = FaceRecordDataset(rec, return_attributes=True)[8]
    assert vec.dtype == np.float32 and vec.tolist() == [3, 1, 1]
    assert ds.identities_where(gender='male') == [1, 3] and ds.identities_where(skin_colour=1, gender=0) == [4]
    with pytest.raises(UserError, match='no attribute'):
        ds.identities_where(age=3)


def test_images_filter_and_identity_subset(rec):
    ds = FaceRecordDataset(rec, images_filter=3)
    assert sorted(ds.id2range) == [0, 2, 4] and len(ds) == 10
    sub = FaceRecordDataset(rec, identities=[1, 3])
    assert sub.labels.tolist() == [1, 3, 3] and sub.num_classes == 5
    assert sub[1][0][1, 0, 0] == 10   # first image of identity 3


def test_shards_read_like_one_rec(tmp_path, rec):
    write_rec(str(tmp_path / 'part_0'), [0, 1, 2])
    write_rec(str(tmp_path / 'part_1'), [3, 4])
    whole, shards = FaceRecordDataset(rec), FaceRecordDataset(str(tmp_path / 'part_*.rec'))
    assert shards.rec_paths == [str(tmp_path / 'part_0.rec'), str(tmp_path / 'part_1.rec')]
    assert shards.id2range == whole.id2range
    assert all(shards.read_raw(i)[0] == whole.read_raw(i)[0] for i in range(len(whole)))
    with pytest.raises(UserError, match='no rec file matches'):
        FaceRecordDataset(str(tmp_path / 'nothing_*.rec'))


def test_read_raw_copies_records_into_a_subset_rec(tmp_path, rec):
    ds = FaceRecordDataset(rec)
    with IdentityRecordWriter(str(tmp_path / 'sub' / 'hard'), attribute_names=ds.attribute_names,
                              attribute_codes=ds.attribute_codes, num_classes=ds.num_classes) as w:
        for identity in (4, 2):
            raws = [ds.read_raw(i) for i in range(*ds.id2range[identity])]
            w.add_identity(identity, [(body, label[1], label[2:]) for body, label in raws])
    sub = FaceRecordDataset(str(tmp_path / 'sub' / 'hard.rec'))
    assert sub.labels.tolist() == [2] * 4 + [4] * 3 and sub.num_classes == 5
    assert sub.read_raw(0)[0] == ds.read_raw(4)[0]


def test_insightface_scalar_label_rec_as_dataset(tmp_path):
    prefix = str(tmp_path / 'ins')
    rec = mx.recordio.MXIndexedRecordIO(prefix + '.idx', prefix + '.rec', 'w')
    labels = [0, 0, 1]
    for i, k in enumerate(labels):
        rec.write_idx(i + 1, mx.recordio.pack(mx.recordio.IRHeader(0, float(k), i + 1, 0), face(k, i)))
    rec.write_idx(4, mx.recordio.pack(mx.recordio.IRHeader(0, [1, 3], 4, 0), b''))
    rec.write_idx(5, mx.recordio.pack(mx.recordio.IRHeader(0, [3, 4], 5, 0), b''))
    rec.write_idx(0, mx.recordio.pack(mx.recordio.IRHeader(0, [4, 6], 0, 1), b''))
    rec.close()
    ds = FaceRecordDataset(prefix + '.rec', return_attributes=True)
    assert ds.num_classes == 2 and ds.id2range == {0: (0, 2), 1: (2, 3)}
    img, label = ds[2]
    assert label.tolist() == [1] and img[0, 0, 0] == 60


def test_transforms_mirror_and_augment(rec):
    img = cv2.cvtColor(cv2.imdecode(np.frombuffer(face(1, 1), np.uint8), 1), cv2.COLOR_BGR2RGB)
    plain, flipped = img, img[:, ::-1]
    mirror = TrainTransform(mirror=True)
    outs = [mirror(img, sample_rng(3, 0, i)) for i in range(20)]
    assert all(np.array_equal(o, plain) or np.array_equal(o, flipped) for o in outs)
    assert any(np.array_equal(o, flipped) for o in outs) and any(np.array_equal(o, plain) for o in outs)
    full = pickle.loads(pickle.dumps(train_transform(color=True, cutoff=True, compress=True)))
    outs = [full(img, sample_rng(1, 0, i)) for i in range(10)]
    assert all(o.shape == (112, 112, 3) and o.dtype == np.float32 and 0 <= o.min() and o.max() <= 255 for o in outs)
    assert any(not np.array_equal(o, plain) and not np.array_equal(o, flipped) for o in outs)
    # The same key gives the same augmentation; another epoch or seed another one.
    np.testing.assert_array_equal(full(img, sample_rng(1, 0, 4)), outs[4])
    assert not np.array_equal(full(img, sample_rng(1, 1, 4)), outs[4])
    assert not np.array_equal(full(img, sample_rng(2, 0, 4)), outs[4])
    cut = TrainTransform(mirror=False, cutoff=40)
    assert any((o == 128).all(axis=2).sum() >= 20 * 20 for o in (cut(img, sample_rng(0, 0, i)) for i in range(10)))
    single = FaceRecordDataset(rec, transform=TrainTransform(mirror=True))[0][0]
    assert single.shape == (3, 112, 112) and single.dtype == np.float32


def test_augmented_batches_do_not_depend_on_workers_or_resume_point(rec):
    """Each sample's augmentation is keyed by (seed, epoch, index): 0 or 2 workers, and a loader that
    starts mid-epoch, give the same bits."""
    ds = FaceRecordDataset(rec, transform=train_transform(mirror=True, color=True, cutoff=True, compress=True))
    epochs = {}
    for workers in (0, 2):
        loader = train_loader(ds, 4, seed=5, num_workers=workers)
        epochs[workers] = [[d.asnumpy() for d, _ in loader] for _ in range(2)]
    for e in range(2):
        for a, b in zip(epochs[0][e], epochs[2][e]):
            np.testing.assert_array_equal(a, b)
    late = [d.asnumpy() for d, _ in train_loader(ds, 4, seed=5, epoch=1, start_batch=1)]
    for a, b in zip(late, epochs[0][1][1:]):
        np.testing.assert_array_equal(a, b)
    other = [d.asnumpy() for d, _ in train_loader(ds, 4, seed=6)]
    assert not all(np.array_equal(a, b) for a, b in zip(other, epochs[0][0]))


def test_train_loader_order_resume_and_subset(rec):
    ds = FaceRecordDataset(rec, transform=train_transform())
    loader = train_loader(ds, 4, seed=7)
    assert len(loader) == 3
    epoch0 = [label.asnumpy().tolist() for _, label in loader]
    epoch1 = [label.asnumpy().tolist() for _, label in loader]
    data, _ = next(iter(train_loader(ds, 4, seed=7)))
    assert isinstance(data, mx.nd.NDArray) and data.shape == (4, 3, 112, 112) and data.dtype == np.float32
    assert [label.asnumpy().tolist() for _, label in train_loader(ds, 4, seed=7)] == epoch0
    assert epoch1 != epoch0
    resumed = train_loader(ds, 4, seed=7, epoch=1, start_batch=1)
    assert [label.asnumpy().tolist() for _, label in resumed] == epoch1[1:]
    resumed.set_epoch(0)
    assert [label.asnumpy().tolist() for _, label in resumed] == epoch0
    sub = [label.asnumpy() for _, label in train_loader(ds, 2, identities=[0, 3], last_batch='keep')]
    assert sorted(np.concatenate(sub).tolist()) == [0, 0, 0, 3, 3]


def test_worker_processes_give_the_same_batches(rec):
    ds = FaceRecordDataset(rec, return_attributes=True)
    single = [(d.asnumpy(), l.asnumpy()) for d, l in train_loader(ds, 5, seed=1)]
    workers = [(d.asnumpy(), l.asnumpy()) for d, l in train_loader(ds, 5, seed=1, num_workers=1)]
    assert len(single) == len(workers) == 2
    for (d0, l0), (d1, l1) in zip(single, workers):
        np.testing.assert_array_equal(d0, d1)
        np.testing.assert_array_equal(l0, l1)
    assert single[0][1].shape == (5, 3)
    in_order = next(iter(train_loader(ds, 5, shuffle=False, num_workers=1)))[0].asnumpy()
    np.testing.assert_array_equal(in_order, np.stack([ds[i][0] for i in range(5)]))


def test_batches_of_float_transforms_and_the_batch_conversion(rec):
    hwc = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    out = batch_to_nchw(hwc)
    assert isinstance(out, mx.nd.NDArray) and out.dtype == np.float32
    np.testing.assert_array_equal(out.asnumpy(), hwc.transpose(0, 3, 1, 2).astype(np.float32))
    np.testing.assert_array_equal(batch_to_nchw(mx.nd.array(hwc, dtype=np.uint8)).asnumpy(), out.asnumpy())
    ds = FaceRecordDataset(rec, transform=train_transform(mirror=False, color=0.5))
    for workers in (0, 1):
        batches = [d.asnumpy() for d, _ in train_loader(ds, 6, shuffle=False, num_workers=workers)]
        assert len(batches) == 2 and batches[0].shape == (6, 3, 112, 112) and batches[0].dtype == np.float32
        assert 0 <= batches[0].min() and batches[0].max() <= 255 and not np.all(batches[0] == np.round(batches[0]))


def test_captions_keep_whole_names_within_the_tile(rec):
    ds = FaceRecordDataset(rec)
    lines = _caption(ds, ds.read_raw(8)[1], 112, 0.33)
    assert lines == ['id 3 gender=male', 'skin_colour=dark']
    narrow = _caption(ds, ds.read_raw(8)[1], 70, 0.33)   # no pair fits: each breaks after its '='
    assert narrow == ['id 3', 'gender=', 'male', 'skin_colour=', 'dark']


def test_show_record_cli(tmp_path, rec, monkeypatch):
    out = tmp_path / 'grid.png'
    script = os.path.join(ROOT, 'data_process', 'show_record.py')
    monkeypatch.setattr(sys, 'argv', [script, '--rec', rec, '--out', str(out), '--n', '6', '--shuffle'])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(script, run_name='__main__')
    assert done.value.code == 0
    grid = cv2.imread(str(out))
    assert grid.shape[1] == 6 * 112 and grid.shape[0] > 112


def test_a_shard_glob_expands_in_shard_order(tmp_path):
    """The names shard_prefixes writes are read back by parse_shard; a glob lists them numerically."""
    prefixes = shard_prefixes(str(tmp_path / 'train.rec'), 12)
    assert prefixes[10] == str(tmp_path / 'train_10')
    assert [parse_shard(p + '.rec') for p in prefixes] == [(str(tmp_path / 'train'), s) for s in range(12)]
    assert parse_shard(str(tmp_path / 'train.rec')) is None and parse_shard('train_x.rec') is None
    for p in reversed(prefixes):
        open(p + '.rec', 'wb').close()
    assert expand_rec_paths(str(tmp_path / 'train_*.rec')) == [p + '.rec' for p in prefixes]
    assert rec_order(['b.rec', 'a_10.rec', 'a.rec', 'a_9.rec']) == ['a.rec', 'a_9.rec', 'a_10.rec', 'b.rec']
