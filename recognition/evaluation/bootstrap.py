"""Subject-level bootstrap of the report's numbers: percentile intervals and paired differences.

Resampling rule: the identities (SUBJECT_ID) are drawn with replacement, n of n (multinomial counts k);
pairs follow their identities. A pair of two different identities counts k1*k2 times (every copy of one
identity meets every copy of the other, as in a two-way bootstrap of pair data); a pair within one
identity counts k times (each copy brings its own genuine pairs; two copies of one person are not a new
pair of that person). Identities, not pairs, are the independent units: the pairs of one person share
its face, so resampling pairs would make the intervals too narrow.

Replicate r's counts come from `default_rng([seed, r])`: the intervals do not depend on the chunking,
and two score sets on the same pairs see the same resamples (the paired comparison).

Speed: every measure is evaluated as a function of per-pair weights on the evaluation's one score sort.
Cumulative weights give each pair's weighted share of the other polarity above or below it (AUC, ranks,
(d)) and the ROC (TAR@FAR, EER, both thresholds, found by bisection); per-group orders fixed once give
the group AUCs; group sums are float64 bincounts over the pairs' distinct memberships; the adjusted
regression (b) is solved per replicate from normal equations summed over the distinct design rows.
Replicates go in chunks (the rows of a replicates x pairs integer matrix).
"""
import numpy as np
from scipy import sparse

from recognition.evaluation.fairness import FAR_TARGETS, FMR_TARGET, Ranked, legitimate_cells, legitimate_counts
from recognition.groups import ATTRIBUTES
from recognition.utils import UserError

REPLICATES = 1000
LEVEL = 0.95
INT32_LIMIT = 2 ** 31  # doubled sums at or above it go to int64
MAX_UNDEFINED = 0.05  # share of replicates a number may be undefined in and still get an interval
CHUNK_BYTES = 128 * 2 ** 20  # one replicates x pairs int32 matrix; about eight are alive at once
POLARITIES = (('positive', True), ('negative', False))
THRESHOLDS = ('fmr_1e-3', 'eer')
RULE = ('identities resampled with replacement (n of n); a pair of two identities drawn k1 and k2 times '
        'counts k1*k2 times, a pair within one identity drawn k times counts k times')


def subject_counts(n_subjects, seed, first, count):
    """(count, n_subjects + 1) identity counts of replicates first..first+count-1; the last column is 1
    (the second factor of a pair within one identity)."""
    counts = np.ones((count, n_subjects + 1), dtype=np.float32)
    p = np.full(n_subjects, 1.0 / n_subjects)
    for j in range(count):
        counts[j, :-1] = np.random.default_rng([seed, first + j]).multinomial(n_subjects, p)
    return counts


def row_spread(values):
    """max - min over the columns with a value, per row (NaN with fewer than two)."""
    finite = np.isfinite(values)
    hi = np.max(np.where(finite, values, -np.inf), axis=1)
    lo = np.min(np.where(finite, values, np.inf), axis=1)
    return np.where(finite.sum(axis=1) >= 2, hi - lo, np.nan)


def row_ratio(values):
    """max / min over the columns with a value, per row (NaN with fewer than two or a zero minimum)."""
    finite = np.isfinite(values)
    hi = np.max(np.where(finite, values, -np.inf), axis=1)
    lo = np.min(np.where(finite, values, np.inf), axis=1)
    ok = (finite.sum(axis=1) >= 2) & (lo > 0)
    return np.where(ok, hi / np.where(ok, lo, 1), np.nan)


def _divide(a, b):
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def _row_dots(a, b):
    """Row-wise dot products of two integer matrices, in float64."""
    return np.einsum('rp,rp->r', a, b, dtype=np.float64, casting='safe')


def _row_sums(a):
    return a.sum(axis=1, dtype=np.float64)


def distinct_rows(columns):
    """(dense id of each row's distinct combination of the integer columns (values >= -1), number of ids,
    index of one row per id), by re-indexing column after column (no sort of whole rows)."""
    ids, top = np.zeros(len(columns[0]), dtype=np.int64), 1
    for c in columns:
        radix = int(c.max()) + 2 if len(c) else 1
        if top * radix >= 2 ** 62:  # re-index densely before the mixed-radix code could overflow
            _, ids = np.unique(ids, return_inverse=True)
            ids, top = ids.reshape(-1), int(ids.max()) + 1
        ids, top = ids * radix + (c + 1), top * radix
    _, ids = np.unique(ids, return_inverse=True)
    ids = ids.reshape(-1)
    n = int(ids.max()) + 1 if len(ids) else 0
    first = np.zeros(n, dtype=np.int64)
    first[ids[::-1]] = np.arange(len(ids))[::-1]
    return ids, n, first


