"""The shared loader on a checkpoint made by plain mx.sym + mx.mod.Module (not by our trainer)."""
import json
import os

import mxnet as mx
import numpy as np
import pytest

from recognition import checkpoint
from recognition.checkpoint import parse_pretrained
from recognition.model_folder import find_model_dirs, install_model, model_spec
from recognition.inference import extract_features, load_embedder, load_model_dir, template_images
from recognition.utils import UserError


def make_checkpoint(prefix, emb_size=8, seed=0, with_fc7=True):
    """A tiny conv net ending in a BatchNorm named fc1 (insightface's embedding layer), saved at epoch 3."""
    data = mx.sym.Variable('data')
    x = (data - 127.5) * 0.0078125
    x = mx.sym.Convolution(x, num_filter=4, kernel=(3, 3), stride=(2, 2), name='conv0')
    x = mx.sym.Activation(x, act_type='relu')
    x = mx.sym.Pooling(x, kernel=(1, 1), global_pool=True, pool_type='avg')  # any input size
    x = mx.sym.FullyConnected(x, num_hidden=emb_size, name='pre_fc1')
    fc1 = mx.sym.BatchNorm(x, fix_gamma=True, eps=2e-5, name='fc1')
    fc7 = mx.sym.FullyConnected(fc1, num_hidden=5, no_bias=True, name='fc7')
    sym = mx.sym.SoftmaxOutput(fc7, name='softmax')
    mod = mx.mod.Module(sym, context=mx.cpu())
    mod.bind(data_shapes=[('data', (2, 3, 16, 16))], label_shapes=[('softmax_label', (2,))])
    mx.random.seed(seed)
    mod.init_params(mx.init.Xavier(rnd_type='gaussian', magnitude=2))
    arg, aux = mod.get_params()
    if not with_fc7:
        arg.pop('fc7_weight')
    mx.model.save_checkpoint(prefix, 3, sym, arg, aux)
    return arg, aux


def reference_embedding(prefix, images_nchw):
    """The embedding computed independently with a plain Module on the fc1_output internals."""
    sym, arg, aux = mx.model.load_checkpoint(prefix, 3)
    mod = mx.mod.Module(sym.get_internals()['fc1_output'], context=mx.cpu(), label_names=None)
    mod.bind(data_shapes=[('data', images_nchw.shape)], for_training=False)
    mod.set_params(arg, aux, allow_extra=True)
    mod.forward(mx.io.DataBatch([mx.nd.array(images_nchw)]), is_train=False)
    return mod.get_outputs()[0].asnumpy()


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp('ckpt') / 'model')
    make_checkpoint(prefix)
    return prefix


def test_module_checkpoint_loads_and_matches_plain_module(ckpt):
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, size=(5, 16, 16, 3)).astype(np.uint8)
    emb = load_embedder(ckpt, 3, batch_size=2)  # 5 images: two full batches and a padded one
    raw = emb.embed(images, flip=False, normalized=False)
    ref = reference_embedding(ckpt, images.transpose(0, 3, 1, 2).astype(np.float32))
    np.testing.assert_allclose(raw, ref, rtol=1e-4, atol=1e-5)
    assert raw.shape == (5, 8)


def test_flip_tta_is_sum_of_raw_then_l2(ckpt):
    rng = np.random.RandomState(1)
    images = rng.randint(0, 256, size=(3, 16, 16, 3)).astype(np.uint8)
    emb = load_embedder(ckpt, 3)
    nchw = images.transpose(0, 3, 1, 2).astype(np.float32)
    summed = reference_embedding(ckpt, nchw) + reference_embedding(ckpt, nchw[:, :, :, ::-1].copy())
    expected = summed / np.linalg.norm(summed, axis=1, keepdims=True)
    got = emb.embed(images, flip=True)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # NCHW float input gives the same answer as NHWC uint8.
    np.testing.assert_allclose(emb.embed(nchw, flip=True), got, rtol=1e-5, atol=1e-6)
    # The flipped view genuinely differs (otherwise the test above proves nothing).
    assert not np.allclose(emb.embed(images, flip=False), got, atol=1e-3)


def test_bgr_and_input_scale(ckpt):
    rng = np.random.RandomState(2)
    images = rng.randint(0, 256, size=(2, 16, 16, 3)).astype(np.uint8)
    rgb = load_embedder(ckpt, 3).embed(images[..., ::-1], flip=False, normalized=False)
    bgr = load_embedder(ckpt, 3, bgr=True).embed(images, flip=False, normalized=False)
    np.testing.assert_allclose(bgr, rgb, rtol=1e-5, atol=1e-6)
    # 'unit' divides the input by 255 before the graph: equal to feeding x/255 as raw.
    unit = load_embedder(ckpt, 3, input_scale='unit').embed(images, flip=False, normalized=False)
    raw = load_embedder(ckpt, 3).embed(images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0,
                                       flip=False, normalized=False)
    np.testing.assert_allclose(unit, raw, rtol=1e-4, atol=1e-5)


