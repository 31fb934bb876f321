"""Tests of terraformer.sparse_ff, with parity against trax's sparsity.py.

The reference is trax 1.4.1 `trax.layers.research.sparsity.SparseFF` and
`BlockSparseFF`.  With weights mapped by `weights_from_trax`, ours must give
the same outputs (atol 1e-5, float32) in eval and predict mode, and in train
mode wherever trax's output is deterministic (temperature 0 and a fixed
quantised/soft branch), including gradients.
"""

import functools

import jax
from jax import numpy as jnp
import numpy as np
import pytest
from trax import layers as tl
from trax import shapes
from trax.layers.research import sparsity

from terraformer import sparse_ff

ATOL = 1e-5


def _x(shape, seed=0):
  return np.random.RandomState(seed).normal(size=shape).astype(np.float32)


def _np_init(scale):
  """A (shape, rng) initializer drawing with numpy: no XLA compile per shape.

  trax's default initializers compile a jax.random kernel for every new
  shape (about 0.5 s each here), which would dominate this file's run time.
  """
  def init_fn(shape, rng):
    seed = int(np.asarray(rng).astype(np.uint64).sum() % (2 ** 32))
    values = np.random.RandomState(seed).normal(size=shape) * scale
    return jnp.asarray(values, jnp.float32)
  return init_fn


FAST_INIT = {'kernel_initializer': _np_init(0.4),
             'bias_initializer': _np_init(0.1)}


def _trax_and_ours(trax_cls, our_cls, x, modes, seed=0, **kwargs):
  """A trax layer per mode and ours per mode, all with the same weights.

  Only the first trax layer is initialised; the others share its weights and
  state (same structure in every mode).
  """
  sig = shapes.signature(x)
  rng = jax.random.PRNGKey(seed)
  kwargs = {**FAST_INIT, **kwargs}
  ref = trax_cls(mode=modes[0], **kwargs)
  ref.init(sig, rng=rng)
  trax_layers, ours = {}, {}
  for mode in modes:
    t = trax_cls(mode=mode, **kwargs)
    t.weights, t.state = ref.weights, ref.state
    o = our_cls(mode=mode, **kwargs)
    o.init(sig, rng=rng)
    o.weights = sparse_ff.weights_from_trax(ref)
    trax_layers[mode], ours[mode] = t, o
  return trax_layers, ours


KEY = jax.random.PRNGKey(0)

# Tiny graphs: XLA's backend optimisations cost more than they save here
# (compiling is most of this file's run time; this halves it).
_jit = functools.partial(
    jax.jit, compiler_options={'xla_backend_optimization_level': 0})
_JITTED = {}


def _run(layer, x, weights=None, state=None, rng=None):
  """`layer`'s output on x through one jit-compiled `pure_fn` per layer.

  Eager trax layers compile every primitive separately (about 90 XLA
  compiles per parity test here); one jit per layer and shape is far cheaper.
  """
  entry = _JITTED.get(id(layer))
  if entry is None or entry[0] is not layer:
    fn = _jit(lambda x, w, s, r: layer.pure_fn(x, w, s, r)[0])
    entry = _JITTED[id(layer)] = (layer, fn)
  return entry[1](x, layer.weights if weights is None else weights,
                  layer.state if state is None else state,
                  KEY if rng is None else rng)


def _close(a, b, atol=ATOL):
  np.testing.assert_allclose(np.asarray(a, np.float32),
                             np.asarray(b, np.float32), rtol=0, atol=atol)


SPARSE_CASES = [
    # d_model, d_ff, N, d_lowrank, other constructor arguments
    (8, 16, 2, 4, {}),
    (6, 32, 4, 8, {'multiply_by_controller_output': True}),
    (5, 64, 8, 3, {'kernel_scaling': True, 'ff_chunk_size': 2}),
]


