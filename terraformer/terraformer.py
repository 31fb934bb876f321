"""`ConfigurableTerraformer`: the Terraformer encoder-decoder, in Trax.

Scaling Transformers / Terraformer (Jaszczur et al., "Sparse is Enough in
Scaling Transformers", 2021) has no cross-attention.  The encoder runs
bidirectionally; its output is concatenated with the embedded, right-shifted
targets, encoder padding moved to the end ("concatenate with padding"):

    row b:  [enc_b[0 .. n_b - 1], dec_b[0 .. L2 - 1], padding]   n_b = #non-pad

and the decoder runs causal self-attention over the whole row, so a target
position sees every real input token and the earlier targets.  At the end the
L2 target positions are cut out again and projected to the vocabulary:

    inputs (B, L1) int32, targets (B, L2) int32
      -> encoder: Embedding + positions -> ReversibleSerial(encoder blocks)
         [-> (x1 + x2) / 2 -> Dense -> LayerNorm  unless reversible_encoder]
      -> concatenate with padding (B, L1 + L2, d_model)
      -> ReversibleSerial(decoder blocks) -> (x1 + x2) / 2 -> LayerNorm
      -> strip the encoder part (B, L2, d_model) -> vocabulary projection
      -> logits (B, L2, output_vocab_size)

Both stacks are reversible (two residual streams; each half-residual adds
f(LayerNorm(other stream)) to one stream, then the streams swap).  Decoder
blocks have `n_decoder_attention_layers` attention half-residuals and one
feed-forward half-residual.  Per layer the pieces are chosen by arguments:

  - attention: 'dense' (ours: bidirectional masked in the encoder, causal with
    a predict-mode key/value cache in the decoder), 'sparse_qkv'
    (`terraformer.sparse_qkv.MultiplicativeConvCausalAttention`, decoder
    only), 'lsh' (`LSHSelfAttention`, constructor arguments as trax's, extra
    ones in `lsh_options`), or any trax-style attention class (called as
    trax's `ApplyAttentionLayer` calls it).  The decoder argument may be a
    list, used in turn by layer, as in trax;
  - feed-forward: dense, or `SparseFF` (`ff_sparsity`), optionally with an SRU
    branch added in parallel (`ff_use_sru`);
  - vocabulary projection: Dense or sparse (`loss_sparsity`).

Constructor arguments and defaults follow trax's
`trax.models.research.terraformer.ConfigurableTerraformer` (trax 1.4.1), and
the weights of a model built with the same arguments are the same arrays in
the same order, so `terraformer.convert` loads trax checkpoints.  Differences:

  - the model returns logits only (trax returns (logits, targets));
  - attention types: trax's default is its chunked `tl.SelfAttention`; here
    the default is 'dense' (full attention), whose weights are those of
    `tl.Attention` (encoder) and `tl.CausalAttention` (decoder).  Pass
    `tl.SelfAttention` to get trax's default.  Our dense attention has no
    dropout on the attention probabilities;
  - half_before_layer / double_after_layer (funnel widths) and pre-embedded
    inputs (input_vocab_size=None) are not supported (ValueError);
  - predict mode (fast decoding) needs inputs without padding: trax masks
    the padding between the encoder part and the first decoded token by
    monkey-patching its layers; here `greedy_decode` trims the padding of a
    batch of one, and refuses batches of inputs of different lengths.
"""

import gin
import jax
from jax import numpy as jnp
import numpy as np
from trax import layers as tl
from trax import shapes
from trax.layers import base

from terraformer import sparse_ff
from terraformer import sparse_qkv
from training import model as model_lib
from training import sampling

MODES = model_lib.MODES
ATTENTION_TYPES = ('dense', 'sparse_qkv', 'lsh')
POS_TYPES = (None, 'fixed-base', 'sin-cos', 'axial', 'no', 'shared-offset')


def _reversible_serial(layers):
  """This project's memory-saving ReversibleSerial when present, else trax's."""
  try:
    from terraformer import reversible  # pylint: disable=g-import-not-at-top
    return reversible.ReversibleSerial(layers)
  except ImportError:
    return tl.ReversibleSerial(layers)


def _lsh_class():
  try:
    from terraformer import lsh  # pylint: disable=g-import-not-at-top
    return lsh.LSHSelfAttention
  except ImportError:
    return tl.LSHSelfAttention


def _sru_class():
  try:
    from terraformer import sru  # pylint: disable=g-import-not-at-top
    return sru.SRU
  except ImportError:
    return tl.SRU


# ----------------------------------------------------------------------------
# Concatenate with padding.


