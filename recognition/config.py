"""insightface's EasyDict presets (`recognition/sample_config.py`): `config`, `network`, `dataset`, `loss`, `default`.

`generate_config(network, dataset, loss)` copies the chosen loss preset, then the network preset, then the
dataset preset into `config` (later ones win) and overrides the matching `default` keys, which become the CLI
defaults of `train/train.py`; explicit command-line flags win over everything.

Differences from insightface, on purpose:
- `ckpt_embedding` is False (as in the FairFace seed): checkpoints keep `fc7` so training can resume and the
  finetune chain can start from them; `--ckpt-embedding` strips it for release.
- dataset paths are relative to the project root (`datasets/...`), and class counts are read from the
  dataset's `property` file when it exists (the numbers below are the published sizes).
- `demo` and `demo_fairface` presets point at the synthetic sets of `data_process/make_demo_data.py`, and the
  `demo` network preset carries the CPU-sized recipe that `shell/train.sh` runs.
- the presets here are the only list of networks and losses: `recognition.models.get_model` and
  `recognition.losses.build_head` build from them, so every key below is read by the code (the insightface
  keys this code base has no use for, e.g. `bn_mom`, `workspace`, `net_unit`, `ce_loss`, are left out).
"""
import copy
import math
import os

from easydict import EasyDict as edict

from recognition.data.record import read_property
from recognition.utils import UserError

_config = edict()
_config.emb_size = 512
_config.ckpt_embedding = False
_config.val_targets = ['lfw', 'cfp_fp', 'agedb_30']
_config.fc7_lr_mult = 1.0
_config.fc7_wd_mult = 1.0
_config.data_rand_mirror = True
_config.data_cutoff = False
_config.data_color = 0
_config.data_compress = False
_config.data_images_filter = 0
_config.image_shape = [112, 112, 3]

# network settings: the one list of networks. `recognition.models.get_model(name)` builds each from its
# preset: `net_name` picks the family (insightface's symbol file), the other net keys its shape.
network = edict()

network.r100 = edict()
network.r100.net_name = 'fresnet'
network.r100.num_layers = 100

network.r50 = edict()
network.r50.net_name = 'fresnet'
network.r50.num_layers = 50

network.r34 = edict()
network.r34.net_name = 'fresnet'
network.r34.num_layers = 34

network.r18 = edict()
network.r18.net_name = 'fresnet'
network.r18.num_layers = 18

network.y1 = edict()
network.y1.net_name = 'fmobilefacenet'
network.y1.emb_size = 128
network.y1.net_blocks = [1, 4, 6, 2]

# The FairFace seed's ResNeSt networks (symbol/resnest.py, bottleneck '2s1x64d': radix 2, cardinality 1, width
# 64; deep stem, avg-down) with the "E" head, and its DropBlock 0.1 on the last two stages.
network.r50sa = edict()
network.r50sa.net_name = 'resnest'
network.r50sa.num_layers = 50
network.r50sa.net_dropblock = 0.1

network.r101sa = edict()
network.r101sa.net_name = 'resnest'
network.r101sa.num_layers = 101
network.r101sa.net_dropblock = 0.1

# Any MXNet checkpoint as the network (recognition/models/symbol.py): `--pretrained PREFIX,EPOCH` is its graph
# and weights, cut at `--emb-layer` (default fc1_output); its embedding size is that layer's.
network.symbol = edict()
network.symbol.net_name = 'symbol'

# The demo-size LResNet-IR for CPU demos on the synthetic sets: one unit per stage (10 layers) at a quarter of
# r18's width, and insightface's 7x7/2 stem (net_input=0) so no layer runs at 112x112, which makes a train
# step ~8x faster on CPU. Not a model for real data: use r50 / r100 there.
# Its CPU recipe (`shell/train.sh` runs it with --loss nsoftmax): measured on datasets/demo_emore, 400 steps
# of 32 reach lfw 0.81 / cfp_fp 0.75 Accuracy-Flip in ~7 min on 2 shared cores.
network.demo = edict()
network.demo.net_name = 'fresnet'
network.demo.num_layers = 10
network.demo.net_multiplier = 0.25
network.demo.net_input = 0
network.demo.emb_size = 128
network.demo.per_batch_size = 32
network.demo.lr = 0.1
network.demo.wd = 0.0005
network.demo.lr_steps = '250,350'
network.demo.warmup = 20
network.demo.verbose = 200
network.demo.frequent = 50
network.demo.max_steps = 400

# dataset settings (`config.dataset` is the preset's name, set by generate_config)
dataset = edict()

dataset.emore = edict()
dataset.emore.dataset_path = 'datasets/faces_emore'
dataset.emore.num_classes = 85742
dataset.emore.image_shape = [112, 112, 3]
dataset.emore.val_targets = ['lfw', 'cfp_fp', 'agedb_30']

dataset.retina = edict()
dataset.retina.dataset_path = 'datasets/ms1m-retinaface-t1'
dataset.retina.num_classes = 93431
dataset.retina.image_shape = [112, 112, 3]
dataset.retina.val_targets = ['lfw', 'cfp_fp', 'agedb_30']

