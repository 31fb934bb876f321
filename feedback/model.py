"""The Feedback Transformer language model (Fan et al. 2020, arXiv 2002.09402).

One memory vector per position, shared by every layer of every later position:

    x_t^0     = Embed(token_t)
    for l = 1..L:
      z_t^l   = Attn_l(LN1_l(x_t^{l-1}); keys/values from m_{t-S}, ..., m_{t-1})
      x_t^l   = y + W2 relu(W1 LN2_l(y) + b1) + b2,   y = x_t^{l-1} + z_t^l
    m_t       = sum_{l=0..L} softmax(w)_l x_t^l         (w: L+1 scalars, init 0)
    k_t, v_t  = LN1(m_t) Wk, LN1(m_t) Wv    (by definition; never stored, see below)
    logits_t  = LN_out(x_t^L) W_out + b_out

The attention at position t never sees m_t: every layer at t reads only the
S = `span` previous memories (zero vectors before the sequence starts, as in the
official code), and scores are q.k_j + q.p_{offset(j)} with a learned relative
position key `key_pe` (head_dim, span) shared by all layers and heads, divided
by sqrt(head_dim).  With `shared_kv` one LN1/Wk/Wv serves every layer (one
key/value pair per memory: the paper's memory saving); without it each layer
has its own LN1/Wk/Wv applied to the same memory (the published enwik8 run).
LN1_l is also the layer's query norm, as in the official pre-norm code.

Keys and values are never stored: every layer's keys and values are affine
in the memory's normalized form n_j (LN1 without scale and bias), so one
buffer of the last `span` normalized memories serves all layers, and each
layer folds its LN1 affine part and Wk/Wv into the query side (`_attend`;
mathematically the same scores and outputs).  This keeps one vector per
memory whether or not K/V are shared.

Training is sequential over positions and runs inside the jitted step: an
outer `lax.scan` over blocks of `block_len` positions (each block
rematerialised in the backward pass) and an inner `lax.scan` over the
positions of a block, carrying that fixed-size FIFO buffer.  With
`truncate_gradients` the memories older than the current block are
`stop_gradient`-ed, as the official trainer detaches its cache between blocks
(the projections still get gradients from old memories; the old memories do
not).  In 'predict' mode the state is the same buffer and the position, so
each new token costs the same whatever came before.

Initialisation follows the official code: embeddings and `key_pe` N(0, 1),
linear layers U(-1/sqrt(fan_in), 1/sqrt(fan_in)), the attention output and
second feed-forward projection divided by sqrt(2 L), no biases in Q/K/V/O.
"""

import math
from typing import NamedTuple

import gin
import jax
from jax import numpy as jnp
from trax.layers import base

MODES = ('train', 'eval', 'predict')
EPSILON = 1e-6


class Config(NamedTuple):
  """Static settings of the functional core (see FeedbackLM for meanings)."""
  n_layers: int
  n_heads: int
  head_dim: int
  span: int
  shared_kv: bool
  dropout: float = 0.0


