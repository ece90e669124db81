"""Accuracy and bias of verification scores with respect to gender and skin colour.

All definitions live here and are documented in docs/metrics.md. The challenge's exact bias formula is
not public to us; (a)-(c) are transparent stand-ins in its spirit (bias measured separately on positive
and negative pairs, adjusted for legitimate attributes, plus NIST-style error-rate differentials), and (d)
is the organisers' per-cell AUC with our aggregation. Their intervals: `bootstrap.py`.

Groups: for each protected attribute (gender; skin colour; their combination) a pair belongs to group g
when *both* images are in g. Mixed pairs (e.g. a female-male impostor pair) count in the global accuracy
but in no group of that attribute; their number is reported. (d)'s cells also need both images to share
every legitimate value. The group names, codes and their index order: `recognition.groups`.
"""
import logging
from dataclasses import dataclass

import numpy as np

from recognition.evaluation.metadata import read_metadata
from recognition.evaluation.pairs_csv import read_labels, read_scores
from recognition.groups import ATTRIBUTES, GENDER_COLUMN, GENDER_SKIN, SKIN_COLUMN, group_index
from recognition.utils import UserError

log = logging.getLogger(__name__)

LEGITIMATE = ('AGE', 'GLASSES', 'HEAD_POSE', 'SOURCE', 'BOUNDING_BOX_SIZE')
FAR_TARGETS = (1e-3, 1e-4)
FMR_TARGET = 1e-3
NUMERIC_BINS = 4  # a numeric legitimate attribute with many values (age, face size) -> quartile bins
MAX_LEVELS = 8


@dataclass
class Pairs:
    """Scored, labelled pairs with each pair's protected groups and legitimate attributes."""
    scores: np.ndarray          # (P,) float
    labels: np.ndarray          # (P,) bool, True = same person
    groups: dict                # attribute -> (P,) int group index, -1 = mixed or unknown
    legitimate: dict            # column -> ((P,) level of image 1, (P,) level of image 2, level names)
    subjects: tuple = None      # ((P,) identity index of image 1, of image 2, number of identities) or None
    subjects_missing: str = ''  # why `subjects` is None


def _read_metadata(path):
    """{column: array of strings} and {template id: row} of the metadata CSV, with the protected columns."""
    return read_metadata(path, ('TEMPLATE_ID', GENDER_COLUMN, SKIN_COLUMN))


def _codes(values, column, path):
    """0/1 codes of a protected column; blank = unknown (-1)."""
    out = np.full(len(values), -1, dtype=np.int64)
    for code in (0, 1):
        out[values == str(code)] = code
    bad = (out < 0) & (values != '')
    if bad.any():
        raise UserError(f'{path}: {column} must be 0 or 1 (or blank), found {values[bad][0]!r}')
    return out


def _levels(values):
    """Integer levels of a legitimate attribute: categories, or quartile bins when numeric with many values."""
    present = values != ''
    try:
        numbers = np.where(present, values, 'nan').astype(np.float64)
        numeric = True
    except ValueError:
        numeric = False
    distinct = np.unique(values[present])
    if numeric and len(distinct) > MAX_LEVELS:
        edges = np.unique(np.nanquantile(numbers, np.linspace(0, 1, NUMERIC_BINS + 1)[1:-1]))
        level = np.where(present, np.searchsorted(edges, numbers, side='right'), -1)
        names = [f'<{edges[0]:g}'] + [f'{a:g}-{b:g}' for a, b in zip(edges[:-1], edges[1:])] + [f'>={edges[-1]:g}']
        level = np.where(present, level, len(names))
        return level, names + ['missing']
    names = [str(v) for v in distinct]
    lookup = {v: i for i, v in enumerate(distinct)}
    level = np.array([lookup.get(v, len(names)) for v in values], dtype=np.int64)
    return level, names + ['missing']


