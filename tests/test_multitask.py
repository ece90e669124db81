"""Multi-task training (center loss, attribute heads) and the attribute evaluation CLI, on tiny data.

Data: 24 synthetic identities (12 female, 12 male) x 4 aligned 40x40 crops in an identity-indexed rec with
gender / skin_colour / age attributes; identity 1's gender is unknown (-1). Network: the registry's `demo`
LResNet-IR at 40x40 (at 32x32 it reaches 1x1 maps, where MKLDNN corrupts memory), 32-d, nsoftmax s=16.
"""
import json
import os

import cv2
import mxnet as mx
import numpy as np
import pytest
from easydict import EasyDict

from recognition import checkpoint
from recognition.config import generate_config
from recognition.data import synthetic_faces as synthetic
from recognition.data.dataset import FaceRecordDataset
from recognition.data.record import IdentityRecordWriter
from recognition.losses import AuxiliaryTasks, CenterLoss, build_auxiliary, build_head
from recognition.models import get_model
from recognition.training import TrainingSession
from recognition.training.monitor import Monitor
from recognition.utils import UserError

SIZE, IDS, PER_ID, EMB = 40, 24, 4, 32
UNKNOWN_GENDER_ID = 1
CODES = {'gender': {0: 'female', 1: 'male'}, 'skin_colour': {0: 'light', 1: 'dark'},
         'age': {0: '18-34', 1: '35-54', 2: '55+'}}


def gender_of(i):
    return i % 2


