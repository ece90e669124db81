"""`--network symbol`: a checkpoint written by plain `mx.sym` code (its own layer names, BGR input scaled to
[-1, 1]) finetuned by the trainer, saved, and read back by insightface's deploy code (`mx.mod.Module`)."""
import json
import os
import mxnet as mx
import numpy as np
import pytest

from recognition import checkpoint
from recognition.model_folder import model_spec
from recognition.inference import load_embedder
from recognition.training import TrainingSession
from recognition.utils import UserError
from test_finetune import fairface, run_script   # noqa: F401  (fairface is a fixture)
from test_config import train_parse_args
from test_train import SIZE, build_dataset, make_opts

EMB = 16


def foreign_symbol():
    """A small net as another MXNet project writes one: no insightface names, BGR input in [-1, 1]
    (BatchNorm with and without MXNet's default fix_gamma), an `embedding` layer and a classifier."""
    data = mx.sym.var('data')
    x = mx.sym.Convolution(data, num_filter=8, kernel=(3, 3), stride=(2, 2), pad=(1, 1), name='features_conv1')
    x = mx.sym.BatchNorm(x, fix_gamma=False, name='features_norm1')
    x = mx.sym.Activation(x, act_type='relu', name='features_act1')
    x = mx.sym.Convolution(x, num_filter=16, kernel=(3, 3), stride=(2, 2), pad=(1, 1), name='features_conv2')
    x = mx.sym.BatchNorm(x, name='features_norm2')
    x = mx.sym.Activation(x, act_type='relu', name='features_act2')
    x = mx.sym.Pooling(x, global_pool=True, pool_type='avg', kernel=(1, 1), name='features_pool')
    emb = mx.sym.FullyConnected(x, num_hidden=EMB, name='embedding')
    logits = mx.sym.FullyConnected(emb, num_hidden=5, name='classifier')
    return mx.sym.SoftmaxOutput(logits, name='softmax')


def save_foreign(prefix, epoch=3, seed=0):
    """The foreign net with random weights and BN statistics, saved by `mx.model.save_checkpoint`."""
    sym = foreign_symbol()
    mod = mx.mod.Module(sym, context=mx.cpu())
    mod.bind(data_shapes=[('data', (1, 3, SIZE, SIZE))], label_shapes=[('softmax_label', (1,))])
    mx.random.seed(seed)
    mod.init_params(mx.init.Xavier())
    arg, aux = mod.get_params()
    rng = np.random.RandomState(seed)
    aux = {k: mx.nd.array(rng.uniform(0.5, 1.5, v.shape) if k.endswith('var') else rng.normal(0, 0.1, v.shape))
           for k, v in aux.items()}
    mx.model.save_checkpoint(prefix, epoch, sym, arg, aux)
    return arg, aux


def foreign_embedding(prefix, epoch, rgb_images):
    """What the foreign model itself gives for RGB 0..255 images (converted the way it was trained)."""
    bgr = (rgb_images[:, ::-1] - 127.5) * 0.0078125
    return load_embedder(prefix, epoch, layer='embedding_output').forward(bgr)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return build_dataset(str(tmp_path_factory.mktemp('faces')), train_ids=10, per_id=4, val_ids=10, pairs=20)


def symbol_opts(data_dir, root, ref, **kw):
    return make_opts(data_dir, root, **{'network': 'symbol', 'pretrained': ref, 'val_targets': [], 'max_steps': 2,
                                        'verbose': 2, 'ckpt': 2, 'per_batch_size': 8, 'lr': 0.1, **kw})


