"""Identification with several models: mean fusion of per-model cosines (any embedding sizes) and concat."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from sklearn.preprocessing import normalize

from recognition.evaluation.identification import identify
from recognition.utils import UserError
from test_inference import make_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mean_fusion_averages_per_model_cosines():
    rng = np.random.RandomState(0)
    g8, p8 = rng.randn(6, 8), rng.randn(3, 8)
    g5, p5 = rng.randn(6, 5), rng.randn(3, 5)
    labels = list('aabbcc')
    r = identify([g8, g5], labels, [p8, p5], ['a', 'b', 'c'], k=3, subtract_mean=False)
    cos = (normalize(p8) @ normalize(g8).T + normalize(p5) @ normalize(g5).T) / 2
    best = np.argsort(-cos, axis=1, kind='stable')[:, :3]
    np.testing.assert_array_equal(r['neighbours'], best)
    np.testing.assert_allclose(r['distances'], np.arccos(np.take_along_axis(cos, best, axis=1)) / np.pi, rtol=1e-5)
    # One model in a list is that model alone.
    alone = identify([g8], labels, [p8], ['a', 'b', 'c'], k=3)
    np.testing.assert_array_equal(alone['neighbours'], identify(g8, labels, p8, ['a', 'b', 'c'], k=3)['neighbours'])
    with pytest.raises(UserError, match='one embedding size, got m8: 8, m5: 5'):
        identify([g8, g5], labels, [p8, p5], ['a', 'b', 'c'], fusion='concat', names=['m8', 'm5'])
    with pytest.raises(UserError, match="--fusion 'max'"):
        identify(g8, labels, p8, ['a', 'b', 'c'], fusion='max')


def test_identify_cli_fuses_models_of_different_sizes(tmp_path):
    models = tmp_path / 'final_eval_models'
    for name, size, seed in [('a_model', 8, 0), ('b_model', 6, 1)]:
        (models / name).mkdir(parents=True)
        make_checkpoint(str(models / name / 'model'), emb_size=size, seed=seed)
        (models / name / 'model.json').write_text(json.dumps({'prefix': 'model', 'epoch': 3}))
    rng = np.random.RandomState(3)
    # The tiny nets pool globally, so identities differ by colour.
    for ident, colour in [('p', (20, 20, 200)), ('q', (200, 30, 30)), ('r', (30, 200, 30))]:
        for split in ('gallery', 'probes'):
            (tmp_path / split / ident).mkdir(parents=True)
        face = (np.array(colour) + rng.randint(0, 8, (112, 112, 3))).astype(np.uint8)
        cv2.imwrite(str(tmp_path / 'gallery' / ident / '0.tif'), face)
        cv2.imwrite(str(tmp_path / 'probes' / ident / '1.png'), np.clip(face.astype(int) + 3, 0, 255).astype(np.uint8))
    run = lambda *extra: subprocess.run(
        [sys.executable, os.path.join(ROOT, 'test', 'identify.py'), '--gallery', str(tmp_path / 'gallery'),
         '--probes', str(tmp_path / 'probes'), '--models', str(models), '--top', '2', '--ctx', 'cpu:1', *extra],
        capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    mean = run('--out', str(tmp_path / 'ident.csv'))
    assert mean.returncode == 0, mean.stderr[-1000:]
    assert 'gallery 3 images, probes 3: Top1 1.0000  Top2 1.0000' in mean.stdout
    rows = (tmp_path / 'ident.csv').read_text().splitlines()
    assert rows[0] == 'probe,label,top1,dist1,top2,dist2' and rows[1].split(',')[1:3] == ['p', 'p']
    concat = run('--fusion', 'concat')
    assert concat.returncode == 2
    assert concat.stderr.strip().splitlines()[-1].startswith('error: --fusion concat needs models of one embedding size')
