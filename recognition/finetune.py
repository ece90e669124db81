"""The FairFace finetune chain's library: protected-group selection, hard-sample mining, the step table.

The seed's chain (step 1 fc7 only, step 2 all layers, step 3 the most discriminated protected group at a
lower lr; and a hard-sample branch from the pretrained model) is run by `shell/*.sh` through thin CLIs
over this module:

- `select_identities` resolves `--selected-attributes` (a group name, `attr=value` pairs, the seed's
  4-way index, or `auto[:file]`, the choice of `train/select_protected_group.py`) to identity ids of a rec.
- `evaluate_checkpoint` scores a checkpoint on FairFace-style validation pairs and measures bias;
  `choose_group` turns that into the step-3 choice; `append_chain_row` keeps every step's numbers and
  scores, and its changes against the previous step and the pretrained model with paired intervals.
- `mine_hard_samples` runs a checkpoint's fc7 classifier over a training rec, keeps the identities with
  a misclassified image and writes them (raw bytes and attributes) as a new rec, .lst and report.
"""
import hashlib
import json
import os

import numpy as np

from .evaluation.bootstrap import REPLICATES, compare
from .evaluation.fairness import (GROUP_CODES, evaluate_pairs, evaluate_predictions, group_badness, load_pairs,
                                  worst_group)
from .utils import UserError, atomic_open, read_json, write_json

# The protected attributes of the rec labels (architecture: GENDER 0 female / 1 male, SKIN_COLOUR 0 light /
# 1 dark), found by case-insensitive name so `gender` (emore recs) and `GENDER` (csv columns) both match.
GENDER, SKIN = 'gender', 'skin_colour'
NAME_ALIASES = {'skin': SKIN, 'skin_color': SKIN, 'sex': GENDER}
GROUP_FILE = 'protected_group.json'
GROUP_ATTRIBUTE = 'gender_skin'


# --- protected groups ---------------------------------------------------------------------------------
def _rec_name(name, attribute_names, where):
    """The rec's own spelling of attribute `name` (case-insensitive, with aliases)."""
    key = name.strip().lower()
    key = NAME_ALIASES.get(key, key)
    for have in attribute_names:
        if have.lower() == key:
            return have
    raise UserError(f'{where}: no attribute {name!r} in the rec labels (have {list(attribute_names)})')


def _code(rec_name, value, attribute_codes, where):
    """Integer code of `value` (a number or its meaning in the sidecar) for attribute `rec_name`."""
    value = str(value).strip()
    if value.lstrip('-').isdigit():
        return int(value)
    meanings = {m.lower(): c for c, m in attribute_codes.get(rec_name, {}).items()}
    if value.lower() not in meanings:
        raise UserError(f'{where}: {rec_name} has no value {value!r} (have {sorted(meanings)})')
    return meanings[value.lower()]


