r"""Per-layer cost of decoding one token (batch 1, predict mode).

Times each building block of the models in bench/decode_speed.py on its own:
a `lax.scan` of `--steps` one-token calls with the layer state (caches)
carried, as the Sampler runs it, so caches update in place.  Shows where a
token's time goes, e.g. why a sparse layer is not yet at its bandwidth floor.
Beside each time: the layer's weight bytes and XLA's count of its floating
point operations for one token (`cost_analysis` of one call), and the rate
those make at the time measured: on a CPU a layer whose weights stay in the
caches runs at its arithmetic rate, not at the memory's (kernels XLA cannot
see into, e.g. Pallas's on a GPU, count no operations).  Weights as the
Sampler hands them over (transposed kernels, decoding forms).

    python bench/decode_layers.py                   # the 800M shape
    JAX_PLATFORMS=cpu python bench/decode_layers.py
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
from jax import numpy as jnp
import numpy as np

from bench import timing  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_integer('d_model', 1024, 'width.')
flags.DEFINE_integer('n_heads', 16, 'heads.')
flags.DEFINE_integer('max_len', 256, 'cache length.')
flags.DEFINE_integer('vocab_size', 32000, 'vocabulary.')
flags.DEFINE_integer('steps', 64, 'one-token calls per timing.')
flags.DEFINE_bool('cpu_kernels_out_in', True, 'On a CPU, Dense kernels transposed as the Sampler hands them over.')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'weights and activations.')


def layers(d, h, max_len, vocab):
  from trax import layers as tl  # pylint: disable=g-import-not-at-top
  from terraformer import sparse_ff  # pylint: disable=g-import-not-at-top
  from terraformer import sparse_qkv  # pylint: disable=g-import-not-at-top
  from training import model as model_lib  # pylint: disable=g-import-not-at-top
  p = 'predict'
  return {
      'dense attention': model_lib.CausalSelfAttention(d, h, max_len, mode=p),
      'sparse QKV attention (S=16, k=3)': sparse_qkv.MultiplicativeConvCausalAttention(
          d, n_heads=h, sparsity=16, length_kernel_size=3,
          max_inference_length=max_len, mode=p),
      '  FactoredDense (S=16)': sparse_qkv.FactoredDense(16, d, d),
      '  LocallyConvDense (k=3)': sparse_qkv.LocallyConvDense(
          16, d // 16, p, kernel_size=3, length_kernel_size=3),
      'dense FF 4096': model_lib.FeedForward(d, 4096, tl.Relu, mode=p),
      'SparseFF 4096/64': sparse_ff.SparseFF(4096, 64, 64, mode=p),
      'SparseFF 6144/64': sparse_ff.SparseFF(6144, 64, 96, mode=p),
      'LayerNorm': model_lib.LayerNorm(),
      f'Dense {vocab} (output)': model_lib.Dense(vocab, role='head'),
      f'FactoredDense {vocab} S=4 (sparse loss)': sparse_qkv.FactoredDense(4, d, vocab),
  }


def time_layer(layer, d, dtype):
  from trax import shapes  # pylint: disable=g-import-not-at-top
  from training import sampling  # pylint: disable=g-import-not-at-top
  from training.trainer import cast_floats  # pylint: disable=g-import-not-at-top
  layer.init(shapes.ShapeDtype((1, 1, d), np.float32))
  weights = cast_floats(layer.weights, dtype)
  forms = sampling.decoding_forms(layer) if sampling.DECODING_FORMS else []
  weights = sampling.prepare_for_decoding(  # as the Sampler hands them over
      weights, sampling.decoding_out_in(layer), forms)
  state = cast_floats(layer.state, dtype)
  x0 = jnp.ones((1, 1, d), dtype or jnp.float32)
  rng = jax.random.PRNGKey(0)

  def run(weights, state, x):
    def one(carry, _):
      x, state = carry
      y, state = layer.pure_fn(x, weights, state, rng)
      return (x + 1e-6 * y[..., :1].astype(x.dtype), state), None
    (x, state), _ = jax.lax.scan(one, (x, state), None, length=FLAGS.steps)
    return x
  # Compiled with the Sampler's decoding options (on a CPU, without XLA's
  # YNNPACK fusions), so each layer runs as it does inside a decoded token.
  run = jax.jit(run, compiler_options=sampling.decode_compiler_options())
  best, _ = timing.best_time(run, weights, state, x0)
  n_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(weights))
  one = jax.jit(lambda w, s, x: layer.pure_fn(x, w, s, rng),
                compiler_options=sampling.decode_compiler_options())
  cost = one.lower(weights, state, x0).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return best / FLAGS.steps, n_bytes, float(cost.get('flops', 0.0))


def main(argv):
  del argv
  from training import sampling  # pylint: disable=g-import-not-at-top
  sampling.CPU_KERNELS_OUT_IN = FLAGS.cpu_kernels_out_in
  dtype = None if FLAGS.dtype == 'float32' else jnp.bfloat16
  dev = jax.devices()[0]
  print(f'{dev.platform} {dev.device_kind}, {os.cpu_count()} CPUs, {FLAGS.dtype}')
  print('| layer | us/token | weight MB | MFLOP/token | GFLOP/s |')
  print('|---|---|---|---|---|')
  for name, layer in layers(FLAGS.d_model, FLAGS.n_heads, FLAGS.max_len,
                            FLAGS.vocab_size).items():
    seconds, n_bytes, flops = time_layer(layer, FLAGS.d_model, dtype)
    print(f'| {name} | {seconds * 1e6:.1f} | {n_bytes / 1e6:.1f} | '
          f'{flops / 1e6:.2f} | {flops / seconds / 1e9:.1f} |', flush=True)


if __name__ == '__main__':
  app.run(main)
