"""Top-1 / top-5 identification of probe images against a gallery (HW_face's classifier_cos).

Folders hold one sub-folder per identity:
    python test/identify.py --gallery gallery/ --probes probes/ --models final_eval_models --out identify.csv
"""
import argparse
import os

from recognition.evaluation.ensemble import concat_features
from recognition.evaluation.identification import identify
from recognition.inference import extract_features, find_model_dirs, load_model_dir, IMAGE_EXTENSIONS
from recognition.utils import UserError, atomic_open, parse_contexts, run_cli


def labelled_images(folder):
    """(paths, labels) of folder/<identity>/<image>."""
    if not os.path.isdir(folder):
        raise UserError(f'{folder}: folder not found')
    paths, labels = [], []
    for ident in sorted(os.listdir(folder)):
        sub = os.path.join(folder, ident)
        if os.path.isdir(sub):
            for name in sorted(os.listdir(sub)):
                if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                    paths.append(os.path.join(sub, name))
                    labels.append(ident)
    if not paths:
        raise UserError(f'{folder}: no images in identity sub-folders')
    return paths, labels


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--gallery', required=True)
    p.add_argument('--probes', required=True)
    p.add_argument('--models', default='final_eval_models', help='model folder(s), as for test/predict.py')
    p.add_argument('--out', default='', help='per-probe listing CSV')
    p.add_argument('--top', type=int, default=5)
    p.add_argument('--no-mean', action='store_true', help='do not subtract the gallery mean embedding')
    p.add_argument('--no-flip', action='store_true')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--gpus', default='')
    p.add_argument('--ctx', default='')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    ctx = parse_contexts(args.gpus, args.ctx)
    embedders = [load_model_dir(d, ctx=ctx, batch_size=args.batch_size) for d in find_model_dirs(args.models)]
    names = [e.name for e in embedders]
    g_paths, g_labels = labelled_images(args.gallery)
    p_paths, p_labels = labelled_images(args.probes)
    embed = lambda paths: concat_features(extract_features(embedders, paths, args.batch_size,
                                                           flip=not args.no_flip, progress=True), names)
    r = identify(embed(g_paths), g_labels, embed(p_paths), p_labels, k=args.top, subtract_mean=not args.no_mean)
    if args.out:
        with atomic_open(args.out) as f:
            f.write('probe,label,' + ','.join(f'top{i + 1},dist{i + 1}' for i in range(r['k'])) + '\n')
            for path, label, tops, dists in zip(p_paths, p_labels, r['labels'], r['distances']):
                cells = ','.join(f'{t},{d:.4f}' for t, d in zip(tops, dists))
                f.write(f'{path},{label},{cells}\n')
    topk = r[f'top{r["k"]}']
    print(f'gallery {len(g_paths)} images, probes {len(p_paths)}: Top1 {r["top1"]:.4f}  Top{r["k"]} {topk:.4f}')


if __name__ == '__main__':
    run_cli(main)
