"""Sparse feed-forward blocks of Scaling Transformers (Terraformer), in Trax.

A dense feed-forward block computes `relu(x @ W1) @ W2 + b2` with d_ff hidden
units.  The sparse blocks here keep the same weights but let only a few units
fire per token, chosen by a small controller, so that decoding one token reads
only the chosen rows of W1 and W2:

  - `SparseFF` ("1 in N"): the d_ff units are cut into d_ff / N blocks of N
    units (N = `n_elements_in_block`) and a low-rank controller picks one unit
    in every block.  A token reads d_ff / N columns of W1 and rows of W2.
  - `BlockSparseFF` (mixture-of-experts like): the d_ff units are cut into
    `n_experts` contiguous blocks and a linear router picks one whole block.
    A token reads d_ff / n_experts columns of W1 and rows of W2.

Both follow `trax.layers.research.sparsity` (trax 1.4.1): same constructor
arguments and defaults, same equations, same train-mode tricks (Gumbel noise,
straight-through one-hot, soft mask in a share of the batches), and, after
`weights_from_trax`, the same eval- and predict-mode outputs.  Differences in
shape, not in behaviour:

  - `SparseFF` is one layer owning all six weights instead of a tree of
    trax layers (controller, main, dropout, remember/recall), and stores both
    big matrices unit-major, `(d_ff / N, N, d_model)`, so that predict mode
    gathers contiguous rows of d_model numbers.  trax keeps W1 as
    `(d_model, d_ff / N, N)`, where the d_model weights of one unit lie d_ff
    numbers apart: each one costs a whole cache line (or GPU memory sector).
    On a shared 2-core CPU (d_model 1024, d_ff 6144, N 64, one token, jit,
    two runs) trax's predict took 0.74-1.9 ms, ours 0.35-0.49 ms, and a
    dense FF with d_ff 4096 3.0 ms.
    `weights_from_trax` transposes once.
  - In predict mode both layers gather the chosen units only while that reads
    fewer weights than the dense matrices hold, i.e. while the number of rows
    (batch x length) is below N (`SparseFF`) or `n_experts` (`BlockSparseFF`);
    a longer prompt is computed densely with the one-hot mask, which gives the
    same numbers.  (trax gathers for any number of rows in `SparseFF`, and only
    for exactly one row in `BlockSparseFF`.)
"""

import itertools
import math

import jax
from jax import numpy as jnp
from jax.experimental import pallas as pl
from trax.layers import base
from trax.layers import initializers as init

from training import gemv as gemv_lib
from training import model as model_lib

MODES = ('train', 'eval', 'predict')

# A decoding step (one row) off the CPU may run `SparseFF` inside its
# pre-norm block (`training.model.PreNormResidual`, with FUSED_DECODING_GPU
# there) as two Pallas kernels: the LayerNorm and the controller's first
# product in one (`_controller`, which also writes x + b2), then one program
# per block of N units that computes the block's controller logits, picks
# its unit, multiplies that unit's rows of W1 and W2 and adds the result
# into x + b2 atomically (`_chosen_units`), so no kernel follows.  The order
# of those additions varies, so on a GPU the output's last bits may differ
# from run to run; turn this off for bitwise-repeatable decoding.  On: on an
# H100 (s26) the sparse-FF model decoded at 0.577 ms/token with the fused
# step and 0.672 without (800M shape, dense 0.74; the same greedy tokens,
# bench/results/decode_*_s26*).  s30 landed this form together with the
# sparse-QKV kernels' loads-first change; against s28's form (one row per
# block, summed after the kernel) without either, on one H100 in three
# pairs of runs: sparse FF+QKV 0.484-0.491 against 0.507-0.530 ms/token,
# sparse FF 0.530-0.553 against 0.548-0.604.  Timed alone once, the atomic
# form was level (sparse FF 0.619 against 0.604, FF+QKV 0.522 against 0.530).
# s31: the per-block kernel reads m2 in power-of-2 pieces of the controller's
# width (64 + 32 at the 800M shape, no padding to 128) with 8 warps a
# program: 24 layers' fused steps took 8.95 us a layer against 10.34 in s30's
# form (bench/sparse_ff_kernel.py, one H100), and in one pair of runs sparse
# FF decoded at 0.498 ms/token against 0.547, FF+QKV at 0.455 against 0.548.
FUSED_DECODING_GPU = True

