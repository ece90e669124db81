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
(d)) and the ROC (TAR@FAR, EER, both thresholds); per-group orders fixed once give the group AUCs; group
sums are sparse products over the distinct pair memberships; the adjusted regression (b) is solved per
replicate from normal equations summed over the distinct design rows. Replicates go in chunks (the
columns of a pairs x replicates matrix).
"""
import numpy as np
from scipy import sparse

from recognition.evaluation.fairness import (ATTRIBUTES, FAR_TARGETS, FMR_TARGET, Ranked, legitimate_cells,
                                             legitimate_counts)
from recognition.utils import UserError

REPLICATES = 1000
LEVEL = 0.95
CHUNK_BYTES = 128 * 2 ** 20  # one pairs x replicates float64 matrix; about ten are alive at once
POLARITIES = (('positive', True), ('negative', False))
THRESHOLDS = ('fmr_1e-3', 'eer')
RULE = ('identities resampled with replacement (n of n); a pair of two identities drawn k1 and k2 times '
        'counts k1*k2 times, a pair within one identity drawn k times counts k times')


def subject_counts(n_subjects, seed, first, count):
    """(n_subjects + 1, count) identity counts of replicates first..first+count-1; the last row is 1
    (the second factor of a pair within one identity)."""
    counts = np.ones((n_subjects + 1, count))
    p = np.full(n_subjects, 1.0 / n_subjects)
    for j in range(count):
        counts[:-1, j] = np.random.default_rng([seed, first + j]).multinomial(n_subjects, p)
    return counts


def _spread(values):
    """max - min over the columns with a value, per row (NaN with fewer than two)."""
    ok = np.isfinite(values).sum(axis=1) >= 2
    with np.errstate(invalid='ignore'):
        out = np.nanmax(np.where(np.isfinite(values), values, -np.inf), axis=1) \
            - np.nanmin(np.where(np.isfinite(values), values, np.inf), axis=1)
    return np.where(ok, out, np.nan)


def _ratio(values):
    """max / min over the columns with a value, per row (NaN with fewer than two or a zero minimum)."""
    ok = np.isfinite(values).sum(axis=1) >= 2
    hi = np.max(np.where(np.isfinite(values), values, -np.inf), axis=1)
    lo = np.min(np.where(np.isfinite(values), values, np.inf), axis=1)
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(ok & (lo > 0), hi / np.where(lo > 0, lo, 1), np.nan)


def _divide(a, b):
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


class WeightedEvaluation:
    """The measures of `fairness.evaluate_pairs` for many weightings of the pairs at once."""

    def __init__(self, pairs):
        if pairs.subjects is None:
            raise UserError(f'{pairs.subjects_missing}: the bootstrap resamples identities '
                            f'(or pass --bootstrap 0)')
        self.pairs = pairs
        ranked = Ranked(pairs.scores, pairs.labels)
        order = ranked.order
        n = len(order)
        s1, s2, self.n_subjects = pairs.subjects
        self.s1 = s1[order]
        self.s2 = np.where(s2[order] == self.s1, self.n_subjects, s2[order])
        self.pos = ranked.labels
        desc = ranked.scores
        self.starts = np.r_[0, np.nonzero(desc[1:] != desc[:-1])[0] + 1]
        self.ties = len(self.starts) < n
        self.block = np.repeat(np.arange(len(self.starts)), np.diff(np.r_[self.starts, n]))
        self.groups = {attr: g[order] for attr, g in pairs.groups.items()}
        cells, self.combo_names = legitimate_cells(pairs)
        cells = cells[order]
        self._memberships(cells)
        self._group_orders(desc)
        self._designs(order)
        self.aggregate = sparse.vstack([self.key_sum] + [d['sum'] for d in self.design.values()]).tocsr()

    def _memberships(self, cells):
        """Group sums through the distinct memberships: pairs -> keys (one each) -> columns."""
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
        member = np.stack(slots, axis=1)
        keys, inverse = np.unique(member, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        n = len(self.pos)
        self.key_sum = sparse.csr_matrix((np.ones(n), (inverse, np.arange(n))), shape=(len(keys), n))
        rows, cols = np.nonzero(keys >= 0)
        self.key_columns = sparse.csr_matrix((np.ones(len(rows)), (keys[rows, cols], rows)),
                                             shape=(width, len(keys)))
        count = self.key_columns @ np.bincount(inverse, minlength=len(keys)).astype(np.float64)
        # (d) compares groups on the legitimate combinations where every group has cells (fairness._cell_bias)
        self.complete = {}
        for attr, names in ATTRIBUTES.items():
            k, off = len(names), self.offset[attr, 'cell']
            c = count[off:off + 2 * k * n_combos].reshape(n_combos, k, 2)
            for _, positive in POLARITIES:
                self.complete[attr, positive] = np.nonzero((c[:, :, int(positive)] > 0).all(axis=1))[0]

    def column(self, attr, kind, positive, group=None):
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
            starts = np.r_[0, np.nonzero((gs[1:] != gs[:-1]) | (sc[1:] != sc[:-1]))[0] + 1] if len(perm) else \
                np.zeros(0, dtype=np.int64)
            block_group = gs[starts]
            seg = np.r_[0, np.nonzero(np.diff(block_group))[0] + 1] if len(starts) else np.zeros(0, np.int64)
            self.order_by_group[attr] = {'perm': perm, 'pos': self.pos[perm][:, None], 'starts': starts,
                                         'ties': len(starts) < len(perm), 'segments': seg,
                                         'segment_group': block_group[seg]}

    def _designs(self, order):
        """(b): the design of `rank ~ group + legitimate levels` per attribute and polarity (the columns
        `fairness.adjusted_group_effects` keeps), reduced to its distinct rows."""
        self.design = {}
        row0 = len(self.key_sum.indptr) - 1
        for attr, names in ATTRIBUTES.items():
            for _, positive in POLARITIES:
                sel = np.nonzero((self.pos == positive) & (self.groups[attr] >= 0))[0]
                g = self.groups[attr][sel]
                present = np.nonzero(np.bincount(g, minlength=len(names)) > 0)[0]
                if len(present) < 2:
                    continue
                L, spans, _ = legitimate_counts(self.pairs, order[sel])
                total = L.sum(axis=0)
                levels = [j for _, off, n in spans for j in [off + i for i in range(n) if total[off + i] > 0][1:]]
                onehot = (g[:, None] == present[None, :])
                X = np.hstack([onehot, L[:, levels]]).astype(np.uint8)
                rows, inverse = np.unique(X, axis=0, return_inverse=True)
                inverse = inverse.reshape(-1)
                q = X.shape[1]
                upper = np.triu_indices(q)
                rows = rows.astype(np.float64)
                self.design[attr, positive] = {
                    'present': present, 'rows': rows, 'q': q, 'upper': upper,
                    'products': rows[:, upper[0]] * rows[:, upper[1]], 'first': row0,
                    'sum': sparse.csr_matrix((np.ones(len(sel)), (inverse, sel)),
                                             shape=(len(rows), len(self.pos)))}
                row0 += len(rows)

    def weights(self, counts):
        """(pairs in score order, replicates) weights from identity counts (n_subjects + 1, replicates)."""
        return counts[self.s1] * counts[self.s2]

    def measures(self, W):
        """{path: (replicates,) values} of every bootstrapped number for the weight matrix W."""
        out = {}
        pos = self.pos[:, None]
        Wp = W * pos
        Wn = W - Wp
        if self.ties:
            Wp, Wn = np.add.reduceat(Wp, self.starts, axis=0), np.add.reduceat(Wn, self.starts, axis=0)
        cum_p, cum_n = np.cumsum(Wp, axis=0), np.cumsum(Wn, axis=0)
        tot_p, tot_n = cum_p[-1], cum_n[-1]
        above = cum_p - Wp / 2          # positive weight above each block, ties half
        below = tot_n - cum_n + Wn / 2  # negative weight below each block, ties half
        del Wp, Wn
        if self.ties:
            above, below = above[self.block], below[self.block]
        # D: a positive pair's negatives below, a negative pair's positives above ((d), overall AUC);
        # Y: each pair's normalised rank among its own polarity ((a), (b)).
        D = np.where(pos, below, above)
        Y = np.where(pos, (tot_p - above) / tot_p, below / tot_n)
        del above, below
        sums_w = self.aggregate @ W
        sums_y = self.aggregate @ (W * Y)
        nk = self.key_sum.shape[0]
        col_w = self.key_columns @ sums_w[:nk]
        col_y = self.key_columns @ sums_y[:nk]
        col_d = self.key_columns @ (self.key_sum @ (W * D))
        del D, Y
        out['accuracy/auc'] = col_d[0] / (tot_p * tot_n)
        fpr, tpr = cum_n / tot_n, cum_p / tot_p
        for far in FAR_TARGETS:
            b = (fpr <= far).sum(axis=0)
            out[f'accuracy/tar_at_far/{far:.0e}'] = np.where(b > 0, tpr[np.maximum(b - 1, 0), np.arange(W.shape[1])],
                                                             0.0)
        fnr_minus_fpr = (1 - tpr) - fpr
        i = np.argmin(np.abs(fnr_minus_fpr), axis=0)
        r = np.arange(W.shape[1])
        out['accuracy/eer'] = (fpr[i, r] + 1 - tpr[i, r]) / 2
        passing = {'fmr_1e-3': (cum_n <= np.floor(FMR_TARGET * tot_n)).sum(axis=0), 'eer': i + 1}
        del fpr, tpr, fnr_minus_fpr, cum_p, cum_n
        col_m = {}
        block = self.block if self.ties else np.arange(len(self.pos))
        for name, b in passing.items():
            col_m[name] = self.key_columns @ (self.key_sum @ (W * (block[:, None] < b[None, :])))
        for attr, names in ATTRIBUTES.items():
            self._group_auc(out, attr, names, W)
            for pol, positive in POLARITIES:
                c = self.column(attr, 'group', positive)
                mean_rank = _divide(col_y[c], col_w[c]).T
                base = f'bias/{attr}/{pol}'
                self._per_group(out, f'{base}/mean_rank', names, mean_rank)
                out[f'{base}/rank/spread'] = _spread(mean_rank)
                self._adjusted(out, attr, names, positive, sums_w, sums_y, base)
                cc = self.column(attr, 'cell', positive)
                other = tot_n if positive else tot_p
                cell_auc = _divide(col_d[cc], col_w[cc] * other[None, None, :])  # (combos, groups, R)
                complete = self.complete[attr, positive]
                with np.errstate(invalid='ignore'):
                    means = (np.nanmean(cell_auc[complete], axis=0).T if len(complete)
                             else np.full((W.shape[1], len(names)), np.nan))
                self._per_group(out, f'{base}/cell_auc', names, means)
                out[f'{base}/cell/spread'] = _spread(means)
            for name in THRESHOLDS:
                neg_c, pos_c = self.column(attr, 'group', False), self.column(attr, 'group', True)
                fmr = _divide(col_m[name][neg_c], col_w[neg_c]).T
                fnmr = 1 - _divide(col_m[name][pos_c], col_w[pos_c]).T
                base = f'bias/{attr}/error_rates/{name}'
                self._per_group(out, f'{base}/fmr', names, fmr)
                self._per_group(out, f'{base}/fnmr', names, fnmr)
                out[f'{base}/fmr_ratio'], out[f'{base}/fnmr_ratio'] = _ratio(fmr), _ratio(fnmr)
                out[f'{base}/fmr_diff'], out[f'{base}/fnmr_diff'] = _spread(fmr), _spread(fnmr)
        return out

    @staticmethod
    def _per_group(out, base, names, values):
        for j, g in enumerate(names):
            out[f'{base}/{g}'] = values[:, j]

    def _group_auc(self, out, attr, names, W):
        """AUC within each group: its negatives' weighted share of its positives above them."""
        o = self.order_by_group[attr]
        aucs = np.full((W.shape[1], len(names)), np.nan)
        if len(o['perm']):
            Wg = W[o['perm']]
            Pg = Wg * o['pos']
            Ng = Wg - Pg
            del Wg
            if o['ties']:
                Pg, Ng = np.add.reduceat(Pg, o['starts'], axis=0), np.add.reduceat(Ng, o['starts'], axis=0)
            cum = np.cumsum(Pg, axis=0)
            seg = o['segments']
            before = np.vstack([np.zeros((1, W.shape[1])), cum[seg[1:] - 1]])  # positives of earlier groups
            neg_above = np.add.reduceat(Ng * (cum - Pg / 2), seg, axis=0)
            n_neg, n_pos = np.add.reduceat(Ng, seg, axis=0), np.add.reduceat(Pg, seg, axis=0)
            aucs[:, o['segment_group']] = _divide(neg_above - before * n_neg, n_pos * n_neg).T
        self._per_group(out, f'group_auc/{attr}', names, aucs)
        out[f'group_auc_gap/{attr}'] = _spread(aucs)

    def _adjusted(self, out, attr, names, positive, sums_w, sums_y, base):
        """(b) per replicate: the weighted normal equations of the design's distinct rows, solved."""
        effects = np.full((sums_w.shape[1], len(names)), np.nan)
        d = self.design.get((attr, positive))
        if d is not None:
            rows = slice(d['first'], d['first'] + len(d['rows']))
            q, k = d['q'], len(d['present'])
            xtx = np.zeros((sums_w.shape[1], q, q))
            tri = (d['products'].T @ sums_w[rows]).T
            xtx[:, d['upper'][0], d['upper'][1]] = tri
            xtx[:, d['upper'][1], d['upper'][0]] = tri
            xty = (d['rows'].T @ sums_y[rows]).T
            coef = np.einsum('rij,rj->ri', np.linalg.pinv(xtx), xty)[:, :k]
            coef[xtx[:, np.arange(k), np.arange(k)] == 0] = np.nan  # a group the replicate left out
            effects[:, d['present']] = coef
        with np.errstate(invalid='ignore'):
            centred = effects - np.nanmean(effects, axis=1, keepdims=True)
        self._per_group(out, f'{base}/adjusted_effect', names, centred)
        out[f'{base}/adjusted/spread'] = _spread(centred)


