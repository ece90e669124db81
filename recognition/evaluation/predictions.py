"""The harness layer for one predictions file: pairs CSV in -> embed -> score -> fuse -> post-process -> CSV out.

`ensemble.py` holds only the score arithmetic; this module does the I/O around it, and owns the names of the
files written beside the predictions (the raw fused scores, the provenance JSON).
"""
import os

import numpy as np

from recognition.evaluation.ensemble import fused_scores, index_pairs, post_process
from recognition.evaluation.pairs_csv import read_pairs_csv
from recognition.inference import extract_features
from recognition.utils import UserError, atomic_open


def write_predictions(path, id1, id2, scores):
    """`TEMPLATE_ID1,TEMPLATE_ID2,SCORE` rows in the given (template) order, written atomically."""
    with atomic_open(path) as f:
        f.write('TEMPLATE_ID1,TEMPLATE_ID2,SCORE\n')
        f.write(''.join(f'{a},{b},{s:.6f}\n' for a, b, s in zip(id1, id2, scores.tolist())))


def predict(template_path, images, embedders, out_path, missing_score=None, batch_size=64, progress=False,
            fusion='mean', switch_model=None, posthoc=None, **post):
    """Score every template pair with the models and write predictions in template order.

    `images` maps template id -> aligned crop path. Ids without an image are an error listing them, or,
    with `missing_score`, those pairs get that score (and are left out of re-ranking and gap-cut).
    When fusion or post-processing changed the models' fused scores, those raw fused scores are written too,
    to `raw_scores_path(out_path)`, so the report can show what the post-processing did.
    `posthoc(features, image paths, i1, i2, scores)`, if given, changes the final scores last (the
    post-hoc fair calibration, `posthoc.PosthocStep`).
    Returns a summary dict (pairs, images, missing ids, the raw file or None).
    """
    id1, id2, _, _ = read_pairs_csv(template_path)
    needed = sorted(set(id1) | set(id2))
    present = [t for t in needed if t in images]
    i1, i2, valid, missing = index_pairs(id1, id2, present)
    if missing and missing_score is None:
        shown = ', '.join(missing[:20]) + (f' ... ({len(missing)} in all)' if len(missing) > 20 else '')
        raise UserError(f'{template_path}: template ids without an image: {shown} (or pass --missing-score)')
    if not present:
        raise UserError(f'{template_path}: no template id has an image')
    features = extract_features(embedders, [images[t] for t in present], batch_size=batch_size, progress=progress)
    names = [e.name for e in embedders]
    fused, hard = fused_scores(features, names, i1[valid], i2[valid], fusion, switch_model)
    final = post_process(fused, hard, i1[valid], i2[valid], features[0].shape[0], **post)
    if posthoc is not None:
        final = posthoc(features, [images[t] for t in present], i1[valid], i2[valid], final)
    scores = np.full(len(id1), np.nan if missing_score is None else float(missing_score))
    raw_path = None
    if hard is not None or not np.array_equal(final, fused):
        raw_path = raw_scores_path(out_path)
        scores[valid] = fused
        write_predictions(raw_path, id1, id2, scores)
    scores[valid] = final
    write_predictions(out_path, id1, id2, scores)
    return {'pairs': len(id1), 'images': len(present), 'missing': missing,
            'missing_pairs': int((~valid).sum()), 'raw': raw_path}


def raw_scores_path(predictions_path):
    """`predictions.csv` -> `predictions.raw.csv`: the fused scores before post-processing."""
    stem, ext = os.path.splitext(predictions_path)
    return stem + '.raw' + (ext or '.csv')


def provenance_path(predictions_path):
    """`predictions.csv` -> `predictions.json`: which models, fusion and post-processing made the file."""
    return os.path.splitext(predictions_path)[0] + '.json'


def calibration_state_path(predictions_path):
    """`predictions.csv` -> `predictions.calibration.npz`: the post-hoc calibration state fitted with them."""
    return os.path.splitext(predictions_path)[0] + '.calibration.npz'
