"""The lab's single-change variants and full Primer, against their equations."""
import jax
from jax import numpy as jnp
import numpy as np
import pytest
from trax import layers as tl
from trax import shapes

from primer_trax import layers as P
from primer_trax import models as M
from primer_trax import variants as V
from training import model as model_lib
from training import trainer as trainer_lib

RNG = jax.random.PRNGKey(0)
SIZE = dict(d_model=32, d_ff=64, n_layers=2, n_heads=4, max_len=16)


def _init(layer, x):
  layer.init(shapes.signature(x), rng=RNG)
  return layer


def _run(layer, x, weights):
  return layer.pure_fn(x, weights, layer.state, RNG)[0]


def _gelu(x):
  from scipy.special import erf  # pylint: disable=g-import-not-at-top
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def test_rms_norm_equation_and_dtype():
  """y = x / sqrt(mean(x^2) + 1e-6) * g."""
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 8)) * 3 + 1
  norm = _init(V.RMSNorm(), x)
  np.testing.assert_array_equal(norm.weights, np.ones(8))
  g = np.linspace(0.5, 2, 8).astype(np.float32)
  xn = np.asarray(x)
  want = xn / np.sqrt(np.mean(xn ** 2, -1, keepdims=True) + 1e-6) * g
  np.testing.assert_allclose(_run(norm, x, jnp.asarray(g)), want, rtol=1e-5)
  assert _run(norm, x.astype(jnp.bfloat16), jnp.asarray(g)).dtype == jnp.bfloat16


@pytest.mark.parametrize('d', [6, 7])
def test_token_shift_equation_and_predict_state(d):
  """y_t = [x_t[:c], x_{t-1}[c:]], c = ceil(d/2), x_{-1} = 0; predict == eval."""
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (2, 5, d)))
  layer = _init(V.TokenShift(mode='eval'), x)
  c = d - d // 2
  want = x.copy()
  want[:, 0, c:] = 0
  want[:, 1:, c:] = x[:, :-1, c:]
  got = np.asarray(layer(x))
  np.testing.assert_array_equal(got, want)
  pred = V.TokenShift(mode='predict')
  pred.init(shapes.signature(x[:, :1]))
  state, outs = pred.state, []
  out, state = pred.pure_fn(x[:, :2], (), state, RNG)  # prefill 2
  outs.append(out)
  for t in range(2, 5):
    out, state = pred.pure_fn(x[:, t:t + 1], (), state, RNG)
    outs.append(out)
  np.testing.assert_array_equal(np.concatenate(outs, 1), want)


@pytest.mark.parametrize('d_ff,hidden', [(3072, 2048), (2048, 1368), (64, 40), (6, 8)])
def test_glu_hidden_size_rounding(d_ff, hidden):
  """2/3 d_ff rounded to the nearest multiple of 8, at least 8."""
  assert V.glu_hidden_size(d_ff) == hidden


@pytest.mark.parametrize('name,act', [
    ('geglu', _gelu),
    ('swiglu', lambda a: a / (1 + np.exp(-a))),
    ('relu2_glu', lambda a: np.maximum(a, 0) ** 2)])
def test_gated_feed_forward_equation(name, act):
  """FFN(x) = (act(x W) * (x V)) W2, no biases, hidden = glu_hidden_size(d_ff)."""
  activation = M.VARIANTS[name].switches['activation']
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 16))
  ff = _init(V.GatedFeedForward(16, 48, activation, mode='eval'), x)
  wv, w2 = ff.weights[0], ff.weights[-1]
  assert wv.shape == (16, 2 * 32) and w2.shape == (32, 16)
  xn = np.asarray(x, np.float64)
  wv, w2 = np.asarray(wv, np.float64), np.asarray(w2, np.float64)
  want = (act(xn @ wv[:, :32]) * (xn @ wv[:, 32:])) @ w2
  np.testing.assert_allclose(ff(x), want, rtol=1e-4, atol=1e-5)


def test_glu_parameters_match_the_baseline_within_half_a_percent():
  """3 d h ~= 2 d d_ff + d_ff + d at the lab's 35M shape (d 512, d_ff 2048)."""
  x = jnp.zeros((1, 2, 512))
  base = _init(model_lib.FeedForward(512, 2048), x)
  glu = _init(V.GatedFeedForward(512, 2048), x)
  n_base = trainer_lib.count_params(base.weights)
  n_glu = trainer_lib.count_params(glu.weights)
  assert n_glu == 3 * 512 * 1368
  assert abs(n_glu / n_base - 1) < 0.005