class WeightedEvaluation:
    """The measures of `fairness.evaluate_pairs` for many weightings of the pairs at once.

    Arrays are (replicates, pairs in score order) of integers: weights are products of identity counts,
    ties count half, so every per-pair quantity is kept doubled and exact (int32 when a chunk's weights
    cannot overflow it, else int64: int32 cumulative sums run several times faster than float ones);
    sums over pairs are float64.
    """

    def __init__(self, pairs):
        if pairs.subjects is None:
            raise UserError(f'{pairs.subjects_missing}: the bootstrap resamples identities '
                            f'(or pass --bootstrap 0)')
        self.pairs = pairs
        ranked = Ranked(pairs.scores, pairs.labels)
        order = ranked.order
        n = len(order)
        self.dtype = np.int32  # identity counts and, when they fit, the weights and their doubled sums
        s1, s2, self.n_subjects = pairs.subjects
        self.s1 = s1[order]
        self.s2 = np.where(s2[order] == self.s1, self.n_subjects, s2[order])
        self.pos = ranked.labels
        self.pos_w = self.pos.astype(self.dtype)
        desc = ranked.scores
        self.starts = np.r_[0, np.nonzero(desc[1:] != desc[:-1])[0] + 1]
        self.ties = len(self.starts) < n
        self.block_end = np.r_[self.starts[1:], n]  # pairs passing a threshold at block b: [:block_end[b]]
        self.block = np.repeat(np.arange(len(self.starts)), np.diff(np.r_[self.starts, n])) if self.ties else None
        self.groups = {attr: g[order] for attr, g in pairs.groups.items()}
        cells, self.combo_names = legitimate_cells(pairs)
        self._memberships(cells[order])
        self._group_orders(desc)
        self._designs(order)
        self._super_keys()
        self._buffers = {}

    def _memberships(self, cells):
        """Each pair's key: its polarity, groups and (d) cells; keys -> the columns they add to."""
        pos = self.pos.astype(np.int64)
        slots, self.offset, width = [pos], {}, 2
        n_combos = len(self.combo_names)
        for attr, names in ATTRIBUTES.items():
            g, k = self.groups[attr], len(names)
            self.offset[attr, 'group'] = width
            slots.append(np.where(g >= 0, width + g * 2 + pos, -1))
            width += 2 * k
            self.offset[attr, 'cell'] = width
            slots.append(np.where((g >= 0) & (cells >= 0), width + (cells * k + g) * 2 + pos, -1))
            width += 2 * k * n_combos
        self.key, _, first = distinct_rows(slots)
        keys = np.stack(slots, axis=1)[first]
        rows, cols = np.nonzero(keys >= 0)
        self.key_columns = sparse.csr_matrix((np.ones(len(rows)), (rows, keys[rows, cols])),
                                             shape=(len(keys), width))

    def column(self, attr, kind, positive):
        """Column indices of `kind` ('group' or 'cell') sums of one polarity: (groups,) or (combos, groups)."""
        k = len(ATTRIBUTES[attr])
        off = self.offset[attr, kind] + int(positive)
        if kind == 'group':
            return off + 2 * np.arange(k)
        return off + 2 * (np.arange(len(self.combo_names))[:, None] * k + np.arange(k)[None, :])

    def _group_orders(self, desc):
        """Per attribute: its group pairs ordered by (group, score desc), with tie blocks inside groups."""
        self.order_by_group = {}
        for attr in ATTRIBUTES:
            g = self.groups[attr]
            perm = np.nonzero(g >= 0)[0]
            perm = perm[np.argsort(g[perm], kind='stable')]
            gs, sc = g[perm], desc[perm]
            starts = np.r_[0, np.nonzero((gs[1:] != gs[:-1]) | (sc[1:] != sc[:-1]))[0] + 1]
            bounds = np.r_[0, np.nonzero(gs[1:] != gs[:-1])[0] + 1, len(perm)] if len(perm) else np.zeros(1, int)
            self.order_by_group[attr] = {
                'perm': perm, 'pos': self.pos_w[perm], 'neg': 1 - self.pos_w[perm], 'n': len(perm),
                'starts': starts if len(starts) < len(perm) else None,
                'bounds': bounds, 'segment_group': gs[bounds[:-1]] if len(perm) else np.zeros(0, int)}

    def _designs(self, order):
        """(b): the design of `rank ~ group + legitimate levels` per attribute and polarity (the columns
        `fairness.adjusted_group_effects` keeps), reduced to its distinct rows."""
        self.design = {}
        self.design_row = {}
        for attr, names in ATTRIBUTES.items():
            row = np.full(len(self.pos), -1, dtype=np.int64)
            n_rows = 0
            for _, positive in POLARITIES:
                sel = np.nonzero((self.pos == positive) & (self.groups[attr] >= 0))[0]
                g = self.groups[attr][sel]
                present = np.nonzero(np.bincount(g, minlength=len(names)) > 0)[0]
                if len(present) < 2:
                    continue
                # rows with the same group and the same (unordered) levels of both images are equal
                rows_in_pairs = order[sel]
                codes, total = [g], []
                for l1, l2, levels_ in self.pairs.legitimate.values():
                    a, b = l1[rows_in_pairs], l2[rows_in_pairs]
                    codes.append(np.minimum(a, b) * len(levels_) + np.maximum(a, b))
                    total.append(np.bincount(np.r_[a, b], minlength=len(levels_)))
                total = np.concatenate(total) if total else np.zeros(0)
                inverse, _, first = distinct_rows(codes)
                L, spans, _ = legitimate_counts(self.pairs, rows_in_pairs[first])
                levels = [j for _, off, n in spans for j in [off + i for i in range(n) if total[off + i] > 0][1:]]
                rows = np.hstack([g[first][:, None] == present[None, :], L[:, levels]]).astype(np.float64)
                row[sel] = n_rows + inverse
                upper = np.triu_indices(rows.shape[1])
                self.design[attr, positive] = {
                    'present': present, 'rows': rows, 'upper': upper, 'span': (n_rows, n_rows + len(rows)),
                    'products': rows[:, upper[0]] * rows[:, upper[1]]}
                n_rows += len(rows)
            self.design_row[attr] = (row, n_rows)

    def _super_keys(self):
        """One index per pair for its key and its three design rows: a single sparse sum serves them all."""
        parts = [self.key] + [self.design_row[attr][0] for attr in ATTRIBUTES]
        self.super_index, self.n_super, first = distinct_rows(parts)
        combos = np.stack(parts, axis=1)[first]
        ones = np.ones(len(combos))
        self.super_key = sparse.csr_matrix((ones, (np.arange(len(combos)), combos[:, 0])),
                                           shape=(len(combos), self.key_columns.shape[0]))
        self.super_columns = (self.super_key @ self.key_columns).tocsr()
        self.super_design = {}
        for j, attr in enumerate(ATTRIBUTES):
            ok = combos[:, j + 1] >= 0
            self.super_design[attr] = sparse.csr_matrix(
                (ones[ok], (np.nonzero(ok)[0], combos[ok, j + 1])), shape=(len(combos), self.design_row[attr][1]))

    def _buffer(self, name, rows, cols, dtype=None):
        """A reused (rows, cols) work array: fresh arrays of this size cost more in page faults than in
        arithmetic."""
        dtype = np.dtype(dtype or self.dtype)
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.dtype != dtype:
            buf = self._buffers[name] = np.empty((rows, cols), dtype=dtype)
        return buf[:rows]

    def _bincount(self, index, row, minlength):
        """np.bincount of one integer row through a reused float64 copy (no fresh 8-byte array per call)."""
        tmp = self._buffer('f64', 1, len(self.pos), np.float64)[0, :len(row)]
        np.copyto(tmp, row)
        return np.bincount(index, weights=tmp, minlength=minlength)

    def _sums(self, V):
        """(replicates, super keys) float64 sums of V's pairs."""
        return np.stack([self._bincount(self.super_index, v, self.n_super) for v in V])

    def measures(self, counts):
        """{path: (replicates,) values} of every bootstrapped number under identity counts
        (replicates, n_subjects + 1)."""
        counts = counts.astype(self.dtype)
        R, n = counts.shape[0], len(self.pos)
        W = self._buffer('w', R, n)
        for r in range(R):  # fancy indexing: several times faster than np.take here
            np.multiply(counts[r][self.s1], counts[r][self.s2], out=W[r])
        # the largest doubled quantity is a weight times twice a polarity's total weight
        if 2 * int(W.max()) * int(W.sum(axis=1, dtype=np.int64).max()) >= INT32_LIMIT:
            wide = self._buffer('w64', R, n, np.int64)
            wide[:] = W
            W = wide
        dt = W.dtype
        Wp = np.multiply(W, self.pos_w, out=self._buffer('wp', R, n, dt))
        Wn = np.subtract(W, Wp, out=self._buffer('wn', R, n, dt))
        if self.ties:
            Wp, Wn = np.add.reduceat(Wp, self.starts, axis=1), np.add.reduceat(Wn, self.starts, axis=1)
        nb = Wp.shape[1]
        cum_p = np.cumsum(Wp, axis=1, dtype=dt, out=self._buffer('cp', R, nb, dt))
        cum_n = np.cumsum(Wn, axis=1, dtype=dt, out=self._buffer('cn', R, nb, dt))
        tot_p, tot_n = cum_p[:, -1].astype(np.float64), cum_n[:, -1].astype(np.float64)
        out, passing = self._roc(cum_p, cum_n, tot_p, tot_n)
        # in place, doubled: cum_p -> positive weight above each block, cum_n -> negative weight below,
        # a block's own pairs counting half
        cum_p *= 2
        cum_p -= Wp
        cum_n *= -2
        cum_n += Wn
        cum_n += 2 * tot_n.astype(dt)[:, None]
        above, below = cum_p, cum_n
        if self.ties:
            above = np.stack([a[self.block] for a in above])
            below = np.stack([b[self.block] for b in below])
        sums_w = self._sums(W)
        above *= W
        sums_above = self._sums(above) / 2
        below *= W
        sums_below = self._sums(below) / 2
        del above, below
        col_w = sums_w @ self.super_columns
        col_above = sums_above @ self.super_columns
        col_below = sums_below @ self.super_columns
        out['accuracy/auc'] = col_above[:, 0] / (tot_p * tot_n)
        for attr, names in ATTRIBUTES.items():
            self._group_auc(out, attr, names, W)
            for pol, positive in POLARITIES:
                base = f'bias/{attr}/{pol}'
                c = self.column(attr, 'group', positive)
                # a pair's normalised rank in its polarity: positives (tot_p - above)/tot_p, negatives below/tot_n
                if positive:
                    rank_sum = (tot_p[:, None] * col_w[:, c] - col_above[:, c]) / tot_p[:, None]
                else:
                    rank_sum = col_below[:, c] / tot_n[:, None]
                mean_rank = _divide(rank_sum, col_w[:, c])
                self._per_group(out, f'{base}/mean_rank', names, mean_rank)
                out[f'{base}/rank/spread'] = row_spread(mean_rank)
                self._adjusted(out, attr, names, positive, sums_w, sums_above, sums_below, tot_p, tot_n, base)
                cc = self.column(attr, 'cell', positive)
                # (d): a positive cell's negatives below / tot_n, a negative cell's positives above / tot_p
                share = (col_below[:, cc] / tot_n[:, None, None]) if positive else \
                    (col_above[:, cc] / tot_p[:, None, None])
                cell_auc = _divide(share, col_w[:, cc])  # (R, combos, groups)
                # the combinations where every group has cells in this replicate (fairness._cell_bias)
                complete = (col_w[:, cc] > 0).all(axis=2)
                n_complete = complete.sum(axis=1)[:, None]
                total = np.where(complete[:, :, None], np.nan_to_num(cell_auc), 0).sum(axis=1)
                means = np.where(n_complete > 0, total / np.maximum(n_complete, 1), np.nan)
                self._per_group(out, f'{base}/cell_auc', names, means)
                out[f'{base}/cell/spread'] = row_spread(means)
        self._error_rates(out, W, col_w, passing)
        return out

    def _roc(self, cum_p, cum_n, tot_p, tot_n):
        """TAR@FAR, EER and the pairs each threshold lets pass, from the cumulative weights (every search
        is a bisection on the monotone cumulative curves: no pass over the whole matrix)."""
        out = {}
        R, nb = cum_p.shape
        rows = np.arange(R)

        def count(below):
            """Per row, the number of blocks j with below(row, j) true (a prefix of the blocks)."""
            lo, hi = np.zeros(R, dtype=np.int64), np.full(R, nb)
            while (lo < hi).any():
                mid = (lo + hi) // 2
                ok = below(np.minimum(mid, nb - 1)) & (lo < hi)
                lo, hi = np.where(ok, mid + 1, lo), np.where(ok | (lo >= hi), hi, mid)
            return lo

        at_n = lambda j: cum_n[rows, j].astype(np.float64)
        at_p = lambda j: cum_p[rows, j].astype(np.float64)
        for far in FAR_TARGETS:
            b = count(lambda j: at_n(j) / tot_n <= far)  # the point estimate's fpr <= far, exactly
            out[f'accuracy/tar_at_far/{far:.0e}'] = np.where(b > 0, at_p(np.maximum(b - 1, 0)) / tot_p, 0.0)
        # fnr - fpr falls along the curve: its sign change, then the nearest point among the neighbours
        c = count(lambda j: at_p(j) / tot_p + at_n(j) / tot_n < 1)
        cand = np.clip(c[:, None] + np.arange(-2, 2)[None, :], 0, nb - 1)
        fpr = cum_n[rows[:, None], cand] / tot_n[:, None]
        fnr = 1 - cum_p[rows[:, None], cand] / tot_p[:, None]
        best = np.argmin(np.abs(fnr - fpr), axis=1)
        out['accuracy/eer'] = (fpr[rows, best] + fnr[rows, best]) / 2
        allowed = np.floor(FMR_TARGET * tot_n)
        fmr_blocks = count(lambda j: at_n(j) <= allowed)
        ends = np.r_[0, self.block_end]
        return out, {'fmr_1e-3': ends[fmr_blocks], 'eer': ends[cand[rows, best] + 1]}

    def _error_rates(self, out, W, col_w, passing):
        """(c) per-group FMR and FNMR: the weights of the pairs above each replicate's threshold."""
        n_keys = self.key_columns.shape[0]
        for name in THRESHOLDS:
            keys = np.stack([self._bincount(self.key[:m], W[r, :m], n_keys) for r, m in enumerate(passing[name])])
            col_m = keys @ self.key_columns
            for attr, names in ATTRIBUTES.items():
                neg_c, pos_c = self.column(attr, 'group', False), self.column(attr, 'group', True)
                fmr = _divide(col_m[:, neg_c], col_w[:, neg_c])
                fnmr = 1 - _divide(col_m[:, pos_c], col_w[:, pos_c])
                base = f'bias/{attr}/error_rates/{name}'
                self._per_group(out, f'{base}/fmr', names, fmr)
                self._per_group(out, f'{base}/fnmr', names, fnmr)
                out[f'{base}/fmr_ratio'], out[f'{base}/fnmr_ratio'] = row_ratio(fmr), row_ratio(fnmr)
                out[f'{base}/fmr_diff'], out[f'{base}/fnmr_diff'] = row_spread(fmr), row_spread(fnmr)

    @staticmethod
    def _per_group(out, base, names, values):
        for j, g in enumerate(names):
            out[f'{base}/{g}'] = values[:, j]

    def _group_auc(self, out, attr, names, W):
        """AUC within each group: its negatives' weighted share of its positives above them, in the
        attribute's (group, score) order."""
        o = self.order_by_group[attr]
        R = W.shape[0]
        aucs = np.full((R, len(names)), np.nan)
        if o['n']:
            Pg = self._buffer('gp', R, o['n'], W.dtype)
            for r in range(R):
                Pg[r] = W[r][o['perm']]
            Ng = np.multiply(Pg, o['neg'], out=self._buffer('gn', R, o['n'], W.dtype))
            Pg *= o['pos']
            bounds, ties = o['bounds'], o['starts'] is not None
            if ties:  # sum each tie block first
                Pg, Ng = np.add.reduceat(Pg, o['starts'], axis=1), np.add.reduceat(Ng, o['starts'], axis=1)
                bounds = np.searchsorted(o['starts'], bounds)
            cum = np.cumsum(Pg, axis=1, dtype=W.dtype, out=self._buffer('gc', R, Pg.shape[1], W.dtype))
            if ties:  # doubled positive weight above each block, its own positives counting half
                cum *= 2
                cum -= Pg
            for j, g in enumerate(o['segment_group']):
                a, b = bounds[j], bounds[j + 1]
                n_neg, n_pos = _row_sums(Ng[:, a:b]), _row_sums(Pg[:, a:b])
                # the positives of the groups before this one in the order, taken off (doubled with ties)
                before = np.zeros(R) if not a else cum[:, a - 1].astype(np.float64) + (Pg[:, a - 1] if ties else 0)
                above = _row_dots(Ng[:, a:b], cum[:, a:b]) - before * n_neg
                aucs[:, g] = _divide(above / 2 if ties else above, n_pos * n_neg)
        self._per_group(out, f'group_auc/{attr}', names, aucs)
        out[f'group_auc_gap/{attr}'] = row_spread(aucs)

    def _adjusted(self, out, attr, names, positive, sums_w, sums_above, sums_below, tot_p, tot_n, base):
        """(b) per replicate: the weighted normal equations of the design's distinct rows, solved."""
        R = sums_w.shape[0]
        effects = np.full((R, len(names)), np.nan)
        d = self.design.get((attr, positive))
        if d is not None:
            lo, hi = d['span']
            to_rows = self.super_design[attr][:, lo:hi]
            w = sums_w @ to_rows
            y = ((tot_p[:, None] * w - sums_above @ to_rows) / tot_p[:, None] if positive
                 else (sums_below @ to_rows) / tot_n[:, None])
            q, k = d['rows'].shape[1], len(d['present'])
            xtx = np.zeros((R, q, q))
            tri = w @ d['products']
            xtx[:, d['upper'][0], d['upper'][1]] = tri
            xtx[:, d['upper'][1], d['upper'][0]] = tri
            xty = y @ d['rows']
            coef = np.einsum('rij,rj->ri', np.linalg.pinv(xtx), xty)[:, :k]
            coef[xtx[:, np.arange(k), np.arange(k)] == 0] = np.nan  # a group the replicate left out
            effects[:, d['present']] = coef
        with np.errstate(invalid='ignore'):
            centred = effects - np.nanmean(effects, axis=1, keepdims=True)
        self._per_group(out, f'{base}/adjusted_effect', names, centred)
        out[f'{base}/adjusted/spread'] = row_spread(centred)


