"""One model loader for every tool: any MXNet checkpoint, an inner layer, colour order, input scaling.

Loading follows insightface's deploy code: `mx.model.load_checkpoint` -> `sym.get_internals()[layer]`
-> `mx.mod.Module(label_names=None)`; parameters the cut graph does not use (fc7_weight) are ignored.
Images enter as RGB 0..255 (the project convention); `bgr` and `input_scale` adapt them for models
trained otherwise. A model folder (`final_eval_models/<name>/`, `model_folder.py`) holds the checkpoint and
`model.json`.
Two backends (`--backend`): MXNet (`Embedder`), and onnxruntime (`OnnxEmbedder`) on the checkpoint's ONNX
export, which also runs on GPUs MXNet 1.9 has no kernels for (README, "Inference backends").

mxnet, `checkpoint` and `export` (which import it) and onnxruntime are imported inside the functions that
load a model: the imports cost about 2 s and 1 s here, and the evaluator and the report reach this module
(through `evaluation/predictions.py`) without a model.
"""
import collections
import json
import os
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
from sklearn.preprocessing import normalize
from tqdm import tqdm

from recognition.data.lst import list_images
from recognition.model_folder import INPUT_SCALES, find_model_dirs, model_dir_spec
from recognition.utils import UserError, parse_contexts

BACKENDS = ('mxnet', 'onnxruntime')
# onnxruntime's CPU provider runs a batch as several session calls of at most this many images: its
# activations then stay in cache between layers (y1 233 vs 172 images/s at 32, demo 2,030 vs 1,940, r18 the
# same; one thread, docs/benchmarks.md), and the outputs do not depend on the split (bit-identical here).
ORT_CPU_RUN_BATCH = 8


class _Embedder:
    """What every backend shares: input conversion, flip TTA, batching. A backend gives `forward_all`."""

    def __init__(self, bgr=False, input_scale='raw', batch_size=64, name=''):
        if input_scale not in INPUT_SCALES:
            raise UserError(f'{name or "model"}: input_scale {input_scale!r} is not one of {INPUT_SCALES}')
        self.bgr, self.input_scale, self.name = bgr, input_scale, name
        self.batch_size = int(batch_size)

    def forward(self, batch):
        """Raw embeddings of an NCHW float32 RGB 0..255 batch (NDArray or numpy), any batch length.

        This is the `embed_fn` of `verification.test_bin`.
        """
        return self.forward_all(batch)[0]

    def embed(self, images, flip=True, normalized=True):
        """Embeddings of N x H x W x 3 uint8 RGB crops or N x 3 x H x W float arrays.

        flip=True adds the raw embedding of the mirrored crop before L2 (insightface's flip TTA).
        """
        images = np.asarray(images)
        nchw = to_nchw(images)
        out = None
        for lo in range(0, len(nchw), self.batch_size):
            x = nchw[lo:lo + self.batch_size].astype(np.float32)
            emb = self.forward(x)
            if flip:
                emb = emb + self.forward(np.ascontiguousarray(x[:, :, :, ::-1]))
            if out is None:
                out = np.empty((len(nchw), emb.shape[1]), dtype=np.float32)
            out[lo:lo + len(x)] = emb
        if out is None:
            raise UserError(f'{self.name or "model"}: no images to embed')
        return normalize(out) if normalized else out


