"""Checkpoints in insightface's format, `--pretrained` import, fc7 resizing and the resume snapshot.

A checkpoint is `prefix-symbol.json` + `prefix-%04d.params` (keys `arg:NAME` / `aux:NAME`), exactly what
`mx.model.save_checkpoint` writes, so insightface's deploy code (`load_checkpoint` ->
`get_internals()['fc1_output']` -> `Module(label_names=None)` -> `set_params`) and its `train.py
--pretrained` read it. The saved graph is insightface's training graph: `Group([BlockGrad(fc1),
SoftmaxOutput(fc7 logits)])` over `data` and `softmax_label`, with `fc7_weight` among the parameters
(Module.set_params ignores parameters a cut graph does not use). `strip_fc7=True` saves only the
`fc1_output` graph (insightface's `ckpt_embedding`).

The resume snapshot (`prefix-resume.json` + the parameter and optimizer files it names) holds what a
checkpoint cannot: optimizer state, step counter, schedule and data position. The json is written last
and is the commit point, so an interrupted save leaves the previous snapshot valid.
"""
import glob
import json
import os

import mxnet as mx
import numpy as np

from recognition.utils import UserError, atomic_open, atomic_path, ensure_free_space, read_json, write_json

EMBEDDING = 'fc1'
# The resume snapshot's optimizer-state format: NDArrays in `.states` plus JSON in the resume record.
OPTIMIZER_FORMAT = 'ndarray-v1'
META_KEYS = ('optimizer', 'params', 'updaters', 'num_update', 'begin_num_update', 'update_counts', 'lr', 'wd',
             'momentum', 'rescale_grad')
LABEL = 'softmax_label'


def checkpoint_files(prefix, epoch):
    return f'{prefix}-symbol.json', '%s-%04d.params' % (prefix, epoch)


def embedding_symbol(net):
    """The network's graph on `data` whose output is named `fc1_output`, as insightface's tools expect.

    PReLUs are emitted as MXNet's native `LeakyReLU` op (the models' fast formulation is for training),
    so the graph is op-for-op insightface's and every converter knows it.
    """
    from recognition.models.layers import native_prelu   # here: recognition.models imports this module
    with native_prelu(net):
        out = net(mx.sym.var('data'))
    if isinstance(out, (list, tuple)):
        out = out[0]
    if out.name != EMBEDDING:
        out = mx.sym.identity(out, name=EMBEDDING)
    return out


def training_symbol(net, head, extra_blocks=()):
    """insightface's training graph: the embedding (BlockGrad) and SoftmaxOutput over the head's logits,
    plus the outputs of auxiliary blocks that have some (attribute heads: `attr_<name>_output`)."""
    emb = embedding_symbol(net)
    label = mx.sym.var(LABEL)   # one node: two variables of the same name would not bind
    logits = head(emb, label)
    if isinstance(logits, (list, tuple)):
        logits = logits[0]
    softmax = mx.sym.SoftmaxOutput(logits, label, name='softmax', normalization='valid')
    return mx.sym.Group([mx.sym.BlockGrad(emb), softmax] + extra_outputs(emb, extra_blocks))


def extra_outputs(emb, extra_blocks):
    """Graph outputs of the auxiliary blocks on the embedding symbol (blocks with `output_symbols`)."""
    return [out for block in extra_blocks if hasattr(block, 'output_symbols') for out in block.output_symbols(emb)]


def _first_array(param):
    return param.list_data()[0].astype('float32').copyto(mx.cpu())


def collect_arrays(blocks):
    """name -> float32 CPU NDArray for every parameter of `blocks` (None entries skipped)."""
    out = {}
    for block in blocks:
        if block is None:
            continue
        for name, param in block.collect_params().items():
            out[name] = _first_array(param)
    return out


