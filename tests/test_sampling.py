"""On-device sampling: greedy decoding equals argmax of eval mode, step by step."""
import jax
import pytest
import numpy as np
from trax import shapes

from training import model as model_lib
from training import sampling

CFG = dict(vocab_size=40, d_model=32, d_ff=64, n_layers=2, n_heads=4, max_len=32)


def test_greedy_matches_eval_mode_argmax():
  eval_model = model_lib.DecoderLM(mode='eval', **CFG)
  eval_model.init(shapes.ShapeDtype((2, 4), np.int32), rng=jax.random.PRNGKey(1))
  prompt = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.int32)
  sampler = sampling.Sampler(model_lib.DecoderLM(mode='predict', **CFG), batch_size=2)
  got = sampler.generate(eval_model.weights, prompt, 10, temperature=0.0)
  # The slow way: rerun the whole sequence per token (eval_model(seq), but
  # jit-compiled once per length rather than op by op).
  apply, state, seq = jax.jit(eval_model.pure_fn), eval_model.state, prompt
  for _ in range(10):
    logits, state = apply(seq, eval_model.weights, state, eval_model.rng)
    seq = np.concatenate([seq, np.argmax(logits[:, -1], -1)[:, None]], 1).astype(np.int32)
  np.testing.assert_array_equal(got, seq[:, 4:])


def test_forced_logits_equal_eval_mode_logits():
  """Sampler.forced_logits runs the decoding step over given tokens: its
  logits equal eval mode's on the whole sequence, at batch 2."""
  eval_model = model_lib.DecoderLM(mode='eval', **CFG)
  eval_model.init(shapes.ShapeDtype((2, 9), np.int32), rng=jax.random.PRNGKey(3))
  tokens = np.random.RandomState(0).randint(0, 40, (2, 9)).astype(np.int32)
  want, _ = eval_model.pure_fn(tokens, eval_model.weights, eval_model.state,
                               eval_model.rng)
  sampler = sampling.Sampler(model_lib.DecoderLM(mode='predict', **CFG), batch_size=2)
  got = sampler.forced_logits(eval_model.weights, tokens)
  assert got.shape == (2, 9, 40)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  # Fed other tokens from position 5 on, the logits before it stay.
  other = tokens.copy()
  other[:, 5:] = (other[:, 5:] + 1) % 40
  changed = sampler.forced_logits(eval_model.weights, other)
  np.testing.assert_allclose(changed[:, :5], got[:, :5], atol=1e-6)
  assert np.abs(changed[:, 5:] - got[:, 5:]).max() > 1e-3
  with pytest.raises(ValueError, match='batch 2'):
    sampler.forced_logits(eval_model.weights, tokens[:1])


def test_choose_next_top_k_and_temperature():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
  draws = [int(sampling.choose_next(logits, jax.random.PRNGKey(i), 1.0, top_k=2)[0])
           for i in range(200)]
  assert set(draws) == {0, 1}  # only the two most likely
  assert 0.5 < draws.count(0) / 200 < 0.75  # 0.5 / 0.8 = 0.625 after renormalising
  assert int(sampling.choose_next(logits, jax.random.PRNGKey(0), 0.0)[0]) == 0


def test_too_long_generation_is_refused_with_the_cache_size():
  sampler = sampling.Sampler(model_lib.DecoderLM(mode='predict', **CFG), batch_size=1)
  assert sampler.max_length == 32
  eval_model = model_lib.DecoderLM(mode='eval', **CFG)
  eval_model.init(shapes.ShapeDtype((1, 4), np.int32))
  try:
    sampler.generate(eval_model.weights, np.zeros((1, 4), np.int32), 29)
  except ValueError as e:
    assert '33 tokens' in str(e) and 'max_len' in str(e)
  else:
    raise AssertionError('no error for 4 + 29 > 32 tokens')
  assert sampler.generate(eval_model.weights, np.zeros((1, 4), np.int32), 28).shape == (1, 28)


