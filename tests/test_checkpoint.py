"""Checkpoints: plain-MXNet deploy loading, fc7 kept or stripped, --pretrained import and its errors."""
import os

import mxnet as mx
import numpy as np
import pytest

from recognition import checkpoint
from recognition.losses import build_head
from recognition.models import get_model, init_params
from recognition.utils import UserError


def _net(name='demo', classes=10, emb=64, seed=0):
    mx.random.seed(seed)
    net = init_params(get_model(name, emb_size=emb))
    head = build_head('arcface', classes, emb)
    head.initialize()
    x = mx.nd.random.uniform(0, 255, (2, 3, 112, 112))
    head(net(x), mx.nd.array([0, 1]))
    # Non-trivial BN statistics, so inference really uses them.
    for name_, p in net.collect_params().items():
        if name_.endswith('moving_mean'):
            p.set_data(mx.nd.random.normal(0, 0.1, p.shape))
        elif name_.endswith('moving_var'):
            p.set_data(mx.nd.random.uniform(0.5, 2, p.shape))
    return net, head


def _deploy_embeddings(prefix, epoch, batch):
    """insightface's deploy code (face_model.get_model), verbatim in spirit."""
    sym, arg_params, aux_params = mx.model.load_checkpoint(prefix, epoch)
    sym = sym.get_internals()['fc1_output']
    model = mx.mod.Module(symbol=sym, context=mx.cpu(), label_names=None)
    model.bind(data_shapes=[('data', batch.shape)])
    model.set_params(arg_params, aux_params)
    model.forward(mx.io.DataBatch(data=(batch,)), is_train=False)
    return model.get_outputs()[0].asnumpy()


def test_plain_module_gives_the_gluon_embedding(tmp_path):
    net, head = _net()
    prefix = str(tmp_path / 'model')
    checkpoint.save_checkpoint(prefix, 1, net, head)
    batch = mx.nd.random.uniform(0, 255, (4, 3, 112, 112))
    ours = net(batch).asnumpy()
    theirs = _deploy_embeddings(prefix, 1, batch)
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
    _, arg, aux = mx.model.load_checkpoint(prefix, 1)
    assert arg['fc7_weight'].shape == (10, 64) and 'fc1_moving_var' in aux
    sym = mx.sym.load(prefix + '-symbol.json')
    assert 'softmax_label' in sym.list_arguments() and 'fc7_weight' in sym.list_arguments()
    # PReLU is exported as MXNet's native op (what insightface's graphs and converters use).
    assert '"op": "LeakyReLU"' in open(prefix + '-symbol.json').read()


def test_ckpt_embedding_strips_fc7(tmp_path):
    net, head = _net()
    prefix = str(tmp_path / 'model')
    checkpoint.save_checkpoint(prefix, 2, net, head, strip_fc7=True)
    sym, arg, aux = mx.model.load_checkpoint(prefix, 2)
    assert not [k for k in arg if k.startswith('fc7')]
    assert sym.list_outputs() == ['fc1_output']
    batch = mx.nd.random.uniform(0, 255, (2, 3, 112, 112))
    np.testing.assert_allclose(_deploy_embeddings(prefix, 2, batch), net(batch).asnumpy(), rtol=1e-4, atol=1e-4)


def test_pretrained_round_trip_and_fc7_reinit(tmp_path):
    net, head = _net(seed=0)
    prefix = str(tmp_path / 'model')
    checkpoint.save_checkpoint(prefix, 1, net, head)

    same_net, same_head = _net(seed=1)
    checkpoint.load_pretrained(same_net, same_head, prefix, 1, log=lambda m: None)
    for name, p in net.collect_params().items():
        np.testing.assert_array_equal(same_net.collect_params()[name].data().asnumpy(), p.data().asnumpy())
    np.testing.assert_array_equal(same_head.fc7_weight.data().asnumpy(), head.fc7_weight.data().asnumpy())

    other_net, other_head = _net(classes=7, seed=2)
    fresh_fc7 = other_head.fc7_weight.data().asnumpy().copy()
    lines = []
    summary = checkpoint.load_pretrained(other_net, other_head, prefix, 1, log=lines.append)
    assert summary['reinitialised'] == ['fc7_weight']
    assert any('fc7_weight' in l and '(10, 64)' in l and 're-initialised' in l for l in lines)
    np.testing.assert_array_equal(other_head.fc7_weight.data().asnumpy(), fresh_fc7)
    np.testing.assert_array_equal(other_net.collect_params()['conv0_weight'].data().asnumpy(),
                                  net.collect_params()['conv0_weight'].data().asnumpy())