def concat_with_padding(vec_e, vec_d, mask_e):
  """Puts each decoder row right after the real encoder tokens of its row.

  Args:
    vec_e: (B, L1, D) encoder output.
    vec_d: (B, L2, D) embedded targets.
    mask_e: (B, L1), nonzero at real (non-padding) input tokens, which come
      first in each row.

  Returns:
    (B, L1 + L2, D): row b holds vec_e[b, :n_b], then vec_d[b], then what
    vec_e (extended by L2 zero rows) holds at those positions, where
    n_b = count(mask_e[b]).  (The tail is never seen by a target position:
    the decoder is causal.  It is kept as trax keeps it.)
  """
  b, l1, d = vec_e.shape
  l2 = vec_d.shape[1]
  if vec_d.shape != (b, l2, d) or mask_e.shape != (b, l1):
    raise ValueError(f'concat_with_padding: shapes {vec_e.shape}, '
                     f'{vec_d.shape}, {mask_e.shape} do not fit (B, L1, D), '
                     f'(B, L2, D), (B, L1).')
  n = jnp.sum(mask_e != 0, axis=1, dtype=jnp.int32)[:, None]       # (B, 1)
  j = jnp.arange(l1 + l2, dtype=jnp.int32)[None, :]                 # (1, L)
  e_ext = jnp.concatenate([vec_e, jnp.zeros((b, l2, d), vec_e.dtype)], 1)
  d_rows = jnp.take_along_axis(
      vec_d, jnp.clip(j - n, 0, l2 - 1)[:, :, None], axis=1)
  in_d = ((j >= n) & (j < n + l2))[:, :, None]
  return jnp.where(in_d, d_rows.astype(e_ext.dtype), e_ext)


def strip_from_concatenation(vec_ed, tok_e, l2):
  """The L2 target positions of `concat_with_padding`'s rows.

  (B, L1 + L2, D), (B, L1) int -> (B, L2, D).
  """
  n = jnp.sum(tok_e != 0, axis=1, dtype=jnp.int32)[:, None]
  idx = n + jnp.arange(l2, dtype=jnp.int32)[None, :]
  return jnp.take_along_axis(vec_ed, idx[:, :, None], axis=1)


class _FirstPredictCall(base.Layer):
  """Base of the two layers below: (a, b, c) -> self._apply(a, b, c).

  In 'predict' mode only the first call applies it (that call holds the
  inputs and the first target token); later calls carry one new target token
  each and pass input number `_PASS` through.  Which call it is shows in the
  state's shape (() before the first call, (1,) after), so the choice is made
  when tracing.
  """
  _PASS = 0

  def __init__(self, mode='train'):
    super().__init__(n_in=3, n_out=1, name=type(self).__name__)
    self._mode = mode

  def init_weights_and_state(self, input_signature):
    if self._mode == 'predict':
      self.state = jnp.zeros((), jnp.int32)

  def forward(self, inputs):
    if self._mode == 'predict':
      if self.state.shape:
        return inputs[self._PASS]
      self.state = jnp.zeros((1,), jnp.int32)
    return self._apply(*inputs)


class ConcatWithPadding(_FirstPredictCall):
  """(vec_e (B, L1, D), vec_d (B, L2, D), mask_e (B, L1)) -> (B, L1+L2, D).

  `concat_with_padding`; in 'predict' mode later calls return vec_d.
  """
  _PASS = 1

  def _apply(self, vec_e, vec_d, mask_e):
    return concat_with_padding(vec_e, vec_d, mask_e)


class StripFromConcatenation(_FirstPredictCall):
  """(vec_ed (B, L1+L2, D), tok_e (B, L1), tok_d (B, L2)) -> (B, L2, D).

  `strip_from_concatenation`; in 'predict' mode later calls return vec_ed.
  """

  def _apply(self, vec_ed, tok_e, tok_d):
    return strip_from_concatenation(vec_ed, tok_e, tok_d.shape[1])


# ----------------------------------------------------------------------------
# Attention.


def _masked_attention(n_heads):
  """(q, k, v (B, L, H * d), mask (B, L)) -> (B, L, H * dv), no weights."""
  def f(q, k, v, mask):
    b, l, _ = q.shape
    q = q.reshape(b, l, n_heads, -1)
    k = k.reshape(b, l, n_heads, -1)
    v = v.reshape(b, l, n_heads, -1)
    scores = jnp.einsum('blhd,bmhd->bhlm', q * q.shape[-1] ** -0.5, k)
    scores = jnp.where(mask[:, None, None, :] != 0, scores, -1e9)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    out = jnp.einsum('bhlm,bmhd->blhd', probs.astype(v.dtype), v)
    return out.reshape(b, l, -1)
  return tl.Fn('MaskedDotProductAttention', f)


def DenseEncoderAttention(d_model, n_heads, d_qk, d_v, mode='train'):
  """Bidirectional attention over non-padding keys.

  (x (B, L, d_model), mask (B, L)) -> (B, L, d_model).  Weights: Dense Q, K,
  V (to n_heads * d_qk, * d_qk, * d_v) and the output Dense, like
  `tl.Attention` when d_qk = d_v = d_model // n_heads.
  """
  del mode
  return tl.Serial(
      tl.Select([0, 0, 0, 1]),
      tl.Parallel(tl.Dense(n_heads * d_qk), tl.Dense(n_heads * d_qk),
                  tl.Dense(n_heads * d_v)),
      _masked_attention(n_heads),
      tl.Dense(d_model),
  )


def DenseCausalAttention(d_model, n_heads, d_head, max_len=2048,
                         mode='train'):
  """Causal attention with a key/value cache in 'predict' mode.

  (B, L, d_model) -> (B, L, d_model).  Weights: Dense Q, K, V (to
  n_heads * d_head each) and the output Dense, like `tl.CausalAttention`.
  The core is `training.model.CausalDotProductAttention` over [Q | K | V];
  `max_len` is its predict-mode cache length.
  """
  dense = lambda n: model_lib.Dense(n, role='attention')
  return tl.Serial(
      tl.Select([0, 0, 0]),
      tl.Parallel(dense(n_heads * d_head), dense(n_heads * d_head),
                  dense(n_heads * d_head)),
      tl.Concatenate(n_items=3),
      model_lib.CausalDotProductAttention(n_heads, max_len=max_len, mode=mode),
      dense(d_model),
  )


