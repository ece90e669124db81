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

from .utils import UserError, atomic_open, atomic_path, write_json

EMBEDDING = 'fc1'
LABEL = 'softmax_label'


def checkpoint_files(prefix, epoch):
    return f'{prefix}-symbol.json', '%s-%04d.params' % (prefix, epoch)


def embedding_symbol(net):
    """The network's graph on `data` whose output is named `fc1_output`, as insightface's tools expect.

    PReLUs are emitted as MXNet's native `LeakyReLU` op (the models' fast formulation is for training),
    so the graph is op-for-op insightface's and every converter knows it.
    """
    from .models import native_prelu
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

    Without a head, or with `strip_fc7`, the graph is the `fc1_output` embedding and only its parameters
    are saved. Otherwise the training graph is saved with `fc7_weight` and the parameters of
    `extra_blocks` (auxiliary heads) as additional `arg:` entries. Either way the outputs of extra blocks
    that have some (attribute heads) stay in the graph beside `fc1_output`, with their parameters.
    """
    full = head is not None and not strip_fc7
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
    with atomic_path(params_path) as tmp:
        mx.nd.save(tmp, save)
        with atomic_path(sym_path) as tmp_sym:
            sym.save(tmp_sym)
    return params_path


def load_checkpoint(prefix, epoch):
    """`mx.model.load_checkpoint` with one-line errors for missing or unreadable files."""
    sym_path, params_path = checkpoint_files(prefix, epoch)
    for path in (sym_path, params_path):
        if not os.path.isfile(path):
            raise UserError(f'{path}: checkpoint file not found')
    try:
        return mx.model.load_checkpoint(prefix, epoch)
    except mx.base.MXNetError as e:
        raise UserError(f'{params_path}: cannot read checkpoint ({str(e).splitlines()[0]})') from None


def parse_pretrained(ref):
    """`prefix,epoch` -> (prefix, epoch)."""
    prefix, sep, epoch = ref.rpartition(',')
    if not sep or not prefix or not epoch.strip().isdigit():
        raise UserError(f'--pretrained {ref!r}: expected prefix,epoch (e.g. models/r100-arcface-emore/model,1)')
    return prefix, int(epoch)


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


def save_resume(prefix, params, trainer, state):
    """Snapshot parameters (name -> Parameter), optimizer state and `state` (json-able) for `--resume`.

    `trainer=None` snapshots no optimizer state (dist_async: it lives on the servers, which cannot save
    it); resuming then restarts the momentum.
    """
    step = int(state['step'])
    base = '%s-resume-%08d' % (prefix, step)
    with atomic_path(base + '.params') as tmp:
        mx.nd.save(tmp, {name: _first_array(p) for name, p in params.items()})
    if trainer is not None:
        with atomic_path(base + '.states') as tmp:
            trainer.save_states(tmp)
    record = dict(state, params=os.path.basename(base + '.params'),
                  states=os.path.basename(base + '.states') if trainer is not None else None)
    write_json(resume_file(prefix), record)
    keep = {base + '.params', base + '.states'}
    for old in glob.glob(glob.escape(prefix) + '-resume-*.*'):
        if old not in keep and old.endswith(('.params', '.states')):
            os.remove(old)
    return resume_file(prefix)


def load_resume(prefix, params):
    """Restore the parameters of a snapshot written by `save_resume` into `params`; return its state dict,
    with `states` the path of the optimizer state to load (None when the run saved none)."""
    path = resume_file(prefix)
    if not os.path.isfile(path):
        raise UserError(f'{path}: nothing to resume (no resume state in this run folder)')
    try:
        with open(path) as f:
            state = json.load(f)
        folder = os.path.dirname(os.path.abspath(path))
        arrays = mx.nd.load(os.path.join(folder, state['params']))
        states = os.path.join(folder, state['states']) if state['states'] else None
    except (OSError, ValueError, KeyError, mx.base.MXNetError) as e:
        raise UserError(f'{path}: unreadable resume state ({e})') from None
    missing = [n for n in params if n not in arrays]
    if missing:
        raise UserError(f'{path}: the run being resumed has no parameter {missing[0]} (different network?)')
    for name, param in params.items():
        if tuple(arrays[name].shape) != tuple(param.shape):
            raise UserError(f'{path}: parameter {name} has shape {tuple(arrays[name].shape)}, '
                            f'this run needs {tuple(param.shape)}')
    if states is not None and not os.path.isfile(states):
        raise UserError(f'{states}: optimizer state named by {path} is missing')
    for name, param in params.items():
        param.set_data(arrays[name])
    return dict(state, states=states)
