"""Tests of terraformer.reversible.ReversibleSerial.

Reference: trax 1.4.1 `tl.ReversibleSerial` (same sublayers and weights) and a
hand-written non-reversible computation of the same blocks.  A block
`[ReversibleHalfResidual(F), ReversibleSwap]` maps

    (x1, x2) -> (x2, x1 + F(x2)),

and a stack of n layers gives layer i the rng `split(rng, n)[i]`; a half
residual with one sublayer gives it `split(rng_i, 1)[0]` (trax's rules).
"""

import jax
from jax import numpy as jnp
import numpy as np
import pytest
from trax import layers as tl
from trax import shapes

from terraformer import lsh
from terraformer import reversible
from terraformer import sparse_ff
from training import model as model_lib

ATOL = 1e-5
D = 8


def _sparse_ff(temperature=0.1):
  return sparse_ff.SparseFF(4 * D, n_elements_in_block=4, d_lowrank=4,
                            temperature=temperature, quant_prob=1.0,
                            dropout_rate=0.2, mode='train')


def _blocks(n_blocks, temperature=0.1):
  """n_blocks x [attention-like half residual, swap, SparseFF half residual,
  swap]; dropout in both residual branches."""
  layers = []
  for _ in range(n_blocks):
    layers += [
        tl.ReversibleHalfResidual(model_lib.LayerNorm(), tl.Dense(D),
                                  tl.Dropout(0.3, mode='train')),
        tl.ReversibleSwap(),
        tl.ReversibleHalfResidual(model_lib.LayerNorm(),
                                  _sparse_ff(temperature)),
        tl.ReversibleSwap(),
    ]
  return layers


def _plain_forward(layers, xs, weights, state, rng):
  """The stack written out by hand (no reversibility, ordinary autodiff)."""
  x1, x2 = xs
  new_state = []
  for layer, w, s, r in zip(layers, weights, state,
                            jax.random.split(rng, len(layers))):
    if isinstance(layer, tl.ReversibleHalfResidual):
      f = layer.sublayers[0]
      y, s1 = f.pure_fn(x2, w[0], s[0], jax.random.split(r, 1)[0])
      x1 = x1 + y
      new_state.append((s1,))
    else:  # swap
      x1, x2 = x2, x1
      new_state.append(s)
  return (x1, x2), tuple(new_state)


def _loss(apply_fn):
  def loss(weights, x1, x2, state, rng):
    (y1, y2), new_state = apply_fn((x1, x2), weights, state, rng)
    return jnp.sum(y1 * jnp.sin(y2)) + jnp.sum(y2 ** 2), (y1, y2, new_state)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _assert_trees_close(a, b, atol=ATOL):
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for u, v in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(u, np.float64),
                               np.asarray(v, np.float64), atol=atol, rtol=0)


@pytest.fixture(scope='module')
def setup():
  """Two blocks with strong Gumbel noise (so the rng matters), initialised,
  and value_and_grad of one loss through ours, trax's and the plain stack."""
  layers = _blocks(2, temperature=2.0)
  ours = reversible.ReversibleSerial(*layers)
  trax_stack = tl.ReversibleSerial(*layers)
  x1 = np.random.RandomState(0).normal(size=(2, 6, D)).astype(np.float32)
  x2 = np.random.RandomState(1).normal(size=(2, 6, D)).astype(np.float32)
  ours.init(shapes.signature((x1, x2)), rng=jax.random.PRNGKey(0))
  w, s = ours.weights, ours.state
  rng = jax.random.PRNGKey(7)
  results = {
      'ours': _loss(ours.pure_fn)(w, x1, x2, s, rng),
      'trax': _loss(trax_stack.pure_fn)(w, x1, x2, s, rng),
      'plain': _loss(lambda *a: _plain_forward(layers, *a))(w, x1, x2, s, rng),
  }
  return layers, trax_stack, w, s, x1, x2, rng, results