def test_one_token_steps_across_cache_length_buckets_equal_eval():
  """On a CPU a decoding step reads the cache up to a bucket length (128,
  256, ...); steps on both sides of a boundary give eval mode's logits."""
  cfg = dict(vocab_size=40, d_model=16, d_ff=32, n_layers=1, n_heads=2, max_len=300)
  eval_model = model_lib.DecoderLM(mode='eval', **cfg)
  eval_model.init(shapes.ShapeDtype((1, 140), np.int32))
  ids = np.random.RandomState(0).randint(0, 40, (1, 140)).astype(np.int32)
  want = np.asarray(eval_model(ids))
  predict = model_lib.DecoderLM(mode='predict', **cfg)
  predict.init(shapes.ShapeDtype((1, 1), np.int32))
  step = jax.jit(lambda x, s: predict.pure_fn(x, eval_model.weights, s, jax.random.PRNGKey(0)))
  _, state = step(ids[:, :120], predict.state)
  got = []
  for t in range(120, 140):  # positions 120..139 cross the 128 boundary
    logits, state = step(ids[:, t:t + 1], state)
    got.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(got, 1), want[:, 120:], atol=1e-5, rtol=1e-5)


def test_cpu_decoding_loop_is_compiled_without_ynn_fusions():
  """The decoding loop on a CPU compiles with CPU_DECODE_OPTIONS (this
  jaxlib knows them), and its program holds no YNNPACK fusion, while the same
  program compiled with XLA's defaults does (the multiply-and-sum attention)."""
  assert jax.default_backend() == 'cpu'
  assert sampling.decode_compiler_options() == sampling.CPU_DECODE_OPTIONS
  sampler = sampling.Sampler(model_lib.DecoderLM(mode='predict', **CFG), batch_size=1)
  args = (sampler._decoding_weights(sampler._template), np.zeros((1, 2), np.int32),
          jax.random.PRNGKey(0),
          4, 0.0, None)
  ours = sampler._generate.lower(*args).compile().as_text()
  default = jax.jit(sampler._generate_fn, static_argnums=(3, 4, 5)).lower(
      *args).compile().as_text()
  assert '%ynn_fusion' in default  # an instruction, not a frame name
  assert '%ynn_fusion' not in ours


def test_compiler_options_follow_the_backend_after_another_was_seen(monkeypatch):
  """A step traced for a GPU (the Triton-lowering tests pretend one) gets no
  options, and does not leave the CPU's decoding without its own."""
  with monkeypatch.context() as m:
    m.setattr(jax, 'default_backend', lambda: 'gpu')
    assert sampling.decode_compiler_options() is None
  assert sampling.decode_compiler_options() == sampling.CPU_DECODE_OPTIONS


def _dense_layers(layer):
  found = [layer] if isinstance(layer, model_lib.Dense) else []
  for sub in layer.sublayers:
    found += _dense_layers(sub)
  return found


def test_out_in_dot_equals_dot():
  rng = np.random.RandomState(0)
  w = rng.randn(8, 5).astype(np.float32)
  for shape in [(8,), (1, 1, 8), (3, 4, 8)]:
    x = rng.randn(*shape).astype(np.float32)
    got = jax.jit(model_lib.out_in_dot)(x, w.T.copy())
    np.testing.assert_allclose(got, x @ w, rtol=1e-5, atol=1e-5)


