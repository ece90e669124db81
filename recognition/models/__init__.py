"""Network registry: ``get_model('r50', emb_size=512)`` as insightface's ``--network`` presets.

Every network takes NCHW float32 RGB 0..255 input (normalised inside the graph) and returns the
``fc1`` embedding; parameter names are insightface's, so ``prefix-symbol.json`` /
``prefix-NNNN.params`` pairs move between the two code bases.  Initialise with :func:`init_params`.
"""
import mxnet as mx

from ..utils import UserError
from .fresnet import FILTERS, UNITS, FResNet
from .layers import XAVIER, PReLU, native_prelu
from .mobilefacenet import MobileFaceNet

__all__ = ['get_model', 'list_models', 'init_params', 'get_symbol', 'native_prelu', 'PReLU',
           'FResNet', 'MobileFaceNet']

# name -> (constructor, default emb_size, fixed constructor arguments)
_REGISTRY = {
    'r18': (FResNet, 512, dict(units=UNITS[18], filters=FILTERS)),
    'r34': (FResNet, 512, dict(units=UNITS[34], filters=FILTERS)),
    'r50': (FResNet, 512, dict(units=UNITS[50], filters=FILTERS)),
    'r100': (FResNet, 512, dict(units=UNITS[100], filters=FILTERS)),
    'y1': (MobileFaceNet, 128, dict(blocks=(1, 4, 6, 2))),
    # Demo-size LResNet-IR for CPU demos on the synthetic sets: one unit per stage at a quarter of
    # r18's width, and insightface's 7x7/2 stem (net_input=0) so no layer runs at 112x112, which
    # makes a train step ~8x faster on CPU.  Not a model for real data: use r50 / r100 there.
    'demo': (FResNet, 128, dict(units=[1, 1, 1, 1], filters=[16, 16, 32, 64, 128], net_input=0)),
}


def list_models():
    """Registered network names (``--network`` choices)."""
    return sorted(_REGISTRY)


def get_model(name, emb_size=None, **kwargs):
    """Build network ``name`` (see :func:`list_models`) with ``emb_size`` (preset default if None).

    ``kwargs`` go to the constructor, e.g. ``bn_mom=0.9``.
    """
    if name not in _REGISTRY:
        raise UserError('--network: unknown network %r (choose from %s)' % (name, ', '.join(list_models())))
    cls, default_emb, fixed = _REGISTRY[name]
    return cls(emb_size=emb_size or default_emb, **fixed, **kwargs)


def init_params(net, ctx=None, force_reinit=False):
    """insightface's initialisation: Xavier(gaussian, out, 2) for weights; PReLU gamma 0.25,
    BN gamma/beta 1/0, moving stats 0/1, biases 0 (each parameter's own initialiser wins)."""
    net.initialize(XAVIER, ctx=ctx, force_reinit=force_reinit)
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
