"""LSH self-attention: parity with trax, equations, causality, decoding, errors.

The reference is trax's `tl.LSHSelfAttention`
(trax/layers/research/efficient_attention.py).  Both layers initialised with
the same rng hold the same weights and state; given the same weights, state
and call rng they must give the same outputs, new state (buckets, hashing
keys) and gradients to 1e-5.

trax's decoding path calls `fastmath.cond(pred=, true_operand=, ...)`, the
keyword form that current JAX's `lax.cond` no longer takes, and branches in
Python on a traced length inside its `fori_loop`; the predict parity test
therefore runs trax with use_python_loop=True and a test-only `cond` that
accepts the old keywords (`_old_cond`).
"""
import math

import jax
from jax import numpy as jnp
import numpy as np
import pytest
from trax import layers as tl
from trax import shapes
from trax.fastmath import jax as trax_jax_backend
from trax.layers.base import LayerError

from terraformer import lsh

INIT = jax.random.PRNGKey(0)
CALL = jax.random.PRNGKey(5)
TOL = dict(atol=1e-5, rtol=1e-5)


def _signature(shape, masked=False):
  sig = shapes.ShapeDtype(shape, jnp.float32)
  return (sig, shapes.ShapeDtype(shape[:2], jnp.bool_)) if masked else sig


def _pair(shape, **kwargs):
  """(trax layer, our layer), both initialised from INIT."""
  ref, ours = tl.LSHSelfAttention(**kwargs), lsh.LSHSelfAttention(**kwargs)
  sig = _signature(shape, kwargs.get('masked', False))
  ref.init(sig, rng=INIT)
  ours.init(sig, rng=INIT)
  return ref, ours


