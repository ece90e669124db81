"""Training speed on CPU: samples/s for r18, r50, y1 (or any --network preset: r50sa, r101sa) at 112x112
(issue 3's benchmark; issue 16 added the ResNeSt nets and the parameter count).

    OMP_NUM_THREADS=2 python bench/bench_train.py [--nets r18,r50,y1,r50sa] [--batch 8] [--iters 2]

For each network, one ArcFace training step (forward, backward, SGD update) timed in four set-ups, side by
side in one run: Gluon hybridised on 1 context, Gluon on 2 CPU contexts (same global batch), Gluon not
hybridised, and the same network exported (`training_symbol`, insightface's graph with native PReLU) run by
`mx.mod.Module`. Achieved GFLOP/s = 3 x forward FLOPs (forward + backward) x samples/s, against this
machine's SGEMM GFLOP/s (`mx.nd.dot` on 2048x2048 float32), the practical ceiling.
"""
import argparse
import time

import mxnet as mx
import numpy as np

from recognition.checkpoint import embedding_symbol, training_symbol
from recognition.losses import build_head
from recognition.models import forward_flops, get_model, init_params, parameter_count

CLASSES = 1000


def sgemm_gflops(n=2048, repeat=5):
    a = mx.nd.random.uniform(shape=(n, n))
    b = mx.nd.random.uniform(shape=(n, n))
    mx.nd.dot(a, b).wait_to_read()
    tic = time.time()
    for _ in range(repeat):
        mx.nd.dot(a, b).wait_to_read()
    return 2.0 * n ** 3 * repeat / (time.time() - tic) / 1e9


def seconds_per_call(step, iters):
    """Mean wall time of `step` over `iters` calls, after one warm-up call."""
    step()
    tic = time.time()
    for _ in range(iters):
        step()
    return (time.time() - tic) / iters


def build(name, ctxs, hybridize=True):
    mx.random.seed(0)
    net = init_params(get_model(name), ctx=ctxs)
    emb = net(mx.nd.zeros((1, 3, 112, 112), ctx=ctxs[0])).shape[1]
    head = build_head('arcface', CLASSES, emb)
    head.initialize(ctx=ctxs)
    if hybridize:
        net.hybridize(static_alloc=True, static_shape=True)
        head.hybridize(static_alloc=True, static_shape=True)
    params = {**net.collect_params(), **head.collect_params()}
    trainer = mx.gluon.Trainer({k: p for k, p in params.items() if p.grad_req != 'null'}, 'sgd',
                               {'learning_rate': 0.01, 'momentum': 0.9, 'wd': 5e-4}, kvstore='device')
    return net, head, trainer


def gluon_step_time(name, batch, iters, n_ctx=1, hybridize=True):
    ctxs = [mx.cpu(i) for i in range(n_ctx)]
    net, head, trainer = build(name, ctxs, hybridize)
    loss_fn = mx.gluon.loss.SoftmaxCrossEntropyLoss()
    data = mx.nd.random.uniform(0, 255, (batch, 3, 112, 112))
    label = mx.nd.array(np.arange(batch) % CLASSES)

    def step():
        xs = mx.gluon.utils.split_and_load(data, ctxs)
        ys = mx.gluon.utils.split_and_load(label, ctxs)
        with mx.autograd.record():
            losses = [loss_fn(head(net(x), y), y) for x, y in zip(xs, ys)]
        mx.autograd.backward(losses)
        trainer.step(batch)
        mx.nd.waitall()

    return seconds_per_call(step, iters)


def module_step_time(name, batch, iters):
    net, head, _ = build(name, [mx.cpu()], hybridize=False)
    sym = training_symbol(net, head)
    mod = mx.mod.Module(sym, data_names=['data'], label_names=['softmax_label'], context=mx.cpu())
    mod.bind(data_shapes=[('data', (batch, 3, 112, 112))], label_shapes=[('softmax_label', (batch,))])
    arrays = {k: p.data() for k, p in {**net.collect_params(), **head.collect_params()}.items()}
    aux_names = set(sym.list_auxiliary_states())
    mod.init_params(arg_params={k: v for k, v in arrays.items() if k not in aux_names},
                    aux_params={k: v for k, v in arrays.items() if k in aux_names}, allow_missing=False)
    mod.init_optimizer(optimizer='sgd', optimizer_params={'learning_rate': 0.01, 'momentum': 0.9, 'wd': 5e-4})
    batch_data = mx.io.DataBatch([mx.nd.random.uniform(0, 255, (batch, 3, 112, 112))],
                                 [mx.nd.array(np.arange(batch) % CLASSES)])

    def step():
        mod.forward_backward(batch_data)
        mod.update()
        mx.nd.waitall()

    return seconds_per_call(step, iters)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--nets', default='r18,r50,y1')
    p.add_argument('--batch', type=int, default=8, help='global batch per step')
    p.add_argument('--iters', type=int, default=2, help='timed steps per set-up (after one warm-up step)')
    args = p.parse_args()
    peak = sgemm_gflops()
    print(f'SGEMM (mx.nd.dot 2048x2048 float32): {peak:.1f} GFLOP/s')
    print('| network | M params | GFLOPs fwd | Gluon 1 ctx | Gluon 2 ctx | not hybridised | Module (exported) | '
          'Gluon/Module | train GFLOP/s | % of SGEMM |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for name in args.nets.split(','):
        net = init_params(get_model(name))
        sym = embedding_symbol(net)
        flops, params = forward_flops(sym), parameter_count(sym)
        t1 = gluon_step_time(name, args.batch, args.iters, 1)
        t2 = gluon_step_time(name, args.batch, args.iters, 2)
        tn = gluon_step_time(name, args.batch, args.iters, 1, hybridize=False)
        tm = module_step_time(name, args.batch, args.iters)
        sps = [args.batch / t for t in (t1, t2, tn, tm)]
        achieved = 3 * flops * sps[0] / 1e9
        print(f'| {name} | {params / 1e6:.2f} | {flops / 1e9:.2f} | {sps[0]:.2f} | {sps[1]:.2f} | {sps[2]:.2f} | {sps[3]:.2f} | '
              f'{sps[0] / sps[3]:.2f} | {achieved:.1f} | {100 * achieved / peak:.0f}% |', flush=True)


if __name__ == '__main__':
    main()