def save_checkpoint(prefix, epoch, net, head=None, strip_fc7=False, extra_blocks=()):
    """Write `prefix-symbol.json` and `prefix-%04d.params` atomically; return the params path.

    Without a head (or one without parameters), or with `strip_fc7`, the graph is the `fc1_output` embedding and only its parameters
    are saved. Otherwise the training graph is saved with `fc7_weight` and the parameters of
    `extra_blocks` (auxiliary heads) as additional `arg:` entries. Either way the outputs of extra blocks
    that have some (attribute heads) stay in the graph beside `fc1_output`, with their parameters.
    """
    # A head without parameters (the pair-wise losses) has no fc7 to keep: the embedding graph.
    full = head is not None and not strip_fc7 and bool(list(head.collect_params().keys()))
    if full:
        sym = training_symbol(net, head, extra_blocks)
    else:
        emb = embedding_symbol(net)
        outputs = extra_outputs(emb, extra_blocks)
        sym = mx.sym.Group([emb] + outputs) if outputs else emb
    arrays = collect_arrays([net] + ([head] + list(extra_blocks) if full else list(extra_blocks)))
    aux_names = set(sym.list_auxiliary_states())
    graph_args = set(sym.list_arguments())
    save = {}
    for name, arr in arrays.items():
        if name in aux_names:
            save['aux:' + name] = arr
        elif name in graph_args or full:
            save['arg:' + name] = arr
    missing = [n for n in graph_args | aux_names if n not in arrays and n not in ('data', LABEL)]
    if missing:
        raise RuntimeError(f'graph inputs without parameters: {sorted(missing)[:5]}')
    sym_path, params_path = checkpoint_files(prefix, epoch)
    ensure_free_space(params_path, _nbytes(save))
    with atomic_path(params_path) as tmp:
        mx.nd.save(tmp, save)
        with atomic_path(sym_path) as tmp_sym:
            sym.save(tmp_sym)
    return params_path


def prelu_slopes(sym, image_size):
    """{slope parameter: rank of the PReLU's input} of every `LeakyReLU(prelu)` of `sym` at `image_size`
    (None where MXNet cannot tell)."""
    internals = sym.get_internals()
    shapes = dict(zip(internals.list_outputs(),
                      internals.infer_shape_partial(data=(1, 3) + tuple(image_size))[1]))
    nodes = json.loads(sym.tojson())['nodes']
    slopes = {}
    for node in nodes:
        if node['op'] == 'LeakyReLU' and node.get('attrs', {}).get('act_type') == 'prelu' and len(node['inputs']) == 2:
            source, slope = nodes[node['inputs'][0][0]], nodes[node['inputs'][1][0]]
            shape = shapes.get(source['name'] if source['op'] == 'null' else source['name'] + '_output')
            slopes[slope['name']] = len(shape) if shape else None
    return slopes