def make_pairs(scores, labels, meta_rows1, meta_rows2, metadata, path='metadata'):
    """`Pairs` from scores, labels and the metadata rows of both images of every pair."""
    gender = _codes(metadata[GENDER_COLUMN], GENDER_COLUMN, path)
    skin = _codes(metadata[SKIN_COLUMN], SKIN_COLUMN, path)
    combo = np.where((gender >= 0) & (skin >= 0), group_index(gender, skin), -1)
    groups = {}
    for attr, codes in (('gender', gender), ('skin', skin), (GENDER_SKIN, combo)):
        a, b = codes[meta_rows1], codes[meta_rows2]
        groups[attr] = np.where(a == b, a, -1)
    legitimate = {}
    for col in LEGITIMATE:
        if col in metadata:
            level, names = _levels(metadata[col])
            if len(names) > 2:  # at least two real levels besides 'missing'
                legitimate[col] = (level[meta_rows1], level[meta_rows2], names)
    subjects, why = None, f'{path}: no SUBJECT_ID column'
    if 'SUBJECT_ID' in metadata:
        ids, code = np.unique(metadata['SUBJECT_ID'].astype(str), return_inverse=True)
        blank = np.nonzero(metadata['SUBJECT_ID'] == '')[0]
        if blank.size:
            why = f'{path}: row {blank[0] + 2} has a blank SUBJECT_ID'
        else:
            subjects, why = (code[meta_rows1], code[meta_rows2], len(ids)), ''
    return Pairs(np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool), groups, legitimate,
                 subjects, why)


def load_pairs(predictions, ground_truth, metadata):
    """Join predictions (TEMPLATE_ID1,TEMPLATE_ID2,SCORE), ground truth (...,LABEL) and metadata.

    Every ground-truth pair needs a prediction (either id order); predictions of pairs the ground truth
    lacks are left out with a warning giving their number.
    """
    p1, p2, scores = read_scores(predictions)
    g1, g2, labels = read_labels(ground_truth)
    if not (len(p1) == len(g1) and (p1 == g1).all() and (p2 == g2).all()):
        lookup = {(a, b): i for i, (a, b) in enumerate(zip(p1, p2))}
        lookup.update({(b, a): i for (a, b), i in list(lookup.items())})
        order = np.array([lookup.get((a, b), -1) for a, b in zip(g1, g2)], dtype=np.int64)
        if (order < 0).any():
            first = int(np.nonzero(order < 0)[0][0])
            raise UserError(f'{predictions}: {int((order < 0).sum())} ground-truth pairs have no prediction '
                            f'(of {len(g1)}; first: {g1[first]},{g2[first]})')
        extra = len(p1) - len(order)
        if extra:
            log.warning('%s: %d predicted pairs are not in %s; left out', predictions, extra, ground_truth)
        scores = scores[order]
    meta, index = _read_metadata(metadata)
    rows1 = np.array([index.get(t, -1) for t in g1], dtype=np.int64)
    rows2 = np.array([index.get(t, -1) for t in g2], dtype=np.int64)
    if (rows1 < 0).any() or (rows2 < 0).any():
        missing = sorted(set(g1[rows1 < 0]) | set(g2[rows2 < 0]))
        raise UserError(f'{metadata}: no row for template ids {", ".join(missing[:20])}'
                        + (f' ... ({len(missing)} in all)' if len(missing) > 20 else ''))
    return make_pairs(scores, labels, rows1, rows2, meta, metadata)


def tar_at_far(fpr, tpr, far):
    """The best TPR with FPR <= far (no interpolation: an operating point that exists)."""
    ok = fpr <= far
    return float(tpr[ok].max()) if ok.any() else 0.0