def test_pretrained_from_another_network_names_the_parameter(tmp_path):
    net, head = _net('demo')
    prefix = str(tmp_path / 'model')
    checkpoint.save_checkpoint(prefix, 1, net, head)
    r18, r18_head = _net('r18', emb=64)
    before = r18.collect_params()['conv0_weight'].data().asnumpy().copy()
    with pytest.raises(UserError, match=r'model-0001\.params: parameter conv0_weight has shape \(16, 3, 7, 7\), '
                                        r'the network needs \(64, 3, 3, 3\)'):
        checkpoint.load_pretrained(r18, r18_head, prefix, 1)
    np.testing.assert_array_equal(r18.collect_params()['conv0_weight'].data().asnumpy(), before)


def test_missing_checkpoint_and_bad_reference(tmp_path):
    with pytest.raises(UserError, match=r'nothing-symbol\.json: checkpoint file not found'):
        checkpoint.load_checkpoint(str(tmp_path / 'nothing'), 1)
    with pytest.raises(UserError, match=r'nothing-symbol\.json: checkpoint file not found'):
        checkpoint.load_symbol(str(tmp_path / 'nothing-symbol.json'))
    with pytest.raises(UserError, match='expected prefix,epoch'):
        checkpoint.parse_pretrained('models/x/model')
    assert checkpoint.parse_pretrained('a,b/model,12') == ('a,b/model', 12)
    with pytest.raises(UserError, match=r"--pretrained 'm,1\|2': expected prefix,epoch "):
        checkpoint.parse_pretrained('m,1|2')   # an epoch list only where several=True
    with pytest.raises(UserError, match=r"--model 'm,1\|x': expected prefix,epoch\[\|epoch2"):
        checkpoint.parse_pretrained('m,1|x', '--model', several=True)
    with pytest.raises(UserError, match='no latest pointer'):
        checkpoint.read_latest(str(tmp_path))
    checkpoint.write_latest(str(tmp_path), str(tmp_path / 'model'), 3)
    assert checkpoint.read_latest(str(tmp_path)) == (str(tmp_path / 'model'), 3)


def test_save_is_atomic(tmp_path, monkeypatch):
    """A failure while writing leaves no file under the final names."""
    net, head = _net()
    prefix = str(tmp_path / 'model')

    def broken_save(*a, **k):
        raise OSError('disk full')

    monkeypatch.setattr(mx.sym.Symbol, 'save', broken_save)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(prefix, 1, net, head)
    assert os.listdir(tmp_path) == []


def test_onnx_export_matches_mxnet(tmp_path):
    from recognition.export import export_onnx
    net, head = _net()
    prefix = str(tmp_path / 'model')
    checkpoint.save_checkpoint(prefix, 1, net, head)
    diff = export_onnx(prefix, 1, str(tmp_path / 'model.onnx'), batch_size=2)
    assert diff <= 1e-4 and os.path.getsize(tmp_path / 'model.onnx') > 10000


def test_saved_training_graph_binds_for_training(tmp_path):
    """insightface's train.py --pretrained binds the saved graph with a label for training."""
    net, head = _net()
    prefix = str(tmp_path / 'model')
    checkpoint.save_checkpoint(prefix, 1, net, head)
    sym, arg, aux = mx.model.load_checkpoint(prefix, 1)
    mod = mx.mod.Module(sym, context=mx.cpu())
    mod.bind(data_shapes=[('data', (2, 3, 112, 112))], label_shapes=[('softmax_label', (2,))])
    mod.set_params(arg, aux)
    mod.forward_backward(mx.io.DataBatch([mx.nd.random.uniform(0, 255, (2, 3, 112, 112))], [mx.nd.array([0, 3])]))
    assert mod.get_outputs()[1].shape == (2, 10)