def _insert_axes_12():
  return tl.Fn('InsertAxes12', lambda m: m[:, None, None, :])


def _attention_layer(kind, causal, d_model, n_heads, d_qk, d_v, dropout,
                     chunk_size, cache_len, attention_sparsity,
                     attention_kernel_size, lsh_options, mode):
  """One attention layer: encoder (x, mask) -> x; decoder x -> x."""
  if isinstance(kind, str):
    if kind not in ATTENTION_TYPES:
      raise ValueError(f'attention type must be one of {ATTENTION_TYPES} or '
                       f'an attention layer class, not {kind!r}.')
    if kind == 'dense':
      if causal:
        if d_qk != d_v:
          raise ValueError(f"'dense' decoder attention needs d_attention_key "
                           f'({d_qk}) == d_attention_value ({d_v}).')
        layer = DenseCausalAttention(d_model, n_heads, d_qk, cache_len, mode)
      else:
        layer = DenseEncoderAttention(d_model, n_heads, d_qk, d_v, mode)
    elif kind == 'sparse_qkv':
      if not causal:
        raise ValueError("encoder_attention_type 'sparse_qkv' is not "
                         "possible: sparse QKV attention is causal; use "
                         "'dense' or 'lsh' in the encoder.")
      layer = sparse_qkv.MultiplicativeConvCausalAttention(
          d_model, n_heads=n_heads, sparsity=attention_sparsity,
          length_kernel_size=attention_kernel_size, dropout=dropout,
          max_inference_length=cache_len, mode=mode)
    else:
      options = dict(lsh_options or {})
      layer = _lsh_class()(
          n_heads=n_heads, d_qk=d_qk, d_v=d_v, causal=causal,
          masked=not causal, attention_dropout=dropout,
          output_dropout=dropout, mode=mode, **options)
  else:  # A trax-style class, called as trax's ApplyAttentionLayer does.
    try:
      layer = kind(n_heads=n_heads, d_qk=d_qk, d_v=d_v, causal=causal,
                   masked=not causal, output_dropout=dropout,
                   attention_dropout=dropout, mode=mode)
    except TypeError:
      layer = kind(d_model, n_heads=n_heads, dropout=dropout, mode=mode)
  layer = tl.Chunk(layer, chunk_size)
  if not causal and layer.n_out == 2:  # (x, mask (B, 1, 1, L)) -> (x, mask)
    layer = tl.Serial(tl.Parallel([], _insert_axes_12()), layer,
                      tl.Select([0], n_in=2))
  return layer


# ----------------------------------------------------------------------------
# Feed-forward.


def _layer_norm(center):
  return model_lib.LayerNorm() if center else tl.LayerNorm(center=False)


def _parse_ff_sparsity(ff_sparsity, d_ff):
  """-> (N, d_lowrank, temperature, quant_prob), as trax reads ff_sparsity."""
  temperature, quant_prob = 0.1, 0.3
  if isinstance(ff_sparsity, str):
    ff_sparsity = [float(x) if '.' in x else int(x)
                   for x in ff_sparsity.split()]
  if isinstance(ff_sparsity, (list, tuple)):
    if len(ff_sparsity) == 2:
      n, d_lowrank = ff_sparsity
    elif len(ff_sparsity) == 4:
      n, d_lowrank, temperature, quant_prob = ff_sparsity
    else:
      raise ValueError(f'ff_sparsity must be N, (N, d_lowrank) or (N, '
                       f'd_lowrank, temperature, quant_prob), not '
                       f'{ff_sparsity!r}.')
  elif isinstance(ff_sparsity, int) and not isinstance(ff_sparsity, bool):
    n, d_lowrank = ff_sparsity, d_ff // max(ff_sparsity, 1)
  else:
    raise ValueError(f'ff_sparsity must be an int, a tuple or a string, not '
                     f'{ff_sparsity!r}.')
  if n <= 0 or d_ff % n:
    raise ValueError(f'ff_sparsity N={n} must be a positive divisor of '
                     f'd_ff={d_ff}.')
  return n, d_lowrank, temperature, quant_prob