dataset.fairface = edict()
dataset.fairface.dataset_path = 'datasets/fairface'
dataset.fairface.num_classes = 4297
dataset.fairface.image_shape = [112, 112, 3]
dataset.fairface.val_targets = ['val']

dataset.demo = edict()
dataset.demo.dataset_path = 'datasets/demo_emore'
dataset.demo.num_classes = 0
dataset.demo.image_shape = [112, 112, 3]
dataset.demo.val_targets = ['lfw', 'cfp_fp']

dataset.demo_fairface = edict()
dataset.demo_fairface.dataset_path = 'datasets/demo_fairface'
dataset.demo_fairface.num_classes = 0
dataset.demo_fairface.image_shape = [112, 112, 3]
dataset.demo_fairface.val_targets = ['val']

# loss settings: the one list of losses. `recognition.losses.build_head(name)` builds each from its preset:
# `loss_name` picks the head (losses.HEAD_TYPES), the other keys are its arguments in insightface's names
# (HEAD_ARGS below).
loss = edict()
loss.softmax = edict()
loss.softmax.loss_name = 'softmax'

loss.nsoftmax = edict()
loss.nsoftmax.loss_name = 'margin_softmax'
loss.nsoftmax.loss_s = 64.0
loss.nsoftmax.loss_m1 = 1.0
loss.nsoftmax.loss_m2 = 0.0
loss.nsoftmax.loss_m3 = 0.0

loss.arcface = edict()
loss.arcface.loss_name = 'margin_softmax'
loss.arcface.loss_s = 64.0
loss.arcface.loss_m1 = 1.0
loss.arcface.loss_m2 = 0.5
loss.arcface.loss_m3 = 0.0
# insightface's --easy-margin (off): only ArcFace has it, so only its preset carries the key.
loss.arcface.easy_margin = False

loss.cosface = edict()
loss.cosface.loss_name = 'margin_softmax'
loss.cosface.loss_s = 64.0
loss.cosface.loss_m1 = 1.0
loss.cosface.loss_m2 = 0.0
loss.cosface.loss_m3 = 0.35

loss.combined = edict()
loss.combined.loss_name = 'margin_softmax'
loss.combined.loss_s = 64.0
loss.combined.loss_m1 = 1.0
loss.combined.loss_m2 = 0.3
loss.combined.loss_m3 = 0.2

# The FairFace seed's loss (`arc_circle_loss`): gamma 64, margin 0.65 pi.
loss.arc_circle = edict()
loss.arc_circle.loss_name = 'arc_circle'
loss.arc_circle.loss_gamma = 64.0
loss.arc_circle.loss_margin = 0.65 * math.pi

# The FairFace seed's other losses (its config.py), under this project's names (no `_loss` suffix, as arc_circle).
# marginface: ArcFace's target margin, hard negatives re-weighted by the mask (1 = off, the seed's value).
loss.marginface = edict()
loss.marginface.loss_name = 'svx_softmax'
loss.marginface.loss_s = 64.0
loss.marginface.loss_m1 = 1.0
loss.marginface.loss_m2 = 0.5
loss.marginface.loss_m3 = 0.0
loss.marginface.loss_nm1 = 1.0
loss.marginface.loss_nm2 = 0.0
loss.marginface.loss_nm3 = 0.0
loss.marginface.loss_mask = 1.0

loss.softmax_circle = edict()
loss.softmax_circle.loss_name = 'softmax_circle'
loss.softmax_circle.loss_gamma = 64.0
loss.softmax_circle.loss_margin = 0.25

loss.fix_arc_circle = edict()
loss.fix_arc_circle.loss_name = 'fix_arc_circle'
loss.fix_arc_circle.loss_gamma = 64.0
loss.fix_arc_circle.loss_margin = 0.65 * math.pi

# Triplet finetuning on (anchor, positive, negative) batches (recognition.data.triplets), the negative mined in
# the batch; semihard is the seed's FaceNet selection. The seed's triplet_alpha: 0.3 triplet, 0.35 atriplet.
loss.triplet = edict()
loss.triplet.loss_name = 'triplet'
loss.triplet.triplet_alpha = 0.3
loss.triplet.triplet_mining = 'semihard'

loss.atriplet = edict()
loss.atriplet.loss_name = 'atriplet'
loss.atriplet.triplet_alpha = 0.35
loss.atriplet.triplet_mining = 'semihard'

loss.arc_circle_triplet = edict()
loss.arc_circle_triplet.loss_name = 'arc_circle_triplet'
loss.arc_circle_triplet.loss_gamma = 64.0
loss.arc_circle_triplet.loss_margin = 0.65 * math.pi
loss.arc_circle_triplet.triplet_mining = 'semihard'

loss.fix_arc_circle_triplet = edict()
loss.fix_arc_circle_triplet.loss_name = 'fix_arc_circle_triplet'
loss.fix_arc_circle_triplet.loss_gamma = 64.0
loss.fix_arc_circle_triplet.loss_margin = 0.65 * math.pi
loss.fix_arc_circle_triplet.triplet_mining = 'semihard'

