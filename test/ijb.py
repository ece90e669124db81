"""IJB-B / IJB-C 1:1 template verification, insightface's eval_ijbc protocol (recognition/evaluation/ijb.py).

    python test/ijb.py --image-path IJB_release/IJBC --target IJBC --model final_eval_models/r100 \
        [--model other,0 ...] --result-dir results/ijbc

--image-path holds meta/ijbc_face_tid_mid.txt, meta/ijbc_template_pair_label.txt,
meta/ijbc_name_5pts_score.txt and loose_crop/ (IJB-B: ijbb_ files, --target IJBB). Writes into
--result-dir: <target>_<model>.npy scores per pair (and <target>_fused.npy with several models),
<target>_tar_far.json / .md (TAR at FAR 1e-6..1e-1 with 95% intervals) and <target>_roc.png.
"""
import argparse
import os
import re

import numpy as np

from recognition.evaluation.bootstrap import REPLICATES
from recognition.evaluation.ijb import TARGETS, evaluate, format_table, image_features, load_protocol, plot_roc
from recognition.inference import add_backend_arg, backend_devices, load_embedder
from recognition.model_folder import model_spec
from recognition.utils import add_device_args, atomic_open, atomic_path, run_cli, write_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--image-path', required=True, help='the IJB folder (meta/ and loose_crop/)')
    p.add_argument('--target', default='IJBC', choices=TARGETS)
    p.add_argument('--model', action='append', required=True,
                   help='a model folder or prefix,epoch; repeat for several models (their scores are also fused)')
    p.add_argument('--result-dir', required=True)
    p.add_argument('--fusion', default='mean', choices=('mean', 'concat'),
                   help='several models: mean of template cosines, or the cosine of joined template features')
    p.add_argument('--no-flip', action='store_true', help='no flip TTA (insightface F0)')
    p.add_argument('--norm-images', action='store_true',
                   help='L2-normalise each face before pooling (insightface N0; default keeps the norm, N1)')
    p.add_argument('--no-detector-score', action='store_true',
                   help='do not weight faces by their detector score (insightface D0; default D1)')
    p.add_argument('--bootstrap', type=int, default=REPLICATES, help='replicates for the intervals (0: none)')
    p.add_argument('--seed', type=int, default=0, help='seed of the bootstrap resamples')
    add_device_args(p)
    add_backend_arg(p)
    return p.parse_args(argv)


def file_name(name):
    """A model name as a file name part."""
    return re.sub(r'[^A-Za-z0-9_.-]+', '_', name).strip('_') or 'model'


def main(argv=None):
    args = parse_args(argv)
    protocol = load_protocol(args.image_path, args.target)
    ctx = backend_devices(args.backend, args.gpus, args.ctx)
    embedders = [load_embedder(**model_spec(ref), ctx=ctx, batch_size=args.batch_size, backend=args.backend)
                 for ref in args.model]
    names = [e.name for e in embedders]
    if len(set(names)) < len(names):
        names = [f'{i}_{n}' for i, n in enumerate(names)]
    features = image_features(embedders, protocol, args.batch_size, flip=not args.no_flip)
    result = evaluate(protocol, features, names, norm_images=args.norm_images,
                      detector_score=not args.no_detector_score, fusion=args.fusion,
                      replicates=max(0, args.bootstrap), seed=args.seed)
    out = os.path.join(args.result_dir, args.target)
    for m, scores in result['scores'].items():
        with atomic_path(f'{out}_{file_name(m)}.npy') as tmp:
            with open(tmp, 'wb') as f:
                np.save(f, scores.astype(np.float32), allow_pickle=False)
    table = format_table(result, args.target)
    report = {k: v for k, v in result.items() if k not in ('scores', 'roc')}
    report['table'] = {m: {f'{far:.0e}': v for far, v in t.items()} for m, t in result['table'].items()}
    if result['intervals']:
        report['intervals'] = {m: {f'{far:.0e}': iv for far, iv in t.items()} for m, t in result['intervals'].items()}
    report['models'] = dict(zip(names, args.model))
    write_json(f'{out}_tar_far.json', report)
    with atomic_open(f'{out}_tar_far.md') as f:
        f.write(table + '\n')
    with atomic_path(f'{out}_roc.png') as tmp:
        plot_roc(result, tmp, args.target)
    if result['unenrolled_templates']:
        shown = ', '.join(str(t) for t in result['unenrolled_templates'][:10])
        print(f'{len(result["unenrolled_templates"])} templates of the pair list have no face ({shown}'
              f'{" ..." if len(result["unenrolled_templates"]) > 10 else ""}): their '
              f'{result["pairs_with_unenrolled"]} pairs are scored as rejections')
    print(f'{args.target}: {result["faces"]} faces, {result["templates"]} templates, {result["pairs"]} pairs '
          f'({result["genuine"]} genuine); TAR (%) at FAR' + (f', 95% intervals of {args.bootstrap} replicates'
                                                            if result['intervals'] else ''))
    print(table)


if __name__ == '__main__':
    run_cli(main)
