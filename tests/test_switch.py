"""SwitchFF against the Switch Transformer's equations, and the trainer's aux-loss hook.

  p = softmax(x W_r) (float32), i* = argmax p, g = p_{i*}
  C = max(min_capacity, floor(capacity_factor * T / N)); a token is kept if
      fewer than C earlier tokens chose its expert; dropped tokens output 0
  y = g * (act(x W1_{i*} + b1_{i*}) W2_{i*} + b2_{i*})
  aux = 0.01 * N * sum_i f_i P_i,  f_i = mean 1{i* = i},  P_i = mean p_i
"""
import functools

import gin
import jax
from jax import numpy as jnp
import numpy as np
import pytest
import trax
from trax import layers as tl
from trax import shapes

from blocks import switch as S
from training import model as model_lib
from training import trainer as T

RNG = jax.random.PRNGKey(0)


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _reference(x, weights, capacity, act=lambda h: np.maximum(h, 0)):
  """Token-by-token loop: (T, d) -> (T, d) outputs, choices, kept flags, aux."""
  router, w1, b1, w2, b2 = [np.asarray(w, np.float64) for w in weights]
  x = np.asarray(x, np.float64)
  probs = _softmax(x @ router)
  n_experts = router.shape[1]
  used = [0] * n_experts
  out, choice, kept = np.zeros_like(x), [], []
  for t, xt in enumerate(x):
    e = int(np.argmax(probs[t]))
    choice.append(e)
    kept.append(used[e] < capacity)
    used[e] += 1
    if kept[-1]:
      out[t] = probs[t, e] * (act(xt @ w1[e] + b1[e]) @ w2[e] + b2[e])
  f = np.bincount(choice, minlength=n_experts) / len(x)
  aux = 0.01 * n_experts * np.sum(f * probs.mean(0))
  return out, choice, kept, aux


def _layer(mode='eval', **kw):
  kw = dict(dict(n_experts=2, eval_capacity_factor=0.8, min_capacity=1,
                 jitter=0.0), **kw)
  return S.SwitchFF(2, 3, tl.Relu, 0.0, mode, **kw)


# Hand-made: the router sends x to expert 0 when x[0] > 0, else expert 1.
X = np.array([[1., 0.], [2., 0.], [-1., 0.], [3., 0.], [-2., 0.]], np.float32)
ROUTER = np.array([[1., -1.], [0., 0.]], np.float32)


def test_capacity_equation():
  assert S.expert_capacity(16, 4, 1.25, min_capacity=1) == 5
  assert S.expert_capacity(10, 4, 1.0, min_capacity=1) == 2     # floor(2.5)
  assert S.expert_capacity(10, 4, 1.0) == 4                     # min_capacity 4
  assert S.expert_capacity(3, 1, 2.0, min_capacity=1) == 3      # at most T
  assert _layer().capacity(5) == 2                             # floor(0.8 * 5 / 2)
  assert _layer(mode='predict').capacity(5) == 5               # decoding drops none


def test_routing_and_overflow_on_hand_made_tokens():
  """Tokens 0,1,3 choose expert 0, tokens 2,4 expert 1; at C = 2 token 3 overflows."""
  r = jax.device_get(S.route(jnp.asarray(X), jnp.asarray(ROUTER), capacity=2))
  np.testing.assert_array_equal(r['expert'], [0, 0, 1, 0, 1])
  np.testing.assert_array_equal(r['position'], [0, 1, 0, 2, 1])
  np.testing.assert_array_equal(r['keep'], [True, True, True, False, True])
  # logits (x0, -x0): p_{i*} = sigmoid(2 |x0|)
  np.testing.assert_allclose(r['gate'], 1 / (1 + np.exp(-2 * np.abs(X[:, 0]))),
                             rtol=1e-6)
  r3 = jax.device_get(S.route(jnp.asarray(X), jnp.asarray(ROUTER), capacity=3))
  assert r3['keep'].all()


