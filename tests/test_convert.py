"""trax ConfigurableTerraformer checkpoints -> our ConfigurableTerraformer.

One tiny trax model (d_model 32, 1 encoder + 2 decoder layers, vocab 16) with
most options on: reversible encoder, shared input/output embedding, decoder
attention alternating trax's MultiplicativeConvCausalAttention (sparse QKV)
and dense CausalAttention, SparseFF with an SRU branch, sparse ('mult') loss.
trax initialises and writes it with its own checkpoint writers; we convert
and compare eval-mode logits (1e-5) and greedy decoding (our predict mode,
one token per step, against trax's eval mode on the growing sequence).
"""

import functools
import gzip
import pickle

import jax
from jax import numpy as jnp
import numpy as np
import pytest
from trax import layers as tl
from trax import shapes
from trax.layers.research import sparsity
from trax.models.research import terraformer as trax_terraformer
from trax.supervised import training as trax_training

from terraformer import convert
from terraformer import terraformer

VOCAB = 16
L1, L2 = 7, 6
COMMON = dict(input_vocab_size=VOCAB, d_model=32, d_ff=64, n_heads=4,
              n_encoder_layers=1, n_decoder_layers=2, dropout=0.0, max_len=32,
              pos_type=None, ff_sparsity=4, ff_use_sru=(1, 8),
              loss_sparsity=2, reversible_encoder=True)
TRAX_ARGS = dict(
    COMMON, encoder_attention_type=tl.Attention,
    encoder_decoder_attention_type=[
        functools.partial(sparsity.MultiplicativeConvCausalAttention,
                          sparsity=4, length_kernel_size=3),
        tl.CausalAttention])
OUR_ARGS = dict(COMMON, encoder_attention_type='dense',
                encoder_decoder_attention_type=['sparse_qkv', 'dense'],
                attention_sparsity=4, attention_kernel_size=3)


def _signature(b, l2):
  return (shapes.ShapeDtype((b, L1), jnp.int32),
          shapes.ShapeDtype((b, l2), jnp.int32))


@pytest.fixture(scope='module')
def trax_model():
  model = trax_terraformer.ConfigurableTerraformer(mode='eval', **TRAX_ARGS)
  model.init(_signature(2, L2), rng=jax.random.PRNGKey(3))
  return model


@pytest.fixture(scope='module')
def trax_apply(trax_model):
  fn = jax.jit(trax_model.pure_fn)
  return lambda x: fn(x, trax_model.weights, trax_model.state,
                      jax.random.PRNGKey(0))[0][0]


@pytest.fixture(scope='module')
def ours():
  """Our eval-mode model, built and initialised once; tests load into it."""
  return _ours()


@pytest.fixture(scope='module')
def ours_apply(ours):
  """Our eval logits for given weights (one compilation for the module)."""
  fn = jax.jit(ours.pure_fn)
  return lambda x, weights: fn(x, weights, ours.state,
                               jax.random.PRNGKey(0))[0]


def _ours(**overrides):
  model = terraformer.ConfigurableTerraformer(mode='eval',
                                              **dict(OUR_ARGS, **overrides))
  model.init(_signature(2, L2))
  return model


def _batch():
  rng = np.random.RandomState(0)
  inputs = rng.randint(1, VOCAB, (2, L1)).astype(np.int32)
  inputs[0, 4:] = 0  # padding at the end of row 0
  targets = rng.randint(1, VOCAB, (2, L2)).astype(np.int32)
  return inputs, targets


def _write_loop_format(model, stem):
  """The format of training.Loop.save_checkpoint (released checkpoints)."""
  flat, _ = tl.flatten_weights_and_state(model.weights, model.state)
  tl.np_to_file(flat, stem + '.weights.npy.gz', compresslevel=2)
  trax_training.pickle_to_file({'flat_weights': 2, 'flat_state': [],
                                'step': 1}, stem + '.pkl.gz', gzip=True)