def FeedForwardWithOptions(d_model, d_ff, dropout, ff_activation, ff_dropout,
                           ff_chunk_size, ff_use_sru, ff_sparsity,
                           center_layernorm, use_bfloat16, mode):
  """Pre-norm feed-forward (dense or SparseFF) [+ parallel SRU branch].

  (B, L, d_model) -> (B, L, d_model).  With ff_use_sru = k or (k, units):
  y = FF(x) + Dense(d_model)(SRU^k(Dense(units)(LayerNorm(x)))).
  """
  if ff_sparsity:
    n, d_lowrank, temperature, quant_prob = _parse_ff_sparsity(ff_sparsity,
                                                               d_ff)
    ff = [_layer_norm(center_layernorm),
          sparse_ff.SparseFF(
              d_ff, n_elements_in_block=n, d_lowrank=d_lowrank,
              temperature=temperature, quant_prob=quant_prob,
              use_bfloat16=use_bfloat16, mode=mode, dropout_rate=dropout,
              dropout_shared_axes=[-2], ff_chunk_size=ff_chunk_size)]
  else:
    act_dropout = dropout if ff_dropout is None else ff_dropout
    ff = [_layer_norm(center_layernorm),
          model_lib.Dense(d_ff, use_bfloat16=use_bfloat16),
          tl.Dropout(rate=act_dropout, shared_axes=[-2], mode=mode),
          ff_activation(),
          model_lib.Dense(d_model, use_bfloat16=use_bfloat16),
          tl.Dropout(rate=dropout, shared_axes=[-2], mode=mode)]
    if ff_chunk_size > 0:
      ff = tl.BatchLeadingAxes(tl.Chunk(tl.Serial(ff), ff_chunk_size))
  if not ff_use_sru:
    return ff
  if isinstance(ff_use_sru, (list, tuple)):
    n_sru, sru_units = ff_use_sru
  else:
    n_sru, sru_units = ff_use_sru, 32
  sru = _sru_class()
  branch = ([_layer_norm(center_layernorm), tl.Dense(sru_units)]
            + [sru(sru_units, mode=mode) for _ in range(n_sru)]
            + [tl.Dense(d_model)])
  return tl.Residual(branch, shortcut=ff)


# ----------------------------------------------------------------------------
# Blocks and stacks.


def _xy_avg():
  return tl.Fn('XYAvg', lambda x, y: (x + y) / 2.0)


def _reversible_serial_forget(layers, d_model, n_layers, forget_dense):
  """ReversibleSerial, with a 'forgetting' layer every n_layers blocks."""
  if not n_layers or len(layers) <= n_layers + 1:
    return _reversible_serial(layers)
  forget = (tl.Serial(_xy_avg(), tl.Dense(d_model), tl.Dup()) if forget_dense
            else tl.Select([0, 1]))
  return tl.Serial(
      _reversible_serial(layers[:n_layers]), forget,
      _reversible_serial_forget(layers[n_layers:], d_model, n_layers,
                                forget_dense))


def sinusoids(positions, d):
  """(...,) int positions -> (..., d) float32 sinusoidal encodings.

  Channel 2i is sin(p / 10000^(2i/d)) and 2i+1 is cos of the same angle (the
  Transformer's table, which trax's PositionalEncoding starts from).
  """
  freqs = jnp.exp(jnp.arange(0, d, 2, dtype=jnp.float32)
                  * (-np.log(10000.0) / d))
  angles = positions.astype(jnp.float32)[..., None] * freqs
  pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return pe.reshape(positions.shape + (-1,))[..., :d]


class SharedOffsetPositions(base.Layer):
  """(vec_e (B, L1, D), vec_d (B, L2, D)) -> both plus sinusoidal positions.

  pos_type 'shared-offset' of `ConfigurableTerraformer` (ours, not trax's):
  fixed sinusoids, and in 'train' mode each row's inputs and targets both
  start at one random position o (with probability 1 - start_from_zero_prob;
  o uniform in 0 .. max_offset), so that the encoder token i and the target i
  keep the same position as each other while every position up to
  max_offset + length is trained ("randomized positional encodings", Ruoss et
  al. 2023).  In 'eval' and 'predict' mode rows start at 0; in 'predict' mode
  the targets' positions continue from a counter in the state.  (trax's
  own offsets, pos_type None with pos_max_offset_to_add, are drawn
  separately for the encoder and the decoder, so the two disagree.)
  """

  def __init__(self, max_len, max_offset=0, start_from_zero_prob=0.0,
               mode='train'):
    super().__init__(n_in=2, n_out=2, name='SharedOffsetPositions')
    if not 0 <= max_offset < max_len:
      raise ValueError(f'pos_max_offset_to_add must be in 0 .. max_len - 1 '
                       f'({max_len - 1}), not {max_offset}.')
    if not 0.0 <= start_from_zero_prob <= 1.0:
      raise ValueError(f'pos_start_from_zero_prob must be in [0, 1], not '
                       f'{start_from_zero_prob}.')
    self._max_len, self._max_offset = max_len, max_offset
    self._p_zero, self._mode = start_from_zero_prob, mode

  def forward(self, inputs):
    vec_e, vec_d = inputs
    b, l1, d = vec_e.shape
    l2 = vec_d.shape[1]
    if self._mode == 'train' and self._max_offset:
      if self._max_offset + max(l1, l2) > self._max_len:
        raise ValueError(
            f'pos_max_offset_to_add ({self._max_offset}) plus the sequence '
            f'length ({max(l1, l2)}) exceeds max_len ({self._max_len}).')
      rng_o, rng_z = jax.random.split(self.rng)
      o = jax.random.randint(rng_o, (b, 1), 0, self._max_offset + 1)
      zero = jax.random.uniform(rng_z, (b, 1)) < self._p_zero
      o = jnp.where(zero, 0, o)
    else:
      o = jnp.zeros((b, 1), jnp.int32)
    start_d = self.state if self._mode == 'predict' else o
    pos_e = o + jnp.arange(l1)[None, :]
    pos_d = start_d + jnp.arange(l2)[None, :]
    if self._mode == 'predict':
      self.state = self.state + l2
    return (vec_e + sinusoids(pos_e, d).astype(vec_e.dtype),
            vec_d + sinusoids(pos_d, d).astype(vec_d.dtype))

  def init_weights_and_state(self, input_signature):
    if self._mode == 'predict':
      self.state = jnp.zeros((input_signature[1].shape[0], 1), jnp.int32)