def _hand_weights():
  rng = np.random.default_rng(0)
  return (ROUTER, rng.normal(size=(2, 2, 3)).astype(np.float32),
          rng.normal(size=(2, 3)).astype(np.float32),
          rng.normal(size=(2, 3, 2)).astype(np.float32),
          rng.normal(size=(2, 2)).astype(np.float32))


def test_layer_output_and_aux_loss_on_hand_made_tokens():
  """Dropped token 3 outputs 0; kept ones g * E(x); aux = 0.01 * 2 * (3/5 P_0 + 2/5 P_1)."""
  layer = _layer()
  x = jnp.asarray(X)[None]
  layer.init(shapes.signature(x))
  weights = tuple(jnp.asarray(w) for w in _hand_weights())
  y, state = layer.pure_fn(x, weights, layer.state, RNG)
  want, choice, kept, _ = _reference(X, weights, capacity=2)
  assert choice == [0, 0, 1, 0, 1] and kept == [True, True, True, False, True]
  np.testing.assert_allclose(y[0], want, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(y[0, 3]) == 0)
  p0 = np.mean(1 / (1 + np.exp(-2 * X[:, 0])))   # mean probability of expert 0
  aux = 0.01 * 2 * (3 / 5 * p0 + 2 / 5 * (1 - p0))
  np.testing.assert_allclose(state['aux_loss'], aux, rtol=1e-6)
  np.testing.assert_allclose(state['dropped_fraction'], 1 / 5, rtol=1e-6)


def test_aux_loss_is_alpha_at_uniform_routing_and_n_alpha_when_collapsed():
  n = 4
  # Each expert chosen by 2 of 8 tokens, mean probability 1/4 each.
  probs = np.full((8, n), 0.1, np.float32)
  for t in range(8):
    probs[t, t % n] = 0.7
  onehot = np.eye(n, dtype=np.float32)[np.arange(8) % n]
  np.testing.assert_allclose(S.load_balancing_loss(probs, onehot), 0.01, rtol=1e-6)
  collapsed = np.eye(n, dtype=np.float32)[np.zeros(8, int)]
  np.testing.assert_allclose(S.load_balancing_loss(collapsed, collapsed), 0.01 * n,
                             rtol=1e-6)


def test_random_tokens_match_the_token_loop_with_overflow():
  """32 random tokens, 4 experts, capacity factor 1: the dispatch matches the loop."""
  layer = S.SwitchFF(8, 16, tl.Relu, 0.0, 'eval', n_experts=4,
                     eval_capacity_factor=1.0, min_capacity=1)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 8))
  layer.init(shapes.signature(x), rng=jax.random.PRNGKey(2))
  weights = tuple(w * 10 if w.ndim == 3 else w + 0.1 for w in layer.weights)
  y, state = layer.pure_fn(x, weights, layer.state, RNG)
  want, _, kept, aux = _reference(np.asarray(x).reshape(32, 8), weights, capacity=8)
  assert 0 < sum(not k for k in kept) < 32  # some tokens overflow
  np.testing.assert_allclose(np.asarray(y).reshape(32, 8), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(state['aux_loss'], aux, rtol=1e-5)


def test_one_expert_without_overflow_is_the_dense_feed_forward():
  layer = S.SwitchFF(8, 16, tl.Gelu, 0.0, 'eval', n_experts=1, eval_capacity_factor=1.0)
  dense = model_lib.FeedForward(8, 16, tl.Gelu, 0.0, 'eval')
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 8))
  layer.init(shapes.signature(x))
  dense.init(shapes.signature(x))
  _, w1, b1, w2, b2 = layer.weights
  dense_weights = list(dense.weights)
  dense_weights[0], dense_weights[-1] = (w1[0], b1[0]), (w2[0], b2[0])
  want = dense(x, weights=tuple(dense_weights))
  np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-6)