def test_model_dir_and_errors(ckpt, tmp_path):
    folder = tmp_path / 'models' / 'tiny'
    folder.mkdir(parents=True)
    make_checkpoint(str(folder / 'model'), with_fc7=False)
    (folder / 'model.json').write_text(json.dumps({'prefix': 'model', 'epoch': 3}))
    assert find_model_dirs(str(tmp_path / 'models')) == [str(folder)]
    emb = load_model_dir(str(folder))
    assert emb.name == 'tiny'
    img_path = str(tmp_path / 'a.png')
    import cv2
    cv2.imwrite(img_path, np.full((20, 20, 3), 90, np.uint8))  # resized to the 16 px input
    feats = extract_features([emb, load_embedder(ckpt, 3)], [img_path, img_path], image_size=16, batch_size=1)
    assert [f.shape for f in feats] == [(2, 8), (2, 8)]
    np.testing.assert_allclose(np.linalg.norm(feats[0], axis=1), 1.0, rtol=1e-5)

    (folder / 'model.json').write_text(json.dumps({'epoch': 3, 'colour': 'bgr'}))
    with pytest.raises(UserError, match='unknown keys'):
        load_model_dir(str(folder))
    with pytest.raises(UserError, match='no layer'):
        load_embedder(ckpt, 3, layer='nope_output')
    with pytest.raises(UserError, match='not found'):
        load_embedder(ckpt, 7)
    with pytest.raises(UserError, match=r"--model 'model-only': expected prefix,epoch\[\|epoch2"):
        parse_pretrained('model-only', '--model', several=True)
    assert parse_pretrained('a/b,model,1|2', '--model', several=True) == ('a/b,model', [1, 2])
    with pytest.raises(UserError, match='cannot read image'):
        extract_features([emb], [str(tmp_path / 'missing.jpg')])


def test_model_spec_and_template_images(tmp_path):
    folder = tmp_path / 'tiny'
    folder.mkdir()
    (folder / 'model.json').write_text(json.dumps({'prefix': 'm', 'epoch': 2, 'color': 'bgr'}))
    assert model_spec(str(folder)) == dict(prefix=str(folder / 'm'), epoch=2, layer='fc1_output', bgr=True,
                                           input_scale='raw', name='tiny')
    assert model_spec('a/b,4')['name'] == 'b,4'
    with pytest.raises(UserError, match='give one epoch'):
        model_spec('a/b,1|2')
    for name in ['10.tif', '11.webp', '12.jpg', 'notes.txt']:
        (tmp_path / name).write_bytes(b'x')
    assert template_images(str(tmp_path)) == {t: str(tmp_path / n) for t, n in
                                              [('10', '10.tif'), ('11', '11.webp'), ('12', '12.jpg')]}
    (tmp_path / '12.png').write_bytes(b'x')
    with pytest.raises(UserError, match='two images named 12'):
        template_images(str(tmp_path))


def test_install_model_writes_what_the_shell_wrote(tmp_path):
    """install_model's folder is byte for byte what chain_common.sh's cp/printf wrote, swaps in whole, and
    reads back through model_dir_spec; a broken run leaves the installed model as it was."""
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'model-symbol.json').write_bytes(b'{"nodes": []}\n')
    (run / 'model-0012.params').write_bytes(bytes(range(256)) * 3)
    checkpoint.write_latest(str(run), str(run / 'model'), 12)
    final = tmp_path / 'final'
    (final / 'tiny').mkdir(parents=True)
    (final / 'tiny' / 'stale.params').write_bytes(b'old')
    dest, prefix, epoch = install_model(str(run), 'tiny', str(final))
    assert (dest, prefix, epoch) == (str(final / 'tiny'), str(run / 'model'), 12)
    assert sorted(os.listdir(final)) == ['tiny']
    assert sorted(os.listdir(dest)) == ['model-0012.params', 'model-symbol.json', 'model.json']
    assert (final / 'tiny' / 'model-symbol.json').read_bytes() == b'{"nodes": []}\n'
    assert (final / 'tiny' / 'model-0012.params').read_bytes() == bytes(range(256)) * 3
    assert (final / 'tiny' / 'model.json').read_bytes() == (
        b'{"prefix": "model", "epoch": 12, "layer": "fc1_output", "color": "rgb", "input_scale": "raw"}\n')
    assert model_spec(dest) == dict(prefix=str(final / 'tiny' / 'model'), epoch=12, layer='fc1_output', bgr=False,
                                    input_scale='raw', name='tiny')
    (run / 'model-0012.params').unlink()
    with pytest.raises(UserError, match=r'model-0012\.params: checkpoint file not found \(named by .*latest\)'):
        install_model(str(run), 'tiny', str(final))
    assert sorted(os.listdir(dest)) == ['model-0012.params', 'model-symbol.json', 'model.json']
    with pytest.raises(UserError, match='one folder name'):
        install_model(str(run), '../x', str(final))
