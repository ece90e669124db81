"""FairFace-style predictions: align the test photos, embed them with every model, score the template's
pairs (flip TTA, fusion, optional re-ranking and gap-cut, optional post-hoc fair calibration fitted on the
val split) and write TEMPLATE_ID1,TEMPLATE_ID2,SCORE.

    python test/predict.py --images datasets/demo_fairface/test/images \\
        --landmarks datasets/demo_fairface/test/landmarks.txt \\
        --template datasets/demo_fairface/test/predictions.csv --models final_eval_models --out predictions.csv
"""
import argparse
import os
import sys

from recognition.alignment.folder import REPORT_NAME, align_folder
from recognition.detection.choice import add_detector_args, detectors_from_args
from recognition.evaluation.ensemble import FUSIONS, ensemble_scores
from recognition.evaluation.fairness import FMR_TARGET
from recognition.evaluation.pairs_csv import read_pairs_csv
from recognition.evaluation.posthoc import PosthocStep
from recognition.evaluation.predictions import calibration_state_path, predict, provenance_path
from recognition.inference import add_backend_arg, backend_devices, load_model_dir, template_images
from recognition.model_folder import find_model_dirs, model_dir_spec, model_methods
from recognition.utils import UserError, run_cli, write_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--images', required=True, help='folder of test photos named <TEMPLATE_ID>.<ext>')
    p.add_argument('--template', required=True, help='the pair template (TEMPLATE_ID1,TEMPLATE_ID2,SCORE)')
    p.add_argument('--models', default='final_eval_models',
                   help='a folder of model folders, or comma-separated model folders (each with model.json)')
    p.add_argument('--out', required=True, help='predictions CSV to write')
    p.add_argument('--landmarks', default='', help='"<file> x1 y1 ... x5 y5" lines: align with these points')
    p.add_argument('--aligned-dir', default='', help='where aligned crops go (default: <out dir>/aligned)')
    p.add_argument('--already-aligned', action='store_true', help='--images holds aligned 112x112 crops')
    p.add_argument('--fusion', default='mean', choices=FUSIONS,
                   help='mean of cosines | cosine of concatenated features | switch to the hard-sample model')
    p.add_argument('--switch-model', default='',
                   help='model folder name of the hard-sample model for --fusion switch '
                        '(default: the first name containing "hard")')
    p.add_argument('--switch-threshold', type=float, default=0.99)
    p.add_argument('--switch-max', action='store_true',
                   help='above the threshold keep max(fused, hard) instead of the hard model\'s score (the seed)')
    p.add_argument('--rerank', action='store_true', help='k-NN re-ranking over the pair list')
    p.add_argument('--rerank-k', type=int, default=20)
    p.add_argument('--gap-cut', action='store_true', help="the seed's per-image gap-cut adjustment")
    calibration = p.add_argument_group('post-hoc fair calibration (docs/metrics.md; no demographic labels)')
    method = calibration.add_mutually_exclusive_group()
    method.add_argument('--fsn', type=int, metavar='K',
                        help='fair score normalisation (Terhörst et al. 2020) over K k-means clusters')
    method.add_argument('--faircal', type=int, metavar='K',
                        help='FairCal (Salvador et al. 2022): per-cluster beta calibration over K clusters; '
                             'SCORE is the log-odds of the calibrated probability')
    calibration.add_argument('--fsn-fmr', type=float, default=FMR_TARGET, help='FSN thresholds at this FMR')
    calibration.add_argument('--calibration', default='', metavar='SPLIT_DIR',
                             help='split to fit on: SPLIT_DIR/images (+ landmarks.txt) and ground_truth.csv '
                                  '(default: the val split beside --images, <images>/../../val)')
    calibration.add_argument('--calibration-state', default='', metavar='FILE',
                             help='apply this fitted state (the .calibration.npz beside fitted predictions) '
                                  'instead of fitting')
    calibration.add_argument('--seed', type=int, default=0, help='seed of the k-means clustering')
    p.add_argument('--missing-score', type=float, default=None,
                   help='score for pairs whose image is missing (default: missing images are an error)')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--workers', type=int, default=1, help='alignment worker processes')
    add_detector_args(p)
    p.add_argument('--gpus', default='')
    p.add_argument('--ctx', default='')
    add_backend_arg(p)
    return p.parse_args(argv)