def eer(scores, labels, roc=None):
    """(equal error rate, its threshold): where FMR and FNMR cross, searched over every operating point
    (`roc` from `Ranked.roc(drop_intermediate=False)`): a curve reduced to its corners can lack the
    thresholds where they meet."""
    fpr, tpr, thr = roc if roc is not None else Ranked(scores, labels).roc(drop_intermediate=False)
    fnr = 1.0 - tpr
    i = int(np.argmin(np.abs(fnr - fpr)))
    return float((fpr[i] + fnr[i]) / 2.0), float(thr[i])


def fmr_threshold(scores, labels, target=FMR_TARGET, impostors_desc=None):
    """The lowest threshold t (match = score >= t) whose FMR over all impostor pairs is <= target."""
    neg = np.sort(scores[~labels])[::-1] if impostors_desc is None else impostors_desc
    allowed = int(np.floor(target * len(neg)))
    if allowed >= len(neg):
        return float(neg[-1])
    return float(np.nextafter(neg[allowed], np.inf))


def _tie_averaged_ranks(desc):
    """1-based ascending ranks of values sorted descending, ties sharing their average rank."""
    n = len(desc)
    starts = np.r_[0, np.nonzero(desc[1:] != desc[:-1])[0] + 1]
    ends = np.r_[starts[1:], n]
    # positions s..e-1 (descending) hold ascending ranks n-s .. n-e+1; their mean:
    return np.repeat(n - (starts + ends - 1) / 2.0, ends - starts)


def normalised_ranks(scores):
    """Ranks scaled to (0, 1) with mean 0.5 (ties share their average rank)."""
    order = np.argsort(-scores, kind='stable')
    out = np.empty(len(scores))
    out[order] = (_tie_averaged_ranks(scores[order]) - 0.5) / len(scores)
    return out


def roc_from_sorted(labels_desc, scores_desc, drop_intermediate=True):
    """(fpr, tpr, thresholds) of labels and scores already sorted by score descending.

    The same curve as sklearn's roc_curve (with its drop_intermediate, a first threshold at inf), without
    its sort, so the whole evaluation shares one sort of the scores.
    """
    idx = np.r_[np.nonzero(scores_desc[1:] != scores_desc[:-1])[0], len(scores_desc) - 1]
    tps = np.cumsum(labels_desc, dtype=np.int64)[idx]
    fps = idx + 1 - tps
    thr = scores_desc[idx]
    if drop_intermediate and len(fps) > 2:
        corner = np.nonzero(np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True])[0]
        fps, tps, thr = fps[corner], tps[corner], thr[corner]
    fps, tps = np.r_[0, fps], np.r_[0, tps]
    return fps / fps[-1], tps / tps[-1], np.r_[np.inf, thr]


def auc(fpr, tpr):
    """Area under a ROC curve (trapezoids)."""
    return float(np.trapz(tpr, fpr))


class Ranked:
    """The pairs sorted once by score, descending: every ROC, threshold and rank derives from this."""

    def __init__(self, scores, labels):
        self.order = np.argsort(-scores, kind='stable')
        self.scores = scores[self.order]
        self.labels = labels[self.order]

    def roc(self, keep=None, drop_intermediate=True):
        """ROC of all pairs, or of those where the boolean mask `keep` (in pair order) is set."""
        if keep is None:
            return roc_from_sorted(self.labels, self.scores, drop_intermediate)
        sel = keep[self.order]
        return roc_from_sorted(self.labels[sel], self.scores[sel], drop_intermediate)

    def shares(self):
        """Per pair (pair order): the share of positive pairs scoring higher and the share of negative pairs
        scoring lower, ties counting half (the per-pair terms of every AUC against all pairs of the
        other polarity)."""
        starts = np.r_[0, np.nonzero(self.scores[1:] != self.scores[:-1])[0] + 1]
        block = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(self.scores)]))
        pos_in = np.add.reduceat(self.labels.astype(np.float64), starts)
        neg_in = np.diff(np.r_[starts, len(self.scores)]) - pos_in
        n_pos, n_neg = pos_in.sum(), neg_in.sum()
        above, below = np.empty(len(self.scores)), np.empty(len(self.scores))
        above[self.order] = ((np.cumsum(pos_in) - pos_in / 2) / n_pos)[block]
        below[self.order] = ((n_neg - np.cumsum(neg_in) + neg_in / 2) / n_neg)[block]
        return above, below

    def polarity_ranks(self, positive):
        """Normalised ranks of the pairs of one polarity among themselves (0 for the other pairs)."""
        sel = self.labels == positive
        out = np.zeros(len(self.scores))
        n = int(sel.sum())
        if n:
            out[self.order[sel]] = (_tie_averaged_ranks(self.scores[sel]) - 0.5) / n
        return out


