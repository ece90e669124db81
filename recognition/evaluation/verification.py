"""insightface's verification protocol on `.bin` pair sets (lfw, cfp_fp, agedb_30, val.bin).

Pairs are consecutive rows; the distance is the squared L2 distance of L2-normalised embeddings (0..4);
a pair is called "same" when its distance is below the threshold. Accuracy uses thresholds
0..4 step 0.01 and `KFold(10, shuffle=False)`: each fold's threshold is the best one on the other nine
folds, and the result is the mean +- std of the held-out accuracies ("Accuracy-Flip"). TAR@FAR=1e-3 is
insightface's `calculate_val` (thresholds step 0.001, threshold for the target FAR interpolated on the
training folds). The gap is LI-ZONG-HAN/Face_Recognition's separation measure.
"""
import time

import numpy as np
from sklearn.model_selection import KFold
from sklearn.preprocessing import normalize

ACC_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)


def _counts_below(dist, issame, thresholds):
    """True and false accepts (`dist < t`) for every threshold, by sorting instead of a T x P matrix."""
    same = np.sort(dist[issame])
    diff = np.sort(dist[~issame])
    ta = np.searchsorted(same, thresholds, side='left')
    fa = np.searchsorted(diff, thresholds, side='left')
    return ta, fa, len(same), len(diff)


def _accuracy(dist, issame, thresholds):
    ta, fa, n_same, n_diff = _counts_below(dist, issame, thresholds)
    return (ta + (n_diff - fa)) / float(len(dist))


def _rates(dist, issame, thresholds):
    """TPR and FPR per threshold; a rate with an empty denominator is 0, as in insightface."""
    ta, fa, n_same, n_diff = _counts_below(dist, issame, thresholds)
    tpr = ta / float(n_same) if n_same else np.zeros(len(thresholds))
    fpr = fa / float(n_diff) if n_diff else np.zeros(len(thresholds))
    return tpr, fpr


def _threshold_for_far(far_train, thresholds, far_target):
    """The threshold where the training FAR reaches `far_target`, linearly interpolated.

    insightface interpolates `interp1d(far, thresholds)` over a FAR curve with long flat runs; here each
    FAR value keeps its largest threshold (the most accepting one at that FAR), which makes the
    interpolation well defined. When the target FAR is never reached the threshold is 0 (nothing accepted).
    """
    if far_train.max() < far_target:
        return 0.0
    rev_far = far_train[::-1]
    uniq, first_in_reversed = np.unique(rev_far, return_index=True)
    thr = thresholds[::-1][first_in_reversed]
    return float(np.interp(far_target, uniq, thr))


def pair_distances(embeddings):
    """Squared L2 distances of consecutive rows after L2 normalisation."""
    emb = normalize(np.asarray(embeddings, dtype=np.float64))
    diff = emb[0::2] - emb[1::2]
    return np.sum(diff * diff, axis=1)


def gap(dist, issame):
    """(mean impostor distance - mean genuine distance) / std of impostor distances."""
    issame = np.asarray(issame, dtype=bool)
    d_same, d_diff = dist[issame], dist[~issame]
    if len(d_same) == 0 or len(d_diff) < 2 or d_diff.std() == 0:
        return float('nan')
    return float((d_diff.mean() - d_same.mean()) / d_diff.std())