def test_same_tree_and_outputs_and_gradients_as_trax_and_plain(setup):
  _, trax_stack, w, _, _, _, _, results = setup
  (loss, (y1, y2, new_state)), grads = results['ours']
  # The gradients are not trivially small (a bug returning zeros would fail).
  assert float(jnp.max(jnp.abs(grads[1]))) > 0.1
  for name in ('trax', 'plain'):
    (ref_loss, ref_aux), ref_grads = results[name]
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    _assert_trees_close((y1, y2), ref_aux[:2])
    _assert_trees_close(grads, ref_grads)  # weights, x1 and x2
    # Same new state (SparseFF choices) as trax and as the plain forward.
    for a, b in zip(jax.tree_util.tree_leaves(new_state),
                    jax.tree_util.tree_leaves(ref_aux[2])):
      np.testing.assert_array_equal(a, b)
  # Same weight and state trees as trax's stack.
  assert (jax.tree_util.tree_structure(trax_stack.weights)
          == jax.tree_util.tree_structure(w))


def test_backward_replays_saved_sparse_ff_choices(setup):
  """The recomputation uses the choices saved by the forward pass.

  With the forward's own saved choices the backward pass reconstructs the
  inputs and gives the plain gradient; fed other saved choices, the SparseFF's
  weight gradient changes (it would not if the recomputation re-drew them).
  """
  layers, _, w, s, x1, x2, rng, results = setup
  (_, (y1, y2, new_state)), _ = results['ours']
  _, plain_grads = results['plain']
  # Cotangent of the loss sum(y1 sin y2) + sum(y2^2) with respect to y1, y2.
  ct = (jnp.sin(y2), y1 * jnp.cos(y2) + 2 * y2)
  backward = jax.jit(reversible._serial_backward, static_argnums=0)  # pylint: disable=protected-access

  xs, xs_ct, w_ct = backward(tuple(layers), (y1, y2), ct, w, s, new_state, rng)
  _assert_trees_close(xs, (x1, x2))  # inputs reconstructed from outputs
  _assert_trees_close((w_ct,) + tuple(xs_ct), plain_grads)

  # Last SparseFF (layer 2 of the last block): shift its saved choices.
  last = len(layers) - 2
  choice, marker = new_state[last][0][1]
  assert set(marker) == {'running_second_time'}
  other = list(new_state)
  other[last] = (((), ((choice + 1) % 4, marker)),)
  _, _, w_ct_other = backward(tuple(layers), (y1, y2), ct, w, s, tuple(other),
                              rng)
  ff_grad = jax.tree_util.tree_leaves(w_ct[last])
  ff_grad_other = jax.tree_util.tree_leaves(w_ct_other[last])
  assert max(float(jnp.max(jnp.abs(a - b)))
             for a, b in zip(ff_grad, ff_grad_other)) > 1e-3


def test_lsh_attention_half_residuals_match_plain_gradient():
  """Half residuals with LSH attention: ours (terraformer.lsh, whose hashes
  come from a key in its state) and trax's (recomputed through its
  `forward_and_or_backward` with the saved buckets), both with attention
  dropout.  The reversible gradient must equal the ordinary one.  (trax's own
  tl.ReversibleSerial gets terraformer.lsh wrong: its backward runs the
  attention from the state after the forward pass, i.e. other hashes.)"""
  kwargs = dict(n_heads=2, d_qk=4, d_v=4, chunk_len=4, causal=True,
                n_hashes=2, attention_dropout=0.2)
  layers = [
      tl.ReversibleHalfResidual(model_lib.LayerNorm(),
                                attention_layer=lsh.LSHSelfAttention(**kwargs)),
      tl.ReversibleSwap(),
      tl.ReversibleHalfResidual(model_lib.LayerNorm(),
                                attention_layer=tl.LSHSelfAttention(**kwargs)),
      tl.ReversibleSwap(),
  ]
  ours = reversible.ReversibleSerial(*layers)
  plain = reversible.NonReversibleSerial(*layers)
  x1 = np.random.RandomState(0).normal(size=(1, 16, D)).astype(np.float32)
  x2 = x1 + 1.0
  ours.init(shapes.signature((x1, x2)), rng=jax.random.PRNGKey(0))
  w, s = ours.weights, ours.state
  rng = jax.random.PRNGKey(3)
  (loss, _), grads = _loss(ours.pure_fn)(w, x1, x2, s, rng)
  (ref_loss, _), ref_grads = _loss(plain.pure_fn)(w, x1, x2, s, rng)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  assert float(jnp.max(jnp.abs(grads[1]))) > 0.1
  _assert_trees_close(grads, ref_grads)


