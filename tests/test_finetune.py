"""The finetune chain: freezing, fc7 re-initialisation, protected-group selection, hard-sample mining and
the shell step scripts, on tiny synthetic data."""
import json
import os
import subprocess

import cv2
import mxnet as mx
import numpy as np
import pytest
from easydict import EasyDict

from recognition import checkpoint, groups, hard_samples
from recognition.config import generate_config
from recognition.data.dataset import FaceRecordDataset
from recognition.data.lst import LstItem, read_lst, write_lst
from recognition.data.record import KNOWN_CODES, IdentityRecordWriter
from recognition.data.demo_sets import DemoSizes, build_demo
from recognition.evaluation import chain
from recognition.evaluation.pairs_csv import read_pairs_csv
from recognition.evaluation.predictions import write_predictions
from recognition.evaluation.fairness import WORST_GROUP_CRITERIA, evaluate_predictions
from recognition.losses import build_head
from recognition.models import get_model, init_params
from recognition.training import TrainingSession
from recognition.utils import UserError, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMB = 128   # the demo network preset's embedding size


@pytest.fixture(scope='module')
def fairface(tmp_path_factory):
    """A tiny FairFace-shaped set: train.rec (+ .lst, attributes), val/ photos, pairs and metadata."""
    out = tmp_path_factory.mktemp('data')
    build_demo(str(out), seed=1, only='fairface', log=lambda *a: None,
               sizes=DemoSizes(train_ids=16, train_images=4, eval_ids=12, eval_images=4, eval_pairs=300))
    return str(out / 'demo_fairface')


@pytest.fixture(scope='module')
def small(fairface, tmp_path_factory):
    """The train rec at 40x40 (the demo network trains ~3x faster there), attributes kept."""
    ds = FaceRecordDataset(os.path.join(fairface, 'train.rec'))
    out = str(tmp_path_factory.mktemp('small'))
    with IdentityRecordWriter(os.path.join(out, 'train'), image_size=(40, 40), attribute_names=ds.attribute_names,
                              attribute_codes=ds.attribute_codes) as w:
        for identity in ds.identities.tolist():
            rows = []
            for i in range(*ds.id2range[identity]):
                body, label = ds.read_raw(i)
                img = cv2.resize(cv2.imdecode(np.frombuffer(body, np.uint8), 1), (40, 40), interpolation=cv2.INTER_AREA)
                rows.append((cv2.imencode('.png', img)[1].tobytes(), 1, label[2:]))
            w.add_identity(identity, rows)
    return out


def make_opts(data_dir, models_root, **kw):
    config, default = generate_config('demo', 'demo_fairface', 'nsoftmax')
    opts = EasyDict({**config, **default})
    opts.update(dataset_path=data_dir, val_targets=[], models_root=str(models_root), per_batch_size=8, lr=0.1,
                lr_steps='', warmup=0, verbose=1000, frequent=1000, max_steps=3, num_workers=0, ckpt=0, seed=1,
                progress_bar=False, ctx='cpu:1', kvstore='device')
    opts.update(kw)
    return opts


def snapshot(sess):
    return {n: p.list_data()[0].asnumpy().copy() for n, p in sess.params.items()}


def test_freeze_block_1_on_the_demo_network(small, tmp_path):
    """Only fc7 moves: every other parameter and every BN statistic, the embedding head's fc1 included
    (the seed's head BNs kept updating), stays; test_train covers --freeze-block 2 on a small net."""
    sess = TrainingSession(make_opts(small, tmp_path, freeze_block=1))
    before = snapshot(sess)
    assert {'fc1_moving_mean', 'bn1_moving_var', 'conv0_weight'} <= set(before)
    sess.run()
    changed = {n for n, v in snapshot(sess).items() if not np.array_equal(before[n], v)}
    assert changed == {'fc7_weight'}


def save_model(prefix, num_classes, seed=0, epoch=1):
    """A randomly initialised demo network + nsoftmax head saved as prefix-NNNN (with fc7)."""
    mx.random.seed(seed)
    net, head = get_model('demo', emb_size=EMB), build_head('nsoftmax', num_classes, EMB)
    init_params(net)
    head.initialize()
    head(net(mx.nd.zeros((1, 3, 112, 112))), mx.nd.zeros((1,)))
    checkpoint.save_checkpoint(prefix, epoch, net, head)
    return net, head


def test_fc7_reinitialised_when_the_class_count_differs(tmp_path):
    prefix = str(tmp_path / 'model')
    src, _ = save_model(prefix, num_classes=7)
    for classes, reinit in ((7, []), (12, ['fc7_weight'])):
        net, head = get_model('demo', emb_size=EMB), build_head('nsoftmax', classes, EMB)
        init_params(net)
        head.initialize()
        head(net(mx.nd.zeros((1, 3, 112, 112))), mx.nd.zeros((1,)))
        lines = []
        summary = checkpoint.load_pretrained(net, head, prefix, 1, log=lines.append)
        assert summary['reinitialised'] == reinit
        assert head.collect_params()['fc7_weight'].shape == (classes, EMB)
        for name, p in net.collect_params().items():
            np.testing.assert_array_equal(p.data().asnumpy(), src.collect_params()[name].data().asnumpy())
        assert any('class count differs' in line for line in lines) == bool(reinit)


