"""SparseFF's fused decoding step alone on a GPU: its two kernels by layout.

A chain of the 800M decoder's 24 SparseFF layers (d_model 1024, d_ff 6144,
N 64, controller width 96; random weights, more bytes than the L2 holds),
each row feeding the next, run as `terraformer.sparse_ff`'s controller
kernel then its per-block kernel, timed in an on-device loop, for each
layout of m2 (`--widths`: the controller's width padded to 128 as one piece,
or as pieces 64 + 32) and warps (`--warps`).  Prints microseconds per layer.

    python bench/sparse_ff_kernel.py            # on the GPU machine
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
from terraformer import sparse_ff

FLAGS = flags.FLAGS
flags.DEFINE_integer('iters', 50, 'loop iterations per timing.')
flags.DEFINE_integer('layers', 24, 'SparseFF layers in the chain.')
flags.DEFINE_list('widths', ['128', '64+32'], 'm2 layouts: piece widths.')
flags.DEFINE_list('warps', ['4', '8'], 'num_warps of the per-block kernel.')
flags.DEFINE_bool('interpret', False, 'run the kernels interpreted (a CPU check).')

D_MODEL, D_FF, N, LOWRANK = 1024, 6144, 64, 96


def layer_weights(rng, pieces):
  """One layer's fused-form weights with m2 in `pieces` (zero padding past 96)."""
  d1, width = D_FF // N, sum(pieces)
  f = lambda *shape: jnp.asarray(rng.normal(0, 0.03, shape), jnp.float32)
  m1_t = jnp.pad(f(LOWRANK, D_MODEL), ((0, width - LOWRANK), (0, 0)))
  m2 = jnp.pad(f(d1, N, LOWRANK), ((0, 0), (0, 0), (0, width - LOWRANK)))
  starts = [sum(pieces[:i]) for i in range(len(pieces))]
  parts = tuple(m2[..., a:a + w] for a, w in zip(starts, pieces))
  norm = (1.0 + f(D_MODEL), f(D_MODEL))
  return (norm, m1_t, parts, f(d1, N), f(d1, N, D_MODEL), f(d1, N, D_MODEL),
          f(D_MODEL))


def main(argv):
  del argv
  rng = np.random.RandomState(0)
  print(f'{jax.devices()[0].device_kind}; {FLAGS.layers} layers, '
        f'{FLAGS.iters} iterations a timing')
  print('| m2 pieces | warps | us per layer |')
  print('|---|---|---|')
  for widths in FLAGS.widths:
    pieces = tuple(int(w) for w in widths.split('+'))
    weights = [layer_weights(rng, pieces) for _ in range(FLAGS.layers)]
    for warps in map(int, FLAGS.warps):

      def step(x, ws, warps=warps):
        for (scale, shift), m1_t, parts, mb, w1, w2, b2 in ws:
          norm = (scale, shift, 1e-6)
          z, start = sparse_ff._controller(x, norm, m1_t, b2, FLAGS.interpret)
          x = sparse_ff._chosen_units(x, norm, z, parts, mb, w1, w2, start,
                                      FLAGS.interpret,
                                      num_warps=warps) * 0.5
        return x

      x = jnp.asarray(rng.normal(size=(D_MODEL,)), jnp.float32)
      seconds, _ = timing.loop_time(step, x, weights, FLAGS.iters)
      print(f'| {widths} | {warps} | '
            f'{seconds / FLAGS.layers * 1e6:.2f} |', flush=True)


if __name__ == '__main__':
  app.run(main)
