"""training.decode_attention: the Pallas one-query attention, run by Pallas's interpreter here."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from training import decode_attention
from training import model as model_lib


def _reference(q, k, v, pos):
  """Softmax attention of q over positions 0..pos, in float64."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  scores = np.einsum('...td,...kd->...tk', q, k[..., :pos + 1, :]) / np.sqrt(q.shape[-1])
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('...tk,...kd->...td', p, v[..., :pos + 1, :])


@pytest.mark.parametrize('lead,max_len,d_head,pos,tiling', [
    ((1, 4), 64, 16, 0, {}),                       # only the first position
    ((1, 4), 64, 16, 37, {}),
    ((2, 3), 128, 32, 127, {}),                    # the whole cache
    ((2, 3), 128, 32, 70, dict(block_len=16, n_splits=2)),
    ((6,), 256, 64, 200, dict(n_splits=1, block_len=32)),
    ((1, 16), 256, 64, 30, {}),
    ((1, 2), 1024, 16, 300, {}),                   # splits with no position
])
def test_equals_softmax_attention_over_the_filled_positions(lead, max_len, d_head,
                                                            pos, tiling):
  rng = np.random.RandomState(pos)
  q = rng.randn(*lead, 1, d_head).astype(np.float32)
  k = rng.randn(*lead, max_len, d_head).astype(np.float32)
  v = rng.randn(*lead, max_len, d_head).astype(np.float32)
  k[..., pos + 1:, :] = 1e3  # positions after pos must not count
  got = decode_attention.one_query_attention(q, k, v, jnp.int32(pos),
                                             interpret=True, **tiling)
  assert got.shape == q.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _reference(q, k, v, pos), rtol=1e-5, atol=1e-5)
  # The same as the XLA form it replaces on a GPU.
  np.testing.assert_allclose(got, model_lib._attend(q, k, v, jnp.int32(pos)),  # pylint: disable=protected-access
                             rtol=1e-5, atol=1e-6)


def test_bfloat16_inputs_give_a_bfloat16_result_computed_in_float32():
  rng = np.random.RandomState(0)
  q, k, v = (jnp.asarray(rng.randn(*s), jnp.bfloat16)
             for s in ((2, 1, 32), (2, 64, 32), (2, 64, 32)))
  got = decode_attention.one_query_attention(q, k, v, jnp.int32(40), interpret=True)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float64), _reference(q, k, v, 40),
                             rtol=2e-2, atol=2e-2)


def test_default_tiling_divides_every_cache_that_fits():
  assert decode_attention.default_tiling(256) == (32, 1, 2)
  assert decode_attention.default_tiling(2048) == (64, 8, 4)
  for max_len in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096):
    block_len, n_splits, _ = decode_attention.default_tiling(max_len)
    assert decode_attention.fits(max_len, 64) and max_len % (block_len * n_splits) == 0
  assert not decode_attention.fits(96, 64) and not decode_attention.fits(8, 64)
  assert not decode_attention.fits(256, 48)


@pytest.mark.parametrize('q_shape,k_shape,tiling,needle', [
    ((2, 2, 16), (2, 64, 16), {}, 'one query'),
    ((2, 1, 16), (3, 64, 16), {}, 'do not fit'),
    ((2, 1, 16), (2, 64, 16), dict(block_len=32, n_splits=4), 'must divide'),
])
def test_bad_shapes_are_named(q_shape, k_shape, tiling, needle):
  q, k = jnp.zeros(q_shape), jnp.zeros(k_shape)
  with pytest.raises(ValueError, match=needle):
    decode_attention.one_query_attention(q, k, k, jnp.int32(0), interpret=True,
                                         **tiling)


@pytest.mark.parametrize('pos,tiling', [(0, {}), (37, {}), (63, {}),
                                        (20, dict(block_len=16, n_splits=2)),
                                        (50, dict(n_splits=1))])