def _group_means(values, group, n_groups):
    """Mean and count of `values` per group index (>= 0); -1 rows are ignored."""
    count = np.bincount(group + 1, minlength=n_groups + 1)[1:]
    total = np.bincount(group + 1, weights=values, minlength=n_groups + 1)[1:]
    with np.errstate(invalid='ignore', divide='ignore'):
        return total / count, count


def _spread(values, names, se=None):
    """max - min over groups that have data, with the groups named and a standard error if given."""
    ok = [i for i, v in enumerate(values) if np.isfinite(v)]
    if len(ok) < 2:
        return {'spread': None, 'high': None, 'low': None, 'se': None}
    hi, lo = max(ok, key=lambda i: values[i]), min(ok, key=lambda i: values[i])
    return {'spread': float(values[hi] - values[lo]), 'high': names[hi], 'low': names[lo],
            'se': None if se is None else float(se(hi, lo))}


def legitimate_counts(pairs, rows):
    """Dense counts of every legitimate level among the two images of each pair in `rows`.

    Returns (L, spans, levels): L is (len(rows), all levels) float32, spans lists each column's
    (name, offset, number of levels), levels maps a column to the level arrays of both images in `rows`.
    """
    spans, levels, width = [], {}, 0
    for col, (l1, l2, names) in pairs.legitimate.items():
        spans.append((col, width, len(names)))
        levels[col] = (l1[rows], l2[rows])
        width += len(names)
    L = np.zeros(len(rows) * width, dtype=np.float32)
    base = np.arange(len(rows), dtype=np.int64) * width
    for col, off, _ in spans:
        for lev in levels[col]:
            L[base + off + lev] += 1.0  # one entry per row in each statement: no lost duplicates
    return L.reshape(len(rows), width), spans, levels


def adjusted_group_effects(ranks, group, n_groups, pairs, mask, legit=None):
    """Group coefficients of `rank ~ group + legitimate attributes` (least squares) and their covariance.

    Design: group one-hot (no intercept) + per legitimate column the count of each level among the two
    images, first present level dropped as the reference. Solved from the normal equations, whose
    blocks come from bincounts and one small matrix product, never from the full design matrix.
    `legit` is legitimate_counts(pairs, nonzero(mask)) when the caller shares it between attributes.
    """
    rows = np.nonzero(mask)[0]
    L, spans, levels = legit if legit is not None else legitimate_counts(pairs, rows)
    g = group[rows]
    inside = g >= 0
    present = np.bincount(g[inside], minlength=n_groups) > 0
    k = int(present.sum())
    gi = (np.cumsum(present) - 1)[g[inside]]
    y = ranks[rows][inside]
    Li = L[inside]
    width = L.shape[1]
    GtL = np.zeros((k, width))
    Lty = np.zeros(width)
    for col, off, n in spans:
        for lev in (lv[inside] for lv in levels[col]):
            GtL[:, off:off + n] += np.bincount(gi * n + lev, minlength=k * n).reshape(k, n)
            Lty[off:off + n] += np.bincount(lev, weights=y, minlength=n)
    LtL = (Li.T @ Li).astype(np.float64)
    XtX = np.block([[np.diag(np.bincount(gi, minlength=k).astype(np.float64)), GtL], [GtL.T, LtL]])
    Xty = np.r_[np.bincount(gi, weights=y, minlength=k), Lty]
    keep, used = list(range(k)), []
    level_total = np.diag(LtL)
    for col, off, n in spans:
        levels = [off + j for j in range(n) if level_total[off + j] > 0][1:]  # first present: reference
        if levels:
            keep += [k + j for j in levels]
            used.append(col)
    XtX, Xty = XtX[np.ix_(keep, keep)], Xty[keep]
    xtx_inv = np.linalg.pinv(XtX)
    coef = xtx_inv @ Xty
    rss = max(float(y @ y - 2 * coef @ Xty + coef @ XtX @ coef), 0.0)
    sigma2 = rss / max(len(y) - len(keep), 1)
    cov = sigma2 * xtx_inv
    effects = np.full(n_groups, np.nan)
    effects[present] = coef[:k]
    full_cov = np.full((n_groups, n_groups), np.nan)
    idx = np.nonzero(present)[0]
    full_cov[np.ix_(idx, idx)] = cov[:k, :k]
    return effects, full_cov, used


