"""The trainer: insightface's `train.py` on Gluon (hybridised, data-parallel, kvstore), with exact resume.

One step: the global batch is split over the contexts (`split_and_load`), each slice runs embedding net +
margin head + softmax cross-entropy (`losses.HeadLoss`; a pair-wise loss on triplet batches of
`data.triplets` instead) under `autograd.record`, gradients are reduced by the kvstore and
`gluon.Trainer.step(global_batch)` applies SGD; the loss mean is the batch mean, like insightface's
`SoftmaxOutput(normalization='valid')` with `rescale_grad = 1/ctx_num`.

`--sample-ratio` hands fc7 to `partial_fc.PartialFC` (sampled columns, sharded over the contexts, its own
lazy SGD step after the Trainer's): docs/partial_fc.md.

Every `verbose` steps: 10-fold verification on the dataset's `.bin` targets, the `--ckpt` policy, and a
resume snapshot. `--resume` restores parameters, optimizer state, step, schedule and data position; dropout
masks are drawn from a generator reseeded from (seed, step) every step, so a resumed run repeats exactly
the steps a straight run would have taken.

Imports: the modules that build on MXNet (models, losses, data, verification, AMP) are imported where they are
used. A dist_async server unpickles this package's `ServerSchedule` while its own `import mxnet` is still
running; a module that subclasses Gluon blocks at import then meets a half-imported mxnet and fails
(`test_train_dist.py::test_dist_async_trains_and_resumes` caught it when `losses` was imported at the top).
"""
import contextlib
import math
import os
import signal
import sys
import time

import numpy as np

from recognition import checkpoint, distributed
from recognition.config import HEAD_ARGS
from recognition.data.bin import load_verification_set
from recognition.data.shards import training_recs
from recognition.groups import group_members, parse_group_values, resolve_group_spec, select_identities
from recognition.locking import folder_lock
from recognition.utils import UserError
from recognition.training import kvstore as kvstore_setup
from recognition.training.monitor import Monitor, get_logger
from recognition.training.schedules import PlateauDecay, ServerSchedule, StepSchedule


class TrainingDiverged(UserError):
    """The loss became NaN or Inf: the run stops before the bad update is applied."""


def run_folder(opts):
    """`models_root/<network>-<loss>-<dataset>/` (insightface's layout) unless `run_name` is given."""
    name = opts.get('run_name') or '%s-%s-%s' % (opts.network, opts.loss, opts.dataset)
    return os.path.join(opts.models_root, name)


def wd_multiplier(name):
    """insightface trains with Module, whose optimizer puts weight decay only on `*_weight` and `*_gamma`.

    Gluon's Trainer decays every parameter; this keeps Module's rule (no decay on biases and BN betas).
    """
    return 1.0 if name.endswith(('_weight', '_gamma')) else 0.0


def freeze(net, block, until=''):
    """`--freeze-block`: 0 trains everything; 1 freezes the whole embedding network (only the head
    trains); 2 freezes everything up to `bn1` (the output block `pre_fc1`/`fc1` and the head train), or, on a
    `--network symbol` graph, up to the layer `until` (`--freeze-until`, default `bn1_output`).

    Frozen parameters get no gradient, and BatchNorm layers whose parameters are all frozen normalise with
    their running statistics and stop updating them. Returns the names of the frozen parameters.
    """
    if block == 0:
        return []
    if block not in (1, 2):
        raise UserError(f'--freeze-block {block}: choose 0 (all layers), 1 (only fc7) or 2 (up to bn1)')
    from recognition.models import walk_blocks   # here: see the note on imports above
    params = net.collect_params()
    if hasattr(net, 'params_up_to'):   # a checkpoint's graph: freezing is by layer name
        frozen = list(params) if block == 1 else net.params_up_to(until or 'bn1_output')
        net.freeze_statistics(frozen)
    else:
        frozen = [n for n in params if block == 1 or not n.startswith(('pre_fc1', 'fc1_'))]
    for name in frozen:
        params[name].grad_req = 'null'
    frozen_set = set(frozen)
    for b in walk_blocks(net):
        # Gluon's BatchNorm and the models' insightface-named BatchNorm both keep the op's
        # arguments in `_kwargs`.
        if 'use_global_stats' in getattr(b, '_kwargs', {}) and set(b.collect_params()) <= frozen_set:
            b._kwargs['use_global_stats'] = True
    return frozen


def head_kwargs(opts):
    """The loss settings present in `opts`, under insightface's names (loss_s, loss_m2, ...) that build_head takes."""
    return {k: opts[k] for k in HEAD_ARGS if opts.get(k) is not None}


def training_methods(opts):
    """The bias-mitigation switches a run trains with, as short strings (`sampler balanced:gender_skin`):
    kept in `model-resume.json` and copied into the model folder's `model.json` for the chain table."""
    out = []
    if opts.get('selected_attributes'):
        out.append('selected-attributes %s' % resolve_group_spec(opts.selected_attributes,
                                                                 opts.get('models_root', '.'))[0])
    from recognition.data.sampler import parse_sampler   # here: see the note on imports in the module docstring
    attribute = parse_sampler(opts.get('sampler'))
    if attribute is not None:
        out.append('sampler balanced:%s' % attribute)
    if opts.get('group_margin'):
        _, margins = parse_group_values(opts.group_margin, f'--group-margin {opts.group_margin}')
        out.append('group-margin ' + ','.join('%s=%g' % kv for kv in margins.items()))
    if opts.get('fpr_penalty'):
        target = opts.get('fpr_target') or 0
        out.append('fpr-penalty %g' % opts.fpr_penalty + (' fpr %g' % target if target else ''))
    return out