def _x(shape, seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _assert_trees_equal(a, b, **tol):
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for u, v in zip(leaves_a, leaves_b):
    assert u.shape == v.shape and u.dtype == v.dtype
    np.testing.assert_allclose(u, v, **tol)


# (shape, constructor arguments), compared forward-only: 2 rounds,
# factorised bucket counts, chunks after, a length that chunk_len does not
# divide (n_hashes * length does), all (example, head) slices at once
# (n_parallel_heads=None); padding, with the default one (example, head)
# slice at a time (our lax.map with rematerialisation).
PARITY_CASES = [
    ((1, 10, 6), dict(n_heads=2, d_qk=4, d_v=3, chunk_len=4, n_hashes=2,
                      n_buckets=[2, 4], n_chunks_after=1, n_parallel_heads=None,
                      mode='eval')),
    ((2, 16, 6), dict(n_heads=2, d_qk=4, d_v=5, chunk_len=4, n_hashes=2,
                      n_buckets=4, masked=True, mode='train')),
]
# Compared forward and backward (test_train_mode_and_gradients_match_trax):
# causal, 2 rounds, default bucket count, buckets padded in state, attention
# and output dropout.
TRAIN_CASE = ((2, 16, 6), dict(n_heads=2, d_qk=4, d_v=5, chunk_len=4,
                               n_hashes=2, causal=True,
                               max_length_for_buckets=24,
                               attention_dropout=0.3, output_dropout=0.2,
                               mode='train'))


def _inputs(shape, masked):
  x = _x(shape)
  if not masked:
    return x
  # Padding suffixes starting at 5 and 11 (trax leaves padding at positions
  # 0 and 1 visible, see test_padding_at_start_is_masked).
  mask = jnp.arange(shape[1])[None, :] < jnp.array([[5], [11]])
  return (x, mask)


@pytest.mark.parametrize('shape,kwargs', PARITY_CASES)
def test_same_weights_state_outputs_as_trax(shape, kwargs):
  ref, ours = _pair(shape, **kwargs)
  _assert_trees_equal(ref.weights, ours.weights, atol=0, rtol=0)
  _assert_trees_equal(ref.state, ours.state, atol=0, rtol=0)
  inputs = _inputs(shape, kwargs.get('masked', False))
  y_ref, state_ref = jax.jit(ref.pure_fn)(inputs, ref.weights, ref.state, CALL)
  y, state = jax.jit(ours.pure_fn)(inputs, ref.weights, ref.state, CALL)
  np.testing.assert_allclose(y, y_ref, **TOL)
  _assert_trees_equal(state, state_ref, atol=0, rtol=0)  # buckets and keys


def test_train_mode_and_gradients_match_trax():
  """Same weights and state at init; same outputs, new state (buckets and
  keys) and gradients (inputs and weights) for one call in train mode."""
  shape, kwargs = TRAIN_CASE
  ref, ours = _pair(shape, **kwargs)
  _assert_trees_equal(ref.weights, ours.weights, atol=0, rtol=0)
  _assert_trees_equal(ref.state, ours.state, atol=0, rtol=0)
  x, ct = _x(shape), _x(shape, seed=2)

  def forward_backward(layer):
    f = lambda x, w: layer.pure_fn(x, w, ref.state, CALL)
    def run(x, w):
      y, vjp, state = jax.vjp(f, x, w, has_aux=True)
      return y, state, vjp(ct)
    return jax.jit(run)(x, ref.weights)

  (y_ref, state_ref, g_ref), (y, state, g) = (forward_backward(ref),
                                              forward_backward(ours))
  np.testing.assert_allclose(y, y_ref, **TOL)
  _assert_trees_equal(state, state_ref, atol=0, rtol=0)
  for leaf in jax.tree_util.tree_leaves(g):
    assert np.all(np.isfinite(leaf))
  _assert_trees_equal(g, g_ref, **TOL)


def _full_shared_qk_attention(x, weights, causal):
  """Full attention with shared QK, by its equation, one head at a time.

  y = sum_h softmax_j(s_ij) v_j W_o,  s_ij = q_i . q_j / |q_j|_rms / sqrt(d),
  q = x W_q, v = x W_v; s_ij -= 1e9 if causal and j > i; s_ii -= 1e5 (a
  token attends to itself only when it can attend to nothing else).
  """
  w_q, w_v, w_o = (np.asarray(w, np.float64) for w in weights)
  x = np.asarray(x, np.float64)
  length = x.shape[1]
  i, j = np.arange(length)[:, None], np.arange(length)[None, :]
  y = 0.0
  for h in range(w_q.shape[0]):
    q, v = x @ w_q[h], x @ w_v[h]
    k = q / np.sqrt(np.mean(q * q, -1, keepdims=True) + 1e-6)
    s = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    s = s - 1e9 * (causal & (j > i)) - 1e5 * (i == j)
    p = np.exp(s - s.max(-1, keepdims=True))
    y = y + (p / p.sum(-1, keepdims=True)) @ v @ w_o[h]
  return y


@pytest.mark.parametrize('n_hashes,causal', [(2, True), (1, False)])
def test_one_chunk_is_full_attention(n_hashes, causal):
  """With chunk_len >= length every token sees every other: full attention.

  Causal position 0 can attend only to itself; its one logit, s_00 - 1e5,
  is rounded to float32's step of 2^-7 at 1e5, so its softmax weight (exactly
  1 in the equation) is off by up to ~0.4 % there, in trax as here.
  """
  shape = (2, 8, 6)
  layer = lsh.LSHSelfAttention(n_heads=2, d_qk=4, d_v=5, chunk_len=8,
                               n_hashes=n_hashes, n_buckets=4, causal=causal,
                               mode='eval')
  layer.init(_signature(shape), rng=INIT)
  x = _x(shape)
  y = layer(x)
  want = _full_shared_qk_attention(x, layer.weights, causal)
  np.testing.assert_allclose(y[:, 1:], want[:, 1:], **TOL)
  np.testing.assert_allclose(y[:, 0], want[:, 0], atol=1e-5,
                             rtol=1e-2 if causal else 1e-5)


def test_future_values_do_not_reach_the_past():
  """Causal masking: moving a future token along directions W_q ignores
  (so no bucket or sort changes) changes no earlier output.

  (A change that moves a future token to another bucket can reorder the
  sorted list and so change which past tokens share an earlier token's
  chunk; that is LSH's approximation, in trax as here, not a leak: attention
  weights on future positions are always exp(-1e9) = 0.)
  """
  shape = (1, 16, 12)
  layer = lsh.LSHSelfAttention(n_heads=2, d_qk=4, d_v=5, chunk_len=4,
                               n_hashes=2, n_buckets=4, causal=True,
                               mode='eval')
  layer.init(_signature(shape), rng=INIT)
  w_q = np.concatenate(list(layer.weights[0]), axis=1)  # (12, 8)
  null = np.linalg.svd(w_q.T)[2][-1]  # w_q.T @ null == 0
  x = _x(shape)
  run = jax.jit(lambda x: layer.pure_fn(x, layer.weights, layer.state, CALL)[0])
  y = run(x)
  for p in (5, 9, 13):
    y2 = run(x.at[0, p].add(3.0 * null))
    np.testing.assert_allclose(y2[:, :p], y[:, :p], **TOL)
    assert np.abs(y2[:, p + 1:] - y[:, p + 1:]).max() > 1e-3  # v_p is used


def test_padding_at_start_is_masked():
  """Padding keys are invisible wherever they are, also at positions 0, 1.

  trax makes its padding marks negative positions before shifting them to
  1-based, so padding at positions 0 and 1 stays visible there (this is why
  trax's own test_lsh_self_attention_masked_non_causal fails when the random
  padding starts at position 1).
  """
  shape = (1, 16, 6)
  layer = lsh.LSHSelfAttention(n_heads=2, d_qk=4, d_v=5, chunk_len=8,
                               n_hashes=2, n_buckets=4, masked=True,
                               mode='eval')
  layer.init(_signature(shape, masked=True), rng=INIT)
  x = _x(shape)
  mask = jnp.arange(16)[None, :] >= 2
  run = jax.jit(lambda x: layer.pure_fn((x, mask), layer.weights, layer.state,
                                        CALL)[0])
  y, y2 = run(x), run(x.at[0, :2].set(_x((2, 6), seed=3)))
  np.testing.assert_allclose(y2[:, 2:], y[:, 2:], **TOL)


def _old_cond(*args, **kwargs):
  """lax.cond that also takes trax's old keywords (test-only)."""
  if 'true_operand' in kwargs:
    return jax.lax.cond(kwargs['pred'], kwargs['true_fun'],
                        kwargs['false_fun'], kwargs['true_operand'])
  return jax.lax.cond(*args, **kwargs)


def test_decoding_matches_trax(monkeypatch):
  """Predict mode, token by token through a memory that drops old tokens."""
  monkeypatch.setitem(trax_jax_backend.JAX_BACKEND, 'cond', _old_cond)
  kwargs = dict(n_heads=1, d_qk=4, d_v=5, chunk_len=4, n_hashes=2,
                n_buckets=4, causal=True, mode='predict', predict_mem_len=8,
                predict_drop_len=4)
  ref, ours = _pair((1, 1, 6), use_python_loop=True, **kwargs)
  _assert_trees_equal(ref.state, ours.state, atol=0, rtol=0)
  x = _x((1, 10, 6))
  step = jax.jit(ours.pure_fn)
  state_ref = state = ref.state
  # 3 tokens at the start (the chunked path), then one at a time; the
  # memory (8) is full at token 8 and drops 4.
  for lo, hi in [(0, 3)] + [(i, i + 1) for i in range(3, 10)]:
    y_ref, state_ref = ref.pure_fn(x[:, lo:hi], ref.weights, state_ref, CALL)
    y, state = step(x[:, lo:hi], ref.weights, state, CALL)
    np.testing.assert_allclose(y, y_ref, **TOL)
    _assert_trees_equal(state, state_ref, atol=0, rtol=0)


def _decode(layer, x, first):
  state, outs = layer.state, []
  step = jax.jit(layer.pure_fn)
  for lo, hi in [(0, first)] + [(i, i + 1) for i in range(first, x.shape[1])]:
    y, state = step(x[:, lo:hi], layer.weights, state, CALL)
    outs.append(y)
  return np.concatenate(outs, axis=1)


def test_decoding_equals_eval_within_one_chunk():
  """Decoding == eval on the whole sequence where LSH is exact (one chunk).

  Beyond one chunk the two are different approximations of attention (eval
  attends within sorted chunks per round, decoding to the K best-ranked
  remembered tokens in one softmax), in trax as here; their agreement with
  trax is test_decoding_matches_trax.
  """
  shape = (2, 8, 6)
  kwargs = dict(n_heads=2, d_qk=4, d_v=5, chunk_len=8, n_hashes=2,
                n_buckets=4, causal=True)
  evaluator = lsh.LSHSelfAttention(mode='eval', **kwargs)
  evaluator.init(_signature(shape), rng=INIT)
  decoder = lsh.LSHSelfAttention(mode='predict', predict_mem_len=8,
                                 predict_drop_len=8, **kwargs)
  decoder.init(_signature((2, 1, 6)), rng=INIT)
  x = _x(shape)
  y, want = _decode(decoder, x, 5), evaluator(x)
  np.testing.assert_allclose(y[:, 1:], want[:, 1:], **TOL)
  # Position 0 sees only itself: float32 rounding of its -1e5 logit differs
  # between the two paths (see test_one_chunk_is_full_attention).
  np.testing.assert_allclose(y[:, 0], want[:, 0], atol=1e-5, rtol=1e-2)


def test_buckets_are_replayed_from_state():
  """Output (buckets and dropout) is a function of (x, weights, state, rng).

  Same arguments, same output: a recompute (here jax.checkpoint, as a
  reversible backward pass does) gives the gradients of the forward pass.
  The new state carries a fresh hashing key; the call rng drives dropout.
  """
  shape, kwargs = TRAIN_CASE
  layer = lsh.LSHSelfAttention(**dict(kwargs, n_parallel_heads=None))
  layer.init(_signature(shape), rng=INIT)
  x, w, s = _x(shape), layer.weights, layer.state
  run = jax.jit(layer.pure_fn)
  f = lambda x, w: jnp.sum(layer.pure_fn(x, w, s, CALL)[0] ** 2)
  y1, s1 = run(x, w, s, CALL)
  y2, s2 = run(x, w, s, CALL)
  np.testing.assert_array_equal(y1, y2)
  _assert_trees_equal(s1, s2, atol=0, rtol=0)
  grads = jax.jit(lambda x, w: (jax.grad(f, (0, 1))(x, w),
                                jax.grad(jax.checkpoint(f), (0, 1))(x, w)))
  g, g_remat = grads(x, w)
  _assert_trees_equal(g_remat, g, **TOL)
  assert not np.array_equal(s1[1], s[1])              # the key moved on
  assert not np.array_equal(s1[0], run(x, w, s1, CALL)[1][0])  # new buckets
  assert not np.allclose(y1, run(x, w, s, jax.random.PRNGKey(6))[0])


def test_bad_arguments_raise_at_build():
  bad = [dict(n_buckets=3), dict(n_buckets=[4, 3]), dict(n_buckets=0),
         dict(chunk_len=0), dict(n_hashes=0), dict(mode='decode'),
         dict(attention_dropout=1.0), dict(n_heads=2, n_parallel_heads=3),
         dict(mode='predict', causal=False),
         dict(mode='predict', causal=True, n_chunks_after=1),
         dict(mode='predict', causal=True, predict_mem_len=8,
              predict_drop_len=16)]
  for kwargs in bad:
    with pytest.raises(ValueError) as err:
      lsh.LSHSelfAttention(**kwargs)
    name = next(iter(k for k in kwargs if k not in ('mode', 'causal')), 'mode')
    assert name in str(err.value) or 'predict' in str(err.value)


def test_bad_shapes_raise_at_call():
  layer = lsh.LSHSelfAttention(n_heads=1, d_qk=4, d_v=4, chunk_len=8,
                               mode='eval')
  layer.init(_signature((1, 12, 6)), rng=INIT)
  # trax reports a layer's exception as a LayerError quoting it.
  with pytest.raises(LayerError, match=r'ValueError: n_hashes \* length '
                     r'\(1 \* 12\).*chunk_len \(8\)'):
    layer(_x((1, 12, 6)))
  with pytest.raises(LayerError, match='ValueError.*batch 2'):
    layer(_x((2, 16, 6)))
  layer = lsh.LSHSelfAttention(n_heads=1, d_qk=4, d_v=4, chunk_len=8,
                               max_length_for_buckets=16, mode='eval')
  layer.init(_signature((1, 16, 6)), rng=INIT)
  with pytest.raises(LayerError, match=r'ValueError: length \(24\).*\(16\)'):
    layer(_x((1, 24, 6)))


def test_16k_tokens_in_linear_memory():
  """A 16384-token forward runs on CPU, with scratch memory far below the
  1 GiB one (16384 x 16384) float32 score matrix of full attention takes."""
  shape = (1, 16384, 8)
  layer = lsh.LSHSelfAttention(n_heads=1, d_qk=4, d_v=4, chunk_len=64,
                               causal=True, mode='eval')
  layer.init(_signature(shape), rng=INIT)
  fn = jax.jit(layer.pure_fn)
  args = (_x(shape), layer.weights, layer.state, CALL)
  compiled = fn.lower(*args).compile()
  scratch = compiled.memory_analysis().temp_size_in_bytes
  assert scratch < 64 * 2**20, scratch
  y, _ = compiled(*args)
  assert y.shape == shape and np.all(np.isfinite(y))
