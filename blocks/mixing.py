"""Attention-free causal language models: MLP-Mixer and gMLP.

Both mix information across positions with learned (max_len, max_len)
matrices masked to the past (lower-triangular, diagonal kept), so position t
only ever sees positions <= t:

    CausalPositionMix:  y[:, t] = sum_{s <= t} W[t, s] x[:, s] + b[t]
                        (the same map for every channel)

* MLP-Mixer (Tolstikhin et al., arXiv 2105.01601), used causally with two
  triangular layers whose hidden size is the sequence length (option (b) of
  the reference notes):
      x + W2 . GELU(W1 . LN(x) + b1) + b2      (token mixing, over positions)
      x + FeedForward(LN(x))                   (channel mixing)
* gMLP (Liu et al., arXiv 2105.08050), causal as in g-mlp-pytorch and
  gpt-neox: x + V . SGU(GELU(U . LN(x))), where the spatial gating unit
  splits Z = [Z1 | Z2] along channels and returns Z1 * (W . LN(Z2) + b),
  W initialised near zero and b to ones, so that at initialisation
  SGU(Z) ~= Z1 and the block is a feed-forward block.

Neither model has position embeddings: the mixing matrices are per position.
A sequence of T < max_len positions uses W[:T, :T] and b[:T]; because W is
lower-triangular the outputs are those of the same positions in a longer
sequence.

In 'predict' mode every `CausalPositionMix` keeps its past inputs in a cache
of max_len positions (layer state), so decoding one token at a time gives the
eval-mode logits; a step costs O(max_len * d) per mixing layer.
"""

import gin
import jax
from jax import numpy as jnp
from trax import layers as tl
from trax.layers import base

from training import model as model_lib


def _check_positive_int(name, value):
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f'{name} must be a positive integer, not {value!r}.')


def _check_mode(mode):
  if mode not in model_lib.MODES:
    raise ValueError(f'mode must be one of {model_lib.MODES}, not {mode!r}.')


class CausalPositionMix(base.Layer):
  """A lower-triangular linear map over positions, shared by all channels.

  (batch, length, d) -> (batch, length, d):
      y[:, t, :] = sum_{s <= t} W[t, s] x[:, s, :] + b[t]
  with W (max_len, max_len) and b (max_len,); a sequence of length T uses
  W[:T, :T] and b[:T].  Entries above the diagonal are masked out (they get
  zero gradient and are initialised to zero).

  Initialisation: with `init_range` None, row t of W is normal with variance
  1 / (t + 1) (its fan-in) and b = `bias_value` (0 by default); otherwise W is
  uniform in [-init_range, init_range] (gMLP's near-zero init) and b is
  `bias_value` (1 for gMLP).

  In 'predict' mode the state is (cache (batch, max_len, d), pos): the inputs
  seen so far and the index of the next position.  Decoding past max_len
  positions gives NaN outputs (the Sampler refuses such requests first).
  """

  def __init__(self, max_len, mode='train', init_range=None, bias_value=0.0):
    _check_positive_int('max_len', max_len)
    _check_mode(mode)
    super().__init__(name='CausalPositionMix')
    self._max_len = max_len  # read by training.sampling.max_length
    self._mode = mode
    self._init_range = init_range
    self._bias_value = bias_value
    self._length = None
    self._d = None

  def _check_length(self, length):
    if length > self._max_len:
      raise ValueError(
          f'sequence length {length} exceeds max_len {self._max_len} of this '
          'causal mixing layer; use sequences of at most max_len tokens or '
          'build the model with a larger max_len.')

  def forward(self, x):
    w, b = self.weights
    t = x.shape[1]
    self._check_length(t)
    if self._mode != 'predict':
      mix = jnp.tril(w[:t, :t]).astype(x.dtype)
      return jnp.einsum('ts,bsd->btd', mix, x) + b[:t, None].astype(x.dtype)
    cache, pos = self.state
    cache = jax.lax.dynamic_update_slice_in_dim(cache, x.astype(cache.dtype),
                                                pos, axis=1)
    rows = jax.lax.dynamic_slice_in_dim(w, pos, t, axis=0)   # (t, max_len)
    past = jnp.arange(self._max_len)[None, :] <= pos + jnp.arange(t)[:, None]
    mix = jnp.where(past, rows, 0.0).astype(x.dtype)
    bias = jax.lax.dynamic_slice_in_dim(b, pos, t)[:, None].astype(x.dtype)
    y = jnp.einsum('ts,bsd->btd', mix, cache.astype(x.dtype)) + bias
    self.state = (cache, pos + t)
    return jnp.where(pos + t <= self._max_len, y, jnp.nan)

  def init_weights_and_state(self, input_signature):
    batch, length, d = input_signature.shape
    self._check_length(length)
    self._length, self._d = length, d
    n = self._max_len
    if self._init_range is None:
      w = jax.random.normal(self.rng, (n, n), jnp.float32)
      w = w / jnp.sqrt(jnp.arange(1, n + 1, dtype=jnp.float32))[:, None]
    else:
      w = jax.random.uniform(self.rng, (n, n), jnp.float32,
                             -self._init_range, self._init_range)
    self.weights = (jnp.tril(w), jnp.full((n,), self._bias_value, jnp.float32))
    if self._mode == 'predict':
      self.state = (jnp.zeros((batch, n, d), jnp.float32),
                    jnp.zeros((), jnp.int32))

  def matmul_params(self):
    """Dense-equivalent weights for FLOP counting: length * d MACs a token."""
    return (self._length or self._max_len) * (self._d or 0)


