"""Sparse QKV attention and sparse loss: parity with trax, predict mode, causality.

The reference is `trax.layers.research.sparsity`.  With weights converted by
`weights_from_trax`, our layers must give trax's outputs to 1e-5 in 'eval'
mode and, token by token, in 'predict' mode; predict mode must also equal our
own eval mode on the whole sequence.
"""
import itertools

import jax
from jax import numpy as jnp
import numpy as np
import pytest
from trax import shapes
from trax.layers.research import sparsity as ref_lib

from terraformer import sparse_qkv as sq

RNG = jax.random.PRNGKey(0)
TOL = dict(atol=1e-5, rtol=1e-5)
# Two activation shapes, reused everywhere: on CPU most of the time goes to
# compiling each (op, shape) pair once, so new shapes cost more than new tests.
#     A: batch 2, length 4, d 16, sparsity 4;  B: batch 1, length 3, d 12, sparsity 3.


def _x(shape, seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _init(layer, shape, dtype=jnp.float32):
  layer.init(shapes.ShapeDtype(shape, dtype), rng=RNG)
  return layer


def _pair(make_ref, make_ours, shape):
  """Initialised (reference, ours), ours holding the reference's weights."""
  ref = _init(make_ref(), shape)
  ours = _init(make_ours(), shape)
  ours.weights = sq.weights_from_trax(ref, ours)
  return ref, ours


def _decode(layer, x, first=1):
  """Runs a predict-mode layer on x[:, :first], then one position at a time."""
  outs = [layer(x[:, :first])]
  outs += [layer(x[:, i:i + 1]) for i in range(first, x.shape[1])]
  return np.concatenate(outs, axis=1)


# ----------------------------------------------------------------- FactoredDense

@pytest.mark.parametrize('n_modules,d_in,d_out,use_bias,batch_shape', [
    (4, 16, 16, True, (2, 4)),
    (3, 12, 12, False, (1, 3)),
    (4, 16, 16, True, (2, 1, 4)),
])
def test_factored_dense_matches_trax(n_modules, d_in, d_out, use_bias,
                                     batch_shape):
  shape = batch_shape + (d_in,)
  ref, ours = _pair(
      lambda: ref_lib.FactoredDense(n_modules, d_in, d_out, use_bias=use_bias),
      lambda: sq.FactoredDense(n_modules, d_in, d_out, use_bias=use_bias),
      shape)
  x = _x(shape)
  got = ours(x)
  assert got.shape == batch_shape + (d_out,)
  np.testing.assert_allclose(got, ref(x), **TOL)


def test_factored_dense_equation_and_bfloat16_weights():
  """y[b, s*M + m] = sum_i x[b, i] D[s, i] E[i, m] + bias, with bf16 weights."""
  layer = _init(sq.FactoredDense(3, 4, 6, use_bfloat16=True), (2, 4))
  gating, projection, bias = layer.weights
  assert gating.dtype == projection.dtype == bias.dtype == jnp.bfloat16
  assert gating.shape == (3, 4) and projection.shape == (4, 2)
  x = np.asarray(_x((2, 4)))
  d, e, b = (np.asarray(w, np.float32) for w in layer.weights)
  want = np.stack([x @ (d[s][:, None] * e) for s in range(3)], 1).reshape(2, 6)
  np.testing.assert_allclose(layer(x), want + b, atol=1e-2)
  ref = _init(ref_lib.FactoredDense(3, 4, 6, use_bfloat16=True), (2, 4))
  # In bfloat16 (8-bit mantissa) the two multiply D, E and x in different
  # orders, so they agree to bfloat16 rounding, not to 1e-5.
  np.testing.assert_allclose(
      np.asarray(layer(x, weights=sq.weights_from_trax(ref, layer)), np.float32),
      np.asarray(ref(x), np.float32), atol=2e-2, rtol=2e-2)


# -------------------------------------------------------------- LocallyConvDense

CONV_CASES = [
    # n_modules, n_units, kernel_size, length_kernel_size, (batch, length, d_in)
    (4, 4, 3, 3, (2, 4, 16)),   # the Q/K conv of attention shape A
    (4, 4, 1, 3, (2, 4, 32)),   # the V conv of A with v_concat 'original'
    (3, 4, 3, 2, (1, 3, 12)),   # the Q/K conv of attention shape B
    (4, 4, 5, 1, (2, 4, 16)),   # wider module kernel, no length kernel
    (1, 16, 3, 3, (2, 4, 16)),  # one module: trax makes it a plain Dense
]


@pytest.fixture(params=[False, True], ids=['predict_conv', 'predict_matmul'])
def predict_path(request, monkeypatch):
  """Runs a test with either way of computing LocallyConvDense in predict mode."""
  monkeypatch.setattr(sq, 'PREDICT_AS_MATMUL', request.param)
  return request.param


@pytest.mark.parametrize('n_modules,n_units,kernel,length_kernel,shape',
                         CONV_CASES)
def test_locally_conv_dense_matches_trax_eval_and_predict(
    n_modules, n_units, kernel, length_kernel, shape, predict_path):
  args = (n_modules, n_units)
  kw = dict(kernel_size=kernel, length_kernel_size=length_kernel)
  batch, length, d_in = shape
  x = _x(shape)
  ref, ours = _pair(lambda: ref_lib.LocallyConvDense(*args, 'eval', **kw),
                    lambda: sq.LocallyConvDense(*args, 'eval', **kw), shape)
  want = ref(x)
  assert want.shape == (batch, length, n_modules * n_units)
  np.testing.assert_allclose(ours(x), want, **TOL)

  ref_p, ours_p = _pair(lambda: ref_lib.LocallyConvDense(*args, 'predict', **kw),
                        lambda: sq.LocallyConvDense(*args, 'predict', **kw),
                        (batch, 1, d_in))
  ours_p.weights = ours.weights
  ref_p.weights = ref.weights
  np.testing.assert_allclose(_decode(ours_p, x), _decode(ref_p, x), **TOL)


def test_locally_conv_dense_predict_equals_eval_after_prefill(predict_path):
  """A 2-token prefill then single tokens give eval mode's outputs."""
  x = _x((2, 4, 16))
  layer = _init(sq.LocallyConvDense(4, 4, 'eval', 3, 3), x.shape)
  pred = _init(sq.LocallyConvDense(4, 4, 'predict', 3, 3), (2, 2, 16))
  pred.weights = layer.weights
  np.testing.assert_allclose(_decode(pred, x, first=2), layer(x), **TOL)


def test_locally_conv_dense_equation():
  """y[t, s] = b + sum_{a, c} x[t - a, s + c - 1] @ K[2 - a, c], zero outside."""
  n_mod, c_in, units, length = 4, 4, 4, 4
  layer = _init(sq.LocallyConvDense(n_mod, units, 'eval', 3, 3),
                (2, length, n_mod * c_in))
  kernel, bias = (np.asarray(w) for w in layer.weights)
  x = np.asarray(_x((2, length, n_mod * c_in)))
  xm = x[1].reshape(length, n_mod, c_in)
  want = np.zeros((length, n_mod, units), np.float32) + bias
  for t, s, a, c in itertools.product(range(length), range(n_mod), range(3),
                                      range(3)):
    if t - a >= 0 and 0 <= s + c - 1 < n_mod:
      want[t, s] += xm[t - a, s + c - 1] @ kernel[2 - a, c]
  np.testing.assert_allclose(layer(x)[1], want.reshape(length, -1), **TOL)


# ------------------------------------------------ MultiplicativeConvCausalAttention

ATTENTION_SHAPES = [  # two shapes only: each new shape costs compilations
    dict(d_feature=16, n_heads=2, sparsity=4, length_kernel_size=3, b=2, t=4),
    dict(d_feature=12, n_heads=3, sparsity=None, length_kernel_size=2, b=1, t=3),
]
OPTIONS = list(itertools.product(
    [False, True], sq.OUTPUT_LAYER_TYPES, sq.V_CONCAT_TYPES))


@pytest.mark.parametrize('index', range(len(OPTIONS)),
                         ids=['share%d-%s-%s' % o for o in OPTIONS])
def test_attention_matches_trax_eval_and_predict(index):
  """Every option combination trax's test covers, over four shapes."""
  share_qk, output_layer_type, v_concat_type = OPTIONS[index]
  cfg = dict(ATTENTION_SHAPES[index % len(ATTENTION_SHAPES)])
  b, t = cfg.pop('b'), cfg.pop('t')
  cfg.update(share_qk=share_qk, output_layer_type=output_layer_type,
             v_concat_type=v_concat_type)
  d = cfg['d_feature']
  x = _x((b, t, d), seed=index)
  ref, ours = _pair(
      lambda: ref_lib.MultiplicativeConvCausalAttention(mode='eval', **cfg),
      lambda: sq.MultiplicativeConvCausalAttention(mode='eval', **cfg),
      x.shape)
  want = ref(x)
  got = ours(x)
  assert got.shape == (b, t, d)
  np.testing.assert_allclose(got, want, **TOL)

  ref_p, ours_p = _pair(
      lambda: ref_lib.MultiplicativeConvCausalAttention(mode='predict', **cfg),
      lambda: sq.MultiplicativeConvCausalAttention(mode='predict', **cfg),
      (b, 1, d))
  ref_p.weights, ours_p.weights = ref.weights, ours.weights
  decoded = _decode(ours_p, x)
  np.testing.assert_allclose(decoded, _decode(ref_p, x), **TOL)
  np.testing.assert_allclose(decoded, got, **TOL)  # predict == eval


@pytest.mark.parametrize('v_concat_type', ['none', 'fixed'])
def test_attention_predict_in_a_jitted_scan_equals_eval(predict_path,
                                                        v_concat_type):
  """The predict state keeps its structure, so decoding can be one lax.scan.

  'none': Q, K and V run as one convolution in predict mode; 'fixed': Q and
  K do, V apart; either way one remembered history, not one per conv.
  """
  cfg = dict(d_feature=16, n_heads=2, sparsity=4, v_concat_type=v_concat_type)
  x = _x((2, 4, 16))
  model = _init(sq.MultiplicativeConvCausalAttention(mode='eval', **cfg), x.shape)
  pred = _init(sq.MultiplicativeConvCausalAttention(
      mode='predict', max_inference_length=4, **cfg), (2, 1, 16))

  def step(state, x_t):
    y, state = pred.pure_fn(x_t[:, None], model.weights, state, RNG)
    return state, y[:, 0]

  _, ys = jax.jit(lambda s, xs: jax.lax.scan(step, s, xs))(
      pred.state, jnp.swapaxes(x, 0, 1))
  np.testing.assert_allclose(jnp.swapaxes(ys, 0, 1), model(x), **TOL)
  # The state: one (batch, 2, width) history of the convs' inputs and its
  # count, plus the key/value caches (2, 4, 8) each and their index.
  width = 16 if v_concat_type == 'none' else 32
  shapes = sorted(np.shape(a) for a in jax.tree_util.tree_leaves(pred.state))
  assert shapes == sorted([(), (), (2, 2, width), (4, 4, 8), (4, 4, 8)])


@pytest.mark.parametrize('length_kernel_size', [2, 3, 4])
def test_attention_predict_in_chunks_of_any_length_equals_eval(
    length_kernel_size):
  """Calls of 1, 3, 1, 2 and 1 positions (a prefill mid-way, chunks longer
  and shorter than the remembered past) continue the sequence exactly: the
  remembered history is a ring whose slots then wrap at every offset."""
  cfg = dict(d_feature=16, n_heads=2, sparsity=4,
             length_kernel_size=length_kernel_size)
  x = _x((2, 8, 16), seed=length_kernel_size)
  model = _init(sq.MultiplicativeConvCausalAttention(mode='eval', **cfg),
                x.shape)
  pred = _init(sq.MultiplicativeConvCausalAttention(
      mode='predict', max_inference_length=8, **cfg), (2, 1, 16))
  pred.weights = model.weights
  bounds = [0, 1, 4, 5, 7, 8]
  got = np.concatenate([pred(x[:, a:b]) for a, b in zip(bounds, bounds[1:])],
                       axis=1)
  np.testing.assert_allclose(got, model(x), **TOL)


@pytest.mark.parametrize('make', [
    lambda: sq.MultiplicativeConvCausalAttention(
        16, n_heads=2, sparsity=4, output_layer_type='multconv',
        v_concat_type='original', mode='eval'),
    lambda: sq.LocallyConvDense(4, 4, 'eval', kernel_size=3,
                                length_kernel_size=3),
], ids=['attention', 'conv'])
def test_causality(make):
  """Changing position 2 changes no output before 2, and changes output 2."""
  x = np.asarray(_x((2, 4, 16)))
  layer = _init(make(), x.shape)
  x2 = x.copy()
  x2[:, 2] += 1.0
  y, y2 = layer(x), layer(x2)
  np.testing.assert_array_equal(y[:, :2], y2[:, :2])
  assert np.abs(y[:, 2] - y2[:, 2]).max() > 1e-3


# ------------------------------------------------------------------- sparse loss

@pytest.mark.parametrize('sparsity_type,sparsity,prob_sparse,use_bias', [
    ('mult', 4, None, True),   # Terraformer's loss_sparsity
    ('mult', 8, None, False),
    ('mult', 4, 0.5, True),    # loss_sparsity_prob; eval always uses sparse
    (None, 0, None, True),
    ('mult', 0, None, True),   # sparsity 0 means Dense
    ('lowrank', 4, None, True),
    ('einsum', 4, None, False),
    ('local3', 4, None, True),  # 'local' is the same with kernel 1
])
def test_sparse_loss_matches_trax(sparsity_type, sparsity, prob_sparse,
                                  use_bias):
  kw = dict(n_units=16, d_input=16, sparsity_type=sparsity_type,
            sparsity=sparsity, d_lowrank=4, prob_sparse=prob_sparse,
            use_bias=use_bias, mode='eval')
  ref, ours = _pair(lambda: ref_lib.SparseDenseWithOptions(**kw),
                    lambda: sq.SparseDenseWithOptions(**kw), (2, 4, 16))
  x = _x((2, 4, 16))
  got = ours(x)
  assert got.shape == (2, 4, 16)
  np.testing.assert_allclose(got, ref(x), **TOL)


def test_sparse_loss_uses_sparse_branch_in_eval_with_prob_sparse():
  """With prob_sparse, eval output equals the sparse branch alone."""
  layer = _init(sq.SparseDenseWithOptions(16, 16, 'mult', 4, prob_sparse=0.01,
                                          mode='eval'), (2, 4, 16))
  sparse_only = _init(sq.SparseDenseWithOptions(16, 16, 'mult', 4), (2, 4, 16))
  x = _x((2, 4, 16))
  _, sparse_weights, _ = layer.weights
  np.testing.assert_allclose(layer(x), sparse_only(x, weights=sparse_weights),
                             **TOL)


# -------------------------------------------------------------------- bad input

@pytest.mark.parametrize('make,match', [
    (lambda: sq.MultiplicativeConvCausalAttention(10, n_heads=2, sparsity=4),
     'multiple of sparsity'),
    (lambda: sq.MultiplicativeConvCausalAttention(12, n_heads=5, sparsity=4),
     'multiple of n_heads'),
    (lambda: sq.MultiplicativeConvCausalAttention(8, 2, length_kernel_size=0),
     'length_kernel_size must be a positive integer'),
    (lambda: sq.MultiplicativeConvCausalAttention(8, 2, output_layer_type='x'),
     'output_layer_type'),
    (lambda: sq.MultiplicativeConvCausalAttention(8, 2, v_concat_type='x'),
     'v_concat_type'),
    (lambda: sq.LocallyConvDense(2, 4, 'eval', kernel_size=0),
     'kernel_size must be a positive integer'),
    (lambda: sq.LocallyConvDense(2, 4, 'eval', kernel_size=2), 'must be odd'),
    (lambda: sq.LocallyConvDense(2, 4, 'eval', length_kernel_size=0),
     'length_kernel_size must be a positive integer'),
    (lambda: sq.LocallyConvDense(2, 4, 'decode'), 'mode must be one of'),
    (lambda: sq.FactoredDense(4, 8, 10), r'd_out \(10\) must be a multiple'),
    (lambda: sq.SparseDenseWithOptions(10, 8, 'local', 4), 'multiple of'),
    (lambda: sq.SparseDenseWithOptions(10, 8, 'sparse', 2), 'sparsity_type'),
])
def test_bad_arguments_raise_value_error(make, match):
  with pytest.raises(ValueError, match=match):
    make()


@pytest.mark.parametrize('ref_kwargs,match', [
    (dict(v_concat_type='original', output_layer_type='mult'),
     'expects an array of shape'),
    (dict(), 'ran out'),
    (dict(output_layer_type='multconv'), 'left over'),
])
def test_converter_rejects_a_differently_built_reference(ref_kwargs, match):
  ours = _init(sq.MultiplicativeConvCausalAttention(
      16, 2, sparsity=4, output_layer_type='mult', mode='eval'), (2, 4, 16))
  ref = _init(ref_lib.MultiplicativeConvCausalAttention(
      16, 2, sparsity=4, mode='eval', **ref_kwargs), (2, 4, 16))
  with pytest.raises(ValueError, match=match):
    sq.weights_from_trax(ref, ours)


def test_input_width_mismatch_is_reported():
  layer = sq.FactoredDense(4, 12, 16)
  with pytest.raises(Exception, match='built for inputs of width 12'):
    layer.init(shapes.ShapeDtype((2, 4, 16)))


def test_sparse_loss_infers_d_input():
  """d_input=None (which trax's 'mult' cannot init) takes the input width."""
  given = _init(sq.SparseDenseWithOptions(16, 16, 'mult', 4), (2, 4, 16))
  inferred = _init(sq.SparseDenseWithOptions(16, None, 'mult', 4), (2, 4, 16))
  x = _x((2, 4, 16))
  np.testing.assert_array_equal(inferred(x, weights=given.weights), given(x))