def mxnet_reason(error):
    """The line of an MXNet error that says what failed (its message starts with a C++ traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(('Traceback', 'File "'))] or [type(error).__name__]
    return lines[0].replace('MXNetError: ', '')


def load_checkpoint(prefix, epoch):
    """`mx.model.load_checkpoint` with one-line errors naming the missing or unreadable file."""
    sym_path, params_path = checkpoint_files(prefix, epoch)
    for path in (sym_path, params_path):
        if not os.path.isfile(path):
            raise UserError(f'{path}: checkpoint file not found')
    sym = load_symbol(sym_path)
    arrays = _load_arrays(params_path, 'parameter file')
    arg = {k[4:]: v for k, v in arrays.items() if k.startswith('arg:')}
    aux = {k[4:]: v for k, v in arrays.items() if k.startswith('aux:')}
    if not arg and not aux:
        raise UserError(f'{params_path}: no arg:/aux: parameters in the file (not a checkpoint)')
    return sym, arg, aux


def load_symbol(path):
    """`mx.sym.load` with a one-line error naming `path`. The JSON is parsed here first: MXNet's reader
    reports a truncated file as a UnicodeDecodeError."""
    if not os.path.isfile(path):
        raise UserError(f'{path}: checkpoint file not found')
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
        json.loads(text)
        return mx.sym.load_json(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f'{path}: not a valid symbol file (broken JSON: {e})') from None
    except mx.base.MXNetError as e:
        raise UserError(f'{path}: not a valid symbol file ({mxnet_reason(e)})') from None


def _load_arrays(path, what):
    """name -> NDArray of an `mx.nd.save` file; a truncated or foreign file is a one-line error."""
    try:
        arrays = mx.nd.load(path)
    except mx.base.MXNetError as e:
        raise UserError(f'{path}: not a valid {what} ({mxnet_reason(e)}; truncated or not written by '
                        f'MXNet)') from None
    if arrays == []:   # what mx.nd.save writes for an empty dict (an optimizer before its first step)
        return {}
    if not isinstance(arrays, dict):
        raise UserError(f'{path}: not a valid {what} (arrays without names)')
    return arrays


def parse_pretrained(ref, option='--pretrained', several=False):
    """insightface's `prefix,epoch` -> (prefix, epoch): the one parser of model references (`--pretrained`,
    `--model`, `latest` pointers). several=True also takes `prefix,epoch1|epoch2...` (test/verification.py)
    and returns (prefix, [epochs]). `option` names the argument in the one-line error."""
    prefix, sep, tail = ref.rpartition(',')
    epochs = tail.split('|') if several else [tail]
    if not sep or not prefix or not all(e.strip().isdigit() for e in epochs):
        form = 'prefix,epoch[|epoch2...]' if several else 'prefix,epoch'
        raise UserError(f'{option} {ref!r}: expected {form} (e.g. models/r100-arcface-emore/model,1)')
    epochs = [int(e) for e in epochs]
    return (prefix, epochs) if several else (prefix, epochs[0])


def load_pretrained(net, head, prefix, epoch, log=print):
    """Load a checkpoint (ours or insightface's, same names) into an initialised net and head.

    Every network parameter must be present with the same shape, else UserError naming the first one that
    is missing or mismatched, and nothing is loaded. Head parameters (`fc7_weight`, ...) are loaded when the
    shape fits; when the class count differs, or the checkpoint has no fc7 (embedding-only release), they
    keep their fresh initialisation and a log line says so. Returns a summary dict.
    """
    _, arg, aux = load_checkpoint(prefix, epoch)
    source = {**arg, **aux}
    where = checkpoint_files(prefix, epoch)[1]
    body = net.collect_params()
    for name, param in body.items():
        if name not in source:
            raise UserError(f'{where}: has no parameter {name}: --pretrained must come from the same network')
        if tuple(source[name].shape) != tuple(param.shape):
            raise UserError(f'{where}: parameter {name} has shape {tuple(source[name].shape)}, the network '
                            f'needs {tuple(param.shape)}: --pretrained must come from the same network')
    for name, param in body.items():
        param.set_data(source[name])
    summary = {'loaded': len(list(body.keys())), 'reinitialised': []}
    if head is not None:
        for name, param in head.collect_params().items():
            if name in source and tuple(source[name].shape) == tuple(param.shape):
                param.set_data(source[name])
                summary['loaded'] += 1
            elif name in source:
                log(f'{name}: checkpoint has shape {tuple(source[name].shape)}, this run needs '
                    f'{tuple(param.shape)} (class count differs): re-initialised')
                summary['reinitialised'].append(name)
            else:
                log(f'{name}: not in the checkpoint (embedding-only model): initialised')
                summary['reinitialised'].append(name)
    log(f'loaded {summary["loaded"]} parameters from {where}')
    return summary


def load_extra(block, prefix, epoch, log=print):
    """Auxiliary parameters (attribute heads, centers) from a checkpoint where present with the same
    shape, so a finetune keeps what the previous step learnt; the others keep their initialisation."""
    _, arg, aux = load_checkpoint(prefix, epoch)
    source = {**arg, **aux}
    params = dict(block.collect_params().items())
    loaded = [n for n, p in params.items() if n in source and tuple(source[n].shape) == tuple(p.shape)]
    for name in loaded:
        params[name].set_data(source[name])
    log(f'auxiliary tasks: {len(loaded)} of {len(params)} parameters loaded from '
        f'{checkpoint_files(prefix, epoch)[1]}')
    return loaded


def write_latest(run_dir, prefix, epoch):
    """The `latest` pointer (`prefix,epoch`, absolute prefix) the finetune scripts read."""
    with atomic_open(os.path.join(run_dir, 'latest')) as f:
        f.write('%s,%d\n' % (os.path.abspath(prefix), epoch))


def read_latest(run_dir):
    """`(prefix, epoch)` from a run folder's `latest` pointer."""
    path = os.path.join(run_dir, 'latest')
    if not os.path.isfile(path):
        raise UserError(f'{path}: no latest pointer (has this run saved a checkpoint?)')
    with open(path) as f:
        return parse_pretrained(f.read().strip())


def resume_file(prefix):
    return f'{prefix}-resume.json'


def _updaters(trainer):
    """The Updaters holding the trainer's optimizer state: the kvstore's when the kvstore updates (local
    multi-device), else Gluon's one per context (also where dist_sync workers update)."""
    if not trainer._kv_initialized:   # MXNet 1.9 has no public access to a Trainer's updaters
        trainer._init_kvstore()
    if trainer._params_to_init:
        trainer._init_params()
    return [trainer._kvstore._updater] if trainer._update_on_kvstore else trainer._updaters


def _encode_state(state, key, arrays):
    """An updater state (None, NDArray or nested tuple) as JSON naming arrays stored in `arrays`."""
    if state is None:
        return None
    if isinstance(state, mx.nd.NDArray):
        arrays[key] = state.copyto(mx.cpu())
        return key
    if isinstance(state, (tuple, list)):
        return [_encode_state(part, f'{key}.{j}', arrays) for j, part in enumerate(state)]
    raise TypeError(f'optimizer state of type {type(state).__name__} cannot be saved without pickle')


def _decode_state(layout, arrays):
    if layout is None:
        return None
    if isinstance(layout, str):
        return arrays[layout]
    return tuple(_decode_state(part, arrays) for part in layout)


def optimizer_state(trainer):
    """(arrays, meta): the Trainer's optimizer state as NDArrays (`mx.nd.save`) and JSON scalars.

    MXNet's own `Trainer.save_states` pickles the optimizer, and loading a pickle runs whatever code the
    file names; this format holds only numbers. Every updater's states are kept (one per device).
    """
    opt = trainer._optimizer
    arrays = {}
    updaters = [[[idx, _encode_state(st, f'{u}:{idx}', arrays)] for idx, st in sorted(upd.states.items())]
                for u, upd in enumerate(_updaters(trainer))]
    meta = {'format': OPTIMIZER_FORMAT, 'optimizer': type(opt).__name__,
            'params': [p.name for p in trainer._params], 'updaters': updaters,
            'num_update': opt.num_update, 'begin_num_update': opt.begin_num_update,
            'update_counts': [[dev, sorted(counts.items())] for dev, counts in opt._all_index_update_counts.items()],
            'lr': opt.lr, 'wd': opt.wd, 'momentum': getattr(opt, 'momentum', None),
            'rescale_grad': opt.rescale_grad}
    return arrays, meta


def restore_optimizer(trainer, meta, arrays, where):
    """Put a state saved by `optimizer_state` back into `trainer` (exactly: a resumed run repeats a
    straight one), with the snapshot's lr, wd and momentum as MXNet's `load_states` did. A run with
    another device count gets device 0's state on every device: the devices hold identical copies.
    `where` names the file in errors."""
    opt = trainer._optimizer
    names = [p.name for p in trainer._params]
    if meta['optimizer'] != type(opt).__name__:
        raise UserError(f'{where}: optimizer state of {meta["optimizer"]}, this run uses {type(opt).__name__}')
    if meta['params'] != names:
        differ = sorted(set(meta['params']) ^ set(names)) or ['their order']
        raise UserError(f'{where}: saved for other trainable parameters ({len(meta["params"])} there, '
                        f'{len(names)} here; {differ[0]} differs): resume needs the same network and '
                        f'--freeze-block')
    updaters = _updaters(trainer)
    saved = meta['updaters']
    for u, upd in enumerate(updaters):
        mine = saved[u] if len(saved) == len(updaters) else saved[0]
        upd.states = {idx: _decode_state(layout, arrays) for idx, layout in mine}
        # The updater moves each state to its weight's device at its first update (as set_states does).
        upd.states_synced = dict.fromkeys(upd.states, False)
    opt.num_update, opt.begin_num_update = meta['num_update'], meta['begin_num_update']
    opt._all_index_update_counts = {dev: dict(counts) for dev, counts in meta['update_counts']}
    opt._index_update_count = opt._all_index_update_counts.setdefault(0, {})
    opt.lr, opt.wd, opt.rescale_grad = meta['lr'], meta['wd'], meta['rescale_grad']
    if meta['momentum'] is not None:
        opt.momentum = meta['momentum']


def _remove_if_present(path):
    """Prune an old snapshot file; another process may have removed it already."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def save_resume(prefix, params, trainer, state, extra=None):
    """Snapshot parameters (name -> Parameter), optimizer state and `state` (json-able) for `--resume`;
    `extra` (name -> NDArray) is kept beside the parameters (Partial FC's fc7 momentum).

    `trainer=None` snapshots no optimizer state (dist_async: it lives on the servers, which cannot save
    it); resuming then restarts the momentum. The free space is checked first, so a full disk stops the
    run with the previous snapshot whole.
    """
    step = int(state['step'])
    base = '%s-resume-%08d' % (prefix, step)
    arrays = {name: _first_array(p) for name, p in params.items()}
    arrays.update(extra or {})
    opt_arrays, opt_meta = optimizer_state(trainer) if trainer is not None else ({}, None)
    ensure_free_space(base + '.params', _nbytes(arrays) + _nbytes(opt_arrays))
    files = {base + '.params': arrays, **({base + '.states': opt_arrays} if trainer is not None else {})}
    # A failed save removes the files it added, so no orphan stays beside the previous snapshot.
    added = [path for path in files if not os.path.exists(path)]
    try:
        for path, content in files.items():
            with atomic_path(path) as tmp:
                mx.nd.save(tmp, content)
        record = dict(state, params=os.path.basename(base + '.params'),
                      states=os.path.basename(base + '.states') if trainer is not None else None,
                      optimizer=opt_meta)
        write_json(resume_file(prefix), record)
    except BaseException:
        for path in added:
            _remove_if_present(path)
        raise
    keep = {base + '.params', base + '.states'}
    for old in glob.glob(glob.escape(prefix) + '-resume-*.*'):
        if old not in keep and old.endswith(('.params', '.states')):
            _remove_if_present(old)
    return resume_file(prefix)


def load_resume(prefix, params):
    """Restore the parameters of a snapshot written by `save_resume` into `params`; return its state dict,
    with `states` the path of the optimizer state (None when the run saved none) and `optimizer_arrays`
    its arrays (for `restore_optimizer(trainer, state['optimizer'], ...)`) and `extra_arrays` the arrays
    saved beside the parameters (`save_resume`'s `extra`).

    Only NDArray files and JSON are read: a pickled optimizer state (MXNet's `Trainer.save_states`, which
    earlier versions wrote) is refused, since unpickling a file runs whatever code it names.
    """
    path = resume_file(prefix)
    if not os.path.isfile(path):
        raise UserError(f'{path}: nothing to resume (no resume state in this run folder)')
    state = read_json(path, 'nothing to resume (no resume state in this run folder)')
    folder = os.path.dirname(os.path.abspath(path))
    try:
        params_path = os.path.join(folder, state['params'])
        states = os.path.join(folder, state['states']) if state['states'] else None
        meta = state.get('optimizer')
    except (KeyError, TypeError) as e:
        raise UserError(f'{path}: unreadable resume state (no {e})') from None
    if states is not None and not os.path.isfile(states):
        raise UserError(f'{states}: optimizer state named by {path} is missing')
    if states is not None and (not isinstance(meta, dict) or meta.get('format') != OPTIMIZER_FORMAT):
        raise UserError(f'{states}: optimizer state in an old or unknown format (MXNet\'s pickled '
                        f'save_states?), which --resume refuses since loading a pickle can run code; continue '
                        f'from the run\'s checkpoint with --pretrained instead')
    if not os.path.isfile(params_path):
        raise UserError(f'{params_path}: parameters named by {path} are missing')
    arrays = _load_arrays(params_path, 'resume parameter file')
    opt_arrays = None
    if states is not None:
        with open(states, 'rb') as f:
            if f.read(1) == b'\x80':
                raise UserError(f'{states}: a pickle, which --resume refuses to load (unpickling can run code)')
        opt_arrays = _load_arrays(states, 'optimizer state')
        try:
            needed = {key for layouts in meta['updaters'] for _, layout in layouts for key in _state_keys(layout)}
            missing_keys = [k for k in META_KEYS if k not in meta]
        except (KeyError, TypeError, ValueError):
            missing_keys = ['updaters']
        if missing_keys:
            raise UserError(f'{path}: malformed "optimizer" record (no valid {missing_keys[0]})')
        if needed - set(opt_arrays):
            raise UserError(f'{states}: lacks the array {sorted(needed - set(opt_arrays))[0]} that {path} names '
                            f'(truncated or from another snapshot)')
    missing = [n for n in params if n not in arrays]
    if missing:
        raise UserError(f'{path}: the run being resumed has no parameter {missing[0]} (different network?)')
    for name, param in params.items():
        if tuple(arrays[name].shape) != tuple(param.shape):
            raise UserError(f'{path}: parameter {name} has shape {tuple(arrays[name].shape)}, '
                            f'this run needs {tuple(param.shape)}')
    for name, param in params.items():
        param.set_data(arrays[name])
    extra = {n: a for n, a in arrays.items() if n not in params}
    return dict(state, states=states, optimizer_arrays=opt_arrays, extra_arrays=extra)


def _nbytes(arrays):
    """Bytes `mx.nd.save` needs for `arrays` (data, and a bound on each array's name and shape header)."""
    return sum(a.size * np.dtype(a.dtype).itemsize + 256 for a in arrays.values())


def _state_keys(layout):
    if layout is None:
        return []
    if isinstance(layout, str):
        return [layout]
    return [key for part in layout for key in _state_keys(part)]
