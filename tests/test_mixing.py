"""Causal MLP-Mixer and gMLP: the mixing equation, causality, gMLP's init,
predict = eval, length errors, FLOP count, and training through the trainer."""
import jax
import numpy as np
import pytest
import trax
from trax import shapes
from trax.layers import base

from blocks import mixing
from training import model as model_lib
from training import sampling
from training import trainer as trainer_lib

V = 20
CFG = dict(vocab_size=V, d_model=16, d_ff=32, n_layers=2, max_len=12)
# A large SGU init so that tokens visibly mix across positions in gMLP.
MODELS = {'mixer': (mixing.MixerLM, {}),
          'gmlp': (mixing.GatedMLPLM, dict(sgu_init_range=0.3))}


def _ids(batch, length, seed=0):
  return np.random.RandomState(seed).randint(0, V, (batch, length)).astype(np.int32)


def _init(layer, shape, seed=0):
  layer.init(shapes.ShapeDtype(shape, np.float32 if len(shape) == 3 else np.int32),
             rng=jax.random.PRNGKey(seed))
  return layer


def test_position_mix_equation():
  """y[b, t, c] = sum_{s <= t} W[t, s] x[b, s, c] + b[t], W (max_len, max_len)."""
  layer = _init(mixing.CausalPositionMix(8, mode='eval'), (2, 5, 3))
  w, bias = (np.asarray(a) for a in layer.weights)
  # Perturb W's upper triangle: it must not matter.
  layer.weights = (layer.weights[0] + np.triu(np.ones((8, 8)), 1), layer.weights[1] + 0.5)
  x = np.random.RandomState(1).randn(2, 5, 3).astype(np.float32)
  got = np.asarray(layer(x))
  want = np.zeros_like(x)
  for t in range(5):
    for s in range(t + 1):
      want[:, t] += w[t, s] * x[:, s]
    want[:, t] += bias[t] + 0.5
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.all(np.triu(w, 1) == 0)  # initialised lower-triangular
  # Fan-in init: row t has variance 1 / (t + 1).
  big = _init(mixing.CausalPositionMix(256), (1, 4, 1))
  rows = np.asarray(big.weights[0])
  var = [np.mean(rows[t, :t + 1] ** 2) for t in (127, 255)]
  np.testing.assert_allclose(var, [1 / 128, 1 / 256], rtol=0.3)


@pytest.mark.parametrize('name', sorted(MODELS))
@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_changing_a_future_token_changes_no_earlier_output(name, mode):
  fn, extra = MODELS[name]
  model = _init(fn(mode=mode, dropout=0.1, **dict(CFG, n_layers=1), **extra), (2, 10))
  rng = jax.random.PRNGKey(5)  # same dropout masks for every call
  forward = jax.jit(lambda ids: model.pure_fn(ids, model.weights, model.state, rng)[0])
  ids = _ids(2, 10)
  before = np.asarray(forward(ids))
  for k in (0, 4, 9):
    changed = ids.copy()
    changed[:, k] = (changed[:, k] + 7) % V
    after = np.asarray(forward(changed))
    np.testing.assert_array_equal(after[:, :k], before[:, :k])
    diff = np.abs(after - before).max(axis=(0, 2))
    assert diff[k] > 1e-3
    if k < 9:  # later positions see the change through the position mixing
      assert diff[k + 1:].min() > 1e-5, diff


def test_token_mixing_as_attention_layer_of_decoder_lm_is_causal():
  model = _init(model_lib.DecoderLM(V, d_model=16, d_ff=32, n_layers=1, n_heads=2,
                                    max_len=12, mode='eval',
                                    attention_layer=mixing.TokenMixingAttention),
                (1, 8))
  ids = _ids(1, 8)
  changed = ids.copy()
  changed[:, 5] = (changed[:, 5] + 1) % V
  a, b = np.asarray(model(ids)), np.asarray(model(changed))
  np.testing.assert_array_equal(a[:, :5], b[:, :5])
  assert np.abs(a[:, 6:] - b[:, 6:]).min() > 1e-6