def _normalize(x):
  """Zero mean, unit variance over the last axis, in float32."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + EPSILON)


def _layer_norm(x, scale, bias):
  return (_normalize(x) * scale.astype(jnp.float32)
          + bias.astype(jnp.float32)).astype(x.dtype)


def _dropout(x, rate, rng):
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def normalized_memory(m):
  """LN1 without its affine part, in m's dtype: the form memories are kept in.

  Every layer's keys and values are affine in it (see `_attend`), so one
  (batch, span, d) buffer serves all layers, shared K/V or not; the zero
  memory of slots before the sequence start normalizes to zero.
  """
  return _normalize(m).astype(m.dtype)


def _push(buf, new):
  """FIFO over axis 1: drops the oldest memory and appends `new` at the end."""
  rest = jax.lax.slice_in_dim(buf, 1, buf.shape[1], axis=1)
  return jnp.concatenate([rest, new[:, None].astype(buf.dtype)], axis=1)


def _attend(q, n_buf, pe, kv, g, cfg, rng):
  """One layer's attention from queries q (b, H, dh) to the buffered memories.

  With n_j the normalized memory and LN1 = (scale s, bias c), the keys are
  k_j = (n_j * s + c) Wk, so q.k_j = n_j.(s * Wk q) + c.Wk q: the second term
  is the same for every slot and cancels in the softmax.  Likewise
  sum_j p_j v_j = ((sum_j p_j n_j) * s + (sum_j p_j) c) Wv (the weights sum
  to 1 except under dropout).  The buffer is read twice per layer, as keys
  and values would be, but no per-layer key/value buffers are kept.
  """
  dtype = q.dtype
  h, dh = cfg.n_heads, cfg.head_dim
  scale, bias, wk, wv = (a[g].astype(dtype) for a in kv)
  d = scale.shape[0]
  a = jnp.einsum('bhe,dhe->bhd', q, wk.reshape(d, h, dh)) * scale
  scores = (jnp.einsum('bhd,bsd->bhs', a, n_buf)
            + jnp.einsum('bhe,es->bhs', q, pe))
  probs = jax.nn.softmax(scores.astype(jnp.float32) / math.sqrt(dh), axis=-1)
  probs = _dropout(probs, cfg.dropout, rng)
  total = jnp.sum(probs, axis=-1, keepdims=True).astype(dtype)
  probs = probs.astype(dtype)
  mixed = jnp.einsum('bhs,bsd->bhd', probs, n_buf) * scale + total * bias
  att = jnp.einsum('bhd,dhe->bhe', mixed, wv.reshape(d, h, dh))
  return att.reshape(q.shape[0], h * dh)


def step(weights, cfg, x0, n_buf, rng=None, offsets=None):
  """All layers at one position, attending to the `span` previous memories.

  Args:
    weights: the model's weight tree (see FeedbackTransformer).
    cfg: Config.
    x0: (batch, d) embedding of the current token.
    n_buf: (batch, span, d) normalized memories m_{t-span..t-1}, oldest first.
    rng: dropout key, or None for no dropout.
    offsets: optional (L+1, batch, d) added to each x_t^l as it is computed
      (a probe for tests).

  Returns:
    top: (batch, d) x_t^L;  m: (batch, d) the memory m_t;
    hidden: (L+1, batch, d) x_t^0..x_t^L.
  """
  _, key_pe, mem_logits, kv, layers, _ = weights
  dtype = x0.dtype
  n_buf = n_buf.astype(dtype)
  b = x0.shape[0]
  h, dh = cfg.n_heads, cfg.head_dim
  rngs = [None] * (2 * cfg.n_layers) if rng is None else list(
      jax.random.split(rng, 2 * cfg.n_layers))
  x = x0 if offsets is None else x0 + offsets[0]
  hidden = [x]
  pe = key_pe.astype(dtype)
  for l, (wq, wo, n2s, n2b, w1, b1, w2, b2) in enumerate(layers):
    g = 0 if cfg.shared_kv else l
    q = _layer_norm(x, kv[0][g], kv[1][g]) @ wq.astype(dtype)
    att = _attend(q.reshape(b, h, dh), n_buf, pe, kv, g, cfg, rngs[2 * l])
    x = x + att @ wo.astype(dtype)
    ff = jax.nn.relu(_layer_norm(x, n2s, n2b) @ w1.astype(dtype) + b1.astype(dtype))
    ff = _dropout(ff, cfg.dropout, rngs[2 * l + 1])
    x = x + ff @ w2.astype(dtype) + b2.astype(dtype)
    if offsets is not None:
      x = x + offsets[l + 1]
    hidden.append(x)
  hidden = jnp.stack(hidden)
  mix = jax.nn.softmax(mem_logits.astype(jnp.float32)).astype(dtype)
  m = jnp.einsum('l,lbd->bd', mix, hidden)
  return x, m, hidden


def feedback_forward(weights, cfg, emb, block_len=None, truncate_gradients=True,
                     rng=None, remat=False, offsets=None, unroll=1):
  """Sequential forward over whole sequences, starting from an empty memory.

  Args:
    weights: the model's weight tree.
    cfg: Config.
    emb: (batch, length, d) token embeddings x^0.
    block_len: positions per block (None: the whole sequence is one block).
    truncate_gradients: stop gradients into memories older than the block.
    rng: dropout key (None: no dropout).
    remat: recompute each block in the backward pass (saves memory).
    offsets: optional (batch, length, L+1, d) probe added to each x_t^l.
    unroll: positions per iteration of the compiled loop (`lax.scan` unroll).

  Returns:
    top: (batch, length, d) the last layer's outputs x^L;
    hidden: (batch, length, L+1, d) all x_t^l, or None without `offsets`.
  """
  b, t, d = emb.shape
  blk = min(block_len or t, t)
  n_blocks = -(-t // blk)
  pad = n_blocks * blk - t
  emb = jnp.pad(emb, ((0, 0), (0, pad), (0, 0)))
  xs = emb.reshape(b, n_blocks, blk, d).transpose(1, 2, 0, 3)  # (nb, blk, b, d)
  if offsets is not None:
    offsets = jnp.pad(offsets, ((0, 0), (0, pad), (0, 0), (0, 0)))
    offsets = offsets.reshape(b, n_blocks, blk, -1, d).transpose(1, 2, 3, 0, 4)
  positions = jnp.arange(n_blocks * blk).reshape(n_blocks, blk)

  def one_position(n_buf, inputs):
    x0, pos, off = inputs
    r = None if rng is None else jax.random.fold_in(rng, pos)
    top, m, hidden = step(weights, cfg, x0, n_buf, r, off)
    n_buf = _push(n_buf, normalized_memory(m))
    return n_buf, (top, hidden if off is not None else None)

  # Truncated: each block detaches the memories it inherits, as the official
  # trainer detaches its cache between blocks (the LN1/Wk/Wv weights still get
  # gradients through them: they act on the query side, see `_attend`).
  def one_block(n_buf, inputs):
    if truncate_gradients:
      n_buf = jax.lax.stop_gradient(n_buf)
    return jax.lax.scan(one_position, n_buf, inputs, unroll=unroll)

  if remat:
    one_block = jax.checkpoint(one_block)
  n0 = jnp.zeros((b, cfg.span, d), emb.dtype)  # the zero memory, normalized
  _, (top, hidden) = jax.lax.scan(one_block, n0, (xs, positions, offsets))
  top = top.reshape(n_blocks * blk, b, d).transpose(1, 0, 2)[:, :t]
  if hidden is not None:
    hidden = hidden.reshape(n_blocks * blk, -1, b, d).transpose(2, 0, 1, 3)[:, :t]
  return top, hidden


def output_logits(weights, x):
  """(..., d) -> (..., vocab): LN_out then the output projection."""
  scale, bias, w_out, b_out = weights[5]
  h = _layer_norm(x, scale, bias)
  return h @ w_out.astype(x.dtype) + b_out.astype(x.dtype)


def _embed(table, ids):
  """Embedding lookup; a one-hot matmul for small vocabularies (its gradient
  is a matmul, not a colliding scatter-add; see training.model.Embedding)."""
  if table.shape[0] > 2048:
    return jnp.take(table, ids, axis=0)
  one_hot = jax.nn.one_hot(ids, table.shape[0], dtype=table.dtype)
  return jnp.dot(one_hot, table, precision=jax.lax.Precision.HIGHEST)


def _uniform(rng, shape, fan_in, divide=1.0):
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(rng, shape, jnp.float32, -bound, bound) / divide


class FeedbackTransformer(base.Layer):
  """(batch, length) int32 -> (batch, length, vocab) logits; see module doc.

  Weights (nested tuple):
    embed (V, d); key_pe (dh, span); mem_logits (L+1,);
    kv: (norm_scale (G, d), norm_bias (G, d), wk (G, d, H dh), wv (G, d, H dh));
    layers: L x (wq (d, H dh), wo (H dh, d), norm2_scale (d,), norm2_bias (d,),
                 w1 (d, d_ff), b1 (d_ff,), w2 (d_ff, d), b2 (d,));
    head: (norm_scale (d,), norm_bias (d,), w_out (d, V), b_out (V,)).
  'predict' state: (normalized memories (batch, span, d), oldest first;
  position); slots not yet written hold the zero memory (normalized: zeros).
  """

  def __init__(self, vocab_size, d_model, d_ff, cfg, block_len, truncate_gradients,
               max_len, mode, unroll=1):
    super().__init__(name=f'FeedbackTransformer_L{cfg.n_layers}_S{cfg.span}')
    self._vocab_size, self._d_model, self._d_ff = vocab_size, d_model, d_ff
    self._cfg = cfg
    self._block_len = block_len
    self._truncate = truncate_gradients
    self._max_train_len = max_len
    self._mode = mode
    self._unroll = unroll

  @property
  def config(self):
    return self._cfg

  def matmul_params(self):
    """Weights' matmul count per token, for `train_flops_per_token` / MFU.

    The key/value form's count (whatever the implementation computes): per
    layer Wq, Wo, W1, W2; Wk, Wv per group; the output head (not the
    embedding).  Each position attends to all `span` slots (no causal
    halving): q.k, q.key_pe and the weighted sum of values, 3 * span * H * dh
    multiply-adds per layer, counted here as that many weights.
    """
    _, _, _, kv, layers, head = self.weights
    n = sum(w.size for layer in layers for w in layer if w.ndim == 2)
    n += kv[2].size + kv[3].size + head[2].size
    cfg = self._cfg
    return int(n + 3 * cfg.n_layers * cfg.span * cfg.n_heads * cfg.head_dim)

  def _check_length(self, length):
    if self._mode != 'predict' and length > self._max_train_len:
      raise ValueError(f'Input length {length} exceeds FeedbackLM max_len '
                       f'{self._max_train_len}; raise max_len or shorten seq_len.')

  def forward(self, ids):
    weights = self.weights
    dtype = weights[0].dtype
    emb = _embed(weights[0], ids).astype(dtype)
    if self._mode == 'predict':
      n_buf, pos = self.state

      def one_token(n, x0):
        top, m, _ = step(weights, self._cfg, x0, n)
        return _push(n, normalized_memory(m)), top

      n_buf, top = jax.lax.scan(one_token, n_buf, emb.transpose(1, 0, 2))
      self.state = (n_buf, pos + ids.shape[1])
      top = top.transpose(1, 0, 2)
    else:
      self._check_length(ids.shape[1])
      train = self._mode == 'train'
      rng = self.rng if train and self._cfg.dropout > 0 else None
      top, _ = feedback_forward(weights, self._cfg, emb, self._block_len,
                                self._truncate, rng=rng, remat=train,
                                unroll=self._unroll)
    return output_logits(weights, top)

  def init_weights_and_state(self, input_signature):
    b, length = input_signature.shape[:2]
    self._check_length(length)
    cfg, d, f, v = self._cfg, self._d_model, self._d_ff, self._vocab_size
    n, hd = cfg.n_layers, cfg.n_heads * cfg.head_dim
    g = 1 if cfg.shared_kv else n
    out_div = math.sqrt(2 * n)
    rngs = iter(jax.random.split(self.rng, 8 + 6 * n))
    kv = (jnp.ones((g, d)), jnp.zeros((g, d)),
          _uniform(next(rngs), (g, d, hd), d), _uniform(next(rngs), (g, d, hd), d))
    layers = tuple(
        (_uniform(next(rngs), (d, hd), d),
         _uniform(next(rngs), (hd, d), hd, out_div),
         jnp.ones((d,)), jnp.zeros((d,)),
         _uniform(next(rngs), (d, f), d), _uniform(next(rngs), (f,), d),
         _uniform(next(rngs), (f, d), f, out_div),
         _uniform(next(rngs), (d,), f, out_div))
        for _ in range(n))
    head = (jnp.ones((d,)), jnp.zeros((d,)),
            _uniform(next(rngs), (d, v), d), _uniform(next(rngs), (v,), d))
    self.weights = (jax.random.normal(next(rngs), (v, d)),
                    jax.random.normal(next(rngs), (cfg.head_dim, cfg.span)),
                    jnp.zeros((n + 1,)), kv, layers, head)
    if self._mode == 'predict':
      self.state = (jnp.zeros((b, cfg.span, d)), jnp.zeros((), jnp.int32))


def _positive_int(name, value):
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f'FeedbackLM {name} must be a positive integer, not {value!r}.')


@gin.configurable(module='feedback')
def FeedbackLM(vocab_size, d_model=256, d_ff=1024, n_layers=4, n_heads=4,
               head_dim=None, span=100, block_len=64, truncate_gradients=True,
               shared_kv=False, dropout=0.0, max_len=2048, unroll=1, mode='train'):
  """The Feedback Transformer language model.

  Args:
    vocab_size: number of token ids.
    d_model: width of the residual stream.
    d_ff: feed-forward hidden width.
    n_layers: layers (L); the memory mixes L+1 states (embedding included).
    n_heads: attention heads.
    head_dim: width of a head (default d_model // n_heads).
    span: memories each position attends to (official `attn_lim`); positive
      and at most max_len.
    block_len: positions per training block (official `mem_sz`): the unit of
      rematerialisation and of gradient truncation; positive, at most max_len.
    truncate_gradients: no gradient into memories older than the current block
      (the official trainer's detach); False backpropagates through the whole
      sequence.
    shared_kv: one key/value projection (and its LayerNorm) for all layers
      (`--share-proj-kv`); False gives each layer its own.
    dropout: dropout on attention probabilities and the feed-forward hidden
      layer, in 'train' mode.
    max_len: longest training/eval sequence (predict mode decodes without
      limit at constant cost per token).
    unroll: positions per iteration of the compiled training loop (a speed
      knob for accelerators: fewer loop iterations, longer compile).
    mode: 'train', 'eval' or 'predict'.

  Returns:
    A layer (batch, length) int32 -> (batch, length, vocab_size) logits.
  """
  if mode not in MODES:
    raise ValueError(f'FeedbackLM mode must be one of {MODES}, not {mode!r}.')
  for name in ('vocab_size', 'd_model', 'd_ff', 'n_layers', 'n_heads', 'span',
               'block_len', 'max_len', 'unroll'):
    _positive_int(name, locals()[name])
  if head_dim is None:
    if d_model % n_heads:
      raise ValueError(f'FeedbackLM d_model ({d_model}) must be a multiple of '
                       f'n_heads ({n_heads}), or set head_dim.')
    head_dim = d_model // n_heads
  _positive_int('head_dim', head_dim)
  for name, value in (('span', span), ('block_len', block_len)):
    if value > max_len:
      raise ValueError(f'FeedbackLM {name} ({value}) is longer than the sequence '
                       f'(max_len {max_len}); use a {name} of at most {max_len}.')
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f'FeedbackLM dropout must be in [0, 1), not {dropout!r}.')
  cfg = Config(n_layers, n_heads, head_dim, span, bool(shared_kv),
               float(dropout) if mode == 'train' else 0.0)
  return FeedbackTransformer(vocab_size, d_model, d_ff, cfg, block_len,
                             bool(truncate_gradients), max_len, mode, unroll)
