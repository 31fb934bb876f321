"""One query's attention over a key/value cache (a decoding step) as a Pallas kernel.

A decoding step attends with one query per head over the cache of all the
positions so far.  XLA:GPU runs `training.model._attend`'s one-query form as
one fusion over the whole cache (16 heads x 256 positions at the 800M shape:
about 5 us per layer on an H100, for 2 MB read).  Here each program of the
grid takes one (sequence, head) row and one of `n_splits` ranges of the
cache, and walks its range `block_len` positions at a time up to the last
filled position only (an online softmax: running maximum, running sum of the
exponentials and of the weighted values).  With n_splits > 1 the partial
results are combined afterwards (by XLA, fused with what reads the output).

The result equals `_attend`'s: scores q.k / sqrt(d_head) in float32, the
positions after `pos` masked out, softmax, the weighted sum of the values.
With new=(k, v) the kernel also writes the step's key and value into the
caches (aliased in and out), so a decoding step's attention is one kernel
where XLA ran three (two cache updates and the attention fusion).

Measured on an H100 (2026-12-06, bench/results/attention_sweep_h100_s24.txt;
16 heads of 64, batch 1, chains over 32 distinct caches), microseconds per
attention, XLA's fusion against the kernel at its default tiling (and the
sweep's best): 256 positions with 30 filled, 5.13 against 3.28 (2.75);
2048 positions with 30 filled, 10.17 against 3.50 (2.70); 2048 with 1500
filled, 10.91 against 10.76 (9.46).  The 800M decoders then took, in one
call of `bench/decode_speed.py --impls=ours --alternate_models --rounds=3`
per form (ms/token; with the update in the kernel / the kernel after XLA's
updates / XLA): dense 0.936 / 0.951 / 0.944, sparse FF 0.789 / 0.798 /
0.849, sparse QKV 1.069 / 1.088 / 1.073, sparse FF+QKV 0.761 / 0.785 /
0.817 (the tiling then was 64-position blocks in 4 splits; the spread
between calls on one machine was up to 6% that day).

`one_query_attention_packed` reads q, k and v of the dense attention from
its packed [Q | K | V] projection (blocks of the one array), so XLA makes no
copies of the three slices first; with one split the kernel also divides by
the softmax's sum itself.  Those were the last two XLA kernels per layer of
the fused dense decoder (`training.model.PreNormResidual`; 1.1 us each on
an H100, s25).
"""
import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from training import gemv as gemv_lib

_MASKED = -1e30  # the running maximum before any position is seen


def default_tiling(max_len):
  """(block_len, n_splits, num_warps) for a cache of `max_len` positions.

  From an H100 sweep (bench/results/attention_sweep_h100_s24.txt, 16 heads
  of 64, batch 1): over 256 positions one split in blocks of 32 with 2 warps
  was the fastest (2.75 us, XLA's fusion 5.13 us); over 2048, blocks of 64
  in splits of 256 positions were level with or faster than XLA at both
  30 and 1500 filled positions (3.50 and 10.76 us, XLA 10.17 and 10.91),
  where fewer splits lost at 1500 (one split of 2048: 62 us).
  """
  if max_len <= 256:
    return min(32, max_len), 1, 2
  return 64, max_len // 256, 4


def fits(max_len, d_head):
  """Whether the kernel takes caches of this shape with its default tiling
  (Triton's blocks are powers of 2)."""
  return gemv_lib.power_of_2(max_len) and max_len >= 16 and gemv_lib.power_of_2(d_head)


def attend_cached(qv, k_ref, v_ref, start, n, end, block_len, scale):
  """Inside a kernel: the online softmax of one query qv (d_head,) float32
  over `n` blocks of `block_len` cache positions from `start`, those below
  `end` only; k_ref, v_ref: (1, max_len, d_head) blocks of the caches.
  Returns (running maximum, sum of exponentials, weighted sum of values)."""
  d_head = qv.shape[-1]

  first_of = lambda i: start + i * block_len

  def load(i):  # block i's keys and values
    rows = pl.ds(first_of(i), block_len)
    return (k_ref[0, rows, :].astype(jnp.float32),
            v_ref[0, rows, :].astype(jnp.float32))

  def body(i, carry):
    m, l, acc, k, v = carry
    # The next block's loads go out before this block's arithmetic (the
    # last iteration reloads its own block: in bounds, unused).
    after = load(jnp.minimum(i + 1, n - 1))
    first = first_of(i)
    s = jnp.sum(k * qv[None, :], axis=1) * scale
    valid = first + jnp.arange(block_len) < end
    s = jnp.where(valid, s, _MASKED)
    m_new = jnp.maximum(m, jnp.max(s))
    p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
    keep = jnp.exp(m - m_new)
    return (m_new, l * keep + jnp.sum(p),
            acc * keep + jnp.sum(p[:, None] * v, axis=0), *after)

  m, l, acc, _, _ = jax.lax.fori_loop(
      0, n, body, (jnp.float32(_MASKED), jnp.float32(0.0),
                   jnp.zeros((d_head,), jnp.float32), *load(0)))
  return m, l, acc


