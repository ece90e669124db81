"""Any MXNet checkpoint as the backbone (`--network symbol --pretrained PREFIX,EPOCH --emb-layer LAYER`).

The checkpoint's graph is cut at the embedding layer and becomes a Gluon `SymbolBlock` whose parameters keep
the checkpoint's names and values, so the trainer's heads, kvstores, schedules and checkpoints apply to it
unchanged, and its saves are insightface checkpoints again (the graph up to the layer, then `fc1_output`).

A model trained on BGR or on scaled input gets the conversion from our RGB 0..255 as the first ops of the
graph (`input_bgr`, `input_scaled`), so what the trainer saves takes RGB 0..255 like every model of the
project. The colour order, the scaling and the layer come from the flags, else from a `model.json` beside
the checkpoint that names it (the harness's model folder), else RGB, raw, `fc1_output`.
"""
import json

import mxnet as mx
from mxnet.gluon import SymbolBlock

from recognition.checkpoint import EMBEDDING, load_checkpoint
from recognition.model_folder import INPUT_SCALES
from recognition.utils import UserError

PREPROCESS_NODES = ('input_bgr', 'input_scaled')


def candidate_layers(internals, input_size=112, limit=12):
    """The graph's op outputs that give one vector per sample (what an embedding layer is), the last
    `limit`; the last op outputs when the shapes do not infer at `input_size`."""
    outputs = [o for o in internals.list_outputs() if o.endswith('_output')]
    try:
        _, shapes, _ = internals.infer_shape_partial(data=(1, 3, input_size, input_size))
        shape_of = dict(zip(internals.list_outputs(), shapes))
        vectors = [o for o in outputs if len(shape_of[o]) == 2 and shape_of[o][1] > 0]
    except mx.base.MXNetError:
        vectors = []
    return (vectors or outputs)[-limit:]


def _with_input_conversion(cut, bgr, input_scale, where):
    """`cut` on an RGB 0..255 `data`, converted to what the model was trained on."""
    if not bgr and input_scale == 'raw':
        return cut
    names = {n['name'] for n in json.loads(cut.tojson())['nodes']}
    if names & set(PREPROCESS_NODES):
        raise UserError(f'{where}: the graph already converts its RGB 0..255 input (saved by this trainer): '
                        f'drop --bgr / --input-scale')
    data = mx.sym.var('data')
    x = mx.sym.flip(data, axis=1, name='input_bgr') if bgr else data
    if input_scale == 'normalized':
        x = mx.sym.identity((x - 127.5) * 0.0078125, name='input_scaled')
    elif input_scale == 'unit':
        x = mx.sym.identity(x / 255.0, name='input_scaled')
    return cut(data=x)


def _with_global_stats(sym, frozen):
    """`sym` with `use_global_stats` on every BatchNorm whose parameters are all in `frozen`."""
    graph = json.loads(sym.tojson())
    nodes = graph['nodes']
    for node in nodes:
        if node['op'] == 'BatchNorm':
            inputs = [nodes[i[0]]['name'] for i in node['inputs'][1:]]
            if set(inputs) <= frozen:
                node.setdefault('attrs', {})['use_global_stats'] = 'True'
    return mx.sym.load_json(json.dumps(graph))


def _fixed_gammas(sym):
    """Gamma parameters of BatchNorms with `fix_gamma` (MXNet's default when the attribute is absent)."""
    nodes = json.loads(sym.tojson())['nodes']
    return {nodes[n['inputs'][1][0]]['name'] for n in nodes if n['op'] == 'BatchNorm'
            and n.get('attrs', {}).get('fix_gamma', 'True').lower() in ('true', '1')}


class SymbolBackbone(SymbolBlock):
    """A checkpoint's graph up to `layer` on input `data`, with the checkpoint's parameters as initial values.

    `emb_size` is the layer's width. `freeze_statistics` makes the BatchNorms of frozen parameters normalise
    with their running statistics while training; the graph a checkpoint saves (`self(mx.sym.var('data'))`)
    stays the original one.
    """

    def __init__(self, prefix, epoch, layer=EMBEDDING + '_output', bgr=False, input_scale='raw', input_size=112):
        sym, arg, aux = load_checkpoint(prefix, epoch)
        where = '%s-symbol.json' % prefix
        internals = sym.get_internals()
        if layer not in internals.list_outputs():
            raise UserError(f'{where}: no layer {layer!r} (--emb-layer; candidates: '
                            f'{", ".join(candidate_layers(internals, input_size))})')
        cut = internals[layer]
        if 'data' not in cut.list_arguments():
            raise UserError(f'{where}: layer {layer!r} does not depend on an input named "data"')
        if layer != EMBEDDING + '_output' and EMBEDDING + '_output' in cut.get_internals().list_outputs():
            raise UserError(f'{where}: has a layer {EMBEDDING}_output before {layer!r}; the saved embedding takes '
                            f'that name, so cut at {EMBEDDING}_output or rename it')
        if input_scale not in INPUT_SCALES:
            raise UserError(f'--input-scale {input_scale!r}: choose one of {", ".join(INPUT_SCALES)}')
        cut = _with_input_conversion(cut, bgr, input_scale, where)
        _, out_shapes, _ = cut.infer_shape(data=(1, 3, input_size, input_size))
        if len(out_shapes[0]) != 2:
            raise UserError(f'{where}: layer {layer!r} gives {out_shapes[0]} per batch, not one vector per '
                            f'sample (--emb-layer; candidates: {", ".join(candidate_layers(internals, input_size))})')
        super().__init__(cut, mx.sym.var('data', dtype='float32'))
        self.emb_size = int(out_shapes[0][1])
        self._export = cut
        source = {**arg, **aux}
        fixed = _fixed_gammas(cut)
        for name, param in self.collect_params().items():
            if name not in source:
                raise UserError(f'{prefix}-{epoch:04d}.params: has no parameter {name} that {where} uses')
            param.shape = source[name].shape
            param.init = mx.init.Constant(source[name])
            if name in fixed:   # the op ignores it; no gradient, no weight decay on it
                param.grad_req = 'null'

    def params_up_to(self, layer):
        """Names of the parameters (and statistics) the graph uses up to and including `layer`."""
        internals = self._export.get_internals()
        if layer not in internals.list_outputs():
            raise UserError(f'--freeze-until {layer!r}: no such layer (candidates: '
                            f'{", ".join([o for o in internals.list_outputs() if o.endswith("_output")][-12:])})')
        part = internals[layer]
        return [n for n in part.list_arguments() + part.list_auxiliary_states() if n != 'data']

    def freeze_statistics(self, frozen):
        # MXNet 1.9's SymbolBlock has no public way to swap its graph; the export graph stays in `_export`.
        self._cached_graph = (self._cached_graph[0], _with_global_stats(self._export, set(frozen)))
        self._clear_cached_op()

    def forward(self, x, *args):
        if isinstance(x, mx.sym.Symbol):
            return self._export(data=x)
        return super().forward(x, *args)
