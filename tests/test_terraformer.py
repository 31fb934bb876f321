"""ConfigurableTerraformer: concatenation, predict == eval, training, errors, gin.

(Parity with trax's model and its checkpoints: tests/test_convert.py.)
"""

import gin
import jax
from jax import numpy as jnp
import numpy as np
import pytest
from trax import shapes

from terraformer import terraformer

VOCAB, OUT_VOCAB = 12, 14


def _sig(b, l1, l2):
  return (shapes.ShapeDtype((b, l1), jnp.int32),
          shapes.ShapeDtype((b, l2), jnp.int32))


def test_concat_with_padding_and_strip_exact_values():
  """Row b = [enc_b[:n_b], dec_b, tail of enc_b padded with zeros]."""
  vec_e = np.arange(1, 9, dtype=np.float32).reshape(2, 4, 1)  # rows 1..4, 5..8
  vec_d = np.array([[[10], [11]], [[20], [21]]], np.float32)
  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.int32)
  got = np.asarray(terraformer.concat_with_padding(vec_e, vec_d, mask))
  np.testing.assert_array_equal(got[..., 0], [[1, 2, 3, 10, 11, 0],
                                              [5, 20, 21, 8, 0, 0]])
  stripped = terraformer.strip_from_concatenation(got, mask * 7, 2)
  np.testing.assert_array_equal(np.asarray(stripped), vec_d)


PREDICT_ARGS = dict(
    input_vocab_size=VOCAB, output_vocab_size=OUT_VOCAB, d_model=16, d_ff=32,
    n_heads=2, n_encoder_layers=1, n_decoder_layers=2, dropout=0.0,
    max_len=16, pos_type='fixed-base', ff_sparsity=4, ff_use_sru=(1, 4),
    encoder_decoder_attention_type=['dense', 'sparse_qkv'],
    attention_sparsity=2, n_decoder_attention_layers=1, loss_sparsity=2)


def test_predict_one_token_at_a_time_equals_eval():
  """Logits of predict mode (inputs + first token, then one token per call)
  equal eval mode's on the whole target sequence, to 1e-5."""
  inputs = np.array([[3, 5, 7, 2, 9], [4, 4, 1, 8, 6]], np.int32)
  targets = np.array([[2, 6, 1, 9, 3, 3], [7, 5, 5, 2, 1, 4]], np.int32)
  model = terraformer.ConfigurableTerraformer(mode='eval', **PREDICT_ARGS)
  weights, state = model.init(_sig(2, 5, 6), rng=jax.random.PRNGKey(1))
  expected = np.asarray(jax.jit(model.pure_fn)(
      (inputs, targets), weights, state, jax.random.PRNGKey(0))[0])
  predict = terraformer.ConfigurableTerraformer(mode='predict', **PREDICT_ARGS)
  _, pstate = predict.init(_sig(2, 5, 1))
  step = jax.jit(predict.pure_fn)
  shifted = np.concatenate([np.zeros((2, 1), np.int32), targets[:, :-1]], 1)
  for i in range(targets.shape[1]):
    logits, pstate = step((inputs, shifted[:, i:i + 1]), weights, pstate,
                          jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(logits)[:, 0], expected[:, i],
                               atol=1e-5, rtol=1e-5)


def test_trains_with_lsh_and_reversible_stacks():
  """Plain jax.grad through the reversible stacks (LSH in encoder and
  decoder, sparse QKV, SparseFF) lowers the loss on a fixed copy batch."""
  model = terraformer.ConfigurableTerraformer(
      input_vocab_size=VOCAB, d_model=16, d_ff=32, n_heads=2,
      n_encoder_layers=1, n_decoder_layers=2, dropout=0.1, max_len=16,
      encoder_attention_type='lsh',
      encoder_decoder_attention_type=['lsh', 'sparse_qkv'],
      attention_sparsity=2, ff_sparsity=4, n_decoder_attention_layers=1,
      reversible_encoder=True,
      lsh_options=dict(chunk_len=4, n_hashes=2, n_buckets=4), mode='train')
  rng = np.random.RandomState(0)
  tokens = rng.randint(1, VOCAB, (4, 8)).astype(np.int32)
  weights, state = model.init(_sig(4, 8, 8), rng=jax.random.PRNGKey(0))

  def loss_fn(w, s, key):
    logits, s = model.pure_fn((tokens, tokens), w, s, key)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[..., None], -1)), s

  @jax.jit
  def step(w, s, key):
    (loss, s), g = jax.value_and_grad(loss_fn, has_aux=True)(w, s, key)
    w = jax.tree_util.tree_map(lambda p, d: p - 0.05 * d, w, g)
    return w, s, loss

  losses = []
  for i in range(12):
    weights, state, loss = step(weights, state, jax.random.PRNGKey(i))
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < losses[0] - 0.2, losses


def test_inputs_longer_than_max_len_name_both_lengths():
  model = terraformer.ConfigurableTerraformer(
      input_vocab_size=VOCAB, d_model=16, d_ff=32, n_heads=2,
      n_encoder_layers=1, n_decoder_layers=1, max_len=8, mode='eval')
  with pytest.raises(ValueError, match=r'length 10.*max_len=8'):
    model.init(_sig(1, 10, 4))
  model.init(_sig(1, 8, 4))
  with pytest.raises(ValueError, match=r'inputs have length 9.*max_len=8'):
    model((np.ones((1, 9), np.int32), np.ones((1, 4), np.int32)))


