"""Closed-set identification (MeteorsHub/HW_face's classifier_cos): probes against a gallery by cosine
after subtracting the gallery's mean embedding, top-1 and top-5 accuracy with a per-probe listing.

Subtracting the mean removes the direction every face shares, which spreads the gallery on the sphere.
Top-k counts a probe correct when its label is among the labels of its k nearest gallery images.
"""
import numpy as np
from sklearn.preprocessing import normalize


def nearest(gallery, probes, k=5, subtract_mean=True, chunk=1024):
    """(indices, cosines) of each probe's k most similar gallery rows, best first."""
    gallery = np.asarray(gallery, dtype=np.float32)
    probes = np.asarray(probes, dtype=np.float32)
    if subtract_mean:
        mean = gallery.mean(axis=0)
        gallery, probes = gallery - mean, probes - mean
    g, p = normalize(gallery), normalize(probes)
    k = min(k, len(g))
    idx = np.empty((len(p), k), dtype=np.int64)
    sim = np.empty((len(p), k), dtype=np.float32)
    for lo in range(0, len(p), chunk):
        s = p[lo:lo + chunk] @ g.T
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        part_s = np.take_along_axis(s, part, axis=1)
        order = np.argsort(-part_s, axis=1, kind='stable')
        idx[lo:lo + chunk] = np.take_along_axis(part, order, axis=1)
        sim[lo:lo + chunk] = np.take_along_axis(part_s, order, axis=1)
    return idx, sim


def identify(gallery, gallery_labels, probes, probe_labels, k=5, subtract_mean=True):
    """Top-1 / top-k accuracy and, per probe, the labels and angular distances (arccos/pi) of its k nearest."""
    gallery_labels = np.asarray(gallery_labels)
    probe_labels = np.asarray(probe_labels)
    idx, sim = nearest(gallery, probes, k, subtract_mean)
    top_labels = gallery_labels[idx]
    hit = top_labels == probe_labels[:, None]
    return {'top1': float(hit[:, 0].mean()), f'top{k}': float(hit.any(axis=1).mean()), 'k': k,
            'neighbours': idx, 'labels': top_labels,
            'distances': np.arccos(np.clip(sim, -1.0, 1.0)) / np.pi}
