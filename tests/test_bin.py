"""insightface .bin verification sets: round trip, insightface-style files, malicious pickles refused."""
import os
import pickle

import cv2
import numpy as np
import pytest

from recognition.data import bin as bin_format
from recognition.data.bin import check_pairs, load_bin, load_verification_set, read_bin, write_bin
from recognition.utils import UserError


def jpeg(value, size=112):
    img = np.zeros((size, size, 3), np.uint8)
    img[:, :, 2] = value          # red in BGR
    img[:, : size // 4, 0] = 255  # blue stripe on the left
    return cv2.imencode('.jpg', img)[1]


def test_bin_round_trip_and_load(tmp_path):
    bins = [jpeg(10 * i) for i in range(6)]
    path = tmp_path / 'lfw.bin'
    write_bin(path, bins, [True, False, True])
    back, issame = read_bin(path)
    assert issame == [True, False, True] and back == [b.tobytes() for b in bins]
    (data, flipped), issame = load_bin(path)
    assert data.shape == (6, 3, 112, 112) and flipped.shape == data.shape
    d, f = data.asnumpy(), flipped.asnumpy()
    np.testing.assert_array_equal(f, d[:, :, :, ::-1])
    for i, b in enumerate(bins):   # exactly the decoded pixels, RGB, channels first
        np.testing.assert_array_equal(d[i], cv2.imdecode(b, cv2.IMREAD_COLOR)[:, :, ::-1].transpose(2, 0, 1))
    assert abs(d[3, 0, 50, 60] - 30) <= 3 and d[3, 2, 50, 5] > 240 and d[3, 2, 50, 100] < 15   # RGB order
    with pytest.raises(ValueError):
        write_bin(tmp_path / 'odd.bin', bins[:3], [True])


def test_reads_insightface_style_files(tmp_path):
    # build_eval_pack style: cv2.imencode buffers, numpy bool list, an old protocol
    bins = [jpeg(50), jpeg(60, size=96)]
    path = tmp_path / 'old.bin'
    with open(path, 'wb') as f:
        pickle.dump((bins, np.array([True])), f, protocol=2)
    back, issame = read_bin(path)
    assert back[1] == bins[1].tobytes() and issame == [True]
    (data, _), _ = load_bin(path, image_size=(112, 112))
    assert data.shape == (2, 3, 112, 112)   # the 96x96 image is resized


class Exploit:
    def __reduce__(self):
        return (os.system, ('touch pwned',))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / 'evil.bin'
    with open(path, 'wb') as f:
        pickle.dump(([Exploit(), b'x'], [True]), f)
    with pytest.raises(UserError, match='evil.bin.*refusing'):
        read_bin(path)
    assert not (tmp_path / 'pwned').exists()


def test_garbage_and_wrong_shapes_are_user_errors(tmp_path):
    (tmp_path / 'junk.bin').write_bytes(b'\x80\x04junk')
    with pytest.raises(UserError, match='junk.bin'):
        read_bin(tmp_path / 'junk.bin')
    with open(tmp_path / 'dict.bin', 'wb') as f:
        pickle.dump({'a': 1}, f)
    with pytest.raises(UserError, match='dict.bin: expected'):
        read_bin(tmp_path / 'dict.bin')
    with open(tmp_path / 'count.bin', 'wb') as f:
        pickle.dump(([b'a', b'b', b'c'], [True]), f)
    with pytest.raises(UserError, match='3 images for 1 pairs'):
        read_bin(tmp_path / 'count.bin')
    with pytest.raises(UserError, match='no such'):
        read_bin(tmp_path / 'none.bin')


def test_a_set_too_small_for_10_folds_is_refused(tmp_path):
    check_pairs('x.bin', [True] * 10 + [False] * 10)
    with pytest.raises(UserError, match='x.bin: 10 same-person and 9 different-person pairs; 10-fold'):
        check_pairs('x.bin', [True] * 10 + [False] * 9)
    check_pairs('x.bin', [True, False] * 5, nfolds=5)
    path = tmp_path / 'small.bin'
    write_bin(path, [jpeg(1)] * 6, [True, False, True])
    with pytest.raises(UserError, match='small.bin: 2 same-person and 1 different-person pairs'):
        load_verification_set(path)
    with pytest.raises(UserError, match='none.bin: verification set not found'):
        load_verification_set(tmp_path / 'none.bin')


def test_a_verification_set_loads_as_load_bin_does(tmp_path):
    path = tmp_path / 'ok.bin'
    issame = [True, False] * 10
    write_bin(path, [jpeg(i) for i in range(40)], issame)
    (data, flipped), same = load_verification_set(path, (8, 8))
    (want, want_flipped), want_same = load_bin(str(path), (8, 8))
    assert same == want_same == issame and data.shape == (40, 3, 8, 8)
    np.testing.assert_array_equal(data.asnumpy(), want.asnumpy())
    np.testing.assert_array_equal(flipped.asnumpy(), data.asnumpy()[:, :, :, ::-1])
    assert data.asnumpy().std() > 0


def test_the_arrays_are_allocated_without_numpy_huge_page_advice_which_comes_back():
    toggle = np.core.multiarray._set_madvise_hugepage   # sets the advice and returns what it was
    original = toggle(True)
    toggle(original)
    during = bin_format._without_huge_page_advice(lambda: toggle(False))
    after = toggle(original)
    assert during is False and after is original
