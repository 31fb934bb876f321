"""One-row matrix products (a decoding step's x @ W) on a GPU, by method.

Chains of products over distinct weight matrices of the 800M decoder's
shapes (more bytes than the L2 holds), timed in an on-device loop, for:
XLA's own dot, `training.model.two_row_gemm`, and
`training.gemv.gemv` (a Pallas kernel) at a few tilings; and, with the
matrices stored transposed (d_out, d_in), `training.model.out_in_dot` and
`training.gemv.gemv_out_in` at a few tilings.  Prints a table of
microseconds per matrix and the bandwidth that implies.

    python bench/gemv_sweep.py            # on the GPU machine
    python bench/gemv_sweep.py --dtype=bfloat16 --noin_out --chains=attn,ff
"""
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from bench import timing  # pylint: disable=g-import-not-at-top
from training import gemv as gemv_lib
from training import model as model_lib

FLAGS = flags.FLAGS
flags.DEFINE_integer('iters', 50, 'Loop iterations per timing.')
flags.DEFINE_integer('mbytes', 600, 'Weight megabytes per chain.')
flags.DEFINE_string('chains', 'attn,ff,head', 'Which chains to time.')
flags.DEFINE_bool('sweep', True, 'Sweep Pallas tilings (else defaults only).')
flags.DEFINE_list('bn', ['64', '128', '256'], 'block_n values swept.')
flags.DEFINE_list('bk', ['16', '32'], 'block_k values swept.')
flags.DEFINE_list('warps', ['4'], 'num_warps values swept.')
flags.DEFINE_list('split', ['1', '2', '4', '8'], 'split_k values swept.')
flags.DEFINE_list('out_in_bn', ['4', '8', '16'], 'block_n values swept (out-in kernel).')
flags.DEFINE_list('out_in_bk', ['256', '512', '1024'], 'block_k values swept '
                  '(out-in kernel; at most each matrix\'s d_in).')
flags.DEFINE_list('out_in_warps', ['4', '8'], 'num_warps values swept (out-in kernel).')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                  'dtype of the row and the weights (bytes counted in it).')
flags.DEFINE_bool('in_out', True, 'Also time the (d_in, d_out) methods.')
flags.DEFINE_bool('interpret', False, 'Run the Pallas kernel interpreted (a CPU check).')

CHAINS = {
    'attn': [(1024, 3072), (1024, 1024)],
    'ff': [(1024, 4096), (4096, 1024)],
    'head': [(1024, 32000)],
}


def _chain_fn(matmul, out_in=False):
  """One pass over the chain: each product's row feeds the next matrix
  (stored (d_out, d_in) if out_in)."""
  def step(x, ws):
    for i, w in enumerate(ws):
      y = matmul(x, w)
      k_next = ws[(i + 1) % len(ws)].shape[1 if out_in else 0]
      x = y[..., :k_next] if y.shape[-1] >= k_next else jnp.tile(
          y, (1, k_next // y.shape[-1]))
      x = jax.nn.relu(x) * 0.01
    return x
  return step


def _time(matmul, ws, x, iters, out_in=False):
  sec, _ = timing.loop_time(_chain_fn(matmul, out_in), x, ws, iters)
  return sec / len(ws)


def main(argv):
  del argv
  print(jax.devices()[0].device_kind, jax.__version__)
  rng = np.random.default_rng(0)
  rows = []
  dtype = jnp.dtype(FLAGS.dtype)
  for name in FLAGS.chains.split(','):
    shapes = CHAINS[name]
    pair_bytes = sum(k * n * dtype.itemsize for k, n in shapes)
    reps = max(1, FLAGS.mbytes * 2**20 // pair_bytes)
    ws = [jnp.asarray(rng.standard_normal((k, n), np.float32) / np.sqrt(k),
                      dtype) for _ in range(reps) for k, n in shapes]
    x = jnp.asarray(rng.standard_normal((1, shapes[0][0]), np.float32), dtype)
    per_matrix_bytes = pair_bytes / len(shapes)
    methods = [('xla dot', jnp.dot), ('two-row gemm', model_lib.two_row_gemm)]
    if FLAGS.sweep:
      for bn, bk, warps, split in itertools.product(
          *[map(int, v) for v in (FLAGS.bn, FLAGS.bk, FLAGS.warps, FLAGS.split)]):
        methods.append((f'pallas bn={bn} bk={bk} w={warps} s={split}',
                        lambda x, w, c=(bn, bk, warps, split): gemv_lib.gemv(
                            x, w, block_n=c[0], block_k=c[1], num_warps=c[2],
                            split_k=c[3], interpret=FLAGS.interpret)))
    methods.append(('pallas default', lambda x, w: gemv_lib.gemv(
        x, w, interpret=FLAGS.interpret)))
    methods = [(label, fn, False) for label, fn in methods if FLAGS.in_out]
    methods.append(('out-in xla dot', model_lib.out_in_dot, True))
    if FLAGS.sweep:
      for bn, bk, warps in itertools.product(*[map(int, v) for v in (
          FLAGS.out_in_bn, FLAGS.out_in_bk, FLAGS.out_in_warps)]):
        methods.append((f'out-in pallas bn={bn} bk={bk} w={warps}',
                        lambda x, w, c=(bn, bk, warps): gemv_lib.gemv_out_in(
                            x, w, block_n=c[0], block_k=min(c[1], w.shape[1]),
                            num_warps=c[2],
                            interpret=FLAGS.interpret), True))
    methods.append(('out-in pallas default', lambda x, w: gemv_lib.gemv_out_in(
        x, w, interpret=FLAGS.interpret), True))
    ws_t = None
    # The check: each method's product of x with the chain's first matrix
    # against the float64 product, relative to its largest entry (the
    # chain's own output shrinks to zeros, so it would check nothing).
    reference = np.float64(x) @ np.float64(ws[0])
    for label, fn, out_in in methods:
      if out_in and ws_t is None:
        ws_t = [jnp.asarray(w.T) for w in ws]
      chain = ws_t if out_in else ws
      try:
        sec = _time(fn, chain, x, FLAGS.iters, out_in)
        first = np.float64(jax.jit(fn)(x, chain[0]))
      except Exception as e:  # pylint: disable=broad-except
        print(f'{name} {label}: failed: {type(e).__name__}: {str(e)[:200]}')
        continue
      err = float(np.max(np.abs(first - reference)) / np.max(np.abs(reference)))
      rows.append((name, label, sec * 1e6, per_matrix_bytes / sec / 1e12, err))
      print(f'{name:5s} {label:36s} {sec*1e6:8.2f} us/matrix '
            f'{per_matrix_bytes/sec/1e12:6.2f} TB/s  rel. error {err:.1e}',
            flush=True)
  print('\nbest per chain:')
  for name in FLAGS.chains.split(','):
    best = sorted([r for r in rows if r[0] == name], key=lambda r: r[2])[:6]
    for r in best:
      print(f'{r[0]:5s} {r[1]:36s} {r[2]:8.2f} us {r[3]:6.2f} TB/s')


if __name__ == '__main__':
  app.run(main)