# Key that trax's `ReversibleHalfResidual.reverse_and_grad` looks for in a
# layer state `(saved, {'running_second_time': ()})`; it hands the layer
# `(saved, {'running_second_time_yes': ()})` when it recomputes the forward
# pass, so the recomputation can reuse the discrete choice of the first pass.
_FIRST_PASS = 'running_second_time'
_SECOND_PASS = 'running_second_time_yes'


def _check_mode(mode):
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}.')


def _relu(x):
  # Gradient 0 at exactly 0, like trax's `where(x <= 0, 0, x)`.  This matters:
  # units switched off by the one-hot mask sit at exactly 0, and
  # `jnp.maximum` would send half a gradient through them.
  return jnp.where(x <= 0, jnp.zeros_like(x), x)


def _argmax(a):
  """argmax over the last axis (first of equal maxima), as two plain
  reductions: XLA on a CPU runs them several times faster than its
  (value, index) argmax reduction, which matters when decoding one token."""
  top = jnp.max(a, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, a.shape, a.ndim - 1)
  return jnp.min(jnp.where(a == top, iota, a.shape[-1]), axis=-1)


def _gumbel(rng, shape):
  """Gumbel(0, 1) noise from uniforms clipped to [1e-6, 1 - 1e-6], as trax."""
  u = jax.random.uniform(rng, shape, jnp.float32, 1e-6, 1.0 - 1e-6)
  return -jnp.log(-jnp.log(u))


def _straight_through(one_hot, soft):
  """Value `one_hot`, gradient of `soft` (arXiv 1801.09797, section 2.1)."""
  return (jax.lax.stop_gradient(one_hot)
          + soft - jax.lax.stop_gradient(soft))


def _dropout(x, rate, shared_axes, rng):
  """Inverted dropout of `x`; a mask axis in `shared_axes` has size 1."""
  if rate == 0.0:
    return x
  mask_shape = list(x.shape)
  for axis in shared_axes:
    mask_shape[axis] = 1
  keep = jax.random.bernoulli(rng, 1.0 - rate, tuple(mask_shape))
  return x * (keep.astype(x.dtype) / (1.0 - rate))


