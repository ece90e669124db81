"""Fast PReLU vs MXNet's LeakyReLU(act_type='prelu'), side by side in one run.

1. the operator alone: forward+backward on a 32x64x56x56 tensor (plus ReLU as the floor);
2. whole networks (r18, r50): forward+backward of the hybridized net with each formulation;
3. the demo network: samples/s of a full train step (arcface head, SGD) with each formulation.

Usage: python bench/bench_prelu.py [--batch 8] [--repeat 3] [--networks r18,r50]
"""
import argparse
import time

import mxnet as mx
from mxnet import autograd, gluon

from recognition.losses import build_head
from recognition.models import PReLU, get_model, init_params, native_prelu


def timed(step, repeat):
    """Median seconds of ``step`` over ``repeat`` runs after one warm-up run."""
    step()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def op_step(block, x, head_grad):
    def step():
        with autograd.record():
            y = block(x)
        y.backward(head_grad)
        mx.nd.waitall()
    return step


def bench_operator(repeat):
    shape = (32, 64, 56, 56)
    x = mx.nd.random.normal(shape=shape)
    x.attach_grad()
    head_grad = mx.nd.random.normal(shape=shape)
    relu = gluon.nn.Activation('relu')
    relu.hybridize(static_alloc=True)
    result = {'relu': timed(op_step(relu, x, head_grad), repeat)}
    for native in (True, False):
        block = PReLU('relu0', shape[1])
        block.native = native
        block.initialize()
        block.hybridize(static_alloc=True)
        result['leakyrelu_prelu' if native else 'fast_prelu'] = timed(op_step(block, x, head_grad), repeat)
    return result


def net_step(net, x):
    def step():
        with autograd.record():
            y = net(x)
        y.backward()
        mx.nd.waitall()
    return step


def bench_network(name, batch, repeat):
    net = init_params(get_model(name))
    x = mx.nd.random.uniform(0, 255, shape=(batch, 3, 112, 112))
    net.hybridize(static_alloc=True)
    fast = timed(net_step(net, x), repeat)
    with native_prelu(net):
        native = timed(net_step(net, x), repeat)
    return native, fast


def train_step(net, head, trainer, x, label):
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

    def step():
        with autograd.record():
            loss = loss_fn(head(net(x), label), label)
        loss.backward()
        trainer.step(x.shape[0])
        mx.nd.waitall()
    return step


def bench_demo(batch, repeat):
    net = init_params(get_model('demo'))
    head = build_head('arcface', 500, 128)
    head.initialize()
    net.hybridize(static_alloc=True)
    head.hybridize(static_alloc=True)
    params = net.collect_params()
    params.update(head.collect_params())
    trainer = gluon.Trainer(params, 'sgd', {'learning_rate': 0.1, 'momentum': 0.9, 'wd': 5e-4})
    x = mx.nd.random.uniform(0, 255, shape=(batch, 3, 112, 112))
    label = mx.nd.arange(batch) % 500
    fast = timed(train_step(net, head, trainer, x, label), repeat)
    with native_prelu(net):
        native = timed(train_step(net, head, trainer, x, label), repeat)
    return batch / native, batch / fast


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch', type=int, default=8, help='batch for the whole-network runs')
    parser.add_argument('--demo-batch', type=int, default=32, help='batch for the demo train step')
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--networks', default='r18,r50')
    args = parser.parse_args()

    op = bench_operator(args.repeat)
    print('| operator, fwd+bwd 32x64x56x56 | ms |')
    print('|---|---|')
    for key in ('leakyrelu_prelu', 'fast_prelu', 'relu'):
        print('| %s | %.1f |' % (key, op[key] * 1e3))
    print('speed-up fast vs LeakyReLU prelu: %.1fx' % (op['leakyrelu_prelu'] / op['fast_prelu']))
    print()
    print('| network fwd+bwd, batch %d | LeakyReLU prelu (s) | fast PReLU (s) | speed-up |' % args.batch)
    print('|---|---|---|---|')
    for name in args.networks.split(','):
        native, fast = bench_network(name, args.batch, args.repeat)
        print('| %s | %.2f | %.2f | %.2fx |' % (name, native, fast, native / fast))
    print()
    native, fast = bench_demo(args.demo_batch, args.repeat)
    print('| demo train step (arcface, SGD), batch %d | LeakyReLU prelu | fast PReLU |' % args.demo_batch)
    print('|---|---|---|')
    print('| samples/s | %.1f | %.1f |' % (native, fast))


if __name__ == '__main__':
    main()
