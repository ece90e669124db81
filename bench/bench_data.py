"""Data-layer speed, side by side in one run (run by hand; prints a markdown table).

    OMP_NUM_THREADS=1 python bench/bench_data.py [--images 3000] [--rounds 3] [--index-images 1000000]

- packer images/s with 1 and 2 processes, for aligned rows (bytes copied after a decode check)
  and unaligned rows (decode, 5-point alignment, JPEG encode);
- raw JPEG decode rate (cv2.imdecode over the same records, one process): the limit per worker;
- training loader (decode + mirror + batch of 128 as NDArray Bx3x112x112 float32) with 0, 1 and 2
  worker processes, one full epoch per run;
- opening a rec of `--index-images` images (MS1M's images/identity ratio) in a fresh process:
  seconds and resident memory added.
The machine is shared, so runs of the compared settings are interleaved over `--rounds` rounds
(medians reported) and CPU time is measured beside wall time: images per CPU-second of the
processes doing the work (the worker processes, read from /proc/PID/stat), which other jobs on the
machine affect much less than wall time. Everything is made in a temporary folder from skimage's
astronaut photo.
"""
import argparse
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np
from skimage import data as skdata

from recognition.alignment.geometry import template
from recognition.data.lst import LstItem, write_lst
from recognition.data.packer import pack
from recognition.data.record import IdentityRecordWriter, RecordFile, unpack_header

TICK = os.sysconf('SC_CLK_TCK')


