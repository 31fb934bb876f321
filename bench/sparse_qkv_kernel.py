"""The sparse-QKV attention's fused decoding step alone on a GPU, by warps.

A chain of the 800M decoder's 24 sparse-QKV attention layers (d_model 1024,
16 heads and modules of 64, length kernel 3, Q, K and V; random weights,
caches filled to `--start` positions), each row feeding the next, run as
`terraformer.sparse_qkv`'s three kernels (`_factored_parts`, then
`_conv_attend`'s convolution and attention) in an on-device loop, for each
setting of their warps (`--warps`: factored/conv/attend, e.g. 4/4/4).
Each iteration decodes one more position.  Prints microseconds per layer.

    python bench/sparse_qkv_kernel.py            # on the GPU machine
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from bench import timing  # pylint: disable=g-import-not-at-top
from terraformer import sparse_qkv

FLAGS = flags.FLAGS
flags.DEFINE_integer('iters', 50, 'decoded positions per timing.')
flags.DEFINE_integer('repeats', 3, 'timings per setting (the fastest kept).')
flags.DEFINE_integer('layers', 24, 'layers in the chain.')
flags.DEFINE_integer('start', 16, 'positions already in the caches.')
flags.DEFINE_integer('max_len', 256, 'cache length.')
flags.DEFINE_list('warps', ['4/4/4', '8/4/4', '4/8/4', '4/4/8', '8/8/8'],
                  'factored/conv/attend warps settings.')
flags.DEFINE_bool('interpret', False, 'run the kernels interpreted (a CPU check).')

D_MODEL, HEADS, N_PAST, WIDTH, N_QKV = 1024, 16, 2, 3, 3


def layer(rng):
  """(weights, state) of one layer: weights (scale, shift, gating,
  projection, m bias, conv kernel, conv bias); state (ring, count, k
  cache, v cache, pos) with `--start` positions seen."""
  d = D_MODEL // HEADS
  f = lambda *shape: jnp.asarray(rng.normal(0, 0.1, shape), jnp.float32)
  weights = (1.0 + f(D_MODEL), f(D_MODEL), f(HEADS, D_MODEL), f(D_MODEL, d),
             f(D_MODEL), f(N_PAST + 1, WIDTH, d, N_QKV * d), f(N_QKV * d))
  start = jnp.int32(FLAGS.start)
  state = (f(1, N_PAST, D_MODEL), start, f(HEADS, FLAGS.max_len, d),
           f(HEADS, FLAGS.max_len, d), start)
  return weights, state


def step(x, weights, states):
  new = []
  for (scale, shift, gating, projection, m_bias, kernel, bias), (
      ring, count, k, v, pos) in zip(weights, states):
    parts = sparse_qkv._factored_parts(x, (scale, shift, 1e-6), gating,
                                       projection, FLAGS.interpret)
    out, ring, k, v, count, pos = sparse_qkv._conv_attend(
        x, parts, m_bias, ring, count, kernel, bias, k, v, pos,
        FLAGS.interpret)
    x = out.reshape(D_MODEL) * 0.5
    new.append((ring, count, k, v, pos))
  return x, new


def main(argv):
  del argv
  rng = np.random.RandomState(0)
  weights, states = zip(*[layer(rng) for _ in range(FLAGS.layers)])
  x = jnp.asarray(rng.normal(size=(D_MODEL,)), jnp.float32)
  print(f'{jax.devices()[0].device_kind}; {FLAGS.layers} layers, '
        f'{FLAGS.iters} positions a timing from {FLAGS.start}')
  print('| warps (factored/conv/attend) | us per layer |')
  print('|---|---|')
  for setting in FLAGS.warps:
    names = ('factored', 'conv', 'attend')
    sparse_qkv.KERNEL_WARPS = dict(zip(names, map(int, setting.split('/'))))

    @jax.jit
    def loop(x, weights, states):
      return jax.lax.fori_loop(
          0, FLAGS.iters, lambda i, c: step(c[0], weights, c[1]), (x, states))

    best, _ = timing.best_time(loop, x, weights, list(states),
                               repeats=FLAGS.repeats)
    print(f'| {setting} | {best / FLAGS.iters / FLAGS.layers * 1e6:.2f} |',
          flush=True)


if __name__ == '__main__':
  app.run(main)
