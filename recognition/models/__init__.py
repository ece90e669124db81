"""Network registry: ``get_model('r50')`` builds insightface's ``--network`` presets of ``recognition/config.py``.

The presets are the one list of networks; this module maps each preset's ``net_name`` (insightface's symbol
file) to the family that builds it from the preset's keys.  Every network takes NCHW float32 RGB 0..255 input
(normalised inside the graph) and returns the ``fc1`` embedding; parameter names are insightface's, so
``prefix-symbol.json`` / ``prefix-NNNN.params`` pairs move between the two code bases.  Initialise with
:func:`init_params`.  The ``symbol`` network is the exception that keeps the rule: any MXNet checkpoint's
graph and names (``symbol.py``), converted from RGB 0..255 inside the graph, saved again with ``fc1_output``.
"""
import json

import mxnet as mx
import numpy as np

from recognition.checkpoint import parse_pretrained
from recognition.config import network as NETWORK_PRESETS
from recognition.config import network_settings
from recognition.model_folder import model_json_settings
from recognition.utils import UserError
from recognition.models.fresnet import FILTERS, UNITS, FResNet
from recognition.models.layers import XAVIER, PReLU, native_prelu, walk_blocks
from recognition.models.mobilefacenet import MobileFaceNet
from recognition.models.resnest import UNITS as RESNEST_UNITS
from recognition.models.resnest import ResNeSt
from recognition.models.symbol import SymbolBackbone

__all__ = ['get_model', 'build_network', 'list_models', 'init_params', 'get_symbol', 'native_prelu', 'PReLU',
           'FResNet', 'MobileFaceNet', 'ResNeSt', 'SymbolBackbone', 'FAMILIES', 'FRESNET_UNITS', 'walk_blocks',
           'forward_flops', 'parameter_count', 'random_inference_net']

# Units per stage of each fresnet depth: insightface's, plus the demo network's 10 layers (one unit per stage).
FRESNET_UNITS = {**UNITS, 10: [1, 1, 1, 1]}


def _fresnet(settings, **kwargs):
    """insightface's fresnet.py: ``num_layers`` picks the units, ``net_multiplier`` scales its widths
    (default 1) and ``net_input`` picks the stem (1: 3x3/1, insightface's default; 0: 7x7/2)."""
    if settings.num_layers not in FRESNET_UNITS:
        raise UserError('fresnet: num_layers %r not one of %s' % (settings.num_layers, sorted(FRESNET_UNITS)))
    filters = [int(f * settings.get('net_multiplier', 1.0)) for f in FILTERS]
    return FResNet(units=FRESNET_UNITS[settings.num_layers], filters=filters, emb_size=settings.emb_size,
                   net_input=settings.get('net_input', 1), **kwargs)


def _fmobilefacenet(settings, **kwargs):
    """insightface's fmobilefacenet.py with its ``net_blocks`` (GDC output)."""
    return MobileFaceNet(emb_size=settings.emb_size, blocks=tuple(settings.net_blocks), **kwargs)


def _resnest(settings, **kwargs):
    """The FairFace seed's resnest.py (r50sa, r101sa): ``num_layers`` 50 or 101, ``net_dropblock`` the
    DropBlock probability on the last two stages (0 off)."""
    if settings.num_layers not in RESNEST_UNITS:
        raise UserError('resnest: num_layers %r not one of %s' % (settings.num_layers, sorted(RESNEST_UNITS)))
    return ResNeSt(settings.num_layers, emb_size=settings.emb_size, dropblock=settings.get('net_dropblock', 0.0),
                   **kwargs)


def _symbol(settings, pretrained='', emb_layer='', bgr=None, input_scale='', input_size=112):
    """Any MXNet checkpoint `pretrained` (`prefix,epoch`) cut at `emb_layer`; the layer, colour order and
    input scaling not given come from a model.json beside it, else fc1_output, RGB, raw."""
    if not pretrained:
        raise UserError('--network symbol: give --pretrained PREFIX,EPOCH, the checkpoint whose graph it trains')
    prefix, epoch = parse_pretrained(pretrained)
    layer, found_bgr, found_scale = model_json_settings(prefix)
    return SymbolBackbone(prefix, epoch, layer=emb_layer or layer,
                          bgr=found_bgr if bgr is None else bgr, input_scale=input_scale or found_scale,
                          input_size=input_size)


# insightface's net_name -> builder of that family from a network preset.
FAMILIES = {'fresnet': _fresnet, 'fmobilefacenet': _fmobilefacenet, 'resnest': _resnest, 'symbol': _symbol}