def make_images(folder, n, per_identity=10, seed=0):
    """n aligned 112x112 face crops (jittered crops of the astronaut's face) in identity folders."""
    rng = np.random.default_rng(seed)
    photo = cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR)
    items = []
    for i in range(n):
        x, y, s = rng.integers(150, 190), rng.integers(60, 100), rng.integers(130, 170)
        face = cv2.resize(photo[y:y + s, x:x + s], (112, 112), interpolation=cv2.INTER_AREA)
        face = cv2.add(face, rng.integers(-20, 20, 3).astype(np.float64))
        path = os.path.join('img', '%05d' % (i // per_identity), '%d.jpg' % i)
        os.makedirs(os.path.join(folder, os.path.dirname(path)), exist_ok=True)
        cv2.imwrite(os.path.join(folder, path), face, [cv2.IMWRITE_JPEG_QUALITY, 95])
        items.append((path, i // per_identity))
    return items


def children_cpu():
    """{pid: CPU seconds (user + system)} of this process's live children, from /proc."""
    me, out = str(os.getpid()), {}
    for pid in os.listdir('/proc'):
        if not pid.isdigit():
            continue
        try:
            with open(f'/proc/{pid}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:
            out[int(pid)] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def reaped_children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def median(values):
    return float(np.median(values))


def _spin(n):
    x = 0
    for i in range(n):
        x += i
    return x


def spin_rate(procs, n=4_000_000):
    """Wall loop iterations/s of a pure-Python loop split over `procs` forked processes."""
    start = time.perf_counter()
    with multiprocessing.get_context('fork').Pool(procs) as pool:
        pool.map(_spin, [n // procs] * procs)
    return n / (time.perf_counter() - start)


def bench_packer(folder, items, rounds):
    """{row kind: {procs: (wall images/s, main CPU s/image, worker CPU s/image)}}, medians over rounds."""
    aligned = [LstItem(1, p, k) for p, k in items]
    # unaligned rows: the face at a random place of a bigger frame, with its 5 points
    unaligned = [LstItem(0, p, k, None, template() + 4.0) for p, k in items]
    write_lst(os.path.join(folder, 'aligned.lst'), aligned)
    write_lst(os.path.join(folder, 'unaligned.lst'), unaligned)
    out = {'control': {1: [], 2: []}}
    for name in ('aligned', 'unaligned'):
        runs = {1: [], 2: []}
        for r in range(rounds):
            for procs in ((1, 2) if r % 2 == 0 else (2, 1)):
                out['control'][procs].append(spin_rate(procs))
                main0, kids0, wall0 = time.process_time(), reaped_children_cpu(), time.perf_counter()
                summary = pack(os.path.join(folder, name), num_threads=procs)
                wall = time.perf_counter() - wall0
                n = summary['images']
                runs[procs].append((n / wall, (time.process_time() - main0) / n,
                                    (reaped_children_cpu() - kids0) / n))
        out[name] = {p: tuple(median(col) for col in zip(*v)) for p, v in runs.items()}
    out['control'] = {p: median(v) for p, v in out['control'].items()}
    return out


def bench_decode(rec_path):
    """(wall, CPU) images/s of cv2.imdecode over the rec's bodies in this process."""
    record = RecordFile(rec_path)
    bodies = [unpack_header(record.read(k))[2] for k in range(1, len(record)) if k < 1 + 2000]
    bodies = [b for b in bodies if b]
    wall, cpu = time.perf_counter(), time.process_time()
    for b in bodies:
        cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
    return len(bodies) / (time.perf_counter() - wall), len(bodies) / (time.process_time() - cpu)


def bench_loader(rec_path, workers, batch_size=128):
    """One epoch: (wall images/s after the first batch, images per CPU-second of the decoding
    processes (the workers, or the main one with 0 workers), main-process CPU seconds per image)."""
    from recognition.data.dataset import FaceRecordDataset, train_loader
    from recognition.data.transforms import train_transform
    dataset = FaceRecordDataset(rec_path, transform=train_transform(mirror=True))
    loader = train_loader(dataset, batch_size, num_workers=workers, seed=0)
    before = children_cpu()
    main0 = time.process_time()
    total, start, after_first = 0, None, 0
    for data, _ in loader:
        data.wait_to_read()
        assert data.shape == (batch_size, 3, 112, 112) and data.dtype == np.float32
        total += data.shape[0]
        if start is None:   # skip pool start-up and the first prefetch
            start = time.perf_counter()
        else:
            after_first += data.shape[0]
    wall = after_first / (time.perf_counter() - start)
    main = time.process_time() - main0
    if workers:
        spent = sum(cpu - before.get(pid, 0.0) for pid, cpu in children_cpu().items())
        return wall, total / spent, main / total
    return wall, total / main, main / total


def bench_open(folder, n):
    """Write a rec index of n tiny records, then open it in a fresh process: (seconds, MB added)."""
    prefix = os.path.join(folder, 'big', 'train')
    per_identity = 68   # MS1MV2: 5.8M images / 85.7K identities
    with IdentityRecordWriter(prefix) as writer:
        for k in range((n + per_identity - 1) // per_identity):
            writer.add_identity(k, [(b'', 1, ())] * min(per_identity, n - k * per_identity))
    code = (
        'import time, resource\n'
        'from recognition.data.dataset import FaceRecordDataset\n'
        'def rss():\n'
        '    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) / 1024\n'
        'before = rss(); t = time.perf_counter()\n'
        f'ds = FaceRecordDataset({prefix + ".rec"!r})\n'
        'seconds = time.perf_counter() - t\n'
        'peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n'
        'print(len(ds), len(ds.id2range), seconds, rss() - before, peak - before)\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]), int(out[1]), float(out[2]), float(out[3]), float(out[4])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--images', type=int, default=3000)
    parser.add_argument('--rounds', type=int, default=3, help='interleaved repetitions (medians reported)')
    parser.add_argument('--index-images', type=int, default=1000000)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        items = make_images(folder, args.images)
        packer = bench_packer(folder, items, args.rounds)
        rec = os.path.join(folder, 'aligned.rec')
        decode = [bench_decode(rec) for _ in range(args.rounds)]
        loader = {w: [] for w in (0, 1, 2)}
        for r in range(args.rounds):
            for w in ((0, 1, 2) if r % 2 == 0 else (2, 1, 0)):
                loader[w].append(bench_loader(rec, w))
        n, k, seconds, added, peak = bench_open(folder, args.index_images)
    load_after = os.getloadavg()
    decode_wall, decode_cpu = median([d[0] for d in decode]), median([d[1] for d in decode])
    print(f'load average (1, 5, 15 min) before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, '
          f'after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; medians of {args.rounds} '
          f'interleaved rounds\n')
    print('| packer | images/s (wall) | wall ratio | main CPU us/image | worker CPU us/image '
          '| 2-core ratio from CPU |')
    print('|---|---|---|---|---|---|')
    control = packer.pop('control')
    for name, runs in packer.items():
        (w1, m1, _), (w2, m2, k2) = runs[1], runs[2]
        # an otherwise idle 2-core machine: main and 2 workers share 2 cores, main cannot go faster than itself
        ideal = m1 / max(m2, (m2 + k2) / 2)
        print(f'| {name} rows, 1 process | {w1:.0f} | 1.00 | {m1 * 1e6:.0f} | - | 1.00 |')
        print(f'| {name} rows, 2 processes | {w2:.0f} | {w2 / w1:.2f} | {m2 * 1e6:.0f} | {k2 * 1e6:.0f} '
              f'| {ideal:.2f} |')
    print(f'| control: pure-Python loop, 2 processes vs 1 (the parallelism the machine gives now) '
          f'| | {control[2] / control[1]:.2f} | | | 2.00 |')
    print('\n| loader (mirror, batch 128, float32 NCHW) | images/s (wall) | images per CPU-second of the '
          'decoding processes | main CPU us/image |')
    print('|---|---|---|---|')
    print(f'| raw cv2.imdecode, 1 process (the limit) | {decode_wall:.0f} | {decode_cpu:.0f} | - |')
    for w, runs in loader.items():
        wall, per_cpu, main_cpu = (median(col) for col in zip(*runs))
        who = 'main process' if w == 0 else f'{w} worker' + ('s' if w > 1 else '')
        print(f'| loader, {who} | {wall:.0f} | {per_cpu:.0f} ({per_cpu / decode_cpu:.2f} of decode) '
              f'| {main_cpu * 1e6:.0f} |')
    print(f'\nopen a rec of {n} images / {k} identities: {seconds:.2f} s, '
          f'+{added:.0f} MB resident after, +{peak:.0f} MB peak')


if __name__ == '__main__':
    main()