def chunk_size(pairs):
    """Replicates per chunk: one (replicates x pairs) int32 matrix of about CHUNK_BYTES."""
    return int(max(1, min(64, CHUNK_BYTES // (4 * max(len(pairs.scores), 1)))))


def replicate_measures(evaluations, replicates, seed):
    """{path: (replicates,) array} per evaluation, all under the same identity resamples."""
    n_subjects = evaluations[0].n_subjects
    step = chunk_size(evaluations[0].pairs)
    parts = [[] for _ in evaluations]
    for first in range(0, replicates, step):
        counts = subject_counts(n_subjects, seed, first, min(step, replicates - first))
        for part, ev in zip(parts, evaluations):
            part.append(ev.measures(counts))
    return [{k: np.concatenate([p[k] for p in part]) for k in part[0]} for part in parts]


def value_at(result, path):
    """The point estimate at a '/'-joined path of the result dict (None when absent)."""
    node = result
    for key in path.split('/'):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def group_support(pairs):
    """{(attr, group): (identities, positive pairs, negative pairs)} of every group."""
    s1, s2, _ = pairs.subjects
    out = {}
    for attr, names in ATTRIBUTES.items():
        for g, name in enumerate(names):
            m = pairs.groups[attr] == g
            out[attr, name] = (len(np.unique(np.r_[s1[m], s2[m]])), int((m & pairs.labels).sum()),
                               int((m & ~pairs.labels).sum()))
    return out


def _reason(path, point, support):
    """Why a path has no interval before looking at replicates, or None."""
    parts = path.split('/')
    group = parts[-1]
    attr = parts[1] if len(parts) > 1 else None
    if (attr, group) in support:
        ids, n_pos, n_neg = support[attr, group]
        if ids < 2:
            return f'{ids} identit{"y" if ids == 1 else "ies"} in {group}'
        if point is None:
            missing = [p for p, n in (('positive', n_pos), ('negative', n_neg)) if n == 0]
            return f'no {" or ".join(missing)} pairs in {group}' if missing else 'not defined on the data'
    if point is None:
        return 'not defined on the data'
    return None


def percentile_interval(values, reason, replicates):
    """The percentile interval over the replicates where the number is defined (a resample can leave a
    small group without pairs of one polarity); n/a when that happens in more than MAX_UNDEFINED of them."""
    if reason is not None:
        return {'n/a': reason}
    ok = np.isfinite(values)
    bad = int((~ok).sum())
    if bad > MAX_UNDEFINED * replicates:
        return {'n/a': f'undefined in {bad} of {replicates} replicates'}
    lo, hi = np.percentile(values[ok], [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return {'interval': [float(lo), float(hi)], **({'undefined': bad} if bad else {})}


def worst_group_ranking(result, measures, intervals, attr='gender_skin'):
    """The lowest-AUC group with its interval and the runner-up's; resolved when the two do not overlap."""
    aucs = {g: v for g, v in result['group_auc'][attr].items() if v is not None}
    if len(aucs) < 2:
        return None
    worst, runner = sorted(aucs, key=aucs.get)[:2]
    iw, ir = (intervals[f'group_auc/{attr}/{g}'] for g in (worst, runner))
    resolved = None
    if 'interval' in iw and 'interval' in ir:
        resolved = iw['interval'][1] < ir['interval'][0]
    table = np.stack([measures[f'group_auc/{attr}/{g}'] for g in ATTRIBUTES[attr]], axis=1)
    defined = np.isfinite(table).any(axis=1)
    picks = np.nanargmin(np.where(np.isfinite(table), table, np.inf)[defined], axis=1)
    share = float(np.mean(np.array(ATTRIBUTES[attr])[picks] == worst)) if picks.size else None
    return {'attribute': attr, 'criterion': 'auc', 'group': worst, 'auc': aucs[worst], **_tag(iw),
            'runner_up': runner, 'runner_up_auc': aucs[runner], 'runner_up_interval': ir.get('interval'),
            'resolved': resolved, 'share_of_replicates': share}


def _tag(iv):
    return {'interval': iv.get('interval'), 'interval_na': iv.get('n/a')}


def bootstrap(pairs, result, replicates=REPLICATES, seed=0):
    """95% percentile intervals of every bootstrapped number of `result` (fairness.evaluate_pairs of
    `pairs`): {'replicates', 'seed', 'level', 'rule', 'values': {path: {'interval': [lo, hi]} or
    {'n/a': reason}}, 'worst_group': ...}."""
    measures = replicate_measures([WeightedEvaluation(pairs)], replicates, seed)[0]
    support = group_support(pairs)
    values = {p: percentile_interval(v, _reason(p, value_at(result, p), support), replicates)
              for p, v in measures.items()}
    return {'replicates': replicates, 'seed': seed, 'level': LEVEL, 'rule': RULE, 'values': values,
            'worst_group': worst_group_ranking(result, measures, values)}


def compare(pairs_a, result_a, pairs_b, result_b, replicates=REPLICATES, seed=0, names=('a', 'b')):
    """Paired differences (second - first) of every bootstrapped number, both score sets under the same
    resamples; `names` name the two score sets."""
    same = (np.array_equal(pairs_a.labels, pairs_b.labels) and pairs_a.subjects is not None
            and pairs_b.subjects is not None
            and all(np.array_equal(x, y) for x, y in zip(pairs_a.subjects[:2], pairs_b.subjects[:2])))
    if not same:
        raise UserError(f'{names[1]}: not scored on the same pairs as {names[0]}; a paired comparison needs '
                        f'the same ground truth and metadata')
    ma, mb = replicate_measures([WeightedEvaluation(pairs_a), WeightedEvaluation(pairs_b)], replicates, seed)
    support = group_support(pairs_a)
    out = {}
    for path in ma:
        a, b = value_at(result_a, path), value_at(result_b, path)
        reason = _reason(path, a, support) or _reason(path, b, support)
        iv = percentile_interval(mb[path] - ma[path], reason, replicates)
        lo_hi = iv.get('interval')
        out[path] = {'first': a, 'second': b, 'difference': None if a is None or b is None else b - a, **_tag(iv),
                     'excludes_0': None if lo_hi is None else bool(lo_hi[0] > 0 or lo_hi[1] < 0)}
    return {'replicates': replicates, 'seed': seed, 'level': LEVEL, 'rule': RULE, 'names': list(names),
            'values': out}