def build_rec(folder):
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    crops = {}
    with IdentityRecordWriter(os.path.join(folder, 'train'), image_size=(SIZE, SIZE),
                              attribute_names=list(CODES), attribute_codes=CODES) as w:
        for i in range(IDS):
            ident = synthetic.sample_identity(rng, gender_of(i), (i // 2) % 2, i)
            images = []
            for k in range(PER_ID):
                img = synthetic.render_aligned(ident, synthetic.sample_variation(ident, rng, pose='frontal'))[0]
                img = cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
                crops[f'{i}_{k}'] = img
                gender = -1 if i == UNKNOWN_GENDER_ID else gender_of(i)
                images.append((cv2.imencode('.png', img)[1].tobytes(), 1, [gender, (i // 2) % 2, i % 3]))
            w.add_identity(i, images)
    return crops


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp('mt'))
    return folder, build_rec(folder)


def make_opts(data_dir, models_root, **kw):
    config, default = generate_config('r18', 'demo', 'nsoftmax')
    opts = dict(config)
    opts.update(default)
    opts.update(dataset_path=data_dir, val_targets=[], image_shape=[SIZE, SIZE, 3], models_root=str(models_root),
                emb_size=EMB, per_batch_size=16, lr=0.1, wd=5e-4, mom=0.9, lr_steps='', warmup=0, verbose=1000,
                frequent=6, max_steps=90, num_workers=0, data_rand_mirror=False, ckpt=2, seed=1,
                progress_bar=False, ctx='cpu:1', kvstore='device', attr_heads='gender', attr_weights='1.0',
                center_loss_weight=0.01)
    opts.update(kw)
    return EasyDict(opts)


def session(opts):
    return TrainingSession(opts, net=get_model('demo', emb_size=EMB, input_size=SIZE),
                           head=build_head('nsoftmax', IDS, EMB, s=16.0))


def gender_scores(sess):
    """(mean CE, accuracy) of the gender head on every training image with a known gender."""
    ds = FaceRecordDataset(os.path.join(sess.opts.dataset_path, 'train.rec'), return_attributes=True)
    x = mx.nd.array(np.stack([ds[i][0] for i in range(len(ds))]))
    y = np.array([ds[i][1][1] for i in range(len(ds))])
    emb = sess.net(x)
    logits = sess.tasks.heads[0](emb)
    known = y >= 0
    ce = mx.gluon.loss.SoftmaxCrossEntropyLoss()(logits, mx.nd.array(np.maximum(y, 0))).asnumpy()
    return float(ce[known].mean()), float((logits.asnumpy().argmax(1) == y)[known].mean())


@pytest.fixture(scope='module')
def trained(data, tmp_path_factory):
    """One multi-task run (gender head + center loss), its scalars and its before/after gender scores."""
    scalars = []
    original = Monitor.scalars

    def spy(self, step, values):
        scalars.append(dict(values))
        return original(self, step, values)

    sess = session(make_opts(data[0], tmp_path_factory.mktemp('models')))
    before = gender_scores(sess)
    Monitor.scalars = spy
    try:
        summary = sess.run()
    finally:
        Monitor.scalars = original
    sess.save_model(1)
    return sess, summary, before, gender_scores(sess), scalars


def test_multitask_run_learns_gender_and_logs_parts(trained):
    sess, summary, (ce0, acc0), (ce1, acc1), scalars = trained
    # Measured: CE 0.79 -> 0.11, accuracy 0.50 -> 0.95 on the 92 images of known gender after 90 steps.
    assert ce1 < 0.5 * ce0, (ce0, ce1)
    assert acc1 >= 0.8, acc1
    parts = [s for s in scalars if 'train/attr_gender_loss' in s]
    assert len(parts) == 15 and {'train/margin_loss', 'train/center_loss', 'train/attr_gender_acc'} <= set(parts[0])
    assert parts[-1]['train/attr_gender_loss'] < parts[0]['train/attr_gender_loss']
    with open(os.path.join(summary['run_dir'], 'train.log')) as f:
        log = f.read()
    assert 'attr_gender_loss=' in log and 'center_loss=' in log and 'margin_loss=' in log


def test_unknown_codes_give_no_loss_and_no_gradient():
    tasks = AuxiliaryTasks(8, 4, attributes=[('gender', 1, 2, 1.0, ['f', 'm'])], hidden=(8,))
    tasks.initialize(mx.init.Xavier())
    emb = mx.nd.random.normal(shape=(6, 8))
    labels = mx.nd.array([[0, 1], [1, -1], [2, 0], [3, -1], [0, 0], [1, 1]])
    zero = mx.nd.zeros(6)

    def loss_and_grads(rows):
        aux = tasks.split_labels(labels[rows], [mx.cpu()])[0]
        with mx.autograd.record():
            total, _ = tasks(emb[rows], labels[rows][:, 0], aux, zero[rows])
            mean = total.sum() / len(rows)
        mean.backward()
        return float(mean.asscalar()), {n: p.grad().asnumpy().copy() for n, p in tasks.collect_params().items()}

    everything = mx.nd.array([0, 1, 2, 3, 4, 5])
    known_only = mx.nd.array([0, 2, 4, 5])
    loss_all, grads_all = loss_and_grads(everything)
    loss_known, grads_known = loss_and_grads(known_only)
    # The batch loss is the mean over known codes: unknown rows change neither the loss nor the gradients.
    assert loss_all == pytest.approx(loss_known, rel=1e-5)
    for name in grads_all:
        np.testing.assert_allclose(grads_all[name], grads_known[name], rtol=1e-4, atol=1e-7)
    # An all-unknown batch contributes nothing.
    aux = tasks.split_labels(labels[mx.nd.array([1, 3])], [mx.cpu()])[0]
    total, _ = tasks(emb[:2], labels[:2, 0], aux, zero[:2])
    assert float(total.abs().sum().asscalar()) == 0.0
    with pytest.raises(UserError, match='gender'):
        tasks.split_labels(mx.nd.array([[0, 2]]), [mx.cpu()])


def test_center_loss_shrinks_within_class_spread():
    """Free embeddings of 3 well-mixed classes trained by the center loss alone collapse to their centres."""
    rng = np.random.default_rng(0)
    labels = mx.nd.array(np.repeat(np.arange(3), 10))
    x = mx.gluon.Parameter('x', shape=(30, 4))
    x.initialize(mx.init.Constant(mx.nd.array(rng.normal(size=(30, 4)))))
    loss_fn = CenterLoss(3, 4, alpha=0.5)
    loss_fn.initialize()
    trainer = mx.gluon.Trainer([x], 'sgd', {'learning_rate': 0.1})

    def spread():
        v = x.data().asnumpy()
        lab = labels.asnumpy()
        return float(np.mean([np.linalg.norm(v[lab == c] - v[lab == c].mean(0), axis=1).mean() for c in range(3)]))

    start = spread()
    for _ in range(40):
        with mx.autograd.record():
            loss = loss_fn(x.data(), labels)
        loss.backward()
        trainer.step(1)   # each embedding moves 10% of the way to its centre per step
    assert spread() < 0.3 * start, (start, spread())
    v, lab = x.data().asnumpy(), labels.asnumpy()
    centers = loss_fn.centers.data().asnumpy()
    for c in range(3):   # the centres follow their class means
        np.testing.assert_allclose(centers[c], v[lab == c].mean(0), atol=0.25 * start)


def test_export_exposes_attribute_output_and_fc1_deploy_still_works(trained, tmp_path):
    sess = trained[0]
    prefix = sess.prefix
    sym, arg, aux = mx.model.load_checkpoint(prefix, 1)
    assert 'attr_gender_output' in sym.list_outputs()
    assert any(k.startswith('attr_gender_') for k in arg) and 'fc7_weight' in arg and 'centerloss_centers' in arg
    batch = mx.nd.array(np.random.default_rng(0).uniform(0, 255, (4, 3, SIZE, SIZE)))
    want_emb = sess.net(batch).asnumpy()
    want_prob = mx.nd.softmax(sess.tasks.heads[0](sess.net(batch))).asnumpy()
    for layer, want in (('fc1_output', want_emb), ('attr_gender_output', want_prob)):
        mod = mx.mod.Module(sym.get_internals()[layer], context=mx.cpu(), label_names=None)
        mod.bind(data_shapes=[('data', (4, 3, SIZE, SIZE))], for_training=False)
        mod.set_params(arg, aux, allow_extra=True)
        mod.forward(mx.io.DataBatch([batch]), is_train=False)
        np.testing.assert_allclose(mod.get_outputs()[0].asnumpy(), want, rtol=1e-3, atol=1e-4)
    # The release (embedding-only) export keeps the head but drops fc7 and the centres.
    stripped = str(tmp_path / 'release')
    checkpoint.save_checkpoint(stripped, 0, sess.net, sess.head, strip_fc7=True, extra_blocks=[sess.tasks])
    sym, arg, aux = mx.model.load_checkpoint(stripped, 0)
    assert sym.list_outputs() == ['fc1_output', 'attr_gender_output']
    assert 'fc7_weight' not in arg and 'centerloss_centers' not in arg
    assert json.loads(sym.get_internals()['attr_gender_output'].attr('__classes__')) == ['female', 'male']


def test_resume_restores_attribute_heads_and_centres(trained):
    sess = trained[0]
    again = session(make_opts(sess.opts.dataset_path, sess.opts.models_root, resume=True, max_steps=92))
    assert again.step == 90
    for name in sess.tasks.collect_params():
        np.testing.assert_array_equal(again.params[name].data().asnumpy(), sess.params[name].data().asnumpy())
    again.run()
    assert again.step == 92


def test_pretrained_brings_the_attribute_heads(trained):
    sess = trained[0]
    tuned = session(make_opts(sess.opts.dataset_path, sess.opts.models_root, run_name='tuned',
                              pretrained=f'{sess.prefix},1'))
    for name in sess.tasks.collect_params():
        np.testing.assert_array_equal(tuned.params[name].data().asnumpy(), sess.params[name].data().asnumpy())


def test_bad_attribute_options(data, tmp_path):
    ds = FaceRecordDataset(os.path.join(data[0], 'train.rec'), return_attributes=True)
    with pytest.raises(UserError, match="no attribute 'hair'.*gender"):
        build_auxiliary(ds, EMB, attr_heads='hair')
    with pytest.raises(UserError, match='2 weights for 1'):
        build_auxiliary(ds, EMB, attr_heads='gender', attr_weights='1,2')
    assert build_auxiliary(ds, EMB) is None
    tasks = build_auxiliary(ds, EMB, attr_heads='GENDER,age', attr_weights='1,0.5')
    assert [(a[0], a[1], a[2], a[3]) for a in tasks.attributes] == [('gender', 1, 2, 1.0), ('age', 3, 3, 0.5)]


def write_eval_set(folder, crops, with_unknown=True):
    """Aligned crops named by template id and a metadata CSV (GENDER codes; one blank)."""
    os.makedirs(os.path.join(folder, 'images'), exist_ok=True)
    rows = ['TEMPLATE_ID,SUBJECT_ID,GENDER,AGE']
    for t, (key, img) in enumerate(sorted(crops.items())):
        ident = int(key.split('_')[0])
        cv2.imwrite(os.path.join(folder, 'images', f'{t}.png'), img)
        gender = '' if with_unknown and t == 0 else gender_of(ident)
        rows.append(f'{t},{ident},{gender},{ident % 3}')
    with open(os.path.join(folder, 'metadata.csv'), 'w') as f:
        f.write('\n'.join(rows) + '\n')
    return os.path.join(folder, 'images'), os.path.join(folder, 'metadata.csv')


def run_attributes_cli(argv):
    import runpy
    import sys
    old = sys.argv
    sys.argv = ['attributes.py'] + argv
    try:
        runpy.run_path(os.path.join(os.path.dirname(__file__), '..', 'test', 'attributes.py'), run_name='__main__')
    finally:
        sys.argv = old


def test_attributes_cli_writes_confusion_matrix(trained, data, tmp_path):
    sess = trained[0]
    images, metadata = write_eval_set(str(tmp_path / 'eval'), data[1])
    out = str(tmp_path / 'out')
    with pytest.raises(SystemExit) as done:
        run_attributes_cli(['--model', f'{sess.prefix},1', '--images', images, '--metadata', metadata,
                            '--out', out, '--already-aligned', '--image-size', str(SIZE), '--batch-size', '16'])
    assert done.value.code in (0, None)
    with open(os.path.join(out, 'attributes.json')) as f:
        result = json.load(f)['attributes']
    assert list(result) == ['gender']
    gender = result['gender']
    cm = np.array(gender['confusion_matrix'])
    assert cm.shape == (2, 2) and cm.sum() == gender['n'] == IDS * PER_ID - 1 and gender['unknown'] == 1
    assert gender['accuracy'] == pytest.approx(np.trace(cm) / cm.sum())
    assert gender['accuracy'] >= 0.8 and gender['classes'] == ['female', 'male']
    assert cv2.imread(os.path.join(out, 'confusion_gender.png')) is not None
    with open(os.path.join(out, 'attributes.csv')) as f:
        lines = f.read().splitlines()
    assert lines[0] == 'TEMPLATE_ID,gender_true,gender_pred,gender_prob' and len(lines) == IDS * PER_ID + 1


def test_attributes_cli_clear_errors(trained, data, tmp_path, capsys):
    sess = trained[0]
    images, metadata = write_eval_set(str(tmp_path / 'eval'), dict(list(data[1].items())[:4]))
    plain = str(tmp_path / 'plain')
    checkpoint.save_checkpoint(plain, 1, sess.net)   # embedding only: no attribute heads
    common = ['--images', images, '--metadata', metadata, '--out', str(tmp_path / 'o'), '--already-aligned']
    with pytest.raises(SystemExit) as done:
        run_attributes_cli(['--model', f'{plain},1'] + common)
    assert done.value.code == 2
    assert 'has no attribute heads' in capsys.readouterr().err
    with open(metadata, 'a') as f:
        f.write('99,5,1,0\n')   # a row whose image does not exist
    with pytest.raises(SystemExit) as done:
        run_attributes_cli(['--model', f'{sess.prefix},1'] + common)
    assert done.value.code == 2
    assert 'without an image' in capsys.readouterr().err and not os.path.exists(str(tmp_path / 'o' / 'attributes.json'))


def test_attributes_cli_on_onnxruntime_equals_mxnet(trained, data, tmp_path):
    """The attribute heads and fc1 as one multi-output ONNX export, through the CLI's --backend."""
    sess = trained[0]
    images, metadata = write_eval_set(str(tmp_path / 'eval'), dict(list(data[1].items())[:4]))
    rows = {}
    for backend in ('mxnet', 'onnxruntime'):
        out = str(tmp_path / backend)
        with pytest.raises(SystemExit) as done:
            run_attributes_cli(['--model', f'{sess.prefix},1', '--images', images, '--metadata', metadata,
                                '--out', out, '--already-aligned', '--image-size', str(SIZE), '--backend', backend])
        assert done.value.code in (0, None)
        with open(os.path.join(out, 'attributes.csv')) as f:
            rows[backend] = [line.split(',') for line in f.read().splitlines()[1:]]
    assert [r[:3] for r in rows['onnxruntime']] == [r[:3] for r in rows['mxnet']] and rows['mxnet']
    np.testing.assert_allclose([float(r[3]) for r in rows['onnxruntime']], [float(r[3]) for r in rows['mxnet']],
                               atol=1e-3)
