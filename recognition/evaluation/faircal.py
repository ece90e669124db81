"""FairCal-style calibration, after Salvador, Cairns and Oberman, "FairCal: Fairness Calibration for Face
Verification", ICLR 2022.

Every cluster of the embeddings (`posthoc.py`) gets its own calibration map from scores to the probability
that a pair is the same person, fitted on the calibration pairs with at least one image in it; a pair's
probability is the mean of its two clusters' maps weighted by their calibration pair counts (the paper's
theta). The maps are beta calibration (Kull, Silva Filho and Flach, AISTATS 2017): a logistic regression on
`[ln u, -ln(1 - u)]` of the score mapped to u in (0, 1), with the betacal package's rule that a negative
coefficient is refitted at 0 (the map stays increasing).

The score written is the log-odds of that probability, ln(p / (1 - p)): the same ranking (every measure
of the report is rank-based), but the 6-decimal predictions file keeps it apart near 0 and 1, where the
probabilities of most pairs lie. Formulas: docs/metrics.md, "Post-hoc fair score calibration".
"""
import numpy as np
from scipy.special import log_expit
from sklearn.linear_model import LogisticRegression

# Near betacal's unpenalised fit, but finite, so a cluster whose calibration pairs separate perfectly
# still gets a finite map.
BETA_C = 1e4
EPS = 1e-9


def unit_scores(scores, lo, hi):
    """Scores mapped linearly from [lo, hi] into (0, 1), clipped EPS away from both ends."""
    return np.clip((np.asarray(scores, dtype=np.float64) - lo) / (hi - lo), EPS, 1.0 - EPS)


def beta_features(u):
    return np.column_stack([np.log(u), -np.log1p(-u)])


def fit_beta(scores, labels, lo, hi):
    """(a, b, c) of the beta map `logit p = a ln u - b ln(1 - u) + c`, with a, b >= 0: a negative
    coefficient is dropped and the other refitted alone (betacal's rule); if that one is negative too the
    map is the constant base rate."""
    x = beta_features(unit_scores(scores, lo, hi))
    model = LogisticRegression(C=BETA_C, max_iter=1000).fit(x, labels)
    coef = model.coef_[0].copy()
    if coef.min() >= 0:
        return np.array([coef[0], coef[1], model.intercept_[0]])
    keep = int(np.argmax(coef))
    model = LogisticRegression(C=BETA_C, max_iter=1000).fit(x[:, [keep]], labels)
    coef = np.zeros(2)
    if model.coef_[0, 0] >= 0:
        coef[keep] = model.coef_[0, 0]
        return np.array([coef[0], coef[1], model.intercept_[0]])
    base = float(np.mean(labels))
    return np.array([0.0, 0.0, np.log(base / (1.0 - base))])


def fit(scores, labels, c1, c2, k):
    """Per-cluster beta maps on calibration pairs; a cluster without both kinds of pair takes the map of
    all pairs. Returns the state's arrays."""
    lo, hi = min(-1.0, float(scores.min())), max(1.0, float(scores.max()))
    overall = fit_beta(scores, labels, lo, hi)
    maps = np.tile(overall, (k, 1))
    pairs = np.zeros(k, dtype=np.int64)
    for c in range(k):
        mine = (c1 == c) | (c2 == c)
        pairs[c] = int(mine.sum())
        if 0 < labels[mine].sum() < pairs[c]:
            maps[c] = fit_beta(scores[mine], labels[mine], lo, hi)
    return {'maps': maps, 'pairs': pairs, 'score_range': np.array([lo, hi])}


def calibrate(scores, c1, c2, maps, pairs, score_range):
    """log-odds of `theta p_{c1}(s) + (1 - theta) p_{c2}(s)`, theta = n_{c1} / (n_{c1} + n_{c2})."""
    x = beta_features(unit_scores(scores, *score_range))
    z1 = (x * maps[c1, :2]).sum(axis=1) + maps[c1, 2]
    z2 = (x * maps[c2, :2]).sum(axis=1) + maps[c2, 2]
    n1, n2 = pairs[c1].astype(np.float64), pairs[c2].astype(np.float64)
    total = n1 + n2
    theta = np.divide(n1, total, out=np.full_like(total, 0.5), where=total > 0)
    with np.errstate(divide='ignore'):
        w1, w2 = np.log(theta), np.log1p(-theta)
    log_p = np.logaddexp(w1 + log_expit(z1), w2 + log_expit(z2))
    log_q = np.logaddexp(w1 + log_expit(-z1), w2 + log_expit(-z2))
    return log_p - log_q
