"""The RFW and BFW bias protocols, every number with its subject-level bootstrap interval.

RFW (Wang et al., ICCV 2019): four subsets (African, Asian, Caucasian, Indian), each a pair list in
LFW's format (`txts/<S>/<S>_pairs.txt`, ten folds of 300 positive then 300 negative lines) over
`data/<S>/<id>/<id>_000N.jpg`. Per subset, insightface's 10-fold accuracy (`verification.evaluate`:
squared L2 distances, thresholds 0..4 step 0.01, each fold's threshold the best on the other nine);
across subsets their mean, standard deviation (population, over the four) and the skewed error ratio
SER = highest error / lowest error.

BFW (Robinson et al., CVPRW 2020): one datatable CSV (`p1, p2, label, id1, id2, att1, att2`, ...) over
images under the BFW folder; a pair's subgroup is `att1` when `att2` agrees (the eight ethnicity x
gender subgroups). At each FAR target: the global threshold (the lowest score t, match = score >= t,
whose FAR over all impostor pairs is <= the target, `fairness.fmr_threshold`), each subgroup's TAR and
FAR at it, and each subgroup's TAR at its own threshold for the same FAR; the subgroups' FAR spread
(max - min) and ratio (max / min) at the global threshold. Thresholds are set on all pairs (the folds
are not used).

Intervals: identities resampled with replacement (`bootstrap.subject_counts`, its pair weights: k1*k2
for a pair of two identities, k for a pair within one); every number is computed as a function of the
pair weights, so the unit weights give the point estimate and each replicate re-runs the whole
protocol (RFW's fold thresholds, BFW's thresholds) on its weights.
"""
import csv
import os

import numpy as np
from scipy import sparse
from sklearn.model_selection import KFold

from recognition.data.pairs import parse_pairs
from recognition.evaluation.bootstrap import (LEVEL, REPLICATES, percentile_interval, row_ratio, row_spread,
                                              subject_counts)
from recognition.evaluation.fairness import FAR_TARGETS
from recognition.evaluation.verification import ACC_THRESHOLDS
from recognition.utils import UserError

RFW_SUBSETS = ('African', 'Asian', 'Caucasian', 'Indian')
BFW_COLUMNS = ('p1', 'p2', 'label', 'id1', 'id2', 'att1', 'att2')
NFOLDS = 10
CHUNK_VALUES = 2 ** 24  # replicates x pairs weights per block (128 MB of float64)


def subject_units(subjects1, subjects2):
    """((P,) unit of image 1, unit of image 2, number of identities) for the bootstrap weights: a pair
    within one identity points its second image at the counts' last column (always 1)."""
    names, inv = np.unique(np.r_[subjects1, subjects2], return_inverse=True)
    p = len(subjects1)
    s1, s2 = inv[:p], inv[p:]
    return s1, np.where(s2 == s1, len(names), s2), len(names)


