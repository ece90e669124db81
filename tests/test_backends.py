"""The inference backends: onnxruntime and our MXNet graph against a plain mx.mod.Module, the ONNX cache,
a refused export, devices, and the CLIs' --backend."""
import json
import os

import cv2
import mxnet as mx
import numpy as np
import onnx
import pytest

from recognition import export, inference
from recognition.checkpoint import save_checkpoint
from recognition.inference import backend_devices, inference_graph, load_embedder
from recognition.models import random_inference_net
from recognition.data.bin import write_bin
from recognition.utils import UserError
from test_predict import ROOT, load_cli

verification_cli = load_cli(os.path.join(ROOT, 'test', 'verification.py'))
extract_cli = load_cli(os.path.join(ROOT, 'test', 'extract_features.py'))

TOLERANCE = 1e-4


def module_reference(prefix, epoch, batch, layer='fc1_output'):
    """insightface's deploy code with MXNet's graph pass off: the reference both backends must equal."""
    sym, arg, aux = mx.model.load_checkpoint(prefix, epoch)
    os.environ['MXNET_SUBGRAPH_BACKEND'] = 'NONE'
    try:
        mod = mx.mod.Module(sym.get_internals()[layer], context=mx.cpu(), label_names=None)
        mod.bind(data_shapes=[('data', batch.shape)], for_training=False)
    finally:
        del os.environ['MXNET_SUBGRAPH_BACKEND']
    mod.set_params(arg, aux, allow_extra=True)
    mod.forward(mx.io.DataBatch([mx.nd.array(batch)]), is_train=False)
    return mod.get_outputs()[0].asnumpy()


def write_pairs_bin(path, pairs=20, size=32, seed=0):
    """A .bin of random crops, genuine pairs a crop and a slightly brighter copy."""
    rng = np.random.default_rng(seed)
    bins, issame = [], []
    for i in range(pairs):
        x = rng.integers(0, 200, (size, size, 3)).astype(np.uint8)
        y = x + 3 if i % 2 == 0 else rng.integers(0, 256, (size, size, 3)).astype(np.uint8)
        bins += [cv2.imencode('.png', x)[1].tobytes(), cv2.imencode('.png', y)[1].tobytes()]
        issame.append(i % 2 == 0)
    write_bin(path, bins, issame)


def random_net(folder, name, emb_size, seed=0):
    """`models.random_inference_net` saved as `folder/name-0001.params`."""
    prefix = str(folder / name)
    save_checkpoint(prefix, 1, random_inference_net(name, seed, emb_size))
    return prefix


def module_checkpoint(folder, seed=0):
    """A checkpoint written by plain mx.sym + mx.mod.Module: conv, BN, PReLU, FC, BN fc1 (with fc7)."""
    data = mx.sym.Variable('data')
    x = (data - 127.5) * 0.0078125
    x = mx.sym.Convolution(x, num_filter=8, kernel=(3, 3), stride=(2, 2), pad=(1, 1), name='conv0')
    x = mx.sym.BatchNorm(x, fix_gamma=False, eps=2e-5, name='bn0')
    x = mx.sym.LeakyReLU(x, act_type='prelu', name='relu0')
    x = mx.sym.Convolution(x, num_filter=8, kernel=(3, 3), stride=(2, 2), num_group=8, name='dw1')
    x = mx.sym.FullyConnected(x, num_hidden=16, name='pre_fc1')
    fc1 = mx.sym.BatchNorm(x, fix_gamma=True, eps=2e-5, name='fc1')
    sym = mx.sym.SoftmaxOutput(mx.sym.FullyConnected(fc1, num_hidden=5, no_bias=True, name='fc7'), name='softmax')
    mod = mx.mod.Module(sym, context=mx.cpu())
    mod.bind(data_shapes=[('data', (2, 3, 32, 32))], label_shapes=[('softmax_label', (2,))])
    mx.random.seed(seed)
    mod.init_params(mx.init.Xavier(rnd_type='gaussian', magnitude=2))
    arg, aux = mod.get_params()
    rng = np.random.default_rng(seed)
    arg['relu0_gamma'] = mx.nd.array(rng.uniform(-0.3, 0.6, 8))
    aux['bn0_moving_var'] = mx.nd.array(rng.uniform(0.5, 2.0, 8))
    aux['bn0_moving_mean'] = mx.nd.array(rng.normal(0, 0.1, 8))
    prefix = str(folder / 'plain')
    mx.model.save_checkpoint(prefix, 3, sym, arg, aux)
    return prefix