@pytest.mark.parametrize('kwargs, match', [
    (dict(encoder_decoder_attention_type='flash'), 'attention type'),
    (dict(encoder_attention_type='sparse_qkv'), 'causal'),
    (dict(n_heads=3), 'n_heads'),
    (dict(half_before_layer=1), 'half_before_layer'),
    (dict(pos_type='rope'), 'pos_type'),
    (dict(ff_sparsity=5), 'ff_sparsity'),
    (dict(encoder_decoder_attention_type=['dense'] * 3), 'divide'),
    (dict(mode='decode'), 'mode'),
])
def test_bad_arguments_raise_at_build_time(kwargs, match):
  args = dict(input_vocab_size=VOCAB, d_model=16, d_ff=32, n_heads=2,
              n_encoder_layers=1, n_decoder_layers=2)
  with pytest.raises(ValueError, match=match):
    terraformer.ConfigurableTerraformer(**dict(args, **kwargs))


def test_greedy_decode_refuses_ragged_inputs():
  with pytest.raises(ValueError, match='one length per batch'):
    terraformer.trim_inputs(np.array([[1, 2, 0], [1, 2, 3]]))
  np.testing.assert_array_equal(
      terraformer.trim_inputs(np.array([[1, 2, 0], [4, 5, 0]])),
      [[1, 2], [4, 5]])


@pytest.mark.parametrize('name', ['copy_tiny', 'c4_medium_tiny',
                                  'scientific_papers_lsh_tiny'])
def test_tiny_gin_configs_build_a_model(name):
  import training.configurables  # pylint: disable=g-import-not-at-top,unused-import
  from training import run  # pylint: disable=g-import-not-at-top
  del run
  gin.clear_config()
  try:
    gin.parse_config_file(f'gin/terraformer/{name}.gin')
    model_fn = gin.query_parameter('training.train.model').scoped_configurable_fn
    seq_len = gin.query_parameter('training.train.seq_len')
    model = model_fn(vocab_size=VOCAB, mode='eval')
    model.init(_sig(1, seq_len, 4))
    # Shapes only (traced, not run: the runs are the other tests' job).
    logits = model.output_signature(_sig(1, seq_len, 4))
    assert logits.shape == (1, 4, VOCAB) and logits.dtype == jnp.float32
  finally:
    gin.clear_config()


def test_reversible_lm_predict_equals_eval():
  """The decoder-only variant: predict mode one token at a time == eval."""
  args = dict(vocab_size=VOCAB, d_model=16, d_ff=32, n_layers=2, n_heads=2,
              dropout=0.0, max_len=16, attention_type=['sparse_qkv', 'dense'],
              attention_sparsity=2, ff_sparsity=4, ff_use_sru=(1, 4))
  tokens = np.array([[3, 5, 7, 2, 9, 1]], np.int32)
  model = terraformer.ReversibleTerraformerLM(mode='eval', **args)
  weights, state = model.init(shapes.signature(tokens),
                              rng=jax.random.PRNGKey(2))
  expected = np.asarray(model(tokens))
  predict = terraformer.ReversibleTerraformerLM(mode='predict', **args)
  _, pstate = predict.init(shapes.ShapeDtype((1, 1), jnp.int32))
  step = jax.jit(predict.pure_fn)
  for i in range(tokens.shape[1]):
    logits, pstate = step(tokens[:, i:i + 1], weights, pstate,
                          jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(logits)[:, 0], expected[:, i],
                               atol=1e-5, rtol=1e-5)


def test_sampler_decodes_with_dense_kernels_transposed_as_without(monkeypatch):
  """On a CPU the Sampler hands the Dense layers (the decoder's two
  attentions x 4, the feed-forwards of its two and the encoder's one layer
  x 2) their kernels transposed; it samples the same tokens as a Sampler
  that does not."""
  from training import sampling  # pylint: disable=g-import-not-at-top
  args = dict(PREDICT_ARGS, ff_sparsity=0, ff_use_sru=0,
              encoder_decoder_attention_type='dense')
  model = terraformer.ConfigurableTerraformer(mode='eval', **args)
  weights, _ = model.init(_sig(2, 5, 6), rng=jax.random.PRNGKey(3))
  inputs = np.array([[3, 5, 7, 2, 9], [4, 4, 1, 8, 6]], np.int32)
  sampler = sampling.Sampler(
      terraformer.ConfigurableTerraformer(mode='predict', **args), batch_size=2,
      input_len=5)
  assert sum(sampler._out_in) == 14
  got = sampler.decode(weights, inputs, 6, temperature=1.0, seed=4)
  monkeypatch.setattr(sampling, 'CPU_KERNELS_OUT_IN', False)
  plain = sampling.Sampler(
      terraformer.ConfigurableTerraformer(mode='predict', **args), batch_size=2,
      input_len=5)
  assert plain._out_in is None
  np.testing.assert_array_equal(
      got, plain.decode(weights, inputs, 6, temperature=1.0, seed=4))
