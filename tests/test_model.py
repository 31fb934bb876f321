"""The baseline DecoderLM: parity with trax, the attention equation, predict mode."""
import jax
from jax import numpy as jnp
import numpy as np
import pytest
from trax import layers as tl
from trax import shapes

from training import model as model_lib

RNG = jax.random.PRNGKey(0)


def _init(layer, shape, dtype=np.int32):
  layer.init(shapes.ShapeDtype(shape, dtype), rng=RNG)
  return layer


def _lm(mode, **kw):
  cfg = dict(vocab_size=50, d_model=32, d_ff=64, n_layers=2, n_heads=4, max_len=40)
  cfg.update(kw)
  return model_lib.DecoderLM(mode=mode, **cfg)


@pytest.mark.parametrize('d_model,n_heads,length', [(16, 1, 5), (32, 4, 9), (48, 6, 17)])
def test_attention_matches_trax_causal_attention(d_model, n_heads, length):
  """With converted weights, ours equals tl.CausalAttention in eval mode to 1e-5."""
  x = jax.random.normal(jax.random.PRNGKey(1), (3, length, d_model))
  ref = tl.CausalAttention(d_model, n_heads=n_heads, mode='eval')
  ref.init(shapes.signature(x), rng=RNG)
  ours = model_lib.CausalSelfAttention(d_model, n_heads, mode='eval')
  ours.init(shapes.signature(x), rng=RNG)
  weights = model_lib.attention_weights_from_trax(ref)
  want = ref(x)
  got, _ = ours.pure_fn(x, weights, ours.state, RNG)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_attention_equation():
  """out_h = softmax(q_h k_h^T / sqrt(d_h) + causal mask) v_h, heads concatenated."""
  b, t, d, h = 2, 6, 12, 3
  qkv = jax.random.normal(jax.random.PRNGKey(2), (b, t, 3 * d))
  layer = model_lib.CausalDotProductAttention(h, mode='eval')
  layer.init(shapes.signature(qkv))
  got = layer(qkv)
  q, k, v = [a.reshape(b, t, h, d // h) for a in np.split(np.asarray(qkv), 3, axis=-1)]
  scores = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(d // h)
  scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want = np.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, t, d)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_layer_norm_matches_trax_and_keeps_dtype():
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 8)) * 3 + 1
  ref = tl.LayerNorm()
  ref.init(shapes.signature(x), rng=RNG)
  ours = model_lib.LayerNorm()
  ours.init(shapes.signature(x), rng=RNG)
  np.testing.assert_allclose(ours.pure_fn(x, ref.weights, (), RNG)[0], ref(x), atol=1e-5)
  y = ours.pure_fn(x.astype(jnp.bfloat16), ref.weights, (), RNG)[0]
  assert y.dtype == jnp.bfloat16


@pytest.mark.parametrize('offset,spread', [(0.0, 1.0), (100.0, 1.0),
                                           (-3.0, 1e-2), (0.0, 300.0)])
def test_layer_norm_one_position_matches_the_equation(offset, spread):
  """The one-pass moments of a decoding step (one position), in float64 terms.

  Rows of width 1024 with a mean large against their spread, where a plain
  E[x^2] - E[x]^2 in float32 loses about 1e-3 at offset 100; compared with
  the float64 LayerNorm (trax's two-pass float32 form is itself 5e-5 off at
  spread 1e-2, so the reference is the equation, not trax).
  """
  x = jax.random.normal(jax.random.PRNGKey(4), (3, 1, 1024)) * spread + offset
  scale = jax.random.normal(jax.random.PRNGKey(5), (1024,)) + 1.0
  bias = jax.random.normal(jax.random.PRNGKey(6), (1024,))
  ours = model_lib.LayerNorm()
  got = jax.jit(lambda x: ours.pure_fn(x, (scale, bias), (), RNG)[0])(x)
  x64 = np.asarray(x, np.float64)
  norm = ((x64 - x64.mean(-1, keepdims=True))
          / np.sqrt(x64.var(-1, keepdims=True) + 1e-6))
  want = norm * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)
  np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize('vocab', [50, model_lib.ONE_HOT_MAX_VOCAB + 1])
def test_embedding_matches_trax(vocab):
  """One-hot (small vocab) and gather (large vocab) both equal tl.Embedding."""
  ids = jax.random.randint(jax.random.PRNGKey(5), (3, 7), 0, vocab)
  ref = tl.Embedding(vocab, 16)
  ref.init(shapes.signature(ids), rng=RNG)
  ours = model_lib.Embedding(vocab, 16)
  ours.init(shapes.signature(ids), rng=RNG)
  np.testing.assert_array_equal(ours.pure_fn(ids, ref.weights, (), RNG)[0], ref(ids))


def test_predict_mode_equals_eval_mode():
  """Token-by-token decoding (after a 3-token prefill) gives eval mode's logits."""
  _assert_decoding_equals_eval(jax.random.randint(jax.random.PRNGKey(4), (2, 12), 0, 50),
                               prefill=3)


