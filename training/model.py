"""The baseline decoder-only Transformer LM, built from Trax combinators.

Every later variant (Terraformer, Primer, Feedback) is measured against this
model.  It is a pre-norm GPT-style stack:

    ids (batch, length) int32
      -> Embedding + sinusoidal-initialised learned positions
      -> n_layers x [ x + Attention(Norm(x)) ; x + FeedForward(Norm(x)) ]
      -> Norm -> Dense(vocab)
      -> logits (batch, length, vocab)

Attention calls `jax.nn.dot_product_attention`, which runs cuDNN's fused
(flash) kernel on a GPU when computing in bfloat16/float16, and XLA elsewhere.
In 'predict' mode the attention keeps a key/value cache in its layer state, so
decoding one token at a time gives the same logits as 'eval' mode on the whole
sequence.

Mixed precision is the trainer's job: it casts float32 master weights to the
compute dtype before calling the model, so everything here computes in the
dtype of the weights it is given; norms and softmax statistics run in float32.
"""

import math

import gin
import jax
from jax import numpy as jnp
from trax import layers as tl
from trax.layers import base

from training import decode_attention
from training import gemv as gemv_lib

MODES = ('train', 'eval', 'predict')


class LayerNorm(tl.LayerNorm):
  """trax's LayerNorm, computed in float32 whatever the input dtype.

  (batch, length, d) -> (batch, length, d), same dtype as the input.  Same
  weights (scale, bias) as `tl.LayerNorm`, so trax weights load unchanged.
  """

  def forward(self, x):
    scale, bias = self.weights
    x32 = x.astype(jnp.float32)
    if x.ndim >= 2 and x.shape[-2] == 1:
      # One position per sequence (a decoding step): both moments in one
      # pass, E[u] and E[u^2] of u = x - x[0] (sums over the same row, which
      # XLA computes in one kernel on a GPU, against two dependent ones for
      # the form below).  Shifting by the row's first element keeps the
      # difference of moments from cancelling when the mean is large against
      # the spread; tests/test_model.py checks it against trax's LayerNorm.
      shift = x32[..., :1]
      u = x32 - shift
      m1 = jnp.mean(u, axis=-1, keepdims=True)
      var = jnp.maximum(
          jnp.mean(jnp.square(u), axis=-1, keepdims=True) - jnp.square(m1), 0.0)
      mean = shift + m1
    else:
      mean = jnp.mean(x32, axis=-1, keepdims=True)
      var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self._epsilon)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


# How `Dense` multiplies a single row (one decoded token) off the CPU, by the
# layer's role: 'dot' (XLA's own form, a multiply-and-reduce fusion), 'gemm'
# (two copies of the row: a GEMM) or 'gemv' (`training.gemv`'s Pallas kernel;
# 'gemm' where its tiling does not fit the matrix).  A CPU runs a plain dot.
# The Sampler, decoding, by default hands Dense its kernel transposed
# (training.sampling.CPU_KERNELS_OUT_IN / GPU_KERNELS_OUT_IN); the layer then
# runs `one_row_dot_out_in`, where only the 'gemv' form differs from
# `out_in_dot`.  ONE_ROW_AS_GEMM True / False forces the two-row / plain form
# everywhere, the CPU included, for kernels stored (d_in, d_out).
ONE_ROW_FORMS = ('dot', 'gemm', 'gemv')
ONE_ROW_GPU_FORMS = {'ff': 'gemm', 'attention': 'dot', 'head': 'dot'}
ONE_ROW_AS_GEMM = None
# Tests: run the 'gemv' form on a CPU too, in Pallas's interpreter.
GEMV_ON_CPU = False


def two_row_gemm(x, w):
  """x @ w for a one-row x, as the product of two copies of the row."""
  row = x.reshape(1, x.shape[-1])
  y = jnp.dot(jnp.concatenate([row, row]), w)
  return ((y[0] + y[1]) * 0.5).reshape(x.shape[:-1] + (w.shape[-1],))