def test_cpu_decoding_hands_dense_kernels_transposed(monkeypatch):
  """On a CPU the Sampler marks every Dense (2 layers x 4, and the head),
  hands them their kernels transposed (made once per weight tree), and
  samples exactly what a Sampler without the transposition samples."""
  eval_model = model_lib.DecoderLM(mode='eval', **CFG)
  eval_model.init(shapes.ShapeDtype((2, 4), np.int32), rng=jax.random.PRNGKey(1))
  weights = eval_model.weights
  prompt = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.int32)
  model = model_lib.DecoderLM(mode='predict', **CFG)
  sampler = sampling.Sampler(model, batch_size=2)
  denses = _dense_layers(model)
  assert len(denses) == 9 and all(d._kernel_out_in for d in denses)
  assert sum(sampler._out_in) == 9

  prepared = sampler._decoding_weights(weights)
  plain = jax.tree_util.tree_leaves(weights)
  for leaf, moved, out_in in zip(plain, jax.tree_util.tree_leaves(prepared),
                                 sampler._out_in):
    if out_in:
      np.testing.assert_array_equal(moved, np.asarray(leaf).T)
    else:
      assert moved is leaf
  assert sampler._decoding_weights(weights) is prepared  # made once

  monkeypatch.setattr(sampling, 'CPU_KERNELS_OUT_IN', False)
  reference = sampling.Sampler(model_lib.DecoderLM(mode='predict', **CFG), batch_size=2)
  assert reference._out_in is None
  assert not any(d._kernel_out_in for d in _dense_layers(reference._model))
  for seed in (0, 1):
    np.testing.assert_array_equal(
        sampler.generate(weights, prompt, 12, temperature=1.0, seed=seed),
        reference.generate(weights, prompt, 12, temperature=1.0, seed=seed))

  # Other weights (a fresh init): transposed anew, sampled as the reference.
  other = model_lib.DecoderLM(mode='eval', **CFG)
  other.init(shapes.ShapeDtype((2, 4), np.int32), rng=jax.random.PRNGKey(7))
  assert sampler._decoding_weights(other.weights) is not prepared
  np.testing.assert_array_equal(
      sampler.generate(other.weights, prompt, 12, temperature=1.0),
      reference.generate(other.weights, prompt, 12, temperature=1.0))


def test_weak_reference_of_a_leaf_without_one_matches_nothing():
  leaf = np.ones((2,), np.float32)
  assert sampling._weak(leaf)() is leaf
  assert sampling._weak(np.float32(1.0))() is None  # numpy scalars take none


def test_gpu_kernels_out_in_switch(monkeypatch):
  """Off a CPU the Sampler hands Dense kernels over transposed only with
  GPU_KERNELS_OUT_IN; on a CPU, CPU_KERNELS_OUT_IN decides alone."""
  cases = [('cpu', True, False, True), ('cpu', False, True, False),
           ('gpu', True, False, False), ('gpu', False, True, True)]
  for backend, cpu_flag, gpu_flag, marked in cases:
    monkeypatch.setattr(sampling, 'CPU_KERNELS_OUT_IN', cpu_flag)
    monkeypatch.setattr(sampling, 'GPU_KERNELS_OUT_IN', gpu_flag)
    monkeypatch.setattr(sampling.jax, 'default_backend', lambda b=backend: b)
    model = model_lib.DecoderLM(mode='predict', **CFG)
    model.init(shapes.ShapeDtype((1, 1), np.int32))
    mask = sampling.decoding_out_in(model)
    assert (mask is not None and sum(mask) == 9) == marked, (backend, cpu_flag, gpu_flag)
    assert all(d._kernel_out_in == marked for d in _dense_layers(model))


def test_pre_norm_residual_has_trax_residuals_weights_and_outputs():
  """PreNormResidual(norm, body, dropout) holds the same weight and state
  trees as tl.Residual over the same layers and computes x + body(norm(x))."""
  from trax import layers as tl  # pylint: disable=g-import-not-at-top
  x = np.random.RandomState(0).randn(2, 3, 16).astype(np.float32)
  make = lambda: (model_lib.LayerNorm(), model_lib.FeedForward(16, 32, tl.Relu),
                  tl.Dropout(rate=0.0, mode='eval'))
  ours, theirs = model_lib.PreNormResidual(*make()), tl.Residual(*make())
  for layer in (ours, theirs):
    layer.init(shapes.signature(x), rng=jax.random.PRNGKey(2))
  shape = lambda t: jax.tree_util.tree_map(np.shape, t)
  assert shape(ours.weights) == shape(theirs.weights)
  assert shape(ours.state) == shape(theirs.state)
  norm, ff, _ = ours.sublayers[0].sublayers[-1].sublayers[-1].sublayers
  want = np.asarray(x) + np.asarray(ff(norm(x)))
  np.testing.assert_allclose(ours(x), want, atol=1e-6)
  theirs.weights = ours.weights
  np.testing.assert_allclose(theirs(x), want, atol=1e-6)


