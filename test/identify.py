"""Top-1 / top-5 identification of probe images against a gallery (HW_face's classifier_cos).

Folders hold one sub-folder per identity:
    python test/identify.py --gallery gallery/ --probes probes/ --models final_eval_models --out identify.csv

With several models, --fusion mean (default) averages their cosines, so embedding sizes may differ;
--fusion concat joins their features into one embedding (one size only).
"""
import argparse
import os

from recognition.data.lst import dir_to_lst
from recognition.evaluation.identification import FUSIONS, identify
from recognition.inference import add_backend_arg, backend_devices, extract_features, load_models
from recognition.utils import add_device_args, atomic_open, run_cli


def labelled_images(folder):
    """(paths, labels) of folder/<identity>/<image>; the label is the identity folder's name, so gallery
    and probe folders match by name."""
    paths = [item.path for item in dir_to_lst(folder)]
    return paths, [os.path.basename(os.path.dirname(p)) for p in paths]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--gallery', required=True)
    p.add_argument('--probes', required=True)
    p.add_argument('--models', default='final_eval_models', help='model folder(s), as for test/predict.py')
    p.add_argument('--fusion', default='mean', choices=FUSIONS,
                   help='mean: average of the per-model cosines; concat: one joined embedding (one size only)')
    p.add_argument('--out', default='', help='per-probe listing CSV')
    p.add_argument('--top', type=int, default=5)
    p.add_argument('--no-mean', action='store_true', help='do not subtract the gallery mean embedding')
    p.add_argument('--no-flip', action='store_true')
    add_device_args(p)
    add_backend_arg(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    ctx = backend_devices(args.backend, args.gpus, args.ctx)
    embedders = load_models(args.models, ctx=ctx, batch_size=args.batch_size, backend=args.backend)
    g_paths, g_labels = labelled_images(args.gallery)
    p_paths, p_labels = labelled_images(args.probes)
    embed = lambda paths: extract_features(embedders, paths, args.batch_size, flip=not args.no_flip, progress=True)
    r = identify(embed(g_paths), g_labels, embed(p_paths), p_labels, k=args.top, subtract_mean=not args.no_mean,
                 fusion=args.fusion, names=[e.name for e in embedders])
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