class SparseFF(base.Layer):
  """Feed-forward block in which one unit in every block of N fires.

  (..., d_model) -> (..., d_model); all leading axes are treated as rows.

  With N = `n_elements_in_block` and d1 = d_ff / N blocks, for a row x:

      logits = x @ m1 @ m2 + mb                        (d1, N), low rank
      k      = argmax over N of logits                 one unit per block
      h      = relu((x @ W1) * one_hot(k))             (d1, N), no first bias
      y      = h @ W2 + b2                             (d_model,)

  Train mode adds Gumbel noise of the given temperature before the argmax and
  replaces one_hot(k) by its straight-through version (value one-hot,
  gradient of softmax(logits)); in a `1 - quant_prob` share of the calls the
  soft mask softmax(logits) itself is used instead.  Eval and predict take the
  plain argmax.  Predict computes only the d1 chosen units per row, by
  gathering their rows of W1 and W2 (see the module docstring for the rule).

  Weights `(m1, m2, mb, w1, w2, b2)`:
      m1 (d_model, d_lowrank), m2 (d_lowrank, d1, N), mb (d1, N),
      w1 (d1, N, d_model), w2 (d1, N, d_model), b2 (d_model,).
  State `(choice, {'running_second_time': ()})`: the int32 choice `k`
  (rows, d1) of the last train-mode call.  When trax's reversible layers
  recompute the forward pass they hand back the key 'running_second_time_yes'
  and the layer reuses that saved choice (trax's `_RememberInReverse`).
  Only train mode updates the state, so its shape stays fixed in decoding.
  """

  def __init__(self, d_ff, n_elements_in_block=32, d_lowrank=64,
               temperature=0.1, quant_prob=0.3, use_bfloat16=False,
               big_weights_in_bfloat16=False, mode='train',
               kernel_initializer=init.GlorotUniformInitializer(),
               bias_initializer=init.RandomNormalInitializer(1e-6),
               dropout_rate=0.0, dropout_shared_axes=None, ff_chunk_size=0,
               multiply_by_controller_output=False, kernel_scaling=False):
    """Creates a sparse feed-forward layer.

    Args:
      d_ff: Number of hidden units.
      n_elements_in_block: N, the block size; one unit per block fires.
      d_lowrank: Inner width of the low-rank controller m1 @ m2.
      temperature: Gumbel-noise scale in train mode (0 in other modes).
      quant_prob: Share of train-mode calls that use the straight-through
        one-hot mask; the others use the soft mask.
      use_bfloat16: Keep all weights in bfloat16.
      big_weights_in_bfloat16: Keep w1 and w2 in bfloat16.
      mode: 'train', 'eval' or 'predict'.
      kernel_initializer: Initializer of m1, m2, w1, w2 (called with the
        trax shapes (d_model, d_lowrank), (d_lowrank, d_ff), (d_model, d_ff),
        (d_ff, d_model)).
      bias_initializer: Initializer of mb (d_ff,) and b2 (d_model,).
      dropout_rate: Dropout rate on the output, train mode only.
      dropout_shared_axes: Axes of the flattened (rows, d_model) output that
        share a dropout mask.  As in trax the axes count after flattening:
        0 is all rows, 1 is d_model.
      ff_chunk_size: If > 0 and it divides the number of rows, compute the
        rows in chunks of this size (rematerialised in training).
      multiply_by_controller_output: Multiply each fired unit by the softmax
        probability of its choice.
      kernel_scaling: Multiply the initial w2 by sqrt(N).

    Raises:
      ValueError: if N does not divide d_ff, or mode is unknown.
    """
    super().__init__(name=f'SparseFF_{d_ff}')
    _check_mode(mode)
    if n_elements_in_block < 1 or d_ff % n_elements_in_block:
      raise ValueError(
          f'SparseFF: d_ff={d_ff} must be a multiple of n_elements_in_block='
          f'{n_elements_in_block}; pick a d_ff divisible by the block size.')
    self._d_ff = d_ff
    self._n = n_elements_in_block
    self._d1 = d_ff // n_elements_in_block
    self._d_lowrank = d_lowrank
    self._temperature = temperature if mode == 'train' else 0.0
    self._quant_prob = quant_prob
    self._use_bfloat16 = use_bfloat16
    self._big_weights_in_bfloat16 = big_weights_in_bfloat16
    self._mode = mode
    self._kernel_initializer = kernel_initializer
    self._bias_initializer = bias_initializer
    self._dropout_rate = dropout_rate
    self._dropout_shared_axes = tuple(dropout_shared_axes or ())
    self._ff_chunk_size = ff_chunk_size
    self._multiply = multiply_by_controller_output
    self._kernel_scaling = kernel_scaling
    self._fused_form = False  # weights in the fused decoding form

  def use_decoding_form(self):
    """Switches a predict-mode layer decoding one row off the CPU, with
    FUSED_DECODING_GPU and training.model's fused blocks on, inside a block
    that fuses it (`training.model.PreNormResidual` marks it
    `_in_fused_block`), to the fused decoding form and returns the function
    that makes it from the layer's weights (see `decoding_form`); None, and
    the plain form, otherwise."""
    d_model = self.weights[3].shape[-1] if self.weights else 0
    self._fused_form = False
    if not (FUSED_DECODING_GPU and self._mode == 'predict'
            and getattr(self, '_in_fused_block', False)
            and not self._multiply and model_lib.fused_decoding_here()
            and gemv_lib.pl_triton is not None  # (its atomic addition)
            and self.state[0].shape[0] == 1 and gemv_lib.power_of_2(self._n)
            and gemv_lib.power_of_2(d_model)
            and gemv_lib.fits_out_in(sum(lowrank_pieces(self._d_lowrank)), d_model)):
      return None
    self._fused_form = True
    return self.decoding_form

  def decoding_form(self, weights):
    """(m1, m2, mb, w1, w2, b2) -> (m1 transposed, (P, d_model); m2 as
    (d1, N, L) split along L into `lowrank_pieces(L)`, a tuple; mb, w1, w2,
    b2 as they are), with P the pieces' sum (zero rows and columns where the
    last piece pads the controller's width)."""
    m1, m2, mb, w1, w2, b2 = weights
    pieces = lowrank_pieces(self._d_lowrank)
    pad = sum(pieces) - self._d_lowrank
    m1_t = jnp.pad(m1.T, ((0, pad), (0, 0)))
    m2_f = jnp.pad(jnp.transpose(m2, (1, 2, 0)), ((0, 0), (0, 0), (0, pad)))
    ends = list(itertools.accumulate(pieces))
    return (m1_t, tuple(jnp.split(m2_f, ends[:-1], axis=-1)), mb, w1, w2, b2)

  def _controller_weights(self):
    """(m1, m2, mb) as trax lays them out, from either form."""
    m1, m2, mb = self.weights[:3]
    if not self._fused_form:
      return m1, m2, mb
    r = self._d_lowrank
    m2 = jnp.concatenate(m2, axis=-1)
    return m1[:r].T, jnp.transpose(m2[..., :r], (2, 0, 1)), mb

  def fused_step(self, x, norm):
    """x + this(LayerNorm(x)) for one row in the fused decoding form (see
    FUSED_DECODING_GPU); None where that does not apply."""
    if not self._fused_form or math.prod(x.shape[:-1]) != 1:
      return None
    m1_t, m2_parts, mb, w1, w2, b2 = self.weights
    interpret = jax.default_backend() == 'cpu'
    z, start = _controller(x, norm, m1_t, b2, interpret)
    y = _chosen_units(x, norm, z, m2_parts, mb, w1, w2, start, interpret)
    return y.astype(x.dtype).reshape(x.shape)

  def init_weights_and_state(self, input_signature):
    """Initialises weights as trax does (shapes in the class docstring)."""
    d_model = input_signature.shape[-1]
    rows = 1
    for d in input_signature.shape[:-1]:
      rows *= d
    r_m1, r_m2, r_mb, r_w1, r_w2, r_b2 = jax.random.split(self.rng, 6)
    kinit, binit = self._kernel_initializer, self._bias_initializer
    m1 = kinit((d_model, self._d_lowrank), r_m1)
    m2 = kinit((self._d_lowrank, self._d_ff), r_m2)
    mb = binit((self._d_ff,), r_mb)
    w1 = kinit((d_model, self._d_ff), r_w1)
    w2 = kinit((self._d_ff, d_model), r_w2)
    b2 = binit((d_model,), r_b2)
    if self._use_bfloat16:
      m1, m2, mb, b2 = (a.astype(jnp.bfloat16) for a in (m1, m2, mb, b2))
    if self._use_bfloat16 or self._big_weights_in_bfloat16:
      w1, w2 = w1.astype(jnp.bfloat16), w2.astype(jnp.bfloat16)
    m2 = jnp.reshape(m2, (self._d_lowrank, self._d1, self._n))
    mb = jnp.reshape(mb, (self._d1, self._n))
    w1 = jnp.transpose(jnp.reshape(w1, (d_model, self._d1, self._n)), (1, 2, 0))
    w2 = jnp.reshape(w2, (self._d1, self._n, d_model))
    if self._kernel_scaling:
      w2 = w2 * (self._n ** 0.5)  # output variance independent of N
    self.weights = (m1, m2, mb, w1, w2, b2)
    self.state = (jnp.zeros((rows, self._d1), jnp.int32), {_FIRST_PASS: ()})

  def forward(self, x):
    """(..., d_model) -> (..., d_model)."""
    shape = x.shape
    x = jnp.reshape(x, (-1, shape[-1]))
    rows = x.shape[0]
    train = self._mode == 'train'
    recalled = None
    if train and _SECOND_PASS in self.state[1]:
      recalled = self.state[0]
    rng = self.rng if train else None  # randomness is for training only

    size = self._ff_chunk_size
    if 0 < size < rows and rows % size == 0:
      n_chunks = rows // size
      chunk = lambda a: jnp.reshape(a, (n_chunks, size) + a.shape[1:])
      def one_chunk(args):
        xc, rc, i = args
        return self._rows(xc, rc, None if rng is None else
                          jax.random.fold_in(rng, i))
      if train:
        one_chunk = jax.checkpoint(one_chunk)
      y, mask = jax.lax.map(
          one_chunk,
          (chunk(x), None if recalled is None else chunk(recalled),
           jnp.arange(n_chunks)))
      y, mask = jnp.reshape(y, (rows, -1)), jnp.reshape(mask, (rows, -1))
    else:
      y, mask = self._rows(x, recalled, rng)

    if train:
      self.state = (mask.astype(jnp.int32), {_FIRST_PASS: ()})
    return jnp.reshape(y, shape)

  def _rows(self, x, recalled, rng):
    """(rows, d_model) -> ((rows, d_model), chosen units (rows, d1) int32)."""
    train = self._mode == 'train'
    r_gumbel, r_select, r_dropout = (
        jax.random.split(rng, 3) if train else (None, None, None))
    choice, soft = self._choose(x, r_gumbel)
    if recalled is not None:
      choice = recalled
    if self._mode == 'predict' and x.shape[0] < self._n:
      y = self._chosen_units_only(x, choice, soft)
    else:
      y = self._all_units_masked(x, choice, soft, r_select)
    if train:
      y = _dropout(y, self._dropout_rate, self._dropout_shared_axes, r_dropout)
    return y, choice.astype(jnp.int32)

  def _choose(self, x, rng):
    """Controller: (rows, d_model) -> choice (rows, d1), softmax or None.

    The softmax (rows, d1, N) is computed where it is used: in training and
    with `multiply_by_controller_output`.
    """
    m1, m2, mb = self._controller_weights()
    # x @ m1 first: the (rows, d_lowrank) intermediate is the small one.
    logits = jnp.reshape((x @ m1) @ jnp.reshape(m2, (m2.shape[0], -1)),
                         (x.shape[0],) + mb.shape) + mb  # (rows, d1, N)
    if self._mode != 'train' and not self._multiply:
      return _argmax(logits), None
    log_soft = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    if self._temperature != 0.0:
      log_soft_noisy = log_soft + self._temperature * _gumbel(rng, logits.shape)
    else:
      log_soft_noisy = log_soft
    return _argmax(log_soft_noisy), jnp.exp(log_soft)

  def _chosen_units_only(self, x, choice, soft):
    """Predict: gathers the d1 chosen rows of w1 and w2 for every row of x."""
    w1, w2, b2 = self.weights[3:]
    rows, d_model = x.shape
    # Unit u of block j is row j * N + u of the (d_ff, d_model) matrices.
    units = jnp.reshape(jnp.arange(self._d1) * self._n + choice, (-1,))
    def gather(w):  # -> (rows, d1, d_model)
      w = jnp.reshape(w, (self._d_ff, d_model))
      picked = w.at[units].get(mode='promise_in_bounds',
                               indices_are_sorted=rows == 1)
      return jnp.reshape(picked, (rows, self._d1, d_model))
    w1_rows, w2_rows = gather(w1), gather(w2)
    h = _relu(jnp.einsum('bd,bxd->bx', x, w1_rows))
    if self._multiply:
      h = h * jnp.take_along_axis(soft, choice[..., None], -1)[..., 0]
    return jnp.einsum('bx,bxd->bd', h, w2_rows) + b2

  def _all_units_masked(self, x, choice, soft, rng):
    """All d_ff units, masked: one-hot (eval, predict) or train-mode mask."""
    w1, w2, b2 = self.weights[3:]
    one_hot = jax.nn.one_hot(choice, self._n, dtype=jnp.float32)
    if self._mode == 'train':
      use_hard = jax.random.uniform(rng, ()) < self._quant_prob
      gate = jnp.where(use_hard, _straight_through(one_hot, soft), soft)
    else:
      gate = one_hot
    # Plain 2-D matmuls: XLA on CPU runs the equivalent 3-D einsum
    # 'bd,xyd->bxy' ten times slower for one row.
    rows, d_model = x.shape
    mid = jnp.reshape(x @ jnp.reshape(w1, (self._d_ff, d_model)).T,
                      (rows, self._d1, self._n))
    h = _relu(mid * gate)  # (rows, d1, N)
    if self._multiply and self._mode == 'train':
      # The soft mask already scales h; the hard one gets the probability as
      # a constant (its gradient flows straight through `gate`).
      h = h * jax.lax.stop_gradient(
          jnp.where(use_hard, soft, jnp.ones_like(soft)))
    elif self._multiply:
      h = h * soft
    return (jnp.reshape(h, (rows, self._d_ff))
            @ jnp.reshape(w2, (self._d_ff, d_model))) + b2


