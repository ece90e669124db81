"""insightface's preset system: override order, defaults, property-file class counts."""
import os
import runpy

import pytest

from recognition.config import default, generate_config, network, network_settings
from recognition.data.transforms import train_transform
from recognition.losses import build_head
from recognition.training.loop import head_kwargs
from recognition.utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_insightface_defaults():
    config, d = generate_config('r100', 'emore', 'arcface')
    assert (d.lr, d.wd, d.mom, d.per_batch_size) == (0.1, 0.0005, 0.9, 128)
    assert (d.lr_steps, d.verbose, d.frequent, d.ckpt, d.kvstore) == ('100000,160000,220000', 2000, 20, 3, 'device')
    assert d.models_root == './models'
    assert (config.loss_s, config.loss_m1, config.loss_m2, config.loss_m3) == (64.0, 1.0, 0.5, 0.0)
    assert config.num_layers == 100 and config.emb_size == 512 and config.num_classes == 85742
    assert config.val_targets == ['lfw', 'cfp_fp', 'agedb_30']
    assert config.ckpt_embedding is False  # checkpoints keep fc7 (resume, finetune)


def test_override_order_and_reset():
    config, d = generate_config('y1', 'fairface', 'cosface')
    assert config.emb_size == 128 and config.net_name == 'fmobilefacenet' and config.loss_m3 == 0.35
    assert config.num_classes == 4297 and config.val_targets == ['val']
    # network presets override `default` keys they share (the demo recipe), and a new call resets them.
    config, d = generate_config('demo', 'demo', 'arcface')
    assert d.per_batch_size == network.demo.per_batch_size and d.lr == network.demo.lr
    config, d = generate_config('r50', 'emore', 'arcface')
    assert d.per_batch_size == 128 and d.lr == 0.1 and 'max_steps' in d and d.max_steps == 0
    assert default is d


# insightface keys this code base reads nowhere (its fresnet is net_unit 3 / prelu / output E, MobileFaceNet
# GDC; there is no symbol workspace, memonger or FLOP counter): kept out so every config key does something.
DROPPED_KEYS = ('bn_mom', 'workspace', 'net_se', 'net_act', 'net_unit', 'net_output', 'ce_loss', 'fc7_no_bias',
                'count_flops', 'memonger')


def test_no_unread_insightface_keys():
    for net, loss in (('r100', 'arcface'), ('y1', 'cosface'), ('demo', 'softmax')):
        config, _ = generate_config(net, 'emore', loss)
        assert not set(DROPPED_KEYS) & set(config)


def test_cli_preset_defaults_do_not_stick():
    """--network/--loss/--dataset default to insightface's r100/arcface/emore however many presets were loaded."""
    train_parse_args(['--network', 'demo', '--loss', 'nsoftmax', '--dataset', 'demo'])
    opts = train_parse_args([])
    assert (opts.network, opts.loss, opts.dataset) == ('r100', 'arcface', 'emore')
    assert (opts.emb_size, opts.loss_m2) == (512, 0.5)
    assert (opts.per_batch_size, opts.lr, opts.data_dir) == (128, 0.1, 'datasets/faces_emore')


def test_network_settings_are_what_generate_config_gives():
    for name in network:
        config, _ = generate_config(name, 'emore', 'arcface')
        assert network_settings(name) == {k: config[k] for k in network_settings(name)}
    assert network_settings('r50').emb_size == 512 and network_settings('y1').emb_size == 128


def test_class_count_from_property(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'datasets' / 'demo_emore').mkdir(parents=True)
    (tmp_path / 'datasets' / 'demo_emore' / 'property').write_text('321,112,112\n')
    config, _ = generate_config('demo', 'demo', 'nsoftmax')
    assert config.num_classes == 321


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown network 'r1000'"):
        generate_config('r1000', 'emore', 'arcface')


def train_parse_args(argv):
    """train/train.py's parse_args (a script, not a module of the package)."""
    return runpy.run_path(os.path.join(ROOT, 'train', 'train.py'), run_name='train_cli')['parse_args'](argv)


def test_train_flags_reach_opts_and_the_head(tmp_path):
    data = ['--data-dir', str(tmp_path)]   # no property file: preset class counts, nothing read
    opts = train_parse_args(['--network', 'r18', '--loss', 'arcface'] + data)
    # insightface defaults: margin everywhere, no colour/cutoff/compress, every identity kept
    assert opts.easy_margin is False and build_head('arcface', 10, 8, **head_kwargs(opts)).easy_margin is False
    assert (opts.data_color, opts.data_cutoff, opts.data_compress, opts.data_images_filter) == (0, False, False, 0)

    opts = train_parse_args(['--network', 'r18', '--loss', 'arcface', '--easy-margin', '--data-color', '1',
                             '--data-cutoff', '--images-filter', '5'] + data)
    assert opts.easy_margin is True and build_head('arcface', 10, 8, **head_kwargs(opts)).easy_margin is True
    assert (opts.data_color, opts.data_cutoff, opts.data_compress, opts.data_images_filter) == (True, True, False, 5)
    transform = train_transform(mirror=opts.data_rand_mirror, color=opts.data_color, cutoff=opts.data_cutoff,
                                compress=opts.data_compress)
    assert transform.color == 0.125 and transform.cutoff > 0 and not transform.compress

    opts = train_parse_args(['--data-color', '2', '--data-cutoff', '24'] + data)   # level 2 adds compression
    assert (opts.data_color, opts.data_cutoff, opts.data_compress) == (True, 24, True)
    assert train_parse_args(['--data-compress'] + data).data_compress is True
    assert 'easy_margin' not in head_kwargs(train_parse_args(['--loss', 'cosface'] + data))

    for argv in (['--loss', 'cosface', '--easy-margin'], ['--images-filter', '-1']):
        with pytest.raises(SystemExit) as exit_info:
            train_parse_args(argv + data)
        assert exit_info.value.code == 2
