"""Closed-set identification (MeteorsHub/HW_face's classifier_cos): probes against a gallery by cosine
after subtracting the gallery's mean embedding, top-1 and top-5 accuracy with a per-probe listing.

Subtracting the mean removes the direction every face shares, which spreads the gallery on the sphere.
Top-k counts a probe correct when its label is among the labels of its k nearest gallery images.
"""
import numpy as np
from sklearn.preprocessing import normalize

from recognition.evaluation.ensemble import concat_features
from recognition.utils import UserError

FUSIONS = ('mean', 'concat')


def _per_model(features):
    """A list of N x D_m arrays from one array or a list of per-model arrays."""
    if isinstance(features, (list, tuple)):
        return [np.asarray(f, dtype=np.float32) for f in features]
    return [np.asarray(features, dtype=np.float32)]


def nearest(gallery, probes, k=5, subtract_mean=True, chunk=1024):
    """(indices, cosines) of each probe's k most similar gallery rows, best first.

    `gallery` and `probes` are arrays or lists of per-model arrays (any embedding sizes); with several
    models the cosine is the mean of the per-model cosines, each after its own mean subtraction.
    """
    galleries, probe_sets = _per_model(gallery), _per_model(probes)
    if len(galleries) != len(probe_sets):
        raise ValueError(f'{len(galleries)} gallery feature sets but {len(probe_sets)} probe feature sets')
    models = []
    for g, p in zip(galleries, probe_sets):
        if subtract_mean:
            mean = g.mean(axis=0)
            g, p = g - mean, p - mean
        models.append((normalize(g), normalize(p)))
    n_gallery, n_probes = len(models[0][0]), len(models[0][1])
    k = min(k, n_gallery)
    idx = np.empty((n_probes, k), dtype=np.int64)
    sim = np.empty((n_probes, k), dtype=np.float32)
    for lo in range(0, n_probes, chunk):
        s = sum(p[lo:lo + chunk] @ g.T for g, p in models) / len(models)
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        part_s = np.take_along_axis(s, part, axis=1)
        order = np.argsort(-part_s, axis=1, kind='stable')
        idx[lo:lo + chunk] = np.take_along_axis(part, order, axis=1)
        sim[lo:lo + chunk] = np.take_along_axis(part_s, order, axis=1)
    return idx, sim


def identify(gallery, gallery_labels, probes, probe_labels, k=5, subtract_mean=True, fusion='mean', names=None):
    """Top-1 / top-k accuracy and, per probe, the labels and angular distances (arccos/pi) of its k nearest.

    Several models (lists of per-model features) are fused by `fusion`: 'mean' averages the per-model
    cosines (models may differ in embedding size); 'concat' joins the features into one embedding first
    (one size only; `names` label the models in that error).
    """
    if fusion not in FUSIONS:
        raise UserError(f'--fusion {fusion!r}: expected one of {FUSIONS}')
    if fusion == 'concat' and isinstance(gallery, (list, tuple)):
        gallery, probes = concat_features(gallery, names), concat_features(probes, names)
    gallery_labels = np.asarray(gallery_labels)
    probe_labels = np.asarray(probe_labels)
    idx, sim = nearest(gallery, probes, k, subtract_mean)
    top_labels = gallery_labels[idx]
    hit = top_labels == probe_labels[:, None]
    return {'top1': float(hit[:, 0].mean()), f'top{k}': float(hit.any(axis=1).mean()), 'k': k,
            'neighbours': idx, 'labels': top_labels,
            'distances': np.arccos(np.clip(sim, -1.0, 1.0)) / np.pi}