def load_val_sets(opts, image_size):
    """The `val_targets` `.bin` files of the dataset folder, each read and checked before step 1
    (enough pairs of both kinds for 10 folds, every image decodable); a missing target is an error."""
    sets = []
    for name in opts.val_targets:
        path = os.path.join(opts.dataset_path, name + '.bin')
        if not os.path.isfile(path):
            raise UserError(f'{path}: verification target {name!r} not found '
                            f'(give --val-targets to choose others, or --val-targets "" for none)')
        data_list, issame = load_verification_set(path, image_size)
        sets.append((name, data_list, issame))
    return sets


class TrainingSession:
    """Everything one run needs, built from `opts` (the merged config + CLI options).

    `net` and `head` may be given (tests, custom models); otherwise they come from the registry
    (`recognition.models.get_model`) and the loss presets (`recognition.losses.build_head`).
    """

    def __init__(self, opts, net=None, head=None, dataset=None):
        import mxnet as mx
        self.mx = mx
        self.opts = opts
        self.topology = kvstore_setup.setup(opts.get('gpus', ''), opts.get('ctx', ''), opts.kvstore)
        self.contexts = self.topology.contexts
        self.chief = self.topology.is_chief
        self.run_dir = run_folder(opts)
        self.prefix = os.path.join(self.run_dir, 'model')
        # One run per run folder: a second would prune this one's snapshots and interleave train.log.
        self._lock = contextlib.ExitStack()
        if self.chief:
            self._lock.enter_context(folder_lock(self.run_dir, 'training run'))
        try:
            self._build(net, head, dataset)
        except BaseException:
            self._lock.close()
            raise

    def _build(self, net, head, dataset):
        """The rest of `__init__`, under the run-folder lock."""
        mx, opts = self.mx, self.opts
        self.show_bar = opts.get('progress_bar')
        if self.show_bar is None:
            self.show_bar = sys.stdout.isatty()
        self.log = get_logger(os.path.join(self.run_dir, 'train.log') if self.chief else None,
                              use_tqdm=self.show_bar)
        self.log.info('%s', self.topology.describe())
        self.batch_size = opts.per_batch_size * len(self.contexts)
        self.global_batch = self.batch_size * self.topology.num_workers
        self.seed = int(opts.seed)
        # --sample-ratio: Partial FC (recognition.partial_fc) takes fc7 over from the Trainer.
        from recognition.partial_fc import check_ratio   # here: see the note on imports above
        self.sample_ratio = check_ratio(opts.sample_ratio) if opts.get('sample_ratio') is not None else None
        if self.sample_ratio is not None and self.topology.server_updates:
            raise UserError(f'--sample-ratio with --kvstore {self.topology.name}: Partial FC on the parameter '
                            f'server needs dist_sync (its servers update fc7, the workers the rest)')
        self.pfc = None

        self.shard_samples = None
        self.dataset = dataset if dataset is not None else self._open_dataset()
        self.num_classes = int(self.dataset.num_classes)
        # The identity subset to train on (all when None); the loader samples only these.
        self.identities = None
        if opts.get('selected_attributes'):
            self.identities = select_identities(self.dataset, opts.selected_attributes,
                                                opts.get('models_root', '.'), log=self.log.info)
        self.methods = training_methods(opts)
        self.loader = None
        # The rec's property file is authoritative for the image size (as for the class count).
        self.image_size = tuple(int(v) for v in self.dataset.image_size)
        self.val_sets = load_val_sets(opts, self.image_size) if self.chief else []
        # Pair-wise losses train on triplet batches (recognition.data.triplets), not on the epoch order.
        from recognition.losses import triplet_batches   # here: see the note on imports above
        self.triplets = None
        if triplet_batches(head if head is not None else opts.loss):
            self.triplets = self._triplet_sampler()
            self.steps_per_epoch = len(self.triplets)
        else:
            self.steps_per_epoch = self._samples_per_worker() // self.batch_size
        if self.steps_per_epoch == 0 and self.triplets is not None:
            raise UserError(f'{opts.dataset_path}: {self.triplets.num_pairs} (anchor, positive) pairs, fewer than '
                            f'one batch of {self.batch_size // 3} triplets')
        if self.steps_per_epoch == 0:
            raise UserError(f'{opts.dataset_path}: {len(self.dataset)} training images, fewer than one batch '
                            f'of {self.batch_size}')
        self.sampler = None
        from recognition.data.sampler import balanced_sampler, parse_sampler   # here: see the note on imports
        attribute = parse_sampler(opts.get('sampler'))
        if attribute is not None:
            self.sampler = balanced_sampler(self.dataset, attribute, self.batch_size, self._samples_per_worker(),
                                            seed=self.seed, rank=self.topology.rank, identities=self.identities,
                                            log=self.log.info)
        if self.sampler is not None and self.triplets is not None:
            raise UserError(f'--sampler {opts.sampler}: --loss {opts.loss} draws its own triplet batches '
                            f'(recognition.data.triplets); use one or the other')
        self.fpr_weight = float(opts.get('fpr_penalty') or 0)
        self.fpr_target = float(opts.get('fpr_target') or 0)
        self._fpr_window = []
        if self.sample_ratio is not None:
            clash = ('--loss %s (triplet batches, no fc7 of its own to sample)' % opts.loss if self.triplets
                     else '--label-smoothing' if opts.get('label_smoothing')
                     else '--fpr-penalty (it scores every class)' if self.fpr_weight else None)
            if clash:
                raise UserError(f'--sample-ratio {self.sample_ratio:g} does not combine with {clash}: Partial FC '
                                f'computes its own softmax over the sampled classes')

        # Reproducible initialisation; the per-step reseed below keeps dropout reproducible too.
        mx.random.seed(self.seed)
        np.random.seed(self.seed)
        self._setup_precision()
        self.net, self.head = self._build_model(net, head)
        self.frozen = freeze(self.net, int(opts.get('freeze_block', 0) or 0), opts.get('freeze_until', ''))
        if self.frozen:
            self.log.info('freeze-block %d: %d parameters frozen', opts.freeze_block, len(self.frozen))
        self.tasks = self._build_tasks()
        self.params = {**self.net.collect_params(), **self.head.collect_params(),
                       **(self.tasks.collect_params() if self.tasks is not None else {})}
        self.trainable = {n: p for n, p in self.params.items() if p.grad_req != 'null'}
        if not self.trainable and self.sample_ratio is None:   # Partial FC updates fc7 without the Trainer
            raise UserError(f'--freeze-block {opts.freeze_block} trains only fc7, and --loss {opts.loss} has none '
                            f'(a pair-wise loss trains the embedding: use --freeze-block 0 or 2)')
        try:
            lr_steps = [int(s) for s in str(opts.lr_steps).split(',') if s.strip()]
        except ValueError:
            raise UserError(f'--lr-steps {opts.lr_steps!r}: expected comma-separated step numbers') from None
        if opts.get('cosine') and not opts.max_steps:
            raise UserError('--cosine decays to 0 at --max-steps: give --max-steps')
        self.schedule = StepSchedule(opts.lr, lr_steps, warmup=opts.get('warmup', 0), cosine=opts.get('cosine'),
                                     max_steps=opts.max_steps)
        self.plateau = PlateauDecay(opts.get('auto_decay', 0) or 0)
        if self.topology.distributed and self.plateau.patience:
            raise UserError('--auto-decay watches this worker\'s loss, which differs between workers, so their '
                            'learning rates would drift apart: with a distributed kvstore use --lr-steps, '
                            '--warmup or --cosine')
        self.trainer = self._build_trainer()
        from recognition.losses import HeadLoss
        self.loss_fn = HeadLoss(self.head, opts.get('label_smoothing', 0.0))
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.save_step = 0
        self.highest_acc = [0.0, 0.0]
        self.last_checkpoint = None
        self.monitor = None
        self._stop_signal = None
        self._resume_extra = {}
        if opts.get('resume'):
            self._resume()
        else:
            self._join_kvstore()
        if self.sample_ratio is not None:
            self._build_partial_fc()

    def _build_partial_fc(self):
        """fc7 sampled and sharded over the contexts (on the servers with dist_sync), from the head's
        parameters as initialised, loaded or resumed; a resume also restores its momentum."""
        from recognition.partial_fc import PartialFC
        opts = self.opts
        dist = self.topology.distributed
        self.pfc = PartialFC(self.head, self.contexts, self.sample_ratio, self.seed, self.global_batch, opts.wd,
                             opts.mom, log=self.log.info, kvstore=self.topology.kvstore if dist else None,
                             rank=self.topology.rank, num_workers=self.topology.num_workers,
                             lr_scheduler=ServerSchedule(self.schedule) if dist else None, begin_step=self.step)
        if self._resume_extra:
            self.pfc.load(self._resume_extra)
        if dist and self.step:
            self.log.warning('Partial FC on the parameter server: the servers hold fc7\'s momentum, which they '
                             'cannot save; it restarts at this resume')
        self.log.info('Partial FC: %d of %d classes per step (--sample-ratio %g), fc7 in %d shard(s)%s',
                      self.pfc.sampler.size, self.num_classes, self.sample_ratio, len(self.pfc.bounds),
                      ' on the servers (row_sparse)' if dist else '')

    # --- construction -------------------------------------------------------------------------------
    def _open_dataset(self):
        from recognition.data.dataset import FaceRecordDataset
        from recognition.data.transforms import train_transform
        from recognition.data.record import read_layout
        opts = self.opts
        recs = training_recs(opts.dataset_path, opts.dataset)
        mine = self.topology.shard_plan(len(recs))
        if mine is not None:
            # Whole shards per rank; every rank runs as many steps as the smallest share allows.
            sizes = [read_layout(r).num_images for r in recs]
            workers = self.topology.num_workers
            self.shard_samples = min(sum(sizes[rank::workers]) for rank in range(workers))
            recs = [recs[i] for i in mine]
            self.log.info('rank %d reads shards %s', self.topology.rank, ', '.join(map(os.path.basename, recs)))
        transform = train_transform(mirror=opts.data_rand_mirror, color=opts.data_color,
                                    cutoff=opts.data_cutoff, compress=opts.get('data_compress', False))
        return FaceRecordDataset(recs, images_filter=opts.data_images_filter, transform=transform,
                                 return_attributes=bool(opts.get('attr_heads')))

    def _triplet_sampler(self):
        """This worker's triplet sampler (its `len` is the steps per epoch), after the batch-size check."""
        from recognition.data.triplets import TripletSampler, check_triplet_batch
        check_triplet_batch(int(self.opts.per_batch_size), self.opts.loss)
        if self.shard_samples is not None:
            raise UserError(f'--loss {self.opts.loss}: triplet batches pair images across the whole set, so a '
                            f'distributed run must read all shards (one rec, or a kvstore without shard plan)')
        return TripletSampler(self.dataset, self.opts.per_batch_size, len(self.contexts), self.seed,
                              self.identities, part=self.topology.part)

    def _samples_per_worker(self):
        """Samples one worker sees per epoch: all of its shards, or its strided share of the samples."""
        if self.shard_samples is not None:
            return self.shard_samples
        n = len(self.dataset) if self.identities is None else len(self.dataset.indices_of(self.identities))
        return n // self.topology.num_workers

    def _setup_precision(self):
        self.amp = False
        if not self.opts.get('fp16'):
            return
        if not self.topology.on_gpu:
            self.log.info('--fp16: AMP and multi_precision need GPUs; training in float32 on CPU')
            return
        from mxnet.contrib import amp
        amp.init()
        self.amp = True
        self.log.info('--fp16: AMP (float16 compute, float32 master weights via multi_precision)')

    def _build_model(self, net, head):
        mx = self.mx
        opts = self.opts
        from recognition.models import build_network, forward_flops, init_params, parameter_count
        if net is None:
            # Networks are built for the dataset's image size (112x112 unless its property says otherwise).
            net = build_network(opts, self.image_size[0])
        # A `--network symbol` embedding has its layer's width.
        emb_size = getattr(net, 'emb_size', None) or opts.emb_size
        if head is None and opts.get('group_margin'):
            head = self._group_margin_head(emb_size)
        if head is None:
            from recognition.losses import build_head
            head = build_head(opts.loss, self.num_classes, emb_size, fc7_lr_mult=opts.fc7_lr_mult,
                              fc7_wd_mult=opts.fc7_wd_mult, **head_kwargs(opts))
        if self.fpr_weight and not hasattr(head, 'cosine'):
            raise UserError(f'--fpr-penalty needs a head with fc7 cosines, not {type(head).__name__}')
        init_params(net, ctx=self.contexts)
        # Partial FC keeps the merged fc7 in host memory and its shards on the contexts.
        head_ctx = [mx.cpu()] if self.sample_ratio is not None else self.contexts
        head.initialize(ctx=head_ctx)
        # One forward completes Gluon's deferred initialisation, so shapes exist for loading; three samples,
        # so that a pair-wise head sees one whole (anchor, positive, negative) triplet.
        x = mx.nd.zeros((3, 3) + self.image_size, ctx=self.contexts[0])
        head(net(x).as_in_context(head_ctx[0]), mx.nd.array([0, 0, 1], ctx=head_ctx[0]))
        sym = checkpoint.embedding_symbol(net)
        self.log.info('network %s: %s parameters, %.4g GFLOPs per %dx%d image', opts.network,
                      f'{parameter_count(sym, self.image_size):,}', forward_flops(sym, self.image_size) / 1e9,
                      *self.image_size)
        if opts.get('pretrained'):
            prefix, epoch = checkpoint.parse_pretrained(opts.pretrained)
            self.log.info('loading pretrained %s,%d', prefix, epoch)
            checkpoint.load_pretrained(net, head, prefix, epoch, log=self.log.info)
        for name, p in net.collect_params().items():
            p.wd_mult = wd_multiplier(name)
        if self.sample_ratio is not None:
            for p in head.collect_params().values():
                p.grad_req = 'null'   # not the Trainer's: PartialFC updates the sampled rows
        net.hybridize(static_alloc=True, static_shape=True)
        head.hybridize(static_alloc=True, static_shape=True)
        return net, head

    def _group_margin_head(self, emb_size):
        """`--group-margin GROUP=M2,...`: the preset's margin head with m2 per identity by its protected group."""
        from recognition.losses import build_group_margin_head
        opts = self.opts
        where = f'--group-margin {opts.group_margin}'
        attribute, margins = parse_group_values(opts.group_margin, where)
        members, _ = group_members(self.dataset, attribute, where)
        counts = ', '.join(f'{g} {len(ids)}' for g, ids in members.items())
        empty = [g for g in margins if not members[g]]
        if empty:
            raise UserError(f'{self.dataset.rec_paths[0]}: {where}: no identity in group {", ".join(empty)} '
                            f'(identities per group: {counts})')
        identity_m2 = {i: m2 for g, m2 in margins.items() for i in members[g]}
        head = build_group_margin_head(opts.loss, self.num_classes, emb_size, identity_m2,
                                       fc7_lr_mult=opts.fc7_lr_mult, fc7_wd_mult=opts.fc7_wd_mult,
                                       **head_kwargs(opts))
        self.log.info('%s: m2 per %s group %s (identities per group: %s); other identities m2 %g', where, attribute,
                      ', '.join('%s %g' % kv for kv in margins.items()), counts, head.m2)
        return head

    def _build_tasks(self):
        """`--center-loss-weight` and `--attr-heads` (losses.AuxiliaryTasks), or None when both are off."""
        from recognition.losses import build_auxiliary
        opts = self.opts
        emb_size = self.net(self.mx.nd.zeros((1, 3) + self.image_size, ctx=self.contexts[0])).shape[1]
        tasks = build_auxiliary(self.dataset, emb_size, float(opts.get('center_loss_weight') or 0),
                                float(opts.get('center_loss_alpha', 0.5)), opts.get('attr_heads', ''),
                                opts.get('attr_weights', ''))
        if tasks is None:
            return None
        tasks.initialize(ctx=self.contexts)
        if opts.get('pretrained'):
            checkpoint.load_extra(tasks, *checkpoint.parse_pretrained(opts.pretrained), log=self.log.info)
        for name, p in tasks.collect_params().items():
            p.wd_mult = wd_multiplier(name)
        tasks.hybridize(static_alloc=True, static_shape=True)
        self.log.info('auxiliary tasks: center loss weight %g; attribute heads %s', tasks.center_weight,
                      ', '.join('%s (%d classes, weight %g)' % (a[0], a[2], a[3]) for a in tasks.attributes) or 'none')
        return tasks

    def _build_trainer(self):
        """The Gluon Trainer of the trainable parameters; None when there are none (`--freeze-block 1` with
        `--sample-ratio`: PartialFC updates fc7 itself)."""
        mx = self.mx
        opts = self.opts
        if not self.trainable:
            return None
        optimizer_params = {'learning_rate': opts.lr, 'wd': opts.wd, 'momentum': opts.mom,
                            'multi_precision': self.amp}
        if self.topology.server_updates:
            optimizer_params['lr_scheduler'] = ServerSchedule(self.schedule)
        trainer = mx.gluon.Trainer(self.trainable, 'sgd', optimizer_params, kvstore=self.topology.kvstore,
                                   update_on_kvstore=self.topology.update_on_kvstore)
        if self.amp:
            from mxnet.contrib import amp
            amp.init_trainer(trainer)
        return trainer

    # --- state --------------------------------------------------------------------------------------
    def state(self):
        return {'step': self.step, 'epoch': self.epoch, 'batch_in_epoch': self.batch_in_epoch,
                'save_step': self.save_step, 'highest_acc': self.highest_acc, 'seed': self.seed,
                'global_batch': self.global_batch, 'num_classes': self.num_classes,
                'plateau': self.plateau.state_dict(), 'methods': self.methods, 'sample_ratio': self.sample_ratio,
                'omp_num_threads': os.environ.get('OMP_NUM_THREADS'),
                'run': {'network': self.opts.network, 'loss': self.opts.loss, 'dataset': self.opts.dataset}}

    def _resume(self):
        state = checkpoint.load_resume(self.prefix, self.params)
        if state['global_batch'] != self.global_batch:
            raise UserError(f'{checkpoint.resume_file(self.prefix)}: saved with a global batch of '
                            f'{state["global_batch"]}, this run has {self.global_batch}: resume needs the same '
                            f'--per-batch-size and number of contexts')
        if state['num_classes'] != self.num_classes:
            raise UserError(f'{checkpoint.resume_file(self.prefix)}: saved with {state["num_classes"]} classes, '
                            f'the dataset has {self.num_classes}')
        if state.get('sample_ratio') != self.sample_ratio:
            raise UserError(f'{checkpoint.resume_file(self.prefix)}: saved with --sample-ratio '
                            f'{state.get("sample_ratio") or "off"}, this run has {self.sample_ratio or "off"}: '
                            f'resume needs the same --sample-ratio (or continue with --pretrained)')
        threads = os.environ.get('OMP_NUM_THREADS')
        if 'omp_num_threads' in state and state['omp_num_threads'] != threads:
            # Warned, not refused: moving a run to another machine is legitimate (docs/reproducibility.md).
            self.log.warning('%s: saved with OMP_NUM_THREADS=%s, this run has %s: MKLDNN\'s results depend on '
                             'the thread count, so the resumed run will not be bit-identical to a straight one',
                             checkpoint.resume_file(self.prefix), state['omp_num_threads'] or 'unset',
                             threads or 'unset')
        self._resume_extra = state['extra_arrays']
        self.step = state['step']
        self.epoch = state['epoch']
        self.batch_in_epoch = state['batch_in_epoch']
        self.save_step = state['save_step']
        self.highest_acc = list(state['highest_acc'])
        self.seed = state['seed']
        if self.sampler is not None:
            self.sampler.seed = self.seed
        if state.get('methods', []) != self.methods:
            raise UserError(f'{checkpoint.resume_file(self.prefix)}: saved with the methods '
                            f'{state.get("methods", [])}, this run has {self.methods}: resume with the same '
                            f'--selected-attributes, --sampler, --group-margin and --fpr-penalty')
        self.plateau.load_state_dict(state['plateau'])
        self._join_kvstore()
        if self.trainer is not None:
            if state['states'] and not self.topology.server_updates:
                checkpoint.restore_optimizer(self.trainer, state['optimizer'], state['optimizer_arrays'],
                                             state['states'])
            # With dist_async the optimizer's update count drives the schedule on the servers (ServerSchedule);
            # it is sent there at the first step, so starting it at the resumed step resumes the schedule too.
            self.trainer.optimizer.begin_num_update = self.trainer.optimizer.num_update = self.step
        if self.topology.server_updates:
            self.log.warning('%s keeps the optimizer state on the servers, which cannot save it: the momentum '
                             'restarts', self.topology.name)
        self.log.info('resumed from %s at step %d (epoch %d, batch %d)', checkpoint.resume_file(self.prefix),
                      self.step, self.epoch, self.batch_in_epoch)

    def _join_kvstore(self):
        """Distributed runs: rank 0's weights go to the servers and every worker pulls them, before any step.

        This avoids two MXNet 1.9 pitfalls. Left to itself the Trainer does it inside the first step, where
        (updates on the workers) the weight pull and the first gradient pushpull of a key write different
        arrays, so nothing orders them on the servers. And a weight MKLDNN has re-laid out (a convolution
        weight after a forward) is pushed from a temporary the kvstore's init does not wait for, so another
        worker can pull the key before it exists ("init N first" kills the server); a plain copy is safe.
        """
        if not self.topology.distributed or self.trainer is None:
            return
        trainer = self.trainer
        # What step(global_batch) would set; dist_async sends the optimizer to the servers right here.
        trainer._optimizer.rescale_grad = trainer._scale / self.global_batch
        trainer._init_kvstore()   # MXNet 1.9 has no public way to set up a Trainer's kvstore before a step
        for param in trainer._params_to_init:
            arrays = param.list_data()
            trainer._kvstore.broadcast(trainer._param2idx[param.name], arrays[0].copy(), arrays)
        trainer._params_to_init = []
        self.mx.nd.waitall()

    def save_resume(self):
        """Snapshot for `--resume` (all parameters, optimizer, counters); chief only. Returns its path (on
        the other workers: where the chief writes it).

        Every worker first finishes its queued updates: MXNet drops pending engine work at exit, and in
        dist_sync a worker that left with its last gradients unsent would leave the chief waiting forever.
        """
        self.mx.nd.waitall()
        if not self.chief:
            return checkpoint.resume_file(self.prefix)
        if self.pfc is not None:
            self.pfc.sync_params()
        # Non-trainable parameters (frozen ones, BN statistics) are in `params` too. dist_async keeps the
        # optimizer state on the servers, which cannot save it (see kvstore.Topology.update_on_kvstore).
        trainer = None if self.topology.server_updates else self.trainer
        extra = self.pfc.momentum_arrays() if self.pfc is not None else None
        return checkpoint.save_resume(self.prefix, self.params, trainer, self.state(), extra=extra)

    # --- data ---------------------------------------------------------------------------------------
    def _batches(self, epoch, start_batch):
        """The batches of `epoch` from `start_batch` on; the order depends only on (seed, epoch)."""
        if start_batch >= self.steps_per_epoch:
            return []
        if self.loader is None and self.triplets is not None:
            from recognition.data.triplets import TripletLoader
            self.loader = TripletLoader(self.dataset, self.triplets, num_workers=self.opts.get('num_workers', 0))
        if self.loader is None:
            from recognition.data.dataset import train_loader
            self.loader = train_loader(self.dataset, self.batch_size,
                                       num_workers=self.opts.get('num_workers', 0), shuffle=True,
                                       seed=self.seed, identities=self.identities, last_batch='discard',
                                       part=self.topology.part if self.shard_samples is None else None,
                                       sampler=self.sampler)
        self.loader.set_epoch(epoch, start_batch)
        return self.loader

    # --- evaluation and checkpoints -----------------------------------------------------------------
    def embed(self, batch):
        """Embeddings of an NCHW RGB 0..255 batch, split over the contexts, inference mode."""
        mx = self.mx
        ctxs = self.contexts if batch.shape[0] >= len(self.contexts) else self.contexts[:1]
        parts = mx.gluon.utils.split_and_load(batch, ctxs, even_split=False)
        outs = [self.net(x) for x in parts]
        return np.concatenate([o.asnumpy() for o in outs], axis=0)

    def verify(self):
        """insightface's `ver_test`: Accuracy-Flip and XNorm per target; returns the accuracies."""
        from recognition.evaluation.verification import test_bin
        accs = []
        for name, data_list, issame in self.val_sets:
            r = test_bin(data_list, issame, self.embed, self.batch_size, nfolds=10)
            self.log.info('[%s][%d]XNorm: %f', name, self.step, r['xnorm'])
            self.log.info('[%s][%d]Accuracy-Flip: %1.5f+-%1.5f', name, self.step, r['acc'], r['std'])
            if self.monitor is not None:
                self.monitor.scalars(self.step, {f'val/{name}/acc': r['acc'], f'val/{name}/xnorm': r['xnorm']})
            accs.append(r['acc'])
        return accs

    def checkpoint_policy(self, accs):
        """insightface's `--ckpt`: 0 never; 1 when the last target improves (ties: sum of all targets), as
        `model-NNNN` numbered by verification round; 2 every round, numbered; 3 like 1 but always `model-0001`.
        """
        self.save_step += 1
        msave = self.save_step
        is_highest = False
        if accs:
            score = sum(accs)
            if accs[-1] >= self.highest_acc[-1]:
                if accs[-1] > self.highest_acc[-1]:
                    is_highest = True
                elif score >= self.highest_acc[0]:
                    is_highest = True
                    self.highest_acc[0] = score
                self.highest_acc[-1] = accs[-1]
        do_save = is_highest
        ckpt = int(self.opts.ckpt)
        if ckpt == 0:
            do_save = False
        elif ckpt == 2:
            do_save = True
        elif ckpt == 3:
            msave = 1
        if do_save:
            self.save_model(msave)
        if accs:
            self.log.info('[%d]Accuracy-Highest: %1.5f', self.step, self.highest_acc[-1])

    def save_model(self, epoch):
        strip = bool(self.opts.get('ckpt_embedding'))
        if self.pfc is not None and not strip:
            self.pfc.sync_params()
        path = checkpoint.save_checkpoint(self.prefix, epoch, self.net, self.head, strip_fc7=strip,
                                          extra_blocks=[self.tasks] if self.tasks is not None else [])
        checkpoint.write_latest(self.run_dir, self.prefix, epoch)
        self.last_checkpoint = (self.prefix, epoch)
        self.log.info('saving %d: %s%s', epoch, path, ' (embedding only)' if strip else '')

    # --- the loop -----------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self._stop_signal = signal.Signals(signum)

    def _stop_requested(self):
        """Stop after this step? In dist_sync the workers exchange their signals every step (StopVote), so
        all of them stop after the same one and none waits forever for another's gradients."""
        if self._stop_vote is not None:
            self._stopped_by = self._stop_vote(self._stop_signal)
        elif self._stop_signal is not None:
            self._stopped_by = {self.topology.rank: self._stop_signal}
        return bool(self._stopped_by)

    def _stop(self):
        """Save the resume snapshot and say where it is; returns the signal. In a dist job every worker
        waits for the chief's save, so all of them can name the snapshot."""
        path = self.save_resume()
        if not self.topology.distributed:
            self.log.info('%s at step %d: saved %s; continue with --resume', self._stop_signal.name, self.step,
                          path)
            return self._stop_signal
        self.topology.kvstore._barrier()   # MXNet 1.9's worker barrier has no public name
        got = ', '.join(f'{s.name} to rank {r}' for r, s in sorted(self._stopped_by.items()))
        self.log.info('%s at step %d: %s %s; continue with --resume', got, self.step,
                      'saved' if self.chief else 'the chief saved', path)
        return self._stop_signal or min(self._stopped_by.items())[1]

    def _forward_backward(self, data, label):
        mx = self.mx
        autograd = mx.autograd
        label = label.astype('float32')
        # With attribute heads the label is [identity, *attributes]; the margin head takes the identity.
        aux = self.tasks.split_labels(label, self.contexts) if self.tasks is not None else None
        xs = mx.gluon.utils.split_and_load(data, self.contexts)
        ys = mx.gluon.utils.split_and_load(label[:, 0] if label.ndim == 2 else label, self.contexts)
        losses, hits, records = [], [], []
        with autograd.record():
            embs = [self.net(x) for x in xs]
            if self.pfc is not None:
                margins, pfc_correct = self.pfc.forward(embs, ys, self.step)
            for i, (emb, y) in enumerate(zip(embs, ys)):
                if self.pfc is not None:
                    loss = margins[i]
                else:
                    loss, hit = self.loss_fn(emb, y)
                    hits.append(hit)
                if self.fpr_weight:
                    from recognition.losses import fpr_penalty   # here: see the note on imports above
                    penalty = fpr_penalty(self.head.cosine(emb), y, self.fpr_target)
                    loss = loss + self.fpr_weight * penalty
                    self._fpr_window.append(penalty.detach())
                if aux is not None:
                    loss, record = self.tasks(emb, y, aux[i], loss)
                    records.append(record)
                losses.append(loss)
            if self.amp and self.trainer is not None:
                from mxnet.contrib import amp
                with amp.scale_loss(losses, self.trainer) as scaled:
                    backward = scaled
            else:
                backward = losses
        autograd.backward(backward)
        if records:
            self.tasks.account(records)
        loss_sum = sum(float(l.sum().asscalar()) for l in losses)
        correct = pfc_correct if self.pfc is not None else sum(int(h.sum().asscalar()) for h in hits)
        return loss_sum / data.shape[0], correct

    def _finished(self):
        max_steps = int(self.opts.max_steps or 0)
        if max_steps > 0:
            return self.step >= max_steps
        return self.epoch >= int(self.opts.end_epoch)

    def run(self):
        """Train until max_steps (or end_epoch); returns a summary dict."""
        mx = self.mx
        opts = self.opts
        os.makedirs(self.run_dir, exist_ok=True)
        self.monitor = Monitor(self.log, self.global_batch, opts.frequent,
                               logdir=os.path.join(self.run_dir, 'logs') if self.chief else None,
                               total_steps=int(opts.max_steps or 0) or int(opts.end_epoch) * self.steps_per_epoch,
                               start_step=self.step,
                               show_bar=self.show_bar)
        self._stopped_by = {}
        self._stop_vote = (distributed.StopVote(self.topology.kvstore, self.topology.rank,
                                                self.topology.num_workers)
                           if self.topology.distributed and not self.topology.server_updates else None)
        # A dist job's processes announce a stop signal to the launcher and exit even when stuck.
        signals = distributed.StopSignals(self._on_signal, announce=self.topology.distributed)
        losses = []
        verify_results = []
        try:
            while not self._finished():
                for data, label in self._batches(self.epoch, self.batch_in_epoch):
                    lr = self.schedule(self.step) * self.plateau.scale
                    if not self.topology.server_updates and self.trainer is not None:
                        self.trainer.set_learning_rate(lr)
                    mx.random.seed(self.seed * 1000003 + self.step, ctx='all')
                    loss, correct = self._forward_backward(data, label)
                    if not math.isfinite(loss):
                        where = (f'{checkpoint.resume_file(self.prefix)}' if os.path.exists(
                            checkpoint.resume_file(self.prefix)) else 'none saved')
                        raise TrainingDiverged(f'step {self.step + 1}: loss is {loss} (diverged); stopped '
                                               f'before applying the update, nothing saved (last good state: '
                                               f'{where}); try a lower --lr or a warmup')
                    if self.trainer is not None:
                        self.trainer.step(self.global_batch)
                    if self.pfc is not None:
                        self.pfc.update(lr)
                    self.step += 1
                    self.batch_in_epoch += 1
                    losses.append(loss)
                    if self.plateau.observe(loss):
                        self.log.info('auto-decay: no loss decrease for %d steps, lr x%g -> %g',
                                      self.plateau.patience, self.plateau.factor,
                                      self.schedule(self.step) * self.plateau.scale)
                    logged = self.monitor.batch(self.step, self.epoch, self.batch_in_epoch, loss, correct,
                                                data.shape[0], lr)
                    if logged is not None and self.tasks is not None:
                        parts = self.tasks.window()   # the total above, split into its parts
                        self.log.info('Epoch[%d] Batch[%d] %s', self.epoch, self.batch_in_epoch,
                                      ' '.join('%s=%f' % kv for kv in parts.items()))
                        self.monitor.scalars(self.step, {'train/' + k: v for k, v in parts.items()})
                    if logged is not None and self._fpr_window:
                        value = float(np.mean([p.asscalar() for p in self._fpr_window]))
                        self._fpr_window = []
                        self.log.info('Epoch[%d] Batch[%d] fpr_penalty=%f (weight %g, in the loss)', self.epoch,
                                      self.batch_in_epoch, value, self.fpr_weight)
                        self.monitor.scalars(self.step, {'train/fpr_penalty': value})
                    if self.step % 1000 == 0:
                        self.log.info('lr-batch-epoch: %g %d %d', lr, self.batch_in_epoch, self.epoch)
                    if self.step % int(opts.verbose) == 0:
                        tic = time.time()
                        if self.chief:
                            accs = self.verify()
                            verify_results.append((self.step, accs))
                            self.checkpoint_policy(accs)
                        self.save_resume()
                        self.monitor.exclude(time.time() - tic)
                    if self._stop_requested() or self._finished():
                        break
                if self._stopped_by:
                    return self._summary(losses, verify_results, interrupted=self._stop())
                if self.batch_in_epoch >= self.steps_per_epoch:
                    self.epoch += 1
                    self.batch_in_epoch = 0
            if self.pfc is not None and not self.chief:
                self.pfc.sync_params()   # every worker ends with the trained fc7 (the chief's save syncs it)
            if self.step % int(opts.verbose) != 0:
                self.save_resume()
            latest = '%s,%d' % self.last_checkpoint if self.last_checkpoint else 'none (see --ckpt)'
            self.log.info('finished at step %d; latest checkpoint %s', self.step, latest)
        finally:
            signals.restore()
            self.monitor.close()
            self.close()
            if self.topology.distributed:
                self._leave_job()
        return self._summary(losses, verify_results)

    def _leave_job(self):
        """Dist: pass ps-lite's exit barrier now, in every worker. Left to interpreter shutdown, the KVStore's
        destructor may never run (the session sits in reference cycles): then the chief never tells the
        servers to stop and the other workers wait in the barrier for good (a job that hung after a clean
        stop, 1 run in 3 of test_faults_dist under load). The handle is then NULL, so the destructor's own
        free later is a no-op (`delete nullptr`)."""
        from mxnet.base import _LIB, KVStoreHandle, check_call
        self.mx.nd.waitall()
        kv = self.topology.kvstore
        check_call(_LIB.MXKVStoreFree(kv.handle))
        kv.handle = KVStoreHandle()

    def close(self):
        """Release the run folder's lock (`run` does when it ends; for a session that is not run)."""
        self._lock.close()

    def _summary(self, losses, verify_results, interrupted=None):
        return {'step': self.step, 'epoch': self.epoch, 'losses': losses, 'verification': verify_results,
                'checkpoint': self.last_checkpoint, 'interrupted': interrupted, 'run_dir': self.run_dir}


def train(opts, **overrides):
    """Build a session from `opts` and run it."""
    return TrainingSession(opts, **overrides).run()