def _positional(pos_type, max_len, dropout, pos_axial_shape, pos_d_axial_embs,
                pos_start_from_zero_prob, pos_max_offset_to_add, use_bfloat16,
                mode):
  if pos_type is None:
    return tl.PositionalEncoding(
        max_len=max_len, dropout=dropout, use_bfloat16=use_bfloat16,
        start_from_zero_prob=pos_start_from_zero_prob,
        max_offset_to_add=pos_max_offset_to_add, mode=mode)
  if pos_type == 'fixed-base':
    return tl.FixedBasePositionalEncoding(mode=mode)
  if pos_type == 'sin-cos':
    return tl.SinCosPositionalEncoding(mode=mode)
  if pos_type in ('no', 'shared-offset'):  # 'shared-offset': after embedding
    return []
  if not pos_axial_shape or pos_d_axial_embs is None:
    raise ValueError("pos_type 'axial' needs pos_axial_shape and "
                     'pos_d_axial_embs.')
  return tl.AxialPositionalEncoding(
      shape=pos_axial_shape, d_embs=pos_d_axial_embs,
      dropout_broadcast_dims=tuple(range(1, len(pos_axial_shape) + 1)),
      dropout=dropout, mode=mode)


class Terraformer(tl.Serial):
  """The model's top `tl.Serial`; checks input shapes before running.

  Inputs longer than max_len raise ValueError naming both lengths (at
  `init` or when `pure_fn` is traced), not trax's wrapped LayerError.
  """

  def __init__(self, *layers, max_len):
    super().__init__(*layers, name='Terraformer')
    self._max_len = max_len

  def _check(self, xs):
    if not isinstance(xs, (list, tuple)) or len(xs) != 2:
      raise ValueError('ConfigurableTerraformer takes (inputs, targets).')
    for name, tok in zip(('inputs', 'targets'), xs):
      if len(tok.shape) != 2:
        raise ValueError(f'{name} must be (batch, length) int32 token ids, '
                         f'got shape {tuple(tok.shape)}.')
      if tok.shape[1] > self._max_len:
        raise ValueError(f'{name} have length {tok.shape[1]}, longer than '
                         f'the configured maximum max_len={self._max_len}; '
                         f'truncate them or raise max_len.')

  def init(self, input_signature, *args, **kwargs):
    self._check(input_signature)
    return super().init(input_signature, *args, **kwargs)

  def pure_fn(self, x, weights, state, rng, use_cache=False):
    self._check(x)
    return super().pure_fn(x, weights, state, rng, use_cache)