def TokenMixing(max_len, activation=tl.Gelu, mode='train'):
  """Mixer's token-mixing MLP, causal: W2 . act(W1 . x + b1) + b2 over positions.

  (batch, length, d) -> (batch, length, d); hidden size = positions.
  """
  return tl.Serial(CausalPositionMix(max_len, mode=mode), activation(),
                   CausalPositionMix(max_len, mode=mode))


def TokenMixingAttention(d_model, n_heads, max_len=2048, mode='train',
                         qkv_layer=None):
  """`TokenMixing` with `model.CausalSelfAttention`'s signature.

  For `DecoderLM(attention_layer=...)`: replaces each attention by a causal
  token-mixing MLP (d_model, n_heads and qkv_layer are not used).
  """
  del d_model, n_heads, qkv_layer
  return TokenMixing(max_len, mode=mode)


def CausalMixerBlock(d_model, d_ff, max_len, dropout=0.0, activation=tl.Gelu,
                     mode='train', norm=model_lib.LayerNorm):
  """Token mixing then channel mixing, each a pre-norm residual.

  (batch, length, d_model) -> (batch, length, d_model).
  """
  drop = lambda: tl.Dropout(rate=dropout, mode=mode)
  return [
      tl.Residual(norm(), TokenMixing(max_len, activation, mode), drop()),
      tl.Residual(norm(), model_lib.FeedForward(d_model, d_ff, activation,
                                                dropout, mode), drop()),
  ]


def SpatialGatingUnit(max_len, mode='train', init_range=None):
  """gMLP's SGU, causal: [Z1 | Z2] -> Z1 * (W . LN(Z2) + b).

  (batch, length, 2 * k) -> (batch, length, k).  W is initialised uniform in
  [-init_range, init_range] (default 1e-3 / max_len, near zero) and b to ones,
  so at initialisation the output is Z1.
  """
  if init_range is None:
    init_range = 1e-3 / max_len
  return tl.Serial(
      # Z2 on top of the stack: the next two layers act on it alone.
      tl.Fn('SplitHalves', lambda z: tuple(jnp.split(z, 2, axis=-1)[::-1]),
            n_out=2),
      model_lib.LayerNorm(),
      CausalPositionMix(max_len, mode=mode, init_range=init_range,
                        bias_value=1.0),
      tl.Multiply(),  # gate * Z1
  )