def test_replay_state_rule():
  choice_old, choice_new = jnp.zeros((3, 2), jnp.int32), jnp.ones((3, 2),
                                                                  jnp.int32)
  old = ((), ((choice_old, {'running_second_time': ()}), ()))
  new = ((), ((choice_new, {'running_second_time': ()}), ()))
  replayed = reversible._replay_state(old, new)  # pylint: disable=protected-access
  assert replayed[1][0][1] == {'running_second_time_yes': ()}
  np.testing.assert_array_equal(replayed[1][0][0], choice_new)
  # Other state is the one from before the forward pass.
  cache_old, cache_new = jnp.zeros(2), jnp.ones(2)
  np.testing.assert_array_equal(
      reversible._replay_state((cache_old,), (cache_new,))[0], cache_old)  # pylint: disable=protected-access


def _temp_bytes(stack_cls, n_blocks):
  """Temporary memory of the compiled gradient of a stack of dense blocks."""
  def ff():
    return tl.Serial(model_lib.LayerNorm(), tl.Dense(4 * D), tl.Relu(),
                     tl.Dense(D))
  layers = []
  for _ in range(n_blocks):
    layers += [tl.ReversibleHalfResidual(ff()), tl.ReversibleSwap()]
  stack = stack_cls(*layers)
  x = jax.ShapeDtypeStruct((4, 512, D), jnp.float32)
  stack.init(shapes.signature((x, x)), rng=jax.random.PRNGKey(0))
  def loss(w, x1, x2):
    y1, y2 = stack.pure_fn((x1, x2), w, stack.state, jax.random.PRNGKey(0))[0]
    return jnp.sum(y1 * y2)
  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
      stack.weights, x, x)
  return lowered.compile().memory_analysis().temp_size_in_bytes


def test_saved_activations_do_not_grow_with_depth():
  """Depth 2 -> 8: the reversible gradient's temporaries stay within 10%
  (one block's activations are ~256 KiB here); the ordinary gradient's grow
  by at least the 6 extra blocks' activations."""
  rev = {n: _temp_bytes(reversible.ReversibleSerial, n) for n in (2, 8)}
  plain = {n: _temp_bytes(reversible.NonReversibleSerial, n) for n in (2, 8)}
  block_activation = 4 * 512 * 4 * D * 4  # one (4, 512, 4D) float32 array
  assert plain[8] - plain[2] > 6 * block_activation, plain
  assert rev[8] <= 1.1 * rev[2], rev


def test_predict_mode_runs_as_ordinary_serial():
  layers = [tl.ReversibleHalfResidual(tl.Dropout(0.5, mode='predict'),
                                      tl.Dense(D)), tl.ReversibleSwap()]
  stack = reversible.ReversibleSerial(*layers)
  x = np.ones((1, 1, D), np.float32)
  stack.init(shapes.signature((x, x)))
  assert reversible._is_predict(stack)  # pylint: disable=protected-access
  y1, y2 = stack((x, x))
  np.testing.assert_array_equal(y1, x)
  d = layers[0].sublayers[0].sublayers[1]  # the Dense
  np.testing.assert_allclose(y2, x + x @ d.weights[0] + d.weights[1],
                             atol=ATOL)


def test_decoder_block_layout_and_errors():
  blocks = reversible.DecoderBlock(lambda: tl.Dense(D), lambda: tl.Dense(D),
                                   n_attention_layers=2)
  assert [type(b).__name__ for b in blocks] == [
      'ReversibleHalfResidual', 'ReversibleSelect'] * 3
  assert [b.name for b in blocks[::2]] == [
      'ReversibleHalfResidualDecoderAttn'] * 2 + [
          'ReversibleHalfResidualDecoderFF']
  with pytest.raises(ValueError, match='n_feedforward_layers'):
    reversible.DecoderBlock(lambda: tl.Dense(D), lambda: tl.Dense(D),
                            n_feedforward_layers=-1)
