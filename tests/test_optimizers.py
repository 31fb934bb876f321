"""SM3 with momentum and adaptive gradient clipping, against their equations."""
import gin
import jax
import numpy as np
import pytest
import trax
from trax import layers as tl

from primer_trax import variants
from training import model as model_lib
from training import optimizers
from training import trainer as trainer_lib

LR, BETA = 0.5, 0.9


def _params(opt, lr=LR):
  return dict(opt.opt_params, learning_rate=np.float32(lr))


def _steps(opt, w, grads):
  """Applies `opt.update` for each gradient in turn; returns [(w, slots)]."""
  slots, out = opt.init(w), []
  for i, g in enumerate(grads):
    w, slots = opt.update(i, np.asarray(g, np.float32), w, slots, _params(opt))
    out.append((np.asarray(w), slots))
  return out


def test_sm3_vector_two_steps_by_hand():
  """Rank 1 (diagonal AdaGrad): A = acc + g^2; gt = g / sqrt(A) (0 where A = 0);
  m = 0.9 m + 0.1 gt; w -= lr m.

  Step 1, g = (3, 4, 0): A = (9, 16, 0), gt = (1, 1, 0), m = (.1, .1, 0).
  Step 2, g = (0, 3, 0): A = (9, 25, 0), gt = (0, .6, 0),
          m = (.09, .09 + .06, 0) = (.09, .15, 0).
  """
  w0 = np.array([1.0, 2.0, 3.0], np.float32)
  (w1, s1), (w2, s2) = _steps(optimizers.SM3(momentum=BETA), w0,
                              [[3, 4, 0], [0, 3, 0]])
  np.testing.assert_allclose(s1[0], [0.1, 0.1, 0.0], rtol=1e-6)
  np.testing.assert_allclose(w1, w0 - LR * np.array([0.1, 0.1, 0.0]), rtol=1e-6)
  np.testing.assert_allclose(s2[1][0], [9.0, 25.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(s2[0], [0.09, 0.15, 0.0], rtol=1e-6)
  np.testing.assert_allclose(w2, w1 - LR * np.array([0.09, 0.15, 0.0]), rtol=1e-6)


def test_sm3_matrix_two_steps_by_hand():
  """Rank 2: row and column accumulators r, c.
  A[i, j] = min(r[i], c[j]) + g[i, j]^2; r[i] = max_j A; c[j] = max_i A.

  Step 1, g = [[1, 2], [2, 0]]: A = [[1, 4], [4, 0]], gt = [[1, 1], [1, 0]],
          r = c = (4, 4), m = 0.1 gt.
  Step 2, g = [[2, 0], [0, 3]]: min(r, c) = 4 everywhere, A = [[8, 4], [4, 13]],
          gt = [[2 / sqrt 8, 0], [0, 3 / sqrt 13]], r = c = (8, 13),
          m = 0.9 * 0.1 * [[1, 1], [1, 0]] + 0.1 gt.
  """
  w0 = np.arange(4, dtype=np.float32).reshape(2, 2)
  (w1, s1), (w2, s2) = _steps(optimizers.SM3(momentum=BETA), w0,
                              [[[1, 2], [2, 0]], [[2, 0], [0, 3]]])
  np.testing.assert_allclose(s1[1][0], [4, 4]); np.testing.assert_allclose(s1[1][1], [4, 4])
  np.testing.assert_allclose(w1, w0 - LR * 0.1 * np.array([[1, 1], [1, 0]]), rtol=1e-6)
  m2 = np.array([[0.09 + 0.1 * 2 / np.sqrt(8), 0.09],
                 [0.09, 0.1 * 3 / np.sqrt(13)]])
  np.testing.assert_allclose(s2[0], m2, rtol=1e-6)
  np.testing.assert_allclose(s2[1][0], [8, 13]); np.testing.assert_allclose(s2[1][1], [8, 13])
  np.testing.assert_allclose(w2, w1 - LR * m2, rtol=1e-6)


def _sm3_reference(w, grads, beta, lr):
  """SM3-II with EMA momentum, entry by entry, for a rank-3 tensor."""
  accs = [np.zeros(n) for n in w.shape]
  m, w = np.zeros_like(w), w.copy()
  for g in grads:
    a = np.zeros_like(w)
    for i, j, k in np.ndindex(*w.shape):
      a[i, j, k] = min(accs[0][i], accs[1][j], accs[2][k]) + g[i, j, k] ** 2
    gt = np.where(a > 0, g / np.sqrt(np.where(a > 0, a, 1)), 0)
    accs = [a.max(axis=(1, 2)), a.max(axis=(0, 2)), a.max(axis=(0, 1))]
    m = beta * m + (1 - beta) * gt
    w = w - lr * m
  return w, m, accs


def test_sm3_rank3_three_steps_against_entrywise_equations():
  rng = np.random.RandomState(0)
  w0 = rng.randn(2, 3, 4).astype(np.float32)
  grads = rng.randn(3, 2, 3, 4).astype(np.float32)
  grads[1, 0] = 0.0  # a step in which some entries get no gradient
  w, (m, accs) = _steps(optimizers.SM3(momentum=BETA), w0, grads)[-1]
  want_w, want_m, want_accs = _sm3_reference(w0, grads, BETA, LR)
  np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m, want_m, rtol=1e-5, atol=1e-6)
  for got, want in zip(accs, want_accs):
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize('shape', [(5,), (3, 4), (2, 3, 4)])
def test_sm3_equals_trax_sm3_where_trax_works(shape):
  """trax's SM3 (EMA momentum) gives the same weights over 3 steps."""
  rng = np.random.RandomState(1)
  w = rng.randn(*shape).astype(np.float32)
  grads = rng.randn(3, *shape).astype(np.float32)
  ours, theirs = optimizers.SM3(momentum=BETA), trax.optimizers.SM3(momentum=BETA)
  w_ours, w_theirs = w, w
  s_ours, s_theirs = ours.init(w), theirs.init(w)
  update_theirs = jax.jit(theirs.update)  # jit: trax writes into its slot lists
  for i, g in enumerate(grads):
    w_ours, s_ours = ours.update(i, g, w_ours, s_ours, _params(ours))
    w_theirs, s_theirs = update_theirs(i, g, w_theirs, s_theirs, _params(theirs))
  np.testing.assert_allclose(w_ours, w_theirs, rtol=1e-5, atol=1e-6)


def test_sm3_scalar_weight_and_no_momentum():
  """A scalar is its own accumulator (trax's SM3 raises IndexError on it);
  momentum 0 keeps no momentum slot and steps by gt = g / sqrt(sum g^2)."""
  opt = optimizers.SM3(momentum=0.0)
  (w1, s1), (w2, _) = _steps(opt, np.float32(1.0), [3.0, 4.0])
  assert s1[0] == ()
  np.testing.assert_allclose([w1, w2], [1 - LR, 1 - LR - LR * 4 / 5], rtol=1e-6)
  with pytest.raises(IndexError):
    trax.optimizers.SM3().update(0, np.float32(3.0), np.float32(1.0),
                                 trax.optimizers.SM3().init(np.float32(1.0)),
                                 _params(trax.optimizers.SM3()))
  with pytest.raises(ValueError, match=r'momentum must be in \[0, 1\)'):
    optimizers.SM3(momentum=1.0)


def test_agc_clips_only_the_units_over_the_ratio():
  """Units are columns of a (in, out) kernel: |G_j| / max(|W_j|, eps) > lambda
  -> G_j * lambda * max(|W_j|, eps) / |G_j|; other columns unchanged."""
  w = np.array([[3.0, 0.0, 1.0],
                [4.0, 0.0, 0.0]], np.float32)        # |W_j| = 5, 0 (-> eps), 1
  g = np.array([[0.3, 0.003, 0.05],
                [0.4, 0.004, 0.0]], np.float32)      # |G_j| = 0.5, 0.005, 0.05
  clipped = np.asarray(optimizers.adaptive_clip(g, w, clipping=0.1, eps=1e-2))
  # column 0: 0.5 / 5 = 0.1, not over -> unchanged; column 1: 0.005 / 0.01
  # = 0.5 > 0.1 -> scaled to norm 0.1 * 0.01 = 0.001; column 2: 0.05 / 1 ok.
  np.testing.assert_array_equal(clipped[:, [0, 2]], g[:, [0, 2]])
  np.testing.assert_allclose(clipped[:, 1], g[:, 1] * 0.001 / 0.005, rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(clipped[:, 1]), 0.001, rtol=1e-6)
  tight = np.asarray(optimizers.adaptive_clip(g, w, clipping=0.05, eps=1e-2))
  np.testing.assert_allclose(tight[:, 0], g[:, 0] * 0.25 / 0.5, rtol=1e-6)  # now clipped
  np.testing.assert_array_equal(tight[:, 2], g[:, 2])                       # still not
  # Vectors: each entry is a unit.
  vec = np.asarray(optimizers.adaptive_clip(np.float32([1.0, -1.0]),
                                            np.float32([100.0, 1.0]), 0.1))
  np.testing.assert_allclose(vec, [1.0, -0.1], rtol=1e-6)


def test_agc_wraps_any_optimizer_and_selects_by_gin():
  """AGC(SGD).update = SGD.update on the clipped gradient; slots and
  hyperparameters are the wrapped optimizer's; gin builds it."""
  w = np.array([[3.0, 0.0], [4.0, 0.0]], np.float32)
  g = np.array([[1.0, 0.3], [1.0, 0.4]], np.float32)
  sgd = trax.optimizers.SGD(learning_rate=1.0)
  agc = optimizers.AGC(sgd, clipping=0.1, eps=1e-3)
  new_w, _ = agc.update(0, g, w, agc.init(w), agc.opt_params)
  want = w - np.asarray(optimizers.adaptive_clip(g, w, 0.1, 1e-3))
  np.testing.assert_allclose(new_w, want, rtol=1e-6)
  assert not np.allclose(new_w, w - g)
  adam = trax.optimizers.Adam(learning_rate=0.1)
  wrapped = optimizers.AGC(adam)
  assert wrapped.opt_params is adam.opt_params
  assert wrapped.tree_init({'w': w})[1] is adam.opt_params
  with pytest.raises(ValueError, match='needs optimizer='):
    optimizers.AGC()
  with gin.unlock_config():
    gin.parse_config(['import training.configurables',
                      'training.optimizers.AGC.optimizer = @training.optimizers.SM3()',
                      'training.optimizers.AGC.clipping = 0.02',
                      'training.optimizers.SM3.momentum = 0.5'])
  try:
    opt = gin.get_configurable('training.optimizers.AGC')()
    assert isinstance(opt.optimizer, optimizers.SM3) and opt._clipping == 0.02
    assert float(opt.opt_params['momentum']) == 0.5
  finally:
    gin.clear_config()


def test_agc_around_sm3_trains_a_tiny_lm_through_the_trainer():
  # Matrices, vectors and a scalar (ReZero's) weight.
  model = tl.Serial(model_lib.Embedding(16, 16),
                    variants.ReZero(tl.Serial(tl.Dense(32), tl.Relu(), tl.Dense(16))),
                    model_lib.LayerNorm(), tl.Dense(16))
  opt = optimizers.AGC(optimizers.SM3(), clipping=0.05)
  state = trainer_lib.init_train_state(model, opt, (4, 8), seed=0)
  step = trainer_lib.make_train_step(model, opt, lambda s: 0.05)
  x = np.random.RandomState(0).randint(0, 16, (4, 9)).astype(np.int32)
  batch = x[:, :-1], x[:, 1:], np.ones((4, 8), np.float32)
  losses = []
  for i in range(12):
    state, metrics = step(state, i, batch, jax.random.PRNGKey(0), 0.0)
    losses.append(float(metrics['loss']))
  assert losses[-1] < losses[0] - 0.5, losses
