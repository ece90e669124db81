"""Fusion, k-NN re-ranking and gap-cut on small hand-checked cases, and against a per-pair loop."""
import numpy as np
import pytest

from recognition.evaluation.ensemble import (concat_features, ensemble_scores, gap_cut, index_pairs,
                                             knn_rerank, switch_fusion)
from recognition.utils import UserError


def test_rerank_hand_checked():
    # k=1: neighbours 0:{0,1@.9} 1:{1,0@.9} 2:{2,0@.5} 3:{3,2@.2}
    i1, i2 = np.array([0, 0, 1, 2]), np.array([1, 2, 2, 3])
    s = np.array([0.9, 0.5, 0.4, 0.2])
    got = knn_rerank(i1, i2, s, 4, k=1)
    shared = np.array([0.9 + 0.9, 0.5, 0.9 * 0.5, 0.2])
    np.testing.assert_allclose(got, 0.65 * s + 0.0175 * shared)
    np.testing.assert_allclose(got, [0.6165, 0.33375, 0.267875, 0.1335])


def loop_rerank(i1, i2, s, k):
    """The seed's algorithm as a plain loop over pairs (with its dropped-first-neighbour quirk fixed)."""
    partners = {}
    for a, b, v in zip(i1, i2, s):
        partners.setdefault(a, []).append((v, b))
        partners.setdefault(b, []).append((v, a))
    top = {}
    for a, lst in partners.items():
        best = sorted(lst, key=lambda t: -t[0])[:k]
        top[a] = {a: 1.0, **{b: v for v, b in best}}
    out = []
    for a, b, v in zip(i1, i2, s):
        shared = sum(top[a][c] * top[b][c] for c in top[a] if c in top[b])
        out.append(0.65 * v + 0.0175 * shared)
    return np.array(out)


def test_rerank_matches_loop_on_random_pairs():
    rng = np.random.RandomState(0)
    n = 40
    pairs = {tuple(sorted(p)) for p in rng.randint(0, n, size=(400, 2)) if p[0] != p[1]}
    i1, i2 = np.array(sorted(pairs)).T
    s = rng.rand(len(i1))  # distinct scores: no ties, so the neighbour lists are unambiguous
    np.testing.assert_allclose(knn_rerank(i1, i2, s, n, k=5), loop_rerank(i1, i2, s, 5))


def test_gap_cut_hand_checked():
    # image 0: scores 0.9, 0.7, 0.2, 0.05 -> gaps 0.2, 0.5, 0.15; the last (lowest) one is 0.2 -> 0.05
    # (size 0.15, cut 0.125). image 2: 0.85, 0.7 -> gap 0.15, cut 0.775. images 1, 3, 4: no gap > 0.1.
    i1 = np.array([0, 0, 0, 0, 1])
    i2 = np.array([1, 2, 3, 4, 2])
    s = np.array([0.9, 0.7, 0.2, 0.05, 0.85])
    got = gap_cut(i1, i2, s, 5)
    np.testing.assert_allclose(got, [0.915, 0.7, 0.215, 0.035, 0.865])


def test_gap_cut_no_gap_is_identity():
    i1, i2 = np.array([0, 0, 1]), np.array([1, 2, 2])
    s = np.array([0.5, 0.45, 0.42])
    np.testing.assert_allclose(gap_cut(i1, i2, s, 3), s)


def test_switch_uses_the_hard_model_where_it_is_sure():
    base = np.array([0.5, 0.995, 0.2, 0.9995])
    hard = np.array([0.995, 0.98, 0.999, 0.992])
    # The seed's result_fusion: the hard model's score above 0.99, else the other.
    np.testing.assert_allclose(switch_fusion(base, hard), [0.995, 0.995, 0.999, 0.992])
    np.testing.assert_allclose(switch_fusion(base, hard, keep_max=True), [0.995, 0.995, 0.999, 0.9995])


def unit(rng, n, d):
    f = rng.randn(n, d)
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def test_mean_and_concat_fusion_and_sizes():
    rng = np.random.RandomState(1)
    fa, fb, fc = unit(rng, 6, 4), unit(rng, 6, 4), unit(rng, 6, 3)
    i1, i2 = np.array([0, 1, 2]), np.array([3, 4, 5])
    cos = lambda f: np.sum(f[i1] * f[i2], axis=1)
    mean = ensemble_scores([fa, fb], ['a', 'b'], i1, i2, fusion='mean')
    np.testing.assert_allclose(mean, (cos(fa) + cos(fb)) / 2)
    np.testing.assert_allclose(ensemble_scores([fa, fb], ['a', 'b'], i1, i2, fusion='concat'), mean)
    # Different embedding sizes: fine for score fusion, an error for concatenation.
    mixed = ensemble_scores([fa, fc], ['a', 'c'], i1, i2, fusion='mean')
    np.testing.assert_allclose(mixed, (cos(fa) + cos(fc)) / 2)
    with pytest.raises(UserError, match='a: 4, c: 3'):
        concat_features([fa, fc], ['a', 'c'])
    # switch: the hard model is left out of the base and only acts above the threshold.
    hard = fa.copy()
    hard[3] = hard[0]  # pair (0, 3) is certain for the hard model
    sw = ensemble_scores([hard, fb], ['hard', 'b'], i1, i2, fusion='switch', switch_model='hard')
    np.testing.assert_allclose(sw, [1.0, cos(fb)[1], cos(fb)[2]])
    with pytest.raises(UserError, match='switch-model'):
        ensemble_scores([fa, fb], ['a', 'b'], i1, i2, fusion='switch', switch_model='x')


def test_index_pairs_lists_missing_ids():
    id1 = np.array(['1', '2', '3'], dtype=object)
    id2 = np.array(['2', '9', '8'], dtype=object)
    i1, i2, valid, missing = index_pairs(id1, id2, ['1', '2', '3'])
    assert missing == ['8', '9']
    assert valid.tolist() == [True, False, False]
    assert i1.tolist() == [0, 1, 2] and i2.tolist() == [1, -1, -1]
