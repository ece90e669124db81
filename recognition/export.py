"""ONNX export of a checkpoint's embedding graph (`fc1_output`, or several layers), checked against MXNet,
and the per-model cache the onnxruntime backend of `recognition.inference` runs.

The graph is cut at the layers (fc7 and the loss are dropped), converted with `mx.onnx.export_model`
with a dynamic batch dimension, then run with onnxruntime on a random RGB 0..255 batch next to the same
graph in `mx.mod.Module`: the export is refused unless every output agrees within `tolerance` (largest
absolute difference relative to the largest output magnitude), and nothing is written then.

The weights are initializers only, not graph inputs as mx2onnx makes them, so onnxruntime treats them as
constants and folds them (BatchNorm into the convolutions). mx2onnx writes each weight as a Python list
of floats; with the pure-Python protobuf runtime the project pins (3.20.3, which has no compiled wheel for
Python 3.11) that costs about a microsecond per float each way, minutes for r18, so for the export the
weight converter is swapped for one writing the same numbers as raw bytes (`_raw_initializers`).
"""
import contextlib
import hashlib
import json
import os

import mxnet as mx
import numpy as np
import onnx
import onnxruntime as ort
from mxnet.onnx.mx2onnx._export_onnx import MXNetGraph
from onnx import numpy_helper

from recognition.checkpoint import checkpoint_files, load_checkpoint, prelu_slopes
from recognition.utils import UserError, atomic_path

EMBEDDING_LAYER = 'fc1_output'
# Part of every cache key: bump it when the export itself changes, so old cache files are not reused.
EXPORT_VERSION = 2


def explicit_flatten(sym):
    """The same graph with `flatten` spelled out on every FullyConnected.

    MXNet's ONNX converter reads a missing `flatten` as False (the op's default is True) and would
    emit a Gemm over the last axis of pre_fc1's 4-D input.
    """
    graph = json.loads(sym.tojson())
    for node in graph['nodes']:
        if node['op'] == 'FullyConnected':
            node.setdefault('attrs', {}).setdefault('flatten', 'True')
    return mx.sym.load_json(json.dumps(graph))


def embedding_graph(prefix, epoch, layers=(EMBEDDING_LAYER,)):
    """(symbol of `layers` (a Group when several), {name: NDArray} of exactly the parameters it uses)."""
    sym, arg, aux = load_checkpoint(prefix, epoch)
    internals = sym.get_internals()
    outputs = internals.list_outputs()
    for layer in layers:
        if layer not in outputs:
            raise UserError(f'{prefix}-symbol.json: no layer {layer!r}')
    sym = internals[layers[0]] if len(layers) == 1 else mx.sym.Group([internals[n] for n in layers])
    needed = set(sym.list_arguments()) | set(sym.list_auxiliary_states())
    params = {k: v for k, v in {**arg, **aux}.items() if k in needed}
    missing = sorted(needed - set(params) - {'data'})
    if missing:
        raise UserError('%s: the checkpoint lacks %s' % (checkpoint_files(prefix, epoch)[1], missing[0]))
    return sym, params


def module_outputs(sym, params, batch):
    """MXNet's own outputs of `batch` (a list, one per layer): the reference the ONNX model must reproduce."""
    mod = mx.mod.Module(symbol=sym, context=mx.cpu(), label_names=None)
    mod.bind(data_shapes=[('data', batch.shape)], for_training=False)
    arg = {k: v for k, v in params.items() if k in sym.list_arguments()}
    aux = {k: v for k, v in params.items() if k in sym.list_auxiliary_states()}
    mod.set_params(arg, aux)
    mod.forward(mx.io.DataBatch(data=[mx.nd.array(batch)]), is_train=False)
    return [o.asnumpy() for o in mod.get_outputs()]


def onnx_output_name(layer):
    """The ONNX output name mx2onnx gives an MXNet layer (`fc1_output` -> `fc1`)."""
    return layer[:-len('_output')] if layer.endswith('_output') else layer


@contextlib.contextmanager
def _raw_initializers():
    """mx2onnx's converter of weights ("null" nodes), writing each initializer as raw bytes while active."""
    original = {v: ops['null'] for v, ops in MXNetGraph.registry_.items() if 'null' in ops}

    def convert(node, **kwargs):
        if kwargs['is_input']:
            return original[max(original)](node, **kwargs)
        name = node['name']
        array = kwargs['weights'][name]
        kwargs['initializer'].append(numpy_helper.from_array(array, name))
        dtype = onnx.mapping.NP_TYPE_TO_TENSOR_TYPE[array.dtype]
        return [onnx.helper.make_tensor_value_info(name, dtype, array.shape)], (array.dtype,)

    for ops in MXNetGraph.registry_.values():
        if 'null' in ops:
            ops['null'] = convert
    try:
        yield
    finally:
        for version, func in original.items():
            MXNetGraph.registry_[version]['null'] = func


def fix_prelu_slopes(model, slopes):
    """Make every PRelu slope on an NCHW tensor (C,) -> (C, 1, 1) (`slopes` from `prelu_slopes`).

    MXNet writes LeakyReLU(prelu)'s gamma as a (C,) initializer; ONNX broadcasts from the last axis, so
    (C,) would meet the width axis of an NCHW tensor. (C, 1, 1) is the channel-wise slope MXNet means.
    After a dense layer (N x C) the (C,) slope already broadcasts as MXNet means and stays.
    """
    inits = {i.name: i for i in model.graph.initializer}
    fixed = set()
    for node in model.graph.node:
        slope = inits.get(node.input[1]) if node.op_type == 'PRelu' else None
        if slope is not None and len(slope.dims) == 1 and slopes.get(slope.name) in (4, None):
            arr = numpy_helper.to_array(slope).reshape(-1, 1, 1)
            slope.CopyFrom(numpy_helper.from_array(arr, slope.name))
            fixed.add(slope.name)
    for info in model.graph.value_info:
        if info.name in fixed:
            dims = info.type.tensor_type.shape.dim
            channels = dims[0].dim_value
            del dims[:]
            for d in (channels, 1, 1):
                dims.add().dim_value = d


