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

Most variants keep the baseline's parameter count (matched='params').  The
Transformer's relatives from blocks/ are matched otherwise: Switch FF with
N experts (each as wide as the dense FF: the same FLOPs per token, about N
times the FF parameters) and ALBERT-style sharing (the same FLOPs, one block's
weights) are matched='flops'; MLP-Mixer and gMLP (a different model
function, `Variant.model`) take the baseline's d_model, d_ff, n_layers,
max_len and dropout (matched='size').
"""

import collections
import functools
import inspect

import gin
from trax import layers as tl

from blocks import mixing
from blocks import sharing
from blocks import switch
from primer_trax import layers
from primer_trax import variants
from training import model as model_lib

# The baseline's value of every switch a variant may change.
BASELINE_SWITCHES = dict(
    activation=tl.Gelu, qkv_layer=None, ff_layer=None,
    norm=model_lib.LayerNorm, residual='prenorm', token_shift=False,
    attention_layer=None)

PRIMER_VERSIONS = ('ez', 'full')

Variant = collections.namedtuple('Variant', 'description switches model matched',
                                 defaults=(None, 'params'))
Variant.__doc__ = """description; switches: DecoderLM arguments it changes;
model: None (DecoderLM) or a model function given the baseline's size
(`baseline_size`) and `switches`; matched: what it shares with the baseline,
'params', 'flops' or 'size' (see the module docstring)."""
MATCHES = ('params', 'flops', 'size')


def _switch(n_experts):
  return Variant(f'Switch FF, {n_experts} experts of width d_ff (same FLOPs per '
                 'token), capacity factor 1.25, aux loss 0.01',
                 dict(ff_layer=functools.partial(switch.SwitchFF,
                                                 n_experts=n_experts)),
                 matched='flops')

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
    'switch_2': _switch(2),
    'switch_4': _switch(4),
    'switch_8': _switch(8),
    'shared': Variant('ALBERT-style sharing: every layer applies one block\'s '
                      'weights (blocks.SharedDecoderLM)', {},
                      model=sharing.SharedDecoderLM, matched='flops'),
    'shared_norms': Variant('ALBERT-style sharing with separate norms per layer',
                            {}, model=functools.partial(sharing.SharedDecoderLM,
                                                        separate_norms=True),
                            matched='flops'),
    'mixer': Variant('causal MLP-Mixer LM, no attention (blocks.MixerLM)', {},
                     model=mixing.MixerLM, matched='size'),
    'gmlp': Variant('causal gMLP LM, no attention (blocks.GatedMLPLM)', {},
                    model=mixing.GatedMLPLM, matched='size'),
}
SIZE_ARGS = ('d_model', 'd_ff', 'n_layers', 'max_len', 'dropout')


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
  v = VARIANTS[variant]
  if v.model is None:
    switches = dict(BASELINE_SWITCHES, **v.switches)
    return model_lib.DecoderLM(vocab_size, mode=mode, **dict(kwargs, **switches))
  if _is_decoder_lm(v.model):  # e.g. SharedDecoderLM: DecoderLM's arguments
    switches = dict(BASELINE_SWITCHES, **v.switches)
    return v.model(vocab_size, mode=mode, **dict(kwargs, **switches))
  return v.model(vocab_size, mode=mode, **dict(baseline_size(kwargs), **v.switches))


def _is_decoder_lm(model_fn):
  fn = model_fn.func if isinstance(model_fn, functools.partial) else model_fn
  return fn is sharing.SharedDecoderLM


def baseline_size(kwargs):
  """The baseline's d_model, d_ff, n_layers, max_len, dropout: from kwargs,
  else gin's bindings of training.DecoderLM, else DecoderLM's defaults."""
  params = inspect.signature(model_lib.DecoderLM).parameters
  size = {}
  for name in SIZE_ARGS:
    if name in kwargs:
      size[name] = kwargs[name]
      continue
    try:
      size[name] = gin.query_parameter(f'training.DecoderLM.{name}')
    except ValueError:
      size[name] = params[name].default
  return size


@gin.configurable(module='primer_trax')
def PrimerLM(vocab_size, version='ez', mode='train', **kwargs):
  """Primer-EZ ('ez') or full Primer ('full'); see the module docstring.

  (batch, length) int32 -> (batch, length, vocab_size) logits.
  """
  if version not in PRIMER_VERSIONS:
    raise ValueError(f'version must be one of {PRIMER_VERSIONS}, not {version!r}.')
  return VariantLM(vocab_size, 'primer_ez' if version == 'ez' else 'primer',
                   mode=mode, **kwargs)