def replicate_weights(units, replicates, seed):
    """Yield (first replicate, (R, P) pair weights) blocks under the identity resamples of `units`."""
    s1, s2, n = units
    step = max(1, min(100, CHUNK_VALUES // max(len(s1), 1)))
    for first in range(0, replicates, step):
        counts = subject_counts(n, seed, first, min(step, replicates - first)).astype(np.float64)
        yield first, counts[:, s1] * counts[:, s2]


def summarise(point, values, replicates):
    """{path: {'value', 'interval' or 'n/a'}} from point estimates and their (replicates,) arrays."""
    out = {}
    for path, v in point.items():
        v = float(v[0])
        reason = None if np.isfinite(v) else 'not defined on the data'
        out[path] = {'value': v if reason is None else None,
                     **(percentile_interval(values[path], reason, replicates) if replicates else {})}
    return out


def bootstrapped(measure, units, replicates, seed, n_pairs):
    """Point estimates (unit weights) and intervals of every number `measure(weights)` returns."""
    point = measure(np.ones((1, n_pairs)))
    values = {k: np.empty(replicates) for k in point}
    for first, w in replicate_weights(units, replicates, seed):
        for k, v in measure(w).items():
            values[k][first:first + len(w)] = v
    return {'numbers': summarise(point, values, replicates), 'replicates': replicates, 'seed': seed, 'level': LEVEL}


# RFW ---------------------------------------------------------------------------------------------------

def read_rfw(root, subsets=RFW_SUBSETS):
    """{subset: (image paths 1, image paths 2, issame, identity 1, identity 2)} of RFW's layout."""
    out = {}
    for s in subsets:
        pairs = parse_pairs(os.path.join(root, 'txts', s, f'{s}_pairs.txt'))
        if len(pairs) < NFOLDS:
            raise UserError(f'{os.path.join(root, "txts", s, f"{s}_pairs.txt")}: {len(pairs)} pairs cannot be '
                            f'split into {NFOLDS} folds')
        a, b, same = zip(*pairs)
        out[s] = ([os.path.join(root, 'data', s, p) for p in a], [os.path.join(root, 'data', s, p) for p in b],
                  np.array(same, dtype=bool), np.array([f'{s}/{p.split("/")[0]}' for p in a]),
                  np.array([f'{s}/{p.split("/")[0]}' for p in b]))
    return out


class FoldAccuracy:
    """insightface's 10-fold accuracy of one pair list for many pair weightings at once.

    Each pair falls in one (fold, label, threshold bin) cell: bin b = the number of thresholds <= its
    distance, so it is accepted (distance < threshold j) exactly for j >= b. Weighted cell sums give
    every threshold's weighted accuracy on each fold and on the other nine; ties go to the first best
    threshold, as `np.argmax` in `verification.evaluate`.
    """

    def __init__(self, dist, issame, nfolds=NFOLDS):
        p = len(dist)
        fold = np.empty(p, dtype=np.int64)
        for f, (_, test) in enumerate(KFold(n_splits=nfolds, shuffle=False).split(np.arange(p))):
            fold[test] = f
        self.nfolds, self.nbins = nfolds, len(ACC_THRESHOLDS) + 1
        b = np.searchsorted(ACC_THRESHOLDS, dist, side='right')
        col = (fold * 2 + issame.astype(np.int64)) * self.nbins + b
        self.cells = sparse.csr_matrix((np.ones(p), (np.arange(p), col)), shape=(p, nfolds * 2 * self.nbins))

    def __call__(self, w):
        """(R,) mean held-out accuracy over the folds for (R, P) weights (NaN where a fold has no weight)."""
        c = np.asarray((self.cells.T @ w.T).T).reshape(len(w), self.nfolds, 2, self.nbins)
        diff, same = c[:, :, 0], c[:, :, 1]
        correct = np.cumsum(same, axis=2)[..., :-1] + (diff.sum(axis=2, keepdims=True)
                                                        - np.cumsum(diff, axis=2)[..., :-1])
        total = c.sum(axis=(2, 3))
        train_correct = correct.sum(axis=1, keepdims=True) - correct
        train_total = total.sum(axis=1, keepdims=True) - total
        with np.errstate(invalid='ignore', divide='ignore'):
            best = np.argmax(train_correct / train_total[..., None], axis=2)
            held_out = np.take_along_axis(correct, best[..., None], axis=2)[..., 0] / total
        fold_ok = np.isfinite(held_out)
        return np.where(fold_ok.any(axis=1), np.nansum(held_out, axis=1) / np.maximum(fold_ok.sum(axis=1), 1),
                        np.nan)


def rfw_measures(subsets):
    """measure(weights) -> {path: (R,)} over the concatenated pairs of `subsets` {name: (dist, issame)}:
    accuracy per subset, mean, std and SER."""
    spans, start = {}, 0
    for name, (dist, issame) in subsets.items():
        spans[name] = (start, start + len(dist), FoldAccuracy(dist, issame))
        start += len(dist)

    def measure(w):
        acc = np.stack([fa(w[:, lo:hi]) for lo, hi, fa in spans.values()], axis=1)
        out = {f'accuracy/{name}': acc[:, j] for j, name in enumerate(spans)}
        out['mean'] = acc.mean(axis=1)
        out['std'] = acc.std(axis=1)
        out['ser'] = row_ratio(1 - acc)
        return out
    return measure


def evaluate_rfw(data, features, replicates=REPLICATES, seed=0):
    """The RFW report of one model: `data` from `read_rfw`, `features` {subset: (L2-normalised features of
    image 1, of image 2)} per pair."""
    subsets, s1, s2 = {}, [], []
    for name, (_, _, issame, a, b) in data.items():
        f1, f2 = features[name]
        subsets[name] = (np.sum((f1 - f2) ** 2, axis=1), issame)
        s1.append(a)
        s2.append(b)
    units = subject_units(np.concatenate(s1), np.concatenate(s2))
    result = bootstrapped(rfw_measures(subsets), units, replicates, seed, sum(len(d) for d, _ in subsets.values()))
    result['pairs'] = {name: int(len(d)) for name, (d, _) in subsets.items()}
    result['identities'] = {name: int(len(np.unique(np.r_[a, b]))) for name, (_, _, _, a, b) in data.items()}
    return result


# BFW ---------------------------------------------------------------------------------------------------

def read_bfw(path):
    """(paths 1, paths 2 relative to the BFW folder, labels, identity 1, identity 2, subgroup per pair or '')
    of a BFW datatable CSV."""
    try:
        with open(path, newline='', encoding='utf-8') as f:
            reader = csv.DictReader(f)
            missing = [c for c in BFW_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f'{path}: missing columns {", ".join(missing)} (needs {", ".join(BFW_COLUMNS)})')
            rows = []
            for row in reader:
                if any(row[c] in (None, '') for c in BFW_COLUMNS):
                    raise UserError(f'{path}:{reader.line_num}: empty {next(c for c in BFW_COLUMNS if not row[c])}')
                if row['label'] not in ('0', '1'):
                    raise UserError(f'{path}:{reader.line_num}: label {row["label"]!r} is not 0 or 1')
                rows.append(tuple(row[c] for c in BFW_COLUMNS))
    except FileNotFoundError:
        raise UserError(f'{path}: BFW datatable not found') from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f'{path}: cannot read ({e})') from None
    if not rows:
        raise UserError(f'{path}: no pairs')
    p1, p2, label, id1, id2, att1, att2 = (np.array(c) for c in zip(*rows))
    labels = label == '1'
    if labels.all() or not labels.any():
        raise UserError(f'{path}: every pair has label {label[0]}; TAR at FAR needs both kinds')
    return list(p1), list(p2), labels, id1, id2, np.where(att1 == att2, att1, '')


def _sorted_sets(scores, labels, groups, names):
    """Index arrays, by score descending, of the genuine and impostor pairs of all pairs and each subgroup."""
    order = np.argsort(-scores, kind='stable')
    sets = {}
    for key, keep in [('all', np.ones(len(scores), bool))] + [(n, groups == n) for n in names]:
        k = keep[order]
        sets[key] = (order[k & labels[order]], order[k & ~labels[order]])
    return sets


def _threshold(scores_desc, cum, target):
    """(R,) lowest thresholds whose weighted FAR over these impostors (scores descending, cumulative weights
    (R, m)) is <= target: `fmr_threshold`'s rule, just above the impostor where the cumulative weight first
    exceeds target x total."""
    m = len(scores_desc)
    if m == 0:
        return np.full(len(cum), np.nan)
    tot = cum[:, -1]
    k = (cum <= target * tot[:, None]).sum(axis=1)
    thr = np.where(k < m, np.nextafter(scores_desc[np.minimum(k, m - 1)], np.inf), scores_desc[-1])
    return np.where(tot > 0, thr, np.nan)


def _share_at_least(scores_desc, cum, thr):
    """(R,) weighted share of these pairs (scores descending, cumulative weights) scoring >= thr (NaN
    without weight or threshold)."""
    if len(scores_desc) == 0:
        return np.full(len(cum), np.nan)
    tot = cum[:, -1]
    n_ge = np.searchsorted(-scores_desc, -np.nan_to_num(thr, nan=np.inf), side='right')
    got = np.where(n_ge > 0, cum[np.arange(len(cum)), np.maximum(n_ge - 1, 0)], 0.0)
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where((tot > 0) & np.isfinite(thr), got / tot, np.nan)


def bfw_measures(scores, labels, groups, names, far_targets=FAR_TARGETS):
    """measure(weights) -> {path: (R,)}: per FAR target the global threshold's TAR overall and per subgroup,
    each subgroup's FAR there, its TAR at its own threshold, and the FAR spread and ratio."""
    sets = _sorted_sets(scores, labels, groups, names)

    def measure(w):
        # per set: (genuine scores, their cumulative weights), (impostor scores, theirs), in score order
        cums = {key: [(scores[i], np.cumsum(w[:, i], axis=1)) for i in pair] for key, pair in sets.items()}
        out = {}
        for far in far_targets:
            base = f'far_{far:.0e}'
            gen, imp = cums['all']
            t_global = _threshold(*imp, far)
            out[f'{base}/tar_global/all'] = _share_at_least(*gen, t_global)
            fars, tars_g, tars_own = [], [], []
            for n in names:
                gen, imp = cums[n]
                fars.append(_share_at_least(*imp, t_global))
                tars_g.append(_share_at_least(*gen, t_global))
                tars_own.append(_share_at_least(*gen, _threshold(*imp, far)))
                out[f'{base}/far_global/{n}'] = fars[-1]
                out[f'{base}/tar_global/{n}'] = tars_g[-1]
                out[f'{base}/tar_own/{n}'] = tars_own[-1]
                out[f'{base}/tar_gain/{n}'] = tars_own[-1] - tars_g[-1]
            fars = np.stack(fars, axis=1)
            out[f'{base}/far_global_spread'] = row_spread(fars)
            out[f'{base}/far_global_ratio'] = row_ratio(fars)
            out[f'{base}/tar_global_spread'] = row_spread(np.stack(tars_g, axis=1))
            out[f'{base}/tar_own_spread'] = row_spread(np.stack(tars_own, axis=1))
        return out
    return measure


def evaluate_bfw(scores, labels, id1, id2, groups, far_targets=FAR_TARGETS, replicates=REPLICATES, seed=0):
    """The BFW report of one model's pair scores (cosines)."""
    names = sorted(set(groups) - {''})
    result = bootstrapped(bfw_measures(scores, labels, groups, names, far_targets), subject_units(id1, id2),
                          replicates, seed, len(scores))
    result['subgroups'] = {n: {'genuine': int((labels & (groups == n)).sum()),
                               'impostor': int((~labels & (groups == n)).sum())} for n in names}
    result['mixed_pairs'] = int((groups == '').sum())
    result['far_targets'] = list(far_targets)
    return result


def format_number(entry, scale=100.0, digits=2):
    """'v [lo, hi]' of a summarised number (in % by default); '[n/a]' when it has no interval (the JSON
    says why)."""
    if entry['value'] is None:
        return 'n/a'
    text = f'{scale * entry["value"]:.{digits}f}'
    if 'interval' in entry:
        lo, hi = entry['interval']
        return text + f' [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]'
    return text + (' [n/a]' if 'n/a' in entry else '')