def evaluate(embeddings, issame, nrof_folds=10, far_target=1e-3):
    """The 10-fold protocol on embeddings whose consecutive rows are the pairs.

    Returns a dict: acc, std (over folds), fold_acc, thresholds (the chosen one per fold), tpr, fpr
    (mean curves over ACC_THRESHOLDS), tar_far, tar_far_std, far (TAR at FAR=far_target), gap.
    """
    issame = np.asarray(issame, dtype=bool)
    dist = pair_distances(embeddings)
    if len(dist) != len(issame):
        raise ValueError(f'{len(dist)} pairs of embeddings but {len(issame)} labels')
    if len(dist) < nrof_folds:
        raise ValueError(f'{len(dist)} pairs cannot be split into {nrof_folds} folds')
    folds = KFold(n_splits=nrof_folds, shuffle=False)
    fold_acc, chosen, tprs, fprs, tars, fars = [], [], [], [], [], []
    for train, test in folds.split(np.arange(len(dist))):
        best = ACC_THRESHOLDS[np.argmax(_accuracy(dist[train], issame[train], ACC_THRESHOLDS))]
        chosen.append(best)
        fold_acc.append(_accuracy(dist[test], issame[test], np.array([best]))[0])
        tpr, fpr = _rates(dist[test], issame[test], ACC_THRESHOLDS)
        tprs.append(tpr)
        fprs.append(fpr)
        _, far_train = _rates(dist[train], issame[train], VAL_THRESHOLDS)
        thr = _threshold_for_far(far_train, VAL_THRESHOLDS, far_target)
        tar, far = _rates(dist[test], issame[test], np.array([thr]))
        tars.append(tar[0])
        fars.append(far[0])
    return {
        'acc': float(np.mean(fold_acc)), 'std': float(np.std(fold_acc)),
        'fold_acc': [float(a) for a in fold_acc], 'thresholds': [float(t) for t in chosen],
        'tpr': np.mean(tprs, axis=0), 'fpr': np.mean(fprs, axis=0),
        'tar_far': float(np.mean(tars)), 'tar_far_std': float(np.std(tars)), 'far': float(np.mean(fars)),
        'far_target': far_target, 'gap': gap(dist, issame),
    }


def _embed_all(data, embed_fn, batch_size):
    """Embed an N x 3 x H x W NDArray in batches of one shape.

    Like insightface, the last batch is the window [N - batch_size, N), so every call sees the same
    batch shape (no re-binding or re-tracing of a hybridised net) and only its tail rows are kept.
    """
    n = data.shape[0]
    out = None
    start = 0
    while start < n:
        end = min(start + batch_size, n)
        lo = max(0, end - batch_size)
        emb = embed_fn(data[lo:end])
        emb = emb.asnumpy() if hasattr(emb, 'asnumpy') else np.asarray(emb)
        if out is None:
            out = np.empty((n, emb.shape[1]), dtype=np.float32)
        out[start:end] = emb[start - lo:]
        start = end
    return out


def test_bin(data_list, issame, embed_fn, batch_size, nfolds=10):
    """Run the protocol on a loaded `.bin` ([original, flipped] NDArrays, issame list).

    `embed_fn(NDArray B x 3 x H x W float32 RGB 0..255) -> B x D` raw embeddings; flip TTA is the sum of
    the raw embeddings of both sets, then L2. XNorm is the mean raw norm over both sets.
    Returns a dict with acc, std, xnorm, tar_far, gap (and the rest of `evaluate`'s keys, plus time).
    """
    t0 = time.time()
    raw = [_embed_all(data, embed_fn, batch_size) for data in data_list]
    xnorm = float(np.mean([np.linalg.norm(r, axis=1).mean() for r in raw]))
    summed = raw[0].astype(np.float64)
    for r in raw[1:]:
        summed += r
    result = evaluate(summed, issame, nrof_folds=nfolds)
    result['xnorm'] = xnorm
    result['time'] = time.time() - t0
    return result


test_bin.__test__ = False  # a library function named test_*: keep pytest from collecting it where imported


def format_result(name, result):
    """insightface's log lines for one target, plus TAR@FAR and the gap."""
    return [
        f'[{name}]XNorm: {result["xnorm"]:f}',
        f'[{name}]Accuracy-Flip: {result["acc"]:1.5f}+-{result["std"]:1.5f}',
        f'[{name}]TAR@FAR={result["far_target"]:g}: {result["tar_far"]:1.5f}+-{result["tar_far_std"]:1.5f}'
        f' (FAR {result["far"]:1.5f})',
        f'[{name}]Gap: {result["gap"]:.4f}',
    ]
