"""Sparse QKV attention and the sparse loss projection, as Trax layers.

"Sparse is Enough in Scaling Transformers" (Jaszczur et al., 2021) replaces
the dense Q, K, V (and optionally output) projections of attention with

    m = FactoredDense(x)              one "multiplicative" layer shared by Q, K, V
    q = LocallyConvDense_3(m)         conv over (length, module), kernel (L_k, 3)
    k = LocallyConvDense_3(m)         same, own weights (or q itself if share_qk)
    v = LocallyConvDense_1(concat(m, x))   kernel (L_k, 1)
    y = output_layers(MergeHeads(CausalAttention(q, k, v)))

and the final projection to the vocabulary with the same FactoredDense
("loss sparsity").  Shapes: S = sparsity (number of modules), M = d / S.

    FactoredDense        (..., d_in) -> (..., d_out)
        y[..., s, m] = sum_i x[..., i] * D[s, i] * E[i, m] + b[s * M + m]
    LocallyConvDense     (batch, length, d_in) -> (batch, length, S * n_units)
        the input viewed as (batch, length, S, d_in / S) goes through a 2-D
        convolution with kernel (length_kernel_size, kernel_size) whose
        weights are shared by all modules; zero padding around the module
        axis, causal zero padding (or, in 'predict' mode, the remembered last
        length_kernel_size - 1 inputs) in front of the length axis.

The layers take the constructor arguments and defaults of trax's reference
(`trax.layers.research.sparsity`) and compute the same function; with
`weights_from_trax` the weights of an initialised reference layer load onto
ours, and tests/test_sparse_qkv.py checks eval and predict outputs to 1e-5.
Two behaviours of the reference are kept on purpose, because checkpoints
depend on them: with one module (sparsity 1) LocallyConvDense is a plain
position-wise Dense (kernel and length-kernel sizes are ignored, so nothing
is convolved over the length), and `output_layer_type='none'` (the default)
applies no output projection at all.
"""

import math

import jax
from jax import numpy as jnp
from jax.experimental import pallas as pl
from trax import fastmath
from trax import layers as tl
from trax import shapes
from trax.layers import base
from trax.layers import initializers as init

from training import decode_attention
from training import gemv as gemv_lib
from training import model as model_lib

MODES = ('train', 'eval', 'predict')
OUTPUT_LAYER_TYPES = ('none', 'mult', 'conv', 'multconv')
V_CONCAT_TYPES = ('original', 'fixed', 'none')
SPARSITY_TYPES = (None, 'None', 'mult', 'lowrank', 'einsum', 'local', 'local3')


# How 'predict' mode computes LocallyConvDense: None picks by the platform
# the computation is compiled for (CPU: a convolution call; otherwise one
# matmul over the patches), True or False forces the matmul or the
# convolution (tests run both).  Both compute the same sum; at the paper's
# 800M shape (bench/decode_speed.py, BENCHMARKS.md) the matmul was faster on
# an H100 (sparse QKV 1.44 against 1.92 ms/token) and slower on 16 CPU cores
# (36 against 29 ms/token, both without YNN fusions; see training.sampling);
# other accelerators were not measured.
PREDICT_AS_MATMUL = None
# A decoding step (one row) off the CPU may run the sparse-QKV attention
# inside its pre-norm block (`training.model.PreNormResidual`, with
# FUSED_DECODING_GPU there) as three Pallas kernels: the LayerNorm and the
# FactoredDense (`_factored_parts`), then the convolution's products per tap,
# Q/K/V part and module, then one program per head that sums its Q, K and V,
# writes K and V into the caches and attends (`_conv_attend`).  For the
# layer as the paper's Table 1 uses it: sparsity = n_heads, v_concat_type
# 'none', no output layer, length_kernel_size >= 2.  No XLA kernel runs
# between them: the convolution's and attention's programs sum the
# FactoredDense parts they read, and the attention kernel writes the ring
# and both counters.  On: on an H100 the sparse-QKV model decoded at 0.821
# ms/token in this form, 0.887 with four XLA kernels per layer left around
# it (s27's form) and 0.963 without the fused step (BENCHMARKS.md, s27-s28).
# With every kernel's loads issued first and the cached attention loading
# its next block before this one's arithmetic (s30; landed with SparseFF's
# atomic form): 0.833-0.862 against 0.864-0.916 in three pairs of runs.
FUSED_DECODING_GPU = True
# Triton warps a program of those three kernels (`_factored_parts`, then
# `_conv_attend`'s convolution and attention); timed with 4 (s27-s30).
# bench/sparse_qkv_kernel.py times other numbers.
KERNEL_WARPS = {'factored': 4, 'conv': 4, 'attend': 4}


def _check_positive_int(name, value):
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'{name} must be a positive integer, not {value!r}.')


def check_lm_arguments(mode, **sizes):
  """The checks both Terraformer LMs make when built: `mode` is one of
  MODES, every size (vocab_size, d_model, ...) a positive integer, and
  n_heads divides d_model."""
  _check_mode(mode)
  for name, value in sizes.items():
    _check_positive_int(name, value)
  if sizes['d_model'] % sizes['n_heads']:
    raise ValueError(f"n_heads={sizes['n_heads']} must divide "
                     f"d_model={sizes['d_model']}.")


def _check_mode(mode):
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, not {mode!r}.')


