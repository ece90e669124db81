"""The model folder of the evaluation harness (`final_eval_models/<name>/`): its checkpoint and `model.json`
(prefix, epoch, layer, colour order, input scale, the bias-mitigation methods), read, written and installed
from a training run. The one home of that format; `inference` loads the model a folder describes.

`checkpoint` (which imports mxnet, about 2 s) is imported inside the functions that need it: the evaluator and
the report read model folders without a model.
"""
import json
import os
import shutil

from recognition.utils import UserError, is_disk_full, no_space_error, read_json

INPUT_SCALES = ('raw', 'normalized', 'unit')
MODEL_JSON_KEYS = {'prefix', 'epoch', 'layer', 'color', 'input_scale', 'methods'}
MODEL_FOLDER_PREFIX = 'model'


def read_model_json(path):
    """The validated `model.json` of a model folder, with defaults filled in."""
    meta_path = os.path.join(path, 'model.json')
    meta = read_json(meta_path, 'not found (a model folder needs model.json)')
    unknown = set(meta) - MODEL_JSON_KEYS
    if unknown:
        raise UserError(f'{meta_path}: unknown keys {sorted(unknown)} (allowed: {sorted(MODEL_JSON_KEYS)})')
    meta = {'prefix': 'model', 'layer': 'fc1_output', 'color': 'rgb', 'input_scale': 'raw', **meta}
    if 'epoch' not in meta or not isinstance(meta['epoch'], int):
        raise UserError(f'{meta_path}: "epoch" must be an integer')
    if meta['color'] not in ('rgb', 'bgr'):
        raise UserError(f'{meta_path}: "color" must be "rgb" or "bgr"')
    if meta['input_scale'] not in INPUT_SCALES:
        raise UserError(f'{meta_path}: "input_scale" must be one of {INPUT_SCALES}')
    if not isinstance(meta.get('methods', []), list) or not all(isinstance(m, str) for m in meta.get('methods', [])):
        raise UserError(f'{meta_path}: "methods" must be a list of strings')
    return meta


def write_model_json(folder, epoch, methods=()):
    """The `model.json` of a model folder holding our checkpoint `model-NNNN` (fc1_output, RGB, raw input),
    with the bias-mitigation `methods` its run trained with when there are any."""
    meta = {'prefix': MODEL_FOLDER_PREFIX, 'epoch': int(epoch), 'layer': 'fc1_output', 'color': 'rgb',
            'input_scale': 'raw'}
    if methods:
        meta['methods'] = list(methods)
    with open(os.path.join(folder, 'model.json'), 'w') as f:
        f.write(json.dumps(meta) + '\n')


def model_methods(model):
    """The bias-mitigation methods that produced `model` (a model folder or `prefix,epoch`): the folder's
    `model.json` "methods", or those its training run recorded in `prefix-resume.json`; [] when none."""
    from recognition.checkpoint import parse_pretrained, resume_file
    if os.path.isfile(os.path.join(str(model), 'model.json')):
        return read_model_json(str(model)).get('methods', [])
    path = resume_file(parse_pretrained(model)[0])
    if not os.path.isfile(path):
        return []
    methods = read_json(path, 'unreadable resume state').get('methods', [])
    return [str(m) for m in methods] if isinstance(methods, list) else []


def install_model(run_dir, name, final_dir):
    """Copy the checkpoint `run_dir/latest` points to into the model folder `final_dir/name`
    (model-symbol.json, model-NNNN.params, model.json). Returns (folder, prefix, epoch).

    The folder is built as `final_dir/.name.tmp` (model.json last) and swapped in, the previous one moved
    to `name.old` and removed after: the harness finds a whole model under `name` or, after a crash
    mid-swap, none (never half of one).
    """
    from recognition.checkpoint import checkpoint_files, read_latest
    if not name or name != os.path.basename(name) or name.startswith('.'):
        raise UserError(f'{name!r}: a model name is one folder name, not starting with a dot')
    prefix, epoch = read_latest(run_dir)
    symbol, params = checkpoint_files(prefix, epoch)
    for path in (symbol, params):
        if not os.path.isfile(path):
            raise UserError(f'{path}: checkpoint file not found (named by {os.path.join(run_dir, "latest")})')
    dest = os.path.join(final_dir, name)
    tmp, old = os.path.join(final_dir, f'.{name}.tmp'), dest + '.old'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for source, target in zip((symbol, params), checkpoint_files(os.path.join(tmp, MODEL_FOLDER_PREFIX), epoch)):
            shutil.copyfile(source, target)
        write_model_json(tmp, epoch, model_methods(f'{prefix},{epoch}'))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise no_space_error(dest, os.path.getsize(symbol) + os.path.getsize(params)) from None
        raise
    shutil.rmtree(old, ignore_errors=True)
    if os.path.lexists(dest):
        os.rename(dest, old)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest, prefix, epoch


def model_dir_spec(path):
    """`load_embedder`'s model arguments (prefix, epoch, layer, bgr, input_scale, name) of a model folder."""
    meta = read_model_json(path)
    return dict(prefix=os.path.join(path, meta['prefix']), epoch=meta['epoch'], layer=meta['layer'],
                bgr=meta['color'] == 'bgr', input_scale=meta['input_scale'],
                name=os.path.basename(os.path.normpath(path)))


def model_json_settings(prefix):
    """(layer, bgr, input_scale) from the `model.json` beside checkpoint `prefix` when it names that prefix
    (a model folder's checkpoint given as `prefix,epoch`), else fc1_output, RGB, raw."""
    folder = os.path.dirname(os.path.abspath(prefix))
    if os.path.isfile(os.path.join(folder, 'model.json')):
        meta = read_model_json(folder)
        if meta['prefix'] == os.path.basename(prefix):
            return meta['layer'], meta['color'] == 'bgr', meta['input_scale']
    return 'fc1_output', False, 'raw'


def model_spec(ref):
    """`load_embedder`'s model arguments for a model folder or one `prefix,epoch` (its folder's model.json
    when that names the prefix, else fc1_output, RGB, raw)."""
    from recognition.checkpoint import parse_pretrained
    if os.path.isdir(ref):
        return model_dir_spec(ref)
    prefix, epochs = parse_pretrained(ref, '--model', several=True)
    if len(epochs) != 1:
        raise UserError(f'--model {ref!r}: give one epoch')
    layer, bgr, input_scale = model_json_settings(prefix)
    return dict(prefix=prefix, epoch=epochs[0], layer=layer, bgr=bgr, input_scale=input_scale,
                name=f'{os.path.basename(prefix)},{epochs[0]}')


def find_model_dirs(spec):
    """Model folders from `final_eval_models` (every sub-folder with model.json) or `dir1,dir2,...`."""
    found = []
    for part in [p for p in spec.split(',') if p]:
        if os.path.isfile(os.path.join(part, 'model.json')):
            found.append(part)
        elif os.path.isdir(part):
            subs = sorted(os.path.join(part, d) for d in os.listdir(part)
                          if os.path.isfile(os.path.join(part, d, 'model.json')))
            if not subs:
                raise UserError(f'{part}: no model folders (sub-folders with model.json) inside')
            found.extend(subs)
        else:
            raise UserError(f'{part}: model folder not found')
    if not found:
        raise UserError(f'--models {spec!r}: no model folders given')
    return found
