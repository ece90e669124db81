"""Networks: shapes, insightface parameter names, export -> plain Module, fast PReLU equality."""
import json

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

from recognition.config import network as network_presets
from recognition.models import (FAMILIES, FRESNET_UNITS, PReLU, ResNeSt, forward_flops, get_model, get_symbol,
                                init_params, list_models, native_prelu, parameter_count, walk_blocks)
from recognition.models.resnest import DropBlock
from recognition.utils import UserError

# `symbol` is built from a checkpoint (tests/test_symbol_network.py); every other network from its preset alone.
FROM_PRESET = [n for n in list_models() if network_presets[n].net_name != 'symbol']
EMB = {'r18': 512, 'r34': 512, 'r50': 512, 'r100': 512, 'y1': 128, 'demo': 128, 'r50sa': 512, 'r101sa': 512}


def insightface_fresnet_names(units):
    """(arguments, aux states) of insightface's fresnet symbol (net_unit 3, output E), in graph order,
    written from its naming rules: conv0/bn0/relu0, stage{i}_unit{j}_{bn1,conv1,bn2,relu1,conv2,bn3}
    plus _conv1sc/_sc on each stage's first unit, then bn1, pre_fc1, fc1."""
    args, bns = ['data', 'conv0_weight', 'bn0_gamma', 'bn0_beta', 'relu0_gamma'], ['bn0']
    for i, count in enumerate(units, 1):
        for j in range(1, count + 1):
            u = 'stage%d_unit%d_' % (i, j)
            args += [u + 'bn1_gamma', u + 'bn1_beta', u + 'conv1_weight', u + 'bn2_gamma', u + 'bn2_beta',
                     u + 'relu1_gamma', u + 'conv2_weight', u + 'bn3_gamma', u + 'bn3_beta']
            bns += [u + 'bn1', u + 'bn2', u + 'bn3']
            if j == 1:
                args += [u + 'conv1sc_weight', u + 'sc_gamma', u + 'sc_beta']
                bns.append(u + 'sc')
    args += ['bn1_gamma', 'bn1_beta', 'pre_fc1_weight', 'pre_fc1_bias', 'fc1_gamma', 'fc1_beta']
    bns += ['bn1', 'fc1']
    return args, [b + suffix for b in bns for suffix in ('_moving_mean', '_moving_var')]


def insightface_mobilefacenet_names(blocks=(1, 4, 6, 2)):
    """Parameter names of fmobilefacenet.py (GDC output) from its Conv/Linear/DResidual naming."""
    def conv(name, act=True):
        out = [name + '_conv2d_weight', name + '_batchnorm_gamma', name + '_batchnorm_beta',
               name + '_batchnorm_moving_mean', name + '_batchnorm_moving_var']
        return out + [name + '_relu_gamma'] if act else out

    def dres(name):
        return conv(name + '_conv_sep') + conv(name + '_conv_dw') + conv(name + '_conv_proj', act=False)

    names = conv('conv_1') + conv('conv_2_dw')
    for stage, count, pre in ((3, blocks[1], 'dconv_23'), (4, blocks[2], 'dconv_34'), (5, blocks[3], 'dconv_45')):
        names += dres(pre)
        for i in range(count):
            names += dres('res_%d_block%d' % (stage, i))
    names += conv('conv_6sep') + conv('conv_6dw7_7', act=False)
    return names + ['pre_fc1_weight', 'pre_fc1_bias', 'fc1_gamma', 'fc1_beta', 'fc1_moving_mean', 'fc1_moving_var']


@pytest.mark.parametrize('name', FROM_PRESET)
def test_shapes_from_the_graph(name):
    """Every declared parameter shape equals what the graph infers for a 1x3x112x112 input."""
    net = get_model(name)
    sym = get_symbol(net)
    arg_shapes, out_shapes, aux_shapes = sym.infer_shape(data=(1, 3, 112, 112))
    assert sym.list_outputs() == ['fc1_output'] and out_shapes == [(1, EMB[name])]
    inferred = dict(zip(sym.list_arguments(), arg_shapes))
    inferred.update(zip(sym.list_auxiliary_states(), aux_shapes))
    declared = {k: p.shape for k, p in net.collect_params().items()}
    assert declared == {k: v for k, v in inferred.items() if k != 'data'}


