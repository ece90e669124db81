"""Post-hoc fair score calibration (`test/predict.py --fsn K` / `--faircal K`): what FSN (`fsn.py`) and
FairCal (`faircal.py`) share.

Both cluster the calibration images' embeddings with k-means (sklearn, seeded), fit per-cluster parameters
on the calibration pairs' scores and ground truth, and change a pair's score by its two images' nearest
centroids. No demographic labels are used. The fitted state (centroids and the method's arrays) is one
NPZ file beside the predictions, loaded with allow_pickle=False, so the harness fits on val and applies the
same state to test (`--calibration-state`).

A clustering vector is every model's L2-normalised features side by side, so any fusion and embedding
sizes work. The scores calibrated are the pipeline's final ones (after fusion and the seed's
post-processing); the state records which models, fusion and post-processing produced them and refuses
scores of another kind.
"""
import json
import os
import zipfile

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import pairwise_distances_argmin

from recognition.evaluation import faircal, fsn
from recognition.evaluation.ensemble import index_pairs
from recognition.evaluation.pairs_csv import read_labels
from recognition.inference import extract_features
from recognition.utils import UserError, atomic_open

METHODS = {'fsn': 'fair score normalisation', 'faircal': 'FairCal calibration'}
ARRAYS = {'fsn': ('thresholds', 'global_threshold', 'impostors', 'fmr'),
          'faircal': ('maps', 'pairs', 'score_range')}
STATE_VERSION = 1


def cluster_features(features):
    """One clustering vector per image: each model's (L2-normalised) features side by side."""
    return np.concatenate([np.asarray(f, dtype=np.float32) for f in features], axis=1)


def check_clusters(option, k, n_images, source):
    if k < 1:
        raise UserError(f'{option} {k}: give a number of clusters >= 1')
    if k > n_images:
        raise UserError(f'{option} {k}: more clusters than the {n_images} calibration images of {source}')


def fit_centroids(x, k, seed):
    """k-means centroids of the rows of x; same seed, same centroids."""
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x).cluster_centers_.astype(np.float32)


def assign(x, centroids):
    """Each row's nearest centroid."""
    return pairwise_distances_argmin(x, centroids)


def fit(method, k, features, i1, i2, labels, scores, seed=0, fmr=1e-3, scores_of=None, fitted_on=''):
    """The state of `method` fitted on calibration images (`features`, rows indexed by i1/i2) and their
    pairs' scores and labels."""
    x = cluster_features(features)
    centroids = fit_centroids(x, k, seed)
    c = assign(x, centroids)
    labels = np.asarray(labels, dtype=bool)
    if method == 'fsn':
        arrays = fsn.fit(scores, labels, c[i1], c[i2], k, fmr)
    else:
        arrays = faircal.fit(scores, labels, c[i1], c[i2], k)
    return {'method': method, 'k': k, 'seed': seed, 'centroids': centroids, 'scores_of': scores_of or {},
            'fitted_on': fitted_on, **arrays}


def apply(state, features, i1, i2, scores, source='calibration state'):
    """The calibrated scores of pairs (rows i1/i2 of `features`) under a fitted state."""
    x = cluster_features(features)
    if x.shape[1] != state['centroids'].shape[1]:
        raise UserError(f'{source}: fitted on {state["centroids"].shape[1]}-dimensional features, these models '
                        f'give {x.shape[1]}')
    c = assign(x, state['centroids'])
    if state['method'] == 'fsn':
        return fsn.normalise(scores, c[i1], c[i2], state['thresholds'], state['global_threshold'])
    return faircal.calibrate(scores, c[i1], c[i2], state['maps'], state['pairs'], state['score_range'])


def save_state(path, state):
    """The state as NPZ (no pickle: strings as unicode arrays, the provenance as JSON), atomically."""
    meta = {'version': STATE_VERSION, 'method': state['method'], 'k': state['k'], 'seed': state['seed'],
            'scores_of': state['scores_of'], 'fitted_on': state['fitted_on']}
    arrays = {name: np.asarray(state[name]) for name in ARRAYS[state['method']]}
    with atomic_open(path, 'wb') as f:
        np.savez(f, meta=np.array(json.dumps(meta, sort_keys=True)), centroids=state['centroids'], **arrays)


