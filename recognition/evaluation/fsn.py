"""Fair score normalisation (FSN), after Terhörst, Kolf, Damer, Kirchbuchner and Kuijper, "Post-comparison
mitigation of demographic bias in face recognition using fair score normalization", Pattern Recognition
Letters 140 (2020).

Unsupervised clusters of the embeddings (`posthoc.py`) stand in for the demographic groups: a cluster whose
impostors score high gets a high threshold at the target FMR, and its pairs are shifted down by how far
that threshold lies above the global one, so one global threshold gives every cluster about the same FMR.
No demographic labels: only the calibration pairs' same/different ground truth.

    delta_c = thr_c - thr_G,   s'(a, b) = s(a, b) - (delta_{c(a)} + delta_{c(b)}) / 2

(docs/metrics.md, "Post-hoc fair score calibration").
"""
import numpy as np

from recognition.evaluation.fairness import fmr_threshold


def fit(scores, labels, c1, c2, k, fmr):
    """The global and per-cluster thresholds at FMR `fmr` on calibration pairs.

    A cluster's pairs are those with both images in it (the project's group rule: within-cluster
    impostors are the confusions a cluster's threshold is about; FairCal's re-implementation of FSN takes
    pairs with at least one image in it, which mixes in the other clusters' impostors); a cluster without
    such impostor pairs keeps the global threshold (no shift). Returns the state's arrays.
    """
    global_threshold = fmr_threshold(scores, labels, fmr)
    thresholds = np.full(k, global_threshold, dtype=np.float64)
    impostors = np.zeros(k, dtype=np.int64)
    for c in range(k):
        mine = (c1 == c) & (c2 == c)
        impostors[c] = int((mine & ~labels).sum())
        if impostors[c]:
            thresholds[c] = fmr_threshold(scores[mine], labels[mine], fmr)
    return {'thresholds': thresholds, 'global_threshold': np.float64(global_threshold),
            'impostors': impostors, 'fmr': np.float64(fmr)}


def normalise(scores, c1, c2, thresholds, global_threshold):
    """Each pair's score shifted by the mean deviation of its two clusters' thresholds from the global one."""
    delta = np.asarray(thresholds, dtype=np.float64) - float(global_threshold)
    return np.asarray(scores, dtype=np.float64) - 0.5 * (delta[c1] + delta[c2])