def one_row_dot(x, w, role='ff'):
  """x @ w for x (..., d_in), w (d_in, d_out); one row in `role`'s GPU form.

  XLA:GPU rewrites a product of a single row and a matrix of fewer than 10M
  elements (every decoder matrix at d_model 1024) as an elementwise multiply
  and a reduction over the matrix.  That reads the weights at well under the
  memory bandwidth, and where the row comes from an elementwise op (bias,
  activation) XLA writes the whole (d_in, d_out) product out first.  Two
  copies of the row keep it a matrix product (cuBLAS / Triton), which reads
  the weights once at close to the bandwidth; the two result rows are equal,
  and their mean is returned (exactly the row's product).  `training.gemv`
  streams the matrix in a Pallas kernel instead.
  """
  if math.prod(x.shape[:-1]) != 1 or ONE_ROW_AS_GEMM is False:
    return jnp.dot(x, w)
  if ONE_ROW_AS_GEMM:
    return two_row_gemm(x, w)
  form = ONE_ROW_GPU_FORMS.get(role, 'dot')
  if form == 'gemv' and not gemv_lib.fits(*w.shape):
    form = 'gemm'
  if form == 'dot':
    return jnp.dot(x, w)
  if form == 'gemv' and GEMV_ON_CPU:
    return gemv_lib.gemv(x, w, interpret=jax.default_backend() == 'cpu')
  gpu = two_row_gemm if form == 'gemm' else gemv_lib.gemv
  return jax.lax.platform_dependent(x, w, cpu=jnp.dot, default=gpu)


def one_row_dot_out_in(x, w_t, role='ff'):
  """x @ w_t.T for a kernel stored (d_out, d_in): `out_in_dot`, except that
  a single row whose role takes the 'gemv' form goes, off the CPU, through
  `training.gemv.gemv_out_in` (one Pallas program per few contiguous rows of
  weights)."""
  if (math.prod(x.shape[:-1]) != 1 or ONE_ROW_GPU_FORMS.get(role) != 'gemv'
      or not gemv_lib.fits_out_in(*w_t.shape)):
    return out_in_dot(x, w_t)
  if GEMV_ON_CPU:
    return gemv_lib.gemv_out_in(x, w_t, interpret=jax.default_backend() == 'cpu')
  return jax.lax.platform_dependent(x, w_t, cpu=out_in_dot,
                                    default=gemv_lib.gemv_out_in)


def out_in_dot(x, w_t):
  """x @ w_t.T for x (..., d_in) and w_t (d_out, d_in), a kernel stored
  transposed: XLA:CPU multiplies a row by the (d_out, d_in) matrix (each
  output a contiguous row of weights) at up to 1.5x the bandwidth of the
  (d_in, d_out) form when d_in > d_out.  The matrix is the left operand on
  purpose: written as x @ w_t.T, XLA:CPU ran the same product at about a sixth of
  that speed."""
  rows = x.reshape(-1, x.shape[-1])
  y = jnp.dot(w_t, rows.T).T
  return y.reshape(x.shape[:-1] + (w_t.shape[0],))


class Dense(tl.Dense):
  """trax's Dense (same weights, same outputs): (..., d_in) -> (..., n_units).

  A single row (batch 1, one position: a decoding step) is multiplied by
  `one_row_dot` in the form ONE_ROW_GPU_FORMS gives `role` ('ff',
  'attention' or 'head').  After `use_kernel_out_in()` (the Sampler calls it
  by default, and then hands the layer its kernel transposed, (n_units,
  d_in)) the layer multiplies by `one_row_dot_out_in` instead.
  """

  def __init__(self, n_units, role='ff', **kwargs):
    if role not in ONE_ROW_GPU_FORMS:
      raise ValueError(f'Dense role must be one of {sorted(ONE_ROW_GPU_FORMS)}, '
                       f'not {role!r}.')
    super().__init__(n_units, **kwargs)
    self._role = role
    self._kernel_out_in = False

  def use_kernel_out_in(self, on=True):
    """From now on expect the kernel as (n_units, d_in) (True) or as trax
    stores it, (d_in, n_units) (False)."""
    self._kernel_out_in = on

  def kernel(self):
    """The kernel among this layer's weights (as trax stores it: (d_in, n_units))."""
    return self.weights[0] if self._use_bias else self.weights

  def kernel_shape_out_in(self):
    """(n_units, d_in) of the kernel as handed over after `use_kernel_out_in()`."""
    return self.weights[0].shape if self._use_bias else self.weights.shape

  def forward(self, x):
    w, b = self.weights if self._use_bias else (self.weights, None)
    y = (one_row_dot_out_in(x, w, self._role) if self._kernel_out_in
         else one_row_dot(x, w, self._role))
    return y if b is None else y + b