def attend_one_more(carry, qv, kn, vn, scale, counted=True):
  """Inside a kernel: `attend_cached`'s (m, l, acc) with one more position
  (key kn, value vn) included where `counted`."""
  m, l, acc = carry
  kn, vn = kn.astype(jnp.float32), vn.astype(jnp.float32)
  s = jnp.where(counted, jnp.sum(kn * qv) * scale, _MASKED)
  m_new = jnp.maximum(m, s)
  p = jnp.where(counted, jnp.exp(s - m_new), 0.0)
  keep = jnp.exp(m - m_new)
  return m_new, l * keep + p, acc * keep + p * vn


def one_query_attention(q, k_cache, v_cache, pos, *, new=None, block_len=None,
                        n_splits=None, num_warps=None, interpret=False):
  """Attention of one query per row over caches filled up to `pos`.

  Args:
    q: (..., 1, d_head), the query of position `pos`.
    k_cache, v_cache: (..., max_len, d_head), the same leading shape.
    pos: int32 scalar; positions 0 .. pos of the caches are attended.
    new: None, or (k, v) of position `pos`, each (..., 1, d_head): then the
      caches hold positions 0 .. pos - 1, the kernel attends over those and
      (k, v) and also writes (k, v) into the caches at `pos` (in place where
      XLA can), and the caches are returned too.
    block_len, n_splits, num_warps: tiling (default: `default_tiling`);
      block_len * n_splits must divide max_len.
    interpret: run in Pallas's interpreter (on a CPU, for tests).

  Returns:
    (..., 1, d_head) in the dtype of q; with `new`, (that, k_cache, v_cache).
  """
  *lead, t, d_head = q.shape
  if t != 1:
    raise ValueError(f'one_query_attention takes one query per row, got {t}')
  if k_cache.shape != v_cache.shape or tuple(k_cache.shape[:-2]) != tuple(lead):
    raise ValueError(f'caches {k_cache.shape}, {v_cache.shape} do not fit '
                     f'the queries {q.shape}')
  if new is not None and any(a.shape != q.shape for a in new):
    raise ValueError(f'new keys and values {[a.shape for a in new]} do not '
                     f'fit the queries {q.shape}')
  return _one_query(q, k_cache, v_cache, pos, new is not None, 0, q.shape,
                    block_len, n_splits, num_warps, interpret,
                    [] if new is None else list(new))


def one_query_attention_packed(qkv, k_cache, v_cache, pos, *, block_len=None,
                               n_splits=None, num_warps=None, interpret=False):
  """`one_query_attention(q, ..., new=(k, v))` with q, k and v read from
  one packed projection: qkv (batch, 1, 3 * heads * d_head), laid out
  [Q | K | V], each heads x d_head (as `training.model.CausalSelfAttention`
  projects them).  The kernel reads each row of the projection in place, so
  no copies of the three slices are made first.

  Returns (out (batch, heads, 1, d_head), k_cache, v_cache), caches
  (batch, heads, max_len, d_head).
  """
  b, h, _, d_head = k_cache.shape
  if k_cache.shape != v_cache.shape or qkv.shape != (b, 1, 3 * h * d_head):
    raise ValueError(f'packed projection {qkv.shape} and caches '
                     f'{k_cache.shape}, {v_cache.shape} do not fit: want '
                     f'({b}, 1, {3 * h * d_head}) and equal caches')
  return _one_query(qkv, k_cache, v_cache, pos, True, h, (b, h, 1, d_head),
                    block_len, n_splits, num_warps, interpret, [])