@pytest.mark.parametrize('name', ['demo', 'y1'])
def test_forward_shapes(name):
    net = init_params(get_model(name, emb_size=64))
    net.hybridize()
    assert net(mx.nd.random.uniform(0, 255, shape=(1, 3, 112, 112))).shape == (1, 64)


def test_r50_names_are_insightface():
    args, aux = insightface_fresnet_names([3, 4, 14, 3])
    net = get_model('r50')
    sym = get_symbol(net)
    assert sym.list_arguments() == args
    assert sym.list_auxiliary_states() == aux
    assert set(net.collect_params().keys()) == set(args[1:]) | set(aux)
    assert 'bn1_output' in sym.get_internals().list_outputs()  # the seed's --freeze-block 2 cut


def test_y1_names_are_insightface():
    net = get_model('y1')
    assert sorted(net.collect_params().keys()) == sorted(insightface_mobilefacenet_names())


# Each network's architecture, written out here (insightface's depths; the demo's one unit per stage at a
# quarter width with the 7x7/2 stem) so a preset change in recognition/config.py is a visible decision.
EXPECTED_SHAPES = {
    'r18': dict(units=[2, 2, 2, 2], widths=[64, 64, 128, 256, 512], stem=3),
    'r34': dict(units=[3, 4, 6, 3], widths=[64, 64, 128, 256, 512], stem=3),
    'r50': dict(units=[3, 4, 14, 3], widths=[64, 64, 128, 256, 512], stem=3),
    'r100': dict(units=[3, 13, 30, 3], widths=[64, 64, 128, 256, 512], stem=3),
    'demo': dict(units=[1, 1, 1, 1], widths=[16, 16, 32, 64, 128], stem=7),
    'y1': dict(blocks=[4, 6, 2]),
    'r50sa': dict(units=[3, 4, 6, 3], stem=32, dropblock=0.1),
    'r101sa': dict(units=[3, 4, 23, 3], stem=64, dropblock=0.1),
}


def fresnet_shape(params):
    """Units per stage, stage widths and stem kernel of a built fresnet, read from its parameters."""
    units = [len({k.split('_')[1] for k in params if k.startswith('stage%d_' % i)}) for i in range(1, 5)]
    widths = [params['conv0_weight'].shape[0]] + [params['stage%d_unit1_conv2_weight' % i].shape[0]
                                                  for i in range(1, 5)]
    return dict(units=units, widths=widths, stem=params['conv0_weight'].shape[2])


def test_the_network_presets_are_the_registry():
    assert list_models() == sorted(network_presets) == sorted(FROM_PRESET + ['symbol'])
    assert FROM_PRESET == sorted(EXPECTED_SHAPES) == sorted(EMB)
    with pytest.raises(UserError, match='--network symbol: give --pretrained'):
        get_model('symbol')