class Embedder(_Embedder):
    """A bound MXNet inference module that turns face crops into embeddings.

    The graph is bound as `inference_graph` rewrites it (same numbers, MKLDNN kept on), at a fixed batch
    of `batch_size` (a short batch is padded), so every forward reuses one executor and its memory.
    """

    def __init__(self, sym, arg_params, aux_params, ctx, bgr=False, input_scale='raw', batch_size=64,
                 name=''):
        import mxnet as mx
        self.ctx = ctx if isinstance(ctx, (list, tuple)) else [ctx]
        super().__init__(bgr, input_scale, max(int(batch_size), len(self.ctx)), name)
        if 'data' not in sym.list_arguments():
            raise UserError(f'{name or "model"}: the symbol has no input named "data"')
        self.sym, self.arg_params, self.aux_params = sym, arg_params, aux_params
        self._module = None
        self._shape = None
        self._mx = mx

    def _bind(self, height, width):
        mx = self._mx
        sym, extra = inference_graph(self.sym, self.arg_params, (height, width))
        mod = mx.mod.Module(symbol=sym, context=list(self.ctx), label_names=None)
        mod.bind(data_shapes=[('data', (self.batch_size, 3, height, width))], for_training=False)
        try:
            mod.set_params({**self.arg_params, **extra}, self.aux_params, allow_missing=False, allow_extra=True)
        except (RuntimeError, ValueError, mx.base.MXNetError) as e:
            raise UserError(f'{self.name or "model"}: parameters do not fit the symbol at input '
                            f'{height}x{width}: {_last_line(e)}') from None
        self._module, self._shape = mod, (height, width)

    def _prepare(self, batch):
        """RGB 0..255 NCHW -> what the network expects."""
        nd = self._mx.nd
        x = batch if isinstance(batch, nd.NDArray) else nd.array(np.asarray(batch, dtype=np.float32))
        if self.bgr:
            x = nd.flip(x, axis=1)
        if self.input_scale == 'normalized':
            x = (x - 127.5) * 0.0078125
        elif self.input_scale == 'unit':
            x = x / 255.0
        return x

    def forward_all(self, batch):
        """One N x D array per output layer (several when loaded with a list of layers)."""
        n, _, h, w = batch.shape
        if self._module is None or self._shape != (h, w):
            self._bind(h, w)
        outs = []
        for lo in range(0, n, self.batch_size):
            x = self._prepare(batch[lo:lo + self.batch_size])
            m = x.shape[0]
            if m < self.batch_size:
                pad = self._mx.nd.zeros((self.batch_size - m,) + tuple(x.shape[1:]), dtype=x.dtype)
                x = self._mx.nd.concat(x, pad, dim=0)
            self._module.forward(self._mx.io.DataBatch(data=[x]), is_train=False)
            outs.append([o.asnumpy().reshape(o.shape[0], -1)[:m] for o in self._module.get_outputs()])
        return [np.concatenate(parts, axis=0) for parts in zip(*outs)]