@pytest.mark.parametrize('name,emb', [('demo', 128), ('y1', 128), ('r18', 32)])
def test_both_backends_equal_a_plain_module_on_the_presets(tmp_path, name, emb):
    prefix = random_net(tmp_path, name, emb)
    batch = np.random.default_rng(1).uniform(0, 255, (3, 3, 112, 112)).astype(np.float32)
    expected = module_reference(prefix, 1, batch)
    for backend in ('mxnet', 'onnxruntime'):
        embedder = load_embedder(prefix, 1, batch_size=2, backend=backend)   # a full and a short batch
        assert export.relative_difference(embedder.forward(batch), expected) <= TOLERANCE, backend
        embedder.forward(batch)   # a second forward (the MKLDNN pass broke those on y1)


def test_a_plain_module_checkpoint_on_both_backends_and_the_cache(tmp_path):
    prefix = module_checkpoint(tmp_path)
    rng = np.random.default_rng(2)
    crops = rng.integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
    nchw = crops.transpose(0, 3, 1, 2).astype(np.float32)
    expected = module_reference(prefix, 3, nchw)
    flipped = module_reference(prefix, 3, nchw[:, :, :, ::-1].copy())
    embedder = load_embedder(prefix, 3, batch_size=4, backend='onnxruntime', bgr=False)
    assert export.relative_difference(embedder.forward(nchw), expected) <= TOLERANCE
    summed = expected + flipped
    np.testing.assert_allclose(embedder.embed(crops), summed / np.linalg.norm(summed, axis=1, keepdims=True),
                               atol=1e-4)
    # one export, beside the params, keyed by their checksum; its weights are constants, not inputs
    cached = [f for f in os.listdir(tmp_path) if f.endswith('.onnx')]
    assert cached == [os.path.basename(export.cache_path(prefix, 3, image_size=(32, 32)))]
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]
    model = onnx.load(str(tmp_path / cached[0]))
    assert [i.name for i in model.graph.input] == ['data'] and len(model.graph.initializer) > 5
    mtime = os.path.getmtime(tmp_path / cached[0])
    load_embedder(prefix, 3, backend='onnxruntime').forward(nchw)
    assert os.path.getmtime(tmp_path / cached[0]) == mtime
    # new params under the same name: a new key, the stale export goes
    mx.model.save_checkpoint(prefix, 3, *module_checkpoint_params(prefix, scale=2.0))
    doubled = module_reference(prefix, 3, nchw)
    assert export.relative_difference(load_embedder(prefix, 3, backend='onnxruntime').forward(nchw), doubled) <= TOLERANCE
    assert [f for f in os.listdir(tmp_path) if f.endswith('.onnx')] == [
        os.path.basename(export.cache_path(prefix, 3, image_size=(32, 32)))] != cached


def test_onnxruntime_runs_a_cpu_batch_in_short_session_calls(tmp_path, monkeypatch):
    """A batch of 20 goes to the session as 8 + 8 + 4 rows (`ORT_CPU_RUN_BATCH`), every row in its place."""
    prefix = module_checkpoint(tmp_path)
    nchw = np.random.default_rng(3).uniform(0, 255, (20, 3, 32, 32)).astype(np.float32)
    expected = module_reference(prefix, 3, nchw)
    embedder = load_embedder(prefix, 3, batch_size=64, backend='onnxruntime')
    session = embedder._session(32, 32)[0]
    rows = []
    run = session.run
    monkeypatch.setattr(session, 'run', lambda outputs, feed: rows.append(len(next(iter(feed.values()))))
                        or run(outputs, feed))
    assert export.relative_difference(embedder.forward(nchw), expected) <= TOLERANCE
    assert rows == [inference.ORT_CPU_RUN_BATCH] * 2 + [20 - 2 * inference.ORT_CPU_RUN_BATCH]


def module_checkpoint_params(prefix, scale):
    sym, arg, aux = mx.model.load_checkpoint(prefix, 3)
    arg['pre_fc1_weight'] = arg['pre_fc1_weight'] * scale
    return sym, arg, aux


def test_several_layers_come_back_in_the_order_asked(tmp_path):
    prefix = module_checkpoint(tmp_path)
    batch = np.random.default_rng(3).uniform(0, 255, (2, 3, 32, 32)).astype(np.float32)
    layers = ['pre_fc1_output', 'fc1_output']
    got = load_embedder(prefix, 3, layer=layers, backend='onnxruntime').forward_all(batch)
    want = load_embedder(prefix, 3, layer=layers).forward_all(batch)
    for g, w, layer in zip(got, want, layers):
        assert export.relative_difference(g, w) <= TOLERANCE
        assert export.relative_difference(g, module_reference(prefix, 3, batch, layer)) <= TOLERANCE


