"""Partial FC against the full fc7: step time, peak memory, and kvstore traffic per worker under dist_sync.

    OMP_NUM_THREADS=1 python bench/bench_partial_fc.py [--classes 10000,100000,1000000,2000000]
        [--steps 3] [--backbone-steps 2] [--dist-classes 10000,100000] [--ratio 0.1] [--json out.json]

Every case runs in its own process (its peak RSS is that process's `ru_maxrss`), one after another in one run,
so the full and the sampled fc7 are compared side by side on the same (shared) machine. Embedding 512, batch
128 (split over the contexts), arcface (s 64, m 0.5), SGD momentum 0.9, wd 5e-4.

- **head**: the head alone on random embeddings (with their gradient, as the backbone would need): the full
  fc7 the way the trainer runs it today (hybridised head + SoftmaxCrossEntropyLoss, Trainer; with 2 contexts
  fc7 copied to both and its gradient reduced by the `device` kvstore) against `PartialFC` at `--ratio`.
- **backbone**: the same with the `demo` network on random 112x112 images in front (the trainer's step).
- **dist**: 2 workers + 1 server on loopback inside a private network namespace (`unshare -n`, so other jobs'
  loopback traffic is not counted): the bytes of the namespace's `lo` over the timed steps divided by
  workers x steps, i.e. what one worker sends plus receives per step for the head alone (the full fc7's
  gradient pushpull as the dist_sync trainer does it, against PartialFC's label exchange, row_sparse_pull
  of the sampled rows and row-sparse push).

A case whose estimated memory exceeds what the machine has available (MemAvailable minus 2 GB) is skipped
and reported as such, rather than pushing other processes out.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
EMB, BATCH = 512, 128


def mem_available():
    with open('/proc/meminfo') as f:
        for line in f:
            if line.startswith('MemAvailable:'):
                return int(line.split()[1]) * 1024
    return 0


def estimate(case):
    """Rough peak bytes of a case, fitted to the 10k and 100k measurements: the process (0.5 GB; 1.8 GB with
    the backbone), fc7 weight / gradient / momentum copies and the logits' temporaries (batch x classes)."""
    c, n, r = case['classes'], case['contexts'], case['ratio']
    w = c * EMB * 4
    logits = 6 * BATCH * c * 4
    base = 1.8e9 if case['kind'] == 'backbone' else 0.5e9
    if case['kind'] == 'dist':   # two workers and a server
        return (3 * 4 * w + 3 * logits if r >= 1 else 4 * w + r * (2 * w + logits)) + 2e9
    if r >= 1:
        return base + n * 4 * w + 2 * logits
    return base + (2 * w + (w if n > 1 else 0)) + r * (2 * w + logits)


def lo_bytes():
    with open('/proc/net/dev') as f:
        for line in f:
            if line.strip().startswith('lo:'):
                return int(line.split(':', 1)[1].split()[8])   # transmitted bytes
    return 0


