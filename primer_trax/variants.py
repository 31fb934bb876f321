"""Single-change Transformer variants as Trax layers, for the ablation lab.

Each is one change to the baseline `training.model.DecoderLM`, switched on by
one of its arguments (see `primer_trax.models.VARIANTS`):

  RMSNorm (Zhang & Sennrich 2019; Narang et al. 2021):
      y = x / sqrt(mean(x^2) + eps) * g                       (no bias, no centring)
  TokenShift (RWKV / x-transformers `shift_tokens=1`), in each residual branch
  after its norm:
      y_t = [x_t[:c] , x_{t-1}[c:]],  c = ceil(d / 2),  x_{-1} = 0
  GatedFeedForward (Shazeer 2020, no biases):
      FFN(x) = (act(x W) * (x V)) W2,   act = GELU (GEGLU), Swish (SwiGLU),
      squared ReLU ("squared-ReLU-GLU"), ...
      Parameter matching: the hidden width is 2/3 of the baseline's d_ff,
      rounded to the nearest multiple of 8 (`glu_hidden_size`), so 3 matrices
      of d x 2/3 d_ff hold about the baseline's 2 of d x d_ff.
  ReZero (Bachlechner et al. 2020; official code majumderb/rezero):
      x <- x + a * F(x) for both sublayers of a block, one scalar `a` per block
      shared by its attention and feed-forward, initialised to 0, no norms.
  SharedQKAttention (full Primer, official `MDHA.share_qk_rep`):
      s = dconv(x Wqk),  k = s,  q = s Wq' (no bias),  v = dconv(x Wv)

Layers with history (TokenShift) keep it in their state in 'predict' mode, so
decoding token by token equals 'eval' mode on the whole sequence.
"""

import gin
import jax
from jax import numpy as jnp
from trax import layers as tl
from trax.layers import base


@gin.configurable(module='primer_trax')
class RMSNorm(base.Layer):
  """Root-mean-square norm, in float32 whatever the input dtype.

  (..., d) -> (..., d), same dtype.  Weights: scale (d,), initialised to 1.
  """

  def __init__(self, epsilon=1e-6):
    super().__init__(name='RMSNorm')
    self._epsilon = epsilon

  def forward(self, x):
    x32 = x.astype(jnp.float32)
    ms = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(ms + self._epsilon) * self.weights.astype(jnp.float32)
    return y.astype(x.dtype)

  def init_weights_and_state(self, input_signature):
    self.weights = jnp.ones(input_signature.shape[-1:], jnp.float32)


class TokenShift(base.Layer):
  """Replaces the last floor(d / 2) channels by the previous token's.

  (batch, length, d) -> (batch, length, d); position 0 sees zeros.  In
  'predict' mode the state holds the last token seen, (batch, 1, d).
  """

  def __init__(self, mode='train'):
    super().__init__(name='TokenShift')
    self._mode = mode

  def forward(self, x):
    if self._mode == 'predict':
      prev = jnp.concatenate([self.state.astype(x.dtype), x[:, :-1]], axis=1)
      self.state = x[:, -1:].astype(self.state.dtype)
    else:
      prev = jnp.pad(x[:, :-1], ((0, 0), (1, 0), (0, 0)))
    keep = x.shape[-1] - x.shape[-1] // 2
    return jnp.concatenate([x[..., :keep], prev[..., keep:]], axis=-1)

  def init_weights_and_state(self, input_signature):
    if self._mode == 'predict':
      b, _, d = input_signature.shape
      self.state = jnp.zeros((b, 1, d), jnp.float32)


def glu_hidden_size(d_ff, multiple_of=8):
  """2/3 * d_ff rounded to the nearest multiple of `multiple_of` (at least one).

  E.g. 3072 -> 2048, 2048 -> 1368, 64 -> 40.
  """
  return max(multiple_of, multiple_of * round(2 * d_ff / (3 * multiple_of)))


@gin.configurable(module='primer_trax')
def GatedFeedForward(d_model, d_ff, activation=tl.Gelu, dropout=0.0,
                     mode='train', match_params=True, multiple_of=8):
  """(act(x W) * x V) W2, no biases; the signature of `model.FeedForward`.

  (batch, length, d_model) -> (batch, length, d_model).  W and V are one fused
  (d_model, 2 * hidden) matrix [W | V].  hidden = glu_hidden_size(d_ff,
  multiple_of) if match_params (about the baseline's parameters and FLOPs),
  else d_ff.
  """
  hidden = glu_hidden_size(d_ff, multiple_of) if match_params else d_ff
  return tl.Serial(
      tl.Dense(2 * hidden, use_bias=False),
      tl.Fn('SplitGate', lambda z: (z[..., :hidden], z[..., hidden:]), n_out=2),
      activation(),  # on the gate, the top of the stack
      tl.Fn('Gate', lambda gate, value: gate * value),
      tl.Dropout(rate=dropout, mode=mode),
      tl.Dense(d_model, use_bias=False),
  )


class ReZeroAlpha(base.Layer):
  """x -> (x, a): pushes the block's ReZero scalar `a` (initialised to 0)."""

  def __init__(self):
    super().__init__(n_in=1, n_out=2, name='ReZeroAlpha')

  def forward(self, x):
    return x, self.weights

  def init_weights_and_state(self, input_signature):
    self.weights = jnp.zeros((), jnp.float32)


def _rezero_add(x, fx, a):
  return x + a.astype(fx.dtype) * fx, a


def ReZero(*branches):
  """x -> x_n, where x_i = x_{i-1} + a * branch_i(x_{i-1}) with one shared a.

  (batch, length, d) -> (batch, length, d).  The block is the identity at
  initialisation (a = 0).
  """
  layers = [ReZeroAlpha()]
  for branch in branches:
    layers += [tl.Select([0, 0, 1]),              # x, x, a
               branch,                           # f(x), x, a
               tl.Fn('ReZeroAdd', lambda fx, x, a: _rezero_add(x, fx, a), n_out=2)]
  layers.append(tl.Select([0], n_in=2))         # drop a
  return tl.Serial(*layers)


def SharedQKAttention(d_model, n_heads, max_len=2048, mode='train',
                      qkv_layer=None):
  """Full Primer's attention: queries from the shared, convolved key stream.

  (batch, length, d_model) -> (batch, length, d_model).  One fused projection
  [S | V] (d_model -> 2 d_model), then `qkv_layer` (the depthwise convolution)
  on it, then K = S, Q = S Wq' (d_model x d_model, no bias), then causal
  attention and the output projection.  Same parameter count as the
  baseline's separate Q, K, V projections.
  """
  from training import model as model_lib  # pylint: disable=g-import-not-at-top
  if d_model % n_heads:
    raise ValueError(f'd_model ({d_model}) must be a multiple of n_heads '
                     f'({n_heads}); change one of them.')
  return tl.Serial(
      tl.Dense(2 * d_model),
      [] if qkv_layer is None else qkv_layer(mode=mode),
      tl.Fn('SplitSV', lambda z: (z[..., :d_model], z[..., d_model:]), n_out=2),
      tl.Select([0, 0, 1]),                          # s, s, v
      tl.Dense(d_model, use_bias=False),             # q = s Wq'
      tl.Fn('PackQKV', lambda q, k, v: jnp.concatenate([q, k, v], axis=-1)),
      model_lib.CausalDotProductAttention(n_heads, max_len=max_len, mode=mode),
      tl.Dense(d_model),
  )