def test_the_inference_graph_keeps_the_numbers(tmp_path):
    """The rewritten PReLU and the added Flatten, on a net where every slope sign occurs."""
    prefix = module_checkpoint(tmp_path)
    sym, arg, _ = mx.model.load_checkpoint(prefix, 3)
    fast, extra = inference_graph(sym.get_internals()['fc1_output'], arg, (32, 32))
    ops = [n['op'] for n in json.loads(fast.tojson())['nodes']]
    assert 'LeakyReLU' not in ops and 'Flatten' in ops and set(extra) == {'relu0_minus_one', 'relu0_minus_slope'}
    batch = np.random.default_rng(4).uniform(0, 255, (3, 3, 32, 32)).astype(np.float32)
    assert export.relative_difference(load_embedder(prefix, 3).forward(batch), module_reference(prefix, 3, batch)) <= 1e-5


def test_an_export_that_does_not_match_is_refused_and_mxnet_still_runs(tmp_path, monkeypatch, capsys):
    data = tmp_path / 'data'
    data.mkdir()
    write_pairs_bin(str(data / 'lfw.bin'))
    prefix = module_checkpoint(tmp_path)
    fix = export.fix_prelu_slopes

    def broken(model, slopes):   # an exporter bug: one slope written twice as large
        fix(model, slopes)
        for init in model.graph.initializer:
            if init.name == 'relu0_gamma':
                init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 2, init.name))
    monkeypatch.setattr(export, 'fix_prelu_slopes', broken)
    argv = ['--data-dir', str(data), '--model', f'{prefix},3', '--target', 'lfw', '--image-size', '32,32']
    with pytest.raises(SystemExit) as e:
        verification_cli.run_cli(lambda: verification_cli.main(argv + ['--backend', 'onnxruntime']))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert 'differs from MXNet by' in err and 'tolerance 0.0001' in err and '--backend mxnet' in err
    assert not [f for f in os.listdir(tmp_path) if f.endswith(('.onnx', '.tmp'))]
    verification_cli.main(argv)
    assert 'Accuracy-Flip' in capsys.readouterr().out


def test_the_clis_give_the_same_numbers_on_both_backends(tmp_path, capsys):
    data = tmp_path / 'data'
    data.mkdir()
    write_pairs_bin(str(data / 'lfw.bin'))
    prefix = module_checkpoint(tmp_path)
    lines = {}
    for backend in ('mxnet', 'onnxruntime'):
        verification_cli.main(['--data-dir', str(data), '--model', f'{prefix},3', '--target', 'lfw',
                               '--image-size', '32,32', '--batch-size', '4', '--backend', backend])
        lines[backend] = [line for line in capsys.readouterr().out.splitlines() if 'Accuracy' in line]
    assert lines['mxnet'] == lines['onnxruntime'] and lines['mxnet']
    images = tmp_path / 'crops'
    images.mkdir()
    rng = np.random.default_rng(5)
    for i in range(3):
        cv2.imwrite(str(images / f'{i}.png'), rng.integers(0, 256, (32, 32, 3)).astype(np.uint8))
    feats = {}
    for backend in ('mxnet', 'onnxruntime'):
        out = tmp_path / backend
        extract_cli.main(['--images', str(images), '--model', f'{prefix},3', '--image-size', '32', '--out', str(out),
                          '--backend', backend])
        feats[backend] = np.load(out / 'plain-0003.npy')
    np.testing.assert_allclose(feats['onnxruntime'], feats['mxnet'], atol=1e-4)


def test_devices(monkeypatch):
    import onnxruntime as ort
    assert backend_devices('onnxruntime') == ['cpu'] and backend_devices('onnxruntime', ctx='cpu:2') == ['cpu']
    monkeypatch.setattr(ort, 'get_available_providers', lambda: ['CPUExecutionProvider'])
    with pytest.raises(UserError, match='no CUDA execution provider; pip install onnxruntime-gpu'):
        backend_devices('onnxruntime', gpus='0')
    monkeypatch.setattr(ort, 'get_available_providers', lambda: ['CUDAExecutionProvider', 'CPUExecutionProvider'])
    assert backend_devices('onnxruntime', gpus='1') == ['cuda:1']
    assert backend_devices('onnxruntime', ctx='gpu:1') == ['cuda:0']
    with pytest.raises(UserError, match='one GPU'):
        backend_devices('onnxruntime', gpus='0,1')
    with pytest.raises(UserError, match='cpu:N or gpu:N'):
        backend_devices('onnxruntime', ctx='tpu:1')
    assert backend_devices('mxnet', ctx='cpu:2') == [mx.cpu(0), mx.cpu(1)]
