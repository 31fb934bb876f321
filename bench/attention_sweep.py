"""A decoding step's one-query attention on a GPU, by method.

Chains of one-query attentions over distinct key/value caches (more bytes
than the L2 holds), each output feeding the next query, timed in an
on-device loop: XLA's fusion of `training.model._attend` (over the whole
cache) against `training.decode_attention.one_query_attention` (a Pallas
kernel over the filled part only) at a few tilings.  Prints microseconds per
attention.

    python bench/attention_sweep.py            # on the GPU machine
    python bench/attention_sweep.py --interpret --iters=1 --layers=2 --sweep=false   # a CPU check
"""
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from bench import timing  # pylint: disable=g-import-not-at-top
from training import decode_attention
from training import model as model_lib

FLAGS = flags.FLAGS
flags.DEFINE_integer('iters', 50, 'loop iterations per timing.')
flags.DEFINE_integer('layers', 48, 'distinct caches per chain.')
flags.DEFINE_integer('heads', 16, 'heads (batch 1).')
flags.DEFINE_integer('d_head', 64, 'head width.')
flags.DEFINE_list('cases', ['256:30', '256:250', '2048:30', '2048:1500'],
                  'max_len:pos pairs timed.')
flags.DEFINE_bool('sweep', True, 'sweep tilings (else the default only).')
flags.DEFINE_list('block_len', ['32', '64', '128'], 'block_len values swept.')
flags.DEFINE_list('splits', ['1', '2', '4', '8'], 'n_splits values swept.')
flags.DEFINE_list('warps', ['2', '4', '8'], 'num_warps values swept.')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                  'dtype of the query and the caches.')
flags.DEFINE_bool('interpret', False, 'run the Pallas kernel interpreted (a CPU check).')


def _time(attend, caches, q, pos, iters):
  def step(q, caches):
    for k, v in caches:
      q = attend(q, k, v, pos) * 0.5
    return q
  sec, out = timing.loop_time(step, q, caches, iters)
  return sec / len(caches), out


def main(argv):
  del argv
  print(jax.devices()[0].device_kind, jax.__version__)
  rng = np.random.default_rng(0)
  h, dh = FLAGS.heads, FLAGS.d_head
  dtype = jnp.dtype(FLAGS.dtype)
  for case in FLAGS.cases:
    max_len, pos = map(int, case.split(':'))
    shape = (1, h, max_len, dh)
    caches = [(jnp.asarray(rng.standard_normal(shape, np.float32), dtype),
               jnp.asarray(rng.standard_normal(shape, np.float32), dtype))
              for _ in range(FLAGS.layers)]
    q = jnp.asarray(rng.standard_normal((1, h, 1, dh), np.float32), dtype)
    pos = jnp.int32(pos)
    methods = [('xla (whole cache)', model_lib._attend)]  # pylint: disable=protected-access
    tilings = [(None, None, None)]
    if FLAGS.sweep:
      tilings += list(itertools.product(
          *[map(int, v) for v in (FLAGS.block_len, FLAGS.splits, FLAGS.warps)]))
    for bl, sp, w in tilings:
      if bl and max_len % (bl * sp):
        continue
      label = 'pallas default' if bl is None else f'pallas len={bl} s={sp} w={w}'
      methods.append((label, lambda q, k, v, p, c=(bl, sp, w):
                      decode_attention.one_query_attention(
                          q, k, v, p, block_len=c[0], n_splits=c[1],
                          num_warps=c[2], interpret=FLAGS.interpret)))
    rows, reference = [], None
    for label, fn in methods:
      try:
        sec, out = _time(fn, caches, q, pos, FLAGS.iters)
      except Exception as e:  # pylint: disable=broad-except
        print(f'{case} {label}: failed: {type(e).__name__}: {str(e)[:300]}')
        continue
      reference = out if reference is None else reference
      err = float(np.max(np.abs(np.float32(out) - np.float32(reference))))
      rows.append((label, sec * 1e6, err))
      print(f'{case:10s} {label:28s} {sec * 1e6:8.2f} us  max|diff| {err:.1e}',
            flush=True)
    print(f'best for {case} ({decode_attention.default_tiling(max_len)} '
          'is the default):')
    for label, us, err in sorted(rows, key=lambda r: r[1])[:5]:
      print(f'  {label:28s} {us:8.2f} us  max|diff| {err:.1e}')


if __name__ == '__main__':
  app.run(main)
