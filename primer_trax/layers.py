"""Primer's two changes as Trax layers.

Squared ReLU (the feed-forward activation):  y = max(x, 0)^2.

Multi-DConv-Head Attention: after the Q, K and V projections, a causal
depthwise convolution of width 3 over the sequence, one kernel per head and
channel, no bias (official code: google-research primer/t5_models.py):

    y_t = w_0 * x_t + w_1 * x_{t-1} + w_2 * x_{t-2}      (zeros before t = 0)
    initialised w_0 = 0.5, w_i = 0.5 / kernel_size for i > 0.

Because it is depthwise, one convolution over the fused (batch, length, 3 *
d_model) projections of `training.model.CausalSelfAttention` is exactly three
separate convolutions of Q, K and V with their own kernels.

In 'predict' mode the convolution keeps the last kernel_size - 1 inputs in its
state, so decoding token by token equals eval mode on the whole sequence
(trax's own `CausalDepthwiseConv` has no state: in predict mode it silently
uses only w_0, and it initialises with Glorot uniform).
"""

import gin
from jax import numpy as jnp
from trax import layers as tl
from trax.layers import base


@gin.configurable(module='primer_trax')
def SquaredRelu():
  """max(x, 0)^2, elementwise; shape and dtype unchanged."""
  return tl.Fn('SquaredRelu', lambda x: jnp.square(jnp.maximum(x, 0)))


class CausalDepthwiseConv(base.Layer):
  """Causal depthwise convolution over the sequence; no bias.

  (batch, length, d) -> (batch, length, d).  Weights (kernel_size, d): row i
  multiplies the input i positions back, the same layout as trax's
  `tl.CausalDepthwiseConv`, so its weights load unchanged.
  """

  def __init__(self, kernel_size=3, mode='train'):
    super().__init__(name=f'CausalDepthwiseConv_{kernel_size}')
    if kernel_size < 1:
      raise ValueError(f'kernel_size must be at least 1, not {kernel_size}.')
    self._kernel_size = kernel_size
    self._mode = mode

  def forward(self, x):
    w = self.weights.astype(x.dtype)
    k = self._kernel_size
    t = x.shape[1]
    out = x * w[0]
    if self._mode != 'predict':
      # Each tap shifts x on its own (no shared padded copy of x), so XLA can
      # fuse the whole sum into one elementwise pass and keep only x for the
      # backward pass.
      for i in range(1, min(k, t)):  # taps past the start see only zeros
        out = out + jnp.pad(x[:, :t - i], ((0, 0), (i, 0), (0, 0))) * w[i]
      return out
    history = jnp.concatenate([self.state.astype(x.dtype), x], axis=1)
    if k > 1:
      self.state = history[:, -(k - 1):].astype(self.state.dtype)
    for i in range(1, k):  # history[k-1-i : k-1-i+t] is x shifted right by i
      out = out + history[:, k - 1 - i:k - 1 - i + t] * w[i]
    return out

  def init_weights_and_state(self, input_signature):
    b, _, d = input_signature.shape
    k = self._kernel_size
    taps = jnp.array([0.5] + [0.5 / k] * (k - 1), jnp.float32)
    self.weights = jnp.broadcast_to(taps[:, None], (k, d))
    if self._mode == 'predict':
      self.state = jnp.zeros((b, max(k - 1, 1), d), jnp.float32)


@gin.configurable(module='primer_trax')
def MultiDConv(kernel_size=3, mode='train'):
  """The Q/K/V convolution of multi-DConv-head attention (see module doc)."""
  return CausalDepthwiseConv(kernel_size, mode=mode)
