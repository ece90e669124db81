"""Pair scoring, model fusion and the FairFace seed's score post-processing, all vectorised.

A pair list is two index arrays into one feature matrix per model. Everything works on whole arrays
(cache-sized chunks for the feature gathers, sparse products for the neighbour sums, integer sorts for
the per-image orders), so a million pairs over 35k images take a few seconds.

Post-processing (paranoidai/Fairface-Recognition-Solution, test/dis_reranking.py, find_grad_cut.py,
result_fusion.py), with the seed's quirks fixed:
- k-NN re-ranking: each image's neighbours are its k best-scoring partners *in the pair list*, plus
  itself at 1.0; a pair's new score is `alpha*s + beta*sum_c s(a,c)*s(b,c)` over the shared neighbours c.
  Fixed: the seed dropped the first partner it met for every image and counted repeated pairs twice.
- gap-cut: for each image, sort its pair scores descending and take the last (lowest) gap larger than
  `min_gap`; each endpoint adds `step*gap` to a pair above its cut and subtracts it below. Fixed: the seed
  compared against the score below the gap plus 1e-3 (a guard for its 4-decimal files); the midpoint of
  the gap is exact and gives the same split.
- switch fusion: where the hard-sample model is sure (> 0.99) its score is used, as the seed did. Replacing
  the post-processed score can *lower* a pair that re-ranking had put higher; `switch_max` takes the max
  of the two there instead.
"""
import numpy as np
from scipy import sparse

from recognition.utils import UserError


FUSIONS = ('mean', 'concat', 'switch')


def index_pairs(id1, id2, ids, source='template'):
    """Row indices of both pair columns in `ids` (the image order of the feature matrices).

    Returns (i1, i2, valid, missing): i1/i2 are -1 where the id has no image; `missing` lists those ids.
    """
    lookup = {t: i for i, t in enumerate(ids)}
    i1 = np.fromiter((lookup.get(t, -1) for t in id1), dtype=np.int64, count=len(id1))
    i2 = np.fromiter((lookup.get(t, -1) for t in id2), dtype=np.int64, count=len(id2))
    valid = (i1 >= 0) & (i2 >= 0)
    missing = sorted(set(id1[i1 < 0]) | set(id2[i2 < 0]))
    return i1, i2, valid, missing


def cosine_scores(features, i1, i2, chunk=1024, order=None):
    """Dot products of rows i1 and i2 of L2-normalised features.

    Pairs are visited sorted by their first image (`order`, shared between models), so one side's rows
    come from cache, and in chunks of ~1k pairs so both gathered blocks stay in L2: the gathers, not the
    arithmetic, are the cost. Float32 features give float32 scores (no float64 copies).
    """
    if order is None:
        order = np.argsort(i1, kind='stable')
    s1, s2 = i1[order], i2[order]
    done = np.empty(len(i1), dtype=np.result_type(features.dtype, np.float32))
    for lo in range(0, len(i1), chunk):
        np.einsum('ij,ij->i', features[s1[lo:lo + chunk]], features[s2[lo:lo + chunk]], out=done[lo:lo + chunk])
    out = np.empty_like(done)
    out[order] = done
    return out


def concat_features(features, names=None):
    """One feature per image from several models: their L2-normalised features side by side, scaled so
    the row stays unit length (so a dot product is the mean of the per-model cosines).

    The models must share an embedding size: concatenation treats them as one representation (the issue's
    rule); use mean fusion for models of different sizes.
    """
    sizes = [f.shape[1] for f in features]
    if len(set(sizes)) > 1:
        names = names or [str(i) for i in range(len(features))]
        listing = ', '.join(f'{n}: {s}' for n, s in zip(names, sizes))
        raise UserError(f'--fusion concat needs models of one embedding size, got {listing}; use --fusion mean')
    return np.concatenate(features, axis=1) / np.sqrt(len(features))


def _by_image(i1, i2, scores, n_images):
    """The pair list seen from every image, grouped by image with scores descending (ties in pair order).

    Returns (image, partner, score, first): one entry per pair end (2P), and each image's first entry
    (n_images + 1 offsets). One float argsort of the P scores and one sort of 2P unique integer keys.
    """
    n_pairs = len(scores)
    by_score = np.argsort(-scores, kind='stable')
    rank = np.empty(n_pairs, dtype=np.int64)
    rank[by_score] = np.arange(n_pairs)
    span = 2 * n_pairs
    key = np.concatenate([i1.astype(np.int64) * span + 2 * rank, i2.astype(np.int64) * span + 2 * rank + 1])
    key.sort()
    image, r = np.divmod(key, span)
    pair = by_score[r >> 1]
    partner = np.where(r & 1, i1[pair], i2[pair])
    first = np.r_[0, np.cumsum(np.bincount(image, minlength=n_images))]
    return image, partner, scores[pair], first


def _distinct_pairs(i1, i2, scores, n_images):
    """The pair list without self pairs and with each unordered pair once (its first occurrence)."""
    keep = np.nonzero(i1 != i2)[0]
    key = np.minimum(i1, i2)[keep].astype(np.int64) * n_images + np.maximum(i1, i2)[keep]
    order = np.argsort(key, kind='stable')
    repeat = key[order[1:]] == key[order[:-1]]
    if repeat.any():
        keep = np.delete(keep, order[1:][repeat])
    if len(keep) == len(i1):
        return i1, i2, scores
    return i1[keep], i2[keep], scores[keep]