ONE_HOT_MAX_VOCAB = 2048


class Embedding(tl.Embedding):
  """trax's Embedding (same weights), faster to train for small vocabularies.

  (batch, length) int32 -> (batch, length, d_feature).  For vocabularies of
  at most ONE_HOT_MAX_VOCAB ids the lookup is a one-hot matmul: its gradient
  is then a matmul too, instead of a scatter-add in which thousands of tokens
  collide on the same few rows (for byte-level data on a GPU the scatter-add
  made the whole step 1.8x slower).  Both forms give the same values.
  """

  def forward(self, x):
    vocab_size = self.weights.shape[0]
    if vocab_size > ONE_HOT_MAX_VOCAB:
      return super().forward(x)
    one_hot = jax.nn.one_hot(x, vocab_size, dtype=self.weights.dtype)
    return jnp.dot(one_hot, self.weights, precision=jax.lax.Precision.HIGHEST)


def _attention_implementation(dtype):
  """cuDNN flash attention where it applies (GPU, 16-bit), else XLA."""
  if jax.default_backend() == 'gpu' and dtype in (jnp.bfloat16, jnp.float16):
    return 'cudnn'
  return 'xla'


# On a CPU, one decoding step reads only the filled part of the cache, rounded
# up to one of these lengths (a branch per length; see `cached_attention`).
CPU_CACHE_BUCKET = 128
# Off a CPU, one decoding step's cache update and attention (`cache_step`):
# 'pallas' (`training.decode_attention` writes the new key and value and
# attends over the filled part of the cache only, in one kernel, where its
# shape fits) or 'xla' (XLA updates the caches and `_attend` reads the whole
# cache).  Timings on an H100: training/decode_attention.py's docstring.
# (A third form, XLA's updates then the kernel, lost to 'pallas' in s24 and
# was dropped.)
ONE_QUERY_GPU = 'pallas'
ONE_QUERY_GPU_FORMS = ('pallas', 'xla')


def _attend(q, k_cache, v_cache, pos):
  """`cached_attention` over the whole of the given caches."""
  t, max_len = q.shape[-2], k_cache.shape[-2]
  mask = jnp.arange(max_len)[None, :] <= pos + jnp.arange(t)[:, None]
  k_cache, v_cache = k_cache.astype(q.dtype), v_cache.astype(q.dtype)
  if t == 1:
    scores = jnp.sum(q.astype(jnp.float32) * k_cache.astype(jnp.float32),
                     axis=-1)[..., None, :]
  else:
    scores = jnp.einsum('...td,...kd->...tk', q, k_cache,
                        preferred_element_type=jnp.float32)
  scores = jnp.where(mask, scores * q.shape[-1] ** -0.5, -1e30)
  probs = jax.nn.softmax(scores, axis=-1)
  if t == 1:
    out = jnp.sum(jnp.swapaxes(probs, -1, -2) * v_cache.astype(jnp.float32),
                  axis=-2, keepdims=True)
    return out.astype(q.dtype)
  return jnp.einsum('...tk,...kd->...td', probs.astype(q.dtype), v_cache)


def cached_attention(q, k_cache, v_cache, pos):
  """Causal attention of new queries over a key/value cache (decoding).

  Args:
    q: (..., t, dh) queries of positions pos .. pos + t - 1.
    k_cache, v_cache: (..., max_len, dh), filled up to pos + t - 1.
    pos: int32 scalar, the position of the first query.

  Returns:
    (..., t, dh) in the dtype of q.  Scores and softmax are float32.  For one
    query (t == 1, the decoding step) the two products are written as
    multiply-and-sum, which XLA fuses into single passes over the cache
    (a CPU runs a batched matrix product as one small call per head).  On a
    CPU, where such a pass runs on one core, a one-query step reads only the
    first 128, 256, 512, ... positions of the cache that hold keys (a
    `lax.switch` over those lengths); the positions it skips are masked out
    anyway, so the result is the same.  (A GPU reads the cache in parallel,
    and a branch there would cost a host round trip per layer.)
  """
  t, max_len = q.shape[-2], k_cache.shape[-2]
  if t != 1 or jax.default_backend() != 'cpu' or max_len <= CPU_CACHE_BUCKET:
    return _attend(q, k_cache, v_cache, pos)
  lengths = []
  length = CPU_CACHE_BUCKET
  while length < max_len:
    lengths.append(length)
    length *= 2
  lengths.append(max_len)
  def branch(n):
    return lambda q, k, v, p: _attend(q, k[..., :n, :], v[..., :n, :], p)
  which = jnp.searchsorted(jnp.array(lengths), pos + 1)  # first length > pos
  return jax.lax.switch(which, [branch(n) for n in lengths],
                        q, k_cache, v_cache, pos)