def test_eval_logits_match_trax_both_checkpoint_formats(trax_model, trax_apply,
                                                        ours, ours_apply,
                                                        tmp_path):
  inputs, targets = _batch()
  expected = np.asarray(trax_apply((inputs, targets)))
  old = str(tmp_path / 'old.pkl.gz')
  trax_model.save_to_file(old, weights_only=True)
  stem = str(tmp_path / 'model_1')
  _write_loop_format(trax_model, stem)
  for path in (old, stem + '.pkl.gz'):
    ours.weights = jax.tree_util.tree_map(jnp.zeros_like, ours.weights)
    weights = convert.load_trax_checkpoint(ours, path, allow_pickle=True)
    got = np.asarray(ours_apply((inputs, targets), weights))
    assert got.shape == (2, L2, VOCAB)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
  # The weights file alone needs no pickle, and gives the same arrays.
  flat = convert.read_trax_checkpoint(stem + '.weights.npy.gz')
  flat_old = convert.read_trax_checkpoint(old, allow_pickle=True)
  assert len(flat) == len(flat_old)
  for a, b in zip(flat, flat_old):
    np.testing.assert_array_equal(a, b)


def test_greedy_predict_decoding_matches_trax_eval(trax_model, trax_apply, ours,
                                                   tmp_path):
  # Same shapes as the eval test: trax's jitted function is reused.
  inputs = np.random.RandomState(1).randint(1, VOCAB, (2, L1)).astype(np.int32)
  # trax, eval mode: re-run on the growing target prefix (zero-padded to a
  # fixed length: position i sees targets < i only) and take the argmax.
  decoded = np.zeros((2, L2), np.int32)
  for i in range(L2):
    logits = trax_apply((inputs, decoded))
    decoded[:, i] = np.argmax(np.asarray(logits)[:, i], axis=-1)
  path = str(tmp_path / 'm.pkl.gz')
  trax_model.save_to_file(path, weights_only=True)
  weights = convert.load_trax_checkpoint(ours, path, allow_pickle=True)
  # A padding column shared by both rows is trimmed before decoding.
  padded = np.concatenate([inputs, np.zeros((2, 1), np.int32)], axis=1)
  # (greedy_decode initialises the predict-mode model for the trimmed inputs.)
  predict = terraformer.ConfigurableTerraformer(mode='predict', **OUR_ARGS)
  got = terraformer.greedy_decode(predict, weights, padded, L2)
  np.testing.assert_array_equal(np.asarray(got), decoded)


def test_pickle_needs_opt_in(ours, tmp_path):
  path = str(tmp_path / 'm.pkl.gz')
  with gzip.open(path, 'wb') as f:
    pickle.dump({'flat_weights': []}, f)
  with pytest.raises(ValueError, match='allow_pickle'):
    convert.read_trax_checkpoint(path)
  with pytest.raises(ValueError, match='allow_pickle'):
    convert.load_trax_checkpoint(ours, path)


def test_shape_mismatch_names_path_and_both_shapes(trax_model, ours, tmp_path):
  stem = str(tmp_path / 'model_1')
  _write_loop_format(trax_model, stem)
  wider = _ours(d_ff=128)
  with pytest.raises(ValueError) as err:
    convert.load_trax_checkpoint(wider, stem + '.weights.npy.gz')
  message = str(err.value)
  # The first weight that differs is the encoder SparseFF's controller m1,
  # (d_model, d_lowrank = d_ff / N): (32, 16) in the checkpoint, (32, 32) here.
  assert 'SparseFF' in message and '.m1' in message
  assert '(32, 16)' in message and '(32, 32)' in message
  flat = convert.read_trax_checkpoint(stem + '.weights.npy.gz')
  convert.weights_from_flat(ours, flat)  # fits
  with pytest.raises(ValueError, match='fewer than the model'):
    convert.weights_from_flat(ours, flat[:-1])
  with pytest.raises(ValueError, match=f'has {len(flat) + 1} weight arrays'):
    convert.weights_from_flat(ours, flat + [np.zeros(3)])
