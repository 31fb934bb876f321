"""trax's default attention (its chunked tl.SelfAttention) converts too.

tests/test_convert.py covers the converter with our dense and sparse-QKV
attention; here both models use trax's own tl.SelfAttention class (the
default of trax's ConfigurableTerraformer), chunked, in the encoder and the
decoder, and a trax checkpoint loaded into ours gives trax's eval logits.
"""

import functools

import jax
from jax import numpy as jnp
import numpy as np
from trax import layers as tl
from trax import shapes
from trax.models.research import terraformer as trax_terraformer

from terraformer import convert
from terraformer import terraformer


def test_chunked_self_attention_checkpoint_gives_trax_logits(tmp_path):
  vocab, l1, l2 = 16, 8, 8
  attention = functools.partial(tl.SelfAttention, chunk_len=4,
                                n_chunks_before=1)
  args = dict(input_vocab_size=vocab, d_model=32, d_ff=64, n_heads=4,
              n_encoder_layers=1, n_decoder_layers=2, dropout=0.0, max_len=32,
              pos_type=None, encoder_attention_type=attention,
              encoder_decoder_attention_type=attention, mode='eval')
  sig = (shapes.ShapeDtype((2, l1), jnp.int32),
         shapes.ShapeDtype((2, l2), jnp.int32))
  theirs = trax_terraformer.ConfigurableTerraformer(**args)
  theirs.init(sig, rng=jax.random.PRNGKey(3))
  ours = terraformer.ConfigurableTerraformer(**args)
  ours.init(sig)
  rng = np.random.RandomState(0)
  inputs = rng.randint(1, vocab, (2, l1)).astype(np.int32)
  inputs[0, 5:] = 0
  targets = rng.randint(1, vocab, (2, l2)).astype(np.int32)
  expected = np.asarray(theirs.pure_fn((inputs, targets), theirs.weights,
                                       theirs.state, jax.random.PRNGKey(0))[0][0])
  path = str(tmp_path / 'model.pkl.gz')
  theirs.save_to_file(path, weights_only=True)
  weights = convert.load_trax_checkpoint(ours, path, allow_pickle=True)
  got = np.asarray(ours.pure_fn((inputs, targets), weights, ours.state,
                                jax.random.PRNGKey(0))[0])
  assert got.shape == (2, l2, vocab)
  assert np.abs(expected).max() > 0.1    # not trivially zero
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