@gin.configurable(module='terraformer')
def ConfigurableTerraformer(input_vocab_size=None,
                            output_vocab_size=None,
                            d_model=512,
                            d_ff=2048,
                            d_attention_key=None,
                            d_attention_value=None,
                            n_encoder_layers=6,
                            n_decoder_layers=6,
                            n_heads=8,
                            dropout=0.1,
                            max_len=2048,
                            encoder_attention_type='dense',
                            encoder_decoder_attention_type='dense',
                            pos_type='fixed-base',
                            pos_axial_shape=(),
                            pos_d_axial_embs=None,
                            pos_start_from_zero_prob=1.0,
                            pos_max_offset_to_add=0,
                            ff_activation=tl.Relu,
                            ff_use_sru=0,
                            ff_chunk_size=0,
                            ff_dropout=None,
                            ff_sparsity=0,
                            loss_sparsity_type='mult',
                            loss_sparsity=0,
                            loss_d_lowrank=0,
                            loss_sparsity_prob=None,
                            attention_chunk_size=0,
                            n_layers_forget=0,
                            forget_dense=True,
                            n_decoder_attention_layers=2,
                            use_bfloat16=False,
                            reversible_encoder=False,
                            use_two_swaps_per_encoder_block=True,
                            center_layernorm=True,
                            half_before_layer=None,
                            double_after_layer=None,
                            attention_sparsity=None,
                            attention_kernel_size=3,
                            lsh_options=None,
                            encoder_lsh_options=None,
                            predict_cache_len=None,
                            mode='train',
                            vocab_size=None):
  """The Terraformer encoder-decoder (see the module docstring).

  Args:
    input_vocab_size: ids of the inputs are in [0, input_vocab_size); 0 is
      padding, which must come after the real tokens of a row.
    output_vocab_size: vocabulary of the targets; None shares the input
      embedding (the same layer, as in trax).
    d_model, d_ff, n_heads: widths; n_heads must divide d_model / 2 (trax's
      rule).
    d_attention_key, d_attention_value: head widths (None: d_model // n_heads).
    n_encoder_layers, n_decoder_layers: numbers of blocks.
    dropout: residual, attention and embedding dropout ('train' mode).
    max_len: longest inputs and longest targets (positional encodings).
      Longer inputs raise ValueError naming both lengths.
    encoder_attention_type: 'dense', 'lsh' or a trax-style attention class.
    encoder_decoder_attention_type: 'dense', 'sparse_qkv', 'lsh', a trax-style
      class, or a list of these used in turn by decoder layer.
    pos_type: None (learned table, trax's PositionalEncoding), 'fixed-base',
      'sin-cos', 'axial' (with pos_axial_shape, pos_d_axial_embs), 'no', or
      'shared-offset' (ours: sinusoids whose random training offset is the
      same for a row's inputs and targets; `SharedOffsetPositions`).
    pos_start_from_zero_prob, pos_max_offset_to_add: position offsets in
      training (pos_type None and 'shared-offset').
    ff_activation: activation of the dense feed-forward.
    ff_use_sru: k or (k, units): an SRU branch of k layers next to each FF.
    ff_chunk_size: run feed-forwards in chunks of this many rows (0: no).
    ff_dropout: dropout after the FF activation (None: `dropout`).
    ff_sparsity: 0 (dense), N, (N, d_lowrank) or (N, d_lowrank, temperature,
      quant_prob) for `SparseFF`; d_lowrank defaults to d_ff // N.
    loss_sparsity_type, loss_sparsity, loss_d_lowrank, loss_sparsity_prob: the
      vocabulary projection, see `sparse_qkv.SparseDenseWithOptions`.
    attention_chunk_size: run attention in batch chunks (0: no).
    n_layers_forget, forget_dense: a (x1 + x2) / 2 -> Dense -> Dup layer
      every n_layers_forget blocks (0: none).
    n_decoder_attention_layers: attention half-residuals per decoder block.
    use_bfloat16: bfloat16 weights in Dense layers.
    reversible_encoder: keep the encoder's two streams into the decoder
      (else average them and apply Dense + LayerNorm).
    use_two_swaps_per_encoder_block: swap streams after the encoder's FF too.
    center_layernorm: False gives RMS-style LayerNorm without centering.
    half_before_layer, double_after_layer: not supported (must be None).
    attention_sparsity: modules S of 'sparse_qkv' attention (None: n_heads).
    attention_kernel_size: its causal kernel size over the length.
    lsh_options: dict of further `LSHSelfAttention` arguments (chunk_len,
      n_hashes, n_buckets, n_chunks_before, n_chunks_after, predict_mem_len,
      predict_drop_len, max_length_for_buckets, ...).
    encoder_lsh_options: the same for the encoder's LSH attention (None:
      lsh_options); trax's arXiv config looks one chunk ahead there only.
    predict_cache_len: key/value cache length of 'dense' and 'sparse_qkv'
      decoder attention in 'predict' mode (None: 2 * max_len, room for the
      longest inputs plus the longest targets).
    mode: 'train', 'eval' or 'predict'.
    vocab_size: this project's name for input_vocab_size (train.py calls
      model(vocab_size=..., mode=...)); give one of the two.

  Returns:
    A layer (inputs (B, L1) int32, targets (B, L2) int32) ->
    logits (B, L2, output_vocab_size).  The targets are shifted right inside
    (position i sees targets < i), except in 'predict' mode, where each call
    gets the previous token (0 first) and the first call also the inputs.
  """
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, not {mode!r}.')
  if vocab_size is not None:
    if input_vocab_size not in (None, vocab_size):
      raise ValueError(f'vocab_size={vocab_size} and input_vocab_size='
                       f'{input_vocab_size} differ; give one of them.')
    input_vocab_size = vocab_size
  if input_vocab_size is None:
    raise ValueError('input_vocab_size=None (pre-embedded inputs) is not '
                     'supported; give the input vocabulary size.')
  if half_before_layer is not None or double_after_layer is not None:
    raise ValueError('half_before_layer and double_after_layer are not '
                     'supported; leave them None.')
  for name, value in (('input_vocab_size', input_vocab_size),
                      ('d_model', d_model), ('d_ff', d_ff),
                      ('n_heads', n_heads), ('max_len', max_len)):
    sparse_qkv._check_positive_int(name, value)  # pylint: disable=protected-access
  if (d_model / 2) % n_heads != 0:
    raise ValueError(f'n_heads ({n_heads}) must divide d_model/2 '
                     f'({d_model / 2}).')
  if pos_type not in POS_TYPES:
    raise ValueError(f'pos_type must be one of {POS_TYPES}, not '
                     f'{pos_type!r}.')
  d_qk = d_model // n_heads if d_attention_key is None else d_attention_key
  d_v = d_model // n_heads if d_attention_value is None else d_attention_value
  cache_len = 2 * max_len if predict_cache_len is None else predict_cache_len
  enc_mode = 'eval' if mode == 'predict' else mode  # encoder: whole inputs
  dec_types = encoder_decoder_attention_type
  if not isinstance(dec_types, (list, tuple)):
    dec_types = [dec_types]
  if n_decoder_layers % len(dec_types):
    raise ValueError(f'{len(dec_types)} decoder attention types do not '
                     f'divide n_decoder_layers={n_decoder_layers}.')

  def embedder(vocab_size, emb_mode):
    return [model_lib.Embedding(vocab_size, d_model),
            tl.Dropout(rate=dropout, shared_axes=[-2], mode=emb_mode)]

  def positional(pos_mode):
    return _positional(pos_type, max_len, dropout, pos_axial_shape,
                       pos_d_axial_embs, pos_start_from_zero_prob,
                       pos_max_offset_to_add, use_bfloat16, pos_mode)

  in_embedder = embedder(input_vocab_size, enc_mode)
  out_embedder = (in_embedder if output_vocab_size is None
                  else embedder(output_vocab_size, mode))
  vocab_out = output_vocab_size or input_vocab_size
  in_encoder = tl.Serial(in_embedder, positional(enc_mode))
  out_encoder = tl.Serial(out_embedder, positional(mode))
  if pos_type == 'shared-offset':                   # e mask tok_e d tok_d
    shared_positions = [tl.Select([0, 3, 1, 2, 4]),  # e d mask tok_e tok_d
                        SharedOffsetPositions(max_len, pos_max_offset_to_add,
                                              pos_start_from_zero_prob, mode),
                        tl.Select([0, 2, 3, 1, 4])]  # e mask tok_e d tok_d
  else:
    shared_positions = []

  def feed_forward(ff_mode):
    return FeedForwardWithOptions(
        d_model, d_ff, dropout, ff_activation, ff_dropout, ff_chunk_size,
        ff_use_sru, ff_sparsity, center_layernorm, use_bfloat16, ff_mode)

  def attention(kind, causal, att_mode):
    options = (lsh_options if causal or encoder_lsh_options is None
               else encoder_lsh_options)
    return _attention_layer(
        kind, causal, d_model, n_heads, d_qk, d_v, dropout,
        attention_chunk_size, cache_len, attention_sparsity,
        attention_kernel_size, options, att_mode)

  def encoder_block():
    block = [
        tl.ReversibleHalfResidual(
            _layer_norm(center_layernorm),
            attention_layer=attention(encoder_attention_type, False, enc_mode)),
        tl.ReversibleSwap(),
        tl.ReversibleHalfResidual(feed_forward(enc_mode)),
    ]
    if use_two_swaps_per_encoder_block:
      block.append(tl.ReversibleSwap())
    return block

  def decoder_block(kind):
    block = []
    for _ in range(n_decoder_attention_layers):
      block += [tl.ReversibleHalfResidual(
                    _layer_norm(center_layernorm),
                    attention_layer=attention(kind, True, mode)),
                tl.ReversibleSwap()]
    return block + [tl.ReversibleHalfResidual(feed_forward(mode)),
                    tl.ReversibleSwap()]

  # Stack comments: e = encoder, d = decoder, ed = concatenated.
  encoder = [tl.ReversibleSelect([0, 0]),          # e e mask tok_e vec_d
             _reversible_serial_forget(
                 [encoder_block() for _ in range(n_encoder_layers)],
                 d_model, n_layers_forget, forget_dense)]
  if reversible_encoder:
    concat = tl.Serial(                             # e1 e2 mask tok_e d
        tl.Select([0, 4, 2, 1, 4, 2, 3]),           # e1 d mask e2 d mask tok_e
        ConcatWithPadding(mode),                    # ed1 e2 d mask tok_e
        tl.Parallel([], ConcatWithPadding(mode)))   # ed1 ed2 tok_e
  else:
    encoder += [_xy_avg(), tl.Dense(d_model, use_bfloat16=use_bfloat16),
                model_lib.LayerNorm()]
    concat = tl.Serial(                             # e mask tok_e d
        tl.Select([0, 3, 1, 2]),                    # e d mask tok_e
        ConcatWithPadding(mode),                    # ed tok_e
        tl.ReversibleSelect([0, 0]))                # ed ed tok_e
  # One weight tree for all modes: Cache's weights are (its layer's,).
  encoder = tl.Serial(encoder)
  encoder = tl.Cache(encoder) if mode == 'predict' else tl.Serial(encoder)

  decoder_blocks = [decoder_block(dec_types[i % len(dec_types)])
                    for i in range(n_decoder_layers)]

  return Terraformer(                               # tok_e tok_d
      tl.Select([0, 0, 0, 1, 1]),                   # tok_e tok_e tok_e tok_d tok_d
      tl.Parallel(in_encoder,
                  tl.Fn('PaddingMask', lambda t: t != 0),
                  [],
                  [tl.ShiftRight(mode=mode), out_encoder]),
      # e mask tok_e vec_d tok_d
      shared_positions,
      encoder,                                      # e [e] mask tok_e d tok_d
      concat,                                       # ed ed tok_e tok_d
      _reversible_serial_forget(decoder_blocks, d_model, n_layers_forget,
                                forget_dense),
      _xy_avg(),                                    # ed tok_e tok_d
      model_lib.LayerNorm(),
      StripFromConcatenation(mode),                 # d
      sparse_qkv.SparseDenseWithOptions(
          vocab_out, d_input=d_model, sparsity_type=loss_sparsity_type,
          sparsity=loss_sparsity, d_lowrank=loss_d_lowrank,
          prob_sparse=loss_sparsity_prob, use_bfloat16=use_bfloat16,
          mode=mode),                               # logits
      max_len=max_len)