class FactoredDense(base.Layer):
  """A Dense-like layer with about 1/n_modules of Dense's weights.

  (..., d_in) -> (..., d_out).  Each input vector is gated (multiplied
  elementwise) by n_modules learned vectors, each gated copy is projected by
  one shared matrix to d_out / n_modules, and the n_modules results are
  concatenated:

      y[..., s, m] = sum_i x[..., i] * D[s, i] * E[i, m],   then (+ b)

  Weights: (D [n_modules, d_in] ~ N(0, 0.5^2), E [d_in, d_out / n_modules]
  Glorot-uniform, b [d_out] ~ N(0, 1e-6^2)), without b if not use_bias;
  the same arrays, in the same order, as trax's `FactoredDense`.
  d_in=None takes the width of the input (trax requires it).
  """

  def __init__(self, n_modules, d_in, d_out, use_bias=True,
               use_bfloat16=False):
    super().__init__(name=f'FactoredDense_{n_modules}_{d_out}')
    _check_positive_int('FactoredDense n_modules', n_modules)
    _check_positive_int('FactoredDense d_out', d_out)
    if d_in is not None:
      _check_positive_int('FactoredDense d_in', d_in)
    if d_out % n_modules:
      raise ValueError(f'FactoredDense: d_out ({d_out}) must be a multiple of '
                       f'n_modules ({n_modules}); change one of them.')
    self._n_modules = n_modules
    self._d_in = d_in
    self._d_out = d_out
    self._use_bias = use_bias
    self._use_bfloat16 = use_bfloat16

  def forward(self, x):
    if self._use_bias:
      gating, projection, bias = self.weights
    else:
      gating, projection = self.weights
    rows = 1
    for n in x.shape[:-1]:
      rows *= n
    if rows * self._n_modules < self._d_out:
      # Few rows (decoding): gate the input, then one small matmul per
      # module; the (rows, S, d_in) intermediate is the smaller one.
      gated = x[..., None, :] * gating  # (..., S, d_in)
      y = jnp.einsum('...si,im->...sm', gated, projection)
      y = jnp.reshape(y, y.shape[:-2] + (self._d_out,))
    else:
      # Many rows (training): build the equivalent Dense kernel
      # W[i, s*M + m] = D[s, i] E[i, m] once and do one matmul.
      kernel = jnp.einsum('si,im->ism', gating, projection)
      y = x @ jnp.reshape(kernel, (kernel.shape[0], -1))
    if self._use_bias:
      y = y + bias
    return y

  def matmul_params(self):
    """Weights of the equivalent Dense kernel, for FLOP counting."""
    return int(self.weights[1].shape[0]) * self._d_out

  def init_weights_and_state(self, input_signature):
    d_in = input_signature.shape[-1]
    if self._d_in is not None and d_in != self._d_in:
      raise ValueError(f'FactoredDense was built for inputs of width '
                       f'{self._d_in} but got width {d_in}; pass d_in={d_in}.')
    rng_gate, rng_proj, rng_bias = fastmath.random.split(self.rng, 3)
    d_module = self._d_out // self._n_modules
    dtype = jnp.bfloat16 if self._use_bfloat16 else jnp.float32
    weights = [
        init.RandomNormalInitializer(stddev=0.5)(
            (self._n_modules, d_in), rng_gate),
        init.GlorotUniformInitializer()((d_in, d_module), rng_proj),
    ]
    if self._use_bias:
      weights.append(init.RandomNormalInitializer(1e-6)((self._d_out,),
                                                         rng_bias))
    self.weights = tuple(w.astype(dtype) for w in weights)


