"""insightface's 10-fold protocol on hand-made pairs whose answer is known."""
import mxnet as mx
import numpy as np
import pytest

from recognition.evaluation.verification import evaluate, format_result, pair_distances, test_bin


def pairs_with_distances(dists):
    """2-d unit embeddings whose consecutive rows are at the given squared L2 distances."""
    rows = []
    for d in dists:
        c = 1.0 - d / 2.0
        rows += [[1.0, 0.0], [c, np.sqrt(1.0 - c * c)]]
    return np.array(rows)


def known_case():
    """100 pairs, 10 folds of 10, same/diff alternating; same at 0.5, diff at 1.4/1.6; pair 0 (a same
    pair, fold 0) sits at 2.0, so only fold 0 makes one error whatever threshold is learnt."""
    issame = np.arange(100) % 2 == 0
    dists = np.where(issame, 0.5, np.where(np.arange(100) % 4 == 1, 1.4, 1.6))
    dists[0] = 2.0
    return pairs_with_distances(dists), issame


def test_distances_are_squared_l2_of_normalised_embeddings():
    emb, _ = known_case()
    d = pair_distances(emb * 7.0)  # scale does not matter: the protocol normalises first
    assert d[0] == pytest.approx(2.0) and d[2] == pytest.approx(0.5) and d[1] == pytest.approx(1.4)


def test_ten_fold_known_answer():
    emb, issame = known_case()
    r = evaluate(emb, issame, nrof_folds=10)
    # Fold 0 scores 9/10, the nine others 10/10: mean 0.99, population std 0.03.
    assert r['acc'] == pytest.approx(0.99)
    assert r['std'] == pytest.approx(0.03)
    assert r['fold_acc'][0] == pytest.approx(0.9) and r['fold_acc'][1:] == pytest.approx([1.0] * 9)
    # The first threshold above the genuine distance 0.5 wins (predict same if dist < threshold).
    assert r['thresholds'] == pytest.approx([0.51] * 10)
    # TAR at FAR 1e-3: every genuine pair but the one at 2.0 is accepted: fold 0 4/5, others 5/5.
    assert r['tar_far'] == pytest.approx(0.98)
    # gap = (mean diff - mean same) / std diff = (1.5 - 0.53) / 0.1
    assert r['gap'] == pytest.approx(9.7)


def test_threshold_is_learnt_on_the_other_folds():
    # Fold 3 alone holds genuine pairs at 1.0: the nine others say the threshold is 0.51, so fold 3's
    # genuine pairs are all rejected there (accuracy 0.5) although a threshold of 1.01 would fit it.
    issame = np.arange(100) % 2 == 0
    dists = np.where(issame, 0.5, 1.6)
    dists[30:40][issame[30:40]] = 1.0
    r = evaluate(pairs_with_distances(dists), issame)
    assert r['fold_acc'][3] == pytest.approx(0.5)
    assert r['thresholds'][3] == pytest.approx(0.51)
    assert r['thresholds'][0] == pytest.approx(1.01)


def test_test_bin_flip_sum_xnorm_and_tail_batch():
    rng = np.random.RandomState(0)
    n, d = 46, 6
    orig = rng.randn(n, d).astype(np.float32) * 3
    flip = rng.randn(n, d).astype(np.float32) * 3
    issame = list(rng.rand(n // 2) > 0.5)
    # The "images" carry their embeddings in the first pixels; embed_fn reads them back.
    def as_images(e):
        img = np.zeros((n, 3, 4, 4), np.float32)
        img.reshape(n, -1)[:, :d] = e
        return mx.nd.array(img)
    calls = []
    def embed_fn(batch):
        calls.append(batch.shape[0])
        return batch.asnumpy().reshape(batch.shape[0], -1)[:, :d]
    r = test_bin([as_images(orig), as_images(flip)], issame, embed_fn, batch_size=8, nfolds=5)
    assert set(calls) == {8}  # the tail batch is a full window, as in insightface
    expected = evaluate(orig.astype(np.float64) + flip, issame, nrof_folds=5)
    assert r['acc'] == pytest.approx(expected['acc']) and r['gap'] == pytest.approx(expected['gap'])
    xnorm = (np.linalg.norm(orig, axis=1).mean() + np.linalg.norm(flip, axis=1).mean()) / 2
    assert r['xnorm'] == pytest.approx(xnorm, rel=1e-5)
    lines = format_result('lfw', r)
    assert lines[0].startswith('[lfw]XNorm: ') and lines[1].startswith('[lfw]Accuracy-Flip: ')
