"""Parameter-server training on this machine: 1 process vs 2 workers + 1 server, and r50's traffic.

    OMP_NUM_THREADS=1 python bench/bench_dist.py [--network demo] [--steps 30] [--batch 16]

Both set-ups run `train/train.py` on the same synthetic rec (112x112, made here in a temp folder) with
one CPU context per process; the speed is the trainer's own `Speed: N samples/sec` log (global samples),
median over the logged intervals after the first. The traffic column is what a worker sends and receives
per step with the kvstore: every trainable parameter as float32 gradient up and weight (or aggregated
gradient) down, i.e. parameters x 4 bytes x 2 directions, per worker.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEED = re.compile(r'Speed: ([0-9.]+) samples/sec')


def make_rec(folder, identities=32, per_identity=8, seed=0):
    from recognition.data import synthetic_faces as synthetic
    from recognition.data.record import IdentityRecordWriter
    rng = np.random.default_rng(seed)
    with IdentityRecordWriter(os.path.join(folder, 'train')) as writer:
        for i in range(identities):
            ident = synthetic.sample_identity(rng, i % 2, (i // 2) % 2, i)
            faces = [synthetic.render_aligned(ident, synthetic.sample_variation(ident, rng))[0]
                     for _ in range(per_identity)]
            writer.add_identity(i, [(cv2.imencode('.jpg', f)[1].tobytes(), 1, None) for f in faces])


def train_command(data_dir, models, args, kvstore):
    return [sys.executable, os.path.join(ROOT, 'train', 'train.py'), '--network', args.network,
            '--loss', 'nsoftmax', '--dataset', 'demo', '--data-dir', data_dir, '--val-targets', '',
            '--models-root', models, '--max-steps', str(args.steps), '--per-batch-size', str(args.batch),
            '--ctx', 'cpu:1', '--kvstore', kvstore, '--ckpt', '0', '--frequent', '5', '--lr', '0.01',
            '--verbose', str(args.steps + 1)]


def median_speed(output):
    speeds = [float(v) for v in SPEED.findall(output)]
    if len(speeds) < 2:
        raise SystemExit('too few speed lines; raise --steps\n' + output[-2000:])
    return statistics.median(speeds[1:])


def traffic(network, classes=85742):
    """Bytes a worker moves per step for `network`, without and with an MS1M-size fc7."""
    import mxnet as mx
    from recognition.models import get_model, init_params
    net = init_params(get_model(network))
    net(mx.nd.zeros((1, 3, 112, 112)))
    backbone = sum(int(np.prod(p.shape)) for p in net.collect_params().values() if p.grad_req != 'null')
    emb = net(mx.nd.zeros((1, 3, 112, 112))).shape[1]
    return backbone, backbone + classes * emb


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--network', default='demo')
    parser.add_argument('--steps', type=int, default=30)
    parser.add_argument('--batch', type=int, default=16, help='per process (per worker)')
    args = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))
    with tempfile.TemporaryDirectory() as tmp:
        make_rec(tmp)
        rows = []
        tic = time.time()
        one = subprocess.run(train_command(tmp, os.path.join(tmp, 'm1'), args, 'device'), env=env,
                             capture_output=True, text=True, check=True)
        rows.append(('1 process, kvstore device', args.batch, median_speed(one.stdout + one.stderr),
                     time.time() - tic))
        tic = time.time()
        dist = subprocess.run([sys.executable, os.path.join(ROOT, 'train', 'launch_dist.py'), '-n', '2', '-s', '1',
                               '--'] + train_command(tmp, os.path.join(tmp, 'm2'), args, 'dist_sync'),
                              env=env, capture_output=True, text=True, check=True)
        worker0 = '\n'.join(line for line in dist.stdout.splitlines() if line.startswith('[worker 0]'))
        rows.append(('2 workers + 1 server, dist_sync', 2 * args.batch, median_speed(worker0), time.time() - tic))
    print(f'| set-up | global batch | samples/s | wall s ({args.steps} steps) |')
    print('|---|---|---|---|')
    for name, batch, speed, wall in rows:
        print(f'| {name} | {batch} | {speed:.1f} | {wall:.0f} |')
    print(f'ratio 2 workers / 1 process: {rows[1][2] / rows[0][2]:.2f}')
    backbone, with_fc7 = traffic('r50')
    print('\n| r50 per worker per step | parameters | bytes (x4 x2) |')
    print('|---|---|---|')
    print(f'| backbone + embedding | {backbone:,} | {backbone * 8 / 1e6:.0f} MB |')
    print(f'| + fc7 for 85,742 classes (emore) | {with_fc7:,} | {with_fc7 * 8 / 1e6:.0f} MB |')


if __name__ == '__main__':
    main()