def test_rezero_equation_one_shared_scalar():
  """x1 = x + a f(x), x2 = x1 + a g(x1), one a (initialised 0) for both."""
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 3, 8))
  block = _init(V.ReZero(tl.Dense(8), tl.Serial(tl.Dense(8), tl.Relu())), x)
  np.testing.assert_array_equal(block(x), x)  # identity at init
  alpha, (wf, bf), ((wg, bg), _) = block.weights[0], block.weights[2], block.weights[5]
  assert alpha.shape == () and float(alpha) == 0.0
  weights = list(block.weights)
  weights[0] = jnp.float32(0.3)
  got = _run(block, x, tuple(weights))
  xn = np.asarray(x)
  x1 = xn + 0.3 * (xn @ wf + bf)
  x2 = x1 + 0.3 * np.maximum(x1 @ wg + bg, 0)
  np.testing.assert_allclose(got, x2, rtol=1e-5, atol=1e-5)


def _find(layer, predicate):
  """Sublayers of `layer` (depth first, in order) for which predicate holds."""
  if predicate(layer):
    return [layer]
  return [f for s in layer.sublayers for f in _find(s, predicate)]


def test_prepost_block_equation():
  """Full Primer's block: x1 = x + A(norm1(x)), x2 = x1 + norm2(F(x1))."""
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 5, 16))
  kw = dict(d_model=16, d_ff=32, n_heads=2, mode='eval')
  block = _init(tl.Serial(model_lib.DecoderBlock(residual='prepost', **kw)), x)
  norm1, norm2 = _find(block, lambda l: isinstance(l, model_lib.LayerNorm))
  attention, = _find(block, lambda l: any(
      isinstance(s, model_lib.CausalDotProductAttention) for s in l.sublayers))
  feed, = _find(block, lambda l: l.sublayers and isinstance(l.sublayers[0], tl.Dense)
                and l.sublayers[0]._n_units == 32)  # pylint: disable=protected-access
  x1 = x + attention(norm1(x))
  x2 = x1 + norm2(feed(x1))
  np.testing.assert_allclose(block(x), x2, atol=1e-5)
  # The pre-norm baseline differs: x2 = x1 + F(norm2(x1)).
  base = _init(tl.Serial(model_lib.DecoderBlock(**kw)), x)
  assert np.abs(np.asarray(base(x) - x2)).max() > 1e-3


def test_shared_qk_attention_equation():
  """s = conv(x Ws + bs), k = s, q = s Wq', v = conv(x Wv + bv); causal softmax."""
  b, t, d, h = 2, 5, 8, 2
  x = jax.random.normal(jax.random.PRNGKey(6), (b, t, d))
  layer = _init(V.SharedQKAttention(d, h, mode='eval', qkv_layer=P.MultiDConv), x)
  (w, bias), taps, _, _, wq, _, _, (wo, bo) = jax.tree_util.tree_map(np.asarray, layer.weights)
  assert w.shape == (d, 2 * d) and taps.shape == (3, 2 * d) and wq.shape == (d, d)
  taps = np.asarray(jax.random.normal(jax.random.PRNGKey(7), taps.shape))
  weights = list(layer.weights)
  weights[1] = jnp.asarray(taps)
  got = _run(layer, x, tuple(weights))
  z = np.asarray(x) @ w + bias
  conv = taps[0] * z
  conv[:, 1:] += taps[1] * z[:, :-1]
  conv[:, 2:] += taps[2] * z[:, :-2]
  s, v = conv[..., :d], conv[..., d:]
  q, k = s @ wq, s
  split = lambda a: a.reshape(b, t, h, d // h)
  scores = np.einsum('bqhd,bkhd->bhqk', split(q), split(k)) / np.sqrt(d // h)
  scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.einsum('bhqk,bkhd->bqhd', p, split(v)).reshape(b, t, d) @ wo + bo
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_parameter_counts_match_the_baseline():
  """Every variant is within 2% of the baseline's parameters."""
  size = dict(d_model=128, d_ff=512, n_layers=1, n_heads=4, max_len=16)
  ids = jnp.zeros((1, 4), jnp.int32)
  counts = {}
  for name in [n for n, v in M.VARIANTS.items() if v.matched == 'params']:
    model = M.VariantLM(256, name, mode='eval', **size)
    model.init(shapes.signature(ids), rng=RNG)
    counts[name] = trainer_lib.count_params(model.weights)
  base = counts['baseline']
  for name, n in counts.items():
    assert abs(n / base - 1) < 0.02, (name, n, base)
  assert counts['token_shift'] == base
  assert counts['dconv'] == base + 3 * 3 * 128


# Variants with new structure or state.  The others are covered elsewhere:
# baseline (test_model), primer_ez = squared_relu + dconv (test_primer), and
# swiglu / relu2_glu differ from geglu only in a stateless activation.
PREDICT_CHECKED = ('token_shift', 'rezero', 'geglu', 'rmsnorm', 'primer', 'transformer_pp')


@pytest.mark.parametrize('name', PREDICT_CHECKED)
def test_variant_predict_equals_eval_and_is_causal(name):
  """Token-by-token decoding (after a 3-token prefill) gives eval mode's logits."""
  ids = jax.random.randint(jax.random.PRNGKey(8), (2, 6), 0, 40)
  size = dict(SIZE, n_layers=1)
  model = M.VariantLM(40, name, mode='eval', **size)
  model.init(shapes.signature(ids), rng=RNG)
  weights = model.weights
  if name in ('rezero', 'primer'):  # make a = 0.5 / non-default weights matter
    weights = jax.tree_util.tree_map(
        lambda w: jnp.full_like(w, 0.5) if w.shape == () else w, weights)
  want = _run(model, ids, weights)
  pred = M.VariantLM(40, name, mode='predict', **size)
  pred.init(shapes.ShapeDtype((2, 1), np.int32))
  step = pred.pure_fn
  state, outs = pred.state, []
  out, state = step(ids[:, :3], weights, state, RNG)
  outs.append(out)
  for t in range(3, 6):
    out, state = step(ids[:, t:t + 1], weights, state, RNG)
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, 1), want, atol=1e-5)
  changed = np.asarray(ids).copy()
  changed[:, 4] = (changed[:, 4] + 1) % 40
  np.testing.assert_allclose(_run(model, changed, weights)[:, :4], want[:, :4], atol=1e-6)


