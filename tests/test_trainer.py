"""The jitted step: loss equation, learning, mixed precision, clipping, FLOPs."""
import jax
from jax import numpy as jnp
import numpy as np
import pytest
import trax
from trax.supervised import lr_schedules

from training import model as model_lib
from training import trainer as T

B, L, V = 4, 16, 32


def _setup(dtype=None, clip=None, schedule=lambda s: 3e-3):
  model = model_lib.DecoderLM(V, d_model=32, d_ff=64, n_layers=2, n_heads=2, max_len=L)
  opt = trax.optimizers.Adam(weight_decay_rate=0.0)
  state = T.init_train_state(model, opt, (B, L), seed=0)
  return model, T.make_train_step(model, opt, schedule, dtype, clip), state


def _batch(seed=0):
  x = np.random.default_rng(seed).integers(0, V, (B, L + 1)).astype(np.int32)
  return x[:, :-1], x[:, 1:], np.ones((B, L), np.float32)


def test_cross_entropy_equation():
  """loss_sum = sum_i w_i * (logsumexp(z_i) - z_i[y_i]); correct counts argmax hits."""
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5))
  targets = jnp.array([[0, 1, 2], [3, 4, 0]])
  weights = jnp.array([[1., 1., 0.], [1., 0., 1.]])
  loss, wsum = T.cross_entropy(logits, targets, weights)
  correct = T.accuracy_sum(logits, targets, weights)
  z = np.asarray(logits)
  want = 0.0
  hits = 0
  for b in range(2):
    for t in range(3):
      lse = np.log(np.exp(z[b, t]).sum())
      want += weights[b, t] * (lse - z[b, t, targets[b, t]])
      hits += weights[b, t] * (z[b, t].argmax() == targets[b, t])
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert float(wsum) == 4.0 and float(correct) == hits


def test_training_lowers_the_loss():
  _, step, state = _setup()
  batch = _batch()
  losses = []
  for i in range(30):
    state, m = step(state, i, batch, jax.random.PRNGKey(i), 0.0)
    losses.append(float(m['loss']))
  assert losses[-1] < losses[0] - 1.0


def test_bfloat16_compute_keeps_float32_master_weights():
  _, step32, s32 = _setup()
  _, step16, s16 = _setup(dtype=jnp.bfloat16)
  batch = _batch()
  s32, m32 = step32(s32, 0, batch, jax.random.PRNGKey(0), 0.0)
  s16, m16 = step16(s16, 0, batch, jax.random.PRNGKey(0), 0.0)
  dtypes = {w.dtype for w in jax.tree_util.tree_leaves(s16.weights)}
  assert dtypes == {jnp.dtype('float32')}
  np.testing.assert_allclose(m16['loss'], m32['loss'], rtol=2e-2)
  assert float(m16['loss']) != float(m32['loss'])  # really computed in bf16


def test_clip_by_global_norm():
  grads = {'a': jnp.full((3,), 2.0), 'b': jnp.full((4,), 2.0)}  # norm = 2 * sqrt(7)
  clipped = T.clip_by_global_norm(grads, 1.0)
  norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree_util.tree_leaves(clipped)))
  np.testing.assert_allclose(norm, 1.0, rtol=1e-6)
  same = T.clip_by_global_norm(grads, 100.0)
  np.testing.assert_allclose(same['a'], grads['a'])


def test_clipping_limits_the_update():
  """With SGD at lr 1 the step moves the weights by exactly the clipped norm."""
  model = model_lib.DecoderLM(V, d_model=32, d_ff=64, n_layers=2, n_heads=2, max_len=L)
  opt = trax.optimizers.SGD()
  state = T.init_train_state(model, opt, (B, L), seed=0)
  step = T.make_train_step(model, opt, lambda s: 1.0, None, 1e-3)
  w0 = jax.device_get(state.weights)
  state, m = step(state, 0, _batch(), jax.random.PRNGKey(0), 0.0)
  moved = np.sqrt(sum(np.sum((np.asarray(a) - np.asarray(b)) ** 2) for a, b in zip(
      jax.tree_util.tree_leaves(w0), jax.tree_util.tree_leaves(state.weights))))
  np.testing.assert_allclose(moved, 1e-3, rtol=1e-3)
  assert float(m['gradients_l2']) > 1e-2  # reported before clipping