def neighbour_matrix(i1, i2, scores, n_images, k=20):
    """Sparse n x n matrix W: W[a, c] = s(a, c) for a's k best partners in the pair list, W[a, a] = 1.

    Built in canonical CSR form (columns sorted in each row), so row products take scipy's merge path.
    """
    image, partner, s, first = _by_image(*_distinct_pairs(i1, i2, scores, n_images), n_images)
    top = np.arange(len(image)) - first[image] < k
    diag = np.arange(n_images)
    rows = np.concatenate([image[top], diag])
    cols = np.concatenate([partner[top], diag])
    order = np.argsort(rows * n_images + cols)
    indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=n_images))]
    data = np.concatenate([s[top], np.ones(n_images)])[order]
    W = sparse.csr_matrix((data, cols[order], indptr), shape=(n_images, n_images))
    W.has_sorted_indices = True
    return W


def knn_rerank(i1, i2, scores, n_images, k=20, alpha=0.65, beta=0.0175, chunk=131072):
    """The seed's re-ranking: `alpha*s + beta*sum over shared neighbours c of s(a,c)*s(b,c)`.

    The seed wrote it as `0.5*1.3*s + sum/40*0.7`. Because each image is its own neighbour at 1.0, a
    mutual pair adds its own score twice: mutual nearest neighbours are pulled up.
    """
    W = neighbour_matrix(i1, i2, scores, n_images, k)
    shared = np.empty(len(i1), dtype=np.float64)
    for lo in range(0, len(i1), chunk):
        prod = W[i1[lo:lo + chunk]].multiply(W[i2[lo:lo + chunk]])
        shared[lo:lo + chunk] = np.add.reduceat(np.r_[prod.data, 0.0], prod.indptr[:-1]) * (np.diff(prod.indptr) > 0)
    return alpha * scores + beta * shared


def image_cuts(i1, i2, scores, n_images, min_gap=0.1):
    """Per image: the midpoint of its lowest score gap wider than min_gap (inf if none) and the gap size."""
    a, _, s, _ = _by_image(i1, i2, scores, n_images)
    drop = s[:-1] - s[1:]
    pos = np.nonzero((a[:-1] == a[1:]) & (drop > min_gap))[0]
    last = pos[np.r_[a[pos][1:] != a[pos][:-1], True]] if len(pos) else pos
    cut = np.full(n_images, np.inf)
    size = np.zeros(n_images)
    cut[a[last]] = (s[last] + s[last + 1]) / 2.0
    size[a[last]] = drop[last]
    return cut, size


def gap_cut(i1, i2, scores, n_images, min_gap=0.1, step=0.1):
    """The seed's per-image gap-cut adjustment: +-step*gap for each endpoint, by side of its cut."""
    cut, size = image_cuts(i1, i2, scores, n_images, min_gap)
    adjust = np.where(scores > cut[i1], size[i1], -size[i1]) + np.where(scores > cut[i2], size[i2], -size[i2])
    return scores + step * adjust


def switch_fusion(base, hard, threshold=0.99, keep_max=False):
    """Where the hard-sample model scores above `threshold` the pair gets its score (the seed's
    result_fusion), or max(base, hard) with `keep_max`; elsewhere the base score."""
    return np.where(hard > threshold, np.maximum(base, hard) if keep_max else hard, base)


def fused_scores(features, names, i1, i2, fusion='mean', switch_model=None):
    """(fused, hard): the models' fused pair scores (mean of cosines, or cosine of concatenated features)
    before any post-processing, and for `switch` the hard-sample model's own scores (it is left out of the
    fused base, as in the seed), else None."""
    if fusion not in FUSIONS:
        raise UserError(f'--fusion {fusion!r}: expected one of {FUSIONS}')
    order = np.argsort(i1, kind='stable')  # shared by every model's scoring
    hard = None
    if fusion == 'switch':
        if switch_model not in names:
            raise UserError(f'--switch-model {switch_model!r}: not one of the models {names}')
        if len(names) < 2:
            raise UserError('--fusion switch needs the hard-sample model and at least one other model')
        hard_at = names.index(switch_model)
        hard = cosine_scores(features[hard_at], i1, i2, order=order)
        features = [f for m, f in enumerate(features) if m != hard_at]
        names = [n for m, n in enumerate(names) if m != hard_at]
    if fusion == 'concat':
        return cosine_scores(concat_features(features, names), i1, i2, order=order).astype(np.float64), hard
    return np.mean([cosine_scores(f, i1, i2, order=order) for f in features], axis=0, dtype=np.float64), hard


def post_process(scores, hard, i1, i2, n_images, switch_threshold=0.99, switch_max=False, rerank=False, k=20,
                 gap=False, min_gap=0.1, step=0.1):
    """The seed's order after fusion: k-NN re-ranking -> gap-cut -> switch with the hard-sample model."""
    if rerank:
        scores = knn_rerank(i1, i2, scores, n_images, k=k)
    if gap:
        scores = gap_cut(i1, i2, scores, n_images, min_gap=min_gap, step=step)
    if hard is not None:
        scores = switch_fusion(scores, hard, switch_threshold, keep_max=switch_max)
    return scores


def ensemble_scores(features, names, i1, i2, fusion='mean', switch_model=None, **post):
    """Final pair scores from per-model features (rows indexed by i1/i2, all valid): `fused_scores`, then
    `post_process`."""
    fused, hard = fused_scores(features, names, i1, i2, fusion, switch_model)
    return post_process(fused, hard, i1, i2, features[0].shape[0], **post)
