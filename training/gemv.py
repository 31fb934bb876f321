"""A one-row matrix product (x @ W for a single decoded token) as a Pallas kernel.

Decoding one token multiplies a single row by every weight matrix, so its
time is the time to read the weights.  XLA:GPU runs such a product either as
a multiply-and-reduce fusion or (given two rows) as a GEMM with small tiles,
both well under the memory bandwidth.  `gemv` splits the matrix into tiles of
`block_k` rows by `block_n` columns; each program of the grid streams one
column block of one of `split_k` row ranges, accumulating elementwise
products in registers, and the `split_k` partial rows are summed afterwards
(by XLA, fused with whatever consumes the result).

Measured on an H100 (2026-12-06, bench/results/gemv_sweep_h100_s20.txt and
gemv_sweep_h100_s21.txt, chains of the 800M decoder's matrices): with
split_k 1-4 it was slower than XLA's dot on the attention matrices (10.9
against 7.0 us per matrix) and than the two-row GEMM on the feed-forward's
(22.3 against 10.1 us): too few programs.  With split_k 16, block_n 32 and
block_k 64 (the default tiling since) it is faster than both: 5.65 against
7.16 us on the attention matrices, 9.13 against 9.97 us on the
feed-forward's.  On the 32000-wide head it is level with XLA (51 us, 2.5
TB/s, at split_k 4).  In the whole decoding loop the gain was not clear
against the spread between runs, so no role uses it by default
(`training.model.ONE_ROW_GPU_FORMS`; BENCHMARKS.md, H100 2026-12-06).

`gemv_out_in` is the same product for a kernel stored transposed, (d_out,
d_in), as the Sampler hands kernels over by default: each program reads a
few whole contiguous rows and no partial sums are left.  On the H100
(bench/results/gemv_sweep_h100_s22.txt) its best tiling took 5.36 us per
attention matrix and 8.50 us per feed-forward matrix, while XLA's own dot
over the transposed kernel took 4.54 and 7.50 us (1.85 and 2.24 TB/s), so
the out-in layers use XLA's dot unless a role asks for 'gemv'.

With a decoder block's small operations inside it (the LayerNorm before,
bias, ReLU and residual addition after: `gemv_out_in`'s `norm`, `bias`,
`relu`, `residual`), `gemv_out_in` is what the dense decoder runs on a GPU
(`training.model.PreNormResidual`): fewer kernels beat XLA's faster plain
product (bench/block_fusion.py on an H200, s25: 26.9 against 32.6 us per
800M layer).
"""
import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp

try:  # the Triton backend's options (absent from some jaxlib builds)
  from jax.experimental.pallas import triton as pl_triton
except ImportError:  # pragma: no cover
  pl_triton = None


def _largest_divisor(n, choices):
  for c in choices:
    if n % c == 0:
      return c
  return None


def power_of_2(n):
  return n > 0 and not n & (n - 1)


def compiler_params(interpret, num_warps):
  """`pl.pallas_call`'s keyword for Triton's options: {} when interpreted
  (or where this jaxlib has no Triton backend)."""
  if pl_triton is None or interpret:
    return {}
  return {'compiler_params': pl_triton.CompilerParams(num_warps=num_warps)}


def whole_block(shape):
  """A BlockSpec handing every program of any grid the whole array."""
  shape = tuple(shape)
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def layer_norm_in_kernel(x_ref, scale_ref, shift_ref, epsilon):
  """Inside a kernel: the LayerNorm of the row x_ref (float32 statistics
  over the whole row, which Triton loads whole: its width a power of 2), as
  a function of a part of the row (a `pl.ds`) giving the normalised,
  scaled and shifted values there."""
  xf = x_ref[...].astype(jnp.float32)
  mean = jnp.mean(xf)
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(xf - mean)) + epsilon)

  def part_of(part):
    return ((x_ref[part].astype(jnp.float32) - mean) * rstd
            * scale_ref[part].astype(jnp.float32)
            + shift_ref[part].astype(jnp.float32))
  return part_of


