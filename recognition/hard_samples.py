"""Hard-sample mining for the finetune chain's hard-sample branch.

`mine_hard_samples` runs a checkpoint's fc7 classifier over a training rec, keeps the identities with
a misclassified image and writes them (raw bytes and attributes) as a new rec, .lst and report.
"""
import os

import numpy as np
from sklearn.preprocessing import normalize

from recognition.checkpoint import EMBEDDING, checkpoint_files, load_checkpoint, parse_pretrained
from recognition.data.dataset import FaceRecordDataset
from recognition.data.lst import read_lst, resolve_lst_path, write_lst
from recognition.data.record import IdentityRecordWriter, property_path, read_property, split_prefix
from recognition.groups import identity_groups
from recognition.inference import Embedder
from recognition.utils import UserError, parse_contexts, write_json


def classify(embedder, fc7_weight, dataset, batch_size=64):
    """fc7's argmax for every image of `dataset`: cosine logits of the L2-normalised embedding (no flip,
    no augmentation), as the margin head's un-margined logits the training accuracy is measured on."""
    weight = normalize(np.asarray(fc7_weight, dtype=np.float32))
    preds = np.empty(len(dataset), dtype=np.int64)
    for lo in range(0, len(dataset), batch_size):
        images = np.stack([dataset.sample(i)[0] for i in range(lo, min(lo + batch_size, len(dataset)))])
        emb = embedder.embed(images, flip=False)
        preds[lo:lo + len(images)] = np.argmax(emb @ weight.T, axis=1)
    return preds


def hard_sample_report(dataset, labels, preds, hard_ids):
    """Counts of misclassified samples and hard identities, overall and per protected group."""
    wrong = preds != labels
    report = {'samples': int(labels.size), 'misclassified': int(wrong.sum()),
              'train_accuracy': float(1.0 - wrong.mean()) if labels.size else None,
              'hard_identities': len(hard_ids), 'identities': int(dataset.identities.size),
              'images_written': int(dataset.indices_of(hard_ids).size)}
    groups = identity_groups(dataset)
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
    path = property_path(out_prefix)
    have = read_property(path)
    want = (int(num_classes), int(image_size[0]), int(image_size[1]))
    if have is not None and tuple(have) != want:
        raise UserError(f'{path}: says {have}, the mined rec needs {want}; write it to another folder')
    return have is None


def _hard_lst(src_lst, out_prefix, hard_ids):
    """Lines of the source .lst whose label is a hard identity, paths re-based for the new .lst's folder."""
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
    prefix, epoch = parse_pretrained(model)
    rec_prefix, out_prefix = split_prefix(rec), split_prefix(out)
    if os.path.abspath(rec_prefix) == os.path.abspath(out_prefix):
        raise UserError(f'--out {out}: the same prefix as --rec; choose another name')
    sym, arg, aux = load_checkpoint(prefix, epoch)
    params = checkpoint_files(prefix, epoch)[1]
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
