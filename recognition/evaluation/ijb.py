"""IJB-B / IJB-C 1:1 template verification, insightface's protocol (`evaluation/IJB`, `eval_ijbc`).

Layout (insightface's `IJB_release/IJBC`; IJB-B the same with `ijbb_`):
    meta/ijbc_face_tid_mid.txt         `<image> <template id> <media id>` per face
    meta/ijbc_template_pair_label.txt  `<template id> <template id> <0|1>` per pair
    meta/ijbc_name_5pts_score.txt      `<image> x1 y1 ... x5 y5 <detector score>` per face
    loose_crop/<image>                 the loose face crops the points refer to

Each face is aligned with its five points (`norm_crop`), embedded with flip TTA (the raw embeddings of
the crop and its mirror summed), optionally L2-normalised ("N0"; insightface keeps the norm) and weighted
by its detector score ("D1"). A template's feature is the sum over its media of the mean of each
medium's faces (media pooling, then template pooling), L2-normalised; a pair's score is the cosine.
A template of the pair list without any face cannot be enrolled: it is reported, and its pairs get
MISSING_SCORE, below every cosine (a failure to enrol counts as a rejection; insightface's script would
silently use another template's feature). TAR at FAR 1e-6 ... 1e-1 is insightface's reading of
sklearn's ROC: the TPR of the ROC point whose FPR is nearest the target.

Intervals: templates linked by genuine pairs are one person (the pair file's labels are the only
identities the 1:1 meta files carry), so the subject-level bootstrap of `bootstrap.py` resamples those
linked groups; every replicate re-reads its weighted ROC (sklearn's, rebuilt on the one sort) the same way.
"""
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import auc, roc_curve
from sklearn.preprocessing import normalize

from recognition.alignment.geometry import norm_crop
from recognition.evaluation.bootstrap import LEVEL, REPLICATES, percentile_interval, subject_counts
from recognition.evaluation.ensemble import cosine_scores, fused_scores
from recognition.utils import UserError

TARGETS = ('IJBC', 'IJBB')
FAR_LABELS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
MISSING_SCORE = -2.0
CHUNK = 200  # replicates per block of identity counts


@dataclass
class Protocol:
    """One IJB set's meta files, joined by image name (rows in face_tid_mid order)."""
    names: list                 # image file names
    templates: np.ndarray       # (N,) template id per face
    medias: np.ndarray          # (N,) media id per face
    landmarks: np.ndarray       # (N, 5, 2)
    faceness: np.ndarray        # (N,) detector score
    t1: np.ndarray              # (P,) pair template ids
    t2: np.ndarray
    labels: np.ndarray          # (P,) int 0/1
    image_dir: str


def meta_files(root, target):
    """{kind: path} of a target's three meta files and its loose crops, in insightface's layout."""
    if target not in TARGETS:
        raise UserError(f'--target {target!r}: expected one of {TARGETS}')
    t = target.lower()
    return {'tid_mid': os.path.join(root, 'meta', f'{t}_face_tid_mid.txt'),
            'pairs': os.path.join(root, 'meta', f'{t}_template_pair_label.txt'),
            'points': os.path.join(root, 'meta', f'{t}_name_5pts_score.txt'),
            'images': os.path.join(root, 'loose_crop')}


def _lines(path):
    """(line number, tokens) of the non-blank lines of a meta file."""
    try:
        with open(path, encoding='utf-8') as f:
            return [(n, line.split()) for n, line in enumerate(f, 1) if line.strip()]
    except FileNotFoundError:
        raise UserError(f'{path}: meta file not found') from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f'{path}: cannot read ({e})') from None


def _parse(path, n, tokens, count, convert, expected):
    if len(tokens) != count:
        raise UserError(f'{path}:{n}: expected "{expected}", got {" ".join(tokens)[:80]!r}')
    try:
        return [c(t) for c, t in zip(convert, tokens)]
    except ValueError:
        raise UserError(f'{path}:{n}: expected "{expected}", got {" ".join(tokens)[:80]!r}') from None


def read_template_media(path):
    """(image names, template ids, media ids) of `*_face_tid_mid.txt`."""
    rows, seen = [], {}
    for n, tokens in _lines(path):
        name, tid, mid = _parse(path, n, tokens, 3, (str, int, int), 'image template_id media_id')
        if name in seen:
            raise UserError(f'{path}:{n}: image {name} listed twice (first on line {seen[name]})')
        seen[name] = n
        rows.append((name, tid, mid))
    if not rows:
        raise UserError(f'{path}: no faces')
    names, tids, mids = zip(*rows)
    return list(names), np.array(tids, dtype=np.int64), np.array(mids, dtype=np.int64)


