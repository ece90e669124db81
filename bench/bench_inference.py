"""Inference speed: insightface's way (a plain `mx.mod.Module` forward at batch 32, the baseline), our MXNet
path and onnxruntime, side by side in one run; then `test/verification.py` wall time on a 6,000-pair .bin.

1. images/s of r18, y1 and demo (randomly initialised, seeded) at batch 32 and 128: each round times 128
   images through every variant in turn, so a busy machine slows all of them alike; the ratios to the
   baseline of the same round are the result (median and range over the rounds).
2. wall time of `test/verification.py --backend mxnet|onnxruntime` against the Module-baseline loop
   (insightface's `verification.test`: `load_bin`, Module forwards at batch 32 over both flips, 10 folds),
   each a fresh process, interleaved, on a .bin of synthetic faces (the renderer of the demo sets).

The ONNX exports are made (and cached) before any timing. The baseline binds the graph as insightface's
deploy code does; where MXNet 1.9.1's MKLDNN graph pass fails on it (y1: every forward after the first),
it is bound with the pass off (MXNET_SUBGRAPH_BACKEND=NONE), the only way that Module runs it here.

    OMP_NUM_THREADS=1 python bench/bench_inference.py [--nets r18,y1,demo] [--rounds 3] [--pairs 6000]
"""
import argparse
import os
import subprocess
import sys
import time

import cv2
import mxnet as mx
import numpy as np

from recognition.checkpoint import save_checkpoint
from recognition.data.bin import read_bin, write_bin
from recognition.data.synthetic_faces import render_aligned, sample_identity, sample_variation
from recognition.evaluation.verification import evaluate
from recognition.export import cached_onnx, relative_difference
from recognition.inference import load_embedder
from recognition.models import forward_flops, random_inference_net

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = 128


def make_checkpoint(work, name, seed=0):
    """`models.random_inference_net(name, seed)` saved once as `work/name-0001.params`."""
    prefix = os.path.join(work, name)
    if not os.path.isfile(prefix + '-0001.params'):
        save_checkpoint(prefix, 1, random_inference_net(name, seed))
    return prefix


def module_baseline(prefix, batch_size=32):
    """insightface's deploy code: load_checkpoint, fc1_output, Module(label_names=None), bind, set_params.
    Returns (embed function of an NDArray batch of `batch_size`, note)."""
    sym, arg, aux = mx.model.load_checkpoint(prefix, 1)
    sym = sym.get_internals()['fc1_output']
    probe = mx.nd.zeros((batch_size, 3, 112, 112))
    for backend in (None, 'NONE'):
        if backend:
            os.environ['MXNET_SUBGRAPH_BACKEND'] = backend
        model = mx.mod.Module(symbol=sym, context=mx.cpu(), label_names=None)
        model.bind(data_shapes=[('data', probe.shape)], for_training=False)
        model.set_params(arg, aux, allow_extra=True)
        os.environ.pop('MXNET_SUBGRAPH_BACKEND', None)

        def forward(x, model=model):
            model.forward(mx.io.DataBatch(data=(x,)), is_train=False)
            return model.get_outputs()[0].asnumpy()
        try:
            forward(probe), forward(probe)
            return forward, 'Module' if backend is None else 'Module, MKLDNN pass off (it fails on this net)'
        except mx.base.MXNetError:
            continue
    raise RuntimeError(f'{prefix}: the Module baseline does not run')


def flops_per_image(prefix):
    """`models.forward_flops` of the checkpoint's `fc1_output` graph (2 x the multiply-adds of its convolutions
    and dense layers): with the rates, the arithmetic rate each variant reaches on this core."""
    return forward_flops(mx.model.load_checkpoint(prefix, 1)[0].get_internals()['fc1_output'])


def rate(fn, repeat=1):
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return IMAGES * repeat / (time.perf_counter() - start)


def bench_throughput(work, nets, batches, rounds):
    x = mx.nd.array(np.random.default_rng(1).uniform(0, 255, (IMAGES, 3, 112, 112)).astype(np.float32))
    rows = []
    for name in nets:
        prefix = make_checkpoint(work, name)
        cached_onnx(prefix, 1, log=lambda *a: None)
        base, note = module_baseline(prefix)
        variants = {'module@32': lambda: np.concatenate([base(x[lo:lo + 32]) for lo in range(0, IMAGES, 32)])}
        for b in batches:
            for backend in ('mxnet', 'onnxruntime'):
                emb = load_embedder(prefix, 1, batch_size=b, backend=backend)
                variants[f'{backend}@{b}'] = lambda emb=emb: emb.forward(x)
        ref = variants['module@32']()
        for key, fn in variants.items():
            diff = relative_difference(fn(), ref)
            assert diff < 1e-4, (name, key, diff)
        rates = {k: [] for k in variants}
        for _ in range(rounds):
            for key, fn in variants.items():
                rates[key].append(rate(fn))
        base_rates = np.array(rates['module@32'])
        flops = flops_per_image(prefix)
        print(f'\n{name} (baseline: {note}; {rounds} rounds of {IMAGES} images, OMP_NUM_THREADS='
              f'{os.environ.get("OMP_NUM_THREADS", "unset")}; {flops / 2e9:.3f} GMAC per image)')
        print('| variant | images/s (median) | GFLOP/s (median) | x baseline (median) | range over rounds |')
        print('|---|---|---|---|---|')
        for key, values in rates.items():
            ratio = np.array(values) / base_rates
            print(f'| {key} | {np.median(values):.1f} | {flops * np.median(values) / 1e9:.0f} | '
                  f'{np.median(ratio):.2f} | {ratio.min():.2f}-{ratio.max():.2f} |', flush=True)
        rows.append((name, rates))
    return rows


