"""pos_type 'shared-offset' of ConfigurableTerraformer (SharedOffsetPositions)."""

import jax
from jax import numpy as jnp
import numpy as np
import pytest
from trax import layers as tl
from trax import shapes

from terraformer import terraformer


def test_sinusoids_equal_trax_positional_encoding_table():
  """Our formula gives the table trax's PositionalEncoding starts from."""
  layer = tl.PositionalEncoding(max_len=40, mode='eval')
  x = np.zeros((1, 40, 24), np.float32)
  layer.init(shapes.signature(x))
  np.testing.assert_allclose(np.asarray(layer(x))[0],
                             np.asarray(terraformer.sinusoids(jnp.arange(40), 24)),
                             atol=1e-6)


def _run(layer, l1, l2, b=64, rng=0):
  e = np.zeros((b, l1, 8), np.float32)
  d = np.zeros((b, l2, 8), np.float32)
  layer.init((shapes.signature(e), shapes.signature(d)))
  (out_e, out_d), _ = layer.pure_fn((e, d), layer.weights, layer.state,
                                    jax.random.PRNGKey(rng))
  return np.asarray(out_e), np.asarray(out_d)


def _starts(out, d=8, max_pos=64):
  """Start position of each row, found by matching its first encoding."""
  table = np.asarray(terraformer.sinusoids(jnp.arange(max_pos), d))
  dist = ((out[:, 0, None, :] - table[None]) ** 2).sum(-1)
  return dist.argmin(1)


def test_train_offsets_are_shared_by_inputs_and_targets_and_vary():
  layer = terraformer.SharedOffsetPositions(64, max_offset=20,
                                            start_from_zero_prob=0.25)
  out_e, out_d = _run(layer, 10, 6)
  np.testing.assert_allclose(out_e[:, :6], out_d, atol=1e-6)  # same positions
  starts = _starts(out_e)
  assert starts.min() == 0 and starts.max() <= 20
  assert len(set(starts.tolist())) > 8                       # rows differ
  # Every row is consecutive positions from its start.
  table = np.asarray(terraformer.sinusoids(jnp.arange(64), 8))
  for row, s in zip(out_e, starts):
    np.testing.assert_allclose(row, table[s:s + 10], atol=1e-5)


def test_eval_starts_at_zero_and_predict_continues():
  table = np.asarray(terraformer.sinusoids(jnp.arange(64), 8))
  out_e, out_d = _run(terraformer.SharedOffsetPositions(64, 20, mode='eval'),
                      5, 3)
  np.testing.assert_allclose(out_e, np.broadcast_to(table[:5], out_e.shape),
                             atol=1e-6)
  np.testing.assert_allclose(out_d, np.broadcast_to(table[:3], out_d.shape),
                             atol=1e-6)
  layer = terraformer.SharedOffsetPositions(64, 20, mode='predict')
  e, d = np.zeros((2, 5, 8), np.float32), np.zeros((2, 1, 8), np.float32)
  layer.init((shapes.signature(e), shapes.signature(d)))
  state = layer.state
  for i in range(3):
    (_, out), state = layer.pure_fn((e, d), layer.weights, state,
                                    jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(out)[:, 0],
                               np.broadcast_to(table[i], (2, 8)), atol=1e-6)


def test_bad_offsets_are_refused():
  with pytest.raises(ValueError, match='pos_max_offset_to_add'):
    terraformer.SharedOffsetPositions(32, max_offset=32)
  with pytest.raises(ValueError, match='pos_start_from_zero_prob'):
    terraformer.SharedOffsetPositions(32, 4, start_from_zero_prob=1.5)
  with pytest.raises(Exception, match='exceeds max_len'):  # in a LayerError
    _run(terraformer.SharedOffsetPositions(32, max_offset=20), 16, 16)
  with pytest.raises(ValueError, match='pos_type'):
    terraformer.ReversibleTerraformerLM(vocab_size=8, pos_type='shared-offset')


def test_model_predict_equals_eval_with_shared_offset_positions():
  args = dict(input_vocab_size=9, d_model=16, d_ff=32, n_heads=2,
              n_encoder_layers=1, n_decoder_layers=1, dropout=0.0, max_len=16,
              pos_type='shared-offset', pos_max_offset_to_add=8,
              pos_start_from_zero_prob=0.0, n_decoder_attention_layers=1)
  inputs = np.array([[3, 5, 7, 2, 1]], np.int32)
  targets = np.array([[2, 6, 1, 4]], np.int32)
  sig = (shapes.ShapeDtype((1, 5), jnp.int32), shapes.ShapeDtype((1, 4), jnp.int32))
  model = terraformer.ConfigurableTerraformer(mode='eval', **args)
  weights, state = model.init(sig, rng=jax.random.PRNGKey(1))
  expected = np.asarray(model.pure_fn((inputs, targets), weights, state,
                                      jax.random.PRNGKey(0))[0])
  train = terraformer.ConfigurableTerraformer(mode='train', **args)
  train.init(sig, rng=jax.random.PRNGKey(1))
  diffs = [np.abs(np.asarray(train.pure_fn((inputs, targets), weights, train.state,
                                           jax.random.PRNGKey(r))[0]) - expected).max()
           for r in range(4)]
  assert max(diffs) > 1e-3   # random offsets change training outputs
  predict = terraformer.ConfigurableTerraformer(mode='predict', **args)
  _, pstate = predict.init((sig[0], shapes.ShapeDtype((1, 1), jnp.int32)))
  shifted = np.concatenate([[[0]], targets[:, :-1]], 1).astype(np.int32)
  for i in range(4):
    logits, pstate = predict.pure_fn((inputs, shifted[:, i:i + 1]), weights,
                                     pstate, jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(logits)[:, 0], expected[:, i],
                               atol=1e-5, rtol=1e-5)