@pytest.mark.parametrize('build', ['DecoderLM', 'TerraformerLM'])
def test_fused_decoding_blocks_give_eval_logits_and_the_same_samples(build, monkeypatch):
  """With FUSED_DECODING_GPU (run here on a CPU, Pallas interpreted) each
  pre-norm block of a dense decoder with ReLU runs as fused products (norm
  inside the QKV and first feed-forward products, bias, ReLU and residual
  inside the others): step by step the logits equal eval mode's, and the
  samples equal those of the unfused decoder."""
  from terraformer import models  # pylint: disable=g-import-not-at-top
  from trax import layers as tl  # pylint: disable=g-import-not-at-top
  cfg = dict(CFG, max_len=16)
  if build == 'DecoderLM':
    make = lambda mode: model_lib.DecoderLM(mode=mode, activation=tl.Relu, **cfg)
  else:
    make = lambda mode: models.TerraformerLM(mode=mode, **cfg)
  eval_model = make('eval')
  eval_model.init(shapes.ShapeDtype((1, 8), np.int32), rng=jax.random.PRNGKey(4))
  weights = eval_model.weights
  ids = np.random.RandomState(1).randint(0, 40, (1, 8)).astype(np.int32)
  want = np.asarray(eval_model(ids))
  reference = sampling.Sampler(make('predict'))
  prompt = np.array([[3, 1, 4]], np.int32)
  samples = [reference.generate(weights, prompt, 6, temperature=1.0, seed=s)
             for s in (0, 1)]

  monkeypatch.setattr(model_lib, 'FUSED_DECODING_GPU', True)
  monkeypatch.setattr(model_lib, 'FUSED_ON_CPU', True)
  # The attention kernel as off the CPU too (interpreted): the fused blocks'
  # five kernels together, q, k and v read from the packed projection.
  packed = model_lib.decode_attention.one_query_attention_packed
  packed_calls = []
  monkeypatch.setattr(model_lib, '_one_query_kernel', lambda max_len, d_head: True)
  monkeypatch.setattr(model_lib.decode_attention, 'one_query_attention_packed',
                      lambda *a, **k: packed_calls.append(1) or packed(*a, interpret=True, **k))
  calls = []
  real = model_lib.gemv_lib.gemv_out_in
  monkeypatch.setattr(model_lib.gemv_lib, 'gemv_out_in', lambda *a, **k: calls.append(
      tuple(sorted(n for n in ('norm', 'relu', 'residual') if k.get(n) is not None
                   and k.get(n) is not False))) or real(*a, **k))
  model = make('predict')
  sampler = sampling.Sampler(model)
  prepared = sampler._decoding_weights(weights)
  step = jax.jit(model.pure_fn)
  state, got = sampler._initial_state, []
  for chunk in (ids[:, :3],) + tuple(ids[:, t:t + 1] for t in range(3, 8)):
    logits, state = step(chunk, prepared, state, jax.random.PRNGKey(0))
    got.append(logits)
  # Per layer, traced once: the four products, with their fused operations.
  assert sorted(calls) == sorted([('norm',), ('residual',), ('norm', 'relu'),
                                  ('residual',)] * cfg['n_layers'])
  np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=1e-5, rtol=1e-5)
  assert packed_calls and len(packed_calls) % cfg['n_layers'] == 0
  for s, sample in zip((0, 1), samples):
    np.testing.assert_array_equal(
        sampler.generate(weights, prompt, 6, temperature=1.0, seed=s), sample)

  # Two sequences at a time: the blocks decline (one row only) and decode as before.
  calls.clear()
  two = np.array([[3, 1, 4], [1, 5, 9]], np.int32)
  batched = sampling.Sampler(make('predict'), batch_size=2)
  monkeypatch.setattr(model_lib, 'FUSED_DECODING_GPU', False)
  plain = sampling.Sampler(make('predict'), batch_size=2).generate(
      weights, two, 5, temperature=1.0)
  monkeypatch.setattr(model_lib, 'FUSED_DECODING_GPU', True)
  np.testing.assert_array_equal(batched.generate(weights, two, 5, temperature=1.0), plain)
  assert not calls