def test_with_the_new_key_and_value_it_updates_the_caches(pos, tiling):
  """new=(k, v): attends over the cache's positions before pos and (k, v),
  and returns the caches with (k, v) written at pos, nothing else changed."""
  rng = np.random.RandomState(pos)
  lead, max_len, d_head = (2, 3), 64, 16
  q, k_new, v_new = (rng.randn(*lead, 1, d_head).astype(np.float32) for _ in range(3))
  k = rng.randn(*lead, max_len, d_head).astype(np.float32)
  v = rng.randn(*lead, max_len, d_head).astype(np.float32)
  k_full, v_full = k.copy(), v.copy()
  k_full[..., pos, :], v_full[..., pos, :] = k_new[..., 0, :], v_new[..., 0, :]
  k[..., pos:, :] = 1e3  # stale: pos must come from k_new, later ones not count
  v_want = v.copy()
  v_want[..., pos, :] = v_new[..., 0, :]
  k_want = k.copy()
  k_want[..., pos, :] = k_new[..., 0, :]
  out, k_out, v_out = jax.jit(
      lambda *a: decode_attention.one_query_attention(
          *a[:4], new=a[4:], interpret=True, **tiling))(
              q, k, v, jnp.int32(pos), k_new, v_new)
  np.testing.assert_allclose(out, _reference(q, k_full, v_full, pos), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(k_out, k_want)
  np.testing.assert_array_equal(v_out, v_want)


@pytest.mark.parametrize('batch,heads,tiling', [
    (1, 4, {}), (2, 3, {}), (2, 4, dict(block_len=16, n_splits=2))])
def test_packed_projection_equals_separate_q_k_v(batch, heads, tiling):
  """one_query_attention_packed reads q, k, v from the packed [Q | K | V]
  projection of each sequence and gives what one_query_attention gives
  for the three slices: the output and both updated caches."""
  rng = np.random.RandomState(batch * heads)
  max_len, d_head, pos = 64, 16, 21
  qkv = rng.randn(batch, 1, 3 * heads * d_head).astype(np.float32)
  k = rng.randn(batch, heads, max_len, d_head).astype(np.float32)
  v = rng.randn(batch, heads, max_len, d_head).astype(np.float32)
  q_, k_, v_ = (a.reshape(batch, heads, 1, d_head)  # (b, 1, h, dh) heads first
                for a in np.split(qkv.reshape(batch, 3 * heads * d_head), 3, axis=-1))
  want = decode_attention.one_query_attention(
      q_, k, v, jnp.int32(pos), new=(k_, v_), interpret=True, **tiling)
  got = jax.jit(lambda *a: decode_attention.one_query_attention_packed(
      *a, interpret=True, **tiling))(qkv, k, v, jnp.int32(pos))
  assert got[0].shape == (batch, heads, 1, d_head)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-7)
  for g, w in zip(got[1:], want[1:]):  # the caches: the same values written
    np.testing.assert_array_equal(g, w)
  k_full = np.asarray(want[1])
  np.testing.assert_allclose(got[0], _reference(q_, k_full, np.asarray(want[2]), pos),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='packed projection'):
    decode_attention.one_query_attention_packed(qkv[..., :-1], k, v, jnp.int32(pos))


@pytest.mark.parametrize('mix', [{}, dict(attention_sparsity=4)])
def test_models_decode_through_the_kernel_as_in_eval_mode(mix, monkeypatch):
  """Both attention layers (dense, and sparse QKV's trax-layout caches)
  decoding token by token through the kernel (as off the CPU; interpreted
  here) give eval mode's logits."""
  from trax import shapes  # pylint: disable=g-import-not-at-top
  from terraformer import models  # pylint: disable=g-import-not-at-top
  calls = []
  kernel = decode_attention.one_query_attention
  packed = decode_attention.one_query_attention_packed

  def interpreted(*args, **kwargs):
    calls.append(kwargs.get('new') is not None)
    return kernel(*args, interpret=True, **kwargs)

  def packed_interpreted(*args, **kwargs):
    calls.append('packed')
    return packed(*args, interpret=True, **kwargs)
  monkeypatch.setattr(model_lib, 'ONE_QUERY_GPU', 'pallas')
  monkeypatch.setattr(model_lib, '_one_query_kernel', lambda max_len, d_head: True)
  monkeypatch.setattr(decode_attention, 'one_query_attention', interpreted)
  monkeypatch.setattr(decode_attention, 'one_query_attention_packed',
                      packed_interpreted)
  cfg = dict(vocab_size=24, d_model=32, d_ff=64, n_layers=2, n_heads=4,
             max_len=64, **mix)
  eval_model = models.TerraformerLM(mode='eval', **cfg)
  eval_model.init(shapes.ShapeDtype((1, 9), np.int32), rng=jax.random.PRNGKey(3))
  ids = np.random.RandomState(0).randint(0, 24, (1, 9)).astype(np.int32)
  want = np.asarray(eval_model(ids))
  predict = models.TerraformerLM(mode='predict', **cfg)
  predict.init(shapes.ShapeDtype((1, 1), np.int32))
  step = jax.jit(lambda x, w, s: predict.pure_fn(x, w, s, jax.random.PRNGKey(0)))
  state, got = predict.state, []
  for chunk in [ids[:, :3]] + [ids[:, t:t + 1] for t in range(3, 9)]:
    logits, state = step(chunk, eval_model.weights, state)
    got.append(logits)
  np.testing.assert_allclose(np.concatenate(got, 1), want, rtol=1e-5, atol=1e-5)
  # The one-token steps ran the kernel with the update in it (the dense
  # attention's reading q, k and v from its packed projection).
  want_call = True if mix else 'packed'
  assert calls and all(c == want_call for c in calls)