def GatedMLPBlock(d_model, d_ff, max_len, dropout=0.0, activation=tl.Gelu,
                  mode='train', norm=model_lib.LayerNorm, sgu_init_range=None):
  """x + V . SGU(act(U . norm(x))): one pre-norm residual gMLP block.

  (batch, length, d_model) -> (batch, length, d_model); U: d_model -> d_ff,
  V: d_ff / 2 -> d_model (d_ff must be even).
  """
  if d_ff % 2:
    raise ValueError(f'd_ff ({d_ff}) must be even: the spatial gating unit '
                     'splits it in two halves.')
  return tl.Residual(
      norm(),
      tl.Dense(d_ff),
      activation(),
      SpatialGatingUnit(max_len, mode, sgu_init_range),
      tl.Dense(d_model),
      tl.Dropout(rate=dropout, mode=mode),
  )


def _stack_lm(vocab_size, d_model, d_ff, n_layers, max_len, mode, block):
  """Checks the arguments, then Embedding, n_layers `block()`s, LayerNorm, Dense.

  (batch, length) int32 -> (batch, length, vocab_size) logits.
  """
  for name, value in (('d_model', d_model), ('d_ff', d_ff),
                      ('n_layers', n_layers), ('max_len', max_len)):
    _check_positive_int(name, value)
  _check_mode(mode)
  return tl.Serial(
      model_lib.Embedding(vocab_size, d_model),
      [block() for _ in range(n_layers)],
      model_lib.LayerNorm(),
      tl.Dense(vocab_size),
  )


@gin.configurable(module='blocks')
def MixerLM(vocab_size, d_model=512, d_ff=2048, n_layers=6, max_len=2048,
            mode='train', dropout=0.0, activation=tl.Gelu):
  """A causal MLP-Mixer language model.

  Args:
    vocab_size: number of token ids.
    d_model: channels of the residual stream.
    d_ff: hidden width of the channel-mixing MLP.
    n_layers: number of `CausalMixerBlock`s.
    max_len: longest sequence; sizes the (max_len, max_len) token-mixing
      matrices and the predict-mode caches.
    mode: 'train', 'eval' or 'predict'.
    dropout: residual and feed-forward dropout rate in 'train' mode.
    activation: activation layer class of both MLPs.

  Returns:
    A layer (batch, length) int32 -> (batch, length, vocab_size) logits,
    length <= max_len.
  """
  return _stack_lm(
      vocab_size, d_model, d_ff, n_layers, max_len, mode,
      lambda: CausalMixerBlock(d_model, d_ff, max_len, dropout, activation,
                               mode))


@gin.configurable(module='blocks')
def GatedMLPLM(vocab_size, d_model=512, d_ff=2048, n_layers=6, max_len=2048,
               mode='train', dropout=0.0, activation=tl.Gelu,
               sgu_init_range=None):
  """A causal gMLP language model (no attention).

  Args:
    vocab_size: number of token ids.
    d_model: channels of the residual stream.
    d_ff: width after the up-projection (even; the SGU halves it).
    n_layers: number of `GatedMLPBlock`s.
    max_len: longest sequence; sizes the SGU's (max_len, max_len) matrices
      and the predict-mode caches.
    mode: 'train', 'eval' or 'predict'.
    dropout: residual dropout rate in 'train' mode.
    activation: activation after the up-projection.
    sgu_init_range: the SGU's W starts uniform in [-r, r]; default
      1e-3 / max_len.

  Returns:
    A layer (batch, length) int32 -> (batch, length, vocab_size) logits,
    length <= max_len.
  """
  return _stack_lm(
      vocab_size, d_model, d_ff, n_layers, max_len, mode,
      lambda: GatedMLPBlock(d_model, d_ff, max_len, dropout, activation, mode,
                            sgu_init_range=sgu_init_range))
