"""`TerraformerLM`: the baseline decoder-only LM with Scaling Transformers' sparse layers.

The same pre-norm stack as `training.model.DecoderLM`,

    ids -> Embedding + positions
        -> n_layers x [ x + Attention(Norm(x)) ; x + FeedForward(Norm(x)) ]
        -> Norm -> Projection(vocab)

where each of the three parts can be made sparse on its own (Jaszczur et al.,
"Sparse is Enough in Scaling Transformers", 2021):

  - ff_sparsity N > 0: the feed-forward is `SparseFF` (one unit in every
    block of N fires, chosen by a low-rank controller); 0 keeps it dense.
  - attention_sparsity S > 0: Q, K, V come from
    `MultiplicativeConvCausalAttention` (one FactoredDense with S modules,
    then causal convolutions over (length, module)); 0 keeps dense attention.
  - loss_sparsity S > 0: the projection to the vocabulary is a FactoredDense
    with S modules ('mult', as in the Terraformer); 0 keeps it Dense.

All settings decode with `training.sampling.Sampler` (the sparse layers keep
their predict-mode state: the key/value cache, the convolution's last inputs),
and are trainable by `train.py` (gin files in gin/terraformer/).  The
defaults give the paper's 800M-class setting when d_model=1024, d_ff=6144
(4096 dense), n_heads=16, ff_sparsity=64, attention_sparsity=16.
"""

import gin
from trax import layers as tl

from terraformer import sparse_ff
from terraformer import sparse_qkv
from training import model as model_lib


def _check_sparsity(name, value, divides, divides_name):
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f'{name} must be 0 (dense) or a positive integer, not '
                     f'{value!r}.')
  if value and divides % value:
    allowed = [s for s in range(1, min(divides, 128) + 1) if divides % s == 0]
    raise ValueError(f'{name}={value} must divide {divides_name}={divides}; '
                     f'allowed: 0 (dense) or one of {allowed}.')


def FeedForwardBlock(d_model, d_ff, ff_sparsity=0, ff_lowrank=None,
                     ff_temperature=0.1, ff_quant_prob=0.3,
                     activation=tl.Relu, dropout=0.0, mode='train'):
  """Dense or sparse (`SparseFF`) feed-forward: (b, t, d_model) -> same.

  The sparse one always uses ReLU (as in the paper and trax); `activation`
  is for the dense one.  ff_lowrank (the controller's inner width) defaults to
  d_ff // ff_sparsity, as in the Terraformer.
  """
  _check_sparsity('ff_sparsity', ff_sparsity, d_ff, 'd_ff')
  if not ff_sparsity:
    return model_lib.FeedForward(d_model, d_ff, activation, dropout, mode)
  d_lowrank = d_ff // ff_sparsity if ff_lowrank is None else ff_lowrank
  if (isinstance(d_lowrank, bool) or not isinstance(d_lowrank, int)
      or not 1 <= d_lowrank <= d_ff):
    raise ValueError(f'ff_lowrank must be an integer in [1, d_ff={d_ff}] (or '
                     f'None for d_ff // ff_sparsity), not {d_lowrank!r}.')
  return sparse_ff.SparseFF(
      d_ff, n_elements_in_block=ff_sparsity, d_lowrank=d_lowrank,
      temperature=ff_temperature, quant_prob=ff_quant_prob,
      dropout_rate=dropout, mode=mode)


def AttentionBlock(d_model, n_heads, attention_sparsity=0,
                   attention_kernel_size=3, share_qk=False,
                   output_layer_type='none', v_concat_type='none',
                   max_len=2048, mode='train'):
  """Dense or sparse-QKV causal self-attention: (b, t, d_model) -> same."""
  _check_sparsity('attention_sparsity', attention_sparsity, d_model, 'd_model')
  if not attention_sparsity:
    return model_lib.CausalSelfAttention(d_model, n_heads, max_len=max_len,
                                         mode=mode)
  return sparse_qkv.MultiplicativeConvCausalAttention(
      d_model, n_heads=n_heads, sparsity=attention_sparsity,
      length_kernel_size=attention_kernel_size, share_qk=share_qk,
      output_layer_type=output_layer_type, v_concat_type=v_concat_type,
      max_inference_length=max_len, mode=mode)


@gin.configurable(module='terraformer')
def TerraformerLM(vocab_size, d_model=512, d_ff=2048, n_layers=6, n_heads=8,
                  max_len=2048, dropout=0.0, ff_activation=tl.Relu,
                  ff_sparsity=0, ff_lowrank=None, ff_temperature=0.1,
                  ff_quant_prob=0.3, attention_sparsity=0,
                  attention_kernel_size=3, share_qk=False,
                  output_layer_type='none', v_concat_type='none',
                  loss_sparsity=0, loss_sparsity_type='mult', mode='train'):
  """A decoder-only LM with any mix of sparse FF, sparse QKV and sparse loss.

  Args:
    vocab_size: number of token ids.
    d_model, d_ff, n_layers, n_heads, max_len, dropout: as in DecoderLM;
      max_len is also the predict-mode cache length.
    ff_activation: activation of the dense feed-forward.
    ff_sparsity: N of `SparseFF` (0: dense feed-forward); must divide d_ff.
    ff_lowrank: controller width (None: d_ff // ff_sparsity).
    ff_temperature, ff_quant_prob: `SparseFF`'s training noise and share of
      straight-through batches.
    attention_sparsity: modules S of the sparse Q/K/V (0: dense attention);
      must divide d_model.
    attention_kernel_size: causal kernel over the length in sparse QKV.
    share_qk, output_layer_type, v_concat_type: options of
      `MultiplicativeConvCausalAttention`.
    loss_sparsity: modules of the sparse vocabulary projection (0: Dense);
      must divide vocab_size.
    loss_sparsity_type: 'mult' (the Terraformer's), or another type of
      `SparseDenseWithOptions`.
    mode: 'train', 'eval' or 'predict'.

  Returns:
    A layer (batch, length) int32 -> (batch, length, vocab_size) logits.
  """
  sparse_qkv.check_lm_arguments(
      mode, vocab_size=vocab_size, d_model=d_model, d_ff=d_ff,
      n_layers=n_layers, n_heads=n_heads, max_len=max_len)
  _check_sparsity('loss_sparsity', loss_sparsity, vocab_size, 'vocab_size')

  def block():
    return [
        model_lib.PreNormResidual(
            model_lib.LayerNorm(),
            AttentionBlock(d_model, n_heads, attention_sparsity,
                           attention_kernel_size, share_qk, output_layer_type,
                           v_concat_type, max_len, mode),
            tl.Dropout(rate=dropout, mode=mode)),
        model_lib.PreNormResidual(
            model_lib.LayerNorm(),
            FeedForwardBlock(d_model, d_ff, ff_sparsity, ff_lowrank,
                             ff_temperature, ff_quant_prob, ff_activation,
                             dropout, mode),
            tl.Dropout(rate=dropout, mode=mode)),
    ]

  return tl.Serial(
      model_lib.Embedding(vocab_size, d_model),
      tl.PositionalEncoding(max_len=max_len, mode=mode),
      [block() for _ in range(n_layers)],
      model_lib.LayerNorm(),
      sparse_qkv.SparseDenseWithOptions(
          vocab_size, d_input=d_model, sparsity_type=loss_sparsity_type,
          sparsity=loss_sparsity, mode=mode),
  )