def _polarity_bias(pairs, attr, positive, ranks, legit=None):
    """(a) rank spread and (b) adjusted spread for one attribute on the positive or the negative pairs."""
    names = ATTRIBUTES[attr]
    mask = pairs.labels == positive
    group = np.where(mask, pairs.groups[attr], -1)
    means, counts = _group_means(ranks, group, len(names))
    # Under exchangeable groups a mean of n uniform ranks has variance 1/(12 n).
    rank_se = lambda i, j: np.sqrt(1.0 / (12 * counts[i]) + 1.0 / (12 * counts[j]))
    out = {'pairs': {n: int(c) for n, c in zip(names, counts)},
           'mean_rank': {n: (None if not np.isfinite(m) else float(m)) for n, m in zip(names, means)},
           'rank': _spread(means, names, rank_se)}
    if (counts > 0).sum() >= 2:
        effects, cov, used = adjusted_group_effects(ranks, group, len(names), pairs, mask, legit)
        adj_se = lambda i, j: np.sqrt(max(cov[i, i] + cov[j, j] - 2 * cov[i, j], 0.0))
        centred = effects - np.nanmean(effects)
        out['adjusted_effect'] = {n: (None if not np.isfinite(e) else float(e)) for n, e in zip(names, centred)}
        out['adjusted'] = _spread(centred, names, adj_se)
        out['adjusted']['legitimate'] = used
    else:
        out['adjusted_effect'] = {n: None for n in names}
        out['adjusted'] = _spread([], names)
    return out


def legitimate_cells(pairs):
    """(P,) index of each pair's combination of legitimate values, -1 when its two images differ in one
    of them; and the combinations' names (`AGE=0,GLASSES=1,...`)."""
    if not pairs.legitimate:
        return np.full(len(pairs.scores), -1, dtype=np.int64), []
    code1 = np.zeros(len(pairs.scores), dtype=np.int64)
    code2 = np.zeros(len(pairs.scores), dtype=np.int64)
    for l1, l2, names in pairs.legitimate.values():
        code1, code2 = code1 * len(names) + l1, code2 * len(names) + l2
    same = code1 == code2
    combos, index = np.unique(code1[same], return_inverse=True)
    cells = np.full(len(pairs.scores), -1, dtype=np.int64)
    cells[same] = index
    names = []
    for code in combos.tolist():
        parts = []
        for col, (_, _, levels) in reversed(list(pairs.legitimate.items())):
            code, level = divmod(code, len(levels))
            parts.append(f'{col}={levels[level]}')
        names.append(','.join(reversed(parts)))
    return cells, names


