"""training.gemv: the Pallas one-row product, run by Pallas's interpreter here."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from training import gemv as gemv_lib


@pytest.mark.parametrize('d_in,d_out,tiling', [
    (64, 96, {}),
    (256, 320, {}),
    (128, 64, dict(block_n=16, block_k=16, split_k=4)),
    (128, 64, dict(block_n=64, block_k=32, split_k=1)),
])
def test_gemv_equals_the_product(d_in, d_out, tiling):
  """gemv(x, W) = x W (float64 reference) for one row, any tiling that fits."""
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 1, d_in))
  w = jax.random.normal(jax.random.PRNGKey(2), (d_in, d_out))
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  got = gemv_lib.gemv(x, w, interpret=True, **tiling)
  assert got.shape == (1, 1, d_out) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_gemv_bfloat16_weights_accumulate_in_float32():
  """bf16 weights: products summed in float32, result in the inputs' dtype."""
  x = jax.random.normal(jax.random.PRNGKey(3), (1, 128)).astype(jnp.bfloat16)
  w = jax.random.normal(jax.random.PRNGKey(4), (128, 64)).astype(jnp.bfloat16)
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  got = gemv_lib.gemv(x, w, interpret=True)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-2, atol=5e-2)


@pytest.mark.parametrize('shape,tiling,needle', [
    ((2, 64), {}, 'one row'),
    ((1, 64), dict(block_n=48), 'block_n=48'),
    ((1, 64), dict(block_k=16, split_k=8), 'split_k'),
    ((1, 96), dict(block_k=32, split_k=1), 'power of 2'),
])
def test_gemv_bad_tiling_is_named(shape, tiling, needle):
  """A row count or tiling that does not fit the matrix raises a ValueError."""
  w = jnp.zeros((shape[-1], 96))
  with pytest.raises(ValueError, match=needle):
    gemv_lib.gemv(jnp.zeros(shape), w, interpret=True, **tiling)


def test_default_tiling_fits_the_decoder_shapes():
  """The default tiling is valid for every matrix of the 800M decoder."""
  for d_in, d_out in [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024),
                      (1024, 6144), (6144, 1024), (1024, 32000)]:
    block_n, block_k, _, split_k = gemv_lib.default_tiling(d_in, d_out)
    gemv_lib.check_shapes(d_in, d_out, block_n, block_k, split_k)


@pytest.mark.parametrize('d_out,d_in,tiling', [
    (96, 64, {}),
    (3072, 1024, {}),
    (64, 128, dict(block_n=4, block_k=32)),
    (8, 256, dict(block_n=8, block_k=256)),
])
def test_gemv_out_in_equals_the_product(d_out, d_in, tiling):
  """gemv_out_in(x, W_t) = x W_t^T (float64 reference) for a kernel stored
  (d_out, d_in)."""
  x = jax.random.normal(jax.random.PRNGKey(5), (1, 1, d_in))
  w_t = jax.random.normal(jax.random.PRNGKey(6), (d_out, d_in))
  want = np.asarray(x, np.float64) @ np.asarray(w_t, np.float64).T
  got = gemv_lib.gemv_out_in(x, w_t, interpret=True, **tiling)
  assert got.shape == (1, 1, d_out) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_gemv_out_in_bfloat16_is_the_float32_sum_rounded_once():
  """bf16 kernel and row: the kernel sums in float32 and writes bf16 itself
  (no convert after it): exactly the float32 result rounded to bf16."""
  x = jax.random.normal(jax.random.PRNGKey(3), (1, 256)).astype(jnp.bfloat16)
  w_t = jax.random.normal(jax.random.PRNGKey(4), (64, 256)).astype(jnp.bfloat16)
  residual = jax.random.normal(jax.random.PRNGKey(5), (64,)).astype(jnp.bfloat16)
  got = gemv_lib.gemv_out_in(x, w_t, residual=residual, interpret=True)
  f32 = gemv_lib.gemv_out_in(x.astype(jnp.float32), w_t.astype(jnp.float32),
                             residual=residual.astype(jnp.float32), interpret=True)
  assert got.dtype == jnp.bfloat16 and f32.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(f32.astype(jnp.bfloat16), np.float32))


@pytest.mark.parametrize('options', [
    dict(norm=True), dict(bias=True, relu=True), dict(bias=True, residual=True),
    dict(norm=True, bias=True, relu=True, residual=True)])
@pytest.mark.parametrize('tiling', [{}, dict(block_n=2, block_k=32)])
def test_gemv_out_in_fused_operations_equal_their_float64_form(options, tiling):
  """With norm / bias / relu / residual, gemv_out_in(x, W_t) equals
  relu?(LayerNorm(x) W_t^T + b) + r computed in float64 (the norm's statistics
  over the whole row, whatever block_k)."""
  d_out, d_in, eps = 96, 128, 1e-6
  keys = jax.random.split(jax.random.PRNGKey(7), 6)
  x = jax.random.normal(keys[0], (1, 1, d_in)) * 2.0 + 3.0
  w_t = jax.random.normal(keys[1], (d_out, d_in)) / np.sqrt(d_in)
  scale, shift = 1.0 + jax.random.normal(keys[2], (d_in,)), jax.random.normal(keys[3], (d_in,))
  bias, res = jax.random.normal(keys[4], (d_out,)), jax.random.normal(keys[5], (d_out,))
  x64 = np.asarray(x, np.float64).reshape(d_in)
  if options.get('norm'):
    x64 = ((x64 - x64.mean()) / np.sqrt(x64.var() + eps) * np.asarray(scale, np.float64)
           + np.asarray(shift, np.float64))
  want = np.asarray(w_t, np.float64) @ x64
  kwargs = {}
  if options.get('norm'):
    kwargs['norm'] = (scale, shift, eps)
  if options.get('bias'):
    want, kwargs['bias'] = want + np.asarray(bias, np.float64), bias
  if options.get('relu'):
    want, kwargs['relu'] = np.maximum(want, 0.0), True
  if options.get('residual'):
    want, kwargs['residual'] = want + np.asarray(res, np.float64), res
  got = gemv_lib.gemv_out_in(x, w_t, interpret=True, **tiling, **kwargs)
  assert got.shape == (1, 1, d_out) and got.dtype == jnp.float32
  if options.get('relu'):  # the ReLU cut some outputs and kept others
    before = want - (np.asarray(res, np.float64) if options.get('residual') else 0.0)
    assert (before == 0).any() and (before > 0).any()
  np.testing.assert_allclose(np.asarray(got).reshape(d_out), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape,tiling,needle', [
    ((3, 64), {}, 'one row'),
    ((1, 64), dict(block_n=3), 'block_n=3'),
    ((1, 64), dict(block_k=48), 'block_k=48'),
])
def test_gemv_out_in_bad_tiling_is_named(shape, tiling, needle):
  w_t = jnp.zeros((96, shape[-1]))
  with pytest.raises(ValueError, match=needle):
    gemv_lib.gemv_out_in(jnp.zeros(shape), w_t, interpret=True, **tiling)


def test_default_out_in_tiling_fits_the_decoder_shapes():
  for d_in, d_out in [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024),
                      (1024, 6144), (6144, 1024), (1024, 32000)]:
    assert gemv_lib.fits_out_in(d_out, d_in)