def read_template_pairs(path):
    """(template ids 1, template ids 2, labels) of `*_template_pair_label.txt`."""
    rows = []
    for n, tokens in _lines(path):
        t1, t2, label = _parse(path, n, tokens, 3, (int, int, int), 'template_id template_id 0|1')
        if label not in (0, 1):
            raise UserError(f'{path}:{n}: label {label} is not 0 or 1')
        rows.append((t1, t2, label))
    if not rows:
        raise UserError(f'{path}: no pairs')
    a = np.array(rows, dtype=np.int64)
    if a[:, 2].min() == a[:, 2].max():
        raise UserError(f'{path}: every pair has label {a[0, 2]}; TAR at FAR needs both kinds')
    return a[:, 0], a[:, 1], a[:, 2]


def read_points_scores(path):
    """{image name: (line, 5x2 landmarks, detector score)} of `*_name_5pts_score.txt`."""
    out = {}
    for n, tokens in _lines(path):
        values = _parse(path, n, tokens, 12, (str,) + (float,) * 11, 'image x1 y1 ... x5 y5 score')
        if not np.all(np.isfinite(values[1:])):
            raise UserError(f'{path}:{n}: landmarks and score must be finite numbers')
        if values[0] in out:
            raise UserError(f'{path}:{n}: image {values[0]} listed twice (first on line {out[values[0]][0]})')
        out[values[0]] = (n, np.array(values[1:11]).reshape(5, 2), values[11])
    return out


def load_protocol(root, target='IJBC'):
    """The joined meta files of `root` (see the module docstring); every face needs its points."""
    files = meta_files(root, target)
    names, tids, mids = read_template_media(files['tid_mid'])
    points = read_points_scores(files['points'])
    missing = [(i, name) for i, name in enumerate(names) if name not in points]
    if missing:
        i, name = missing[0]
        raise UserError(f'{files["points"]}: no landmarks for image {name} (line {i + 1} of '
                        f'{files["tid_mid"]}; {len(missing)} images without points in all)')
    t1, t2, labels = read_template_pairs(files['pairs'])
    return Protocol(names, tids, mids, np.stack([points[n][1] for n in names]),
                    np.array([points[n][2] for n in names]), t1, t2, labels, files['images'])


def aligned_face(path, landmarks):
    """The 112x112 RGB crop of a loose crop aligned with its five points."""
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise UserError(f'{path}: cannot read image')
    return cv2.cvtColor(norm_crop(img, landmarks), cv2.COLOR_BGR2RGB)


def image_features(embedders, protocol, batch_size=64, flip=True):
    """Per model, the (N, D) raw embeddings of every face (mirror added when `flip`), in meta order.

    Each batch is decoded and aligned once for all models, the next one in a thread meanwhile.
    """
    paths = [os.path.join(protocol.image_dir, n) for n in protocol.names]
    load = lambda lo: np.stack([aligned_face(p, protocol.landmarks[lo + i])
                                for i, p in enumerate(paths[lo:lo + batch_size])])
    starts = list(range(0, len(paths), batch_size))
    feats = [[] for _ in embedders]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, starts[0])
        for k in range(len(starts)):
            crops = pending.result()
            if k + 1 < len(starts):
                pending = pool.submit(load, starts[k + 1])
            for m, embedder in enumerate(embedders):
                feats[m].append(embedder.embed(crops, flip=flip, normalized=False))
    return [np.concatenate(f).astype(np.float64) for f in feats]


def face_inputs(raw, faceness, norm_images=False, detector_score=True):
    """What the pooling adds up per face: the raw embedding, L2-normalised first with `norm_images`,
    times the detector score with `detector_score`."""
    x = normalize(raw) if norm_images else np.array(raw, dtype=np.float64)
    return x * np.asarray(faceness, dtype=np.float64)[:, None] if detector_score else x