def _controller(x, norm, m1_t, b2, interpret):
  """The controller's low-rank vector z = LayerNorm(x) @ m1 (L,) and x + b2
  (d_model,), both float32, in one kernel: a program per `block_n` rows of
  m1_t (L, d_model) (`training.gemv`'s out-in tiling), the first of which
  also writes x + b2, where `_chosen_units` adds its units' outputs."""
  scale, shift, epsilon = norm
  width, d_model = m1_t.shape
  block_n, _, num_warps = gemv_lib.default_tiling_out_in(width, d_model)

  def kernel(x_ref, s_ref, t_ref, m_ref, b2_ref, z_ref, start_ref):
    m = m_ref[...].astype(jnp.float32)
    xn = gemv_lib.layer_norm_in_kernel(x_ref, s_ref, t_ref, epsilon)(
        pl.ds(0, d_model))
    z_ref[...] = jnp.sum(m * xn[None, :], axis=1)

    @pl.when(pl.program_id(0) == 0)
    def _():
      start_ref[...] = (x_ref[...].astype(jnp.float32)
                        + b2_ref[...].astype(jnp.float32))

  row = gemv_lib.whole_block((d_model,))
  return pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((width,), jnp.float32),
                 jax.ShapeDtypeStruct((d_model,), jnp.float32)),
      grid=(width // block_n,),
      in_specs=[row, row, row,
                pl.BlockSpec((block_n, d_model), lambda j: (j, 0)), row],
      out_specs=(pl.BlockSpec((block_n,), lambda j: (j,)), row),
      interpret=interpret,
      name='sparse_ff_controller',
      **gemv_lib.compiler_params(interpret, num_warps),
  )(x.reshape(d_model), scale.reshape(d_model), shift.reshape(d_model), m1_t,
    b2.reshape(d_model))