def build(case, kv=None, rank=0, workers=1):
    """(step function, fc7 bytes per context) of a case."""
    import mxnet as mx
    from recognition.losses import build_head
    from recognition.partial_fc import PartialFC
    from recognition.training.schedules import ServerSchedule, StepSchedule
    contexts = [mx.cpu(i) for i in range(case['contexts'])]
    classes, ratio = case['classes'], case['ratio']
    partial = ratio < 1
    mx.random.seed(0)
    head = build_head('arcface', classes, EMB)
    head.initialize(ctx=[mx.cpu()] if partial else contexts)
    net = None
    params = {}
    if case['kind'] == 'backbone':
        from recognition.models import get_model, init_params
        net = init_params(get_model('demo', emb_size=EMB), ctx=contexts)
        net.hybridize(static_alloc=True, static_shape=True)
        params.update(net.collect_params())
    per = BATCH // len(contexts)
    rng = np.random.default_rng(0)
    shape = (per, 3, 112, 112) if net is not None else (per, EMB)
    xs = [mx.nd.array(rng.uniform(0, 255 if net is not None else 1, shape), ctx=c) for c in contexts]
    if net is None:
        for x in xs:
            x.attach_grad()
    sgd = {'learning_rate': 0.1, 'wd': 5e-4, 'momentum': 0.9}
    pfc = None
    if partial:
        global_batch = BATCH * workers
        pfc = PartialFC(head, contexts, ratio, 0, global_batch, sgd['wd'], sgd['momentum'],
                        log=lambda m: None, kvstore=kv, rank=rank, num_workers=workers,
                        lr_scheduler=ServerSchedule(StepSchedule(0.1)) if kv is not None else None)
        fc7_bytes = max(hi - lo for lo, hi in pfc.bounds) * EMB * 4 * 2   # weight + momentum per context
    else:
        head.hybridize(static_alloc=True, static_shape=True)
        params.update(head.collect_params())
        fc7_bytes = classes * EMB * 4 * 3   # weight, gradient, momentum on every context
    trainer = None
    if params and kv is None:
        trainer = mx.gluon.Trainer(params, 'sgd', sgd, kvstore='device')
    if kv is not None and not partial:
        kv.init(0, mx.nd.zeros((classes, EMB)))
        momentum = mx.nd.zeros((classes, EMB))
    ce = mx.gluon.loss.SoftmaxCrossEntropyLoss()
    count = [0]

    def step():
        ys = [mx.nd.array(rng.integers(0, classes, per), ctx=c) for c in contexts]
        with mx.autograd.record():
            embs = [net(x) for x in xs] if net is not None else xs
            if pfc is not None:
                losses, _ = pfc.forward(embs, ys, count[0])
            else:
                losses = [ce(head(e, y), y) for e, y in zip(embs, ys)]
        mx.autograd.backward(losses)
        if trainer is not None:
            trainer.step(BATCH)
        if pfc is not None:
            pfc.update(0.1)
        if kv is not None and pfc is None:   # the dist_sync trainer: fc7's dense gradient, update on the worker
            grad = head.fc7_weight.grad()
            kv.pushpull(0, grad, out=grad)
            weight = head.fc7_weight.data()
            mx.nd.sgd_mom_update(weight, grad, momentum, out=weight, lr=0.1, wd=5e-4, momentum=0.9,
                                 rescale_grad=1.0 / (BATCH * workers))
        mx.nd.waitall()
        count[0] += 1
    return step, fc7_bytes


def run_case(case):
    step, fc7_bytes = build(case)
    step()   # warm-up: allocation, MKLDNN kernel choice
    times = []
    for _ in range(case['steps']):
        tic = time.perf_counter()
        step()
        times.append(time.perf_counter() - tic)
    return {'step_s': statistics.median(times), 'step_min_s': min(times), 'step_max_s': max(times),
            'fc7_bytes_per_context': fc7_bytes}


def dist_worker(case, out):
    import mxnet as mx
    kv = mx.kv.create('dist_sync')
    step, _ = build(case, kv=kv, rank=kv.rank, workers=kv.num_workers)
    step()
    kv._barrier()
    start = lo_bytes()
    tic = time.perf_counter()
    for _ in range(case['steps']):
        step()
    kv._barrier()
    moved = lo_bytes() - start
    if kv.rank == 0:
        with open(out, 'w') as f:
            json.dump({'bytes_per_worker_step': moved / (kv.num_workers * case['steps']),
                       'step_s': (time.perf_counter() - tic) / case['steps']}, f)
    from mxnet.base import _LIB, KVStoreHandle, check_call
    check_call(_LIB.MXKVStoreFree(kv.handle))   # pass ps-lite's exit barrier now (see training/loop.py)
    kv.handle = KVStoreHandle()


def dist_job(case, out):
    """Inside the private network namespace: the launcher with 2 workers and 1 server."""
    subprocess.run(['ip', 'link', 'set', 'lo', 'up'], check=True)
    from recognition.distributed import free_port, launch
    launch([sys.executable, os.path.abspath(__file__), '--dist-worker', json.dumps(case), '--out', out], 2, 1,
           port=free_port(), timeout=3600)


def spawn(case):
    """Run one case in a fresh process; its result with the process's peak RSS."""
    need = estimate(case)
    free = mem_available() - 2e9
    if need > free:
        return dict(case, skipped=f'needs ~{need / 1e9:.1f} GB, {max(free, 0) / 1e9:.1f} GB available')
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'result.json')
        if case['kind'] == 'dist':
            argv = ['unshare', '-n', sys.executable, os.path.abspath(__file__), '--dist-job', json.dumps(case),
                    '--out', out]
        else:
            argv = [sys.executable, os.path.abspath(__file__), '--case', json.dumps(case), '--out', out]
        tic = time.time()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read()
        if proc.returncode != 0 or not os.path.exists(out):
            return dict(case, failed=err.strip().splitlines()[-1:] or [f'exit {proc.returncode}'])
        with open(out) as f:
            result = json.load(f)
    # ru_maxrss of the launcher's children is their largest, not their sum: dist cases report traffic only.
    return dict(case, **result, peak_rss_gb=usage.ru_maxrss * 1024 / 1e9, wall_s=time.time() - tic)