def test_group_specs_resolve_to_codes(fairface, tmp_path):
    ds = FaceRecordDataset(os.path.join(fairface, 'train.rec'))
    want = {'gender': 0, 'skin_colour': 1}
    for spec in ('dark_female', 'dark female', 'gender=0,skin_colour=1', 'GENDER=female,skin=dark', '1'):
        assert groups.parse_group(spec, ds.attribute_names, ds.attribute_codes) == want
    assert groups.parse_group('3', ds.attribute_names, ds.attribute_codes) == {'gender': 1, 'skin_colour': 1}
    for bad in ('purple', 'gender=robot', '7', 'height=2'):
        with pytest.raises(UserError):
            groups.parse_group(bad, ds.attribute_names, ds.attribute_codes)
    # The seed's integer is gender*2 + skin_colour, a parsing rule over the one group order.
    seed_order = [groups.parse_group(str(i), ds.attribute_names, ds.attribute_codes) for i in range(4)]
    assert [groups.group_name(c['gender'], c['skin_colour']) for c in seed_order] == \
        ['light_female', 'dark_female', 'light_male', 'dark_male']
    ids = groups.select_identities(ds, 'dark_female', log=lambda m: None)
    assert ids and all(ds.identity_attributes(i)[0] == 0 and ds.identity_attributes(i)[1] == 1 for i in ids)
    # A rec without dark-skinned women: an empty group is an error, not "train on everything".
    with IdentityRecordWriter(str(tmp_path / 'men'), attribute_names=['gender', 'skin_colour'],
                              attribute_codes=KNOWN_CODES) as w:
        w.add_identity(0, [(ds.read_raw(0)[0], 1, [1, 1])])
    with pytest.raises(UserError, match='no identity of the protected group'):
        groups.select_identities(FaceRecordDataset(str(tmp_path / 'men.rec')), 'dark_female')


@pytest.mark.parametrize('planted', ['dark_female', 'light_male'])
def test_selection_finds_a_planted_bias(fairface, tmp_path, planted):
    """Scores = label + noise; the planted group's impostors score higher and its genuine pairs lower."""
    val = os.path.join(fairface, 'val')
    id1, id2, labels, _ = read_pairs_csv(os.path.join(val, 'ground_truth.csv'), 'LABEL')
    meta = {}
    with open(os.path.join(val, 'metadata.csv')) as f:
        head = f.readline().strip().split(',')
        for line in f:
            row = dict(zip(head, line.strip().split(',')))
            meta[row['TEMPLATE_ID']] = (int(row['GENDER']), int(row['SKIN_COLOUR']))
    codes = {'dark_female': (0, 1), 'light_male': (1, 0)}[planted]
    rng = np.random.default_rng(0)
    in_group = np.array([meta[a] == codes and meta[b] == codes for a, b in zip(id1, id2)])
    scores = labels * 0.6 + rng.normal(0, 0.1, labels.size) + np.where(in_group, 0.3 - 0.6 * labels, 0)
    predictions = str(tmp_path / 'predictions.csv')
    write_predictions(predictions, id1, id2, scores)
    out = str(tmp_path / 'models' / 'protected_group.json')
    os.makedirs(os.path.dirname(out))
    result = evaluate_predictions(predictions, os.path.join(val, 'ground_truth.csv'), os.path.join(val, 'metadata.csv'))
    for criterion in WORST_GROUP_CRITERIA:
        choice = chain.choose_group(result, criterion)
        assert choice['group'] == planted, criterion
    per_group = choice['groups']
    assert min(per_group, key=lambda g: per_group[g]['auc']) == planted
    write_json(out, choice)
    ds = FaceRecordDataset(os.path.join(fairface, 'train.rec'))
    assert groups.select_identities(ds, 'auto', models_root=str(tmp_path / 'models'), log=lambda m: None) \
        == groups.select_identities(ds, planted, log=lambda m: None)