def align(args):
    """Aligned crops of --images in --aligned-dir (existing crops are reused); returns that folder and
    {template id: photo} of the photos that failed alignment.

    Images listed in --landmarks are warped from their points; the others go through --detector and
    the alignment module's fallbacks.
    """
    out_dir = args.aligned_dir or os.path.join(os.path.dirname(os.path.abspath(args.out)), 'aligned')
    rows = align_folder(args.images, out_dir, image_size=112, landmarks=args.landmarks or None,
                        detector=detectors_from_args(args), num_workers=args.workers, skip_existing=True)
    failed = {os.path.splitext(os.path.basename(r.path))[0]: r.path for r in rows if r.status == 'failed'}
    return out_dir, failed


def check_template(args, images, failed, report):
    """Problems of the template that `predict` cannot name: no pairs, repeated pairs (a warning: each row
    is scored, in the template's order), ids whose photo exists but failed alignment."""
    id1, id2, _, _ = read_pairs_csv(args.template)
    if not len(id1):
        raise UserError(f'{args.template}: no pairs (only a header)')
    pairs = [frozenset(p) for p in zip(id1, id2)]
    repeated = len(pairs) - len(set(pairs))
    if repeated:
        print(f'warning: {args.template}: {repeated} duplicate pair rows (the same two template ids again); '
              f'each is scored and kept in the template\'s order', file=sys.stderr)
    unaligned = sorted(t for t in set(id1) | set(id2) if t not in images and t in failed)
    if unaligned and args.missing_score is None:
        shown = ', '.join(failed[t] for t in unaligned[:10]) + (' ...' if len(unaligned) > 10 else '')
        raise UserError(f'{args.template}: {len(unaligned)} template ids whose photo failed alignment: {shown} '
                        f'(see {report}; or pass --missing-score)')
    return unaligned


def seed_post_processing(args, switch_model):
    """The seed's post-processing steps, by name."""
    post = ([f'k-NN re-ranking (k={args.rerank_k})'] if args.rerank else []) + (['gap-cut'] if args.gap_cut else [])
    if args.fusion == 'switch':
        post.append(f'switch to {switch_model} above {args.switch_threshold:g}' + (' (max)' if args.switch_max else ''))
    return post


def posthoc_step(args, embedders, switch_model, post, image_dir):
    """The --fsn / --faircal step (fitted on the calibration split, its state saved beside --out) or the
    --calibration-state one, or None."""
    method = 'fsn' if args.fsn is not None else 'faircal' if args.faircal is not None else None
    if method is None and not args.calibration_state:
        return None
    names = [e.name for e in embedders]
    scores_of = {'models': names, 'fusion': args.fusion, 'post_processing': seed_post_processing(args, switch_model)}
    k = args.fsn if method == 'fsn' else args.faircal
    if args.calibration_state:
        return PosthocStep(method, k, scores_of=scores_of, state_file=args.calibration_state)
    if not 0 < args.fsn_fmr < 1:
        raise UserError(f'--fsn-fmr {args.fsn_fmr}: give a false match rate between 0 and 1')
    split = args.calibration or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.images))), 'val')
    ground_truth, photos = os.path.join(split, 'ground_truth.csv'), os.path.join(split, 'images')
    if not os.path.isfile(ground_truth) or not os.path.isdir(photos):
        raise UserError(f'--calibration {split}: needs images/ and ground_truth.csv (default: the val split '
                        f'beside --images)')
    if os.path.abspath(photos) == os.path.abspath(args.images):
        cal_dir = image_dir
    elif args.already_aligned:
        cal_dir = photos
    else:
        cal_dir = os.path.join(os.path.dirname(os.path.abspath(args.out)), 'calibration_aligned')
        landmarks = os.path.join(split, 'landmarks.txt')
        align_folder(photos, cal_dir, image_size=112, landmarks=landmarks if os.path.isfile(landmarks) else None,
                     num_workers=args.workers, skip_existing=True)
    score_pairs = lambda feats, i1, i2: ensemble_scores(feats, names, i1, i2, args.fusion, switch_model, **post)
    return PosthocStep(method, k, args.seed, args.fsn_fmr, scores_of, save_to=calibration_state_path(args.out),
                       ground_truth=ground_truth, images=template_images(cal_dir), embedders=embedders,
                       score_pairs=score_pairs, batch_size=args.batch_size)


