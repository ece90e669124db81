"""Train a face-recognition network with a margin-softmax head (insightface's `train.py`, on Gluon).

    python train/train.py --network r100 --loss arcface --dataset emore --gpus 0,1,2,3
    python train/train.py --network demo --loss arcface --dataset demo --ctx cpu:2

`--network --loss --dataset` pick the presets of `recognition/config.py` first; their values become the
defaults of every other option. Checkpoints, logs, mxboard events and the `latest` pointer go to
`<models-root>/<network>-<loss>-<dataset>/`.
"""
import argparse

from easydict import EasyDict as edict

from recognition import config as presets
from recognition.utils import run_cli


def parse_args(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--network', default=presets.default.network)
    pre.add_argument('--loss', default=presets.default.loss)
    pre.add_argument('--dataset', default=presets.default.dataset)
    known, _ = pre.parse_known_args(argv)
    config, default = presets.generate_config(known.network, known.dataset, known.loss)

    p = argparse.ArgumentParser(description='Train a face recognition model', parents=[pre],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--data-dir', default=config.dataset_path, help='dataset folder (train.rec, property, *.bin)')
    p.add_argument('--val-targets', default=','.join(config.val_targets),
                   help='verification .bin names in the dataset folder, comma separated ("" for none)')
    p.add_argument('--models-root', default=default.models_root, help='root folder of the run folders')
    p.add_argument('--run-name', default='', help='run folder name (default <network>-<loss>-<dataset>)')
    p.add_argument('--pretrained', default=default.pretrained, help='prefix,epoch of a checkpoint to start from')
    p.add_argument('--freeze-block', type=int, default=0, choices=(0, 1, 2),
                   help='0 train all layers; 1 only fc7; 2 freeze up to bn1 (--network symbol: --freeze-until)')
    p.add_argument('--freeze-until', default='',
                   help='--network symbol with --freeze-block 2: freeze every layer up to this one '
                        '(default bn1_output)')
    p.add_argument('--emb-layer', default='',
                   help='--network symbol: the embedding layer to cut the --pretrained graph at (default: the '
                        "layer of a model.json beside it, else fc1_output)")
    p.add_argument('--bgr', action=argparse.BooleanOptionalAction, default=None,
                   help='--network symbol: the --pretrained model was trained on BGR (default: its model.json)')
    p.add_argument('--input-scale', default=None,
                   help='--network symbol: the input scaling the --pretrained model was trained with, as a '
                        "model.json's input_scale: raw (0..255), normalized or unit (default: its model.json, else "
                        'raw); the conversion is saved in the graph, which then takes RGB 0..255')
    p.add_argument('--selected-attributes', default='',
                   help='train only on one protected group: dark_female, gender=0,skin_colour=1, the seed index '
                        'gender*2+skin_colour (0..3), or auto[:file] = the choice of '
                        'train/select_protected_group.py (default file <models-root>/protected_group.json)')
    p.add_argument('--sampler', default='',
                   help='balanced[:ATTR]: every batch draws the protected groups of ATTR (gender, skin or '
                        'gender_skin, the default) equally, an identity of the group uniformly, an image of it '
                        'uniformly; uniform or empty: every image once per epoch')
    p.add_argument('--group-margin', default='',
                   help='GROUP=M2[,GROUP=M2...]: the additive angular margin m2 of the identities of each named '
                        'protected group (e.g. dark_female=0.6,dark_male=0.55; groups of one attribute), the '
                        "others keep the preset's; margin-softmax heads (arcface, combined, ...)")
    p.add_argument('--fpr-penalty', type=float, default=0.0,
                   help='weight of the instance-FPR consistency penalty (Xu et al. CVPR 2021, docs/metrics.md) '
                        'added to the loss; 0 off')
    p.add_argument('--fpr-target', type=float, default=0.0,
                   help="the batch FPR that sets the penalty's threshold; 0: 1/(classes-1)")
    p.add_argument('--ckpt', type=int, default=default.ckpt, choices=(0, 1, 2, 3),
                   help='0 never save; 1 save when the last val target improves; 2 save every --verbose '
                        'batches; 3 like 1 but always as model-0001')
    p.add_argument('--ckpt-embedding', action='store_true', default=config.ckpt_embedding,
                   help='save only the fc1_output graph (release); default keeps fc7 for resume/finetune')
    p.add_argument('--verbose', type=int, default=default.verbose, help='verify and checkpoint every N batches')
    p.add_argument('--frequent', type=int, default=default.frequent, help='log every N batches')
    p.add_argument('--max-steps', type=int, default=default.max_steps, help='stop after N steps (0: end-epoch)')
    p.add_argument('--end-epoch', type=int, default=default.end_epoch)
    p.add_argument('--lr', type=float, default=default.lr)
    p.add_argument('--wd', type=float, default=default.wd)
    p.add_argument('--mom', type=float, default=default.mom)
    p.add_argument('--per-batch-size', type=int, default=default.per_batch_size, help='batch per context')
    p.add_argument('--lr-steps', default=default.lr_steps, help='lr x0.1 at these global steps')
    p.add_argument('--warmup', type=int, default=default.warmup, help='linear lr warmup steps')
    p.add_argument('--cosine', action='store_true', default=default.cosine,
                   help='cosine decay to 0 at --max-steps instead of --lr-steps')
    p.add_argument('--auto-decay', type=int, default=default.auto_decay,
                   help='lr x0.1 when the loss has not decreased for N steps (dlib test); 0 off')
    p.add_argument('--emb-size', type=int, default=config.emb_size)
    p.add_argument('--loss-s', type=float, default=config.get('loss_s'), help='margin head scale s')
    p.add_argument('--loss-m1', type=float, default=config.get('loss_m1'))
    p.add_argument('--loss-m2', type=float, default=config.get('loss_m2'))
    p.add_argument('--loss-m3', type=float, default=config.get('loss_m3'))
    p.add_argument('--easy-margin', action=argparse.BooleanOptionalAction, default=config.get('easy_margin'),
                   help='ArcFace only: add the margin only where cos(theta) > 0 (insightface --easy-margin)')
    p.add_argument('--loss-gamma', type=float, default=config.get('loss_gamma'),
                   help='scale of the circle losses (arc_circle, softmax_circle, fix_arc_circle, the triplet circles)')
    p.add_argument('--loss-margin', type=float, default=config.get('loss_margin'),
                   help='circle losses: the angular margin (radians; arc_circle family) or the relaxation m of '
                        'softmax_circle')
    p.add_argument('--loss-mask', type=float, default=config.get('loss_mask'),
                   help='marginface: weight t >= 1 of the hard non-target logits, t*cos + t - 1 (1 = off)')
    p.add_argument('--loss-nm1', type=float, default=config.get('loss_nm1'),
                   help='marginface: non-target angle divided by nm1 (>= 1)')
    p.add_argument('--loss-nm2', type=float, default=config.get('loss_nm2'),
                   help='marginface: non-target angle minus nm2 (>= 0)')
    p.add_argument('--loss-nm3', type=float, default=config.get('loss_nm3'),
                   help='marginface: non-target cosine plus nm3 (>= 0)')
    p.add_argument('--label-smoothing', type=float, default=default.label_smoothing,
                   help='softmax-family losses: smooth the target by A (1 - A on the label, A/(K-1) elsewhere, '
                        "MXNet's smooth_alpha; the seed uses 0.1); 0 off")
    p.add_argument('--triplet-alpha', type=float, default=config.get('triplet_alpha'),
                   help='triplet / atriplet margin (squared L2 or radians)')
    p.add_argument('--triplet-mining', choices=('hardest', 'semihard'), default=config.get('triplet_mining'),
                   help='triplet losses: the negative of each anchor within its batch')
    p.add_argument('--triplet-weight', type=float, default=config.get('triplet_weight'),
                   help='fusion losses: weight of the pair-wise loss added to the class-level one')
    p.add_argument('--sample-ratio', type=float, default=None,
                   help='Partial FC: each step trains the batch\'s classes plus uniformly drawn others, '
                        'ceil(R * classes) in all, with fc7 sharded over the contexts (on the servers as '
                        'row_sparse with dist_sync); 0 < R <= 1 (insightface sample_rate). Default: the full fc7 '
                        'copied to every context')
    p.add_argument('--fc7-lr-mult', type=float, default=config.fc7_lr_mult)
    p.add_argument('--fc7-wd-mult', type=float, default=config.fc7_wd_mult)
    p.add_argument('--data-color', type=int, default=config.data_color,
                   help="insightface data_color: 0 off; 1 colour jitter (strength 0.125); 2 also JPEG "
                        "compress half the images")
    p.add_argument('--data-cutoff', type=int, nargs='?', const=True, default=config.data_cutoff,
                   help='blank a random square (value 128) in half the images: its side in pixels, or the '
                        'flag alone for the default side; 0 off (insightface data_cutoff)')
    p.add_argument('--data-compress', action=argparse.BooleanOptionalAction, default=config.data_compress,
                   help='re-encode half the images as JPEG of quality 2..20')
    p.add_argument('--images-filter', dest='data_images_filter', type=int, default=config.data_images_filter,
                   help='drop identities with fewer images (insightface data_images_filter; 0 keeps all)')
    p.add_argument('--center-loss-weight', type=float, default=default.center_loss_weight,
                   help='weight of the center loss (HW_face auxiliary) added to the margin loss; 0 off')
    p.add_argument('--center-loss-alpha', type=float, default=default.center_loss_alpha,
                   help='center update rate')
    p.add_argument('--attr-heads', default=default.attr_heads,
                   help='attribute classification heads on the embedding, e.g. gender,age (names of the '
                        "rec's .attributes.json; code -1 = unknown, no loss)")
    p.add_argument('--attr-weights', default=default.attr_weights,
                   help='task weight of each --attr-heads entry, e.g. 1.0,0.5 (default 1 each)')
    p.add_argument('--kvstore', default=default.kvstore, help='device, local (or dist_sync, ...)')
    p.add_argument('--gpus', default='', help='GPU ids, e.g. 0,1 (default: CUDA_VISIBLE_DEVICES)')
    p.add_argument('--ctx', default='', help='cpu:N for N CPU contexts (multi-device on CPU)')
    p.add_argument('--num-workers', type=int, default=default.num_workers, help='data loader processes')
    p.add_argument('--resume', action='store_true', help='continue the run in the run folder exactly')
    p.add_argument('--fp16', action='store_true', help='AMP + multi_precision on GPUs (no-op on CPU)')
    p.add_argument('--seed', type=int, default=default.seed)
    args = p.parse_args(argv)

    opts = edict(config)
    for k, v in vars(args).items():
        if v is not None:
            opts[k] = v
    opts.dataset_path = args.data_dir
    opts.val_targets = [t for t in args.val_targets.split(',') if t.strip()]
    if config.net_name == 'symbol' and not args.pretrained:
        p.error('--network symbol builds the network from a checkpoint: give --pretrained PREFIX,EPOCH')
    symbol_only = [f for f, v in (('--emb-layer', args.emb_layer), ('--freeze-until', args.freeze_until),
                                  ('--bgr', args.bgr is not None), ('--input-scale', args.input_scale)) if v]
    if symbol_only and config.net_name != 'symbol':
        p.error(f'{symbol_only[0]} applies to --network symbol only, not {known.network}')
    if args.easy_margin and 'easy_margin' not in config:
        p.error(f'--easy-margin applies to --loss arcface only, not {known.loss}')
    if args.fpr_penalty < 0 or not 0 <= args.fpr_target < 1:
        p.error('--fpr-penalty must be >= 0 and --fpr-target in [0, 1)')
    if args.data_color < 0 or args.data_images_filter < 0 or args.data_cutoff < 0:
        p.error('--data-color, --data-cutoff and --images-filter must be >= 0')
    # insightface's data_color is a level, not a strength: 1 jitters with its 0.125, 2 adds compression.
    opts.data_color = True if args.data_color > 0 else 0
    opts.data_compress = bool(args.data_compress or args.data_color > 1)
    return opts


def main(argv=None):
    from recognition.training import train   # here: --help and argument errors answer without MXNet (~2 s)
    summary = train(parse_args(argv))
    if summary['interrupted']:
        return 128 + int(summary['interrupted'])
    return 0


if __name__ == '__main__':
    run_cli(main)