@pytest.mark.parametrize('d_model,d_ff,n,d_lowrank,kw', SPARSE_CASES)
def test_sparse_ff_eval_and_predict_match_trax(d_model, d_ff, n, d_lowrank,
                                               kw):
  x = _x((2, 5, d_model))
  ts, os_ = _trax_and_ours(sparsity.SparseFF, sparse_ff.SparseFF, x,
                           ('eval', 'predict'), d_ff=d_ff,
                           n_elements_in_block=n, d_lowrank=d_lowrank, **kw)
  y = _run(ts['eval'], x)
  assert np.abs(y).max() > 0.1
  _close(_run(os_['eval'], x), y)
  # 10 rows (dense path here), 2 rows and 1 row (gathered for N > rows).
  for inp in (x, x[:, :1], x[:1, 3:4]):
    y_trax = _run(ts['predict'], inp)
    _close(_run(os_['predict'], inp), y_trax)
  # trax's own predict mode agrees with its eval mode here.
  _close(_run(ts['predict'], x), y)


def test_sparse_ff_bfloat16_weights_match_trax():
  """bfloat16 big weights; our own init gives the converted shapes/dtypes."""
  x = _x((2, 3, 8))
  kw = dict(d_ff=32, n_elements_in_block=4, d_lowrank=4,
            big_weights_in_bfloat16=True, **FAST_INIT)
  ts, os_ = _trax_and_ours(sparsity.SparseFF, sparse_ff.SparseFF, x,
                           ('eval', 'predict'), **kw)
  converted = os_['eval'].weights
  assert converted[3].dtype == converted[4].dtype == jnp.bfloat16
  _close(_run(os_['eval'], x), _run(ts['eval'], x))
  _close(_run(os_['predict'], x[:, :1]), _run(ts['predict'], x[:, :1]))
  own = sparse_ff.SparseFF(mode='eval', **kw)
  own.init(shapes.signature(x), rng=KEY)
  spec = lambda tree: [(a.shape, a.dtype) for a in tree]
  assert spec(own.weights) == spec(converted)


@pytest.mark.parametrize('d_model,d_ff,n_experts', [(8, 16, 4), (6, 64, 8)])
def test_block_sparse_ff_eval_and_predict_match_trax(d_model, d_ff, n_experts):
  x = _x((2, 5, d_model))
  ts, os_ = _trax_and_ours(sparsity.BlockSparseFF, sparse_ff.BlockSparseFF, x,
                           ('eval', 'predict'), d_ff=d_ff, n_experts=n_experts)
  y = _run(ts['eval'], x)
  assert np.abs(y).max() > 0.1
  _close(_run(os_['eval'], x), y)
  # trax gathers for exactly one row and is dense otherwise; we gather
  # whenever rows < n_experts (1 and 2 rows here).
  for inp in (x[:, :1], x[:1, 3:4]):
    _close(_run(os_['predict'], inp), _run(ts['predict'], inp))


_GRAD_FNS = {}


def _loss_and_grads(layer, weights, x, ct, state, rng):
  """(output, (d sum(output * ct) / d weights, ... / d x)), jit-compiled."""
  entry = _GRAD_FNS.get(id(layer))
  if entry is None or entry[0] is not layer:
    def loss(w, x, ct, state, rng):
      y, _ = layer.pure_fn(x, w, state, rng)
      return jnp.sum(y * ct), y
    fn = _jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    entry = _GRAD_FNS[id(layer)] = (layer, fn)
  (_, y), grads = entry[1](weights, x, ct, state, rng)
  return np.asarray(y), grads