def _one_query_kernel(max_len, d_head):
  """Whether a one-query step over caches of `max_len` positions of
  `d_head` here runs a `decode_attention` kernel."""
  if ONE_QUERY_GPU not in ONE_QUERY_GPU_FORMS:
    raise ValueError(f'ONE_QUERY_GPU must be one of {ONE_QUERY_GPU_FORMS}, '
                     f'not {ONE_QUERY_GPU!r}')
  return (jax.default_backend() != 'cpu' and ONE_QUERY_GPU != 'xla'
          and decode_attention.fits(max_len, d_head))


def cache_step(q, k, v, k_cache, v_cache, pos):
  """A predict-mode step: writes k, v at pos, pos + 1, ... into the caches
  and attends q over every position up to its own.

  Args:
    q, k, v: (..., t, dh) of positions pos .. pos + t - 1.
    k_cache, v_cache: (..., max_len, dh), filled up to pos - 1.
    pos: int32 scalar.

  Returns:
    (attention output (..., t, dh) in q's dtype, k_cache, v_cache).  A
    one-token step off the CPU runs `decode_attention.one_query_attention`
    with the updates in it (ONE_QUERY_GPU 'pallas'); otherwise
    `cached_attention` after the updates.
  """
  k, v = k.astype(k_cache.dtype), v.astype(v_cache.dtype)
  if q.shape[-2] == 1 and _one_query_kernel(*k_cache.shape[-2:]):
    return decode_attention.one_query_attention(q, k_cache, v_cache, pos,
                                                new=(k, v))
  k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k, pos, axis=k.ndim - 2)
  v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v, pos, axis=v.ndim - 2)
  return cached_attention(q, k_cache, v_cache, pos), k_cache, v_cache


