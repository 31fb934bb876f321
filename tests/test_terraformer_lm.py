"""TerraformerLM: every mix of sparse FF / QKV / loss decodes like eval mode and trains."""
import functools

import jax
from jax import numpy as jnp
import numpy as np
import pytest
from trax import shapes

from terraformer import models
from terraformer import sparse_ff
from training import sampling
from training import trainer as trainer_lib

CFG = dict(vocab_size=24, d_model=32, d_ff=64, n_layers=2, n_heads=4, max_len=16)
MIXES = {
    'dense': {},
    'ff': dict(ff_sparsity=8),
    'qkv': dict(attention_sparsity=4),
    'loss': dict(loss_sparsity=4),
    'all': dict(ff_sparsity=8, attention_sparsity=4, loss_sparsity=4,
                share_qk=True, output_layer_type='mult'),
}


def _eval_model(mix, batch=2, length=10, **overrides):
  model = models.TerraformerLM(mode='eval', **{**CFG, **MIXES[mix], **overrides})
  model.init(shapes.ShapeDtype((batch, length), np.int32), rng=jax.random.PRNGKey(3))
  return model


@pytest.mark.parametrize('mix', sorted(MIXES))
def test_predict_with_prefill_then_tokens_equals_eval(mix):
  eval_model = _eval_model(mix)
  ids = np.random.RandomState(0).randint(0, CFG['vocab_size'], (2, 10)).astype(np.int32)
  want = np.asarray(eval_model(ids))
  predict = models.TerraformerLM(mode='predict', **CFG, **MIXES[mix])
  predict.init(shapes.ShapeDtype((2, 1), np.int32))
  state = predict.state
  got, rng = [], jax.random.PRNGKey(0)
  logits, state = predict.pure_fn(ids[:, :4], eval_model.weights, state, rng)  # prefill
  got.append(logits)
  for t in range(4, 10):
    logits, state = predict.pure_fn(ids[:, t:t + 1], eval_model.weights, state, rng)
    got.append(logits)
  np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=1e-5, rtol=1e-5)


def test_sampler_greedy_matches_eval_argmax_with_every_sparse_layer():
  eval_model = _eval_model('all', batch=1, length=4)
  sampler = sampling.Sampler(models.TerraformerLM(mode='predict', **CFG, **MIXES['all']))
  assert sampler.max_length == CFG['max_len']
  prompt = np.array([[1, 2, 3]], np.int32)
  got = sampler.generate(eval_model.weights, prompt, 8, temperature=0.0)
  # eval_model(seq) per length, jit-compiled once per length rather than op by op.
  apply, state, seq = jax.jit(eval_model.pure_fn), eval_model.state, prompt
  for _ in range(8):
    logits, state = apply(seq, eval_model.weights, state, eval_model.rng)
    nxt = np.argmax(np.asarray(logits)[:, -1], -1)
    seq = np.concatenate([seq, nxt[:, None]], 1).astype(np.int32)
  np.testing.assert_array_equal(got, seq[:, 3:])


def _find(layer, cls):
  """The sublayers of `layer` (itself included) of class `cls`, depth first."""
  found = [layer] if isinstance(layer, cls) else []
  for sub in layer.sublayers:
    found += _find(sub, cls)
  return found


def _conv_qkvs(layer):
  from terraformer import sparse_qkv  # pylint: disable=g-import-not-at-top
  return _find(layer, sparse_qkv.ConvQKV)


@pytest.mark.parametrize('options', [
    dict(), dict(share_qk=True), dict(v_concat_type='original'),
    dict(v_concat_type='fixed', share_qk=True)])