def _cell_bias(pairs, attr, positive, share, cells, combo_names):
    """(d) the organisers' per-cell AUC on one polarity: for each cell (legitimate combination x group) the
    AUC of its positive pairs against all negative pairs (`share` = each pair's share of negatives scoring
    lower), or of its negative pairs against all positive pairs (share of positives scoring higher).

    Per group: the mean of its cells' AUCs over the combinations in which every group has a cell (so the
    groups are compared on the same legitimate values); spread = max - min of those means.
    """
    names = ATTRIBUTES[attr]
    k = len(names)
    sel = (pairs.labels == positive) & (pairs.groups[attr] >= 0) & (cells >= 0)
    key = cells[sel] * k + pairs.groups[attr][sel]
    size = len(combo_names) * k
    counts = np.bincount(key, minlength=size).reshape(-1, k)
    with np.errstate(invalid='ignore', divide='ignore'):
        cell_auc = (np.bincount(key, weights=share[sel], minlength=size).reshape(-1, k) / counts)
    complete = np.nonzero((counts > 0).all(axis=1))[0]
    means = cell_auc[complete].mean(axis=0) if complete.size else np.full(k, np.nan)
    spread = _spread(means, names)
    del spread['se']
    spread.update({'combinations': int(complete.size), 'pairs_in_cells': int(sel.sum()),
                   'reason': None if complete.size else 'no combination of legitimate values has pairs of '
                                                        'every group'})
    cell_list = [{'legitimate': combo_names[x], 'group': names[g], 'pairs': int(counts[x, g]),
                  'auc': float(cell_auc[x, g])} for x, g in zip(*np.nonzero(counts))]
    return {'cell_auc': {n: (None if not np.isfinite(m) else float(m)) for n, m in zip(names, means)},
            'cell': spread, 'cells': cell_list}


def _ratio(values):
    vals = [v for v in values if v is not None]
    if len(vals) < 2:
        return None
    return None if min(vals) == 0 else float(max(vals) / min(vals))


def _error_rates(pairs, attr, threshold):
    """(c) per-group FMR and FNMR at a global threshold (match = score >= threshold)."""
    names = ATTRIBUTES[attr]
    match = pairs.scores >= threshold
    group = pairs.groups[attr]
    fm, n_neg = _group_means(match.astype(float), np.where(~pairs.labels, group, -1), len(names))
    fnm, n_pos = _group_means((~match).astype(float), np.where(pairs.labels, group, -1), len(names))
    fmr = [None if c == 0 else float(v) for v, c in zip(fm, n_neg)]
    fnmr = [None if c == 0 else float(v) for v, c in zip(fnm, n_pos)]
    return {'threshold': float(threshold),
            'fmr': dict(zip(names, fmr)), 'fnmr': dict(zip(names, fnmr)),
            'fmr_ratio': _ratio(fmr), 'fnmr_ratio': _ratio(fnmr),
            'fmr_diff': _spread([np.nan if v is None else v for v in fmr], names)['spread'],
            'fnmr_diff': _spread([np.nan if v is None else v for v in fnmr], names)['spread']}


def group_roc(pairs, attr, ranked=None):
    """{group: (fpr, tpr, auc)} for the groups holding both positive and negative pairs."""
    ranked = ranked or Ranked(pairs.scores, pairs.labels)
    out = {}
    for g, name in enumerate(ATTRIBUTES[attr]):
        m = pairs.groups[attr] == g
        if m.any() and 0 < pairs.labels[m].sum() < m.sum():
            fpr, tpr, _ = ranked.roc(m)
            out[name] = (fpr, tpr, auc(fpr, tpr))
    return out