def initializers_as_constants(model):
    """Drop the initializers from the graph inputs (mx2onnx lists them there), so they are constants."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(inputs)


def convert(sym, params, path, image_size=(112, 112)):
    """Write the ONNX model of `sym` (input `data`, N x 3 x H x W, any N) to `path`."""
    h, w = image_size
    with _raw_initializers():
        mx.onnx.export_model(explicit_flatten(sym), params, in_shapes=[(1, 3, h, w)], in_types=[np.float32],
                             onnx_file_path=path, dynamic=True, dynamic_input_shapes=[(None, 3, h, w)])
    model = onnx.load(path)
    fix_prelu_slopes(model, prelu_slopes(sym, image_size))
    initializers_as_constants(model)
    return model


def relative_difference(got, expected):
    """Largest absolute difference relative to the largest magnitude of `expected`."""
    return float(np.abs(got - expected).max() / max(1e-12, float(np.abs(expected).max())))


def checked_export(prefix, epoch, out, layers=(EMBEDDING_LAYER,), image_size=(112, 112), batch_size=4,
                   tolerance=1e-4, seed=0, metadata=None):
    """Write `out` (ONNX, atomically) and return the measured difference to MXNet on a random batch; an
    export farther than `tolerance` from MXNet on any layer is refused (UserError) and nothing is written."""
    layers = list(layers)
    sym, params = embedding_graph(prefix, epoch, layers)
    batch = np.random.default_rng(seed).uniform(0, 255, (batch_size, 3) + tuple(image_size)).astype(np.float32)
    expected = module_outputs(sym, params, batch)
    with atomic_path(out) as tmp:
        model = convert(sym, params, tmp, image_size)
        for key, value in (metadata or {}).items():
            model.metadata_props.add(key=key, value=str(value))
        onnx.save(model, tmp)
        session = ort.InferenceSession(tmp, providers=['CPUExecutionProvider'])
        got = session.run([onnx_output_name(layer) for layer in layers], {'data': batch})
        diffs = [relative_difference(g, e) if g.shape == e.shape else float('inf') for g, e in zip(got, expected)]
        diff = max(diffs)
        if not diff <= tolerance:
            worst = layers[diffs.index(diff)]
            raise UserError(f'{out}: the ONNX export differs from MXNet by {diff:.2e} of the output scale on '
                            f'{worst} (tolerance {tolerance:g}); nothing written, the MXNet backend '
                            f'(--backend mxnet) still runs this model')
    return diff


def export_onnx(prefix, epoch, out, image_size=112, batch_size=4, tolerance=1e-4, seed=0):
    """Write `out` (the `fc1_output` graph) and return the measured relative difference to MXNet."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return checked_export(prefix, epoch, out, image_size=size, batch_size=batch_size, tolerance=tolerance,
                          seed=seed)


def file_sha256(path):
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()


def cache_path(prefix, epoch, layers=(EMBEDDING_LAYER,), image_size=(112, 112)):
    """Where the cached ONNX model of a checkpoint lives: beside its params,
    `PREFIX-EPOCH.<layers>.<H>x<W>.<key>.onnx`, the key a checksum of the params and symbol files and the
    export's settings, so a retrained checkpoint under the same name never meets an old export."""
    symbol, params = checkpoint_files(prefix, epoch)
    for path in (symbol, params):
        if not os.path.isfile(path):
            raise UserError(f'{path}: checkpoint file not found')
    h, w = image_size
    digest = hashlib.sha256()
    for part in (file_sha256(params), file_sha256(symbol), '+'.join(layers), f'{h}x{w}', str(EXPORT_VERSION)):
        digest.update(part.encode() + b'\0')
    return '%s-%04d.%s.%dx%d.%s.onnx' % (prefix, epoch, '+'.join(layers), h, w, digest.hexdigest()[:16])


def cached_onnx(prefix, epoch, layers=(EMBEDDING_LAYER,), image_size=(112, 112), tolerance=1e-4, log=print):
    """The path of the checked ONNX model of a checkpoint's `layers`, exported once and cached beside it.

    Exports of older params under the same name (same layers and size) are removed when a new one is made.
    """
    layers = list(layers)
    path = cache_path(prefix, epoch, layers, image_size)
    if os.path.isfile(path):
        return path
    log(f'exporting {prefix},{epoch} to ONNX (once; cached as {os.path.basename(path)})')
    diff = checked_export(prefix, epoch, path, layers, image_size, tolerance=tolerance,
                          metadata={'source': f'{prefix},{epoch}', 'layers': ','.join(layers)})
    log(f'onnxruntime matches MXNet to {diff:.2e} of the output scale (tolerance {tolerance:g})')
    folder, name = os.path.split(os.path.abspath(path))
    stem = name.rsplit('.', 2)[0] + '.'
    for other in os.listdir(folder):
        if other.startswith(stem) and other.endswith('.onnx') and other != name:
            os.remove(os.path.join(folder, other))
    return path