def default_tiling(d_in, d_out):
  """(block_n, block_k, num_warps, split_k) for a (d_in, d_out) matrix.

  Prefers the best of an H100 sweep over the decoder's matrices (block_n
  16-64, block_k 32-64, split_k 8-32, 2 or 4 warps): block_n 32, block_k 64,
  4 warps, split_k 16 (enough programs to fill the GPU at d_out 1024).
  """
  block_n = _largest_divisor(d_out, (32, 16, 64))
  block_k = _largest_divisor(d_in, (64, 32, 16))
  split_k = next((s for s in (16, 8, 4, 2, 1, 3, 6, 12) if d_in % s == 0
                  and power_of_2(d_in // s) and d_in // s >= (block_k or 0)),
                 None)
  return block_n, block_k, 4, split_k


def check_shapes(d_in, d_out, block_n, block_k, split_k):
  """Raises ValueError unless the tiling covers a (d_in, d_out) matrix."""
  if not split_k:
    raise ValueError(f'gemv: no split_k makes d_in={d_in} / split_k a power of 2')
  if not block_n or d_out % block_n:
    raise ValueError(f'gemv: block_n={block_n} must divide d_out={d_out}')
  if not block_k or d_in % (block_k * split_k):
    raise ValueError(f'gemv: block_k * split_k = {block_k} * {split_k} must '
                     f'divide d_in={d_in}')
  for name, v in (('block_n', block_n), ('block_k', block_k),
                  ('d_in / split_k', d_in // split_k)):
    if not power_of_2(v):
      raise ValueError(f'gemv: {name}={v} must be a power of 2')


def fits(d_in, d_out):
  """Whether the default tiling covers a (d_in, d_out) matrix."""
  block_n, block_k, _, split_k = default_tiling(d_in, d_out)
  try:
    check_shapes(d_in, d_out, block_n, block_k, split_k)
  except ValueError:
    return False
  return True


def gemv(x, w, *, block_n=None, block_k=None, num_warps=None, split_k=None,
         interpret=False):
  """x @ w for x (..., d_in) holding one row and w (d_in, d_out)."""
  d_in, d_out = w.shape
  if x.shape[-1] != d_in or x.size != d_in:
    raise ValueError(f'gemv: x must be one row of {d_in}, got {x.shape}')
  tiling = default_tiling(d_in, d_out)
  block_n = block_n or tiling[0]
  block_k = block_k or tiling[1]
  num_warps = num_warps or tiling[2]
  split_k = split_k or tiling[3]
  check_shapes(d_in, d_out, block_n, block_k, split_k)
  rows = d_in // split_k
  out_dtype = jnp.result_type(x.dtype, w.dtype)

  def kernel(x_ref, w_ref, o_ref):
    def body(i, acc):
      xs = x_ref[pl.ds(i * block_k, block_k)].astype(jnp.float32)
      ws = w_ref[pl.ds(i * block_k, block_k), :].astype(jnp.float32)
      return acc + ws * xs[:, None]
    acc = jax.lax.fori_loop(0, rows // block_k, body,
                            jnp.zeros((block_k, block_n), jnp.float32))
    o_ref[...] = jnp.sum(acc, axis=0)[None, :]

  params = compiler_params(interpret, num_warps)
  partial = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((split_k, d_out), jnp.float32),
      grid=(d_out // block_n, split_k),
      in_specs=[pl.BlockSpec((rows,), lambda j, s: (s,)),
                pl.BlockSpec((rows, block_n), lambda j, s: (s, j))],
      out_specs=pl.BlockSpec((1, block_n), lambda j, s: (s, j)),
      interpret=interpret,
      **params,
  )(x.reshape(d_in), w)
  y = partial[0] if split_k == 1 else jnp.sum(partial, axis=0)
  return y.astype(out_dtype).reshape(x.shape[:-1] + (d_out,))



def default_tiling_out_in(d_out, d_in):
  """(block_n, block_k, num_warps) for a kernel stored (d_out, d_in).

  block_n 4, block_k 1024, 8 warps: in an H100 sweep of the plain product
  (block_n 4-16, block_k 256-1024, 4 or 8 warps) the best on the
  feed-forward's matrices and within 2% of the best (block_k 512) on the
  attention's; in the fused decoder layer (bench/block_fusion.py, s25) 4%
  faster per layer than block_k 512.
  """
  block_n = _largest_divisor(d_out, (4, 8, 2, 16, 1))
  block_k = _largest_divisor(d_in, (1024, 512, 256, 128, 64, 32, 16))
  return block_n, block_k, 8


def check_shapes_out_in(d_out, d_in, block_n, block_k):
  """Raises ValueError unless the tiling covers a (d_out, d_in) kernel."""
  if not block_n or d_out % block_n or not power_of_2(block_n):
    raise ValueError(f'gemv_out_in: block_n={block_n} must be a power of 2 '
                     f'dividing d_out={d_out}')
  if not block_k or d_in % block_k or not power_of_2(block_k):
    raise ValueError(f'gemv_out_in: block_k={block_k} must be a power of 2 '
                     f'dividing d_in={d_in}')


def fits_out_in(d_out, d_in, norm=False):
  """Whether the default out-in tiling covers a (d_out, d_in) kernel (and,
  with norm, the row fits the LayerNorm that reads it whole)."""
  if norm and not power_of_2(d_in):
    return False
  try:
    check_shapes_out_in(d_out, d_in, *default_tiling_out_in(d_out, d_in)[:2])
  except ValueError:
    return False
  return True


def gemv_out_in(x, w_t, *, bias=None, norm=None, relu=False, residual=None,
                block_n=None, block_k=None, num_warps=None, interpret=False):
  """x @ w_t.T for x (..., d_in) holding one row and w_t (d_out, d_in).

  With the kernel stored transposed each output is the sum along one
  contiguous row of weights: a program of the grid reads `block_n` whole
  rows, `block_k` columns at a time, and writes its `block_n` outputs; no
  partial sums are left to add up afterwards.

  The small operations around a decoder's product can run in the same
  kernel: `norm` = (scale, shift, epsilon) first layer-normalises the row
  (float32 statistics, each program reading the whole row), then
  y = relu?(x @ w_t.T + bias) + residual (`bias`, `residual`: (d_out,)).
  """
  d_out, d_in = w_t.shape
  if x.shape[-1] != d_in or x.size != d_in:
    raise ValueError(f'gemv_out_in: x must be one row of {d_in}, got {x.shape}')
  tiling = default_tiling_out_in(d_out, d_in)
  block_n = block_n or tiling[0]
  block_k = block_k or tiling[1]
  num_warps = num_warps or tiling[2]
  check_shapes_out_in(d_out, d_in, block_n, block_k)
  if norm is not None and not power_of_2(d_in):
    raise ValueError(f'gemv_out_in: a norm reads the whole row, whose width '
                     f'must then be a power of 2 (Triton), not d_in={d_in}')
  out_dtype = jnp.result_type(x.dtype, w_t.dtype)
  if residual is not None:
    out_dtype = jnp.result_type(out_dtype, residual.dtype)
  row = lambda: whole_block((d_in,))
  outs = lambda: pl.BlockSpec((block_n,), lambda j: (j,))
  operands = [x.reshape(d_in), w_t]
  in_specs = [row(), pl.BlockSpec((block_n, d_in), lambda j: (j, 0))]
  if norm is not None:
    scale, shift, epsilon = norm
    operands += [scale.reshape(d_in), shift.reshape(d_in)]
    in_specs += [row(), row()]
  for extra in (bias, residual):
    if extra is not None:
      operands.append(extra.reshape(d_out))
      in_specs.append(outs())

  def kernel(*refs):
    x_ref, w_ref, *refs, o_ref = refs
    if norm is not None:
      scale_ref, shift_ref, *refs = refs
      normed = layer_norm_in_kernel(x_ref, scale_ref, shift_ref, epsilon)

    def row_part(i):
      part = pl.ds(i * block_k, block_k)
      if norm is not None:
        return normed(part)
      return x_ref[part].astype(jnp.float32)

    def body(i, acc):
      ws = w_ref[:, pl.ds(i * block_k, block_k)].astype(jnp.float32)
      return acc + ws * row_part(i)[None, :]
    acc = jax.lax.fori_loop(0, d_in // block_k, body,
                            jnp.zeros((block_n, block_k), jnp.float32))
    y = jnp.sum(acc, axis=1)
    if bias is not None:
      bias_ref, *refs = refs
      y = y + bias_ref[...].astype(jnp.float32)
    if relu:
      y = jnp.maximum(y, 0.0)
    if residual is not None:
      y = y + refs[0][...].astype(jnp.float32)
    o_ref[...] = y.astype(o_ref.dtype)  # (no XLA convert after the kernel)

  params = compiler_params(interpret, num_warps)
  y = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((d_out,), out_dtype),
      grid=(d_out // block_n,),
      in_specs=in_specs,
      out_specs=outs(),
      interpret=interpret,
      **params,
  )(*operands)
  return y.reshape(x.shape[:-1] + (d_out,))
