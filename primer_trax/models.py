"""Primer language models and the ablation lab's named variants.

Every model here is `training.model.DecoderLM` with some of its switches set;
its size (d_model, d_ff, n_layers, n_heads, max_len, dropout) comes from the
caller or from gin bindings of `training.DecoderLM`.

  PrimerLM(version='ez'):   squared ReLU + multi-DConv-head attention.
  PrimerLM(version='full'): also the shared Q/K representation and
      PrePostNorm residuals (official medium_primer.gin: attention pre-norm,
      feed-forward x + drop(norm(f(x)))).  Primer's own norm
      (x - mean) * rsqrt(E[x (x - mean)] + eps) equals LayerNorm, so it is
      LayerNorm.  The T2T search space's 12x FFN is not applied (the official
      T5 configs keep d_ff); set d_ff for it.
  VariantLM(variant=NAME): the baseline with exactly the changes VARIANTS[NAME]
      lists; every other switch is held at the baseline's value, whatever gin
      binds for DecoderLM's switches.
"""

import collections

import gin
from trax import layers as tl

from primer_trax import layers
from primer_trax import variants
from training import model as model_lib

# The baseline's value of every switch a variant may change.
BASELINE_SWITCHES = dict(
    activation=tl.Gelu, qkv_layer=None, ff_layer=None,
    norm=model_lib.LayerNorm, residual='prenorm', token_shift=False,
    attention_layer=None)

PRIMER_VERSIONS = ('ez', 'full')

Variant = collections.namedtuple('Variant', 'description switches')

_PRIMER_EZ = dict(activation=layers.SquaredRelu, qkv_layer=layers.MultiDConv)
_PRIMER_FULL = dict(_PRIMER_EZ, attention_layer=variants.SharedQKAttention,
                    residual='prepost')

VARIANTS = {
    'baseline': Variant('pre-norm GELU Transformer (training.model.DecoderLM)', {}),
    'squared_relu': Variant('feed-forward activation max(x, 0)^2',
                            dict(activation=layers.SquaredRelu)),
    'dconv': Variant('causal depthwise conv (width 3) on Q, K, V (MDHA alone)',
                     dict(qkv_layer=layers.MultiDConv)),
    'primer_ez': Variant('Primer-EZ: squared ReLU + MDHA', _PRIMER_EZ),
    'primer': Variant('full Primer: Primer-EZ + shared QK + pre/post norm',
                      _PRIMER_FULL),
    'token_shift': Variant('half the channels shifted by one token in each branch',
                           dict(token_shift=True)),
    'geglu': Variant('GEGLU feed-forward, hidden 2/3 d_ff (rounded to 8), no biases',
                     dict(ff_layer=variants.GatedFeedForward, activation=tl.Gelu)),
    'swiglu': Variant('SwiGLU feed-forward, hidden 2/3 d_ff (rounded to 8), no biases',
                      dict(ff_layer=variants.GatedFeedForward, activation=tl.Swish)),
    'relu2_glu': Variant('squared-ReLU GLU feed-forward, hidden 2/3 d_ff, no biases',
                         dict(ff_layer=variants.GatedFeedForward,
                              activation=layers.SquaredRelu)),
    'rezero': Variant('ReZero residuals x + a F(x), a = 0 at init, no block norms',
                      dict(residual='rezero')),
    'rmsnorm': Variant('RMSNorm instead of LayerNorm', dict(norm=variants.RMSNorm)),
    'transformer_pp': Variant('Transformer++: SwiGLU + RMSNorm',
                              dict(ff_layer=variants.GatedFeedForward,
                                   activation=tl.Swish, norm=variants.RMSNorm)),
}


def check_variants(names):
  """Raises ValueError naming the known variants if any name is unknown."""
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise ValueError(f'Unknown variant(s) {", ".join(map(repr, unknown))}; '
                     f'known variants: {", ".join(VARIANTS)}.')


@gin.configurable(module='primer_trax')
def VariantLM(vocab_size, variant='baseline', mode='train', **kwargs):
  """The baseline DecoderLM with one named variant's changes (see VARIANTS).

  (batch, length) int32 -> (batch, length, vocab_size) logits.  kwargs (and
  gin bindings of training.DecoderLM) set the size; the switches are the
  baseline's except those the variant changes.
  """
  check_variants([variant])
  switches = dict(BASELINE_SWITCHES, **VARIANTS[variant].switches)
  return model_lib.DecoderLM(vocab_size, mode=mode, **dict(kwargs, **switches))


@gin.configurable(module='primer_trax')
def PrimerLM(vocab_size, version='ez', mode='train', **kwargs):
  """Primer-EZ ('ez') or full Primer ('full'); see the module docstring.

  (batch, length) int32 -> (batch, length, vocab_size) logits.
  """
  if version not in PRIMER_VERSIONS:
    raise ValueError(f'version must be one of {PRIMER_VERSIONS}, not {version!r}.')
  return VariantLM(vocab_size, 'primer_ez' if version == 'ez' else 'primer',
                   mode=mode, **kwargs)