def list_models():
    """Registered network names (``--network`` choices): the network presets of recognition/config.py."""
    return sorted(NETWORK_PRESETS)


def get_model(name, emb_size=None, **kwargs):
    """Build network ``name`` (see :func:`list_models`) with ``emb_size`` (its preset's if None).

    ``kwargs`` go to the constructor, e.g. ``bn_mom=0.9`` (or ``input_size=96`` for a fresnet).
    """
    settings = network_settings(name)
    if emb_size:
        settings.emb_size = emb_size
    return FAMILIES[settings.net_name](settings, **kwargs)


def build_network(opts, input_size=112):
    """The network of a training run's options: preset `opts.network` with `opts.emb_size` for
    `input_size` x `input_size` input; a `symbol` network from `opts.pretrained` and its `emb_layer`,
    `bgr`, `input_scale` options (its embedding size is its layer's)."""
    settings = network_settings(opts.network)
    if settings.net_name == 'symbol':
        return get_model(opts.network, pretrained=opts.get('pretrained'), emb_layer=opts.get('emb_layer'),
                         bgr=opts.get('bgr'), input_scale=opts.get('input_scale'), input_size=input_size)
    size = {} if input_size == 112 else {'input_size': input_size}
    return get_model(opts.network, emb_size=opts.emb_size, **size)


def init_params(net, ctx=None, force_reinit=False):
    """insightface's initialisation: Xavier(gaussian, out, 2) for weights; PReLU gamma 0.25,
    BN gamma/beta 1/0, moving stats 0/1, biases 0 (each parameter's own initialiser wins)."""
    net.initialize(XAVIER, ctx=ctx, force_reinit=force_reinit)
    return net


def random_inference_net(name, seed=0, emb_size=None):
    """Preset `name`, initialised (`init_params`) and then given random BatchNorm statistics (mean N(0, 0.1),
    variance U(0.5, 2)) and PReLU slopes (U(-0.3, 0.6), some negative), all drawn from `seed`: an untrained
    net whose inference exercises what a trained one's does (the backend tests, bench/bench_inference.py)."""
    mx.random.seed(seed)
    net = init_params(get_model(name, emb_size=emb_size))
    net(mx.nd.zeros((1, 3, 112, 112)))
    rng = np.random.default_rng(seed)
    for pname, p in net.collect_params().items():
        if pname.endswith('moving_var'):
            p.set_data(mx.nd.array(rng.uniform(0.5, 2.0, p.shape)))
        elif pname.endswith('moving_mean'):
            p.set_data(mx.nd.array(rng.normal(0, 0.1, p.shape)))
        elif pname.endswith('relu_gamma'):
            p.set_data(mx.nd.array(rng.uniform(-0.3, 0.6, p.shape)))
    return net


def get_symbol(net, native=True):
    """The network as an MXNet symbol on input ``data``, ending in ``fc1_output``.

    With ``native=True`` every PReLU is MXNet's ``LeakyReLU`` op, so the graph is op-for-op the
    one insightface's ``get_symbol`` builds (what its deploy code and ONNX converters expect).
    """
    if not native:
        return net(mx.sym.var('data'))
    with native_prelu(net):
        return net(mx.sym.var('data'))


def _input_shape(size):
    """``size`` (square side) or ``(height, width)`` as a one-sample NCHW shape."""
    height, width = (size, size) if isinstance(size, int) else size
    return (1, 3, height, width)


def parameter_count(sym, size=112):
    """Learnable parameters of a network symbol on ``size`` input (side or (height, width)); BatchNorm
    statistics, which are auxiliary states, not counted, as in the published ImageNet counts."""
    arg_shapes, _, _ = sym.infer_shape(data=_input_shape(size))
    return sum(int(np.prod(s)) for name, s in zip(sym.list_arguments(), arg_shapes) if name != 'data')


def forward_flops(sym, size=112):
    """Multiply-adds x 2 of the Convolution and FullyConnected layers for one sample of ``size`` (side or
    (height, width)); elementwise ops, pooling and BatchNorm not counted."""
    internals = sym.get_internals()
    arg_shapes, out_shapes, _ = internals.infer_shape(data=_input_shape(size))
    outputs = dict(zip(internals.list_outputs(), out_shapes))
    args = dict(zip(internals.list_arguments(), arg_shapes))
    nodes = json.loads(sym.tojson())['nodes']
    total = 0
    for node in nodes:
        if node['op'] in ('Convolution', 'FullyConnected'):
            weight = args[nodes[node['inputs'][1][0]]['name']]
            total += 2 * int(np.prod(outputs[node['name'] + '_output'])) * int(np.prod(weight[1:]))
    return total