# The seed's fusions: arc_circle on every sample of the triplet batch + triplet_weight x the pair-wise loss
# (the seed adds them with weight 1).
loss.triplet_fusion_arc_circle = edict()
loss.triplet_fusion_arc_circle.loss_name = 'triplet_fusion_arc_circle'
loss.triplet_fusion_arc_circle.loss_gamma = 64.0
loss.triplet_fusion_arc_circle.loss_margin = 0.65 * math.pi
loss.triplet_fusion_arc_circle.triplet_alpha = 0.3
loss.triplet_fusion_arc_circle.triplet_mining = 'semihard'
loss.triplet_fusion_arc_circle.triplet_weight = 1.0

loss.arc_circle_triplet_fusion_arc_circle = edict()
loss.arc_circle_triplet_fusion_arc_circle.loss_name = 'arc_circle_triplet_fusion_arc_circle'
loss.arc_circle_triplet_fusion_arc_circle.loss_gamma = 64.0
loss.arc_circle_triplet_fusion_arc_circle.loss_margin = 0.65 * math.pi
loss.arc_circle_triplet_fusion_arc_circle.triplet_mining = 'semihard'
loss.arc_circle_triplet_fusion_arc_circle.triplet_weight = 1.0

# The one translation of the loss keys to head arguments: build_head and the trainer's head_kwargs use it
# (build_head also takes the argument names). It lives here, not in losses.py, because the trainer module
# imports it at the top and must not pull in gluon: a dist kvstore server imports the trainer's schedule
# while mxnet itself is still initialising.
HEAD_ARGS = {'loss_s': 's', 'loss_m1': 'm1', 'loss_m2': 'm2', 'loss_m3': 'm3', 'easy_margin': 'easy_margin',
             'loss_gamma': 'gamma', 'loss_margin': 'margin', 'loss_mask': 'mask', 'loss_nm1': 'nm1',
             'loss_nm2': 'nm2', 'loss_nm3': 'nm3', 'triplet_alpha': 'alpha', 'triplet_mining': 'mining',
             'triplet_weight': 'weight'}

# default settings (the CLI defaults of train/train.py)
_default = edict()
_default.network = 'r100'
_default.dataset = 'emore'
_default.loss = 'arcface'
_default.pretrained = ''
_default.frequent = 20
_default.verbose = 2000
_default.kvstore = 'device'
_default.end_epoch = 10000
_default.lr = 0.1
_default.wd = 0.0005
_default.mom = 0.9
_default.per_batch_size = 128
_default.ckpt = 3
_default.lr_steps = '100000,160000,220000'
_default.models_root = './models'
# additions of this project (FairFace seed, Face_Recognition seed, resume)
_default.max_steps = 0
_default.warmup = 0
_default.cosine = False
_default.auto_decay = 0
_default.num_workers = 2
_default.seed = 0
# auxiliary tasks: center loss (HW_face) and attribute heads (Face_Recognition's multi-task); off by default
_default.center_loss_weight = 0.0
_default.center_loss_alpha = 0.5
_default.attr_heads = ''
_default.attr_weights = ''
# the seed's --label-smoothing (it smooths by 0.1 when on); 0 off
_default.label_smoothing = 0.0

config = edict(copy.deepcopy(_config))
default = edict(copy.deepcopy(_default))


_TABLES = {'network': network, 'dataset': dataset, 'loss': loss}


def preset(kind, name):
    """The `--<kind>` preset `name` (kind: network, dataset or loss); an unknown name is a UserError."""
    table = _TABLES[kind]
    if name not in table:
        raise UserError(f'--{kind}: unknown {kind} {name!r} (choose from {", ".join(sorted(table))})')
    return table[name]


def network_settings(name):
    """Network `name`'s keys as generate_config leaves them in `config`: its preset over the base `emb_size`
    (what `recognition.models.get_model` builds, so a network's default embedding has one home)."""
    return edict(copy.deepcopy(dict({'emb_size': _config.emb_size}, **preset('network', name))))


def generate_config(_network, _dataset, _loss):
    """Fill `config` and `default` from the presets, in insightface's order: loss, network, dataset.

    Both are reset to their base values first, so calling this twice does not mix presets. Returns
    `(config, default)`; the module-level objects are updated in place as in insightface.
    """
    presets = [preset('loss', _loss), preset('network', _network), preset('dataset', _dataset)]
    config.clear()
    config.update(copy.deepcopy(_config))
    default.clear()
    default.update(copy.deepcopy(_default))
    for chosen in presets:
        for k, v in chosen.items():
            config[k] = copy.deepcopy(v)
            if k in default:
                default[k] = copy.deepcopy(v)
    config.loss = _loss
    config.network = _network
    config.dataset = _dataset
    prop = read_property(os.path.join(config.dataset_path, 'property'))
    if prop is not None:
        config.num_classes = prop[0]
        config.image_shape = [prop[1], prop[2], 3]
    return config, default
