"""IJB-scale scoring and bootstrap: template pooling, pair scores and one bootstrap replicate's TAR@FAR
(`ijb.SortedPairs`) against sklearn's roc_curve(sample_weight) on the same weights.

    OMP_NUM_THREADS=1 python bench/bench_ijb.py --pairs 2000000 --templates 20000

IJB-C has 469,375 faces, 23,124 templates and 15,658,489 pairs; the defaults are a scaled-down shape.
"""
import argparse
import os
import time

import numpy as np

from recognition.evaluation import ijb
from recognition.evaluation.bootstrap import subject_counts
from recognition.evaluation.ensemble import cosine_scores


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--pairs', type=int, default=2_000_000)
    p.add_argument('--templates', type=int, default=20_000)
    p.add_argument('--faces', type=int, default=400_000)
    p.add_argument('--dim', type=int, default=512)
    p.add_argument('--replicates', type=int, default=3)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    templates = rng.integers(0, args.templates, args.faces)
    medias = rng.integers(0, args.faces // 4, args.faces)
    feats = rng.standard_normal((args.faces, args.dim), dtype=np.float32).astype(np.float64)
    t = time.time()
    tf, uniq = ijb.pool_templates(feats, templates, medias)
    pool_s = time.time() - t
    t1, t2 = rng.integers(0, len(uniq), args.pairs), rng.integers(0, len(uniq), args.pairs)
    labels = (rng.random(args.pairs) < 0.002).astype(int)
    t = time.time()
    i1, i2, missing, _ = ijb.pair_index(uniq, uniq[t1], uniq[t2])
    scores = cosine_scores(tf.astype(np.float32), i1, i2).astype(np.float64) + 0.3 * labels
    score_s = time.time() - t
    s1, s2, n = ijb.linked_subjects(t1, t2, labels)
    s2 = np.where(s2 == s1, n, s2)
    t = time.time()
    ranked = ijb.SortedPairs(labels, scores, s1, s2)
    sort_s = time.time() - t
    ours, theirs = [], []
    for r in range(args.replicates):
        counts = subject_counts(n, 0, r, 1)[0].astype(np.float64)
        t = time.time()
        a = ranked.tar_at_far(counts)
        ours.append(time.time() - t)
        t = time.time()
        b = ijb.tar_at_far(labels, scores, sample_weight=counts[s1] * counts[s2])
        theirs.append(time.time() - t)
        assert a == b, (a, b)
    print(f'{args.faces} faces -> {len(uniq)} templates: pooling {pool_s:.2f} s; {args.pairs} pair scores {score_s:.2f} s')
    print(f'bootstrap: one sort {sort_s:.2f} s, then per replicate {np.median(ours):.2f} s '
          f'(sklearn roc_curve with sample_weight: {np.median(theirs):.2f} s, same TARs); load {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
    main()