def inference_graph(sym, arg_params, image_size):
    """(the graph to bind for inference, the parameters it adds): the same numbers, faster on CPU.

    Two rewrites, found by profiling a plain `mx.mod.Module` forward (docs/benchmarks.md):
    - `Flatten` before every FullyConnected: MXNet 1.9.1's MKLDNN graph pass otherwise breaks every
      forward after the first of a MobileFaceNet (a fused depthwise conv + BN straight into pre_fc1: "We
      can't generate TBlob for MKLDNN data"), which is why the pass had to be off here; with it the pass
      stays on for every net.
    - every 4-D PReLU (`LeakyReLU(prelu)`) as relu(x) + (-a) * relu(-x) with the scalings as depthwise 1x1
      convolutions (as the MTCNN detector's PReLU, exact for any slope): MXNet's prelu is not an MKLDNN op
      and converted each activation out of MKLDNN's blocked layout and back; it took two thirds of y1's
      forward time.
    """
    import mxnet as mx
    from recognition.checkpoint import prelu_slopes
    ranks = prelu_slopes(sym, image_size)
    graph = json.loads(sym.tojson())
    nodes, extra, new, where = graph['nodes'], {}, [], {}

    def add(node):
        new.append(node)
        return [len(new) - 1, 0, 0]

    for i, node in enumerate(nodes):
        old_inputs = node['inputs']
        node['inputs'] = [[where[e[0]][0], e[1], e[2]] for e in old_inputs]
        attrs = node.get('attrs', {})
        if node['op'] == 'FullyConnected' and nodes[old_inputs[0][0]]['op'] != 'Flatten':
            node['inputs'][0] = add({'op': 'Flatten', 'name': f'{node["name"]}_flatten', 'inputs': [node['inputs'][0]]})
        if node['op'] == 'LeakyReLU' and attrs.get('act_type') == 'prelu' and len(old_inputs) == 2:
            slope = nodes[old_inputs[1][0]]['name']
            if slope in arg_params and ranks.get(slope) == 4:
                channels = arg_params[slope].shape[0]
                x, name = node['inputs'][0], node['name']
                conv = {'kernel': '(1, 1)', 'num_filter': str(channels), 'num_group': str(channels), 'no_bias': 'True'}
                extra[f'{name}_minus_one'] = -mx.nd.ones((channels, 1, 1, 1))
                extra[f'{name}_minus_slope'] = -arg_params[slope].reshape((channels, 1, 1, 1))
                minus_one = add({'op': 'null', 'name': f'{name}_minus_one', 'inputs': []})
                minus_slope = add({'op': 'null', 'name': f'{name}_minus_slope', 'inputs': []})
                flipped = add({'op': 'Convolution', 'name': f'{name}_flip', 'attrs': conv, 'inputs': [x, minus_one]})
                negative = add({'op': 'Activation', 'name': f'{name}_negative', 'attrs': {'act_type': 'relu'},
                                'inputs': [flipped]})
                scaled = add({'op': 'Convolution', 'name': f'{name}_scaled', 'attrs': conv,
                              'inputs': [negative, minus_slope]})
                positive = add({'op': 'Activation', 'name': f'{name}_positive', 'attrs': {'act_type': 'relu'},
                                'inputs': [x]})
                node = {'op': 'elemwise_add', 'name': name, 'inputs': [positive, scaled]}
        where[i] = add(node)
    graph['nodes'] = new
    graph['arg_nodes'] = [i for i, n in enumerate(new) if n['op'] == 'null']
    graph['heads'] = [[where[h[0]][0], h[1], h[2]] for h in graph['heads']]
    graph.pop('node_row_ptr', None)
    return mx.sym.load_json(json.dumps(graph)), extra


