"""ONNX export of a checkpoint's embedding graph (`fc1_output`), checked against MXNet.

The graph is cut at `fc1_output` (fc7 and the loss are dropped), converted with `mx.onnx.export_model`
with a dynamic batch dimension, and then run with onnxruntime on a random RGB 0..255 batch next to the same
graph in `mx.mod.Module`: the export fails unless the embeddings agree within `tolerance` (largest
absolute difference relative to the largest embedding magnitude).
"""
import json

import mxnet as mx
import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from recognition.checkpoint import checkpoint_files, load_checkpoint
from recognition.utils import UserError, atomic_path


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


def embedding_graph(prefix, epoch):
    """(fc1_output symbol, {name: NDArray} of exactly the parameters it uses) of a checkpoint."""
    sym, arg, aux = load_checkpoint(prefix, epoch)
    internals = sym.get_internals()
    if 'fc1_output' not in internals.list_outputs():
        raise UserError(f'{prefix}-symbol.json: no fc1_output layer')
    sym = internals['fc1_output']
    needed = set(sym.list_arguments()) | set(sym.list_auxiliary_states())
    params = {k: v for k, v in {**arg, **aux}.items() if k in needed}
    missing = sorted(needed - set(params) - {'data'})
    if missing:
        raise UserError('%s: the checkpoint lacks %s' % (checkpoint_files(prefix, epoch)[1], missing[0]))
    return sym, params


def module_embeddings(sym, params, batch):
    """MXNet's own embeddings of `batch`: the reference the ONNX model must reproduce."""
    mod = mx.mod.Module(symbol=sym, context=mx.cpu(), label_names=None)
    mod.bind(data_shapes=[('data', batch.shape)], for_training=False)
    arg = {k: v for k, v in params.items() if k in sym.list_arguments()}
    aux = {k: v for k, v in params.items() if k in sym.list_auxiliary_states()}
    mod.set_params(arg, aux)
    mod.forward(mx.io.DataBatch(data=[mx.nd.array(batch)]), is_train=False)
    return mod.get_outputs()[0].asnumpy()


def fix_prelu_slopes(path):
    """Make every PRelu slope (C,) -> (C, 1, 1).

    MXNet writes LeakyReLU(prelu)'s gamma as a (C,) initializer; ONNX broadcasts from the last axis, so
    (C,) would meet the width axis of an NCHW tensor. (C, 1, 1) is the channel-wise slope MXNet means.
    """
    model = onnx.load(path)
    inits = {i.name: i for i in model.graph.initializer}
    fixed = set()
    for node in model.graph.node:
        slope = inits.get(node.input[1]) if node.op_type == 'PRelu' else None
        if slope is not None and len(slope.dims) == 1:
            arr = numpy_helper.to_array(slope).reshape(-1, 1, 1)
            slope.CopyFrom(numpy_helper.from_array(arr, slope.name))
            fixed.add(slope.name)
    for info in list(model.graph.input) + list(model.graph.value_info):
        if info.name in fixed:
            dims = info.type.tensor_type.shape.dim
            channels = dims[0].dim_value
            del dims[:]
            for d in (channels, 1, 1):
                dims.add().dim_value = d
    onnx.save(model, path)


def export_onnx(prefix, epoch, out, image_size=112, batch_size=4, tolerance=1e-4, seed=0):
    """Write `out` (ONNX) and return the measured relative difference to MXNet on a batch."""
    sym, params = embedding_graph(prefix, epoch)
    shape = (batch_size, 3, image_size, image_size)
    batch = np.random.default_rng(seed).uniform(0, 255, shape).astype(np.float32)
    expected = module_embeddings(sym, params, batch)
    with atomic_path(out) as tmp:
        mx.onnx.export_model(explicit_flatten(sym), params, in_shapes=[shape], in_types=[np.float32], onnx_file_path=tmp,
                             dynamic=True, dynamic_input_shapes=[(None, 3, image_size, image_size)])
        fix_prelu_slopes(tmp)
        session = ort.InferenceSession(tmp, providers=['CPUExecutionProvider'])
        got = session.run(None, {session.get_inputs()[0].name: batch})[0]
        diff = float(np.abs(got - expected).max() / max(1e-12, float(np.abs(expected).max())))
        if got.shape != expected.shape or not diff <= tolerance:
            raise UserError(f'{out}: ONNX output differs from MXNet by {diff:.2e} of the embedding scale '
                            f'(tolerance {tolerance:g}); nothing written')
    return diff