def _chosen_units(x, norm, z, m2_parts, mb, w1, w2, start, interpret,
                  num_warps=8):
  """`SparseFF`'s output plus x for one row, a program per block of N.

  x: the row before its LayerNorm, norm = (scale, shift, epsilon); z: the
  controller's low-rank vector LayerNorm(x) @ m1 (P,); m2_parts: m2 as
  (d1, N, L) split along L into pieces (`lowrank_pieces`) whose
  widths sum to P; mb (d1, N), w1 and w2 (d1, N, d_model); start: x + b2
  (d_model,) float32, from `_controller`.  For its block j a program
  computes the logits z @ m2[j] + mb[j], picks the first of their maxima k
  and adds relu(LayerNorm(x) . w1[j, k]) * w2[j, k] into start (aliased in
  and out) by an atomic addition, so no kernel follows: (d_model,)
  float32.  The order of the additions varies from run to run, so the
  output's last bits can.  num_warps: Triton's, per program (8: 8.95 us a
  layer against 10.80 with 4 at the 800M shape on an H100, s31).  Summing
  several blocks in a program before one addition was slower at every
  setting (10.34, 11.83 and 12.63 us a layer for 2-4 blocks, s31).
  """
  scale, shift, epsilon = norm
  d1, n, _ = m2_parts[0].shape
  d_model = x.shape[-1]
  widths = [p.shape[-1] for p in m2_parts]
  starts = list(itertools.accumulate(widths[:-1], initial=0))

  def kernel(x_ref, s_ref, t_ref, z_ref, mb_ref, w1_ref, w2_ref, start_ref,
             *refs):
    del start_ref  # aliased to o_ref
    *m2_refs, o_ref = refs
    # Each load as soon as its address is known: the controller's block
    # first, then both rows of the chosen unit.
    m2 = [r[0].astype(jnp.float32) for r in m2_refs]
    zz = [z_ref[pl.ds(a, w)].astype(jnp.float32)
          for a, w in zip(starts, widths)]
    logits = mb_ref[0].astype(jnp.float32)
    xn = gemv_lib.layer_norm_in_kernel(x_ref, s_ref, t_ref, epsilon)(
        pl.ds(0, d_model))
    for m, zp in zip(m2, zz):
      logits = logits + jnp.sum(m * zp[None, :], axis=1)
    iota = jax.lax.broadcasted_iota(jnp.int32, (n,), 0)
    k = jnp.min(jnp.where(logits == jnp.max(logits), iota, n))
    w1_row = w1_ref[0, pl.ds(k, 1), :].astype(jnp.float32)
    w2_row = w2_ref[0, pl.ds(k, 1), :].astype(jnp.float32)
    h = jnp.maximum(jnp.sum(w1_row * xn[None, :]), 0.0)
    gemv_lib.pl_triton.atomic_add(o_ref, pl.ds(0, d_model), (h * w2_row)[0])

  whole = lambda size: gemv_lib.whole_block((size,))
  rows = pl.BlockSpec((1, n, d_model), lambda j: (j, 0, 0))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((d_model,), jnp.float32),
      grid=(d1,),
      in_specs=[whole(d_model), whole(d_model), whole(d_model),
                whole(z.size), pl.BlockSpec((1, n), lambda j: (j, 0)),
                rows, rows, whole(d_model)]
               + [pl.BlockSpec((1, n, w), lambda j: (j, 0, 0))
                  for w in widths],
      out_specs=whole(d_model),
      input_output_aliases={7: 0},
      interpret=interpret,
      name='sparse_ff_units',
      **gemv_lib.compiler_params(interpret, num_warps),
  )(x.reshape(d_model), scale.reshape(d_model), shift.reshape(d_model),
    z.reshape(-1), mb, w1, w2, start, *m2_parts)