def pool_templates(feats, templates, medias):
    """(L2-normalised template features, sorted template ids): per template, the sum over its media of
    each medium's mean face feature."""
    uniq_t, t_index = np.unique(templates, return_inverse=True)
    span = int(medias.max() - medias.min()) + 1
    keys, m_index = np.unique(t_index.astype(np.int64) * span + (medias - medias.min()), return_inverse=True)
    n, n_media = len(templates), len(keys)
    per_media = np.bincount(m_index, minlength=n_media).astype(np.float64)
    mean_of_media = sparse.csr_matrix((1.0 / per_media[m_index], (m_index, np.arange(n))), shape=(n_media, n))
    media_to_template = sparse.csr_matrix((np.ones(n_media), (keys // span, np.arange(n_media))),
                                          shape=(len(uniq_t), n_media))
    return normalize((media_to_template @ mean_of_media) @ feats), uniq_t   # no (media x D) intermediate


def pair_index(unique_templates, t1, t2):
    """(row of t1, row of t2, pairs with an unenrolled template, sorted unenrolled template ids)."""
    def rows(t):
        i = np.minimum(np.searchsorted(unique_templates, t), len(unique_templates) - 1)
        return i, unique_templates[i] != t
    i1, miss1 = rows(t1)
    i2, miss2 = rows(t2)
    missing = miss1 | miss2
    absent = np.unique(np.r_[t1[miss1], t2[miss2]])
    return np.where(miss1, 0, i1), np.where(miss2, 0, i2), missing, absent


def nearest_tar(fpr, tpr, far_labels=FAR_LABELS):
    """{far: TAR}: insightface's reading of a ROC, the TPR at the point whose FPR is nearest the target
    (the reversed curve's first such point, i.e. the highest TPR on a tie)."""
    fpr, tpr = fpr[::-1], tpr[::-1]
    return {far: float(tpr[int(np.argmin(np.abs(fpr - far)))]) for far in far_labels}


def tar_at_far(labels, scores, far_labels=FAR_LABELS, sample_weight=None):
    """{far: TAR} on sklearn's ROC of the pairs (optionally weighted), read by `nearest_tar`. NaN when the
    weights leave no genuine or no impostor pair."""
    if sample_weight is not None and not (sample_weight[labels == 1].any() and sample_weight[labels == 0].any()):
        return {far: float('nan') for far in far_labels}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UndefinedMetricWarning)
        fpr, tpr, _ = roc_curve(labels, scores, sample_weight=sample_weight)
    return nearest_tar(fpr, tpr, far_labels)


class SortedPairs:
    """One method's pairs sorted by score once, for the bootstrap: each replicate's weighted ROC is sklearn's
    `roc_curve(labels, scores, sample_weight=w)` rebuilt from sums over the tie blocks (blocks without weight
    dropped, as sklearn drops zero weights; then `drop_intermediate`'s corners), without sorting again.
    Weights are products of identity counts (integers), so every sum is exact and the curve is sklearn's."""

    def __init__(self, labels, scores, s1, s2):
        order = np.argsort(-scores, kind='stable')
        self.s1, self.s2 = s1[order], s2[order]   # the weights come out in score order
        self.pos = (labels[order] == 1).astype(np.float64)
        self.starts = np.r_[0, np.nonzero(np.diff(scores[order]))[0] + 1]

    def tar_at_far(self, counts, far_labels=FAR_LABELS):
        """{far: TAR} under identity counts (the pair weights are counts[s1] * counts[s2])."""
        w = counts[self.s1] * counts[self.s2]
        pos_w = np.add.reduceat(w * self.pos, self.starts)
        all_w = np.add.reduceat(w, self.starts)
        keep = all_w > 0
        tps = np.cumsum(pos_w[keep])
        fps = np.cumsum(all_w[keep] - pos_w[keep])
        if not (len(tps) and tps[-1] > 0 and fps[-1] > 0):
            return {far: float('nan') for far in far_labels}
        if len(fps) > 2:
            corner = np.nonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
            fps, tps = fps[corner], tps[corner]
        fps, tps = np.r_[0, fps], np.r_[0, tps]
        return nearest_tar(fps / fps[-1], tps / tps[-1], far_labels)


def linked_subjects(t1, t2, labels):
    """((P,) unit of each pair's first template, of its second, number of units): templates joined by
    genuine pairs form one unit (one person)."""
    uniq, inv = np.unique(np.r_[t1, t2], return_inverse=True)
    p = len(t1)
    a, b = inv[:p], inv[p:]
    same = labels == 1
    graph = sparse.coo_matrix((np.ones(int(same.sum())), (a[same], b[same])), shape=(len(uniq), len(uniq)))
    n, unit = connected_components(graph, directed=False)
    return unit[a], unit[b], n


def bootstrap_tar(labels, score_sets, t1, t2, replicates=REPLICATES, seed=0, far_labels=FAR_LABELS):
    """{method: {far: interval}} of every score set under the same resamples of the linked templates."""
    s1, s2, n = linked_subjects(t1, t2, labels)
    s2 = np.where(s2 == s1, n, s2)  # a pair within one unit counts k times (counts' last column is 1)
    values = {m: {far: np.empty(replicates) for far in far_labels} for m in score_sets}
    ranked = {m: SortedPairs(labels, scores, s1, s2) for m, scores in score_sets.items()}
    for first in range(0, replicates, CHUNK):
        counts = subject_counts(n, seed, first, min(CHUNK, replicates - first)).astype(np.float64)
        for j, c in enumerate(counts):
            for m, pairs in ranked.items():
                for far, tar in pairs.tar_at_far(c, far_labels).items():
                    values[m][far][first + j] = tar
    return {m: {far: percentile_interval(v, None, replicates) for far, v in per.items()} for m, per in values.items()}


def evaluate(protocol, features, names, norm_images=False, detector_score=True, fusion='mean',
             replicates=REPLICATES, seed=0):
    """Scores, TAR@FAR table, intervals and ROC curves of each model's image features (and, with several
    models, of their fused template scores). Returns a dict (JSON-ready but for `scores` and `roc`)."""
    templates_feats = []
    for raw in features:
        feats, uniq = pool_templates(face_inputs(raw, protocol.faceness, norm_images, detector_score),
                                     protocol.templates, protocol.medias)
        templates_feats.append(feats)
    i1, i2, missing, absent = pair_index(uniq, protocol.t1, protocol.t2)
    order = np.argsort(i1, kind='stable')
    scores = {n: cosine_scores(f, i1, i2, order=order).astype(np.float64) for n, f in zip(names, templates_feats)}
    if len(names) > 1:
        scores['fused'] = fused_scores(templates_feats, list(names), i1, i2, fusion=fusion)[0]
    for s in scores.values():
        s[missing] = MISSING_SCORE
    labels = protocol.labels
    table = {m: tar_at_far(labels, s) for m, s in scores.items()}
    intervals = bootstrap_tar(labels, scores, protocol.t1, protocol.t2, replicates, seed) if replicates else None
    roc = {m: roc_curve(labels, s)[:2] for m, s in scores.items()}
    return {'scores': scores, 'roc': roc, 'table': table, 'intervals': intervals,
            'auc': {m: float(auc(*r)) for m, r in roc.items()},
            'pairs': int(len(labels)), 'genuine': int(labels.sum()), 'impostor': int((labels == 0).sum()),
            'templates': int(len(uniq)), 'faces': int(len(protocol.names)),
            'unenrolled_templates': [int(t) for t in absent], 'pairs_with_unenrolled': int(missing.sum()),
            'options': {'norm_images': norm_images, 'detector_score': detector_score,
                        'fusion': fusion if len(names) > 1 else None, 'replicates': replicates, 'seed': seed,
                        'level': LEVEL, 'missing_score': MISSING_SCORE}}


def format_table(result, target='IJBC'):
    """insightface's table (TAR in % per FAR column), each cell with its interval when bootstrapped."""
    head = ['Methods'] + [f'{far:.0e}' for far in FAR_LABELS]
    rows = [head, ['---'] * len(head)]
    for m, tars in result['table'].items():
        cells = []
        for far in FAR_LABELS:
            iv = (result['intervals'] or {}).get(m, {}).get(far, {})
            lo_hi = iv.get('interval')
            cells.append(f'{100 * tars[far]:.2f}' + (f' [{100 * lo_hi[0]:.2f}, {100 * lo_hi[1]:.2f}]' if lo_hi else ''))
        rows.append([f'{m}-{target}'] + cells)
    return '\n'.join('| ' + ' | '.join(r) + ' |' for r in rows)


def plot_roc(result, path, target='IJBC'):
    """insightface's ROC figure (PNG): TPR against FPR on a log axis from 1e-6, one curve per method."""
    import matplotlib   # here: pyplot costs ~2.5 s to import, and the backend must be chosen before it
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig = plt.figure()
    for m, (fpr, tpr) in result['roc'].items():
        plt.plot(fpr, tpr, lw=1, label=f'[{m} (AUC = {100 * result["auc"][m]:.4f}%)]')
    plt.xlim([10 ** -6, 0.1])
    plt.ylim([0.3, 1.0])
    plt.grid(linestyle='--', linewidth=1)
    plt.xticks(FAR_LABELS)
    plt.yticks(np.linspace(0.3, 1.0, 8, endpoint=True))
    plt.xscale('log')
    plt.xlabel('False Positive Rate')
    plt.ylabel('True Positive Rate')
    plt.title(f'ROC on {target}')
    plt.legend(loc='lower right')
    fig.savefig(path, format='png')
    plt.close(fig)