def provenance(args, model_dirs, switch_model, summary, posthoc=None):
    """What made the predictions, for the report: models, fusion, post-processing (the post-hoc
    calibration last), the raw fused scores."""
    post = seed_post_processing(args, switch_model)
    record = None
    if posthoc is not None:
        record, line = posthoc.provenance()
        post.append(line)
    models = []
    for d in model_dirs:
        spec = model_dir_spec(d)
        models.append({'name': spec['name'], 'folder': os.path.abspath(d), 'checkpoint': f'{spec["prefix"]},{spec["epoch"]}',
                       'layer': spec['layer'], 'methods': model_methods(d)})
    return {'predictions': os.path.basename(args.out), 'template': os.path.abspath(args.template), 'models': models,
            'fusion': args.fusion, 'post_processing': post, 'posthoc': record,
            'raw_scores': os.path.basename(summary['raw']) if summary['raw'] else None,
            'missing_score': args.missing_score, 'missing_pairs': summary['missing_pairs']}


def main(argv=None):
    args = parse_args(argv)
    model_dirs = find_model_dirs(args.models)
    ctx = backend_devices(args.backend, args.gpus, args.ctx)
    embedders = [load_model_dir(d, ctx=ctx, batch_size=args.batch_size, backend=args.backend) for d in model_dirs]
    names = [e.name for e in embedders]
    switch_model = args.switch_model
    if args.fusion == 'switch' and not switch_model:
        switch_model = next((n for n in names if 'hard' in n), '')
        if not switch_model:
            raise UserError(f'--fusion switch: no model name contains "hard" in {names}; pass --switch-model')
    image_dir, failed = (args.images, {}) if args.already_aligned else align(args)
    images = template_images(image_dir)
    report = os.path.join(image_dir, REPORT_NAME)
    unaligned = check_template(args, images, failed, report)
    post = dict(switch_threshold=args.switch_threshold, switch_max=args.switch_max,
                rerank=args.rerank, k=args.rerank_k, gap=args.gap_cut)
    posthoc = posthoc_step(args, embedders, switch_model, post, image_dir)
    print(f'models: {", ".join(names)}; images: {image_dir}', flush=True)
    summary = predict(args.template, images, embedders, args.out,
                      missing_score=args.missing_score, batch_size=args.batch_size, progress=True,
                      fusion=args.fusion, switch_model=switch_model, posthoc=posthoc, **post)
    if summary['missing']:
        why = f' ({len(unaligned)} failed alignment, see {report})' if unaligned else ''
        print(f'warning: {len(summary["missing"])} template ids without an aligned image{why}; '
              f'{summary["missing_pairs"]} pairs scored {args.missing_score}', file=sys.stderr)
    write_json(provenance_path(args.out), provenance(args, model_dirs, switch_model, summary, posthoc))
    print(f'wrote {args.out}: {summary["pairs"]} pairs over {summary["images"]} images', flush=True)


if __name__ == '__main__':
    run_cli(main)
