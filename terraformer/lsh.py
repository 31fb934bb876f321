"""LSH self-attention (Reformer, as the Terraformer uses it), as a Trax layer.

Reformer (Kitaev et al., 2020) and its Terraformer descendant attend within
hash buckets instead of over the whole sequence.  For one example and head,
with x (L, d_model):

    q = x W_q (+ b_q)      keys share the queries: k_j = q_j / rms(q_j) / sqrt(d_qk)
    v = x W_v (+ b_v)
    for each hash round r = 1..n_hashes (a random rotation R_r, d_qk x n_b/2):
        bucket_r(j) = argmax([q_j R_r, -q_j R_r])           (n_b buckets)
        sort positions by (bucket, position); cut the sorted list into chunks
        of chunk_len; each chunk attends to itself, n_chunks_before chunks
        before it and n_chunks_after after it (cyclically), with logits
        s_ij = q_i . k_j  minus 1e9 if j is blocked (j > i when causal, or j
        a padding position when masked) and minus 1e5 if j == i (a token
        attends to itself only when nothing else is allowed);
        o_r(i) = softmax_j(s_ij) v_j,  lse_r(i) = logsumexp_j(s_ij)
    o(i) = sum_r softmax_r(lse_r(i)) o_r(i)        (rounds combined by logsumexp)
    y = sum_heads o W_o

All rounds share one sorted list (round r's buckets are offset by r * n_b),
so a chunk may straddle two rounds; the sequence needs n_hashes * L to be a
multiple of chunk_len.  Attention cost is O(n_hashes * L * chunk_len * (1 +
n_chunks_before + n_chunks_after)), linear in L.  n_buckets=None picks
2 * max(1, L // chunk_len) buckets, split into two factors (hierarchical
hashing, [2^ceil(log2 sqrt n), rest]) above 128.  Masked inputs (x, mask)
hash padding into one extra bucket.

The layer takes the constructor arguments and defaults of trax's
`tl.LSHSelfAttention` and holds the same weight tree, per head stacked:
w_q (H, d_model, d_qk), w_v (H, d_model, d_v), w_o (H, d_v, d_model) (plus
b_q (H, d_qk), b_v (H, d_v) with bias=True), initialised as trax does, so a
trax layer's (or checkpoint's) weights load unchanged.  The state tree is
trax's too, one row per (example, head), row b * n_heads + h:
    train/eval: (buckets (B*H, n_hashes * L) int32, hash keys (B*H, 2) uint32)
      (L = max_length_for_buckets when set: the buckets are zero-padded);
    predict: (mem_end () int32, (memory (B, predict_mem_len, d_model),),
      (buckets (B*H, n_hashes * predict_mem_len), buckets_idx (B*H,),
       hash keys (B*H, 2))).
The state is built for one batch size; a call with another raises.
tests/test_lsh.py checks outputs, state and gradients against trax.

Randomness, and replaying it (reversible layers).  The hash rotations come
from a key per (example, head) kept in the layer's state, not from the call
rng: in train and eval mode each call splits that key, hashes with one half
and stores the other (and the buckets it used) in the new state.  The call
rng (`pure_fn`'s rng) drives only dropout (attention and output dropout, one
mask shared by all examples and heads).  So the output, buckets included, is
a deterministic function of (inputs, weights, state, rng): a reversible
backward pass that recomputes the layer with the same weights, state and rng
as its forward pass replays exactly the same buckets and dropout masks.  A
training loop that carries the state from step to step (training/trainer.py
does) draws fresh hashes every step; one that does not reuses the same ones.

Predict mode (decoding, requires causal=True) follows trax: the state keeps
the last predict_mem_len inputs (dropping the oldest predict_drop_len when
full) and their buckets.  A long first call (or any call at the start) runs
the chunked attention above over the given tokens, padded to a multiple of
chunk_len.  A one-token call hashes the new query and attends, in a single
softmax, to the K = n_hashes * chunk_len * (1 + n_chunks_before) remembered
positions ranked first by [shares a bucket with the query in some round],
then by recency (future slots are masked).  That is the same function as the
whole-sequence pass when the whole sequence fits in one chunk (both are then
full shared-QK attention); otherwise decoding is an approximation of it, in
trax as here.  With n_buckets=None trax hashes a decoded token into
2 * max(1, 2 // chunk_len) buckets, which is kept for parity; set n_buckets
explicitly for decoding.

Where we differ from trax on purpose: a padding key at position 0 or 1 is
masked (trax applies its mask sign before making positions 1-based, so those
two stay visible); bias=True works (trax's forward cannot unpack the five
weights); n_parallel_heads only trades memory for speed (slices of
(example, head) pairs are computed n_parallel_heads at a time, each
rematerialised in the backward pass), the result does not depend on it.
"""

