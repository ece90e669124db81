"""test/predict.py end to end on aligned crops: file format, template order, fusion and bad input."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from recognition.inference import load_model_dir, read_image
from recognition.utils import UserError
from test_inference import make_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREDICT = os.path.join(ROOT, 'test', 'predict.py')


def load_cli(path):
    """The CLI module itself (test/ is a folder of scripts, not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('predict_cli', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('predict')
    models = root / 'final_eval_models'
    for name, size, seed in [('a_model', 8, 0), ('b_model', 6, 1)]:
        (models / name).mkdir(parents=True)
        make_checkpoint(str(models / name / 'model'), emb_size=size, seed=seed)
        (models / name / 'model.json').write_text(json.dumps({'prefix': 'model', 'epoch': 3}))
    images = root / 'aligned'
    images.mkdir()
    rng = np.random.RandomState(0)
    for tid in ['10', '11', '12', '13']:
        cv2.imwrite(str(images / f'{tid}.png'), rng.randint(0, 256, (112, 112, 3)).astype(np.uint8))
    template = root / 'predictions.csv'
    template.write_text('TEMPLATE_ID1,TEMPLATE_ID2,SCORE\n13,10,\n11,12,\n10,11,\n12,13,\n')
    return root, load_cli(PREDICT)


def expected_scores(model_dir, root, pairs):
    emb = load_model_dir(model_dir)
    feats = {t: emb.embed(read_image(str(root / 'aligned' / f'{t}.png'))[None])[0] for t in '10 11 12 13'.split()}
    return np.array([feats[a] @ feats[b] for a, b in pairs])


def test_predictions_format_order_and_mean_fusion(setup):
    root, cli = setup
    out = root / 'out.csv'
    cli.main(['--images', str(root / 'aligned'), '--already-aligned', '--template', str(root / 'predictions.csv'),
              '--models', str(root / 'final_eval_models'), '--out', str(out)])
    lines = out.read_text().splitlines()
    assert lines[0] == 'TEMPLATE_ID1,TEMPLATE_ID2,SCORE'
    rows = [line.split(',') for line in lines[1:]]
    pairs = [(r[0], r[1]) for r in rows]
    assert pairs == [('13', '10'), ('11', '12'), ('10', '11'), ('12', '13')]
    got = np.array([float(r[2]) for r in rows])
    # Two models of different embedding sizes (8 and 6) fused by the mean of their cosines.
    want = (expected_scores(str(root / 'final_eval_models' / 'a_model'), root, pairs)
            + expected_scores(str(root / 'final_eval_models' / 'b_model'), root, pairs)) / 2
    np.testing.assert_allclose(got, want, atol=2e-6)
    record = json.loads((root / 'out.json').read_text())
    assert [m['name'] for m in record['models']] == ['a_model', 'b_model'] and record['fusion'] == 'mean'
    assert record['post_processing'] == [] and record['raw_scores'] is None and not (root / 'out.raw.csv').exists()
    # With post-processing the fused scores before it are kept beside the predictions.
    cut = root / 'cut.csv'
    cli.main(['--images', str(root / 'aligned'), '--already-aligned', '--template', str(root / 'predictions.csv'),
              '--models', str(root / 'final_eval_models'), '--out', str(cut), '--rerank', '--rerank-k', '2'])
    record = json.loads((root / 'cut.json').read_text())
    assert record['post_processing'] == ['k-NN re-ranking (k=2)'] and record['raw_scores'] == 'cut.raw.csv'
    raw = [float(line.split(',')[2]) for line in (root / 'cut.raw.csv').read_text().splitlines()[1:]]
    np.testing.assert_allclose(raw, want, atol=2e-6)
    with pytest.raises(UserError, match='one embedding size'):
        cli.main(['--images', str(root / 'aligned'), '--already-aligned', '--template',
                  str(root / 'predictions.csv'), '--models', str(root / 'final_eval_models'),
                  '--out', str(root / 'concat.csv'), '--fusion', 'concat'])
    assert not (root / 'concat.csv').exists()


def smooth_face(seed):
    """A smooth 112x112 BGR image: resampling it twice (into a photo and back) changes it little."""
    coarse = np.random.RandomState(seed).randint(0, 256, (7, 7, 3)).astype(np.uint8)
    return cv2.resize(coarse, (112, 112), interpolation=cv2.INTER_CUBIC)


def test_predict_aligns_photos_from_landmarks_and_detection(setup, tmp_path):
    """Unaligned photos end to end: two are aligned crops placed in a larger canvas by a known similarity
    transform (so their true landmarks are the moved template points), one is an astronaut photo that
    MTCNN must find. The written predictions are the model's scores of the crops in template order."""
    from skimage import data
    from recognition.align import REPORT_NAME, read_report, template, transform_points
    root, cli = setup
    photos = tmp_path / 'photos'
    photos.mkdir()
    lines, faces = [], {}
    for tid, (angle, scale, shift) in [('20', (15, 1.7, (60, 40))), ('21', (-10, 1.3, (30, 70)))]:
        faces[tid] = smooth_face(int(tid))
        M = cv2.getRotationMatrix2D((0, 0), angle, scale)
        M[:, 2] += shift
        cv2.imwrite(str(photos / f'{tid}.png'), cv2.warpAffine(faces[tid], M, (300, 280)))
        lines.append(f'{tid}.png ' + ' '.join(f'{v:.4f}' for v in transform_points(M, template(112)).ravel()))
    (tmp_path / 'landmarks.txt').write_text('\n'.join(lines) + '\n')
    cv2.imwrite(str(photos / '22.jpg'), np.ascontiguousarray(data.astronaut()[:300, 80:400, ::-1]))
    pairs = [('22', '20'), ('20', '21'), ('21', '22')]
    (tmp_path / 'template.csv').write_text('TEMPLATE_ID1,TEMPLATE_ID2,SCORE\n'
                                           + ''.join(f'{a},{b},\n' for a, b in pairs))
    model = str(root / 'final_eval_models' / 'a_model')
    out = tmp_path / 'out' / 'predictions.csv'
    out.parent.mkdir()
    cli.main(['--images', str(photos), '--landmarks', str(tmp_path / 'landmarks.txt'), '--template',
              str(tmp_path / 'template.csv'), '--models', model, '--out', str(out)])
    aligned = tmp_path / 'out' / 'aligned'
    status = {r.path: r.status for r in read_report(str(aligned / REPORT_NAME))}
    assert status == {'20.png': 'given', '21.png': 'given', '22.jpg': 'detected'}
    for tid, face in faces.items():  # the warp is undone: the crop is the original face again
        crop = cv2.imread(str(aligned / f'{tid}.jpg')).astype(float)
        assert np.abs(crop[4:-4, 4:-4] - face[4:-4, 4:-4]).mean() < 4.0
    rows = [line.split(',') for line in out.read_text().splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == pairs
    emb = load_model_dir(model)
    feats = {t: emb.embed(read_image(str(aligned / f'{t}.jpg'))[None])[0] for t in ('20', '21', '22')}
    np.testing.assert_allclose([float(r[2]) for r in rows], [feats[a] @ feats[b] for a, b in pairs], atol=2e-6)
    # A second run reuses the crops (skip_existing) and gives the same file.
    first = out.read_text()
    cli.main(['--images', str(photos), '--landmarks', str(tmp_path / 'landmarks.txt'), '--template',
              str(tmp_path / 'template.csv'), '--models', model, '--out', str(out)])
    assert out.read_text() == first


def test_report_names_its_models_and_shows_the_raw_fused_scores(tmp_path):
    """evaluate.py reads predict.py's record: the report says what made the scores and shows the raw fused
    scores' accuracy beside the post-processed ones, with the paired change."""
    from test_bootstrap import evaluate_cli, write_case
    rows = write_case(tmp_path)
    (tmp_path / 'pred.raw.csv').write_text((tmp_path / 'pred.csv').read_text())
    worse = [f'{a},{b},{float(s) * 0.5 + (0.5 if i % 3 == 0 else 0):.6f}'
             for i, (a, b, s) in enumerate(r.split(',') for r in rows)]
    (tmp_path / 'pred.csv').write_text('TEMPLATE_ID1,TEMPLATE_ID2,SCORE\n' + '\n'.join(worse) + '\n')
    (tmp_path / 'pred.json').write_text(json.dumps({
        'models': [{'name': 'm1', 'checkpoint': 'final_eval_models/m1/model,1', 'layer': 'fc1_output'}],
        'fusion': 'mean', 'post_processing': ['gap-cut'], 'raw_scores': 'pred.raw.csv', 'missing_pairs': 0}))
    proc = evaluate_cli(tmp_path, '--bootstrap', '50')
    assert proc.returncode == 0, proc.stderr
    assert 'model m1: final_eval_models/m1/model,1' in proc.stdout and 'post-processing: gap-cut' in proc.stdout
    report = (tmp_path / 'out' / 'report.md').read_text()
    assert '## Produced by' in report and '## Before and after post-processing' in report
    before = json.loads((tmp_path / 'out' / 'report.json').read_text())['before_post_processing']
    change = before['comparison']['values']['accuracy/auc']
    assert change['first'] == before['accuracy']['auc'] and change['difference'] < 0 and change['excludes_0']
    (tmp_path / 'pred.raw.csv').unlink()
    proc = evaluate_cli(tmp_path, '--bootstrap', '0')
    assert proc.returncode == 2 and 'pred.raw.csv, which are not beside it' in proc.stderr


def test_missing_images(setup):
    root, cli = setup
    template = root / 'missing.csv'
    template.write_text('TEMPLATE_ID1,TEMPLATE_ID2,SCORE\n10,11,\n10,99,\n98,12,\n')
    model = str(root / 'final_eval_models' / 'a_model')
    args = ['--images', str(root / 'aligned'), '--already-aligned', '--template', str(template),
            '--models', model]
    out = root / 'missing_out.csv'
    with pytest.raises(UserError, match='98, 99'):
        cli.main(args + ['--out', str(out)])
    assert not out.exists()
    cli.main(args + ['--out', str(out), '--missing-score', '-1'])
    rows = [line.split(',') for line in out.read_text().splitlines()[1:]]
    assert [float(r[2]) for r in rows[1:]] == [-1.0, -1.0]
    assert float(rows[0][2]) == pytest.approx(expected_scores(model, root, [('10', '11')])[0], abs=2e-6)


def test_cli_bad_input_is_one_line_exit_2(setup, tmp_path):
    root, _ = setup
    proc = subprocess.run([sys.executable, PREDICT, '--images', str(root / 'aligned'), '--already-aligned',
                           '--template', str(tmp_path / 'nope.csv'), '--models',
                           str(root / 'final_eval_models'), '--out', str(tmp_path / 'o.csv')],
                          capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith('error: ') and 'nope.csv' in proc.stderr


def test_identification_subtracts_the_gallery_mean():
    from recognition.evaluation.identification import identify
    gallery = np.array([[10.0, 2, 0], [10, 0, 1], [10, -1, 0]])  # labels a, b, c share a big component
    probe = np.array([[6.0, -6, 4]])
    # Raw cosine ranks c (0.700) over b (0.679); after removing the gallery mean b wins (0.733 vs 0.630).
    raw = identify(gallery, ['a', 'b', 'c'], probe, ['b'], k=2, subtract_mean=False)
    centred = identify(gallery, ['a', 'b', 'c'], probe, ['b'], k=2)
    assert list(raw['labels'][0]) == ['c', 'b'] and raw['top1'] == 0.0 and raw['top2'] == 1.0
    assert list(centred['labels'][0]) == ['b', 'c'] and centred['top1'] == 1.0
    np.testing.assert_allclose(centred['distances'][0], np.arccos([0.7328443, 0.63008875]) / np.pi, rtol=1e-5)


def test_feature_identify_and_verification_clis(setup, tmp_path, capsys):
    root, _ = setup
    model = str(root / 'final_eval_models' / 'a_model')
    feats_cli = load_cli(os.path.join(ROOT, 'test', 'extract_features.py'))
    feats_cli.main(['--images', str(root / 'aligned'), '--models', model,
                    '--model', f'{model}/model,3', '--out', str(tmp_path / 'feats')])
    index = (tmp_path / 'feats' / 'index.txt').read_text().split()
    assert [os.path.basename(p) for p in index] == ['10.png', '11.png', '12.png', '13.png']
    a = np.load(tmp_path / 'feats' / 'a_model.npy')
    np.testing.assert_allclose(a, np.load(tmp_path / 'feats' / 'model-0003.npy'))
    assert a.shape == (4, 8)

    for split in ('gallery', 'probes'):
        for ident in ('p', 'q'):
            (tmp_path / split / ident).mkdir(parents=True)
    rng = np.random.RandomState(3)
    for ident in ('p', 'q'):
        face = rng.randint(0, 256, (112, 112, 3)).astype(np.uint8)
        cv2.imwrite(str(tmp_path / 'gallery' / ident / '0.png'), face)
        cv2.imwrite(str(tmp_path / 'probes' / ident / '1.png'), np.clip(face.astype(int) + 3, 0, 255).astype(np.uint8))
    ident_cli = load_cli(os.path.join(ROOT, 'test', 'identify.py'))
    ident_cli.main(['--gallery', str(tmp_path / 'gallery'), '--probes', str(tmp_path / 'probes'),
                    '--models', model, '--out', str(tmp_path / 'ident.csv'), '--top', '2'])
    assert 'Top1 1.0000' in capsys.readouterr().out
    assert (tmp_path / 'ident.csv').read_text().splitlines()[0] == 'probe,label,top1,dist1,top2,dist2'

    from recognition.data.bin import write_bin
    bins, issame = [], []
    for i in range(10):  # 10 pairs: genuine = a face and its slightly brighter copy
        # The tiny net pools globally, so faces differ by colour: impostors get far apart colours.
        c = rng.randint(0, 128, 3)
        x = (c + rng.randint(0, 8, (112, 112, 3))).astype(np.uint8)
        y = (x + 2 if i % 2 == 0 else 255 - x).astype(np.uint8)
        bins += [cv2.imencode('.png', x)[1].tobytes(), cv2.imencode('.png', y)[1].tobytes()]
        issame.append(i % 2 == 0)
    write_bin(str(tmp_path / 'tiny.bin'), bins, issame)
    ver_cli = load_cli(os.path.join(ROOT, 'test', 'verification.py'))
    ver_cli.main(['--data-dir', str(tmp_path), '--model', f'{model}/model,3', '--target', 'tiny',
                  '--batch-size', '4', '--nfolds', '5'])
    out = capsys.readouterr().out
    assert '[tiny]XNorm: ' in out and '[tiny]Accuracy-Flip: 1.00000+-0.00000' in out