def test_optimizer_update_equals_trax_tree_update():
  """apply_optimizer gives exactly the weights and slots of trax's tree_update."""
  model, _, state = _setup()
  opt = trax.optimizers.Adam(learning_rate=1e-2)
  slots, params = opt.tree_init(state.weights)
  grads = jax.tree_util.tree_map(lambda w: jnp.sin(w) + 0.1, state.weights)
  want_w, want_s, _ = opt.tree_update(3, grads, state.weights, slots, params,
                                      store_slots=False)
  got_w, got_s = T.apply_optimizer(opt, 3, grads, state.weights, slots, params)
  for a, b in zip(jax.tree_util.tree_leaves((want_w, want_s)),
                  jax.tree_util.tree_leaves((got_w, got_s))):
    np.testing.assert_array_equal(a, b)


def test_learning_rate_paths():
  """trax's multifactor can't be traced (it branches in Python): host path; lambdas trace."""
  schedule = lr_schedules.multifactor(factors='constant * linear_warmup',
                                      constant=0.5, warmup_steps=10)
  assert not T.schedule_is_traceable(schedule)
  assert T.schedule_is_traceable(lambda s: 0.1 * s)
  assert T.host_learning_rate(schedule, 4) == np.float32(0.2)
  _, step, state = _setup(schedule=schedule)
  state, m = step(state, 4, _batch(), jax.random.PRNGKey(0),
                  T.host_learning_rate(schedule, 4))
  np.testing.assert_allclose(m['learning_rate'], 0.2, rtol=1e-6)


def test_flops_per_token():
  """6 * (matmul weights incl. head, excl. embedding) + 6 * layers * d_model * seq."""
  model, _, _ = _setup()
  d, f, n = 32, 64, 2
  per_layer = d * 3 * d + d * d + d * f + f * d
  want = 6 * (n * per_layer + d * V) + 6 * n * d * L
  assert T.train_flops_per_token(model, L) == want
  assert T.device_peak_flops() is None  # CPU: no known peak


def test_eval_step_matches_train_loss():
  model, step, state = _setup()
  eval_model = model_lib.DecoderLM(V, d_model=32, d_ff=64, n_layers=2, n_heads=2,
                                   max_len=L, mode='eval')
  eval_model.init(trax.shapes.ShapeDtype((B, L), np.int32))
  batch = _batch()
  loss_sum, wsum, _ = T.make_eval_step(eval_model)(state.weights, state.state, batch)
  _, m = step(state, 0, batch, jax.random.PRNGKey(0), 0.0)
  np.testing.assert_allclose(loss_sum / wsum, m['loss'], rtol=1e-5)


@pytest.mark.parametrize('make_opt', [
    lambda: trax.optimizers.Adam(weight_decay_rate=0.0),
    lambda: trax.optimizers.Adafactor(),
    lambda: trax.optimizers.SM3(momentum=0.9),
], ids=['adam', 'adafactor', 'sm3'])
def test_trax_optimizers_train(make_opt):
  """Adam, Adafactor and SM3 (trax's) all run in the jitted step and learn."""
  model = model_lib.DecoderLM(V, d_model=32, d_ff=64, n_layers=2, n_heads=2, max_len=L)
  opt = make_opt()
  state = T.init_train_state(model, opt, (B, L), seed=0)
  step = T.make_train_step(model, opt, lambda s: 0.01)
  batch = _batch()
  losses = []
  for i in range(20):
    state, m = step(state, i, batch, jax.random.PRNGKey(0), 0.0)
    losses.append(float(m['loss']))
  assert losses[-1] < losses[0] - 0.5