def _convolve(window, kernel, bias, n_modules, kernel_shape, predict):
  """LocallyConvDense's sum over a window that already holds the past.

  window: (batch, n_past + length, d_in), its first n_past =
  kernel_shape[0] - 1 positions being the remembered (or zero) past;
  kernel: [kernel_shape..., d_in / n_modules, n_units], bias [n_units].
  Returns (batch, length, n_modules * n_units).  predict: compute the sum
  the way 'predict' mode does (see PREDICT_AS_MATMUL).
  """
  n_len, n_mod = kernel_shape
  batch, width, d_in = window.shape
  length = width - (n_len - 1)
  x = jnp.reshape(window, (batch, width, n_modules, d_in // n_modules))
  half = (n_mod - 1) // 2
  if half:
    x = jnp.pad(x, ((0, 0), (0, 0), (half, half), (0, 0)))
  dtype = jnp.result_type(x, kernel)  # like einsum's promotion
  x, kernel = x.astype(dtype), kernel.astype(dtype)

  def conv(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding='VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  def patch_matmul(x, kernel):
    # The same sum as `conv`, as one matmul over the (length_kernel_size x
    # kernel_size) patches: at a token or a few, a GPU runs this as one
    # small fused kernel where a cuDNN convolution call costs more.
    patches = jnp.stack([x[:, a:a + length, c:c + n_modules]
                         for a in range(n_len) for c in range(n_mod)], axis=3)
    return jnp.einsum('btspi,pio->btso', patches,
                      jnp.reshape(kernel, (n_len * n_mod,) + kernel.shape[2:]))

  if not predict:
    y = conv(x, kernel)
  elif PREDICT_AS_MATMUL is None:
    y = jax.lax.platform_dependent(x, kernel, cpu=conv, default=patch_matmul)
  else:
    y = (patch_matmul if PREDICT_AS_MATMUL else conv)(x, kernel)
  y = y + bias
  return jnp.reshape(y, (batch, length, -1))


class LocallyConvDense(base.Layer):
  """A causal convolution over (length, module): a cheap Dense replacement.

  (batch, length, d_in) -> (batch, length, n_modules * n_units).  The input
  is viewed as (batch, length, n_modules, d_in / n_modules); one kernel
  K [length_kernel_size, kernel_size, d_in / n_modules, n_units] (and bias
  b [n_units]) is shared by all modules:

      y[t, s, :] = b + sum_{a, c} x[t - a, s + c - (kernel_size - 1) / 2, :]
                               @ K[length_kernel_size - 1 - a, c]

  with zeros outside the module range and before position 0.  In 'predict'
  mode the state holds the last length_kernel_size - 1 inputs,
  (batch, length_kernel_size - 1, d_in), so calls of any length (one token,
  or a prefill) continue the sequence exactly as 'eval' mode would compute it.

  With n_modules == 1 the layer is a position-wise Dense(n_units), exactly
  like trax's reference: kernel_size and length_kernel_size are ignored and
  the kernel, kept as [1, 1, d_in, n_units], is initialised Glorot-uniform
  instead of Glorot-normal.
  """

  def __init__(self, n_modules, n_units, mode, kernel_size=1,
               length_kernel_size=1):
    super().__init__(name=f'LocallyConvDense_{n_modules}_{n_units}')
    _check_positive_int('LocallyConvDense n_modules', n_modules)
    _check_positive_int('LocallyConvDense n_units', n_units)
    _check_positive_int('LocallyConvDense kernel_size', kernel_size)
    _check_positive_int('LocallyConvDense length_kernel_size',
                        length_kernel_size)
    if kernel_size % 2 != 1:
      raise ValueError(f'LocallyConvDense kernel_size must be odd (the module '
                       f'axis is padded symmetrically), not {kernel_size}.')
    _check_mode(mode)
    self._n_modules = n_modules
    self._n_units = n_units
    self._mode = mode
    if n_modules == 1:
      self._kernel_shape = (1, 1)
    else:
      self._kernel_shape = (length_kernel_size, kernel_size)

  @property
  def n_modules(self):
    return self._n_modules

  @property
  def n_units(self):
    return self._n_units

  def matmul_params(self):
    """The kernel's weights times the modules it is applied at (FLOP counting)."""
    return int(self.weights[0].size) * self._n_modules

  @property
  def n_remembered(self):
    """How many past positions the layer sees: length_kernel_size - 1."""
    return self._kernel_shape[0] - 1

  @property
  def kernel_shape(self):
    """(length_kernel_size, kernel_size) as used: (1, 1) with one module."""
    return self._kernel_shape

  def forward(self, x):
    n_past = self.n_remembered
    if n_past:
      if self._mode == 'predict':
        x = jnp.concatenate([self.state.astype(x.dtype), x], axis=1)
        self.state = x[:, -n_past:].astype(self.state.dtype)
      else:
        x = jnp.pad(x, ((0, 0), (n_past, 0), (0, 0)))
    kernel, bias = self.weights
    return _convolve(x, kernel, bias, self._n_modules, self._kernel_shape,
                     self._mode == 'predict')

  def init_weights_and_state(self, input_signature):
    if len(input_signature.shape) != 3:
      raise ValueError(f'LocallyConvDense takes (batch, length, d) inputs, '
                       f'not shape {tuple(input_signature.shape)}.')
    batch, _, d_in = input_signature.shape
    if d_in % self._n_modules:
      raise ValueError(f'LocallyConvDense: the input width ({d_in}) must be a '
                       f'multiple of n_modules ({self._n_modules}).')
    rng_kernel, rng_bias = fastmath.random.split(self.rng, 2)
    d_module_in = d_in // self._n_modules
    if self._n_modules == 1:
      kernel = init.GlorotUniformInitializer()((d_in, self._n_units),
                                               rng_kernel)
      kernel = jnp.reshape(kernel, (1, 1, d_in, self._n_units))
    else:
      # Conv-kernel fans as trax's tl.Conv computes them (HWIO: O=3, I=2).
      kernel = init.GlorotNormalInitializer(3, 2)(
          self._kernel_shape + (d_module_in, self._n_units), rng_kernel)
    bias = init.RandomNormalInitializer(1e-6)((self._n_units,), rng_bias)
    self.weights = (kernel, bias)
    if self._mode == 'predict' and self.n_remembered:
      self.state = jnp.zeros((batch, self.n_remembered, d_in),
                             input_signature.dtype)


def _v_input(v_concat_type, sparsity, m, x):
  """The input of the V convolution, from m and x (batch, length, d).

  'none': m, (batch, length, d).  'original': [m, x] on the last axis,
  (batch, length, 2d).  'fixed': per module, [m_s, x_s], (batch, length, 2d),
  so module s of the V conv sees both halves of its own slice.
  """
  if v_concat_type == 'none':
    return m
  if v_concat_type == 'original':
    return jnp.concatenate([m, x], axis=-1)
  split = lambda a: jnp.reshape(a, a.shape[:-1] + (sparsity, -1))
  both = jnp.concatenate([split(m), split(x)], axis=-1)
  return jnp.reshape(both, both.shape[:-2] + (-1,))


class _History(base.Layer):
  """No weights and no computation: holds `ConvQKV`'s predict-mode state.

  The state is (ring, count): the last n_past positions of the
  convolutions' inputs in a ring buffer (batch, n_past, width), position p
  at slot p % n_past, and count, the number of positions seen.  A one-token
  step overwrites the oldest slot in place, so a GPU updates the decoding
  loop's buffer without copying it (a shifted copy of the window costs one
  kernel and one device-to-device copy per layer and token).  Outside
  'predict' mode, or with n_past 0, there is no state.
  """

  def __init__(self, n_past, predict):
    super().__init__(n_in=0, n_out=0, name='ConvHistory')
    self._n_past = n_past if predict else 0

  @property
  def n_past(self):
    return self._n_past

  def extend(self, new):
    """[the remembered n_past positions, new] along axis 1; remembers the last."""
    ring, count = self.state
    n = self._n_past
    past = jnp.roll(ring, -(count % n), axis=1).astype(new.dtype)
    window = jnp.concatenate([past, new], axis=1)
    length = new.shape[1]
    if length == 1:
      ring = jax.lax.dynamic_update_slice_in_dim(
          ring, new.astype(ring.dtype), count % n, axis=1)
    else:
      ring = jnp.roll(window[:, -n:], (count + length) % n,
                      axis=1).astype(ring.dtype)
    self.state = (ring, count + length)
    return window

  def init_weights_and_state(self, input_signature):
    if self._n_past:
      batch, _, width = input_signature.shape
      self.state = (jnp.zeros((batch, self._n_past, width),
                              input_signature.dtype),
                    jnp.zeros((), jnp.int32))


class ConvQKV(base.Layer):
  """(m, x) -> (q, k, v): the Q, K and V convolutions of sparse attention.

  q = LocallyConvDense_3(m), k = LocallyConvDense_3(m) (k = q if share_qk),
  v = LocallyConvDense_1(v_input(m, x)), each (batch, length, d_feature).
  The sublayers are the Q conv, the K conv (absent if share_qk), the V conv
  and a weightless `_History`, so the weights are those of the three convs
  in that order, as in trax's layer.

  In 'predict' mode the convolutions, which all read the same positions,
  share one remembered history (of m, or of [m, x] when V also reads x)
  instead of keeping three copies, and the convolutions over the same input
  (Q and K; V too when v_concat_type is 'none') run as one convolution with
  their kernels side by side (V's narrower kernel padded with zeros over
  the module axis): per token one state update and one small matmul instead
  of three of each.  The sums are the same as the separate layers'.

  `use_decoding_form()` (the Sampler calls it on a predict-mode layer) has
  the layer take its weights with those side-by-side kernels already made:
  the first conv of each group holds the group's (kernel, bias), the others
  (); the returned function makes that form from trax's weights once per
  weight tree.  Inside a GPU's decoding loop XLA rebuilds the side-by-side
  kernel at every token otherwise (it does not hoist it out of the loop).
  """

  def __init__(self, sparsity, d_module, length_kernel_size, share_qk,
               v_concat_type, mode):
    super().__init__(n_in=2, n_out=3, name='ConvQKV')
    # The sublayers remember nothing themselves: their mode only picks how
    # the sum is computed, which `forward` decides here.
    conv_mode = 'eval' if mode == 'predict' else mode

    def conv(kernel_size):
      return LocallyConvDense(sparsity, d_module, conv_mode,
                              kernel_size=kernel_size,
                              length_kernel_size=length_kernel_size)

    self._convs = [conv(3)] if share_qk else [conv(3), conv(3)]
    self._convs.append(conv(1))
    self._history = _History(self._convs[0].n_remembered, mode == 'predict')
    self._sublayers = tuple(self._convs) + (self._history,)
    self._share_qk = share_qk
    self._v_concat_type = v_concat_type
    self._sparsity = sparsity
    self._predict = mode == 'predict'
    self._combined = False  # weights in the decoding form (see the docstring)

  def _groups(self):
    """The convs computed as one convolution: lists of indices into _convs."""
    every = list(range(len(self._convs)))
    return [every] if self._v_concat_type == 'none' else [every[:-1], every[-1:]]

  def use_decoding_form(self):
    """Switches a predict-mode layer to weights with each group's kernels
    side by side (see the class docstring) and returns the function that
    makes them from trax's weights; None (and no switch) in other modes."""
    if not self._predict:
      return None
    self._combined = True
    return self.decoding_form

  def decoding_form(self, weights):
    """trax's weights (the convs', then the history's ()) -> the decoding form."""
    weights = list(weights)
    for group in self._groups():
      convs = [self._convs[i] for i in group]
      weights[group[0]] = _side_by_side(convs, [weights[i] for i in group])
      for i in group[1:]:
        weights[i] = ()
    return tuple(weights)

  def forward(self, inputs):
    m, x = inputs
    v_input = lambda m, x: _v_input(self._v_concat_type, self._sparsity, m, x)
    if self._predict:
      outputs = self._predict_forward(m, x, v_input)
    else:
      outputs = [c.forward(m) for c in self._convs[:-1]]
      outputs.append(self._convs[-1].forward(v_input(m, x)))
    if self._share_qk:
      outputs.insert(1, outputs[0])
    return tuple(outputs)

  def _predict_forward(self, m, x, v_input):
    d = m.shape[-1]
    window = m if self._v_concat_type == 'none' else jnp.concatenate(
        [m, x], axis=-1)
    if self._history.n_past:
      window = self._history.extend(window)
    together = lambda convs, window: _convolve_together(
        convs, window, convs[0].weights if self._combined else None)
    if self._v_concat_type == 'none':
      return together(self._convs, window)
    qk = together(self._convs[:-1], window[..., :d])
    v = together(self._convs[-1:], v_input(window[..., :d], window[..., d:]))
    return qk + v

  def init_weights_and_state(self, input_signature):
    m, x = input_signature
    v_width = m.shape[-1] + (0 if self._v_concat_type == 'none'
                             else x.shape[-1])
    v = shapes.ShapeDtype(m.shape[:-1] + (v_width,), m.dtype)
    history = v if self._v_concat_type != 'none' else m
    signatures = [m] * (len(self._convs) - 1) + [v, history]
    weights, states = zip(*[layer.init(signature, use_cache=True)
                            for layer, signature
                            in zip(self.sublayers, signatures)])
    self.weights, self.state = tuple(weights), tuple(states)


def _side_by_side(convs, weights):
  """(kernel, bias) of `convs` (with these weights) as one convolution.

  The convs share n_modules and length_kernel_size; their kernels are
  padded with zeros to the widest kernel_size and put side by side on the
  output axis (zero taps add nothing, so each output is unchanged).
  """
  width = max(c.kernel_shape[1] for c in convs)
  kernels, biases = [], []
  for kernel, bias in weights:
    pad = (width - kernel.shape[1]) // 2
    kernels.append(jnp.pad(kernel, ((0, 0), (pad, pad), (0, 0), (0, 0))))
    biases.append(bias)
  if len(kernels) == 1:
    return kernels[0], biases[0]
  return jnp.concatenate(kernels, axis=-1), jnp.concatenate(biases)


def _convolve_together(convs, window, combined=None):
  """[conv(window) for conv in convs] in 'predict' mode, as one convolution
  with the kernels side by side (`_side_by_side`); `combined`: that
  (kernel, bias) already made."""
  if combined is None:
    combined = _side_by_side(convs, [c.weights for c in convs])
  kernel, bias = combined
  n_modules = convs[0].n_modules
  y = _convolve(window, kernel, bias, n_modules,
                (convs[0].kernel_shape[0], kernel.shape[1]), predict=True)
  y = jnp.reshape(y, y.shape[:-1] + (n_modules, -1))
  outputs = []
  start = 0
  for c in convs:
    part = y[..., start:start + c.n_units]
    outputs.append(jnp.reshape(part, part.shape[:-2] + (-1,)))
    start += c.n_units
  return outputs


def MultiplicativeConvCausalAttention(
    d_feature, n_heads=1, sparsity=None, length_kernel_size=3, dropout=0.0,
    force_no_dropout=False, max_inference_length=2048, share_qk=False,
    output_layer_type='none', v_concat_type='none', mode='train'):
  """Causal self-attention with sparse (multiplicative + conv) Q, K, V.

  (batch, length, d_feature) -> (batch, length, d_feature).

  Args:
    d_feature: width of the activations.
    n_heads: attention heads; must divide d_feature.
    sparsity: number of modules S (default n_heads); must divide d_feature.
    length_kernel_size: causal kernel size over the length axis (>= 1).
    dropout: attention-weights dropout rate, in 'train' mode only.
    force_no_dropout: if True, dropout is 0 whatever `dropout` says.
    max_inference_length: size of the key/value cache in 'predict' mode.
    share_qk: one convolution computes both queries and keys.
    output_layer_type: after attention: 'none' (nothing), 'mult'
      (FactoredDense), 'conv' (LocallyConvDense, kernel 3) or 'multconv'
      (both, in that order).
    v_concat_type: input of the V convolution: 'none' (the shared
      multiplicative output m), 'original' ([m, x]) or 'fixed' ([m_s, x_s]
      per module).
    mode: 'train', 'eval' or 'predict'.

  Returns:
    A layer; its weights are, in order: the shared FactoredDense, the Q conv,
    the K conv (absent if share_qk), the V conv, then the output layers.
  """
  _check_positive_int('d_feature', d_feature)
  _check_positive_int('n_heads', n_heads)
  sparsity = n_heads if sparsity is None else sparsity
  _check_positive_int('sparsity', sparsity)
  _check_positive_int('length_kernel_size', length_kernel_size)
  _check_mode(mode)
  if d_feature % sparsity:
    raise ValueError(f'd_feature ({d_feature}) must be a multiple of sparsity '
                     f'({sparsity}); change one of them.')
  if d_feature % n_heads:
    raise ValueError(f'd_feature ({d_feature}) must be a multiple of n_heads '
                     f'({n_heads}); change one of them.')
  if output_layer_type not in OUTPUT_LAYER_TYPES:
    raise ValueError(f'output_layer_type must be one of {OUTPUT_LAYER_TYPES}, '
                     f'not {output_layer_type!r}.')
  if v_concat_type not in V_CONCAT_TYPES:
    raise ValueError(f'v_concat_type must be one of {V_CONCAT_TYPES}, '
                     f'not {v_concat_type!r}.')
  dropout = 0.0 if force_no_dropout else dropout
  d_module = d_feature // sparsity

  output_layers = []
  if 'mult' in output_layer_type:
    output_layers.append(FactoredDense(sparsity, d_feature, d_feature))
  if 'conv' in output_layer_type:
    output_layers.append(LocallyConvDense(
        sparsity, d_module, mode, kernel_size=3,
        length_kernel_size=length_kernel_size))

  return _SparseQKVAttention(
      FactoredDense(sparsity, d_feature, d_feature),
      ConvQKV(sparsity, d_module, length_kernel_size, share_qk,
              v_concat_type, mode),
      DotProductCausalAttention(
          dropout=dropout, max_inference_length=max_inference_length,
          mode=mode, d_attn=d_feature),
      n_heads, output_layers,
      fusable=(mode == 'predict' and v_concat_type == 'none'
               and not output_layers and sparsity == n_heads
               and length_kernel_size >= 2))


class _SparseQKVAttention(tl.Serial):
  """`MultiplicativeConvCausalAttention`'s layers; `fused_step` for
  `training.model.PreNormResidual` (see FUSED_DECODING_GPU)."""

  def __init__(self, factored, conv_qkv, attention, n_heads, output_layers,
               fusable):
    split = lambda: tl.SplitIntoHeads(n_heads)
    super().__init__(
        tl.Branch(factored, None),                       # m, x
        conv_qkv,                                        # q, k, v
        tl.Parallel(split(), split(), split()),
        attention,
        tl.MergeHeads(n_heads),
        output_layers,
        name='MultiplicativeConvCausalAttention',
    )
    self._factored, self._conv_qkv, self._attention = factored, conv_qkv, attention
    self._fusable = fusable

  def fused_step(self, x, norm):
    """x + this(LayerNorm(x)) for one row in three kernels; None where the
    layer or the shapes do not fit (see FUSED_DECODING_GPU)."""
    if not (FUSED_DECODING_GPU and self._fusable
            and math.prod(x.shape[:-1]) == 1):
      return None
    gating, projection, bias = self._factored.weights
    ks, vs, idx = self._attention.state
    d_model = x.shape[-1]
    n_heads, max_len, d_head = ks.shape
    if not (gemv_lib.power_of_2(d_model) and gemv_lib.power_of_2(d_head)
            and d_model == n_heads * d_head
            and decode_attention.fits(max_len, d_head)):
      return None
    conv = self._conv_qkv
    if conv._history.n_past < 1:  # pylint: disable=protected-access
      return None  # (one module: a position-wise product, nothing remembered)
    if not conv._combined:  # pylint: disable=protected-access
      return None  # (needs the kernels side by side: training.sampling.DECODING_FORMS)
    kernel, conv_bias = conv.weights[0]
    ring, count = conv._history.state  # pylint: disable=protected-access
    interpret = jax.default_backend() == 'cpu'
    parts = _factored_parts(x, norm, gating, projection, interpret)
    out, ring, ks, vs, count, idx = _conv_attend(
        x, parts, bias, ring, count, kernel, conv_bias, ks, vs, idx, interpret)
    conv._history.state = (ring, count)  # pylint: disable=protected-access
    self._attention.state = (ks, vs, idx)
    return out.reshape(x.shape)


def _factored_parts(x, norm, gating, projection, interpret, block=64):
  """FactoredDense(LayerNorm(x)) for one row, in parts: part k of module s
  is (LayerNorm(x) * D[s]) @ E over the k-th block of `block` inputs, so
  m[s] = sum_k parts[k, s] + b[s]; (d_in / block, S, d_out / S) float32.

  One program per module and block (no loop: a loop over the blocks left
  each program waiting on one load after another, 43 us per layer on an
  H100 in s26); `_conv_attend`'s programs sum the parts they read.
  """
  scale, shift, epsilon = norm
  n_modules, d_in = gating.shape
  d_module = projection.shape[1]
  block = min(block, d_in)
  n_blocks = d_in // block

  def kernel(x_ref, s_ref, t_ref, d_ref, e_ref, o_ref):
    part = pl.ds(pl.program_id(1) * block, block)
    e = e_ref[...].astype(jnp.float32)  # loads before the LayerNorm's sums
    d = d_ref[0, :].astype(jnp.float32)
    g = gemv_lib.layer_norm_in_kernel(x_ref, s_ref, t_ref, epsilon)(part) * d
    o_ref[...] = jnp.sum(e * g[:, None], axis=0)[None, None, :]

  whole = lambda size: gemv_lib.whole_block((size,))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((n_blocks, n_modules, d_module),
                                     jnp.float32),
      grid=(n_modules, n_blocks),
      in_specs=[whole(d_in), whole(d_in), whole(d_in),
                pl.BlockSpec((1, block), lambda s, k: (s, k)),
                pl.BlockSpec((block, d_module), lambda s, k: (k, 0))],
      out_specs=pl.BlockSpec((1, 1, d_module), lambda s, k: (k, s, 0)),
      interpret=interpret,
      **gemv_lib.compiler_params(interpret, KERNEL_WARPS['factored']),
  )(x.reshape(d_in), scale.reshape(d_in), shift.reshape(d_in), gating,
    projection)


def _module_row(parts_ref, bias_ref, h, d_module):
  """Inside a kernel: m[h] (d_module,) float32 from `_factored_parts`."""
  return (jnp.sum(parts_ref[:, pl.ds(h, 1), :].astype(jnp.float32),
                  axis=(0, 1))
          + bias_ref[pl.ds(h * d_module, d_module)].astype(jnp.float32))


def _conv_attend(x, parts, m_bias, ring, count, kernel, bias, k_cache,
                 v_cache, pos, interpret):
  """ConvQKV and the attention of one decoding step, in two kernels.

  x: the block's input row (d_model,) (added back: the residual); parts,
  m_bias: this position's FactoredDense output m in `_factored_parts`'s
  parts and its bias; ring (1, n_past, d_model), count: ConvQKV's
  remembered positions (position p at slot p % n_past) and the number seen;
  kernel (n_past + 1, 3, d_module, n_qkv * d_module), bias (n_qkv *
  d_module,): the Q[, K], V convolutions side by side (`_side_by_side`;
  n_qkv 2 when Q and K are shared); caches (heads, max_len, d_head) in
  trax's layout, filled below `pos`.

  First one program per tap (kernel row and column), Q/K/V part and module h
  multiplies its input row (module h + column - 1 of this position, summed
  from its parts, or of a remembered one) by that tap's (d_module,
  d_module) block.  Then program h (head h = module h) sums its taps into
  its q, k and v, writes k and v into the caches at `pos` and m[h] into the
  ring at count % n_past (all aliased in and out), attends over positions
  0 .. pos and adds x's slice; it also writes count + 1 and pos + 1 (from
  the copies the first kernel passes on, so XLA can write them in place),
  so no other kernel runs for the step.  (One program per head doing it
  all read every tap's block in turn: 21 us per layer on an H100 in s26.)
  Returns (out (heads, d_head) in x's dtype, ring, k_cache, v_cache,
  count + 1, pos + 1).
  """
  n_modules, d_module = parts.shape[1:]
  n_len, width = kernel.shape[:2]
  n_qkv = kernel.shape[-1] // d_module
  n_past = ring.shape[1]
  heads, max_len, d_head = k_cache.shape
  d_model = heads * d_head
  half = (width - 1) // 2
  taps = n_len * width
  count, pos = count.reshape(1), pos.reshape(1)
  whole = gemv_lib.whole_block

  def conv_fn(count_ref, pos_ref, p_ref, mb_ref, ring_ref, w_ref, o_ref,
              co_ref, po_ref):
    t, h = pl.program_id(0), pl.program_id(2)
    back, c = t // width, t % width  # position count - back, kernel column c
    slot = (count_ref[0] - jnp.maximum(back, 1) + n_past) % n_past
    src = h + c - half
    inside = (src >= 0) & (src < n_modules)
    srcc = jnp.clip(src, 0, n_modules - 1)

    w = w_ref[0, 0].astype(jnp.float32)  # loaded before either branch

    def product(row):  # (d_module,) -> this tap's output block
      row = jnp.where(inside, row, 0.0)
      o_ref[...] = jnp.sum(row[:, None] * w, axis=0)[None, None, None, :]

    @pl.when(back == 0)
    def _():
      product(_module_row(p_ref, mb_ref, srcc, d_module))

    @pl.when(back != 0)
    def _():
      product(ring_ref[0, pl.ds(slot, 1), pl.ds(srcc * d_module, d_module)]
              [0].astype(jnp.float32))

    # The counters as they were, for attend_fn (every program writes the same
    # value): reading these there, not the loop's own, lets XLA write its new
    # counters in place instead of copying them (two copies per layer).
    co_ref[...] = count_ref[...]
    po_ref[...] = pos_ref[...]

  products, count, pos = pl.pallas_call(
      conv_fn,
      out_shape=(jax.ShapeDtypeStruct((taps, n_qkv, n_modules, d_module),
                                      jnp.float32),
                 jax.ShapeDtypeStruct((1,), count.dtype),
                 jax.ShapeDtypeStruct((1,), pos.dtype)),
      grid=(taps, n_qkv, n_modules),
      in_specs=[whole((1,)), whole((1,)), whole(parts.shape),
                whole(m_bias.shape), whole(ring.shape),
                pl.BlockSpec((1, 1, d_module, d_module),
                             lambda t, j, h: (n_len - 1 - t // width,
                                              t % width, 0, j))],
      out_specs=(pl.BlockSpec((1, 1, 1, d_module),
                              lambda t, j, h: (t, j, h, 0)),
                 whole((1,)), whole((1,))),
      interpret=interpret,
      **gemv_lib.compiler_params(interpret, KERNEL_WARPS['conv']),
  )(count, pos, parts, m_bias, ring, kernel)

  block_len = decode_attention.default_tiling(max_len)[0]
  scale = d_head ** -0.5

  def attend_fn(count_ref, pos_ref, x_ref, p_ref, b_ref, pp_ref, mb_ref,
                ring_ref, k_ref, v_ref, o_ref, ro_ref, ko_ref, vo_ref,
                co_ref, po_ref):
    del ring_ref  # aliased to ro_ref: only written
    h = pl.program_id(0)
    last = pos_ref[0]
    # Loads that wait on nothing first: the ring's new row and the residual.
    m = _module_row(pp_ref, mb_ref, h, d_module)
    x_h = x_ref[pl.ds(h * d_head, d_head)].astype(jnp.float32)
    u = []
    for j in range(n_qkv):
      acc = b_ref[pl.ds(j * d_module, d_module)].astype(jnp.float32)
      for t in range(taps):
        acc = acc + p_ref[t, j, pl.ds(h, 1), :][0]
      u.append(acc)
    q, v = u[0], u[-1]
    k = u[1] if n_qkv == 3 else q
    n = jnp.clip((last - 1) // block_len + 1, 0, max_len // block_len)
    carry = decode_attention.attend_cached(q, k_ref, v_ref, 0, n, last,
                                           block_len, scale)
    _, l, acc = decode_attention.attend_one_more(carry, q, k, v, scale)
    out = acc / l + x_h
    o_ref[...] = out[None, :].astype(o_ref.dtype)  # (x's dtype: no XLA convert)
    ko_ref[0, pl.ds(last, 1), :] = k[None, :].astype(ko_ref.dtype)
    vo_ref[0, pl.ds(last, 1), :] = v[None, :].astype(vo_ref.dtype)
    ro_ref[0, pl.ds(count_ref[0] % n_past, 1), :] = (
        m[None, :].astype(ro_ref.dtype))
    co_ref[...] = count_ref[...] + 1  # the same value from every program
    po_ref[...] = pos_ref[...] + 1

  cache = pl.BlockSpec((1, max_len, d_head), lambda h: (h, 0, 0))
  ring_part = pl.BlockSpec((1, n_past, d_module), lambda h: (0, 0, h))
  out, ring, k_cache, v_cache, count, pos = pl.pallas_call(
      attend_fn,
      out_shape=(jax.ShapeDtypeStruct((heads, d_head), x.dtype),
                 jax.ShapeDtypeStruct(ring.shape, ring.dtype),
                 jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                 jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
                 jax.ShapeDtypeStruct((1,), count.dtype),
                 jax.ShapeDtypeStruct((1,), pos.dtype)),
      grid=(heads,),
      in_specs=[whole((1,)), whole((1,)), whole((d_model,)),
                whole(products.shape), whole(bias.shape), whole(parts.shape),
                whole(m_bias.shape), ring_part, cache, cache],
      out_specs=(pl.BlockSpec((1, d_head), lambda h: (h, 0)), ring_part,
                 cache, cache, whole((1,)), whole((1,))),
      input_output_aliases={7: 1, 8: 2, 9: 3},
      interpret=interpret,
      **gemv_lib.compiler_params(interpret, KERNEL_WARPS['attend']),
  )(count, pos, x.reshape(d_model),
    products, bias, parts, m_bias, ring, k_cache, v_cache)
  return out, ring, k_cache, v_cache, count.reshape(()), pos.reshape(())


class DotProductCausalAttention(tl.DotProductCausalAttention):
  """trax's `DotProductCausalAttention`, with a faster 'predict' mode.

  Same inputs (q, k, v: (batch * heads, length, d_head)), state (key and
  value caches of max_inference_length positions and the next index) and
  outputs as trax's layer, which it runs unchanged in the other modes.  In
  'predict' mode it updates the caches the same way and attends, both with
  `training.model.cache_step` (one kernel per token off the CPU).  `d_attn`
  (heads x head width, which the layer's inputs do not tell) is read by
  FLOP counting (`training.trainer.train_flops_per_token`); None leaves it
  uncounted.
  """

  def __init__(self, *args, d_attn=None, **kwargs):
    super().__init__(*args, **kwargs)
    self._d_attn = d_attn

  @property
  def d_attn(self):
    return self._d_attn

  def forward(self, inputs):
    if self._mode != 'predict' or self._portal_mask is not None:
      return super().forward(inputs)
    q, k, v = inputs
    ks, vs, idx = self.state
    out, ks, vs = model_lib.cache_step(q, k, v, ks, vs, idx)
    self.state = (ks, vs, idx + q.shape[1])
    return out


class EinsumDense(base.Layer):
  """Dense with the kernel stored transposed, as trax's 'einsum' loss layer.

  (..., d_input) -> (..., d_output); weights (W [d_output, d_input]
  Glorot-uniform, b [d_output] ~ N(0, 1e-6^2)) or (W,) without bias.
  """

  def __init__(self, d_input, d_output, use_bias=True):
    super().__init__(name=f'EinsumDense_{d_output}')
    self._d_input = d_input
    self._d_output = d_output
    self._use_bias = use_bias

  def forward(self, x):
    kernel = self.weights[0]
    y = jnp.einsum('oi,...i->...o', kernel, x)
    return y + self.weights[1] if self._use_bias else y

  def init_weights_and_state(self, input_signature):
    d_input = input_signature.shape[-1]
    if self._d_input is not None and d_input != self._d_input:
      raise ValueError(f'EinsumDense was built for inputs of width '
                       f'{self._d_input} but got width {d_input}.')
    rng_kernel, rng_bias = fastmath.random.split(self.rng, 2)
    weights = (init.GlorotUniformInitializer()((self._d_output, d_input),
                                               rng_kernel),)
    if self._use_bias:
      weights += (init.RandomNormalInitializer(1e-6)((self._d_output,),
                                                     rng_bias),)
    self.weights = weights


def _LocallyConnectedDense(n_modules, n_units, kernel_size):
  """(..., d) -> (..., n_modules * n_units): per-module weights, wrap padding."""
  if n_modules == 1:
    return tl.Dense(n_units)
  return tl.Serial(
      tl.Fn('SplitModules',
            lambda x: jnp.reshape(x, x.shape[:-1] + (n_modules, -1))),
      tl.LocallyConnected1d(n_units, kernel_size, padding='WRAP'),
      tl.Fn('MergeModules', lambda x: jnp.reshape(x, x.shape[:-2] + (-1,))),
  )


def SparseDenseWithOptions(n_units, d_input=None, sparsity_type=None,
                           sparsity=0, d_lowrank=None, prob_sparse=None,
                           mode=None, use_bias=True, use_bfloat16=False):
  """The (possibly sparse) projection to the vocabulary: the "sparse loss".

  (..., d_input) -> (..., n_units).  Terraformer builds it with
  sparsity_type='mult' and sparsity=loss_sparsity, i.e.
  FactoredDense(sparsity, d_input, n_units); loss_sparsity=0 gives Dense.

  Args:
    n_units: output width (the vocabulary size).
    d_input: input width (None: taken from the input).
    sparsity_type: None/'None' (Dense), 'mult' (FactoredDense), 'lowrank'
      (Dense(d_lowrank) -> Dense(n_units)), 'einsum' (Dense with a transposed
      kernel), 'local' / 'local3' (locally connected, kernel 1 / 3, modules of
      n_units / sparsity).
    sparsity: number of modules; 0 means Dense whatever sparsity_type says.
    d_lowrank: inner width for 'lowrank'.
    prob_sparse: if given, each call in 'train' mode (or mode=None) uses the
      sparse layer with this probability and a separate Dense otherwise; in
      'eval' and 'predict' the sparse layer is always used.
    mode: 'train', 'eval', 'predict' or None.
    use_bias: add a bias ('lowrank', 'local', 'local3' require it).
    use_bfloat16: bfloat16 weights (only for Dense and 'mult').
  """
  if sparsity_type not in SPARSITY_TYPES:
    raise ValueError(f'sparsity_type must be one of {SPARSITY_TYPES}, '
                     f'not {sparsity_type!r}.')
  if mode is not None:
    _check_mode(mode)
  if prob_sparse is not None:
    if mode is not None and mode != 'train':
      prob_sparse = 1.0
    sparse = SparseDenseWithOptions(
        n_units, d_input, sparsity_type, sparsity, d_lowrank,
        use_bias=use_bias, use_bfloat16=use_bfloat16)
    dense = tl.Dense(n_units, use_bias=use_bias, use_bfloat16=use_bfloat16)
    use_sparse = tl.Serial(
        tl.RandomUniform(),
        tl.Fn('BelowProbSparse', lambda u: u < prob_sparse))
    return tl.Cond(use_sparse, sparse, dense)

  if sparsity_type in (None, 'None') or sparsity == 0:
    return model_lib.Dense(n_units, role='head', use_bias=use_bias,
                           use_bfloat16=use_bfloat16)
  _check_positive_int('sparsity', sparsity)
  if sparsity_type == 'mult':
    return FactoredDense(sparsity, d_input, n_units, use_bias=use_bias,
                         use_bfloat16=use_bfloat16)
  if use_bfloat16:
    raise ValueError(f'use_bfloat16 works only with sparsity_type None or '
                     f'"mult", not {sparsity_type!r}.')
  if not use_bias and sparsity_type != 'einsum':
    raise ValueError(f'sparsity_type {sparsity_type!r} needs use_bias=True.')
  if sparsity_type == 'lowrank':
    _check_positive_int('d_lowrank', d_lowrank)
    return tl.Serial(tl.Dense(d_lowrank), tl.Dense(n_units))
  if sparsity_type == 'einsum':
    return EinsumDense(d_input, n_units, use_bias=use_bias)
  if n_units % sparsity:
    raise ValueError(f'n_units ({n_units}) must be a multiple of sparsity '
                     f'({sparsity}) for sparsity_type {sparsity_type!r}.')
  kernel_size = 3 if sparsity_type == 'local3' else 1
  return _LocallyConnectedDense(sparsity, n_units // sparsity, kernel_size)


def weights_from_trax(trax_weights, layer):
  """Maps the weights of trax's reference layer onto `layer` (ours).

  `trax_weights` is an initialised reference layer from
  `trax.layers.research.sparsity` (FactoredDense, LocallyConvDense,
  MultiplicativeConvCausalAttention, SparseDenseWithOptions), built with the
  same arguments as `layer`, or its `.weights`.  `layer` must be initialised
  with the same input signature.  Returns weights for `layer` (assign them to
  `layer.weights` or pass them to `layer.pure_fn`); works for any mode.

  The mapping: both trees list their arrays in the same order (the order in
  which the layers run; in the attention: shared FactoredDense, Q conv, K
  conv, V conv, output layers), so the reference's non-empty arrays are
  consumed in order by our weight-owning layers:
    - FactoredDense: (gating, projection[, bias]) unchanged;
    - LocallyConvDense: the tl.Conv (kernel [Lk, k, Cin, M], bias [M])
      unchanged, or, for one module, tl.Dense's kernel [Cin, M] reshaped
      to [1, 1, Cin, M];
    - any other layer (tl.Dense, tl.LocallyConnected1d, EinsumDense):
      its arrays unchanged.
  Every array's shape is checked; a mismatch or a leftover array raises
  ValueError naming the layer.
  """
  if isinstance(trax_weights, base.Layer):
    trax_weights = trax_weights.weights
  arrays = list(jax.tree_util.tree_leaves(trax_weights))
  position = [0]

  def take(owner, expected_shape, allow_shape=None):
    if position[0] >= len(arrays):
      raise ValueError(f'The trax weights ran out at {owner.name}: they do not '
                       f'come from a layer built like ours.')
    array = jnp.asarray(arrays[position[0]])
    position[0] += 1
    if array.shape == tuple(expected_shape):
      return array
    if allow_shape is not None and array.shape == tuple(allow_shape):
      return jnp.reshape(array, expected_shape)
    raise ValueError(f'{owner.name} expects an array of shape '
                     f'{tuple(expected_shape)} but the trax weights give '
                     f'{array.shape}; build both layers with the same '
                     f'arguments and input shape.')

  def convert(sub):
    if isinstance(sub, LocallyConvDense):
      kernel, bias = sub.weights
      dense_shape = kernel.shape[2:] if sub.n_modules == 1 else None
      return (take(sub, kernel.shape, dense_shape).astype(kernel.dtype),
              take(sub, bias.shape).astype(bias.dtype))
    if sub.sublayers:
      return tuple(convert(s) for s in sub.sublayers)
    own, treedef = jax.tree_util.tree_flatten(sub.weights)
    return jax.tree_util.tree_unflatten(
        treedef, [take(sub, w.shape).astype(w.dtype) for w in own])

  converted = convert(layer)
  if position[0] != len(arrays):
    raise ValueError(f'{len(arrays) - position[0]} trax arrays are left over '
                     f'after filling {layer.name}: the layers differ.')
  return converted