def table(results, ratio):
    rows = ['| case | classes | contexts | fc7 | step s (min-max) | step ratio full/sampled (range) | peak RSS GB '
            '| fc7 bytes/context GB |', '|---|---|---|---|---|---|---|---|']
    for r in results:
        if r['kind'] == 'dist':
            continue
        what = 'full' if r['ratio'] >= 1 else f'R={r["ratio"]:g}'
        if 'skipped' in r or 'failed' in r:
            rows.append(f'| {r["kind"]} | {r["classes"]:,} | {r["contexts"]} | {what} | '
                        f'{r.get("skipped") or r.get("failed")} | | | |')
            continue
        full = next((f for f in results if f['kind'] == r['kind'] and f['classes'] == r['classes']
                     and f['contexts'] == r['contexts'] and f['ratio'] >= 1 and 'step_s' in f), None)
        speed = (f'{full["step_s"] / r["step_s"]:.1f}x ({full["step_min_s"] / r["step_max_s"]:.1f}-'
                 f'{full["step_max_s"] / r["step_min_s"]:.1f})' if full and r['ratio'] < 1 else '')
        spread = f'{r["step_s"]:.3f} ({r["step_min_s"]:.3f}-{r["step_max_s"]:.3f})'
        rows.append(f'| {r["kind"]} | {r["classes"]:,} | {r["contexts"]} | {what} | {spread} | {speed} | '
                    f'{r["peak_rss_gb"]:.2f} | {r["fc7_bytes_per_context"] / 1e9:.3f} |')
    rows += ['', '| dist_sync head, 2 workers | classes | fc7 | MB per worker per step | ratio full/sampled | step s |',
             '|---|---|---|---|---|---|']
    for r in results:
        if r['kind'] != 'dist':
            continue
        what = 'full' if r['ratio'] >= 1 else f'R={r["ratio"]:g}'
        if 'skipped' in r or 'failed' in r:
            rows.append(f'| | {r["classes"]:,} | {what} | {r.get("skipped") or r.get("failed")} | | |')
            continue
        full = next((f for f in results if f['kind'] == 'dist' and f['classes'] == r['classes']
                     and f['ratio'] >= 1 and 'bytes_per_worker_step' in f), None)
        ratio_s = (f'{full["bytes_per_worker_step"] / r["bytes_per_worker_step"]:.1f}x'
                   if full and r['ratio'] < 1 else '')
        rows.append(f'| | {r["classes"]:,} | {what} | {r["bytes_per_worker_step"] / 1e6:.1f} | {ratio_s} | '
                    f'{r["step_s"]:.3f} |')
    return '\n'.join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--classes', default='10000,100000,1000000,2000000')
    p.add_argument('--backbone-classes', default='10000,100000,1000000,2000000')
    p.add_argument('--dist-classes', default='10000,100000,1000000')
    p.add_argument('--ratio', type=float, default=0.1)
    p.add_argument('--steps', type=int, default=3, help='timed steps per case (after one warm-up)')
    p.add_argument('--backbone-steps', type=int, default=2)
    p.add_argument('--json', default='', help='also write the results here')
    p.add_argument('--case', help=argparse.SUPPRESS)
    p.add_argument('--dist-job', help=argparse.SUPPRESS)
    p.add_argument('--dist-worker', help=argparse.SUPPRESS)
    p.add_argument('--out', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        with open(args.out, 'w') as f:
            json.dump(run_case(json.loads(args.case)), f)
        return
    if args.dist_job:
        return dist_job(json.loads(args.dist_job), args.out)
    if args.dist_worker:
        return dist_worker(json.loads(args.dist_worker), args.out)

    def sizes(text):
        return [int(c) for c in text.split(',') if c.strip()]
    cases = []
    for kind, classes, steps in (('head', sizes(args.classes), args.steps),
                                 ('backbone', sizes(args.backbone_classes), args.backbone_steps)):
        for c in classes:
            for n in (1, 2):
                for r in (1.0, args.ratio):
                    cases.append({'kind': kind, 'classes': c, 'contexts': n, 'ratio': r, 'steps': steps})
    for c in sizes(args.dist_classes):
        for r in (1.0, args.ratio):
            cases.append({'kind': 'dist', 'classes': c, 'contexts': 1, 'ratio': r, 'steps': args.steps})
    cases.sort(key=lambda c: c['classes'])   # small cases first: a failure at 2M still leaves the rest
    results = []
    for case in cases:
        r = spawn(case)
        results.append(r)
        print(json.dumps(r), flush=True)
    print(f'\nmachine: {os.uname().nodename}, {os.cpu_count()} cores, load average {os.getloadavg()}; '
          f'OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS")}; command: {" ".join(sys.argv)}\n')
    print(table(results, args.ratio))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