def test_gmlp_spatial_gating_unit_is_the_first_half_at_init():
  """SGU([Z1 | Z2]) = Z1 * (W . LN(Z2) + b) with b = 1 and |W| <= 1e-3 / max_len,
  so at initialisation it equals Z1 to about 1e-3 relative."""
  max_len, k = 16, 6
  sgu = _init(mixing.SpatialGatingUnit(max_len), (2, 10, 2 * k))
  z = np.random.RandomState(2).randn(2, 10, 2 * k).astype(np.float32)
  out = np.asarray(sgu(z))
  z1, z2 = z[..., :k], z[..., k:]
  np.testing.assert_allclose(out, z1, rtol=2e-3, atol=1e-6)
  assert not np.array_equal(out, z1)  # the gate is near 1, not exactly 1
  (_, (scale, shift), (w, b), _) = sgu.weights
  w, b = np.asarray(w), np.asarray(b)
  assert np.all(b == 1.0) and np.abs(w).max() <= 1e-3 / max_len
  mean = z2.mean(-1, keepdims=True)
  norm = (z2 - mean) / np.sqrt(z2.var(-1, keepdims=True) + 1e-6) * scale + shift
  gate = np.einsum('ts,bsc->btc', np.tril(w[:10, :10]), norm) + b[:10, None]
  np.testing.assert_allclose(out, z1 * gate, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', sorted(MODELS))
def test_predict_with_prefill_then_tokens_equals_eval(name):
  fn, extra = MODELS[name]
  eval_model = _init(fn(mode='eval', **CFG, **extra), (2, 12), seed=3)
  ids = _ids(2, 12, seed=4)
  want = np.asarray(eval_model(ids))
  predict = fn(mode='predict', **CFG, **extra)
  predict.init(shapes.ShapeDtype((2, 1), np.int32))
  step = jax.jit(predict.pure_fn)
  state, rng, got = predict.state, jax.random.PRNGKey(0), []
  logits, state = step(ids[:, :5], eval_model.weights, state, rng)  # prefill
  got.append(logits)
  for t in range(5, 12):  # up to max_len exactly
    logits, state = step(ids[:, t:t + 1], eval_model.weights, state, rng)
    got.append(logits)
  np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=1e-5, rtol=1e-5)
  # One more token than max_len: the caches are full, the logits say so.
  logits, _ = step(ids[:, :1], eval_model.weights, state, rng)
  assert np.all(np.isnan(np.asarray(logits)))


def test_sampler_greedy_matches_eval_argmax():
  fn, extra = MODELS['gmlp']
  eval_model = _init(fn(mode='eval', **CFG, **extra), (1, 4))
  sampler = sampling.Sampler(fn(mode='predict', **CFG, **extra))
  assert sampler.max_length == CFG['max_len']
  prompt = np.array([[1, 2, 3]], np.int32)
  got = sampler.generate(eval_model.weights, prompt, 6, temperature=0.0)
  # Greedy: token i is the eval-mode argmax after all tokens before it (one
  # eval call on the whole sequence suffices: the model is causal).
  seq = np.concatenate([prompt, got], axis=1).astype(np.int32)
  argmax = np.argmax(np.asarray(eval_model(seq)), -1)
  np.testing.assert_array_equal(got, argmax[:, 2:8])


@pytest.mark.parametrize('name', sorted(MODELS))
def test_sequence_longer_than_max_len_fails_naming_both_lengths(name):
  fn, _ = MODELS[name]
  # trax reports a layer's ValueError as a LayerError ending in its message.
  errors = (ValueError, base.LayerError)
  with pytest.raises(errors, match='length 13 exceeds max_len 12'):
    _init(fn(mode='train', **CFG), (2, 13))        # at build time
  model = _init(fn(mode='eval', **CFG), (2, 8))
  with pytest.raises(errors, match='length 20 exceeds max_len 12'):
    model(_ids(2, 20))                              # at the first call


@pytest.mark.parametrize('kwargs, words', [
    (dict(mode='decode'), 'mode must be one of'),
    (dict(max_len=0), 'max_len must be a positive integer'),
    (dict(d_model=2.5), 'd_model must be a positive integer'),
])
def test_bad_arguments_fail_at_build_time(kwargs, words):
  args = dict(CFG, mode='train')
  args.update(kwargs)
  for fn in (mixing.MixerLM, mixing.GatedMLPLM):
    with pytest.raises(ValueError, match=words):
      fn(**args)
  with pytest.raises(ValueError, match=r'd_ff \(33\) must be even'):
    mixing.GatedMLPLM(**dict(CFG, d_ff=33))


def test_flop_count_sees_mixing_as_length_times_width():
  """6 * (dense matmul weights + per mixing layer length * width) per token."""
  model = _init(mixing.GatedMLPLM(V, d_model=16, d_ff=32, n_layers=1, max_len=64),
                (2, 10))
  dense = 16 * 32 + 16 * 16 + 16 * V          # U, V and the output layer
  want = 6 * (dense + 10 * 16)                # SGU: length 10 x 16 channels
  assert trainer_lib.train_flops_per_token(model, 10) == want


@pytest.mark.parametrize('name', sorted(MODELS))
def test_tiny_model_trains_through_the_trainer(name):
  fn, _ = MODELS[name]
  model = fn(mode='train', **dict(CFG, n_layers=1))
  opt = trax.optimizers.Adam(weight_decay_rate=0.0)
  state = trainer_lib.init_train_state(model, opt, (4, 12), seed=0)
  step = trainer_lib.make_train_step(model, opt, lambda s: 1e-2)
  x = _ids(4, 13, seed=7)
  batch = x[:, :-1], x[:, 1:], np.ones((4, 12), np.float32)
  losses = []
  for i in range(10):
    state, metrics = step(state, i, batch, jax.random.PRNGKey(0), 0.0)
    losses.append(float(metrics['loss']))
  assert losses[-1] < losses[0] - 1.0, losses
