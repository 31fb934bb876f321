"""Tests of terraformer.sru.SRU against trax 1.4.1 `tl.SRU`.

Equations (trax's variant of arXiv 1709.02755), x (batch, length, n):
    r, f, y = split(x W + b, 3);  r, f = sigmoid(r), sigmoid(f)
    c_t = f_t c_{t-1} + (1 - f_t) y_t,  c_0 = 0
    h_t = act(c_t) r_t + x_t (1 - r_t) sqrt(3)
With trax's weights, ours must give trax's outputs and gradients (1e-5,
float32), and predict mode one token at a time must give eval's outputs.
"""

import jax
from jax import numpy as jnp
import numpy as np
import pytest
from trax import layers as tl
from trax import shapes
from trax.layers import base

from terraformer import sru

N = 6
ATOL = 1e-5


def _x(shape, seed=0):
  return np.random.RandomState(seed).normal(size=shape).astype(np.float32)


def _pair(activation, mode='train', x=None):
  """trax's SRU (initialised) and ours with trax's weights and state."""
  x = _x((2, 7, N)) if x is None else x
  ref = tl.SRU(N, activation=activation() if activation else None, mode=mode)
  ref.init(shapes.signature(x), rng=jax.random.PRNGKey(1))
  ours = sru.SRU(N, activation=activation() if activation else None, mode=mode)
  ours.init(shapes.signature(x))
  assert (jax.tree_util.tree_structure(ours.weights)
          == jax.tree_util.tree_structure(ref.weights))
  ours.weights = ref.weights
  return ref, ours, x


@pytest.mark.parametrize('activation', [None, tl.Tanh])
def test_same_outputs_and_gradients_as_trax(activation):
  ref, ours, x = _pair(activation)
  assert (jax.tree_util.tree_structure(ours.state)
          == jax.tree_util.tree_structure(ref.state))
  w_ref = ref.weights
  # Bigger weights than the initialiser's, so the gates are far from 1/2.
  w_ref = jax.tree_util.tree_map(lambda a: a * 3.0, w_ref)
  def loss(layer):
    def f(w, x):
      y, _ = layer.pure_fn(x, w, layer.state, jax.random.PRNGKey(0))
      return jnp.sum(jnp.sin(y)), y
    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
  (_, y_ref), g_ref = loss(ref)(w_ref, x)
  (_, y), g = loss(ours)(w_ref, x)
  np.testing.assert_allclose(y, y_ref, atol=ATOL)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=ATOL)
  # The equations by hand (a loop over the length), without tanh.
  if activation is None:
    w, b = sru.dense_weights(w_ref)
    rfy = x @ w + b
    r, f = jax.nn.sigmoid(rfy[..., :N]), jax.nn.sigmoid(rfy[..., N:2 * N])
    c = np.zeros((x.shape[0], N), np.float32)
    for t in range(x.shape[1]):
      c = f[:, t] * c + (1 - f[:, t]) * rfy[:, t, 2 * N:]
      h = c * r[:, t] + x[:, t] * (1 - r[:, t]) * np.sqrt(3)
      np.testing.assert_allclose(y[:, t], h, atol=ATOL)


def test_eval_equals_train_and_trax_eval():
  ref, ours, x = _pair(None, mode='eval')
  ours_train = sru.SRU(N)
  ours_train.init(shapes.signature(x))
  ours_train.weights = ref.weights
  np.testing.assert_allclose(ours(x), ref(x), atol=ATOL)
  np.testing.assert_allclose(ours_train(x), ref(x), atol=ATOL)


def test_predict_one_token_at_a_time_equals_eval():
  x = _x((2, 9, N), seed=3)
  ref, ours_eval, _ = _pair(tl.Tanh, mode='eval', x=x)
  ours = sru.SRU(N, activation=tl.Tanh(), mode='predict')
  ours.init(shapes.signature(x[:, :1]))
  ours.weights = ref.weights
  full = ours_eval(x)
  np.testing.assert_allclose(full, ref(x), atol=ATOL)
  # A prompt of 3 tokens, then one token at a time.
  outs = [ours(x[:, :3])]
  for t in range(3, x.shape[1]):
    outs.append(ours(x[:, t:t + 1]))
  np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=ATOL)
  # The carry is the last c (trax keeps the same carry after its calls).
  ref_predict = tl.SRU(N, activation=tl.Tanh(), mode='predict')
  ref_predict.init(shapes.signature(x))
  ref_predict.weights = ref.weights
  ref_predict(x)
  np.testing.assert_allclose(ours.state[5][1][0], ref_predict.state[5][1][0],
                             atol=ATOL)


def test_linear_recurrence_matches_loop():
  a = jnp.asarray(np.random.RandomState(0).uniform(size=(2, 5, 3)), jnp.float32)
  b = jnp.asarray(_x((2, 5, 3), seed=1))
  c0 = jnp.asarray(_x((2, 3), seed=2))
  c, expected = c0, []
  for t in range(5):
    c = a[:, t] * c + b[:, t]
    expected.append(c)
  np.testing.assert_allclose(sru.linear_recurrence(a, b, c0),
                             jnp.stack(expected, axis=1), atol=1e-6)


def test_errors():
  with pytest.raises(ValueError, match='n_units'):
    sru.SRU(0)
  with pytest.raises(ValueError, match='mode'):
    sru.SRU(4, mode='decode')
  layer = sru.SRU(4)
  # trax's init wraps the ValueError in its LayerError, message kept.
  with pytest.raises(base.LayerError, match=r'\(batch, length, 4\)'):
    layer.init(shapes.signature(np.zeros((2, 3, 5), np.float32)))