def load_state(path):
    """The state saved by `save_state`; a missing, corrupt or inconsistent file is a one-line error."""
    bad = lambda why: UserError(f'{path}: not a usable calibration state ({why}); fit it again with '
                                f'test/predict.py --fsn K or --faircal K')
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {name: z[name] for name in z.files}
    except FileNotFoundError:
        raise UserError(f'{path}: no such calibration state file') from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise bad(f'cannot read it as NPZ: {e}') from None
    try:
        meta = json.loads(str(data.pop('meta')))
        method, k = meta['method'], int(meta['k'])
        state = {'method': method, 'k': k, 'seed': meta['seed'], 'scores_of': meta['scores_of'],
                 'fitted_on': meta['fitted_on'],
                 'centroids': data.pop('centroids').astype(np.float32)}
        if meta['version'] != STATE_VERSION or method not in METHODS:
            raise ValueError(f'version {meta["version"]}, method {method!r}')
        state.update({name: data.pop(name) for name in ARRAYS[method]})
    except (KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
        raise bad(f'missing or wrong entry {e}') from None
    shapes = {'centroids': (k, None), 'thresholds': (k,), 'impostors': (k,), 'global_threshold': (),
              'fmr': (), 'maps': (k, 3), 'pairs': (k,), 'score_range': (2,)}
    for name, value in state.items():
        if not isinstance(value, np.ndarray):
            continue
        want = shapes[name]
        if value.ndim != len(want) or any(w is not None and s != w for s, w in zip(value.shape, want)) \
                or value.dtype.kind not in 'fi' or not np.isfinite(value).all():
            raise bad(f'{name} has shape {value.shape} and dtype {value.dtype}, expected {want} finite numbers '
                      f'for K={k}')
    if data:
        raise bad(f'unexpected entries {sorted(data)} for {method}')
    return state


def describe(state, state_file):
    """One line for the provenance record and the report."""
    extra = f', FMR {float(state["fmr"]):g}' if state['method'] == 'fsn' else ', beta maps'
    return (f'{METHODS[state["method"]]} ({state["method"]}, K={state["k"]}, seed {state["seed"]}{extra}; '
            f'{state["fitted_on"]}; state {state_file})')


def read_calibration_pairs(ground_truth, images):
    """(ids, i1, i2, labels) of a ground-truth CSV, ids the distinct template ids in sorted order; every
    id needs an image in `images`."""
    id1, id2, labels = read_labels(ground_truth)
    if not len(id1):
        raise UserError(f'{ground_truth}: no pairs (only a header)')
    ids = sorted(set(id1) | set(id2))
    missing = [t for t in ids if t not in images]
    if missing:
        shown = ', '.join(missing[:10]) + (f' ... ({len(missing)} in all)' if len(missing) > 10 else '')
        raise UserError(f'{ground_truth}: calibration pairs name template ids without an image: {shown}')
    i1, i2, _, _ = index_pairs(id1, id2, ids)
    if labels.all() or not labels.any():
        raise UserError(f'{ground_truth}: calibration needs same-person and different-person pairs')
    return ids, i1, i2, labels


class PosthocStep:
    """The post-hoc step `predictions.predict` calls on its final scores: fit on the calibration split (then
    save the state beside the predictions) or use a loaded state, and apply.

    `score_pairs(features, i1, i2)` gives the calibration pairs the same scores as the predicted ones
    (fusion and post-processing); `embedders` extract calibration features that the predicted images
    do not already have.
    """

    def __init__(self, method=None, k=None, seed=0, fmr=1e-3, scores_of=None, state_file='', save_to='',
                 ground_truth='', images=None, embedders=(), score_pairs=None, batch_size=64):
        self.method, self.k, self.seed, self.fmr = method, k, seed, fmr
        self.scores_of, self.save_to, self.ground_truth = scores_of or {}, save_to, ground_truth
        self.embedders, self.score_pairs, self.batch_size = embedders, score_pairs, batch_size
        self.state, self.state_file = None, state_file
        if state_file:
            self.state = load_state(state_file)
            self.check_state()
        else:
            self.calibration = read_calibration_pairs(ground_truth, images)
            self.images = images
            check_clusters(f'--{method}', k, len(self.calibration[0]), ground_truth)

    def check_state(self):
        """A loaded state must match the options given and be fitted on scores of the same kind."""
        s, path = self.state, self.state_file
        if self.method and (self.method, self.k) != (s['method'], s['k']):
            raise UserError(f'{path}: holds {s["method"]} with K={s["k"]}, not the --{self.method} {self.k} '
                            f'asked for')
        if s['scores_of'] != self.scores_of:
            fitted = json.dumps(s['scores_of'], sort_keys=True)
            raise UserError(f'{path}: fitted on scores of {fitted}, these are {json.dumps(self.scores_of, sort_keys=True)}')

    def __call__(self, features, paths, i1, i2, scores):
        """Calibrated `scores` of pairs (rows i1/i2 of `features`, the images at `paths`)."""
        if self.state is None:
            self.state = self.fit(features, paths)
            save_state(self.save_to, self.state)
            self.state_file = self.save_to
        return apply(self.state, features, i1, i2, scores, source=self.state_file)

    def fit(self, features, paths):
        """Fit on the calibration pairs, reusing the predicted images' features when they are the same
        images (the harness's val split), else extracting them."""
        cal_ids, i1, i2, labels = self.calibration
        row = {os.path.abspath(p): n for n, p in enumerate(paths)}
        rows = [row.get(os.path.abspath(self.images[t])) for t in cal_ids]
        if None not in rows:
            cal_features = [f[rows] for f in features]
        else:
            cal_features = extract_features(self.embedders, [self.images[t] for t in cal_ids],
                                            batch_size=self.batch_size, progress=True)
        scores = self.score_pairs(cal_features, i1, i2)
        fitted_on = f'fitted on {os.path.abspath(self.ground_truth)}'
        return fit(self.method, self.k, cal_features, i1, i2, labels, scores, self.seed, self.fmr,
                   self.scores_of, fitted_on)

    def provenance(self):
        """(record for predictions.json, one line for its post-processing list)."""
        s = self.state
        record = {'method': s['method'], 'k': s['k'], 'seed': s['seed'], 'state': os.path.abspath(self.state_file),
                  'fitted_on': s['fitted_on']}
        if s['method'] == 'fsn':
            record['fmr'] = float(s['fmr'])
        beside = self.state_file == self.save_to  # fitted here: beside the predictions; else as given
        return record, describe(s, os.path.basename(self.state_file) if beside else self.state_file)