def test_mining_finds_the_planted_mistakes(tmp_path):
    """Each class = one distinct noise image; fc7 = the model's own embeddings with rows 2 and 3 swapped,
    so exactly the images of identities 2 and 3 are misclassified."""
    rng = np.random.default_rng(0)
    attrs = {0: [1, 0], 1: [0, 0], 2: [0, 1], 3: [1, 1], 4: [0, 1]}
    images = {i: cv2.imencode('.png', rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))[1].tobytes()
              for i in attrs}
    src = str(tmp_path / 'data' / 'train')
    os.makedirs(os.path.dirname(src))
    with IdentityRecordWriter(src, attribute_names=['gender', 'skin_colour'], attribute_codes=KNOWN_CODES) as w:
        for i, a in attrs.items():
            w.add_identity(i, [(images[i], 1, a)] * (2 + i % 2))
    write_lst(src + '.lst', [LstItem(1, f'imgs/{i}/{j}.png', i) for i in attrs for j in range(2)])
    prefix = str(tmp_path / 'model')
    save_model(prefix, num_classes=len(attrs))
    from recognition.inference import load_embedder
    emb = load_embedder(prefix, 1).embed(np.stack([cv2.imdecode(np.frombuffer(images[i], np.uint8), 1)[..., ::-1]
                                                   for i in sorted(attrs)]), flip=False)
    _, arg, aux = checkpoint.load_checkpoint(prefix, 1)
    out = str(tmp_path / 'hard' / 'train')

    def with_fc7(weight):
        arg['fc7_weight'] = mx.nd.array(weight)
        mx.nd.save(prefix + '-0001.params', {**{'arg:' + k: v for k, v in arg.items()},
                                             **{'aux:' + k: v for k, v in aux.items()}})
    with_fc7(emb)   # every image is classified correctly: nothing to mine, nothing written
    with pytest.raises(UserError, match='no hard samples'):
        hard_samples.mine_hard_samples(prefix + ',1', src + '.rec', out, log=lambda m: None)
    assert not os.path.exists(os.path.dirname(out))

    with_fc7(emb[[0, 1, 3, 2, 4]])
    report = hard_samples.mine_hard_samples(prefix + ',1', src + '.rec', out, log=lambda m: None)
    assert (report['misclassified'], report['hard_identities'], report['images_written']) == (5, 2, 5)
    assert report['groups']['dark_female']['hard_identities'] == 1
    assert report['groups']['dark_male']['misclassified'] == 3
    mined = FaceRecordDataset(out + '.rec')
    assert mined.identities.tolist() == [2, 3] and mined.num_classes == 5
    for i in range(len(mined)):
        body, label = mined.read_raw(i)
        assert body == images[int(label[0])] and label[2:].tolist() == attrs[int(label[0])]
    assert [it.label for it in read_lst(out + '.lst')] == [2, 2, 3, 3]
    assert json.load(open(out + '.report.json'))['hard_identities'] == 2
    with_fc7(emb[:3])   # a classifier for fewer classes than the rec has
    with pytest.raises(UserError, match='fc7 has 3 classes'):
        hard_samples.mine_hard_samples(prefix + ',1', src + '.rec', str(tmp_path / 'other'), log=lambda m: None)


def run_script(name, env, *args):
    return subprocess.run(['bash', os.path.join(ROOT, 'shell', name), *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_shell_chain_on_a_tiny_set(fairface, tmp_path):
    models, final = tmp_path / 'models', tmp_path / 'final'
    env = dict(os.environ, MODELS_ROOT=str(models), FAIRFACE_DIR=fairface, HARD_DIR=str(tmp_path / 'hard'),
               FINAL_DIR=str(final), CTX='cpu:1', OMP_NUM_THREADS='1', STEP1_STEPS='2', STEP2_STEPS='2',
               STEP3_STEPS='2', HARD1_STEPS='2', HARD2_STEPS='2', SEED='7')
    tiny = ('--per-batch-size', '4', '--num-workers', '0')
    # A missing previous step: a clear message, exit 2, nothing created.
    r = run_script('fairface_step2_finetune.sh', env, *tiny)
    assert r.returncode == 2 and 'fairface-step1/latest' in r.stderr and not models.exists()
    pre = models / 'demo-nsoftmax-demo'
    pre.mkdir(parents=True)
    save_model(str(pre / 'model'), num_classes=5)   # "MS1M": another class count, fc7 is re-initialised
    checkpoint.write_latest(str(pre), str(pre / 'model'), 1)
    for script in ('fairface_finetune.sh', 'fairface_step2_finetune.sh', 'fairface_step3_finetune.sh',
                   'hard_sample_step1.sh', 'hard_sample_step2.sh'):
        r = run_script(script, env, *tiny)
        assert r.returncode == 0, script + '\n' + r.stdout[-2000:] + r.stderr[-3000:]
        assert 'wrote' in r.stdout
    rows = json.load(open(str(models / 'chain_table.json')))['rows']
    assert [r['step'] for r in rows] == ['pretrained', 'step1', 'step2', 'step3', 'hard1', 'hard2']
    assert all(0.0 <= r['summary']['auc'] <= 1.0 for r in rows)
    # SEED reaches every training step and the chain table's bootstrap
    for run in ('fairface-step1', 'fairface-step2', 'fairface-step3', 'hard-sample-step1', 'hard-sample-step2'):
        assert json.load(open(str(models / run / 'model-resume.json')))['seed'] == 7, run
    assert {c['stamp'][-1] for r in rows for c in r.get('changes', {}).values()} == {7}
    group = json.load(open(str(models / 'fairface-step2' / 'protected_group.json')))['group']
    step3_log = open(str(models / 'fairface-step3' / 'train.log')).read()
    assert f"group '{group}'" in step3_log
    assert sorted(os.listdir(final)) == sorted([f'{group}_3_steps_finetune', 'hard_sample_train'])
    from recognition.model_folder import find_model_dirs
    from recognition.inference import load_model_dir
    for folder in find_model_dirs(str(final)):
        assert sorted(os.listdir(folder)) == ['model-0001.params', 'model-symbol.json', 'model.json']
        assert load_model_dir(folder).embed(np.zeros((1, 112, 112, 3), np.uint8)).shape == (1, EMB)