@pytest.mark.parametrize('name', FROM_PRESET)
def test_every_network_preset_builds_its_parameters(name):
    """Each --network preset of recognition/config.py resolves in the model registry, with its own numbers."""
    settings = network_presets[name]
    assert settings.net_name in FAMILIES
    params = {k: p for k, p in get_model(name).collect_params().items()}
    assert params['fc1_gamma'].shape == (settings.get('emb_size', 512),) == (EMB[name],)
    if settings.net_name == 'fresnet':
        shape = fresnet_shape(params)
        assert shape == EXPECTED_SHAPES[name] and shape['units'] == FRESNET_UNITS[settings.num_layers]
        assert shape['stem'] == (7 if settings.get('net_input', 1) == 0 else 3)
    elif settings.net_name == 'resnest':
        net = get_model(name)
        units = [len({k.split('_')[1] for k in params if k.startswith('stage%d_' % i)}) for i in range(1, 5)]
        drops = [b._gamma * 9 for b in walk_blocks(net) if isinstance(b, DropBlock)]
        assert units == EXPECTED_SHAPES[name]['units'] and params['conv0_weight'].shape[0] == EXPECTED_SHAPES[name]['stem']
        assert len(drops) == 3 * sum(units[2:]) and np.allclose(drops, EXPECTED_SHAPES[name]['dropblock'])
        assert params['pre_fc1_weight'].shape == (EMB[name], 2048 * 7 * 7)   # the "E" head on 7x7x2048
    else:
        blocks = [len({k.split('_')[2] for k in params if k.startswith('res_%d_block' % stage)})
                  for stage in (3, 4, 5)]
        assert blocks == EXPECTED_SHAPES[name]['blocks'] == settings.net_blocks[1:]


def test_unknown_network_is_a_user_error():
    with pytest.raises(UserError, match='r1000'):
        get_model('r1000')


def test_init_matches_insightface():
    net = init_params(get_model('demo'))
    params = net.collect_params()
    assert np.all(params['relu0_gamma'].data().asnumpy() == 0.25)
    assert np.all(params['fc1_gamma'].data().asnumpy() == 1.0) and params['fc1_gamma'].grad_req == 'null'
    assert np.all(params['bn0_moving_var'].data().asnumpy() == 1.0)
    w = params['stage4_unit1_conv2_weight'].data().asnumpy()   # Xavier gaussian, 'out', magnitude 2
    assert abs(w.std() - np.sqrt(2.0 / (128 * 9))) < 0.1 * np.sqrt(2.0 / (128 * 9))


@pytest.mark.parametrize('native', [False, True])
def test_export_loads_in_plain_module(tmp_path, native):
    """insightface deploy code: load_checkpoint -> fc1_output -> Module(label_names=None)."""
    net = init_params(get_model('demo'))
    for p in net.collect_params().values():   # non-trivial BN statistics and PReLU slopes
        p.set_data(p.data() + mx.nd.random.uniform(0.0, 0.1, shape=p.shape))
    x = mx.nd.random.uniform(0, 255, shape=(2, 3, 112, 112))
    prefix = str(tmp_path / 'model')
    net.hybridize()
    if native:
        with native_prelu(net):
            expected = net(x).asnumpy()
            net.export(prefix, 3)
    else:
        expected = net(x).asnumpy()
        net.export(prefix, 3)
    sym, arg, aux = mx.model.load_checkpoint(prefix, 3)
    ops = {n['op'] for n in json.loads(sym.tojson())['nodes']}
    assert ('LeakyReLU' in ops) == native
    model = mx.mod.Module(symbol=sym.get_internals()['fc1_output'], context=mx.cpu(), label_names=None)
    model.bind(data_shapes=[('data', x.shape)], for_training=False)
    model.set_params(arg, aux)
    model.forward(mx.io.DataBatch(data=[x]), is_train=False)
    got = model.get_outputs()[0].asnumpy()
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


@pytest.mark.parametrize('shape', [(2, 5, 7, 9), (6, 5)])
@pytest.mark.parametrize('hybrid', [False, True])
def test_fast_prelu_equals_leakyrelu(shape, hybrid):
    rng = np.random.RandomState(0)
    data = rng.normal(size=shape).astype(np.float32)
    data.reshape(-1)[::7] = 0.0                   # exact zeros take the gamma branch in MXNet
    gamma = rng.uniform(-0.5, 1.5, size=shape[1]).astype(np.float32)
    head_grad = mx.nd.array(rng.normal(size=shape))

    def run(native):
        block = PReLU('relu0', shape[1])
        block.native = native
        block.initialize()
        block.gamma.set_data(mx.nd.array(gamma))
        if hybrid:
            block.hybridize()
        x = mx.nd.array(data)
        x.attach_grad()
        with autograd.record():
            y = block(x)
        y.backward(head_grad)
        return y.asnumpy(), x.grad.asnumpy(), block.gamma.grad().asnumpy()

    (y0, gx0, gg0), (y1, gx1, gg1) = run(True), run(False)
    np.testing.assert_array_equal(y1, y0)
    np.testing.assert_array_equal(gx1, gx0)
    np.testing.assert_allclose(gg1, gg0, rtol=1e-5, atol=1e-5)
    assert list(PReLU('stage1_unit1_relu1', 4).collect_params().keys()) == ['stage1_unit1_relu1_gamma']