def test_router_is_float32_under_bfloat16():
  """bfloat16 in and out; routing and aux loss as float32 arithmetic on those values."""
  layer = S.SwitchFF(8, 16, tl.Relu, 0.0, 'eval', n_experts=4,
                     eval_capacity_factor=4.0, min_capacity=1)
  x = jax.random.normal(jax.random.PRNGKey(4), (1, 24, 8)).astype(jnp.bfloat16)
  layer.init(shapes.signature(x))
  weights = T.cast_floats(layer.weights, jnp.bfloat16)
  y, state = layer.pure_fn(x, weights, layer.state, RNG)
  assert y.dtype == jnp.bfloat16 and state['aux_loss'].dtype == jnp.float32
  x32 = np.asarray(x.astype(jnp.float32))[0]
  _, _, _, aux = _reference(x32, T.cast_floats(weights, jnp.float32), 24)
  np.testing.assert_allclose(state['aux_loss'], aux, rtol=1e-5)


def test_initialisation_is_truncated_normal_at_scale_point_one():
  layer = S.SwitchFF(256, 512, n_experts=2)
  layer.init(shapes.ShapeDtype((1, 4, 256)), rng=jax.random.PRNGKey(5))
  router, w1, b1, w2, b2 = layer.weights
  for w, fan_in in ((router, 256), (w1, 256), (w2, 512)):
    std = np.sqrt(0.1 / fan_in)
    np.testing.assert_allclose(np.std(w), std, rtol=0.05)
    assert np.abs(w).max() <= 2 * std / S._TRUNCATED_STD + 1e-6
  assert not np.any(b1) and not np.any(b2)
  assert w1.shape == (2, 256, 512)
  half = S.SwitchFF(256, 512, n_experts=2, expert_width='params')
  half.init(shapes.ShapeDtype((1, 4, 256)))
  assert half.weights[1].shape == (2, 256, 256)
  assert layer.matmul_params() == 256 * 2 + 2 * 256 * 512


def test_train_mode_jitter_and_expert_dropout():
  x = jax.random.normal(jax.random.PRNGKey(6), (1, 8, 8))
  kw = dict(n_experts=2, capacity_factor=2.0, eval_capacity_factor=2.0)
  ev = S.SwitchFF(8, 16, tl.Relu, 0.0, 'eval', **kw)
  ev.init(shapes.signature(x))
  plain = S.SwitchFF(8, 16, tl.Relu, 0.0, 'train', jitter=0.0, **kw)
  plain.init(shapes.signature(x))
  y_eval = ev(x)
  np.testing.assert_allclose(plain(x, weights=ev.weights, rng=RNG), y_eval, rtol=1e-6)
  drop = S.SwitchFF(8, 16, tl.Relu, 0.0, 'train', jitter=0.0, expert_dropout=0.4, **kw)
  drop.init(shapes.signature(x))
  assert np.abs(drop(x, weights=ev.weights, rng=RNG) - y_eval).max() > 1e-3


@pytest.mark.parametrize('kwargs, match', [
    (dict(capacity_factor=0.0), 'capacity_factor must be positive'),
    (dict(eval_capacity_factor=-1.0), 'eval_capacity_factor must be positive'),
    (dict(n_experts=0), 'n_experts must be an integer >= 1'),
    (dict(n_experts=4, expert_width='params'), r'splits d_ff \(30\) over n_experts \(4\)'),
    (dict(expert_width='half'), 'expert_width must be one of'),
    (dict(expert_dropout=1.5), 'expert_dropout must be in'),
])
def test_bad_arguments_fail_at_build_time(kwargs, match):
  with pytest.raises(ValueError, match=match):
    S.SwitchFF(8, 30, **kwargs)


SIZE = dict(d_model=16, d_ff=32, n_layers=2, n_heads=2, max_len=16)