class CausalDotProductAttention(base.Layer):
  """Multi-head causal attention over packed q, k, v; no weights.

  (batch, length, 3 * d) -> (batch, length, d), heads of d // n_heads.
  In 'predict' mode the state is a key/value cache of `max_len` positions,
  (batch, heads, max_len, head width) each, and the index of the next
  position; each call appends its `length` positions.
  """

  def __init__(self, n_heads, max_len=2048, mode='train'):
    super().__init__(name=f'CausalDotProductAttention_h{n_heads}')
    self._n_heads = n_heads
    self._max_len = max_len
    self._mode = mode
    self._d_attn = None

  @property
  def d_attn(self):
    """heads * head width, known once the layer is initialised."""
    return self._d_attn

  def _split(self, x):
    b, t, d3 = x.shape
    h = self._n_heads
    return x.reshape(b, t, 3, h, d3 // (3 * h))

  def forward(self, qkv):
    b, t, _ = qkv.shape
    qkv = self._split(qkv)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (b, t, h, dh)
    if self._mode != 'predict':
      out = jax.nn.dot_product_attention(
          q, k, v, is_causal=True,
          implementation=_attention_implementation(q.dtype))
    else:
      # Caches are (b, h, max_len, dh) so that both products below contract
      # them in place: no per-token transpose of the whole cache.
      k_cache, v_cache, pos = self.state
      heads_first = lambda a: jnp.swapaxes(a, 1, 2)  # (b, h, t, dh)
      if t == 1 and _one_query_kernel(*k_cache.shape[-2:]):
        # The kernel reads q, k and v from the packed projection in place.
        out, k_cache, v_cache = decode_attention.one_query_attention_packed(
            qkv.reshape(b, t, -1), k_cache, v_cache, pos)
      else:
        out, k_cache, v_cache = cache_step(
            heads_first(q), heads_first(k), heads_first(v), k_cache, v_cache,
            pos)
      out = heads_first(out)
      self.state = (k_cache, v_cache, pos + t)
    return out.reshape(b, t, -1)

  def init_weights_and_state(self, input_signature):
    self._d_attn = input_signature.shape[-1] // 3  # read by FLOP counting
    if self._mode == 'predict':
      b, _, d3 = input_signature.shape
      h = self._n_heads
      shape = (b, h, self._max_len, d3 // (3 * h))
      self.state = (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32),
                    jnp.zeros((), jnp.int32))


# A decoding step (one row) off the CPU runs each pre-norm residual block of
# the dense decoder as fused kernels (`PreNormResidual`): the norm inside the
# first product, the bias and ReLU or the residual addition inside the
# products (`training.gemv.gemv_out_in`), the attention reading the packed
# projection (`decode_attention.one_query_attention_packed`): 5 kernels per
# layer where XLA ran about 13.  The 800M dense decoder then took 0.81
# against 0.90 ms/token on an H100 and 0.59-0.63 against 0.78-0.79 on an H200,
# the same greedy tokens (BENCHMARKS.md, s25).  False: XLA's kernels.
FUSED_DECODING_GPU = True
# Tests: the fused blocks on a CPU too, Pallas interpreted.
FUSED_ON_CPU = False


def fused_decoding_here():
  """Whether decoding steps of one row run the fused blocks on this backend."""
  return FUSED_DECODING_GPU and (jax.default_backend() != 'cpu' or FUSED_ON_CPU)


def _fused_here(x):
  """Whether a step of input x runs the fused blocks here."""
  return math.prod(x.shape[:-1]) == 1 and fused_decoding_here()


def _fusable(dense, norm=False):
  """Whether `dense` (handed its kernel transposed) fits a fused product
  (with the LayerNorm before it, if norm)."""
  return (isinstance(dense, Dense) and dense._kernel_out_in  # pylint: disable=protected-access
          and gemv_lib.fits_out_in(*dense.kernel_shape_out_in(), norm=norm))


def _fused_product(x, dense, **fused):
  """`dense`'s product of the one row x with `fused` operations (see
  `training.gemv.gemv_out_in`) in the same kernel."""
  w_t, bias = dense.weights if dense._use_bias else (dense.weights, None)  # pylint: disable=protected-access
  return gemv_lib.gemv_out_in(x, w_t, bias=bias, **fused,
                              interpret=jax.default_backend() == 'cpu')


class PreNormResidual(tl.Serial):
  """x + layers(x), the same sublayers and weights as `tl.Residual(*layers)`.

  For layers = (LayerNorm, body, Dropout...) whose body offers
  `fused_step(x, norm)` (the dense attention and feed-forward in 'predict'
  mode), a decoding step off the CPU runs the block as the body's fused
  kernels when FUSED_DECODING_GPU is on; otherwise, and for any other
  layers, it is trax's Residual.
  """

  def __init__(self, *layers):
    flat = tl.Serial(*layers).sublayers
    body = flat[0] if len(flat) == 1 else tl.Serial(flat)
    super().__init__(tl.Branch(None, body), tl.Add(), name='PreNormResidual')
    rest = flat[2:]
    self._norm, self._body = (flat + [None, None])[:2]
    self._fusable = (isinstance(self._norm, LayerNorm)
                     and hasattr(self._body, 'fused_step')
                     and all(isinstance(r, tl.Dropout) for r in rest)
                     and all(getattr(r, '_mode', None) == 'predict' for r in rest))
    if self._fusable:  # the body's fused_step will be asked for
      self._body._in_fused_block = True  # pylint: disable=protected-access

  def forward(self, xs):
    if self._fusable and _fused_here(xs):
      scale, shift = self._norm.weights
      y = self._body.fused_step(xs, (scale, shift, self._norm._epsilon))  # pylint: disable=protected-access
      if y is not None:
        return y
    return super().forward(xs)


class _SelfAttention(tl.Serial):
  """`CausalSelfAttention`'s layers; `fused_step` for `PreNormResidual`."""

  def __init__(self, d_model, n_heads, max_len, mode, qkv_layer):
    super().__init__(
        Dense(3 * d_model, role='attention'),
        [] if qkv_layer is None else qkv_layer(mode=mode),
        CausalDotProductAttention(n_heads, max_len=max_len, mode=mode),
        Dense(d_model, role='attention'),
        name='CausalSelfAttention',
    )
    self._plain = qkv_layer is None and mode == 'predict'

  def fused_step(self, x, norm):
    """x + this(LayerNorm(x)) for one row: the norm, the QKV product and its
    bias in one kernel, the attention (its own kernel), the output product,
    bias and residual in one; None where the layers do not fit."""
    if not self._plain:
      return None
    qkv_dense, attention, out_dense = self.sublayers
    if not (_fusable(qkv_dense, norm=True) and _fusable(out_dense)):
      return None
    qkv = _fused_product(x, qkv_dense, norm=norm)
    return _fused_product(attention.forward(qkv), out_dense, residual=x)


def CausalSelfAttention(d_model, n_heads, max_len=2048, mode='train',
                        qkv_layer=None):
  """Fused QKV projection, causal attention, output projection.

  (batch, length, d_model) -> (batch, length, d_model).  `qkv_layer`, if
  given, is called as qkv_layer(mode=mode) and the layer it returns is applied
  to the fused (batch, length, 3 * d_model) projections [Q | K | V] before the
  attention (e.g. Primer's depthwise convolution).
  """
  if d_model % n_heads:
    raise ValueError(f'd_model ({d_model}) must be a multiple of n_heads '
                     f'({n_heads}); change one of them.')
  return _SelfAttention(d_model, n_heads, max_len, mode, qkv_layer)


class _FeedForward(tl.Serial):
  """`FeedForward`'s layers; `fused_step` for `PreNormResidual`."""

  def __init__(self, d_model, d_ff, activation, dropout, mode):
    super().__init__(
        Dense(d_ff),
        activation(),
        tl.Dropout(rate=dropout, mode=mode),
        Dense(d_model),
        name='FeedForward',
    )
    self._plain = mode == 'predict' and activation is tl.Relu

  def fused_step(self, x, norm):
    """x + this(LayerNorm(x)) for one row in two kernels (norm, product,
    bias and ReLU; product, bias and residual); None where the layers do
    not fit."""
    if not self._plain:
      return None
    first, _, _, second = self.sublayers
    if not (_fusable(first, norm=True) and _fusable(second)):
      return None
    hidden = _fused_product(x, first, norm=norm, relu=True)
    return _fused_product(hidden, second, residual=x)


def FeedForward(d_model, d_ff, activation=tl.Gelu, dropout=0.0, mode='train'):
  """Dense(d_ff) -> activation -> Dense(d_model).

  (batch, length, d_model) -> (batch, length, d_model).  Both are `Dense`
  (a decoding step's single row runs as a GEMM on a GPU: at the 800M shape on
  an H200 the second matrix took 17.8 us per layer as XLA's multiply and
  reduction, 7.3 us as a GEMM).  The attention's Dense layers (role
  'attention') keep XLA's reduction form there: fused with the attention
  output, it measured faster.
  """
  return _FeedForward(d_model, d_ff, activation, dropout, mode)


RESIDUALS = ('prenorm', 'prepost', 'rezero')


def DecoderBlock(d_model, d_ff, n_heads, dropout=0.0, max_len=2048,
                 activation=tl.Gelu, mode='train', qkv_layer=None,
                 ff_layer=None, norm=LayerNorm, residual='prenorm',
                 token_shift=False, attention_layer=None):
  """Attention and feed-forward residual blocks (pre-norm by default).

  (batch, length, d_model) -> (batch, length, d_model).

  The other arguments are the ablation lab's switches (primer_trax.variants);
  their defaults give the baseline:
    ff_layer: called like `FeedForward` (d_model, d_ff, activation, dropout,
      mode); default `FeedForward`.
    norm: norm layer class, called with no arguments (e.g. RMSNorm).
    residual: 'prenorm': x + drop(f(norm(x))) for both sublayers;
      'prepost' (full Primer's PrePostNormLayerStack): attention pre-norm,
      feed-forward x + drop(norm(f(x)));
      'rezero': x + a * drop(f(x)), no norms, one scalar a per block.
    token_shift: shift half the channels by one token at the start of each
      residual branch (after its pre-norm).
    attention_layer: called like `CausalSelfAttention`; default that.
  """
  if residual not in RESIDUALS:
    raise ValueError(f'residual must be one of {RESIDUALS}, not {residual!r}.')
  attention = (attention_layer or CausalSelfAttention)(
      d_model, n_heads, max_len=max_len, mode=mode, qkv_layer=qkv_layer)
  ff = (ff_layer or FeedForward)(d_model, d_ff, activation, dropout, mode)
  if token_shift or residual == 'rezero':
    from primer_trax import variants  # pylint: disable=g-import-not-at-top
  # No empty placeholders: the baseline's weight tree stays as it was.
  shift = lambda: [variants.TokenShift(mode=mode)] if token_shift else []
  drop = lambda: tl.Dropout(rate=dropout, mode=mode)
  if residual == 'rezero':
    return variants.ReZero(tl.Serial(*shift(), attention, drop()),
                           tl.Serial(*shift(), ff, drop()))
  if residual == 'prepost':
    ff_branch = tl.Residual(*shift(), ff, norm(), drop())
  else:
    ff_branch = PreNormResidual(norm(), *shift(), ff, drop())
  return [PreNormResidual(norm(), *shift(), attention, drop()), ff_branch]


@gin.configurable(module='training')
def DecoderLM(vocab_size, d_model=512, d_ff=2048, n_layers=6, n_heads=8,
              max_len=2048, dropout=0.0, activation=tl.Gelu, qkv_layer=None,
              mode='train', ff_layer=None, norm=LayerNorm, residual='prenorm',
              token_shift=False, attention_layer=None):
  """The baseline decoder-only Transformer language model.

  Args:
    vocab_size: number of token ids; inputs are in [0, vocab_size).
    d_model: width of the residual stream.
    d_ff: width of the feed-forward hidden layer.
    n_layers: number of decoder blocks.
    n_heads: attention heads; must divide d_model.
    max_len: longest sequence (positions, and the predict-mode cache).
    dropout: residual and feed-forward dropout rate in 'train' mode.
    activation: feed-forward activation layer class (e.g. `tl.Gelu`, `tl.Relu`).
    qkv_layer: optional qkv_layer(mode=...) -> layer applied to the fused Q/K/V
      projections in every attention (e.g. `primer_trax.layers.MultiDConv`).
    mode: 'train', 'eval' or 'predict'.
    ff_layer, norm, residual, token_shift, attention_layer: the ablation
      lab's switches, see `DecoderBlock` (norm is also the final norm).

  Returns:
    A layer (batch, length) int32 -> (batch, length, vocab_size) logits.
  """
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, not {mode!r}.')
  return tl.Serial(
      Embedding(vocab_size, d_model),
      tl.PositionalEncoding(max_len=max_len, mode=mode),
      [DecoderBlock(d_model, d_ff, n_heads, dropout, max_len, activation, mode,
                    qkv_layer, ff_layer=ff_layer, norm=norm, residual=residual,
                    token_shift=token_shift, attention_layer=attention_layer)
       for _ in range(n_layers)],
      norm(),
      Dense(vocab_size, role='head'),
  )


def _dense_layers(layer):
  """The tl.Dense sublayers of `layer`, depth first, in order."""
  if isinstance(layer, tl.Dense):
    return [layer]
  return [d for s in layer.sublayers for d in _dense_layers(s)]


def attention_weights_from_trax(trax_attention):
  """Converts an initialised `tl.CausalAttention` layer's weights to ours.

  trax keeps separate Q, K and V projections (w, b each) and an output
  projection; `CausalSelfAttention` keeps one fused projection whose columns
  are [Q | K | V].  Returns the weight tree for `CausalSelfAttention`.
  """
  q, k, v, out = [d.weights for d in _dense_layers(trax_attention)]
  fused_w = jnp.concatenate([q[0], k[0], v[0]], axis=1)
  fused_b = jnp.concatenate([q[1], k[1], v[1]], axis=0)
  return ((fused_w, fused_b), (), out)
