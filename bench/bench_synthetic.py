"""Images/s of the synthetic face renderer on one core: `OMP_NUM_THREADS=1 python bench/bench_synthetic.py`.

Times the aligned 112x112 training crop (draw + norm_crop + photometrics + JPEG encode) and the
250x250 val/test photo, in one process, as wall-clock and CPU-time rates (CPU time is the fairer
number on a shared machine). The target is at least 200 aligned images/s.
"""
import argparse
import os
import time

import cv2

from recognition.data import demo_sets as S


def rate(kind, jobs):
    wall, cpu = time.perf_counter(), time.process_time()
    for job in jobs:
        S._render_job(job)
    images = sum(len(job[-1]) for job in jobs)
    return images / (time.perf_counter() - wall), images / (time.process_time() - cpu)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--identities', type=int, default=50)
    parser.add_argument('--images', type=int, default=20, help='aligned images per identity (photos: a quarter)')
    args = parser.parse_args()
    cv2.setNumThreads(1)
    idents = S.make_identities(0, 'train', args.identities, S.FAIRFACE_SHARES)
    S._render_job(('aligned', 0, 'train', 0, idents[0], ['any']))   # warm-up (noise bank, imports)
    aligned = [('aligned', 0, 'train', i, p, ['any'] * args.images) for i, p in enumerate(idents)]
    photos = [('photo', 0, 'val', i, p, ['any'] * max(1, args.images // 4)) for i, p in enumerate(idents)]
    print(f'load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores')
    for kind, jobs in (('aligned 112x112 + jpeg', aligned), ('photo 250x250 + aligned crop + 2 jpegs', photos)):
        wall, cpu = rate(kind, jobs)
        print(f'{kind:40s} {wall:7.1f} images/s wall  {cpu:7.1f} images/s cpu')


if __name__ == '__main__':
    main()