def test_sampler_hands_conv_qkv_its_kernels_side_by_side(options, monkeypatch):
  """The Sampler switches each predict-mode ConvQKV to its decoding form
  (each group's kernels side by side in the group's first conv, made once
  per weight tree); the model then computes eval mode's logits token by
  token and samples what a Sampler without the form samples."""
  mix = dict(attention_sparsity=4, **options)
  eval_model = models.TerraformerLM(mode='eval', **CFG, **mix)
  eval_model.init(shapes.ShapeDtype((1, 10), np.int32), rng=jax.random.PRNGKey(3))
  weights = eval_model.weights
  model = models.TerraformerLM(mode='predict', **CFG, **mix)
  sampler = sampling.Sampler(model)
  convs = _conv_qkvs(model)
  assert len(convs) == CFG['n_layers'] and all(c._combined for c in convs)
  assert len(sampler._forms) == CFG['n_layers']
  prepared = sampler._decoding_weights(weights)
  assert sampler._decoding_weights(weights) is prepared  # made once
  n_convs = 2 if options.get('share_qk') else 3
  one_group = options.get('v_concat_type', 'none') == 'none'
  for path, _ in sampler._forms:
    plain = sampling.subtree_at(weights, path)
    form = sampling.subtree_at(prepared, path)
    assert len(form) == len(plain) == n_convs + 1
    first = n_convs if one_group else n_convs - 1  # convs in the first group
    assert form[0][0].shape == (3, 3, plain[0][0].shape[2], first * 8)
    assert form[0][1].shape == (first * 8,)
    np.testing.assert_array_equal(form[0][0][..., :8], plain[0][0])
    np.testing.assert_array_equal(form[0][1][:8], plain[0][1])
    assert all(form[i] == () for i in range(1, first))
    if not one_group:  # V alone: as it was
      for a, b in zip(form[n_convs - 1], plain[n_convs - 1]):
        np.testing.assert_array_equal(a, b)

  ids = np.random.RandomState(0).randint(0, CFG['vocab_size'], (1, 10)).astype(np.int32)
  want = np.asarray(eval_model(ids))
  step = jax.jit(model.pure_fn)
  state, rng, got = sampler._initial_state, jax.random.PRNGKey(0), []
  for chunk in (ids[:, :4],) + tuple(ids[:, t:t + 1] for t in range(4, 10)):
    logits, state = step(chunk, prepared, state, rng)
    got.append(logits)
  np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=1e-5, rtol=1e-5)

  monkeypatch.setattr(sampling, 'DECODING_FORMS', False)
  reference = sampling.Sampler(models.TerraformerLM(mode='predict', **CFG, **mix))
  assert not any(c._combined for c in _conv_qkvs(reference._model))
  prompt = np.array([[1, 2, 3]], np.int32)
  for seed in (0, 1):
    np.testing.assert_array_equal(
        sampler.generate(weights, prompt, 10, temperature=1.0, seed=seed),
        reference.generate(weights, prompt, 10, temperature=1.0, seed=seed))


def test_layers_are_the_sparse_ones_and_sparse_layers_shrink_the_model():
  def n_params(mix, **kw):
    m = models.TerraformerLM(mode='eval', **{**CFG, **kw}, **MIXES[mix])
    m.init(shapes.ShapeDtype((1, 4), np.int32))
    return trainer_lib.count_params(m.weights), m
  dense, _ = n_params('dense')
  qkv, _ = n_params('qkv')
  loss, _ = n_params('loss')
  ff, model = n_params('ff')
  assert any(isinstance(s, sparse_ff.SparseFF) for s in _walk(model))
  assert qkv < dense and loss < dense
  # The controller adds weights: a sparse FF at the same d_ff is larger.
  assert ff > dense


def _walk(layer):
  yield layer
  for s in layer.sublayers:
    yield from _walk(s)


@pytest.mark.parametrize('kwargs,words', [
    (dict(ff_sparsity=5), ['ff_sparsity=5', 'd_ff=64', 'allowed']),
    (dict(attention_sparsity=3), ['attention_sparsity=3', 'd_model=32']),
    (dict(loss_sparsity=5), ['loss_sparsity=5', 'vocab_size=24']),
    (dict(ff_sparsity=8, ff_lowrank=0), ['ff_lowrank', '[1, d_ff=64]']),
    (dict(ff_sparsity=8, ff_lowrank=65), ['ff_lowrank']),
    (dict(ff_sparsity=-1), ['ff_sparsity', '0 (dense)']),
    (dict(n_heads=5), ['n_heads=5']),
])
def test_bad_settings_fail_at_build_time_naming_the_argument(kwargs, words):
  with pytest.raises(ValueError) as e:
    models.TerraformerLM(mode='train', **{**CFG, **kwargs})
  for word in words:
    assert word in str(e.value)