def _last_line(error):
    """The informative line of an MXNet error (its message ends with the failed check)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def to_nchw(images):
    """N x H x W x 3 (or N x 3 x H x W) -> N x 3 x H x W view."""
    if images.ndim != 4:
        raise ValueError(f'expected a 4-d image batch, got shape {images.shape}')
    if images.shape[1] == 3 and images.shape[-1] != 3:
        return images
    if images.shape[-1] == 3:
        return images.transpose(0, 3, 1, 2)
    raise ValueError(f'expected N x H x W x 3 or N x 3 x H x W, got shape {images.shape}')


class OnnxEmbedder(_Embedder):
    """The same embedder run by onnxruntime on the checkpoint's ONNX export (`export.cached_onnx`: made
    once per checkpoint, layers and input size, refused unless it matches MXNet), on the CPU or one
    CUDA GPU (`device` 'cpu' or 'cuda:N', from `backend_devices`)."""

    def __init__(self, prefix, epoch, layers, device='cpu', bgr=False, input_scale='raw', batch_size=64,
                 name=''):
        super().__init__(bgr, input_scale, batch_size, name)
        self.prefix, self.epoch, self.layers, self.device = prefix, int(epoch), list(layers), device
        self._sessions = {}

    def _session(self, height, width):
        import onnxruntime as ort   # here: see the module docstring (~1 s, as mxnet's 2 s)
        from recognition.export import cached_onnx, onnx_output_name   # here: it imports mxnet and onnx
        if (height, width) in self._sessions:
            return self._sessions[height, width]
        path = cached_onnx(self.prefix, self.epoch, self.layers, (height, width))
        options = ort.SessionOptions()
        threads = os.environ.get('OMP_NUM_THREADS', '')
        if threads.isdigit() and int(threads) > 0:   # the same thread budget as MXNet's
            options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3
        providers = ['CPUExecutionProvider']
        if self.device.startswith('cuda'):
            providers.insert(0, ('CUDAExecutionProvider', {'device_id': int(self.device.split(':')[1])}))
        session = ort.InferenceSession(path, options, providers=providers)
        if self.device.startswith('cuda') and 'CUDAExecutionProvider' not in session.get_providers():
            raise UserError(f'{self.name or "model"}: onnxruntime could not start its CUDA execution provider on '
                            f'{self.device} (CUDA or cuDNN libraries missing?); see the README, "Inference backends"')
        entry = (session, session.get_inputs()[0].name, [onnx_output_name(layer) for layer in self.layers])
        self._sessions[height, width] = entry
        return entry

    def forward_all(self, batch):
        """One N x D array per output layer (several when loaded with a list of layers)."""
        x = batch.asnumpy() if hasattr(batch, 'asnumpy') else np.asarray(batch, dtype=np.float32)
        x = x.astype(np.float32, copy=False)
        if self.bgr:
            x = x[:, ::-1]
        if self.input_scale == 'normalized':
            x = (x - 127.5) * 0.0078125
        elif self.input_scale == 'unit':
            x = x / 255.0
        session, data, outputs = self._session(*x.shape[2:])
        step = self.batch_size if self.device.startswith('cuda') else min(self.batch_size, ORT_CPU_RUN_BATCH)
        parts = [session.run(outputs, {data: np.ascontiguousarray(x[lo:lo + step])}) for lo in range(0, len(x), step)]
        return [np.concatenate([p[i].reshape(len(p[i]), -1) for p in parts], axis=0) for i in range(len(outputs))]


def backend_devices(backend, gpus='', ctx=''):
    """The devices `load_embedder` takes for `backend`, from `--gpus` / `--ctx`: MXNet contexts
    (`utils.parse_contexts`) or, for onnxruntime, ['cpu'] or ['cuda:N'] (one GPU, through the CUDA
    execution provider of the onnxruntime-gpu package)."""
    if backend not in BACKENDS:
        raise UserError(f'--backend {backend!r}: expected one of {", ".join(BACKENDS)}')
    if backend == 'mxnet':
        return parse_contexts(gpus, ctx)
    import onnxruntime as ort   # here: see the module docstring
    kind, _, count = ctx.partition(':')
    if ctx and (kind not in ('cpu', 'gpu') or not (count or '1').isdigit() or int(count or 1) < 1):
        raise UserError(f'--ctx {ctx!r}: expected cpu:N or gpu:N')
    if kind == 'gpu':
        ids = list(range(int(count or 1)))
    else:
        try:
            ids = [int(i) for i in gpus.split(',') if i.strip()] if not ctx else []
        except ValueError:
            raise UserError(f'--gpus {gpus!r}: expected GPU ids such as 0 or 0,1') from None
        if not ctx and not gpus and os.environ.get('CUDA_VISIBLE_DEVICES', '').strip() \
                and 'CUDAExecutionProvider' in ort.get_available_providers():
            ids = [0]
    if not ids:
        return ['cpu']
    option = f'--ctx {ctx}' if ctx else f'--gpus {gpus}'
    if len(ids) > 1:
        raise UserError(f'{option}: the onnxruntime backend runs on one GPU; give one id')
    if 'CUDAExecutionProvider' not in ort.get_available_providers():
        raise UserError(f'{option}: onnxruntime {ort.__version__} has no CUDA execution provider; '
                        f'pip install onnxruntime-gpu (README, "Inference backends"), or run on the CPU')
    return [f'cuda:{ids[0]}']


def add_backend_arg(parser):
    """`--backend mxnet|onnxruntime`, the same in every tool that embeds faces."""
    parser.add_argument('--backend', default='mxnet', choices=BACKENDS,
                        help='mxnet, or onnxruntime on an ONNX export made once and cached beside the checkpoint '
                             '(checked against MXNet)')
    return parser


def load_embedder(prefix, epoch, layer='fc1_output', ctx=None, bgr=False, input_scale='raw', batch_size=64,
                  name=None, backend='mxnet'):
    """An embedder over `prefix-symbol.json` / `prefix-%04d.params`, cut at `layer`, or at several
    layers when `layer` is a list (e.g. `['fc1_output', 'attr_gender_output']`, see `forward_all`);
    `backend` 'mxnet' (an `Embedder`) or 'onnxruntime' (an `OnnxEmbedder`), on `ctx` from `backend_devices`."""
    import mxnet as mx
    from recognition.checkpoint import checkpoint_files, load_checkpoint, load_symbol
    if backend not in BACKENDS:
        raise UserError(f'backend {backend!r}: expected one of {", ".join(BACKENDS)}')
    if backend == 'onnxruntime':
        symbol, params = checkpoint_files(prefix, int(epoch))
        sym = load_symbol(symbol)
        if not os.path.isfile(params):
            raise UserError(f'{params}: checkpoint file not found')
    else:
        sym, arg_params, aux_params = load_checkpoint(prefix, int(epoch))
    internals = sym.get_internals()
    outputs = internals.list_outputs()
    layers = [layer] if isinstance(layer, str) else list(layer)
    for layer in layers:
        if layer not in outputs:
            hint = ', '.join(o for o in outputs if o.startswith('fc') or o.endswith('embedding_output'))[:200]
            raise UserError(f'{prefix}-symbol.json: no layer {layer!r} (candidates: {hint or outputs[-1]})')
    name = name or f'{prefix},{int(epoch)}'
    if backend == 'onnxruntime':
        return OnnxEmbedder(prefix, epoch, layers, device=(ctx or ['cpu'])[0], bgr=bgr, input_scale=input_scale,
                            batch_size=batch_size, name=name)
    ctx = ctx or [mx.cpu()]
    cut = internals[layers[0]] if len(layers) == 1 else mx.sym.Group([internals[n] for n in layers])
    return Embedder(cut, arg_params, aux_params, ctx, bgr=bgr, input_scale=input_scale,
                    batch_size=batch_size, name=name)


def load_model_dir(path, ctx=None, batch_size=64, backend='mxnet'):
    """The embedder of a model folder (`model-symbol.json`, `model-NNNN.params`, `model.json`)."""
    return load_embedder(**model_dir_spec(path), ctx=ctx, batch_size=batch_size, backend=backend)


def load_models(models, ctx=None, batch_size=64, backend='mxnet'):
    """An embedder for every model folder that `find_model_dirs(models)` finds."""
    return [load_model_dir(d, ctx=ctx, batch_size=batch_size, backend=backend) for d in find_model_dirs(models)]


def read_image(path, image_size=112):
    """An aligned face crop as H x W x 3 uint8 RGB, resized to image_size if it is not already."""
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise UserError(f'{path}: cannot read image')
    if img.shape[0] != image_size or img.shape[1] != image_size:
        img = cv2.resize(img, (image_size, image_size), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def extract_features(embedders, paths, batch_size=64, image_size=112, flip=True, progress=False, workers=2):
    """L2-normalised features of every image for every model: a list of N x D_m arrays.

    Each image is decoded once (threads overlap decoding with the forward passes) and fed to all models.
    """
    if not paths:
        raise UserError('no images to extract features from')
    feats = [[] for _ in embedders]
    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        bar = tqdm(total=len(paths), unit='img', disable=not progress, desc='features')
        for images in _prefetch(pool, lambda chunk: np.stack([read_image(p, image_size) for p in chunk]),
                                chunks, depth=2 * max(1, workers)):
            for m, embedder in enumerate(embedders):
                feats[m].append(embedder.embed(images, flip=flip))
            bar.update(len(images))
        bar.close()
    return [np.concatenate(f, axis=0) for f in feats]


def _prefetch(pool, fn, items, depth):
    """`map(fn, items)` on a thread pool with at most `depth` results waiting (bounded memory)."""
    pending = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def template_images(folder):
    """{file stem: path} of the images directly inside `folder` (template ids are file stems)."""
    images = {}
    for name in list_images(folder, recursive=False):
        stem = os.path.splitext(name)[0]
        if stem in images:
            raise UserError(f'{folder}: two images named {stem} ({os.path.basename(images[stem])}, {name})')
        images[stem] = os.path.join(folder, name)
    return images
