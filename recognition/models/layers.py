"""Gluon building blocks that carry insightface's symbol names, and a fast PReLU.

Every block here is created with an empty Gluon prefix and an explicit insightface name, so that
``collect_params()`` keys, the exported symbol's argument names and its op names (``fc1`` ->
``fc1_output``) are exactly those of insightface's ``fresnet.py`` / ``fmobilefacenet.py``.  That is
what lets insightface checkpoints load into these networks and our exports drop into its deploy
code.  Compose these blocks only under parents that also use ``prefix=''``: a non-empty parent
prefix would be prepended to every name.
"""
from contextlib import contextmanager

import mxnet as mx
from mxnet.gluon import HybridBlock

__all__ = ['NamedBlock', 'Conv', 'BatchNorm', 'Dense', 'PReLU', 'native_prelu', 'XAVIER']

# insightface's initializer for fresnet / fmobilefacenet (train.py).
XAVIER = mx.init.Xavier(rnd_type='gaussian', factor_type='out', magnitude=2)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class NamedBlock(HybridBlock):
    """A HybridBlock with an empty prefix whose op carries the insightface name ``name``."""

    def __init__(self, name):
        super().__init__(prefix='')
        self.op_name = name

    def _param(self, suffix, **kwargs):
        return self.params.get('%s_%s' % (self.op_name, suffix), **kwargs)


class Conv(NamedBlock):
    """``mx.sym.Convolution(no_bias=True, name=name)``; parameter ``<name>_weight``."""

    def __init__(self, name, in_channels, channels, kernel=1, stride=1, pad=0, groups=1):
        super().__init__(name)
        self._kwargs = dict(kernel=_pair(kernel), stride=_pair(stride), pad=_pair(pad),
                            num_filter=channels, num_group=groups, no_bias=True)
        self.weight = self._param('weight', shape=(channels, in_channels // groups) + _pair(kernel))

    def hybrid_forward(self, F, x, weight):
        return F.Convolution(x, weight, name=self.op_name, **self._kwargs)


class BatchNorm(NamedBlock):
    """``mx.sym.BatchNorm`` with insightface's ``moving_mean`` / ``moving_var`` aux names.

    Gluon's own BatchNorm calls them ``running_*``, which would break checkpoint compatibility.
    ``fix_gamma=True`` (the ``fc1`` embedding layer) keeps gamma at 1 and never trains it.
    """

    def __init__(self, name, channels, eps=2e-5, momentum=0.9, fix_gamma=False):
        super().__init__(name)
        self._kwargs = dict(eps=eps, momentum=momentum, fix_gamma=fix_gamma, use_global_stats=False)
        self.gamma = self._param('gamma', shape=(channels,), init='ones',
                                 grad_req='null' if fix_gamma else 'write', differentiable=not fix_gamma)
        self.beta = self._param('beta', shape=(channels,), init='zeros')
        self.moving_mean = self._param('moving_mean', shape=(channels,), init='zeros',
                                       grad_req='null', differentiable=False)
        self.moving_var = self._param('moving_var', shape=(channels,), init='ones',
                                      grad_req='null', differentiable=False)

    def hybrid_forward(self, F, x, gamma, beta, moving_mean, moving_var):
        return F.BatchNorm(x, gamma, beta, moving_mean, moving_var, name=self.op_name, **self._kwargs)


class Dense(NamedBlock):
    """``mx.sym.FullyConnected(name=name)`` (flattening its input); ``<name>_weight``, ``<name>_bias``."""

    def __init__(self, name, in_units, units):
        super().__init__(name)
        self._units = units
        self.weight = self._param('weight', shape=(units, in_units))
        self.bias = self._param('bias', shape=(units,), init='zeros')

    def hybrid_forward(self, F, x, weight, bias):
        return F.FullyConnected(x, weight, bias, num_hidden=self._units, name=self.op_name)


class PReLU(NamedBlock):
    """Channel-wise PReLU equal to ``LeakyReLU(act_type='prelu')`` in outputs, gradients and names.

    MXNet's prelu spends almost all of its backward time in a generic strided reduction for the
    gamma gradient.  Here the output is ``relu(x) + G * min(x, 0)`` where ``G`` is gamma spread to
    the input's shape by two outer products with vectors of ones (``dot``): the gamma gradient then
    comes back through those ``dot`` ops as BLAS matrix-vector products, and everything else is
    elementwise.  Forward values and the input gradient are bit-identical to LeakyReLU (at x == 0
    the gradient is ``gamma * g`` as in MXNet); the gamma gradient differs only by summation order.

    ``native=True`` emits the plain ``LeakyReLU`` op instead (see :func:`native_prelu`), which
    gives an export that is op-for-op insightface's graph.
    """

    def __init__(self, name, channels):
        super().__init__(name)
        self.native = False
        self.gamma = self._param('gamma', shape=(channels,), init=mx.init.Constant(0.25))

    def hybrid_forward(self, F, x, gamma):
        if self.native:
            return F.LeakyReLU(x, gamma, act_type='prelu', name=self.op_name)
        # Shape-only helpers: a (N, 1) and a (1, prod(spatial)) vector of ones, cut out of x
        # behind BlockGrad so no gradient flows back through them.
        edge = F.reshape(F.BlockGrad(F.slice_axis(x, axis=1, begin=0, end=1)), (0, -1))
        ones_n = F.ones_like(F.slice_axis(edge, axis=1, begin=0, end=1))
        ones_s = F.ones_like(F.slice_axis(edge, axis=0, begin=0, end=1))
        per_sample = F.reshape(F.dot(F.reshape(gamma, (-1, 1)), ones_s), (1, -1))
        gamma_map = F.dot(ones_n, per_sample)
        negative = F.elemwise_mul(gamma_map, F.reshape(F.minimum(x, 0), (0, -1)))
        return F.elemwise_add(F.Activation(x, act_type='relu'), F.reshape_like(negative, x),
                              name=self.op_name)


def walk_blocks(block):
    """`block` and every block inside it, depth first (Gluon has no public recursive iterator)."""
    yield block
    for child in block._children.values():
        yield from walk_blocks(child)


@contextmanager
def native_prelu(net):
    """Within the block, every PReLU of ``net`` emits MXNet's ``LeakyReLU`` op.

    Use it to produce an op-for-op insightface graph (``net(mx.sym.var('data'))``) or an export
    for tools that only know ``LeakyReLU``; cached graphs are dropped on entry and exit so a
    hybridized net rebuilds with the right formulation.
    """
    prelus = [b for b in walk_blocks(net) if isinstance(b, PReLU)]
    blocks = [b for b in walk_blocks(net) if isinstance(b, HybridBlock)]
    previous = [p.native for p in prelus]
    try:
        for p in prelus:
            p.native = True
        for b in blocks:
            b._clear_cached_op()
        yield net
    finally:
        for p, flag in zip(prelus, previous):
            p.native = flag
        for b in blocks:
            b._clear_cached_op()