def _one_query(q, k_cache, v_cache, pos, update, packed_heads, out_shape_q,
               block_len, n_splits, num_warps, interpret, new):
  """The kernel's call; q (or the packed projection, where packed_heads is
  its number of heads) and the new (k, v) as checked by the callers."""
  *lead, max_len, d_head = k_cache.shape
  rows = 1
  for n in lead:
    rows *= n
  tiling = default_tiling(max_len)
  block_len = block_len or tiling[0]
  n_splits = n_splits or tiling[1]
  num_warps = num_warps or tiling[2]
  if max_len % (block_len * n_splits):
    raise ValueError(f'one_query_attention: block_len {block_len} x n_splits '
                     f'{n_splits} must divide max_len {max_len}')
  span = max_len // n_splits  # positions per split
  scale = d_head ** -0.5

  def kernel(pos_ref, q_ref, *refs):
    if update:
      kn_ref, vn_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, ko_ref, vo_ref = refs
    else:
      k_ref, v_ref, m_ref, l_ref, acc_ref = refs
    split = pl.program_id(1)
    last = pos_ref[0]  # the last position attended
    end = last if update else last + 1  # cache positions read: < end
    start = split * span
    n = jnp.clip((end - 1 - start) // block_len + 1, 0, span // block_len)
    qv = q_ref[0, 0, 0, :].astype(jnp.float32)
    m, l, acc = attend_cached(qv, k_ref, v_ref, start, n, end, block_len,
                              scale)
    if update:  # position `last` from (k, v) itself, counted by split 0
      mine = split == 0
      m, l, acc = attend_one_more(
          (m, l, acc), qv, kn_ref[0, 0, 0, :], vn_ref[0, 0, 0, :], scale, mine)

      @pl.when(mine)
      def _():
        ko_ref[0, pl.ds(last, 1), :] = kn_ref[0, 0].astype(ko_ref.dtype)
        vo_ref[0, pl.ds(last, 1), :] = vn_ref[0, 0].astype(vo_ref.dtype)

    m_ref[...] = jnp.broadcast_to(m, (1, 1))
    l_ref[...] = jnp.broadcast_to(l, (1, 1))
    if n_splits == 1:  # the whole softmax here: the output itself
      acc = acc / l
    acc_ref[...] = acc.reshape(1, 1, d_head).astype(acc_ref.dtype)

  params = gemv_lib.compiler_params(interpret, num_warps)
  row = pl.BlockSpec((1, 1, 1, d_head), lambda r, s: (r, 0, 0, 0))
  cache = pl.BlockSpec((1, max_len, d_head), lambda r, s: (r, 0, 0))
  caches = (k_cache.reshape(rows, max_len, d_head),
            v_cache.reshape(rows, max_len, d_head))
  out_shape = [jax.ShapeDtypeStruct((rows, n_splits), jnp.float32),
               jax.ShapeDtypeStruct((rows, n_splits), jnp.float32),
               # One split writes the output itself, in q's dtype (no XLA
               # convert after the kernel); several, float32 partial sums.
               jax.ShapeDtypeStruct((rows, n_splits, d_head),
                                    q.dtype if n_splits == 1 else jnp.float32)]
  out_specs = [pl.BlockSpec((1, 1), lambda r, s: (r, s)),
               pl.BlockSpec((1, 1), lambda r, s: (r, s)),
               pl.BlockSpec((1, 1, d_head), lambda r, s: (r, s, 0))]
  args = [jnp.reshape(pos, (1,)).astype(jnp.int32)]
  in_specs = [gemv_lib.whole_block((1,))]
  if packed_heads:  # q, k and v: blocks of one (b, 1, 3, h, d_head) array
    qkv = q.reshape(rows // packed_heads, 3, packed_heads, d_head)
    for j in range(3 if update else 1):
      args.append(qkv)
      in_specs.append(pl.BlockSpec(
          (1, 1, 1, d_head),
          lambda r, s, j=j: (r // packed_heads, j, r % packed_heads, 0)))
  else:
    for a in [q] + new:
      args.append(a.reshape(rows, 1, 1, d_head))
      in_specs.append(row)
  aliases = {}
  if update:
    aliases = {len(args): 3, len(args) + 1: 4}  # the caches, updated in place
    out_shape += [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches]
    out_specs += [cache, cache]
  outs = pl.pallas_call(
      kernel,
      out_shape=tuple(out_shape),
      grid=(rows, n_splits),
      in_specs=in_specs + [cache, cache],
      out_specs=tuple(out_specs),
      input_output_aliases=aliases,
      interpret=interpret,
      **params,
  )(*args, *caches)
  m, l, acc = outs[:3]
  if n_splits == 1:
    out = acc[:, 0]
  else:  # combine the splits' partial softmaxes
    w = jnp.exp(m - jnp.max(m, axis=1, keepdims=True))  # (rows, splits)
    out = jnp.sum(w[..., None] * acc, axis=1) / jnp.sum(w * l, axis=1,
                                                        keepdims=True)
  out = out.astype(q.dtype).reshape(out_shape_q)
  if not update:
    return out
  return (out, outs[3].reshape(k_cache.shape), outs[4].reshape(v_cache.shape))