def test_decoder_lm_with_switch_predict_equals_eval():
  """gin's ff_layer switch builds it; decoding token by token equals eval (no drops)."""
  gin.clear_config()
  gin.parse_config(['import blocks.switch',
                    'DecoderLM.ff_layer = @blocks.SwitchFF',
                    'blocks.SwitchFF.n_experts = 4',
                    'blocks.SwitchFF.eval_capacity_factor = 4.0'])
  try:
    ids = jax.random.randint(jax.random.PRNGKey(7), (2, 6), 0, 30)
    model = model_lib.DecoderLM(30, mode='eval', **SIZE)
    assert str(model).count('SwitchFF_e4') == 2
    model.init(shapes.signature(ids), rng=RNG)
    want = model(ids)
    pred = model_lib.DecoderLM(30, mode='predict', **SIZE)
    pred.init(shapes.ShapeDtype((2, 1), np.int32))
  finally:
    gin.clear_config()
  state, outs = pred.state, []
  for t in range(6):
    out, state = pred.pure_fn(ids[:, t:t + 1], model.weights, state, RNG)
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, 1), want, atol=1e-5)


def _switch_lm():
  ff = functools.partial(S.SwitchFF, n_experts=4, jitter=0.0)
  return model_lib.DecoderLM(30, ff_layer=ff, **dict(SIZE, n_layers=1))


def test_trainer_objective_is_lm_loss_plus_aux_losses():
  """SGD at lr 1: the update is -grad(CE + sum of the layers' aux losses)."""
  model = _switch_lm()
  opt = trax.optimizers.SGD()
  state = T.init_train_state(model, opt, (2, 8), seed=0)
  assert len(T.aux_losses(state.state)) == 1
  ids = np.random.default_rng(0).integers(0, 30, (2, 9)).astype(np.int32)
  batch = (ids[:, :-1], ids[:, 1:], np.ones((2, 8), np.float32))
  rng = jax.random.fold_in(jax.random.PRNGKey(0), 0)

  def parts(weights):
    logits, new_state = model.pure_fn(batch[0], weights, state.state, rng)
    loss_sum, weight_sum = T.cross_entropy(logits, batch[1], batch[2])
    return loss_sum / weight_sum, sum(T.aux_losses(new_state))

  w0 = jax.device_get(state.weights)
  lm, aux = jax.jit(parts)(w0)
  grads = jax.jit(jax.grad(lambda w: sum(parts(w))))(w0)
  lm_grads = jax.jit(jax.grad(lambda w: parts(w)[0]))(w0)
  step = T.make_train_step(model, opt, lambda s: 1.0)
  state, m = step(state, 0, batch, jax.random.PRNGKey(0), 0.0)
  np.testing.assert_allclose(m['loss'], lm, rtol=1e-5)
  np.testing.assert_allclose(m['aux_loss'], aux, rtol=1e-5)
  np.testing.assert_allclose(m['gradients_l2'], T.global_norm(grads), rtol=1e-4)
  assert abs(float(T.global_norm(grads)) - float(T.global_norm(lm_grads))) > 1e-6
  for new, old, g in zip(jax.tree_util.tree_leaves(state.weights),
                         jax.tree_util.tree_leaves(w0), jax.tree_util.tree_leaves(grads)):
    np.testing.assert_allclose(new, old - g, rtol=1e-4, atol=1e-6)


def test_models_without_aux_losses_report_none():
  model = model_lib.DecoderLM(30, **SIZE)
  opt = trax.optimizers.SGD()
  state = T.init_train_state(model, opt, (2, 8), seed=0)
  assert T.aux_losses(state.state) == []
  ids = np.zeros((2, 8), np.int32)
  step = T.make_train_step(model, opt, lambda s: 0.1)
  _, m = jax.eval_shape(step, state, 0, (ids, ids, np.ones((2, 8), np.float32)),
                        RNG, 0.0)  # traced, not compiled
  assert 'aux_loss' not in m and 'loss' in m