def chunk_size(pairs):
    return int(max(1, min(64, CHUNK_BYTES // (8 * max(len(pairs.scores), 1)))))


def replicate_measures(evaluations, replicates, seed):
    """{path: (replicates,) array} per evaluation, all under the same identity resamples."""
    n_subjects = evaluations[0].n_subjects
    step = chunk_size(evaluations[0].pairs)
    parts = [[] for _ in evaluations]
    for first in range(0, replicates, step):
        counts = subject_counts(n_subjects, seed, first, min(step, replicates - first))
        for part, ev in zip(parts, evaluations):
            part.append(ev.measures(ev.weights(counts)))
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


def _interval(values, reason, replicates):
    if reason is not None:
        return {'n/a': reason}
    bad = int((~np.isfinite(values)).sum())
    if bad:
        return {'n/a': f'undefined in {bad} of {replicates} replicates'}
    lo, hi = np.percentile(values, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return {'interval': [float(lo), float(hi)]}


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
    values = {p: _interval(v, _reason(p, value_at(result, p), support), replicates) for p, v in measures.items()}
    return {'replicates': replicates, 'seed': seed, 'level': LEVEL, 'rule': RULE, 'values': values,
            'worst_group': worst_group_ranking(result, measures, values)}


def compare(pairs_a, result_a, pairs_b, result_b, replicates=REPLICATES, seed=0, names=('a', 'b')):
    """Paired differences b - a of every bootstrapped number, both score sets under the same resamples."""
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
        iv = _interval(mb[path] - ma[path], reason, replicates)
        lo_hi = iv.get('interval')
        out[path] = {names[0]: a, names[1]: b, 'difference': None if a is None or b is None else b - a, **_tag(iv),
                     'excludes_0': None if lo_hi is None else bool(lo_hi[0] > 0 or lo_hi[1] < 0)}
    return {'replicates': replicates, 'seed': seed, 'level': LEVEL, 'rule': RULE, 'names': list(names),
            'values': out}