def test_finetune_a_plain_mxnet_model_and_deploy_it(data_dir, tmp_path):
    prefix = str(tmp_path / 'foreign' / 'net')
    os.makedirs(os.path.dirname(prefix))
    arg, aux = save_foreign(prefix)
    images = np.random.RandomState(1).uniform(0, 255, (4, 3, SIZE, SIZE)).astype(np.float32)
    before = foreign_embedding(prefix, 3, images)
    sess = TrainingSession(symbol_opts(data_dir, tmp_path / 'runs', prefix + ',3', emb_layer='embedding_output',
                                       bgr=True, input_scale='normalized'))
    # Built from the checkpoint: its names and values, the conversion in front, the embedding its width.
    assert sess.net.emb_size == EMB and sess.params['fc7_weight'].shape == (10, EMB)
    assert set(sess.net.collect_params()) == {n for n in {**arg, **aux} if not n.startswith('classifier')}
    np.testing.assert_allclose(sess.embed(mx.nd.array(images)), before, rtol=1e-4, atol=1e-5)
    assert sess.params['features_norm2_gamma'].grad_req == 'null'   # fix_gamma: the op ignores it
    summary = sess.run()
    assert summary['step'] == 2 and summary['checkpoint'] == (sess.prefix, 1)
    trained = sess.embed(mx.nd.array(images))
    assert not np.allclose(trained, before, atol=1e-3)

    # insightface's deploy code on the saved checkpoint: the foreign layers, then fc1_output; fc7 beside.
    sym, arg2, aux2 = mx.model.load_checkpoint(sess.prefix, 1)
    assert {'features_conv1_weight', 'embedding_weight', 'fc7_weight'} <= set(arg2)
    assert {'features_norm1_moving_mean', 'features_norm2_moving_var'} <= set(aux2)
    mod = mx.mod.Module(sym.get_internals()['fc1_output'], context=mx.cpu(), label_names=None)
    mod.bind(data_shapes=[('data', images.shape)], for_training=False)
    mod.set_params(arg2, aux2, allow_extra=True)
    mod.forward(mx.io.DataBatch([mx.nd.array(images)]), is_train=False)
    np.testing.assert_allclose(mod.get_outputs()[0].asnumpy(), trained, rtol=1e-4, atol=1e-5)

    # The saved model takes RGB 0..255 (the conversion is in its graph) and finetunes again as `symbol`,
    # from fc1_output; asking for the conversion a second time is refused.
    again = TrainingSession(symbol_opts(data_dir, tmp_path / 'runs2', sess.prefix + ',1'))
    np.testing.assert_allclose(again.embed(mx.nd.array(images)), trained, rtol=1e-4, atol=1e-5)
    again.close()
    with pytest.raises(UserError, match='already converts'):
        TrainingSession(symbol_opts(data_dir, tmp_path / 'runs3', sess.prefix + ',1', bgr=True))


def test_freeze_block_by_layer_names(data_dir, tmp_path):
    """--freeze-block 1 trains only fc7 (BN statistics kept; on two contexts through the device kvstore); 2 with
    --freeze-until trains what follows."""
    prefix = str(tmp_path / 'net')
    save_foreign(prefix)

    def changed(**kw):
        root = tmp_path / str(len(kw)) / kw.get('freeze_until', 'a')
        sess = TrainingSession(symbol_opts(data_dir, root, prefix + ',3', emb_layer='embedding_output', ckpt=0, **kw))
        before = {n: p.data().asnumpy().copy() for n, p in sess.params.items()}
        sess.run()
        frozen_stats = '"use_global_stats": "True"' in checkpoint.embedding_symbol(sess.net).tojson()
        return {n for n, p in sess.params.items() if not np.array_equal(before[n], p.data().asnumpy())}, frozen_stats

    # The graph a checkpoint saves is the original one: training-time freezing does not stick to it.
    assert changed(freeze_block=1, ctx='cpu:2', per_batch_size=4) == ({'fc7_weight'}, False)
    assert changed(freeze_block=2, freeze_until='features_act1_output')[0] == {
        'fc7_weight', 'features_conv2_weight', 'features_conv2_bias', 'features_norm2_beta',
        'features_norm2_moving_mean', 'features_norm2_moving_var', 'embedding_weight', 'embedding_bias'}
    with pytest.raises(UserError, match="--freeze-until 'bn1_output': no such layer"):
        changed(freeze_block=2)