def parse_group(spec, attribute_names, attribute_codes, where='--selected-attributes'):
    """`--selected-attributes` -> {rec attribute name: code}.

    Accepted: a group name of `fairness.GROUP_CODES` (`dark_female`, `female`, `dark`, ...; `dark female`
    and `dark-female` too); `attr=value[,attr=value]` with codes or sidecar meanings (`gender=0,skin_colour=1`,
    `gender=female,skin=dark`); or the seed's 4-way integer `gender*2 + skin_colour` computed on this
    project's codes (0 light_female, 1 dark_female, 2 light_male, 3 dark_male; the seed's unpublished rec
    encoded its attributes differently, where 3 was dark female).
    """
    text = str(spec).strip()
    if not text:
        raise UserError(f'{where}: empty group')
    if text.isdigit():
        index = int(text)
        if index > 3:
            raise UserError(f'{where}: the 4-way index gender*2+skin_colour is 0..3, got {index}')
        pairs = [(GENDER, index // 2), (SKIN, index % 2)]
    elif '=' in text:
        pairs = []
        for part in text.split(','):
            name, sep, value = part.partition('=')
            if not sep or not name.strip() or not value.strip():
                raise UserError(f'{where}: expected attr=value[,attr=value], got {text!r}')
            pairs.append((name, value))
    else:
        key = text.lower().replace(' ', '_').replace('-', '_')
        if key not in GROUP_CODES:
            raise UserError(f'{where}: unknown group {text!r} (a name of {sorted(GROUP_CODES)}, '
                            f'attr=value pairs, or 0..3 = gender*2+skin_colour)')
        pairs = list(GROUP_CODES[key].items())
    out = {}
    for name, value in pairs:
        rec_name = _rec_name(name, attribute_names, where)
        out[rec_name] = value if isinstance(value, int) else _code(rec_name, value, attribute_codes, where)
    return out


def describe_group(conditions, attribute_codes):
    """`gender=female(0), skin_colour=dark(1)` for log lines and reports."""
    parts = []
    for name, code in conditions.items():
        meaning = attribute_codes.get(name, {}).get(int(code))
        parts.append(f'{name}={meaning}({code})' if meaning else f'{name}={code}')
    return ', '.join(parts)


def read_group_choice(path):
    """The group name chosen by `select_protected_group` (its JSON `group` field)."""
    doc = read_json(path, 'no protected-group choice (run train/select_protected_group.py first)')
    if not isinstance(doc.get('group'), str):
        raise UserError(f'{path}: expected a JSON object with a "group" name')
    return doc['group']


def resolve_group_spec(spec, models_root='.'):
    """`auto` -> the group in `<models_root>/protected_group.json`; `auto:PATH` -> the one in PATH."""
    text = str(spec).strip()
    if text == 'auto' or text.startswith('auto:'):
        path = text[5:] or os.path.join(models_root, GROUP_FILE)
        return read_group_choice(path), path
    return text, None


def select_identities(dataset, spec, models_root='.', log=print):
    """Sorted identity ids of `dataset` in the protected group `spec` (see parse_group, resolve_group_spec).

    An empty group is an error: training on nothing must not silently become training on everything.
    """
    where = dataset.rec_paths[0]
    group, source = resolve_group_spec(spec, models_root)
    conditions = parse_group(group, dataset.attribute_names, dataset.attribute_codes,
                             where=f'--selected-attributes {group!r}' + (f' (from {source})' if source else ''))
    described = describe_group(conditions, dataset.attribute_codes)
    identities = dataset.identities_where(**conditions)
    if not identities:
        raise UserError(f'{where}: no identity of the protected group {group!r} ({described})')
    count = dataset.indices_of(identities).size
    log(f'--selected-attributes {spec}: group {group!r} ({described}): {len(identities)} of '
        f'{len(dataset.identities)} identities, {count} images' + (f' (choice read from {source})' if source else ''))
    return identities


# --- evaluation on the validation pairs and the step-3 choice ----------------------------------------------
def group_numbers(result, attr=GROUP_ATTRIBUTE):
    """Per group: AUC, FMR and FNMR at the global EER threshold, and the rank badness."""
    rates = result['bias'][attr]['error_rates']['eer']
    badness = group_badness(result, attr, 'rank')
    return {g: {'auc': result['group_auc'][attr].get(g), 'fmr_eer': rates['fmr'].get(g),
                'fnmr_eer': rates['fnmr'].get(g), 'badness': badness.get(g)} for g in rates['fmr']}


def summarise(result, attr=GROUP_ATTRIBUTE):
    """The numbers of one evaluation the chain table keeps (accuracy, per-group numbers, bias spreads)."""
    bias = result['bias'][attr]
    eer_rates = bias['error_rates']['eer']
    group_auc = [v for v in result['group_auc'][attr].values() if v is not None]
    return {'auc': result['accuracy']['auc'],
            'tar_at_far_1e-3': result['accuracy']['tar_at_far'].get('1e-03'),
            'eer': result['accuracy']['eer'],
            'groups': group_numbers(result, attr),
            'group_auc_gap': max(group_auc) - min(group_auc) if len(group_auc) > 1 else None,
            'rank_bias_positive': bias['positive']['rank']['spread'],
            'rank_bias_negative': bias['negative']['rank']['spread'],
            'fmr_ratio_at_eer': eer_rates['fmr_ratio'],
            'fnmr_ratio_at_eer': eer_rates['fnmr_ratio'],
            'worst_group': result['worst_group']}


def choose_group(result, criterion='auc', attr=GROUP_ATTRIBUTE):
    """The step-3 choice: the most discriminated group of `attr` (`fairness.worst_group` by `criterion`)
    and the numbers behind it. On the synthetic demo the `rank` criterion does not pick the planted
    dark-female group, which has the lowest AUC and the highest FMR; `auc` (the default) does.
    """
    group = worst_group(result, attr, criterion)
    if group is None:
        raise UserError('validation pairs: no group has both genuine and impostor pairs; cannot choose one')
    return {'group': group, 'codes': GROUP_CODES[group], 'attribute': attr, 'criterion': criterion,
            **summarise(result, attr)}


def val_files(val_dir):
    """The FairFace-style validation folder's files, checked: images/, landmarks.txt, predictions.csv
    (the pair template), ground_truth.csv, metadata.csv."""
    files = {'images': os.path.join(val_dir, 'images'), 'landmarks': os.path.join(val_dir, 'landmarks.txt'),
             'template': os.path.join(val_dir, 'predictions.csv'),
             'ground_truth': os.path.join(val_dir, 'ground_truth.csv'),
             'metadata': os.path.join(val_dir, 'metadata.csv')}
    for key, path in files.items():
        if key != 'landmarks' and not os.path.exists(path):
            raise UserError(f'{path}: missing (a validation folder holds images/, predictions.csv, '
                            f'ground_truth.csv, metadata.csv and optionally landmarks.txt)')
    if not os.path.isfile(files['landmarks']):
        files['landmarks'] = None
    return files


def evaluate_checkpoint(model, val_dir, out_dir, aligned_dir=None, ctx=None, batch_size=64):
    """Score `model` (`prefix,epoch`) on the validation pairs (align, flip TTA, cosine) and measure them.

    Writes `out_dir/predictions.csv` and `out_dir/eval.json`; returns the evaluation result dict.
    Aligned crops go to `aligned_dir` (default `out_dir/aligned`) and are reused when present.
    """
    from .align import align_folder
    from .checkpoint import parse_pretrained
    from .evaluation.ensemble import predict
    from .inference import load_embedder, template_images
    files = val_files(val_dir)
    prefix, epoch = parse_pretrained(model)
    embedder = load_embedder(prefix, epoch, ctx=ctx, batch_size=batch_size)
    os.makedirs(out_dir, exist_ok=True)
    aligned_dir = aligned_dir or os.path.join(out_dir, 'aligned')
    align_folder(files['images'], aligned_dir, image_size=112, landmarks=files['landmarks'], skip_existing=True)
    predictions = os.path.join(out_dir, 'predictions.csv')
    predict(files['template'], template_images(aligned_dir), [embedder], predictions, batch_size=batch_size)
    result = evaluate_predictions(predictions, files['ground_truth'], files['metadata'])
    write_json(os.path.join(out_dir, 'eval.json'), result)
    return result


# --- the chain table ------------------------------------------------------------------------------------
TABLE_GROUPS = ('light_female', 'light_male', 'dark_female', 'dark_male')


def _fmt(v, digits=4):
    return 'n/a' if v is None else (f'{v:.{digits}f}' if isinstance(v, float) else str(v))


def chain_markdown(rows):
    """The chain table as markdown: one row per step, accuracy then bias."""
    head = (['step', 'model', 'AUC', 'TAR@FAR1e-3'] + [f'AUC {g}' for g in TABLE_GROUPS]
            + ['group AUC gap', 'FMR@EER dark_female', 'FMR ratio@EER', 'FNMR ratio@EER', 'rank bias +',
               'rank bias -'])
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        s = r['summary']
        groups = s['groups']
        cells = ([r['step'], '/'.join(r['model'].split('/')[-2:]), _fmt(s['auc'], 5), _fmt(s['tar_at_far_1e-3'])]
                 + [_fmt(groups.get(g, {}).get('auc')) for g in TABLE_GROUPS]
                 + [_fmt(s['group_auc_gap']), _fmt(groups.get('dark_female', {}).get('fmr_eer')),
                    _fmt(s['fmr_ratio_at_eer'], 2), _fmt(s['fnmr_ratio_at_eer'], 2),
                    _fmt(s['rank_bias_positive']), _fmt(s['rank_bias_negative'])])
        lines.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
    return '\n'.join(lines) + '\n'


# The chain table's columns that get a paired change with its interval: (label, bootstrap path).
CHANGE_MEASURES = (('AUC', 'accuracy/auc'), ('TAR@FAR1e-3', 'accuracy/tar_at_far/1e-03'),
                   *[(f'AUC {g}', f'group_auc/gender_skin/{g}') for g in TABLE_GROUPS],
                   ('group AUC gap', 'group_auc_gap/gender_skin'),
                   ('FMR@EER dark_female', 'bias/gender_skin/error_rates/eer/fmr/dark_female'),
                   ('FMR ratio@EER', 'bias/gender_skin/error_rates/eer/fmr_ratio'),
                   ('FNMR ratio@EER', 'bias/gender_skin/error_rates/eer/fnmr_ratio'),
                   ('rank bias +', 'bias/gender_skin/positive/rank/spread'),
                   ('rank bias -', 'bias/gender_skin/negative/rank/spread'))


def _sha256(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def _keep_scores(table, step, predictions):
    """Copy a step's validation predictions beside the table (`<table>_scores/<step>.csv`), atomically."""
    if not step or os.sep in step or step.startswith('.'):
        raise UserError(f'--step {step!r}: a chain step name is a plain file name')
    path = os.path.join(table + '_scores', step + '.csv')
    with open(predictions, 'rb') as src, atomic_open(path, 'wb') as dst:
        dst.write(src.read())
    return path


def _change(ref, row, replicates, seed, loaded):
    """The paired changes of `row` against the row `ref`: {label: {difference, interval, excludes_0}}."""
    def pairs_of(r):
        if r['step'] not in loaded:
            base = os.path.dirname(r['_table'])
            pairs = load_pairs(os.path.join(base, r['scores']), r['ground_truth'], r['metadata'])
            loaded[r['step']] = (pairs, evaluate_pairs(pairs))
        return loaded[r['step']]
    (pa, ra), (pb, rb) = pairs_of(ref), pairs_of(row)
    values = compare(pa, ra, pb, rb, replicates, seed, names=(ref['step'], row['step']))['values']
    return {label: {k: values[path][k] for k in ('difference', 'interval', 'interval_na', 'excludes_0')}
            for label, path in CHANGE_MEASURES}


def update_changes(table, rows, replicates=REPLICATES, seed=0):
    """Give every row with kept scores its change against the previous row and against the pretrained
    row (the row `pretrained`, else the first), recomputed only when either score file changed."""
    kept = [r for r in rows if r.get('scores')]
    if not kept:
        return
    reference = next((r for r in kept if r['step'] == 'pretrained'), kept[0])
    loaded = {}
    for r in kept:
        r['_table'] = table
    for i, row in enumerate(kept):
        changes = row.setdefault('changes', {})
        previous = kept[i - 1] if i else None
        for kind, ref in (('previous', previous), ('pretrained', reference)):
            if ref is None or ref is row or (kind == 'pretrained' and ref is previous):  # no row twice
                changes.pop(kind, None)
                continue
            stamp = [ref['step'], ref['scores_sha256'], row['scores_sha256'], replicates, seed]
            if changes.get(kind, {}).get('stamp') != stamp:
                changes[kind] = {'against': ref['step'], 'stamp': stamp,
                                 'values': _change(ref, row, replicates, seed, loaded)}
    for r in kept:
        del r['_table']


def changes_markdown(rows):
    """Each step's change against the previous step and the pretrained model, with 95% paired bootstrap
    intervals; `*` marks a change whose interval excludes 0."""
    head = ['step', 'against'] + [label for label, _ in CHANGE_MEASURES]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        for kind in ('previous', 'pretrained'):
            c = r.get('changes', {}).get(kind)
            if not c:
                continue
            cells = [r['step'], f'{c["against"]} ({kind})']
            for label, _ in CHANGE_MEASURES:
                v = c['values'][label]
                if v['difference'] is None:
                    cells.append('n/a')
                elif v['interval'] is None:
                    cells.append(f'{v["difference"]:+.4f} [n/a]')
                else:
                    lo, hi = v['interval']
                    cells.append(f'{v["difference"]:+.4f} [{lo:+.4f}, {hi:+.4f}]' + ('*' if v['excludes_0'] else ''))
            lines.append('| ' + ' | '.join(cells) + ' |')
    if len(lines) == 2:
        return ''
    return ('\nChanges with 95% paired subject-level bootstrap intervals (both steps under the same resamples; '
            '* = the interval excludes 0):\n\n' + '\n'.join(lines) + '\n')


def append_chain_row(table, step, model, result, predictions=None, val_dir=None, replicates=REPLICATES, seed=0,
                     **extra):
    """Record `step`'s numbers in `table.json` and rewrite `table.md`; a re-run step replaces its row.

    With `predictions` (the step's validation predictions) and `val_dir`, the scores are kept beside the
    table and the table also shows each step's paired change against the previous step and the pretrained
    model. Rows keep the order in which steps first ran. Returns the markdown table.
    """
    path = table + '.json'
    rows = []
    if os.path.isfile(path):
        try:
            with open(path) as f:
                rows = json.load(f)['rows']
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f'{path}: not a chain table ({e})') from None
    row = {'step': step, 'model': model, 'summary': summarise(result), **extra}
    if predictions:
        kept = _keep_scores(table, step, predictions)
        row.update({'scores': os.path.relpath(kept, os.path.dirname(os.path.abspath(table))),
                    'scores_sha256': _sha256(kept),
                    'ground_truth': os.path.abspath(os.path.join(val_dir, 'ground_truth.csv')),
                    'metadata': os.path.abspath(os.path.join(val_dir, 'metadata.csv'))})
    at = next((i for i, r in enumerate(rows) if r['step'] == step), None)
    if at is None:
        rows.append(row)
    else:
        rows[at] = row
    update_changes(os.path.abspath(table), rows, replicates, seed)
    markdown = chain_markdown(rows) + changes_markdown(rows)
    write_json(path, {'rows': rows})
    with atomic_open(table + '.md') as f:
        f.write(markdown)
    return markdown



# --- hard samples --------------------------------------------------------------------------------------
def classify(embedder, fc7_weight, dataset, batch_size=64):
    """fc7's argmax for every image of `dataset`: cosine logits of the L2-normalised embedding (no flip,
    no augmentation), as the margin head's un-margined logits the training accuracy is measured on."""
    from sklearn.preprocessing import normalize
    weight = normalize(np.asarray(fc7_weight, dtype=np.float32))
    preds = np.empty(len(dataset), dtype=np.int64)
    for lo in range(0, len(dataset), batch_size):
        images = np.stack([dataset.sample(i)[0] for i in range(lo, min(lo + batch_size, len(dataset)))])
        emb = embedder.embed(images, flip=False)
        preds[lo:lo + len(images)] = np.argmax(emb @ weight.T, axis=1)
    return preds


def _group_names(dataset):
    """Per-identity gender_skin group name (None when the rec has no gender/skin attributes)."""
    try:
        g, s = (_rec_name(n, dataset.attribute_names, '') for n in (GENDER, SKIN))
    except UserError:
        return None
    gi, si = dataset.attribute_names.index(g), dataset.attribute_names.index(s)
    by_codes = {(c['GENDER'], c['SKIN_COLOUR']): name for name, c in GROUP_CODES.items() if len(c) == 2}
    out = {}
    for identity in dataset.identities.tolist():
        attrs = dataset.identity_attributes(identity)
        out[identity] = by_codes.get((int(attrs[gi]), int(attrs[si])), 'unknown')
    return out


def hard_sample_report(dataset, labels, preds, hard_ids):
    """Counts of misclassified samples and hard identities, overall and per protected group."""
    wrong = preds != labels
    report = {'samples': int(labels.size), 'misclassified': int(wrong.sum()),
              'train_accuracy': float(1.0 - wrong.mean()) if labels.size else None,
              'hard_identities': len(hard_ids), 'identities': int(dataset.identities.size),
              'images_written': int(dataset.indices_of(hard_ids).size)}
    groups = _group_names(dataset)
    if groups is not None:
        per = {}
        hard = set(hard_ids)
        sample_group = np.array([groups[int(i)] for i in labels.tolist()], dtype=object)
        for name in sorted(set(groups.values())):
            ids = [i for i, g in groups.items() if g == name]
            in_group = sample_group == name
            per[name] = {'identities': len(ids), 'hard_identities': sum(i in hard for i in ids),
                         'samples': int(in_group.sum()), 'misclassified': int((wrong & in_group).sum()),
                         'images_written': int(dataset.indices_of([i for i in ids if i in hard]).size)}
        report['groups'] = per
    return report


def _check_property(out_prefix, num_classes, image_size):
    """The mined rec's folder gets the source's `property`; an existing different one is not replaced."""
    from .data.record import property_path, read_property
    path = property_path(out_prefix)
    have = read_property(path)
    want = (int(num_classes), int(image_size[0]), int(image_size[1]))
    if have is not None and tuple(have) != want:
        raise UserError(f'{path}: says {have}, the mined rec needs {want}; write it to another folder')
    return have is None


def _hard_lst(src_lst, out_prefix, hard_ids):
    """Lines of the source .lst whose label is a hard identity, paths re-based for the new .lst's folder."""
    from .data.lst import read_lst, resolve_lst_path
    src_dir = os.path.dirname(os.path.abspath(src_lst))
    out_dir = os.path.dirname(os.path.abspath(out_prefix))
    keep = set(int(i) for i in hard_ids)
    items = []
    for item in read_lst(src_lst):
        if item.label in keep:
            path = os.path.abspath(resolve_lst_path(item.path, src_dir))
            items.append(item._replace(path=os.path.relpath(path, out_dir)))
    return items


def mine_hard_samples(model, rec, out, ctx=None, batch_size=64, lst=None, log=print):
    """Write the hard-sample set of `rec` under `model`'s classifier to `out.rec/.idx/.lst` (+ report).

    Hard samples are the images fc7 misclassifies; every image of their identities is kept, with its
    encoded bytes and attribute labels unchanged, identity ids unchanged (fc7 rows stay valid) and the
    source's class count in `property`. The .lst is the source .lst (`lst`, default `<rec prefix>.lst`
    when present) filtered to those identities. Nothing is written when no sample is misclassified.
    Returns the report dict (also written to `out.report.json`).
    """
    from .checkpoint import EMBEDDING, load_checkpoint, parse_pretrained
    from .data.dataset import FaceRecordDataset
    from .data.lst import write_lst
    from .data.record import IdentityRecordWriter, split_prefix
    from .inference import Embedder
    from .utils import parse_contexts
    prefix, epoch = parse_pretrained(model)
    rec_prefix, out_prefix = split_prefix(rec), split_prefix(out)
    if os.path.abspath(rec_prefix) == os.path.abspath(out_prefix):
        raise UserError(f'--out {out}: the same prefix as --rec; choose another name')
    sym, arg, aux = load_checkpoint(prefix, epoch)
    params = '%s-%04d.params' % (prefix, epoch)
    if 'fc7_weight' not in arg:
        raise UserError(f'{params}: no fc7_weight (an embedding-only checkpoint cannot classify)')
    dataset = FaceRecordDataset([rec])
    labels = dataset.labels.astype(np.int64)
    fc7 = arg['fc7_weight'].asnumpy()
    if labels.size and labels.max() >= fc7.shape[0]:
        raise UserError(f'{params}: fc7 has {fc7.shape[0]} classes, {rec} has label {int(labels.max())}: '
                        f'mine with a model trained on this rec (e.g. finetune step 1)')
    src_lst = lst if lst is not None else (rec_prefix + '.lst' if os.path.isfile(rec_prefix + '.lst') else None)
    if src_lst is not None and not os.path.isfile(src_lst):
        raise UserError(f'{src_lst}: no such .lst file')
    internals = sym.get_internals()
    if EMBEDDING + '_output' not in internals.list_outputs():
        raise UserError(f'{prefix}-symbol.json: no fc1_output layer')
    embedder = Embedder(internals[EMBEDDING + '_output'], arg, aux, ctx or parse_contexts(),
                        batch_size=batch_size, name=model)
    log(f'classifying {len(dataset)} images of {rec} with the fc7 of {prefix},{epoch} '
        f'({fc7.shape[0]} classes)')
    preds = classify(embedder, fc7, dataset, batch_size)
    hard_ids = sorted(set(labels[preds != labels].tolist()))
    report = hard_sample_report(dataset, labels, preds, hard_ids)
    report.update(model=f'{prefix},{epoch}', rec=os.fspath(rec), out=out_prefix + '.rec')
    if not hard_ids:
        raise UserError(f'{rec}: no hard samples: the fc7 of {prefix},{epoch} classifies all {len(dataset)} '
                        f'images correctly; nothing written')
    write_property = _check_property(out_prefix, dataset.num_classes, dataset.image_size)
    items = _hard_lst(src_lst, out_prefix, hard_ids) if src_lst else None
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    with IdentityRecordWriter(out_prefix, dataset.image_size, dataset.attribute_names, dataset.attribute_codes,
                              num_classes=dataset.num_classes, write_property=write_property) as writer:
        for identity in hard_ids:
            raw = (dataset.read_raw(i) for i in range(*dataset.id2range[identity]))
            writer.add_identity(identity, ((body, label[1], label[2:]) for body, label in raw))
    report['lst'] = None
    if items is not None:
        write_lst(out_prefix + '.lst', items)
        report['lst'] = out_prefix + '.lst'
    write_json(out_prefix + '.report.json', report)
    return report


def format_hard_report(report):
    """Human-readable lines of a mining report."""
    lines = [f'{report["misclassified"]} of {report["samples"]} samples misclassified (train accuracy '
             f'{report["train_accuracy"]:.4f}); {report["hard_identities"]} of {report["identities"]} identities '
             f'-> {report["images_written"]} images in {report["out"]}']
    for name, g in (report.get('groups') or {}).items():
        lines.append(f'  {name:13s} misclassified {g["misclassified"]:5d}/{g["samples"]:<5d} '
                     f'hard identities {g["hard_identities"]:4d}/{g["identities"]:<4d} images {g["images_written"]}')
    return '\n'.join(lines)
