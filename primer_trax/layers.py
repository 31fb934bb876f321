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
import jax
from jax import numpy as jnp
from trax import layers as tl
from trax.layers import base


@gin.configurable(module='primer_trax')
def SquaredRelu():
  """max(x, 0)^2, elementwise; shape and dtype unchanged."""
  return tl.Fn('SquaredRelu', lambda x: jnp.square(jnp.maximum(x, 0)))


def _shift(x, i):
  """x (B, T, d) moved i positions later along T, zeros in front (i = 0: x)."""
  return jnp.pad(x[:, :x.shape[1] - i], ((0, 0), (i, 0), (0, 0)))


def _unshift(g, i):
  """The adjoint of `_shift`: g moved i positions earlier, zeros at the end."""
  return jnp.pad(g[:, i:], ((0, 0), (0, i), (0, 0)))


def _taps(w, x):
  """Taps that can reach a position: those past the sequence length see only
  zeros (their outputs and weight gradients are zero)."""
  return range(min(w.shape[0], x.shape[1]))


@jax.custom_vjp
def causal_depthwise_conv(x, w):
  """out[b, t] = sum_i w[i] * x[b, t - i] (zero before the start).

  x (B, T, d), w (k, d) in x's dtype.  Each tap shifts x on its own (no
  padded copy of x), so XLA fuses the sum into one elementwise pass.
  """
  return sum(_shift(x, i) * w[i] for i in _taps(w, x))


def _conv_fwd(x, w):
  return causal_depthwise_conv(x, w), (x, w)


def _conv_bwd(residuals, g):
  x, w = residuals
  dx = sum(_unshift(g, i) * w[i] for i in _taps(w, x))
  # dw[i] = sum over (b, t) of g * x shifted by i, as a vector-matrix product
  # with f32 accumulation: on an H100 this GEMV beat XLA's own column
  # reduction by 3.3 ms per step at 110m (BENCHMARKS.md, Primer-EZ).
  n = x.shape[0] * x.shape[1]
  ones = jnp.ones((1, n), g.dtype)
  dw = jnp.stack([jnp.dot(ones, (g * _shift(x, i)).reshape(n, -1),
                          preferred_element_type=jnp.float32)[0]
                  for i in _taps(w, x)])
  dw = jnp.pad(dw, ((0, w.shape[0] - dw.shape[0]), (0, 0)))
  return dx, dw.astype(w.dtype)


causal_depthwise_conv.defvjp(_conv_fwd, _conv_bwd)


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
    if self._mode != 'predict':
      return causal_depthwise_conv(x, w)
    out = x * w[0]
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