def make_bin(path, pairs, seed=0, identities=200, per_identity=3):
    """A .bin of `pairs` pairs (half genuine) over rendered faces of `identities` synthetic people."""
    if os.path.isfile(path):
        return
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(identities):
        ident = sample_identity(rng, int(rng.integers(2)), int(rng.integers(2)), i)
        crops.append([cv2.imencode('.jpg', render_aligned(ident, sample_variation(ident, rng))[0])[1]
                      for _ in range(per_identity)])
    bins, issame = [], []
    for p in range(pairs):
        a = int(rng.integers(identities))
        same = p % 2 == 0
        b = a if same else int((a + 1 + rng.integers(identities - 1)) % identities)
        i, j = rng.choice(per_identity, 2, replace=False) if same else rng.integers(per_identity, size=2)
        bins += [crops[a][i], crops[b][j]]
        issame.append(same)
    write_bin(path, bins, issame)


def insightface_load_bin(path, image_size=(112, 112)):
    """insightface's `verification.load_bin` as it decodes: `mx.image.imdecode` one image at a time, then
    transpose and flip as NDArray ops into two preallocated arrays (the bytes come through our restricted
    reader, not a plain pickle.load)."""
    bins, issame = read_bin(path)
    data_list = [mx.nd.empty((len(bins), 3, image_size[0], image_size[1])) for _ in range(2)]
    for i, encoded in enumerate(bins):
        img = mx.image.imdecode(encoded)
        if img.shape[1] != image_size[0]:
            img = mx.image.resize_short(img, image_size[0])
        img = mx.nd.transpose(img, axes=(2, 0, 1))
        for flip in (0, 1):
            if flip == 1:
                img = mx.nd.flip(data=img, axis=2)
            data_list[flip][i][:] = img
    return data_list, issame


def baseline_verification(bin_path, prefix):
    """insightface's verification.test (its load_bin, a Module at batch 32, 10 folds), run as its own process
    by the bench."""
    batch_size = 32
    data_list, issame = insightface_load_bin(bin_path)
    forward, note = module_baseline(prefix, batch_size)
    embeddings = []
    for data in data_list:
        out = np.zeros((data.shape[0], 0), np.float32)
        ba = 0
        while ba < data.shape[0]:
            bb = min(ba + batch_size, data.shape[0])
            count = bb - ba
            emb = forward(data[bb - batch_size:bb])
            out = emb[batch_size - count:] if not out.size else np.concatenate([out, emb[batch_size - count:]])
            ba = bb
        embeddings.append(out)
    result = evaluate(embeddings[0] + embeddings[1], issame, nrof_folds=10)
    print(f'[{note}] Accuracy-Flip: {result["acc"]:1.5f}+-{result["std"]:1.5f}')


def bench_verification(work, name, pairs, rounds):
    data_dir = os.path.join(work, 'bins')
    bin_path = os.path.join(data_dir, f'bench{pairs}.bin')
    make_bin(bin_path, pairs)
    prefix = make_checkpoint(work, name)
    cached_onnx(prefix, 1, log=lambda *a: None)
    env = {**os.environ, 'PYTHONWARNINGS': 'ignore'}
    commands = {
        'Module-baseline loop': [sys.executable, __file__, '--baseline-verification', bin_path, prefix],
        'test/verification.py --backend mxnet': [sys.executable, os.path.join(ROOT, 'test', 'verification.py'),
                                                 '--data-dir', data_dir, '--model', prefix + ',1',
                                                 '--target', f'bench{pairs}', '--backend', 'mxnet'],
    }
    commands['test/verification.py --backend onnxruntime'] = commands['test/verification.py --backend mxnet'][:-1] \
        + ['onnxruntime']
    walls = {k: [] for k in commands}
    for _ in range(rounds):
        for key, cmd in commands.items():
            start = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            walls[key].append(time.perf_counter() - start)
            if out.returncode:
                raise RuntimeError(f'{key} failed: {out.stderr[-2000:]}')
            accuracy = [line for line in out.stdout.splitlines() if 'Accuracy-Flip' in line]
    print(f'\nverification wall time, {name}, {pairs} pairs ({2 * pairs} images, x2 with the flips), {rounds} rounds')
    print('| command | wall s (median) | x baseline wall (median) | range over rounds |')
    print('|---|---|---|---|')
    base = np.array(walls['Module-baseline loop'])
    for key, values in walls.items():
        ratio = np.array(values) / base
        print(f'| {key} | {np.median(values):.1f} | {np.median(ratio):.2f} | {ratio.min():.2f}-{ratio.max():.2f} |',
              flush=True)
    print('last accuracy line:', accuracy[-1] if accuracy else 'none')


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--nets', default='r18,y1,demo')
    p.add_argument('--batches', default='32,128')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--pairs', type=int, default=6000)
    p.add_argument('--verification-net', default='demo', help="the net of the verification timing ('' skips it)")
    p.add_argument('--verification-rounds', type=int, default=2)
    p.add_argument('--work', default='/tmp/bench_inference', help='checkpoints, exports and the .bin')
    p.add_argument('--baseline-verification', nargs=2, metavar=('BIN', 'PREFIX'), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.baseline_verification:
        return baseline_verification(*args.baseline_verification)
    os.makedirs(args.work, exist_ok=True)
    print(f'{os.uname().nodename}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start, '
          f'mxnet {mx.__version__}', flush=True)
    nets = [n for n in args.nets.split(',') if n]
    if nets:
        bench_throughput(args.work, nets, [int(b) for b in args.batches.split(',')], args.rounds)
    if args.verification_net:
        bench_verification(args.work, args.verification_net, args.pairs, args.verification_rounds)
    print(f'\nload average {os.getloadavg()[0]:.1f} at the end')


if __name__ == '__main__':
    main()