@gin.configurable(module='terraformer')
def ReversibleTerraformerLM(vocab_size, d_model=512, d_ff=2048, n_layers=6,
                            n_heads=8, dropout=0.1, max_len=2048,
                            attention_type='dense', pos_type=None,
                            ff_activation=tl.Relu, ff_use_sru=0,
                            ff_chunk_size=0, ff_dropout=None, ff_sparsity=0,
                            loss_sparsity_type='mult', loss_sparsity=0,
                            loss_d_lowrank=0, n_attention_layers=1,
                            attention_sparsity=None, attention_kernel_size=3,
                            lsh_options=None, center_layernorm=True,
                            mode='train'):
  """Decoder-only LM with the Terraformer's reversible decoder blocks.

  (B, L) int32 -> (B, L, vocab_size) logits:
  Embedding + positions -> ReversibleSelect([0, 0]) -> ReversibleSerial(
  n_layers decoder blocks, as in `ConfigurableTerraformer`) -> (x1 + x2) / 2
  -> LayerNorm -> vocabulary projection.  Use it for long sequences (LSH,
  reversible memory); `terraformer.models.TerraformerLM` is the
  non-reversible pre-norm LM.  Arguments as in `ConfigurableTerraformer`
  (attention_type: 'dense', 'sparse_qkv', 'lsh', a class, or a list used in
  turn by layer; the predict-mode cache holds max_len positions).
  """
  sparse_qkv.check_lm_arguments(
      mode, vocab_size=vocab_size, d_model=d_model, d_ff=d_ff,
      n_layers=n_layers, n_heads=n_heads, max_len=max_len)
  if pos_type not in POS_TYPES[:3] + ('no',):
    raise ValueError(f"pos_type must be one of {POS_TYPES[:3] + ('no',)}, "
                     f'not {pos_type!r}.')
  types = attention_type if isinstance(attention_type, (list, tuple)) else [
      attention_type]
  d_head = d_model // n_heads

  def block(kind):
    layers = []
    for _ in range(n_attention_layers):
      layers += [tl.ReversibleHalfResidual(
                     _layer_norm(center_layernorm),
                     attention_layer=_attention_layer(
                         kind, True, d_model, n_heads, d_head, d_head, dropout,
                         0, max_len, attention_sparsity,
                         attention_kernel_size, lsh_options, mode)),
                 tl.ReversibleSwap()]
    ff = FeedForwardWithOptions(d_model, d_ff, dropout, ff_activation,
                                ff_dropout, ff_chunk_size, ff_use_sru,
                                ff_sparsity, center_layernorm, False, mode)
    return layers + [tl.ReversibleHalfResidual(ff), tl.ReversibleSwap()]

  return tl.Serial(
      model_lib.Embedding(vocab_size, d_model),
      tl.Dropout(rate=dropout, shared_axes=[-2], mode=mode),
      _positional(pos_type, max_len, dropout, (), None, 1.0, 0, False, mode),
      tl.ReversibleSelect([0, 0]),
      _reversible_serial([block(types[i % len(types)])
                          for i in range(n_layers)]),
      _xy_avg(),
      model_lib.LayerNorm(),
      sparse_qkv.SparseDenseWithOptions(
          vocab_size, d_input=d_model, sparsity_type=loss_sparsity_type,
          sparsity=loss_sparsity, d_lowrank=loss_d_lowrank, mode=mode),
  )


