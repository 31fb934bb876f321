r"""A dense decoder's layers at one decoding step: the model's kernels against fused ones.

Times `--layers` distinct pre-norm decoder layers (800M shape by default)
in an on-device loop at batch 1, one position per step, in two forms:

  model: the layers as the decoder runs them (trax's Residual over
    `training.model.LayerNorm`, `CausalSelfAttention`, `FeedForward` with
    ReLU; kernels stored (d_out, d_in) as the Sampler hands them over;
    the attention through `training.model.cache_step`);
  fused: four `training.gemv.gemv_out_in` kernels per layer with the small
    operations inside them (LayerNorm + QKV product + bias; output
    projection + bias + residual; LayerNorm + first product + bias + ReLU;
    second product + bias + residual) and the one-query attention kernel
    reading the packed projection (what `training.model.PreNormResidual`
    runs with FUSED_DECODING_GPU), here at any tiling of the products.

Both read the same weights and caches; the first step's outputs are
compared.  Prints microseconds per layer.

    python bench/block_fusion.py                   # on the GPU machine
    JAX_PLATFORMS=cpu python bench/block_fusion.py --shape=tiny --interpret
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from trax import layers as tl
from trax import shapes

from bench import timing  # pylint: disable=g-import-not-at-top
from training import decode_attention
from training import gemv as gemv_lib
from training import model as model_lib
from training import sampling

FLAGS = flags.FLAGS
flags.DEFINE_enum('shape', '800m', ['800m', 'tiny'], 'layer size.')
flags.DEFINE_integer('layers', 24, 'distinct layers per step.')
flags.DEFINE_integer('max_len', 256, 'cache positions.')
flags.DEFINE_integer('pos', 30, 'the step\'s position (cache filled before it).')
flags.DEFINE_integer('iters', 30, 'steps per timing.')
flags.DEFINE_integer('rounds', 3, 'alternating timings of the two forms.')
flags.DEFINE_list('tilings', [], 'also time the fused form at these '
                  'gemv_out_in tilings, block_n:block_k:num_warps each, or '
                  'four of them joined by + (QKV, output, first and second '
                  'feed-forward products).')
flags.DEFINE_bool('interpret', False, 'run the Pallas kernels interpreted (a CPU check).')

SHAPES = {'800m': (1024, 4096, 16), 'tiny': (64, 128, 4)}


def model_layer(d_model, d_ff, n_heads, max_len):
  return tl.Serial(
      tl.Residual(model_lib.LayerNorm(),
                  model_lib.CausalSelfAttention(d_model, n_heads, max_len,
                                                mode='predict')),
      tl.Residual(model_lib.LayerNorm(),
                  model_lib.FeedForward(d_model, d_ff, tl.Relu, mode='predict')))


def fused_layer(x, weights, k_cache, v_cache, pos, interpret, tilings=None):
  """One layer in four fused products and the attention kernel (the
  products at `tilings`, four (block_n, block_k, num_warps), or their
  default)."""
  (s1, t1, w_qkv, b_qkv, w_o, b_o, s2, t2, w_1, b_1, w_2, b_2) = weights
  eps = 1e-6
  t = [dict(zip(('block_n', 'block_k', 'num_warps'), one))
       for one in (tilings or [()] * 4)]
  mv = lambda i, *a, **k: gemv_lib.gemv_out_in(*a, interpret=interpret, **t[i], **k)
  d = x.shape[-1]
  qkv = mv(0, x, w_qkv, bias=b_qkv, norm=(s1, t1, eps))
  out, k_cache, v_cache = decode_attention.one_query_attention_packed(
      qkv, k_cache, v_cache, pos, interpret=interpret)
  x = mv(1, out.swapaxes(1, 2).reshape(1, 1, d), w_o, bias=b_o, residual=x)
  h = mv(2, x, w_1, bias=b_1, norm=(s2, t2, eps), relu=True)
  return mv(3, h, w_2, bias=b_2, residual=x), k_cache, v_cache


def main(argv):
  del argv
  print(jax.devices()[0].device_kind, jax.__version__)
  d_model, d_ff, n_heads = SHAPES[FLAGS.shape]
  layer = model_layer(d_model, d_ff, n_heads, FLAGS.max_len)
  x0 = jnp.asarray(np.random.default_rng(0).standard_normal((1, 1, d_model)),
                   jnp.float32)
  layer.init(shapes.signature(x0))
  marked = sampling.out_in_kernels(layer)
  trees, caches = [], []
  rng = np.random.default_rng(1)
  for _ in range(FLAGS.layers):
    leaves, treedef = jax.tree_util.tree_flatten(layer.weights)
    # Distinct weights per layer, norms' scales and shifts away from 1 and 0.
    leaves = [jnp.asarray(rng.standard_normal(a.shape) * (0.05 if a.ndim > 1 else 0.3)
                          + (1.0 if a.ndim == 1 and i in (0, 6) else 0.0), jnp.float32)
              for i, a in enumerate(leaves)]
    trees.append(sampling.transpose_marked(
        jax.tree_util.tree_unflatten(treedef, leaves), marked))
    shape = (1, n_heads, FLAGS.max_len, d_model // n_heads)
    caches.append(tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32)
                        for _ in range(2)))
  pos = jnp.int32(FLAGS.pos)
  state_leaves, state_def = jax.tree_util.tree_flatten(layer.state)
  pos_at = next(i for i, a in enumerate(state_leaves) if a.shape == () and a.dtype == jnp.int32)
  cache_at = [i for i, a in enumerate(state_leaves) if a.ndim == 4]

  def model_state(kc, vc):
    leaves = list(state_leaves)
    leaves[pos_at] = pos
    leaves[cache_at[0]], leaves[cache_at[1]] = kc, vc
    return jax.tree_util.tree_unflatten(state_def, leaves)
  if FLAGS.interpret:
    model_lib.GEMV_ON_CPU = True

  def model_step(carry, trees):
    x, caches = carry
    new = []
    for w, (kc, vc) in zip(trees, caches):
      x, state = layer.pure_fn(x, w, model_state(kc, vc), None)
      leaves = jax.tree_util.tree_leaves(state)
      kc, vc = leaves[cache_at[0]], leaves[cache_at[1]]
      new.append((kc, vc))
    return x, new

  def fused_step(tilings=None):
    def step(carry, trees):
      x, caches = carry
      new = []
      for w, (kc, vc) in zip(trees, caches):
        x, kc, vc = fused_layer(x, jax.tree_util.tree_leaves(w), kc, vc, pos,
                                FLAGS.interpret, tilings)
        new.append((kc, vc))
      return x, new
    return step

  steps = {'model': model_step, 'fused': fused_step()}
  for t in FLAGS.tilings:
    parts = [tuple(int(v) for v in p.split(':')) for p in t.split('+')]
    steps[f'fused {t}'] = fused_step(parts * 4 if len(parts) == 1 else parts)
  first = {n: np.asarray(jax.jit(s)((x0, caches), trees)[0]) for n, s in steps.items()}
  scale = np.abs(first['model']).max()
  for n in steps:
    diff = np.abs(first['model'] - first[n]).max()
    print(f'first step: max |model - {n}| = {diff:.3g} (max |x| {scale:.3g})')
  times = {n: [] for n in steps}
  for _ in range(FLAGS.rounds):
    for n, s in steps.items():
      sec, _ = _loop_time(s, (x0, caches), trees, FLAGS.iters)
      times[n].append(sec / FLAGS.iters / FLAGS.layers * 1e6)
  print('| form | us per layer (rounds) | median |\n|---|---|---:|')
  for n, t in times.items():
    print(f'| {n} | {" / ".join(f"{v:.2f}" for v in t)} | {np.median(t):.2f} |')


def _loop_time(step, carry, consts, iters):
  """(seconds of `iters` iterations of carry = step(carry, consts) in one
  jitted loop, the fastest of 3 calls; the final carry)."""
  @jax.jit
  def loop(carry, consts):
    return jax.lax.fori_loop(0, iters, lambda i, c: step(c, consts), carry)
  return timing.best_time(loop, carry, consts, repeats=3)


if __name__ == '__main__':
  app.run(main)