def test_variants_differ_from_the_baseline_where_they_should():
  """Same seed, same size: each variant's logits differ from the baseline's."""
  ids = jax.random.randint(jax.random.PRNGKey(9), (1, 6), 0, 40)
  outs = {}
  for name in ('baseline', 'squared_relu', 'token_shift', 'rmsnorm'):
    model = M.VariantLM(40, name, mode='eval', **SIZE)
    model.init(shapes.signature(ids), rng=RNG)
    outs[name] = np.asarray(model(ids))
  for name in ('squared_relu', 'token_shift', 'rmsnorm'):
    assert np.abs(outs[name] - outs['baseline']).max() > 1e-4, name


def test_primer_lm_versions_and_unknown_names():
  ids = jnp.zeros((1, 4), jnp.int32)
  ez = M.PrimerLM(40, 'ez', mode='eval', **SIZE)
  full = M.PrimerLM(40, 'full', mode='eval', **SIZE)
  for m in (ez, full):
    m.init(shapes.signature(ids), rng=RNG)
  assert 'SquaredRelu' in str(ez) and 'CausalDepthwiseConv' in str(ez)
  assert 'PackQKV' in str(full) and 'PackQKV' not in str(ez)
  with pytest.raises(ValueError, match="version must be one of"):
    M.PrimerLM(40, 'lite')
  with pytest.raises(ValueError, match="known variants: baseline, squared_relu"):
    M.VariantLM(40, 'swishglu')
  with pytest.raises(ValueError, match="residual must be one of"):
    model_lib.DecoderLM(40, residual='postnorm', **SIZE)


def test_baseline_unchanged_by_the_new_switches():
  """At their defaults the switches build the same tree as before they existed:
  same weights from the same seed, same logits."""
  ids = jax.random.randint(jax.random.PRNGKey(10), (1, 5), 0, 40)
  d, h = SIZE['d_model'], SIZE['n_heads']
  old = tl.Serial(
      model_lib.Embedding(40, d), tl.PositionalEncoding(max_len=SIZE['max_len'], mode='eval'),
      [[tl.Residual(model_lib.LayerNorm(),
                    model_lib.CausalSelfAttention(d, h, SIZE['max_len'], mode='eval'),
                    tl.Dropout(rate=0.0, mode='eval')),
        tl.Residual(model_lib.LayerNorm(), model_lib.FeedForward(d, SIZE['d_ff'], mode='eval'),
                    tl.Dropout(rate=0.0, mode='eval'))] for _ in range(SIZE['n_layers'])],
      model_lib.LayerNorm(), tl.Dense(40))
  old.init(shapes.signature(ids), rng=RNG)
  for new in (model_lib.DecoderLM(40, mode='eval', **SIZE),
              M.VariantLM(40, 'baseline', mode='eval', **SIZE)):
    new.init(shapes.signature(ids), rng=RNG)
    assert (jax.tree_util.tree_structure(new.weights)
            == jax.tree_util.tree_structure(old.weights))
    for a, b in zip(jax.tree_util.tree_leaves(new.weights),
                    jax.tree_util.tree_leaves(old.weights)):
      np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(new(ids), old(ids))