@pytest.mark.parametrize('quant_prob,kw', [
    (1.0, {}),  # always the straight-through one-hot
    (0.0, {}),  # always the soft mask
    (1.0, {'multiply_by_controller_output': True, 'ff_chunk_size': 2}),
])
def test_sparse_ff_train_values_and_grads_match_trax(quant_prob, kw):
  """Temperature 0 and quant_prob 0 or 1 make trax's train mode exact."""
  x, ct = _x((2, 5, 6)), _x((2, 5, 6), seed=1)
  ts, os_ = _trax_and_ours(sparsity.SparseFF, sparse_ff.SparseFF, x,
                           ('train',), d_ff=32, n_elements_in_block=4,
                           d_lowrank=8, temperature=0.0, quant_prob=quant_prob,
                           **kw)
  t, o = ts['train'], os_['train']
  rng = jax.random.PRNGKey(3)
  y_t, (gw_t, gx_t) = _loss_and_grads(t, t.weights, x, ct, t.state, rng)
  y_o, (gw_o, gx_o) = _loss_and_grads(o, o.weights, x, ct, o.state, rng)
  _close(y_o, y_t)
  _close(gx_o, gx_t)
  for ours, ref in zip(gw_o, sparse_ff.weights_from_trax(t, gw_t)):
    _close(ours, ref)
  for g in gw_o[:3]:  # the controller learns on both branches
    assert np.abs(g).max() > 1e-4


def test_sparse_ff_recalls_saved_choice_like_trax_reversible():
  """The second (reversible) pass reuses the mask saved by the first."""
  x = _x((2, 4, 6))
  kw = dict(d_ff=32, n_elements_in_block=4, d_lowrank=8, quant_prob=1.0,
            ff_chunk_size=2)
  ts, os_ = _trax_and_ours(sparsity.SparseFF, sparse_ff.SparseFF, x,
                           ('train', 'eval'), **kw)
  t, o = ts['train'], os_['train']
  rng = jax.random.PRNGKey(5)
  run = _jit(lambda x, s: o.pure_fn(x, o.weights, s, rng))
  first, state = run(x, o.state)
  assert state[0].shape == (8, 8) and state[0].dtype == jnp.int32
  recalled = (state[0] + 1) % 4  # a choice the controller did not make
  second = {'running_second_time_yes': ()}
  y_o, _ = run(x, (recalled, second))
  (inner,) = t.state
  t_state = ((inner[0], inner[1], (recalled, second)),)
  _close(y_o, _run(t, x, state=t_state, rng=rng))
  assert np.abs(np.asarray(y_o) - np.asarray(first)).max() > 1e-3
  # Same rng, no recall: the first pass is reproduced.
  _close(run(x, state)[0], first)


