"""Data-layer speed, side by side in one run (run by hand; prints a markdown table).

    OMP_NUM_THREADS=1 python bench/bench_data.py [--images 3000] [--index-images 1000000]

- packer images/s with 1 and 2 processes, for aligned rows (bytes copied after a decode check)
  and unaligned rows (decode, 5-point alignment, JPEG encode);
- raw JPEG decode rate (cv2.imdecode over the same records, one core): the limit per worker;
- training loader (decode + mirror + batch of 128) with 0, 1 and 2 worker processes;
- opening a rec of `--index-images` images (MS1M's images/identity ratio) in a fresh process:
  seconds and resident memory added.
Everything is made in a temporary folder from skimage's astronaut photo.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np
from skimage import data as skdata

from recognition.align import template
from recognition.data.lst import LstItem, write_lst
from recognition.data.packer import pack
from recognition.data.record import IdentityRecordWriter, RecordFile, unpack_header


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


def bench_packer(folder, items):
    aligned = [LstItem(1, p, k) for p, k in items]
    # unaligned rows: the face at a random place of a bigger frame, with its 5 points
    unaligned = [LstItem(0, p, k, None, template() + 4.0) for p, k in items]
    write_lst(os.path.join(folder, 'aligned.lst'), aligned)
    write_lst(os.path.join(folder, 'unaligned.lst'), unaligned)
    rows = []
    for name in ('aligned', 'unaligned'):
        rates = []
        for procs in (1, 2):
            summary = pack(os.path.join(folder, name), num_threads=procs)
            rates.append(summary['images'] / summary['seconds'])
        rows.append((f'packer, {name} rows', rates))
    return rows


def bench_decode(rec_path):
    record = RecordFile(rec_path)
    bodies = [unpack_header(record.read(k))[2] for k in range(1, len(record)) if k < 1 + 2000]
    bodies = [b for b in bodies if b]
    start = time.perf_counter()
    for b in bodies:
        cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
    return len(bodies) / (time.perf_counter() - start)


def bench_loader(rec_path, workers, batch_size=128, batches=20):
    from recognition.data.dataset import FaceRecordDataset, train_loader
    from recognition.data.transforms import train_transform
    dataset = FaceRecordDataset(rec_path, transform=train_transform(mirror=True))
    loader = train_loader(dataset, batch_size, num_workers=workers, seed=0)
    done, start, count = 0, None, 0
    while done < batches + 2:
        for data, _ in loader:
            data.wait_to_read()
            done += 1
            if done == 2:   # skip pool start-up and the first prefetch
                start, count = time.perf_counter(), 0
            elif done > 2:
                count += data.shape[0]
            if done >= batches + 2:
                break
    return count / (time.perf_counter() - start)


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
    parser.add_argument('--index-images', type=int, default=1000000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        items = make_images(folder, args.images)
        rows = bench_packer(folder, items)
        rec = os.path.join(folder, 'aligned.rec')
        decode = bench_decode(rec)
        loader = {w: bench_loader(rec, w) for w in (0, 1, 2)}
        n, k, seconds, added, peak = bench_open(folder, args.index_images)
    print(f'| measure | images/s | ratio |')
    print(f'|---|---|---|')
    for name, (one, two) in rows:
        print(f'| {name}, 1 process | {one:.0f} | 1.00 |')
        print(f'| {name}, 2 processes | {two:.0f} | {two / one:.2f} |')
    print(f'| raw cv2.imdecode, 1 core (limit) | {decode:.0f} | 1.00 |')
    for w, rate in loader.items():
        print(f'| loader, mirror, batch 128, {w} workers | {rate:.0f} | {rate / decode:.2f} of decode |')
    print(f'\nopen a rec of {n} images / {k} identities: {seconds:.2f} s, '
          f'+{added:.0f} MB resident after, +{peak:.0f} MB peak')


if __name__ == '__main__':
    main()
