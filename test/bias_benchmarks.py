"""The RFW and BFW bias protocols with 95% subject-level bootstrap intervals (recognition/evaluation/bias_benchmarks.py).

    python test/bias_benchmarks.py --protocol rfw --root RFW/test_aligned --model final_eval_models/r100 --out results/rfw
    python test/bias_benchmarks.py --protocol bfw --root bfw --model final_eval_models/r100 --out results/bfw

RFW: --root holds txts/<subset>/<subset>_pairs.txt and data/<subset>/<id>/<id>_000N.jpg. BFW: --root holds
the images the datatable's p1/p2 name (--datatable, default <root>/bfw-datatable.csv). Images are read as
aligned crops (resized to 112x112 when they are not): align RFW's or BFW's loose crops first
(data_process/align_dataset_mtcnn.py) or use their aligned releases. Writes <out>.json and <out>.md.
"""
import argparse
import os

import numpy as np

from recognition.evaluation.bias_benchmarks import (RFW_SUBSETS, evaluate_bfw, evaluate_rfw, format_number, read_bfw,
                                                    read_rfw)
from recognition.evaluation.bootstrap import REPLICATES
from recognition.evaluation.fairness import FAR_TARGETS
from recognition.inference import add_backend_arg, backend_devices, extract_features, load_embedder
from recognition.model_folder import model_spec
from recognition.utils import UserError, add_device_args, atomic_open, run_cli, write_json


def far_list(text):
    try:
        values = tuple(float(v) for v in text.split(',') if v)
    except ValueError:
        values = ()
    if not values or not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f'{text}: comma-separated FAR targets between 0 and 1')
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--protocol', required=True, choices=('rfw', 'bfw'))
    p.add_argument('--root', required=True, help='the RFW folder (txts/, data/) or the BFW image folder')
    p.add_argument('--datatable', default='', help='BFW: the pair CSV (default <root>/bfw-datatable.csv)')
    p.add_argument('--subsets', default=','.join(RFW_SUBSETS), help='RFW: the subsets to evaluate')
    p.add_argument('--far', type=far_list, default=FAR_TARGETS, help='BFW: FAR targets, e.g. 1e-3,1e-4')
    p.add_argument('--model', action='append', required=True,
                   help='a model folder or prefix,epoch; repeat to evaluate several models')
    p.add_argument('--out', required=True, help='output path without extension (.json and .md are written)')
    p.add_argument('--no-flip', action='store_true')
    p.add_argument('--bootstrap', type=int, default=REPLICATES, help='replicates for the intervals (0: none)')
    p.add_argument('--seed', type=int, default=0, help='seed of the bootstrap resamples')
    add_device_args(p)
    add_backend_arg(p)
    return p.parse_args(argv)


def pair_features(embedders, paths1, paths2, args):
    """Per model, (features of image 1, of image 2) per pair; each distinct image is embedded once."""
    images = sorted(set(paths1) | set(paths2))
    index = {p: i for i, p in enumerate(images)}
    i1, i2 = np.array([index[p] for p in paths1]), np.array([index[p] for p in paths2])
    feats = extract_features(embedders, images, args.batch_size, flip=not args.no_flip, progress=True)
    return [(f[i1], f[i2]) for f in feats]


def rfw_report(names, results):
    subsets = list(results[0]['pairs'])
    lines = ['| model | ' + ' | '.join(subsets) + ' | mean | std | SER |', '| --- ' * (len(subsets) + 4) + '|']
    for name, r in zip(names, results):
        n = r['numbers']
        cells = [format_number(n[f'accuracy/{s}']) for s in r['pairs']]
        cells += [format_number(n['mean']), format_number(n['std']), format_number(n['ser'], scale=1.0)]
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return lines


def bfw_report(names, results):
    lines = []
    for name, r in zip(names, results):
        n = r['numbers']
        for far in r['far_targets']:
            base = f'far_{far:.0e}'
            lines += [f'### {name}, FAR {far:g} (TAR overall at the global threshold '
                      f'{format_number(n[f"{base}/tar_global/all"])})', '',
                      '| subgroup | TAR, global threshold | FAR, global threshold | TAR, own threshold | gain |',
                      '| --- | --- | --- | --- | --- |']
            for g in r['subgroups']:
                lines.append(f'| {g} | ' + ' | '.join(format_number(n[f'{base}/{k}/{g}'], digits=3)
                                                     for k in ('tar_global', 'far_global', 'tar_own', 'tar_gain'))
                             + ' |')
            lines += ['', f'FAR spread at the global threshold {format_number(n[f"{base}/far_global_spread"], digits=3)}'
                          f' (ratio {format_number(n[f"{base}/far_global_ratio"], scale=1.0)}); TAR spread: global '
                          f'threshold {format_number(n[f"{base}/tar_global_spread"], digits=3)}, own thresholds '
                          f'{format_number(n[f"{base}/tar_own_spread"], digits=3)}', '']
    return lines


def main(argv=None):
    args = parse_args(argv)
    if args.protocol == 'rfw':
        subsets = [s for s in args.subsets.split(',') if s]
        data = read_rfw(args.root, subsets)
    else:
        table = args.datatable or os.path.join(args.root, 'bfw-datatable.csv')
        p1, p2, labels, id1, id2, groups = read_bfw(table)
    ctx = backend_devices(args.backend, args.gpus, args.ctx)
    embedders = [load_embedder(**model_spec(ref), ctx=ctx, batch_size=args.batch_size, backend=args.backend)
                 for ref in args.model]
    names = [e.name for e in embedders]
    if len(set(names)) < len(names):
        names = [f'{i}_{n}' for i, n in enumerate(names)]
    replicates = max(0, args.bootstrap)
    if args.protocol == 'rfw':
        spans, start = {}, 0
        for s, d in data.items():
            spans[s] = slice(start, start + len(d[2]))
            start += len(d[2])
        feats = pair_features(embedders, [p for d in data.values() for p in d[0]],
                              [p for d in data.values() for p in d[1]], args)
        results = [evaluate_rfw(data, {s: (a[span], b[span]) for s, span in spans.items()}, replicates, args.seed)
                   for a, b in feats]
        lines = rfw_report(names, results)
        title = 'RFW: accuracy (%) per subset with the 10-fold threshold; SER = highest / lowest error'
    else:
        paths = [[os.path.join(args.root, p) for p in ps] for ps in (p1, p2)]
        feats = pair_features(embedders, *paths, args)
        results = [evaluate_bfw(np.sum(a * b, axis=1), labels, id1, id2, groups, args.far, replicates, args.seed)
                   for a, b in feats]
        if not results[0]['subgroups']:
            raise UserError(f'{table}: no pair has att1 equal to att2, so no subgroup has pairs')
        lines = bfw_report(names, results)
        title = 'BFW: TAR and FAR (%) per subgroup, the global threshold against per-subgroup thresholds'
    if replicates:
        title += (f'; 95% intervals of {replicates} identity-level bootstrap replicates (seed {args.seed}); a '
                  f'spread, std or ratio is biased upwards in resamples and can lie below its own interval '
                  f'(docs/metrics.md)')
    write_json(args.out + '.json', {'protocol': args.protocol, 'models': dict(zip(names, args.model)),
                                    'results': dict(zip(names, results))})
    with atomic_open(args.out + '.md') as f:
        f.write('\n'.join([title, ''] + lines) + '\n')
    print(title)
    print('\n'.join(lines))


if __name__ == '__main__':
    run_cli(main)