class _SpySparseFF(sparse_ff.SparseFF):
  """Records the state flags each forward pass sees (at trace time)."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._seen = []

  def forward(self, x):
    self._seen.append(sorted(self.state[1]))
    return super().forward(x)


def test_sparse_ff_inside_trax_reversible_layers():
  """trax's ReversibleHalfResidual recomputes F with the saved choice.

  ReversibleSerial(ReversibleHalfResidual(F), ReversibleSwap) maps
  (x1, x2) -> (x2, x1 + F(x2)); its reverse-mode gradient (recomputing F)
  must equal the gradient of that formula computed directly.
  """
  x1, x2 = _x((2, 3, 8)), _x((2, 3, 8), seed=1)
  ff = _SpySparseFF(32, n_elements_in_block=4, d_lowrank=4, temperature=0.0,
                    quant_prob=1.0, mode='train', **FAST_INIT)
  rev = tl.ReversibleSerial(tl.ReversibleHalfResidual(ff), tl.ReversibleSwap())
  rev.init((shapes.signature(x1), shapes.signature(x2)), rng=KEY)
  ff_weights, ff_state = ff.weights, ff.state

  def rev_loss(w, x1, x2):
    (a, b), _ = rev.pure_fn((x1, x2), w, rev.state, KEY)
    return jnp.sum(a * 1.3 + b * b)

  def direct_loss(w, x1, x2):
    b = x1 + ff.pure_fn(x2, w, ff_state, KEY)[0]
    return jnp.sum(x2 * 1.3 + b * b)

  ff._seen.clear()  # pylint: disable=protected-access
  g_rev = _jit(jax.grad(rev_loss, argnums=(0, 1, 2)))(rev.weights, x1, x2)
  assert ff._seen == [  # pylint: disable=protected-access
      ['running_second_time'], ['running_second_time_yes']]
  g_direct = _jit(jax.grad(direct_loss, argnums=(0, 1, 2)))(
      ff_weights, x1, x2)
  leaves_rev = jax.tree_util.tree_leaves(g_rev)
  leaves_direct = jax.tree_util.tree_leaves(g_direct)
  assert len(leaves_rev) == len(leaves_direct) == 8
  for a, b in zip(leaves_rev, leaves_direct):
    _close(a, b, atol=1e-4)


class _ForcedBlockSparseFF(sparse_ff.BlockSparseFF):

  def __init__(self, quantized, **kwargs):
    super().__init__(**kwargs)
    self._quantized = quantized

  def _use_quantized(self, rng):
    return jnp.array(self._quantized)


def test_block_sparse_ff_train_values_and_grads_match_trax():
  """Temperature 0: trax picks one of two deterministic branches per call."""
  x, ct = _x((2, 3, 8)), _x((2, 3, 8), seed=1)
  kw = dict(d_ff=32, n_experts=4, temperature=0.0)
  ts, _ = _trax_and_ours(sparsity.BlockSparseFF, sparse_ff.BlockSparseFF, x,
                         ('train',), **kw)
  t = ts['train']
  weights = sparse_ff.weights_from_trax(t)
  branches = {}
  for quantized in (True, False):
    o = _ForcedBlockSparseFF(quantized, mode='train', **FAST_INIT, **kw)
    o.init(shapes.signature(x))
    branches[quantized] = _loss_and_grads(o, weights, x, ct, (), KEY)
  assert np.abs(branches[True][0] - branches[False][0]).max() > 1e-3
  seen = set()
  for seed in range(6):
    y_t, (gw_t, gx_t) = _loss_and_grads(t, t.weights, x, ct, (),
                                        jax.random.PRNGKey(seed))
    quantized = bool(np.abs(y_t - branches[True][0]).max() < ATOL)
    seen.add(quantized)
    y_o, (gw_o, gx_o) = branches[quantized]
    _close(y_o, y_t)
    _close(gx_o, gx_t)
    for ours, ref in zip(gw_o, gw_t):
      _close(ours, ref)
  assert seen == {True, False}
  for quantized in (True, False):
    assert np.abs(branches[quantized][1][0][0]).max() > 1e-4  # router grad


def _model(ff, vocab, d_model):
  return tl.Serial(
      tl.Embedding(vocab, d_model, kernel_initializer=_np_init(1.0)),
      tl.Residual(ff),
      tl.Dense(vocab, kernel_initializer=_np_init(0.3),
               bias_initializer=_np_init(0.0)))


FF_FACTORIES = {
    'SparseFF': lambda mode: sparse_ff.SparseFF(
        32, n_elements_in_block=4, d_lowrank=8, mode=mode, **FAST_INIT),
    'BlockSparseFF': lambda mode: sparse_ff.BlockSparseFF(
        32, n_experts=4, mode=mode, **FAST_INIT),
}


@pytest.mark.parametrize('name', sorted(FF_FACTORIES))
def test_predict_token_by_token_equals_eval(name):
  vocab, d_model = 11, 8
  ids = np.random.RandomState(0).randint(0, vocab, (2, 7)).astype(np.int32)
  ev = _model(FF_FACTORIES[name]('eval'), vocab, d_model)
  ev.init(shapes.signature(ids), rng=jax.random.PRNGKey(1))
  pr = _model(FF_FACTORIES[name]('predict'), vocab, d_model)
  pr.init(shapes.signature(ids[:, :1]), rng=jax.random.PRNGKey(2))
  pr.weights = ev.weights
  full = _run(ev, ids)
  state, steps = pr.state, []
  step = _jit(lambda x, s: pr.pure_fn(x, pr.weights, s, KEY))
  for i in range(7):
    logits, state = step(ids[:, i:i + 1], state)
    steps.append(logits)
  steps = np.concatenate(steps, axis=1)
  _close(steps, full)


def _dot_operand_sizes(jaxpr):
  """Sizes of all dot_general operands, nested jaxprs included."""
  sizes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      sizes += [int(np.prod(v.aval.shape)) for v in eqn.invars]
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          sizes += _dot_operand_sizes(sub)
  return sizes


@pytest.mark.parametrize('name,layer_fn', [
    ('SparseFF', lambda mode: sparse_ff.SparseFF(
        64, n_elements_in_block=8, d_lowrank=1, mode=mode, **FAST_INIT)),
    ('BlockSparseFF', lambda mode: sparse_ff.BlockSparseFF(
        64, n_experts=8, mode=mode, **FAST_INIT)),
])
def test_predict_multiplies_only_chosen_units(name, layer_fn):
  """One row, d_ff 64 in 8 blocks: matmuls touch 8 x d_model weights, not 64."""
  del name
  x = _x((1, 1, 16))
  largest = {}
  for mode in ('eval', 'predict'):
    layer = layer_fn(mode)
    layer.init(shapes.signature(x), rng=jax.random.PRNGKey(0))
    jaxpr = jax.make_jaxpr(
        lambda w, x, l=layer: l.pure_fn(x, w, l.state, KEY)[0])(
            layer.weights, x)
    largest[mode] = max(_dot_operand_sizes(jaxpr.jaxpr))
  assert largest['eval'] == 64 * 16
  assert largest['predict'] == 8 * 16


@pytest.mark.parametrize('quant_prob', [1.0, 0.0])
def test_sparse_ff_controller_gets_gradients(quant_prob):
  x, ct = _x((2, 3, 8)), _x((2, 3, 8), seed=1)
  layer = sparse_ff.SparseFF(32, n_elements_in_block=4, d_lowrank=4,
                             quant_prob=quant_prob, mode='train', **FAST_INIT)
  layer.init(shapes.signature(x), rng=jax.random.PRNGKey(0))
  _, (grads, _) = _loss_and_grads(layer, layer.weights, x, ct, layer.state,
                                  jax.random.PRNGKey(1))
  for g in grads:  # m1, m2, mb, w1, w2, b2
    assert np.abs(g).max() > 1e-4


def test_sparse_ff_dropout_zeroes_or_doubles():
  x = _x((2, 3, 8))
  kw = dict(d_ff=32, n_elements_in_block=4, d_lowrank=4, temperature=0.0,
            quant_prob=0.0, mode='train', **FAST_INIT)
  plain = sparse_ff.SparseFF(**kw)
  plain.init(shapes.signature(x), rng=jax.random.PRNGKey(0))
  drop = sparse_ff.SparseFF(dropout_rate=0.5, dropout_shared_axes=(0,), **kw)
  drop.init(shapes.signature(x), rng=jax.random.PRNGKey(0))
  rng = jax.random.PRNGKey(4)
  y = np.asarray(_run(plain, x, rng=rng))
  yd = np.asarray(_run(drop, x, weights=plain.weights, rng=rng))
  kept = np.abs(yd - 2 * y) < 1e-5
  assert np.all(kept | (yd == 0)) and kept.any() and (yd == 0).any()
  # Shared over axis 0 of the flattened (rows, d_model) output: whole columns.
  assert np.all(kept.reshape(6, 8) == kept.reshape(6, 8)[:1])


@pytest.mark.parametrize('name', sorted(FF_FACTORIES))
def test_tiny_model_learns_copy_task(name):
  """Only the sparse FF trains (embedding and readout stay random).

  Task: every position outputs its own input id (vocab 8).  The eval-mode
  cross-entropy after 100 Adam steps must fall below a fifth of its initial
  value (it falls from about 2.1-2.7 to below 0.01).
  """
  vocab, d_model = 8, 16
  model = _model(FF_FACTORIES[name]('train'), vocab, d_model)
  ev = _model(FF_FACTORIES[name]('eval'), vocab, d_model)
  ids = np.random.RandomState(0).randint(0, vocab, (16, 8)).astype(np.int32)
  model.init(shapes.signature(ids), rng=jax.random.PRNGKey(0))
  ev.init(shapes.signature(ids), rng=jax.random.PRNGKey(0))
  frozen_in, ff_w, frozen_out = model.weights

  def loss(layer, ff_w, state, rng):
    logits, _ = layer.pure_fn(ids, (frozen_in, ff_w, frozen_out), state, rng)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, ids[..., None], -1))

  eval_loss = _jit(lambda w: loss(ev, w, ev.state, KEY))
  state = model.state

  @_jit
  def step(ff_w, m, v, t):
    g = jax.grad(loss, argnums=1)(model, ff_w, state,
                                  jax.random.fold_in(jax.random.PRNGKey(1), t))
    m = jax.tree_util.tree_map(lambda m, g: 0.9 * m + 0.1 * g, m, g)
    v = jax.tree_util.tree_map(lambda v, g: 0.999 * v + 0.001 * g * g, v, g)
    ff_w = jax.tree_util.tree_map(
        lambda w, m, v: w - 0.01 * (m / (1 - 0.9 ** (t + 1))) / (
            jnp.sqrt(v / (1 - 0.999 ** (t + 1))) + 1e-8), ff_w, m, v)
    return ff_w, m, v

  zeros = jax.tree_util.tree_map(jnp.zeros_like, ff_w)
  before = float(eval_loss(ff_w))
  w, m, v = ff_w, zeros, zeros
  for t in range(100):
    w, m, v = step(w, m, v, t)
  after = float(eval_loss(w))
  assert after < 0.2 * before, (before, after)


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match='multiple of n_elements_in_block'):
    sparse_ff.SparseFF(10, n_elements_in_block=4)
  with pytest.raises(ValueError, match='multiple of n_experts'):
    sparse_ff.BlockSparseFF(10, n_experts=4)
  with pytest.raises(ValueError, match='mode must be one of'):
    sparse_ff.SparseFF(16, n_elements_in_block=4, mode='decode')
  with pytest.raises(ValueError, match='neither trax SparseFF'):
    sparse_ff.weights_from_trax(tl.Dense(4))


@pytest.mark.parametrize('width,pieces', [
    (8, (16,)), (16, (16,)), (48, (32, 16)), (96, (64, 32)), (100, (64, 32, 16))])
def test_lowrank_pieces_cover_the_width_in_powers_of_2(width, pieces):
  assert sparse_ff.lowrank_pieces(width) == pieces


@pytest.mark.parametrize('seed', [0, 1])
def test_chosen_units_kernel_equals_its_formula(seed):
  """`_chosen_units` (interpreted) against numpy: per block the first unit
  of the largest logit, relu(LayerNorm(x) . w1) * w2 summed, plus x + b2;
  the controller's width 24 as pieces (16, 16), the last padded with zeros."""
  rng = np.random.RandomState(seed)
  d_model, d1, n, width = 32, 12, 8, 24
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
  x, scale, shift, z, b2 = f32(d_model), f32(d_model), f32(d_model), f32(width), f32(d_model)
  m2, mb, w1, w2 = f32(d1, n, width), f32(d1, n), f32(d1, n, d_model), f32(d1, n, d_model)
  mb[3, :] = 0.0  # block 3: a tie at 0, which the first unit wins
  m2[3] = 0.0
  xn = (x - x.mean()) / np.sqrt(x.var() + 1e-6) * scale + shift
  logits = np.einsum('jnl,l->jn', m2, z) + mb
  k = np.argmax(logits, axis=1)
  h = np.maximum(np.einsum('jd,d->j', w1[np.arange(d1), k], xn), 0.0)
  want = x + b2 + np.einsum('j,jd->d', h, w2[np.arange(d1), k])
  padded = np.pad(m2, ((0, 0), (0, 0), (0, 8)))
  z_padded = np.pad(z, (0, 8))
  got = sparse_ff._chosen_units(
      jnp.asarray(x), (jnp.asarray(scale), jnp.asarray(shift), 1e-6),
      jnp.asarray(z_padded), (jnp.asarray(padded[..., :16]), jnp.asarray(padded[..., 16:])),
      jnp.asarray(mb), jnp.asarray(w1), jnp.asarray(w2), jnp.asarray(x + b2),
      interpret=True)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