def test_walk_blocks_reaches_every_nested_block():
    inner = mx.gluon.nn.HybridSequential(prefix='inner_')
    with inner.name_scope():
        inner.add(mx.gluon.nn.Dense(2), PReLU('inner_relu', 2))
    outer = mx.gluon.nn.HybridSequential(prefix='outer_')
    with outer.name_scope():
        outer.add(mx.gluon.nn.Dense(3), inner, PReLU('outer_relu', 3))
    assert list(walk_blocks(outer)) == [outer, outer[0], inner, inner[0], inner[1], outer[2]]   # depth first


# ResNeSt's published ImageNet models (Zhang et al. 2020, table 3): parameters and GFLOPs (multiply-adds) at 224.
PUBLISHED_RESNEST = {50: (27.5e6, 5.39e9), 101: (48.3e6, 10.2e9)}


@pytest.mark.parametrize('depth', [50, 101])
def test_resnest_body_is_the_published_one(depth):
    """The r50sa / r101sa body with ResNeSt's ImageNet stem and 1000-way classifier has the published size."""
    sym = ResNeSt(depth, classes=1000, input_size=224)(mx.sym.var('data'))
    params, macs = parameter_count(sym, 224), forward_flops(sym, 224) / 2
    print(f'ResNeSt-{depth} ImageNet: {params / 1e6:.2f} M parameters, {macs / 1e9:.2f} GFLOPs (multiply-adds) at 224')
    published_params, published_macs = PUBLISHED_RESNEST[depth]
    assert abs(params - published_params) < 0.005 * published_params
    assert abs(macs - published_macs) < 0.02 * published_macs
    face = get_symbol(get_model('r%dsa' % depth))
    print(f'r{depth}sa: {parameter_count(face) / 1e6:.2f} M parameters, {forward_flops(face) / 1e9:.2f} GFLOPs at 112')
    # The face network: the same body without the classifier, plus the "E" head (bn1, pre_fc1, fc1).
    head = 2048 * 2 + 2048 * 49 * 512 + 512 + 512 * 2
    assert parameter_count(face) == params - (2048 * 1000 + 1000) + head


def test_resnest_trains_and_dropblock_is_seeded():
    """One r50sa training step (on 56x56 to stay fast) gives finite gradients everywhere; DropBlock drops
    only in training, the same blocks for the same seed, and keeps the mean through its rescaling."""
    net = init_params(get_model('r50sa', emb_size=32, input_size=56))
    net.hybridize()
    x = mx.nd.random.uniform(0, 255, shape=(2, 3, 56, 56))
    with autograd.record():
        y = net(x)
    y.backward()
    assert y.shape == (2, 32)
    grads = [p.grad().asnumpy() for p in net.collect_params().values() if p.grad_req != 'null']
    assert all(np.isfinite(g).all() for g in grads) and np.abs(grads[0]).sum() > 0
    np.testing.assert_array_equal(net(x).asnumpy(), net(x).asnumpy())   # inference: no draw

    block = DropBlock('drop', 0.3)
    block.hybridize()
    ones = mx.nd.ones((4, 8, 14, 14))

    def draw(seed):
        mx.random.seed(seed)
        with autograd.train_mode():
            return block(ones).asnumpy()

    a, b, c = draw(1), draw(1), draw(2)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and 0.15 < (a == 0).mean() < 0.45
    np.testing.assert_allclose(a.mean(), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(block(ones).asnumpy(), ones.asnumpy())