def lowrank_pieces(width, smallest=16):
  """`width` as powers of 2 of at least `smallest`, largest first; a rest
  below `smallest` becomes one more piece of `smallest` (padding): 96 ->
  (64, 32), 8 -> (16,).  SparseFF's fused form stores m2 in the pieces of
  the controller's width, so no padding is read where the width is a sum
  of such powers."""
  pieces, rest = [], width
  while rest >= smallest:
    pieces.append(1 << (rest.bit_length() - 1))
    rest -= pieces[-1]
  return tuple(pieces + [smallest] * (rest > 0))


class BlockSparseFF(base.Layer):
  """Feed-forward block in which one contiguous block of units fires.

  (..., d_model) -> (..., d_model); all leading axes are treated as rows.

  With E = `n_experts` blocks of B = d_ff / E units, for a row x:

      e = argmax(x @ m1)                               one block, no bias
      h = relu((x @ W1) * expand(one_hot(e), B))       (d_ff,), no first bias
      y = h @ W2 + b2                                  (d_model,)

  Train mode adds Gumbel noise of the given temperature before the argmax and
  in half of the calls (fixed, as in trax) uses the straight-through one-hot
  (value one-hot, gradient of softmax(x @ m1)); the other half uses the soft
  mask.  Eval and predict take the plain argmax.  Predict with fewer rows
  than E computes only the chosen block of every row, by gathering its B
  columns of W1 and B rows of W2.

  Weights `(m1, w1, w2, b2)`, the trax layout: m1 (d_model, E),
  w1 (d_model, d_ff), w2 (d_ff, d_model), b2 (d_model,).  No state.
  """

  def __init__(self, d_ff, n_experts=64, temperature=0.7, mode='train',
               kernel_initializer=init.GlorotUniformInitializer(),
               bias_initializer=init.RandomNormalInitializer(1e-6)):
    """Creates a block-sparse feed-forward layer.

    Args:
      d_ff: Number of hidden units.
      n_experts: Number of blocks E; one block fires per row.
      temperature: Gumbel-noise scale in train mode (0 in other modes).
      mode: 'train', 'eval' or 'predict'.
      kernel_initializer: Initializer of m1, w1 and w2.
      bias_initializer: Initializer of b2.

    Raises:
      ValueError: if n_experts does not divide d_ff, or mode is unknown.
    """
    super().__init__(name=f'BlockSparseFF_{d_ff}')
    _check_mode(mode)
    if n_experts < 1 or d_ff % n_experts:
      raise ValueError(
          f'BlockSparseFF: d_ff={d_ff} must be a multiple of n_experts='
          f'{n_experts}; pick a d_ff divisible by the number of experts.')
    self._d_ff = d_ff
    self._n_experts = n_experts
    self._block = d_ff // n_experts
    self._temperature = temperature if mode == 'train' else 0.0
    self._mode = mode
    self._kernel_initializer = kernel_initializer
    self._bias_initializer = bias_initializer

  def init_weights_and_state(self, input_signature):
    """Initialises weights as trax does (shapes in the class docstring)."""
    d_model = input_signature.shape[-1]
    r_m1, r_w1, r_w2, r_b2 = jax.random.split(self.rng, 4)
    kinit = self._kernel_initializer
    self.weights = (kinit((d_model, self._n_experts), r_m1),
                    kinit((d_model, self._d_ff), r_w1),
                    kinit((self._d_ff, d_model), r_w2),
                    self._bias_initializer((d_model,), r_b2))

  def _use_quantized(self, rng):
    """Whether this train-mode call uses the straight-through one-hot mask."""
    return jax.random.uniform(rng, ()) < 0.5

  def forward(self, x):
    """(..., d_model) -> (..., d_model)."""
    m1, w1, w2, b2 = self.weights
    shape = x.shape
    x = jnp.reshape(x, (-1, shape[-1]))
    rows = x.shape[0]
    logits = jnp.dot(x, m1)  # (rows, E)
    log_soft = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    soft = jnp.exp(log_soft)

    if self._mode == 'train':
      r_gumbel, r_select = jax.random.split(self.rng)
      noise = _gumbel(r_gumbel, soft.shape) * self._temperature
      expert = jnp.argmax(log_soft + noise, axis=-1)
      one_hot = jax.nn.one_hot(expert, self._n_experts, dtype=soft.dtype)
      gate = jnp.where(self._use_quantized(r_select),
                       _straight_through(one_hot, soft), soft)
    else:
      expert = jnp.argmax(log_soft, axis=-1)
      gate = jax.nn.one_hot(expert, self._n_experts, dtype=soft.dtype)

    if self._mode == 'predict' and rows < self._n_experts:
      d_model = x.shape[-1]
      w1_cols = jnp.take(  # (d_model, rows, B)
          jnp.reshape(w1, (d_model, self._n_experts, self._block)), expert, 1)
      w2_rows = jnp.take(  # (rows, B, d_model)
          jnp.reshape(w2, (self._n_experts, self._block, d_model)), expert, 0)
      h = _relu(jnp.einsum('bd,dbk->bk', x, w1_cols))
      y = jnp.einsum('bk,bkd->bd', h, w2_rows) + b2
    else:
      gate = jnp.repeat(gate, self._block, axis=-1)  # (rows, d_ff)
      h = _relu(jnp.dot(x, w1) * gate)
      y = jnp.dot(h, w2) + b2
    return jnp.reshape(y, shape)