def test_all_sparse_layers_train_on_the_copy_task_and_controller_learns():
  """Train mode: Gumbel noise, straight-through one-hot; loss falls and the
  controller (SparseFF's m1, m2) receives gradients."""
  from trax import optimizers  # pylint: disable=g-import-not-at-top
  cfg = dict(CFG, vocab_size=12, max_len=16)
  model = models.TerraformerLM(mode='train', **cfg, **MIXES['all'])
  opt = optimizers.Adam(learning_rate=3e-3)
  state = trainer_lib.init_train_state(model, opt, (16, 16), seed=0)
  step = trainer_lib.make_train_step(model, opt, lambda s: 3e-3)
  rs = np.random.RandomState(0)

  def batch():  # copy task: a random half, then the same half again
    half = rs.randint(1, cfg['vocab_size'], (16, 8))
    seq = np.concatenate([np.zeros((16, 1), int), half, half[:, :-1]], 1).astype(np.int32)
    inputs, targets = seq[:, :-1], seq[:, 1:]
    weights = np.zeros_like(targets, np.float32)
    weights[:, 8:] = 1.0  # score the copied half only
    pad = lambda a: np.pad(a, ((0, 0), (0, 1)))
    return pad(inputs), pad(targets), pad(weights).astype(np.float32)

  controller = [s for s in _walk(model) if isinstance(s, sparse_ff.SparseFF)][0]
  def grads_of_controller(weights, b):
    def loss(w):
      logits, _ = model.pure_fn(b[0], w, state.state, jax.random.PRNGKey(1))
      return trainer_lib.cross_entropy(logits, b[1], b[2])[0]
    return jax.grad(loss)(weights)
  g = grads_of_controller(state.weights, batch())
  leaves = jax.tree_util.tree_leaves(g)
  m1_shape = controller.weights[0].shape
  m1_grads = [x for x in leaves if x.shape == m1_shape]
  assert m1_grads and all(float(jnp.abs(x).max()) > 0 for x in m1_grads)

  # 250 steps: at 150 the loss at initialisation seeds 0-2 ranged 0.8-2.2
  # (of 2.5 at the start), too close to the bound; by 250 it is 0.01-0.9.
  key, losses = jax.random.PRNGKey(0), []
  for i in range(250):
    state, metrics = step(state, i, batch(), key, np.float32(0))
    losses.append(float(metrics['loss']))
  assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), losses[::15]


def test_flop_count_sees_the_sparse_layers_as_their_dense_equivalents():
  from terraformer import sparse_qkv  # pylint: disable=g-import-not-at-top
  fd = sparse_qkv.FactoredDense(4, 32, 24)
  fd.init(shapes.ShapeDtype((1, 3, 32), np.float32))
  conv = sparse_qkv.LocallyConvDense(4, 8, 'eval', kernel_size=3, length_kernel_size=3)
  conv.init(shapes.ShapeDtype((1, 3, 32), np.float32))
  # FactoredDense computes like a (32, 24) Dense; the (3, 3, 8, 8) conv kernel
  # is applied at each of the 4 modules.
  assert trainer_lib.train_flops_per_token(fd, 3) == 6 * 32 * 24
  assert trainer_lib.train_flops_per_token(conv, 3) == 6 * 3 * 3 * 8 * 8 * 4


@pytest.mark.parametrize('build', ['TerraformerLM', 'ReversibleTerraformerLM'])
@pytest.mark.parametrize('change, match', [
    (dict(mode='sample'), 'mode must be one of'),
    (dict(d_model=0), 'd_model must be a positive integer'),
    (dict(max_len=2.5), 'max_len must be a positive integer'),
    (dict(n_heads=5), 'n_heads=5 must divide d_model=32'),
])
def test_both_terraformer_lms_check_their_sizes_when_built(build, change, match):
  from terraformer import terraformer  # pylint: disable=g-import-not-at-top
  fn = getattr(models if build == 'TerraformerLM' else terraformer, build)
  with pytest.raises(ValueError, match=match):
    fn(**dict(CFG, **change))


def test_flop_count_includes_the_sparse_qkv_attention_scores():
  """With sparse QKV the attention's scores and weighted sum are counted as
  for dense attention: 6 * layers * d_model * seq on top of the weights."""
  from terraformer import models  # pylint: disable=g-import-not-at-top
  d, n, seq = 32, 2, 8
  lm = models.TerraformerLM(16, d_model=d, d_ff=64, n_layers=n, n_heads=4,
                            attention_sparsity=4, max_len=seq)
  lm.init(shapes.ShapeDtype((1, seq), np.int32))
  weights_only = 6 * trainer_lib._matmul_params(lm)  # pylint: disable=protected-access
  assert trainer_lib.train_flops_per_token(lm, seq) == weights_only + 6 * n * d * seq


PROMPT = np.array([[1, 2, 3]], np.int32)


def _samples(sampler, weights):
  """Two sampled continuations of PROMPT (seeds 0 and 1)."""
  return [sampler.generate(weights, PROMPT, 8, temperature=1.0, seed=s)
          for s in (0, 1)]