import math

import jax
from jax import numpy as jnp
from trax import fastmath
from trax.layers import base

MODES = ('train', 'eval', 'predict')
BLOCKED = 1e9     # subtracted from logits of causal-future and padding keys
SELF = 1e5        # subtracted from a token's logit for itself


# ------------------------------------------------------------------ helpers


def _check_int(name, value, low):
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f'{name} must be an integer >= {low}, not {value!r}.')


def _check_n_buckets(n_buckets):
  factors = [n_buckets] if isinstance(n_buckets, int) else n_buckets
  ok = (n_buckets is None or
        (isinstance(factors, (list, tuple)) and factors and
         all(isinstance(f, int) and not isinstance(f, bool) and f >= 2 and
             f % 2 == 0 for f in factors)))
  if not ok:
    raise ValueError(
        'n_buckets must be None, an even integer >= 2, or a list of even '
        f'integers >= 2 (hierarchical hashing), not {n_buckets!r}.')


def resolve_n_buckets(n_buckets, length, chunk_len):
  """n_buckets as given, or the default for `length`: an int or two factors."""
  if n_buckets is not None:
    return n_buckets
  total = 2 * max(1, length // chunk_len)
  if total <= 128:
    return total
  first = 2 ** math.ceil(math.log2(math.sqrt(total)))
  return [first, 2 * (total // (2 * first))]


def length_normalize(x, epsilon=1e-6):
  """x / rms(x) over the last axis."""
  return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + epsilon)


def hash_buckets(vecs, n_buckets, n_hashes, key, valid=None):
  """Random-rotation hashes of `vecs`, with each round's buckets offset.

  Args:
    vecs: (L, d) vectors.
    n_buckets: an even int, or a list of even ints whose product is the
      number of buckets (each factor hashes with its own slice of rotations).
    n_hashes: number of hash rounds.
    key: PRNG key of the rotations, normal (d, n_hashes, sum(factors) / 2).
    valid: optional (L,) bool; invalid positions go to one extra bucket.

  Returns:
    (n_hashes, L) int32: bucket of position j in round r, plus r * total
    buckets, so rounds never share a bucket.
  """
  factors = [n_buckets] if isinstance(n_buckets, int) else list(n_buckets)
  rotations = jax.random.normal(
      key, (vecs.shape[-1], n_hashes, sum(factors) // 2), jnp.float32)
  rotated = jnp.einsum('ld,dhr->hlr', vecs.astype(jnp.float32), rotations)
  buckets, total, start = 0, 1, 0
  for f in factors:
    part = rotated[..., start:start + f // 2]
    start += f // 2
    buckets = buckets + total * jnp.argmax(
        jnp.concatenate([part, -part], axis=-1), axis=-1).astype(jnp.int32)
    total *= f
  if valid is not None:
    buckets = jnp.where(valid[None, :], buckets, total)
    total += 1
  offsets = total * jnp.arange(n_hashes, dtype=jnp.int32)[:, None]
  return buckets + offsets


def _with_neighbours(chunks, before, after):
  """(n_chunks, c, ...) -> (n_chunks, (1 + before + after) * c, ...), cyclic."""
  if before == 0 and after == 0:
    return chunks
  parts = [jnp.roll(chunks, -i, axis=0) for i in range(-before, after + 1)]
  return jnp.concatenate(parts, axis=1)


def chunked_attention(q, v, buckets, valid, keep, *, chunk_len, n_chunks_before,
                      n_chunks_after, causal):
  """Bucketed, chunked shared-QK attention of one example and head.

  Args:
    q: (L, d_qk) queries (keys are derived from them).
    v: (L, d_v) values.
    buckets: (n_hashes, L) int32 from `hash_buckets`.
    valid: None, or (L,) bool: False marks padding keys.
    keep: None, or (chunk_len, n_keys) dropout multipliers for the attention
      probabilities, the same for every chunk.
    chunk_len, n_chunks_before, n_chunks_after, causal: see the module.

  Returns:
    (L, d_v) in the dtype of v: the rounds' outputs combined by logsumexp.
  """
  n_hashes, length = buckets.shape
  d_qk, d_v = q.shape[-1], v.shape[-1]
  pos = jnp.tile(jnp.arange(length, dtype=jnp.int32), n_hashes)
  ticker = jnp.arange(n_hashes * length, dtype=jnp.int32)
  # Sort by (bucket, position); `order` lists the original indices.
  _, spos, order = jax.lax.sort((buckets.reshape(-1), pos, ticker), num_keys=2)
  undo = jnp.zeros_like(order).at[order].set(ticker)

  def chunks(a):
    return a.reshape((-1, chunk_len) + a.shape[1:])

  def around(a):
    return _with_neighbours(chunks(a), n_chunks_before, n_chunks_after)

  sq = q[spos]
  sk = length_normalize(sq.astype(jnp.float32)) / math.sqrt(d_qk)
  cq, qpos = chunks(sq), chunks(spos)[:, :, None]
  ck, cv, kpos = around(sk.astype(q.dtype)), around(v[spos]), around(spos)
  kpos = kpos[:, None, :]
  dots = jnp.einsum('cid,cjd->cij', cq, ck, preferred_element_type=jnp.float32)
  blocked = (kpos > qpos) if causal else jnp.zeros(dots.shape, bool)
  if valid is not None:
    blocked = blocked | ~around(valid[spos])[:, None, :]
  dots = dots - BLOCKED * blocked - SELF * ((kpos == qpos) & ~blocked)
  lse = jax.nn.logsumexp(dots, axis=-1, keepdims=True)
  probs = jnp.exp(dots - lse)
  if keep is not None:
    probs = probs * keep
  out = jnp.einsum('cij,cjd->cid', probs.astype(v.dtype), cv)
  out = out.reshape(-1, d_v)[undo].reshape(n_hashes, length, d_v)
  lse = lse.reshape(-1)[undo].reshape(n_hashes, length, 1)
  if n_hashes == 1:
    return out[0]
  weights = jnp.exp(lse - jax.nn.logsumexp(lse, axis=0, keepdims=True))
  return jnp.sum(out * weights.astype(out.dtype), axis=0)


def _dropout_keep(key, rate, shape):
  """Multipliers keep / (1 - rate), or None when rate is 0."""
  if rate == 0.0:
    return None
  keep = jax.random.bernoulli(key, 1.0 - rate, shape)
  return keep.astype(jnp.float32) / (1.0 - rate)


# -------------------------------------------------------------------- layer


class LSHSelfAttention(base.Layer):
  """LSH self-attention with shared QK (trax's `tl.LSHSelfAttention`).

  x (batch, length, d_model) [, mask (batch, length) bool when masked]
    -> (batch, length, d_model).  See the module docstring for the
  computation, the weight and state trees and the randomness.

  Args (trax's, same defaults):
    n_heads, d_qk, d_v: heads and their query/key and value widths.
    share_qk: ignored (QK are always shared), kept for trax's signature.
    causal: position i attends only to positions <= i.
    masked: take (x, mask) and never attend to positions where mask is False.
    chunk_len, n_chunks_before, n_chunks_after: chunking of the sorted list.
    n_hashes: hash rounds.  n_buckets: see `hash_buckets`; None: by length.
    mode: 'train', 'eval' or 'predict' (decoding, needs causal=True).
    predict_mem_len, predict_drop_len: decoding memory, and how many of its
      oldest positions to drop when it is full (0/None: trax's fallbacks
      chunk_len * (1 + n_chunks_before) and chunk_len).
    attention_dropout, output_dropout: rates, used in 'train' mode only.
    max_length_for_buckets: pad the buckets kept in state to this length, so
      the state shape does not change with the input length.
    bias: add b_q, b_v to the projections.
    n_parallel_heads: (example, head) slices computed at once (None: all).
    use_python_loop, use_reference_code: ignored, kept for trax's signature.
  """

  def __init__(self, n_heads=2, d_qk=64, d_v=64, share_qk='unused',
               causal=False, masked=False, chunk_len=128, n_chunks_before=1,
               n_chunks_after=0, n_hashes=1, n_buckets=None, mode='train',
               predict_mem_len=2048, predict_drop_len=256,
               attention_dropout=0.0, output_dropout=0.0,
               max_length_for_buckets=None, bias=False, n_parallel_heads=1,
               use_python_loop=False, use_reference_code=False):
    super().__init__(n_in=2 if masked else 1, n_out=1)
    del share_qk, use_python_loop, use_reference_code
    if mode not in MODES:
      raise ValueError(f'mode must be one of {MODES}, not {mode!r}.')
    for name, value, low in (('n_heads', n_heads, 1), ('d_qk', d_qk, 1),
                             ('d_v', d_v, 1), ('chunk_len', chunk_len, 1),
                             ('n_chunks_before', n_chunks_before, 0),
                             ('n_chunks_after', n_chunks_after, 0),
                             ('n_hashes', n_hashes, 1)):
      _check_int(name, value, low)
    _check_n_buckets(n_buckets)
    for name, rate in (('attention_dropout', attention_dropout),
                       ('output_dropout', output_dropout)):
      if not 0.0 <= rate < 1.0:
        raise ValueError(f'{name} must be in [0, 1), not {rate!r}.')
    if max_length_for_buckets is not None:
      _check_int('max_length_for_buckets', max_length_for_buckets, 1)
    if n_parallel_heads:
      _check_int('n_parallel_heads', n_parallel_heads, 1)
      if n_parallel_heads % n_heads and n_heads % n_parallel_heads:
        raise ValueError(
            f'n_parallel_heads ({n_parallel_heads}) must be a multiple or a '
            f'divisor of n_heads ({n_heads}), or None.')
    if mode == 'predict':
      if not causal:
        raise ValueError('mode=\'predict\' needs causal=True (decoding is '
                         'causal); got causal=False.')
      if masked:
        raise ValueError('mode=\'predict\' does not take a mask; got '
                         'masked=True.')
      if n_chunks_after:
        raise ValueError('mode=\'predict\' needs n_chunks_after=0, not '
                         f'{n_chunks_after}.')
      predict_mem_len = predict_mem_len or chunk_len * (1 + n_chunks_before)
      predict_drop_len = predict_drop_len or chunk_len
      if not 0 < predict_drop_len <= predict_mem_len:
        raise ValueError(
            f'predict_drop_len ({predict_drop_len}) must be in '
            f'[1, predict_mem_len ({predict_mem_len})].')
    self._n_heads, self._d_qk, self._d_v = n_heads, d_qk, d_v
    self._causal, self._masked = causal, masked
    self._chunk_len = chunk_len
    self._n_before, self._n_after = n_chunks_before, n_chunks_after
    self._n_hashes, self._n_buckets = n_hashes, n_buckets
    self._mode = mode
    self._mem_len, self._drop_len = predict_mem_len, predict_drop_len
    train = mode == 'train'
    self._attention_dropout = attention_dropout if train else 0.0
    self._output_dropout = output_dropout if train else 0.0
    self._max_length_for_buckets = max_length_for_buckets
    self._bias = bias
    self._n_parallel_heads = n_parallel_heads or None

  # ---------------------------------------------------------------- init

  def _uniform(self, key, d_model, d_other):
    # Glorot-uniform over the heads' total width, as trax (and t2t) do.
    lim = math.sqrt(6.0 / (d_model + d_other * self._n_heads))
    return jax.random.uniform(key, (d_model, d_other), jnp.float32, -lim, lim)

  def init_weights_and_state(self, input_signature):
    x_sig = input_signature[0] if self._masked else input_signature
    batch, length, d_model = x_sig.shape
    h = self._n_heads
    per_head = []
    for key in jax.random.split(self.rng, h):
      key_q, _, key_v, key_o = jax.random.split(key, 4)
      w = [self._uniform(key_q, d_model, self._d_qk),
           self._uniform(key_v, d_model, self._d_v),
           self._uniform(key_o, d_model, self._d_v).T]
      if self._bias:
        w += [jnp.zeros(self._d_qk), jnp.zeros(self._d_v)]
      per_head.append(w)
    self.weights = tuple(jnp.stack(ws) for ws in zip(*per_head))
    # One hashing key per (example, head), row b * n_heads + h.
    keys = jax.random.split(self.rng, batch * h)
    if self._mode == 'predict':
      buckets = jnp.zeros((batch * h, self._n_hashes * self._mem_len),
                          jnp.int32)
      inner = (buckets, jnp.zeros((batch * h,), jnp.int32), keys)
      mem = jnp.zeros((batch, self._mem_len, d_model), x_sig.dtype)
      self.state = (jnp.zeros((), jnp.int32), (mem,), inner)
    else:
      n = self._max_length_for_buckets or length
      self.state = (jnp.zeros((batch * h, self._n_hashes * n), jnp.int32),
                    keys)

  # ------------------------------------------------------------- forward

  def _project(self, x):
    """(b, l, d_model) -> q (b, h, l, d_qk), v (b, h, l, d_v)."""
    w_q, w_v = self.weights[0], self.weights[1]
    q = jnp.einsum('bld,hdk->bhlk', x, w_q.astype(x.dtype))
    v = jnp.einsum('bld,hdk->bhlk', x, w_v.astype(x.dtype))
    if self._bias:
      q = q + self.weights[3][None, :, None, :].astype(x.dtype)
      v = v + self.weights[4][None, :, None, :].astype(x.dtype)
    return q, v

  def _merge(self, o, dtype):
    """o (b, h, l, d_v) -> (b, l, d_model): sum over heads of o W_o."""
    return jnp.einsum('bhlv,hvd->bld', o, self.weights[2].astype(dtype))

  def _check_call(self, x, rows):
    batch, length, _ = x.shape
    if batch * self._n_heads != rows:
      raise ValueError(
          f'LSHSelfAttention state holds {rows} (example, head) rows but the '
          f'input has batch {batch} x n_heads {self._n_heads}; initialise '
          'the layer with the batch size it runs on.')
    return batch, length

  def forward(self, inputs):
    if self._mode == 'predict':
      return self._forward_predict(inputs)
    x, mask = inputs if self._masked else (inputs, None)
    bucket_state, keys = self.state
    batch, length = self._check_call(x, keys.shape[0])
    if (self._n_hashes * length) % self._chunk_len:
      raise ValueError(
          f'n_hashes * length ({self._n_hashes} * {length}) must be a '
          f'multiple of chunk_len ({self._chunk_len}); pad the sequence or '
          'change chunk_len.')
    max_len = self._max_length_for_buckets
    if max_len is not None and length > max_len:
      raise ValueError(f'length ({length}) exceeds max_length_for_buckets '
                       f'({max_len}).')
    h, rows = self._n_heads, keys.shape[0]
    q, v = self._project(x)
    q = q.reshape((rows, length, self._d_qk))
    v = v.reshape((rows, length, self._d_v))
    valid = None
    if mask is not None:
      valid = jnp.repeat(mask.astype(bool), h, axis=0)

    # Hash with half of each row's key; keep the other half for next time.
    split = jax.vmap(jax.random.split)(keys)
    new_keys, hash_keys = split[:, 0], split[:, 1]
    n_buckets = resolve_n_buckets(self._n_buckets, length, self._chunk_len)
    hash_fn = lambda q, k, m: hash_buckets(q, n_buckets, self._n_hashes, k, m)
    buckets = jax.vmap(hash_fn)(q, hash_keys, valid)

    attend_key, output_key = jax.random.split(self.rng)
    n_keys = (1 + self._n_before + self._n_after) * self._chunk_len
    keep = _dropout_keep(attend_key, self._attention_dropout,
                         (self._chunk_len, n_keys))

    def attend(q, v, buckets, valid):
      return chunked_attention(
          q, v, buckets, valid, keep, chunk_len=self._chunk_len,
          n_chunks_before=self._n_before, n_chunks_after=self._n_after,
          causal=self._causal)
    o = self._map_slices(attend, rows, q, v, buckets, valid)
    y = self._merge(o.reshape((batch, h, length, self._d_v)), x.dtype)
    keep_out = _dropout_keep(output_key, self._output_dropout, (y.shape[-1],))
    if keep_out is not None:
      y = y * keep_out.astype(y.dtype)

    stored = buckets.reshape((rows, -1))
    pad = bucket_state.shape[-1] - stored.shape[-1] if max_len else 0
    if pad > 0:
      stored = jnp.pad(stored, ((0, 0), (0, pad)))
    self.state = (stored, new_keys)
    return y

  def _map_slices(self, fn, rows, *args):
    """vmap of fn over the rows of args, n_parallel_heads rows at a time."""
    group = self._n_parallel_heads
    if group is None or group >= rows:
      return jax.vmap(fn)(*args)
    if rows % group:
      raise ValueError(
          f'batch x n_heads ({rows}) must be a multiple of n_parallel_heads '
          f'({group}).')
    grouped = jax.tree_util.tree_map(
        lambda a: a.reshape((rows // group, group) + a.shape[1:]), args)
    out = jax.lax.map(jax.checkpoint(lambda a: jax.vmap(fn)(*a)), grouped)
    return out.reshape((rows,) + out.shape[2:])

  # ------------------------------------------------------------- predict

  def _forward_predict(self, x):
    mem_end, (mem,), (buckets, buckets_idx, keys) = self.state
    batch, t = self._check_call(x, keys.shape[0])
    m, drop = self._mem_len, self._drop_len
    if t <= drop and t < m:
      # Append to the memory, dropping its oldest `drop` positions if full.
      full = mem_end + t > m
      mem = jax.lax.cond(
          full, lambda a: jnp.concatenate(
              [a[:, drop:], jnp.zeros_like(a[:, :drop])], axis=1),
          lambda a: a, mem)
      mem_end = jnp.where(full, mem_end - drop, mem_end)
      mem = jax.lax.dynamic_update_slice_in_dim(mem, x.astype(mem.dtype),
                                                mem_end, axis=1)
      seq, q_start, new_mem, new_end = mem, mem_end, mem, mem_end + t
    else:
      # A long first call: the memory becomes its last m inputs.  It only
      # works at the start of a sequence; elsewhere the output is NaN.
      seq = jnp.where(mem_end == 0, x, jnp.nan)
      new_mem = (x[:, -m:] if t >= m else
                 jnp.pad(x, ((0, 0), (0, m - t), (0, 0)))).astype(mem.dtype)
      q_start, new_end = jnp.zeros((), jnp.int32), jnp.int32(min(t, m))
    h, rows = self._n_heads, keys.shape[0]
    seq = seq.astype(x.dtype)
    w = [jnp.broadcast_to(a, (batch,) + a.shape).reshape((rows,) + a.shape[1:])
         for a in self.weights]
    seq_rows = jnp.repeat(seq, h, axis=0)
    buckets = buckets.reshape((rows, self._n_hashes, m))
    step = self._decode_one if t == 1 else self._decode_many
    o, buckets, buckets_idx = jax.vmap(
        lambda *a: step(*a, q_start=q_start, t=t))(
            seq_rows, buckets, buckets_idx, keys, *w)
    y = self._merge(o.reshape((batch, h, t, self._d_v)), x.dtype)
    self.state = (new_end, (new_mem,),
                  (buckets.reshape((rows, -1)), buckets_idx, keys))
    return y

  def _qv(self, x, w):
    q, v = x @ w[0], x @ w[1]
    if self._bias:
      q, v = q + w[3], v + w[4]
    return q, v

  def _decode_many(self, seq, buckets, buckets_idx, key, *w, q_start, t):
    """Several tokens at the start: chunked attention over seq (padded)."""
    length = seq.shape[0]
    padded = -(-length // self._chunk_len) * self._chunk_len
    seq = jnp.pad(seq, ((0, padded - length), (0, 0)))
    q, v = self._qv(seq, w)
    n_buckets = resolve_n_buckets(self._n_buckets, padded, self._chunk_len)
    new = hash_buckets(q, n_buckets, self._n_hashes, key)
    o = chunked_attention(q, v, new, None, None, chunk_len=self._chunk_len,
                          n_chunks_before=self._n_before, n_chunks_after=0,
                          causal=True)[:t]
    new = new[:, :t][:, -self._mem_len:]
    buckets = jax.lax.dynamic_update_slice_in_dim(buckets, new, q_start, axis=1)
    return o, buckets, buckets_idx + t

  def _decode_one(self, seq, buckets, buckets_idx, key, *w, q_start, t):
    """One token at q_start of the memory seq (m, d_model)."""
    del t
    m = seq.shape[0]
    # If the memory dropped positions since the last call, drop their buckets.
    shifted = jax.lax.dynamic_slice_in_dim(
        jnp.pad(buckets, ((0, 0), (0, self._drop_len))),
        buckets_idx - q_start, m, axis=1)
    buckets = jnp.where(buckets_idx > q_start, shifted, buckets)
    q, _ = self._qv(jax.lax.dynamic_slice_in_dim(seq, q_start, 1), w)
    n_buckets = resolve_n_buckets(self._n_buckets, 2, self._chunk_len)
    q_buckets = hash_buckets(q, n_buckets, self._n_hashes, key)  # (r, 1)
    buckets = jax.lax.dynamic_update_slice_in_dim(buckets, q_buckets, q_start,
                                                  axis=1)
    # Rank positions: sharing a bucket first, then by recency; future last.
    pos = jnp.arange(m, dtype=jnp.int32)
    shares = jnp.any(buckets == q_buckets, axis=0)
    rank = jnp.where(pos > q_start + 1, -(m + pos), pos) + m * shares
    n_keys = min(m, self._n_hashes * self._chunk_len * (1 + self._n_before))
    chosen = jnp.argsort(rank)[-n_keys:]
    k, v = self._qv(seq[chosen], w)
    k = length_normalize(k.astype(jnp.float32)) / math.sqrt(self._d_qk)
    dots = jnp.einsum('qd,kd->qk', q, k.astype(q.dtype),
                      preferred_element_type=jnp.float32)
    dots = dots - BLOCKED * (chosen > q_start) - SELF * (chosen == q_start)
    probs = jax.nn.softmax(dots, axis=-1)
    return probs.astype(v.dtype) @ v, buckets, q_start + 1