def weights_from_trax(trax_layer, weights=None):
  """Maps the weights of a trax sparse FF layer onto the matching layer here.

  Args:
    trax_layer: An initialised `trax.layers.research.sparsity.SparseFF(...)`
      (the combinator tree it returns) or `BlockSparseFF`.
    weights: Optional pytree shaped like `trax_layer.weights` to convert
      instead of the layer's own weights (gradients, optimizer slots).

  Returns:
    For `SparseFF`: `(m1, m2, mb, w1, w2, b2)` for `SparseFF` here.  m1, m2,
    mb, b2 are unchanged; w1 goes from trax's (d_model, d1, N) to
    (d1, N, d_model) and w2 from trax's (N, d1, d_model) to (d1, N, d_model),
    both plain transposes, so dtypes and values are kept exactly.
    For `BlockSparseFF`: `(m1, w1, w2, b2)`, unchanged (same layout).

  Raises:
    ValueError: if `trax_layer` is neither of the two.
  """
  # Imported here: only the converter needs trax's reference layers.
  from trax.layers.research import sparsity
  # pylint: disable=protected-access
  trax_parts = (sparsity._SparseFFController, sparsity._SparseFFMain)
  # pylint: enable=protected-access
  if weights is None:
    weights = trax_layer.weights
  if isinstance(trax_layer, sparsity.BlockSparseFF):
    return tuple(weights)
  found = {}
  def walk(layer, w):
    if isinstance(layer, trax_parts):
      found[type(layer).__name__] = w
    for sub, sub_w in zip(layer.sublayers, w):
      walk(sub, sub_w)
  walk(trax_layer, weights)
  if set(found) != {'_SparseFFController', '_SparseFFMain'}:
    raise ValueError(
        f'weights_from_trax: {trax_layer.name} is neither trax SparseFF nor '
        'BlockSparseFF; pass a layer built by trax.layers.research.sparsity.')
  m1, m2, mb = found['_SparseFFController']
  w1, w2, b2 = found['_SparseFFMain']
  return (m1, m2, mb, jnp.transpose(w1, (1, 2, 0)),
          jnp.transpose(w2, (1, 0, 2)), b2)