# ----------------------------------------------------------------------------
# Decoding.


def trim_inputs(inputs):
  """Drops the padding columns that every row has: (B, L1) -> (B, n).

  Fast decoding needs inputs without padding (see the module docstring).
  Raises ValueError if rows have different numbers of real tokens.
  """
  inputs = np.asarray(inputs)
  lengths = (inputs != 0).sum(axis=1)
  if np.any(lengths != lengths[0]):
    raise ValueError(f'Fast (predict-mode) decoding needs inputs of one '
                     f'length per batch; got lengths {lengths.tolist()}: '
                     f'decode the rows one at a time.')
  n = int(lengths[0])
  if n == 0:
    raise ValueError('inputs hold no tokens (all padding).')
  if np.any(inputs[:, :n] == 0):
    raise ValueError('inputs hold padding (id 0) before their last token.')
  return inputs[:, :n]


def greedy_decode(predict_model, weights, inputs, n_tokens, start_id=0):
  """Greedy decoding with a 'predict'-mode model, one token per step.

  Args:
    predict_model: `ConfigurableTerraformer(..., mode='predict')`.
    weights: its weights (e.g. a trained or converted eval-mode model's
      `.weights`: all modes share one weight tree).
    inputs: (B, L1) int ids; padding columns shared by all rows are trimmed.
    n_tokens: number of tokens to produce.
    start_id: the first decoder input (0 as in training's ShiftRight).

  Returns:
    (B, n_tokens) int32: at each step the argmax of the logits.
  """
  inputs = jnp.asarray(trim_inputs(inputs), jnp.int32)
  b = inputs.shape[0]
  signature = (shapes.ShapeDtype(inputs.shape, jnp.int32),
               shapes.ShapeDtype((b, 1), jnp.int32))
  _, state = predict_model.init(signature)
  step = jax.jit(predict_model.pure_fn,
                 compiler_options=sampling.decode_compiler_options())
  rng = jax.random.PRNGKey(0)
  token = jnp.full((b, 1), start_id, jnp.int32)
  out = []
  for _ in range(n_tokens):
    logits, state = step((inputs, token), weights, state, rng)
    token = jnp.argmax(logits[:, -1, :], axis=-1).astype(jnp.int32)[:, None]
    out.append(token)
  return jnp.concatenate(out, axis=1)