def test_an_unknown_emb_layer_lists_the_candidates(data_dir, tmp_path):
    prefix = str(tmp_path / 'net')
    save_foreign(prefix)
    with pytest.raises(UserError) as error:
        TrainingSession(symbol_opts(data_dir, tmp_path, prefix + ',3'))
    message = str(error.value)
    assert '\n' not in message and f"{prefix}-symbol.json: no layer 'fc1_output'" in message
    assert message.endswith('(--emb-layer; candidates: embedding_output, classifier_output, softmax_output)')
    with pytest.raises(UserError, match=r"layer 'features_act2_output' gives \(1, 16, 10, 10\) per batch"):
        TrainingSession(symbol_opts(data_dir, tmp_path, prefix + ',3', emb_layer='features_act2_output'))


def test_the_chain_finetunes_a_foreign_model_folder(fairface, tmp_path):
    """NETWORK=symbol PRETRAINED=folder/net,3 through step 1 of the chain: the model.json beside the checkpoint
    gives the layer and the input (to the trainer and to the chain's evaluation of the pretrained model); the
    step's checkpoint has fc1_output, from which the later steps finetune as the first test does."""
    folder = tmp_path / 'zoo'
    folder.mkdir()
    save_foreign(str(folder / 'net'))
    (folder / 'model.json').write_text(json.dumps({'prefix': 'net', 'epoch': 3, 'layer': 'embedding_output',
                                                   'color': 'bgr', 'input_scale': 'normalized'}))
    assert model_spec(f'{folder}/net,3') == dict(prefix=f'{folder}/net', epoch=3, layer='embedding_output', bgr=True,
                                                 input_scale='normalized', name='net,3')
    assert model_spec(f'{folder}/other,3')['layer'] == 'fc1_output'   # model.json names another checkpoint
    models = tmp_path / 'models'
    env = dict(os.environ, MODELS_ROOT=str(models), FAIRFACE_DIR=fairface, CTX='cpu:1', OMP_NUM_THREADS='1',
               STEP1_STEPS='2', NETWORK='symbol', PRETRAINED=f'{folder}/net,3')
    r = run_script('fairface_finetune.sh', env, '--per-batch-size', '4', '--num-workers', '0')
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = json.load(open(str(models / 'chain_table.json')))['rows']
    assert [r['step'] for r in rows] == ['pretrained', 'step1']
    step1 = open(str(models / 'fairface-step1' / 'latest')).read().strip()
    assert load_embedder(*step1.rsplit(',', 1)).forward(np.zeros((1, 3, 112, 112), np.float32)).shape == (1, EMB)


def test_symbol_flags_are_checked_before_mxnet_loads(tmp_path, capsys):
    """The symbol-only flags reach the options; used with a preset network, or `symbol` without a checkpoint,
    they are a usage error naming the flag."""
    data = ['--data-dir', str(tmp_path)]
    opts = train_parse_args(['--network', 'symbol', '--pretrained', 'zoo/net,3', '--emb-layer', 'embedding_output',
                             '--bgr', '--input-scale', 'normalized', '--freeze-until', 'features_act1_output'] + data)
    assert (opts.emb_layer, opts.bgr, opts.input_scale, opts.freeze_until) == (
        'embedding_output', True, 'normalized', 'features_act1_output')
    assert 'bgr' not in train_parse_args(['--network', 'symbol', '--pretrained', 'zoo/net,3'] + data)
    for argv, message in ((['--network', 'symbol'], 'give --pretrained PREFIX,EPOCH'),
                          (['--network', 'r18', '--emb-layer', 'fc1_output'], '--emb-layer applies to --network symbol'),
                          (['--network', 'r18', '--no-bgr'], '--bgr applies to --network symbol')):
        with pytest.raises(SystemExit):
            train_parse_args(argv + data)
        assert message in capsys.readouterr().err
