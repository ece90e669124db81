"""Attribute heads (gender, age group) of a multi-task model against ground-truth metadata: accuracy and a
confusion matrix per attribute, as the Face_Recognition seed reported for its gender and age tasks.

A model trained with `--attr-heads` exports each head as a top-level graph output `attr_<name>_output`
(class probabilities) whose node carries its class names in `__classes__`; `attribute_heads` finds them.
Head names match metadata columns case-insensitively (`gender` -> `GENDER`); codes blank or -1 are unknown
and left out of the scores.
"""
import csv
import json
import os

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix
from tqdm import tqdm

from recognition.inference import read_image, to_nchw
from recognition.utils import UserError, atomic_open, atomic_path, write_json
from recognition.evaluation.metadata import read_metadata

OUTPUT_PREFIX, OUTPUT_SUFFIX = 'attr_', '_output'


def attribute_heads(prefix):
    """{attribute: (output layer, class names or None)} of `prefix-symbol.json`; UserError if it has none."""
    from recognition.checkpoint import load_symbol   # here: checkpoint imports mxnet (~2 s), which reading metadata needs not
    path = f'{prefix}-symbol.json'
    sym = load_symbol(path)
    internals = sym.get_internals()
    heads = {}
    for out in sym.list_outputs():
        if out.startswith(OUTPUT_PREFIX) and out.endswith(OUTPUT_SUFFIX):
            classes = internals[out].attr('__classes__')
            heads[out[len(OUTPUT_PREFIX):-len(OUTPUT_SUFFIX)]] = (out, json.loads(classes) if classes else None)
    if not heads:
        raise UserError(f'{path}: the model has no attribute heads (outputs: {", ".join(sym.list_outputs())}); '
                        f'train it with --attr-heads, e.g. --attr-heads gender,age')
    return heads


def metadata_codes(path, attributes):
    """(template ids, {attribute: int codes with -1 = unknown}) from a metadata CSV with a TEMPLATE_ID column
    and one column per attribute (matched case-insensitively)."""
    cols, _ = read_metadata(path, ['TEMPLATE_ID', *attributes])
    codes = {}
    for attr in attributes:
        values = []
        for n, text in enumerate(cols[attr]):
            try:
                value = float(text) if text else -1.0
                if value != int(value) or value < -1:
                    raise ValueError
            except ValueError:
                raise UserError(f'{path}: row {n + 2}: {attr.upper()} must be an integer code (or blank / -1 for '
                                f'unknown), found {text!r}') from None
            values.append(int(value))
        codes[attr] = np.array(values, dtype=np.int64)
    return list(cols['TEMPLATE_ID']), codes


def predict_probabilities(embedder, paths, num_outputs, batch_size=64, flip=True, image_size=112, progress=False):
    """The model's output layers for every image (aligned crops): a list of N x C arrays, the mean of
    the crop and its mirror when `flip`."""
    outs = [[] for _ in range(num_outputs)]
    for lo in tqdm(range(0, len(paths), batch_size), disable=not progress, desc='attributes', unit='batch'):
        x = to_nchw(np.stack([read_image(p, image_size) for p in paths[lo:lo + batch_size]])).astype(np.float32)
        probs = embedder.forward_all(x)
        if flip:
            mirrored = embedder.forward_all(np.ascontiguousarray(x[:, :, :, ::-1]))
            probs = [(a + b) / 2 for a, b in zip(probs, mirrored)]
        for acc, p in zip(outs, probs):
            acc.append(p)
    return [np.concatenate(o, axis=0) for o in outs]


def score_attribute(true, probs, classes=None, name='attribute', where='metadata'):
    """Accuracy and confusion matrix (rows true, columns predicted) over the samples with a known code."""
    n_classes = probs.shape[1]
    classes = list(classes) if classes else [str(i) for i in range(n_classes)]
    known = true >= 0
    if (true[known] >= n_classes).any():
        raise UserError(f'{where}: {name} code {int(true[known][true[known] >= n_classes][0])} is outside the '
                        f"model's {n_classes} classes ({', '.join(classes)})")
    if not known.any():
        raise UserError(f'{where}: no image has a known {name} code')
    pred = probs.argmax(axis=1)
    t, p = true[known], pred[known]
    cm = confusion_matrix(t, p, labels=list(range(n_classes)))
    return {'classes': classes, 'n': int(known.sum()), 'unknown': int((~known).sum()),
            'accuracy': float((t == p).mean()), 'balanced_accuracy': float(balanced_accuracy_score(t, p)),
            'chance': float(np.bincount(t, minlength=n_classes).max() / len(t)),
            'confusion_matrix': cm.tolist(), 'predicted': pred}


def plot_confusion(result, title, path):
    """A confusion-matrix PNG (counts, row-normalised colour) written atomically."""
    import matplotlib   # here: pyplot costs ~2.5 s to import, and the backend must be chosen before it
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    cm = np.asarray(result['confusion_matrix'], dtype=np.float64)
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    k = len(result['classes'])
    fig, ax = plt.subplots(figsize=(2.2 + 0.8 * k, 1.8 + 0.8 * k))
    ax.imshow(rates, cmap='Blues', vmin=0, vmax=1)
    ax.set_xticks(range(k), result['classes'], rotation=30, ha='right')
    ax.set_yticks(range(k), result['classes'])
    ax.set_xlabel('predicted')
    ax.set_ylabel('true')
    ax.set_title(f'{title}\naccuracy {result["accuracy"]:.3f} (n={result["n"]})', fontsize=9)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, '%d' % cm[i, j], ha='center', va='center', color='white' if rates[i, j] > 0.5 else 'black')
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=80)
    plt.close(fig)


def evaluate_attributes(embedder, heads, ids, paths, codes, out_dir, batch_size=64, flip=True,
                        metadata='metadata', image_size=112, progress=False):
    """Score every head on the images; write `attributes.json`, `attributes.csv` (per image) and
    `confusion_<attribute>.png` in `out_dir`. Returns the JSON-able summary."""
    names = list(heads)
    probs = predict_probabilities(embedder, paths, len(names), batch_size, flip=flip, image_size=image_size,
                                  progress=progress)
    os.makedirs(out_dir, exist_ok=True)
    summary = {'images': len(ids), 'flip': bool(flip), 'attributes': {}}
    predicted = {}
    for name, p in zip(names, probs):
        layer, classes = heads[name]
        r = score_attribute(codes[name], p, classes, name, metadata)
        predicted[name] = (r.pop('predicted'), p)
        r['layer'] = layer
        r['plot'] = f'confusion_{name}.png'
        plot_confusion(r, f'{name} ({embedder.name})', os.path.join(out_dir, r['plot']))
        summary['attributes'][name] = r
    with atomic_open(os.path.join(out_dir, 'attributes.csv'), newline='') as f:
        w = csv.writer(f)
        w.writerow(['TEMPLATE_ID'] + [f'{n}_{c}' for n in names for c in ('true', 'pred', 'prob')])
        for i, tid in enumerate(ids):
            w.writerow([tid] + [v for n in names for v in (int(codes[n][i]), int(predicted[n][0][i]),
                                                          '%.4f' % predicted[n][1][i].max())])
    write_json(os.path.join(out_dir, 'attributes.json'), summary)
    return summary