def _fusion_on(monkeypatch):
  """Every fused decoding switch on, run on this CPU (Pallas interpreted)."""
  from terraformer import sparse_qkv  # pylint: disable=g-import-not-at-top
  from training import model as model_lib  # pylint: disable=g-import-not-at-top
  for module in (model_lib, sparse_ff, sparse_qkv):
    monkeypatch.setattr(module, 'FUSED_DECODING_GPU', True)
  monkeypatch.setattr(model_lib, 'FUSED_ON_CPU', True)


def _vectors_randomized(model, seed=7):
  """Gives the model's 1-D weights (biases, norm scales and shifts) random
  N(0, 0.5) offsets and returns its weights: initialised biases are near 0,
  too small for the tolerances here to notice one that a kernel drops."""
  rng = np.random.RandomState(seed)
  model.weights = jax.tree_util.tree_map(
      lambda w: w + rng.normal(0, 0.5, w.shape).astype(w.dtype)
      if w.ndim == 1 else w, model.weights)
  return model.weights


def _stepped_logits(model, weights, state, ids, first):
  """Logits of a jitted predict step over ids[:, :first], then one id at a time."""
  step = jax.jit(model.pure_fn)
  got = []
  for chunk in (ids[:, :first],) + tuple(ids[:, t:t + 1] for t in range(first, ids.shape[1])):
    logits, state = step(chunk, weights, state, jax.random.PRNGKey(0))
    got.append(logits)
  return np.concatenate(got, axis=1)


def test_fused_sparse_qkv_step_declines_without_the_decoding_form(monkeypatch):
  """With the convolutions' kernels not side by side (DECODING_FORMS off)
  the sparse-QKV fused step declines: no kernel runs for it, and one-row
  steps still give eval mode's logits."""
  from terraformer import sparse_qkv  # pylint: disable=g-import-not-at-top
  mix = dict(attention_sparsity=4)
  eval_model = models.TerraformerLM(mode='eval', **CFG, **mix)
  eval_model.init(shapes.ShapeDtype((1, 6), np.int32), rng=jax.random.PRNGKey(5))
  _fusion_on(monkeypatch)
  monkeypatch.setattr(sampling, 'DECODING_FORMS', False)
  calls = []
  real = sparse_qkv._conv_attend
  monkeypatch.setattr(sparse_qkv, '_conv_attend',
                      lambda *a: calls.append(1) or real(*a))
  model = models.TerraformerLM(mode='predict', **CFG, **mix)
  sampler = sampling.Sampler(model)
  assert not any(c._combined for c in _conv_qkvs(model))
  ids = np.random.RandomState(2).randint(0, CFG['vocab_size'], (1, 6)).astype(np.int32)
  np.testing.assert_allclose(
      _stepped_logits(model, sampler._decoding_weights(eval_model.weights),
                      sampler._initial_state, ids, 3),
      np.asarray(eval_model(ids)), atol=1e-5, rtol=1e-5)
  assert not calls


