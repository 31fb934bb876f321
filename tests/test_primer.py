"""Primer-EZ: squared ReLU and multi-DConv-head attention, against their equations."""
import jax
from jax import numpy as jnp
import numpy as np
import pytest
from trax import layers as tl
from trax import shapes

from primer_trax import layers as P
from training import model as model_lib

RNG = jax.random.PRNGKey(0)


def test_squared_relu():
  """y = max(x, 0)^2."""
  x = np.array([-2.0, -0.5, 0.0, 0.5, 3.0], np.float32)
  np.testing.assert_allclose(P.SquaredRelu()(x), [0, 0, 0, 0.25, 9.0])


def test_conv_equation_and_official_init():
  """y_t = sum_i w_i x_{t-i} (zeros before 0); init w_0 = 0.5, w_i = 0.5 / k."""
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 5))
  conv = P.CausalDepthwiseConv(3, mode='eval')
  conv.init(shapes.signature(x))
  np.testing.assert_allclose(conv.weights[:, 0], [0.5, 0.5 / 3, 0.5 / 3], rtol=1e-6)
  w = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (3, 5)))
  got = conv.pure_fn(x, jnp.asarray(w), (), RNG)[0]
  xn = np.asarray(x)
  want = np.zeros_like(xn)
  for t in range(6):
    for i in range(3):
      if t - i >= 0:
        want[:, t] += w[i] * xn[:, t - i]
  np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize('kernel_size, length', [(3, 6), (5, 3)])
def test_conv_gradients_equal_autodiff_of_the_equation(kernel_size, length):
  """The hand-written backward pass (dw as a GEMV) equals jax.grad of the
  plain sum of shifted products, also with taps longer than the sequence."""
  x = jax.random.normal(jax.random.PRNGKey(4), (2, length, 5))
  w = jax.random.normal(jax.random.PRNGKey(5), (kernel_size, 5))

  def plain(x, w):
    xp = jnp.pad(x, ((0, 0), (kernel_size - 1, 0), (0, 0)))
    return sum(w[i] * xp[:, kernel_size - 1 - i:kernel_size - 1 - i + length]
               for i in range(kernel_size))

  def loss(f):
    return lambda x, w: jnp.sum(jnp.sin(f(x, w)) * jnp.arange(length)[:, None])

  want = jax.grad(loss(plain), (0, 1))(x, w)
  got = jax.grad(loss(P.causal_depthwise_conv), (0, 1))(x, w)
  np.testing.assert_allclose(P.causal_depthwise_conv(x, w), plain(x, w), atol=1e-6)
  for g, e in zip(got, want):
    np.testing.assert_allclose(g, e, atol=1e-5)


@pytest.mark.parametrize('kernel_size', [1, 2, 3, 5])
def test_conv_matches_trax_and_predict_equals_eval(kernel_size):
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 9, 4))
  ref = tl.CausalDepthwiseConv(kernel_size)
  ref.init(shapes.signature(x), rng=RNG)
  ours = P.CausalDepthwiseConv(kernel_size, mode='eval')
  ours.init(shapes.signature(x))
  full = ours.pure_fn(x, ref.weights, (), RNG)[0]
  np.testing.assert_allclose(full, ref(x), atol=1e-6)  # same weights, same output
  pred = P.CausalDepthwiseConv(kernel_size, mode='predict')
  pred.init(shapes.signature(x[:, :1]))
  state, outs = pred.state, []
  out, state = pred.pure_fn(x[:, :4], ref.weights, state, RNG)  # prefill 4
  outs.append(out)
  for t in range(4, 9):
    out, state = pred.pure_fn(x[:, t:t + 1], ref.weights, state, RNG)
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-6)


def _primer_ez(mode):
  return model_lib.DecoderLM(40, d_model=32, d_ff=64, n_layers=2, n_heads=4, max_len=24,
                             activation=P.SquaredRelu, qkv_layer=P.MultiDConv, mode=mode)


def test_primer_ez_predict_equals_eval_and_is_causal():
  ids = jax.random.randint(jax.random.PRNGKey(4), (2, 12), 0, 40)
  model = _primer_ez('eval')
  model.init(shapes.signature(ids), rng=RNG)
  want = model(ids)
  pred = _primer_ez('predict')
  pred.init(shapes.ShapeDtype((2, 1), np.int32))
  state, outs = pred.state, []
  for t in range(12):
    out, state = pred.pure_fn(ids[:, t:t + 1], model.weights, state, RNG)
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, 1), want, atol=1e-5)
  changed = np.asarray(ids).copy()
  changed[:, 7] = (changed[:, 7] + 1) % 40
  np.testing.assert_allclose(model(changed)[:, :7], want[:, :7], atol=1e-6)


def test_trax_use_dconv_predict_mode_is_wrong_and_ours_is_not():
  """trax's CausalAttention(use_dconv=True) decodes with w_0 only; ours keeps state."""
  d, heads = 8, 2
  x = jax.random.normal(jax.random.PRNGKey(5), (1, 6, d))
  ref_eval = tl.CausalAttention(d, n_heads=heads, use_dconv=True, mode='eval')
  ref_eval.init(shapes.signature(x), rng=RNG)
  ref_pred = tl.CausalAttention(d, n_heads=heads, use_dconv=True, mode='predict')
  ref_pred.init(shapes.signature(x[:, :1]), rng=RNG)
  state, outs = ref_pred.state, []
  for t in range(6):
    out, state = ref_pred.pure_fn(x[:, t:t + 1], ref_eval.weights, state, RNG)
    outs.append(out)
  trax_gap = np.abs(np.concatenate(outs, 1) - ref_eval(x)).max()
  assert trax_gap > 1e-3  # trax's predict mode disagrees with its eval mode

  ours_eval = model_lib.CausalSelfAttention(d, heads, mode='eval', qkv_layer=P.MultiDConv)
  ours_eval.init(shapes.signature(x), rng=RNG)
  ours_pred = model_lib.CausalSelfAttention(d, heads, mode='predict', qkv_layer=P.MultiDConv)
  ours_pred.init(shapes.signature(x[:, :1]), rng=RNG)
  state, outs = ours_pred.state, []
  for t in range(6):
    out, state = ours_pred.pure_fn(x[:, t:t + 1], ours_eval.weights, state, RNG)
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, 1), ours_eval(x), atol=1e-5)


def test_bad_kernel_size():
  with pytest.raises(ValueError, match='kernel_size must be at least 1'):
    P.CausalDepthwiseConv(0)