def evaluate_pairs(pairs):
    """Every accuracy and bias number of the report, as a JSON-ready dict."""
    labels, scores = pairs.labels, pairs.scores
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise UserError(f'ground truth: need positive and negative pairs (got {n_pos} and {n_neg})')
    ranked = Ranked(scores, labels)
    roc = ranked.roc()
    fpr, tpr, _ = roc
    eer_value, eer_thr = eer(scores, labels, ranked.roc(drop_intermediate=False))
    thresholds = {'fmr_1e-3': fmr_threshold(scores, labels, impostors_desc=ranked.scores[~ranked.labels]),
                  'eer': eer_thr}
    result = {
        'pairs': {'total': len(scores), 'positive': n_pos, 'negative': n_neg},
        'accuracy': {'auc': auc(fpr, tpr),
                     'tar_at_far': {f'{f:.0e}': tar_at_far(fpr, tpr, f) for f in FAR_TARGETS},
                     'eer': eer_value, 'thresholds': thresholds},
        'bias': {}, 'group_auc': {}, 'mixed_pairs': {},
    }
    polarity = {}
    for positive in (True, False):
        rows = np.nonzero(labels == positive)[0]
        polarity[positive] = (ranked.polarity_ranks(positive), legitimate_counts(pairs, rows))
    above, below = ranked.shares()
    cells, combo_names = legitimate_cells(pairs)
    result['group_auc_gap'] = {}
    for attr in ATTRIBUTES:
        result['group_auc'][attr] = {g: v[2] for g, v in group_roc(pairs, attr, ranked).items()}
        result['group_auc_gap'][attr] = _spread(list(result['group_auc'][attr].values()),
                                                list(result['group_auc'][attr]))['spread']
        result['mixed_pairs'][attr] = int((pairs.groups[attr] < 0).sum())
        result['bias'][attr] = {
            'positive': {**_polarity_bias(pairs, attr, True, *polarity[True]),
                         **_cell_bias(pairs, attr, True, below, cells, combo_names)},
            'negative': {**_polarity_bias(pairs, attr, False, *polarity[False]),
                         **_cell_bias(pairs, attr, False, above, cells, combo_names)},
            'error_rates': {name: _error_rates(pairs, attr, t) for name, t in thresholds.items()},
        }
    result['worst_group'] = worst_group(result)
    return result


WORST_GROUP_CRITERIA = ('auc', 'errors', 'rank')


def group_badness(result, attr='gender_skin', criterion='auc'):
    """How badly the model treats each group of `attr` (higher = worse), by `criterion`:

    `auc`: minus the AUC within the group (how well the model separates its people); `errors`: FMR + FNMR
    at the global EER threshold (what one deployed threshold does to the group); `rank`: effect on
    negative pairs - effect on positive pairs, with the adjusted effects (b) when they exist, else the
    mean ranks (a). `rank` compares score shifts, so a group whose scores are all higher (people look
    alike) can cancel out; `auc` and `errors` do not.
    """
    if criterion == 'auc':
        return {g: -v for g, v in result['group_auc'][attr].items() if v is not None}
    if criterion == 'errors':
        rates = result['bias'][attr]['error_rates']['eer']
        return {g: rates['fmr'][g] + rates['fnmr'][g] for g in rates['fmr']
                if rates['fmr'][g] is not None and rates['fnmr'].get(g) is not None}
    if criterion != 'rank':
        raise UserError(f'criterion {criterion!r}: choose from {", ".join(WORST_GROUP_CRITERIA)}')
    bias = result['bias'][attr]

    def effect(polarity):
        adj = bias[polarity]['adjusted_effect']
        return adj if any(v is not None for v in adj.values()) else bias[polarity]['mean_rank']
    neg, pos = effect('negative'), effect('positive')
    return {g: neg[g] - pos[g] for g in ATTRIBUTES[attr] if neg.get(g) is not None and pos.get(g) is not None}


def worst_group(result, attr='gender_skin', criterion='auc'):
    """The most disadvantaged group of `attr` by `criterion` (see group_badness), or None."""
    badness = group_badness(result, attr, criterion)
    return max(badness, key=badness.get) if badness else None


def evaluate_predictions(predictions, ground_truth, metadata):
    """The report dict for a predictions CSV, its ground truth and the image metadata (all paths)."""
    return evaluate_pairs(load_pairs(predictions, ground_truth, metadata))