def _assert_decoding_equals_eval(ids, prefill):
  """Predict mode on ids[:, :prefill], then one id at a time == eval's logits."""
  eval_model = _init(_lm('eval'), ids.shape)
  want = eval_model(ids)
  predict = _init(_lm('predict'), (ids.shape[0], 1))
  weights, state = eval_model.weights, predict.state
  logits, state = predict.pure_fn(ids[:, :prefill], weights, state, RNG)
  outs = [logits]
  for t in range(prefill, ids.shape[1]):
    logits, state = predict.pure_fn(ids[:, t:t + 1], weights, state, RNG)
    outs.append(logits)
  np.testing.assert_allclose(np.concatenate(outs, axis=1), want, atol=1e-5)


def test_causal():
  """Changing a later token changes no earlier logits."""
  model = _init(_lm('eval'), (1, 10))
  ids = np.arange(10, dtype=np.int32)[None] % 50
  changed = ids.copy()
  changed[0, 6] = 49
  a, b = model(ids), model(changed)
  np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6)
  assert np.abs(np.asarray(a[:, 6:] - b[:, 6:])).max() > 1e-4


def test_output_shape_and_modes():
  model = _init(_lm('train'), (3, 7))
  assert model(np.zeros((3, 7), np.int32)).shape == (3, 7, 50)
  with pytest.raises(ValueError, match='mode must be one of'):
    _lm('decode')
  with pytest.raises(ValueError, match='multiple of n_heads'):
    _lm('eval', d_model=30, n_heads=4)


@pytest.mark.parametrize('shape', [(1, 1, 24), (24,), (1, 24)])
def test_one_row_dot_as_gemm_equals_dot(shape, monkeypatch):
  """one_row_dot(x, W) = x W for a single row, in the two-row GEMM form too."""
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  w = jax.random.normal(jax.random.PRNGKey(2), (24, 40))
  want = np.einsum('...i,io->...o', np.asarray(x, np.float64), np.asarray(w, np.float64))
  monkeypatch.setattr(model_lib, 'ONE_ROW_AS_GEMM', True)
  got = jax.jit(model_lib.one_row_dot)(x, w)
  assert got.shape == shape[:-1] + (40,)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  dots = jax.jit(model_lib.one_row_dot).lower(x, w).as_text().count('dot_general')
  assert dots == 1
  two_rows = jax.make_jaxpr(model_lib.one_row_dot)(x, w)
  assert any(e.primitive.name == 'dot_general' and e.invars[0].aval.shape[0] == 2
             for e in two_rows.eqns)


def test_dense_predict_with_pallas_gemv_equals_eval(monkeypatch):
  """Decoding with every Dense's single row through training.gemv (run by
  Pallas's interpreter here) gives eval's logits."""
  monkeypatch.setattr(model_lib, 'GEMV_ON_CPU', True)
  monkeypatch.setattr(model_lib, 'ONE_ROW_GPU_FORMS',
                      {'ff': 'gemv', 'attention': 'gemv', 'head': 'gemv'})
  calls = []
  real = model_lib.gemv_lib.gemv
  monkeypatch.setattr(model_lib.gemv_lib, 'gemv',
                      lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
  _assert_decoding_equals_eval(jax.random.randint(jax.random.PRNGKey(6), (1, 6), 0, 50),
                               prefill=1)
  assert calls, 'no Dense took the gemv form'


def test_dense_predict_one_row_gemm_equals_eval(monkeypatch):
  """Decoding with FeedForward's Dense as a two-row GEMM gives eval's logits."""
  monkeypatch.setattr(model_lib, 'ONE_ROW_AS_GEMM', True)
  _assert_decoding_equals_eval(jax.random.randint(jax.random.PRNGKey(5), (1, 6), 0, 50),
                               prefill=1)


def test_dense_out_in_one_row_takes_the_pallas_kernel(monkeypatch):
  """A Dense given its kernel transposed multiplies a single row through
  training.gemv.gemv_out_in where its role's form is 'gemv' (run by Pallas's
  interpreter here), and gives x W + b; more rows take out_in_dot."""
  monkeypatch.setattr(model_lib, 'GEMV_ON_CPU', True)
  monkeypatch.setattr(model_lib, 'ONE_ROW_GPU_FORMS',
                      {'ff': 'gemv', 'attention': 'dot', 'head': 'dot'})
  calls = []
  real = model_lib.gemv_lib.gemv_out_in
  monkeypatch.setattr(model_lib.gemv_lib, 'gemv_out_in',
                      lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
  rng = np.random.RandomState(0)
  w, b = rng.randn(64, 96).astype(np.float32), rng.randn(96).astype(np.float32)
  for role, n_rows, expect_calls in (('ff', 1, 1), ('attention', 1, 1), ('ff', 3, 1)):
    layer = model_lib.Dense(96, role=role)
    layer.use_kernel_out_in()
    x = rng.randn(1, n_rows, 64).astype(np.float32)
    layer.init(shapes.signature(x))
    layer.weights = (jnp.asarray(w.T), jnp.asarray(b))
    np.testing.assert_allclose(layer(x), x @ w + b, rtol=1e-5, atol=1e-4)
    assert len(calls) == expect_calls, (role, n_rows, calls)
  assert calls == [(96, 64)]