@pytest.mark.parametrize('mix,d_ff,pieces', [
    ('ff', 64, (16,)),      # controller width 8, padded to 16
    ('all', 64, (16,)),
    ('ff', 384, (32, 16)),  # width 48 in two pieces
])
def test_fused_sparse_ff_decoding_gives_eval_logits_and_the_same_samples(
    mix, d_ff, pieces, monkeypatch):
  """With the fused decoding blocks and sparse_ff.FUSED_DECODING_GPU on (run
  here on a CPU, Pallas interpreted) the Sampler hands each SparseFF its
  fused form (controller transposed, m2 in power-of-2 pieces of its width);
  one-row steps then run the per-block kernel, the
  logits equal eval mode's token by token (the prompt's rows through the
  plain form), and the samples equal those of a Sampler without the fusion."""
  cfg = {**CFG, **MIXES[mix], 'd_ff': d_ff}
  eval_model = _eval_model(mix, batch=1, length=10, d_ff=d_ff)
  weights = _vectors_randomized(eval_model)
  reference = sampling.Sampler(models.TerraformerLM(mode='predict', **cfg))
  samples = _samples(reference, weights)
  assert not any(f._fused_form for f in _find(reference._model, sparse_ff.SparseFF))

  _fusion_on(monkeypatch)
  calls = []
  real = sparse_ff._chosen_units
  monkeypatch.setattr(sparse_ff, '_chosen_units',
                      lambda *a: calls.append([p.shape for p in a[3]]) or real(*a))
  model = models.TerraformerLM(mode='predict', **cfg)
  sampler = sampling.Sampler(model)
  ffs = _find(model, sparse_ff.SparseFF)
  assert len(ffs) == CFG['n_layers'] and all(f._fused_form for f in ffs)
  prepared = sampler._decoding_weights(weights)
  n = 8
  d1 = lowrank = d_ff // n
  width = sum(pieces)
  for f in ffs:
    path = next(p for p, _ in sampler._forms if sampling.subtree_at(
        model.weights, p) is f.weights)
    plain, form = sampling.subtree_at(weights, path), sampling.subtree_at(prepared, path)
    assert form[0].shape == (width, CFG['d_model'])
    assert [p.shape for p in form[1]] == [(d1, n, w) for w in pieces]
    np.testing.assert_array_equal(form[0][:lowrank], np.asarray(plain[0]).T)
    m2 = np.concatenate(form[1], axis=-1)
    np.testing.assert_array_equal(m2[..., :lowrank],
                                  np.transpose(np.asarray(plain[1]), (1, 2, 0)))
    assert not np.asarray(form[0][lowrank:]).any() and not m2[..., lowrank:].any()

  ids = np.random.RandomState(0).randint(0, CFG['vocab_size'], (1, 10)).astype(np.int32)
  got = _stepped_logits(model, prepared, sampler._initial_state, ids, 4)
  # traced once, one-row steps
  assert calls == [[(d1, n, w) for w in pieces]] * CFG['n_layers']
  np.testing.assert_allclose(got, np.asarray(eval_model(ids)), atol=1e-5, rtol=1e-5)
  for got_sample, sample in zip(_samples(sampler, weights), samples):
    np.testing.assert_array_equal(got_sample, sample)


@pytest.mark.parametrize('mix', [
    dict(attention_sparsity=4), dict(attention_sparsity=4, share_qk=True),
    dict(attention_sparsity=4, ff_sparsity=8),
    dict(attention_sparsity=4, output_layer_type='mult')])  # not fused
def test_fused_sparse_qkv_decoding_gives_eval_logits_and_the_same_samples(
    mix, monkeypatch):
  """With the fused decoding blocks and sparse_qkv.FUSED_DECODING_GPU on (a
  CPU here, Pallas interpreted) one-row steps of the sparse-QKV attention
  run its kernels (FactoredDense with the norm; the convolutions' products
  from this and the remembered positions; per head the sums, the cache
  update and the attention): the logits equal eval mode's token by token, and the samples
  equal those of a Sampler without the fusion.  With an output layer the
  attention is not fused, and decodes as before."""
  from terraformer import sparse_qkv  # pylint: disable=g-import-not-at-top
  eval_model = models.TerraformerLM(mode='eval', **CFG, **mix)
  eval_model.init(shapes.ShapeDtype((1, 10), np.int32), rng=jax.random.PRNGKey(5))
  weights = _vectors_randomized(eval_model)
  samples = _samples(sampling.Sampler(models.TerraformerLM(mode='predict', **CFG, **mix)),
                     weights)

  _fusion_on(monkeypatch)
  # FactoredDense in blocks of 8 inputs: four parts of m to sum (d_model 32).
  monkeypatch.setattr(sparse_qkv, '_factored_parts', functools.partial(
      sparse_qkv._factored_parts, block=8))
  calls = []
  real = sparse_qkv._conv_attend
  monkeypatch.setattr(sparse_qkv, '_conv_attend',
                      lambda *a: calls.append(a[5].shape) or real(*a))
  model = models.TerraformerLM(mode='predict', **CFG, **mix)
  sampler = sampling.Sampler(model)
  prepared = sampler._decoding_weights(weights)
  ids = np.random.RandomState(2).randint(0, CFG['vocab_size'], (1, 10)).astype(np.int32)
  want = np.asarray(eval_model(ids))
  # A prompt of 1 (nothing remembered yet: the zero past) or 4 positions.
  for first in (1, 4):
    np.testing.assert_allclose(
        _stepped_logits(model, prepared, sampler._initial_state, ids, first),
        want, atol=1e-5, rtol=1e-5)
  fused = 'output_layer_type' not in mix
  parts = 2 if mix.get('share_qk') else 3
  if fused:  # every layer, in each trace of a one-row step
    assert calls and set(calls) == {(3, 3, 8, parts * 8)}
    assert len(calls) % CFG['n_layers'] == 0
  else:
    assert not calls
  for got, sample in zip(_samples(sampler, weights), samples):
    np.testing.assert_array_equal(got, sample)
