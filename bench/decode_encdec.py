r"""Per-token decoding time of the Terraformer encoder-decoder, unbatched.

Builds `terraformer.ConfigurableTerraformer` (dense, or with the Terraformer's
sparse layers: `SparseFF` and the sparse-QKV decoder attention) and times

  ours: the predict-mode model through `training.sampling.Sampler.decode`
        (the whole loop on the device); per token (T(warmup + tokens) -
        T(warmup)) / tokens, so encoding the inputs and the call overhead
        cancel; `encode_ms` is what is left of T(warmup) after its tokens:
        the inputs' encoding, the first call and its overhead;
  trax: trax 1.4.1's `ConfigurableTerraformer` with the same arguments
        (trax's `tl.Attention` in the encoder, `tl.CausalAttention` or
        `tl.MultiplicativeConvCausalAttention` in the decoder), decoded by
        `trax.supervised.decoding.autoregressive_sample_stream` with the
        same inputs: the median time between consecutive tokens after
        `warmup` tokens.

    python bench/decode_encdec.py                         # 'small' shape
    python bench/decode_encdec.py --shape=tiny --impls=ours,trax   # seconds

Weights are random (the speed does not depend on their values).  No SRU
branch and a dense vocabulary projection in both variants.
"""

import functools
import json
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import numpy as np

from bench import timing  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_enum('shape', 'small', ['small', 'tiny'], 'model size.')
flags.DEFINE_list('variants', ['dense', 'sparse'], 'dense and/or sparse.')
flags.DEFINE_list('impls', ['ours', 'trax'], 'ours and/or trax.')
flags.DEFINE_integer('input_len', 128, 'encoder input length (batch 1).')
flags.DEFINE_integer('warmup', 4, 'tokens decoded before timing.')
flags.DEFINE_integer('tokens', 12, 'tokens timed.')
flags.DEFINE_integer('repeats', 3, 'timing repeats (ours; the median is kept).')
flags.DEFINE_string('out_json', None, 'also write the results here.')

SHAPES = {
    'small': dict(vocab=32000, d_model=512, d_ff=2048, n_heads=8, layers=6,
                  max_len=256, ff_sparsity=64, attention_sparsity=16),
    'tiny': dict(vocab=64, d_model=32, d_ff=64, n_heads=2, layers=2,
                 max_len=64, ff_sparsity=4, attention_sparsity=4),
}
VARIANTS = ('dense', 'sparse')


def common_kwargs(shape, variant):
  s = SHAPES[shape]
  sparse = variant == 'sparse'
  return dict(input_vocab_size=s['vocab'], d_model=s['d_model'],
              d_ff=s['d_ff'], n_heads=s['n_heads'],
              n_encoder_layers=s['layers'], n_decoder_layers=s['layers'],
              dropout=0.0, max_len=s['max_len'], pos_type='fixed-base',
              ff_use_sru=0, ff_sparsity=s['ff_sparsity'] if sparse else 0)


def ours_kwargs(shape, variant):
  s = SHAPES[shape]
  kwargs = common_kwargs(shape, variant)
  kwargs['encoder_decoder_attention_type'] = (
      'sparse_qkv' if variant == 'sparse' else 'dense')
  kwargs['attention_sparsity'] = s['attention_sparsity']
  return kwargs


def trax_kwargs(shape, variant):
  from trax import layers as tl  # pylint: disable=g-import-not-at-top
  s = SHAPES[shape]
  cache = 2 * s['max_len']  # as ours (predict_cache_len None)
  if variant == 'sparse':
    decoder_attention = functools.partial(
        tl.MultiplicativeConvCausalAttention,
        sparsity=s['attention_sparsity'], length_kernel_size=3,
        max_inference_length=cache)
  else:
    decoder_attention = functools.partial(tl.CausalAttention,
                                          max_inference_length=cache)
  return dict(common_kwargs(shape, variant), encoder_attention_type=tl.Attention,
              encoder_decoder_attention_type=decoder_attention)


def time_ours(kwargs, inputs):
  from terraformer import terraformer  # pylint: disable=g-import-not-at-top
  from training import sampling  # pylint: disable=g-import-not-at-top
  from training import trainer  # pylint: disable=g-import-not-at-top
  eval_model = terraformer.ConfigurableTerraformer(mode='eval', **kwargs)
  signature = (trainer.input_signature(inputs.shape),
               trainer.input_signature((1, 1)))
  weights, _ = eval_model.init(signature, rng=jax.random.PRNGKey(0))
  sampler = sampling.Sampler(
      terraformer.ConfigurableTerraformer(mode='predict', **kwargs),
      batch_size=1, input_len=inputs.shape[1])
  weights = jax.device_put(weights)
  n0, n1 = FLAGS.warmup, FLAGS.warmup + FLAGS.tokens

  def run(n):
    t = time.perf_counter()
    sampler.decode(weights, inputs, n, temperature=0.0)  # returns numpy
    return time.perf_counter() - t

  run(n0), run(n1)  # compile both lengths
  t0, _, dt = timing.paired_times(run, n0, n1, FLAGS.repeats)
  per_token = dt / FLAGS.tokens
  return dict(params=trainer.count_params(weights), s_per_token=per_token,
              encode_s=t0 - n0 * per_token)


def time_trax(kwargs, inputs):
  from trax import shapes  # pylint: disable=g-import-not-at-top
  from trax.models.research import terraformer as trax_terraformer  # pylint: disable=g-import-not-at-top
  from trax.supervised import decoding  # pylint: disable=g-import-not-at-top
  model = trax_terraformer.ConfigurableTerraformer(mode='predict', **kwargs)
  model.init((shapes.ShapeDtype(inputs.shape, np.int32),
              shapes.ShapeDtype((1, 1), np.int32)))
  stream = decoding.autoregressive_sample_stream(
      model, inputs=inputs, batch_size=1, temperature=0.0)
  timing.stream_stamps(stream, FLAGS.warmup - 1)
  gaps = np.diff(timing.stream_stamps(stream, FLAGS.tokens + 1))
  return dict(s_per_token=float(np.median(gaps)))


def main(argv):
  del argv
  for v in FLAGS.variants:
    if v not in VARIANTS:
      raise app.UsageError(f'unknown variant {v!r}; known: {VARIANTS}')
  if FLAGS.warmup < 1 or FLAGS.tokens < 1:
    raise app.UsageError('--warmup and --tokens must be at least 1.')
  if FLAGS.input_len > SHAPES[FLAGS.shape]['max_len']:
    raise app.UsageError(f'--input_len ({FLAGS.input_len}) exceeds the '
                         f'shape\'s max_len ({SHAPES[FLAGS.shape]["max_len"]}).')
  device = jax.devices()[0]
  rng = np.random.default_rng(0)
  inputs = rng.integers(1, SHAPES[FLAGS.shape]['vocab'],
                        (1, FLAGS.input_len)).astype(np.int32)
  print(f'device: {device.platform} {device.device_kind}, {os.cpu_count()} '
        f'CPUs; shape {FLAGS.shape}, input_len {FLAGS.input_len}', flush=True)
  rows = []
  for variant in FLAGS.variants:
    row = dict(variant=variant)
    if 'ours' in FLAGS.impls:
      row['ours'] = time_ours(ours_kwargs(FLAGS.shape, variant), inputs)
      print(f"{variant:7s} ours {row['ours']['s_per_token'] * 1e3:8.3f} ms/token "
            f"(encode and first call {row['ours']['encode_s'] * 1e3:.1f} ms), "
            f"{row['ours']['params'] / 1e6:.1f}M params", flush=True)
    if 'trax' in FLAGS.impls:
      row['trax'] = time_trax(trax_kwargs(FLAGS.shape, variant), inputs)
      print(f"{variant:7s} trax {row['trax']['s_per_token'] * 1e3:8.3f} ms/token",
            flush=True)
    rows.append(row)

  print('\n| model | params | ours ms/token | vs dense | trax ms/token | vs dense | trax/ours |')
  print('|---|---|---|---|---|---|---|')
  base = rows[0]
  for row in rows:
    o, t = row.get('ours'), row.get('trax')
    cells = [row['variant']]
    cells += ([f"{o['params'] / 1e6:.0f}M", f"{o['s_per_token'] * 1e3:.3f}",
               f"{base['ours']['s_per_token'] / o['s_per_token']:.2f}x"]
              if o else ['', '', ''])
    cells += ([f"{t['s_per_token'] * 1e3:.3f}",
               f"{base['trax']['s_per_token'] / t['s_per_token']:.2f}x",
               f"{t['s_per_token'] / o['s_per_token']:.1f}x" if o else '']
              if t else ['', '', ''])
    print('| ' + ' | '.join(cells) + ' |')
  if FLAGS.out_json:
    with open(FLAGS.out_json, 'w') as f:
      json.dump(dict(device=f'{device.platform} {device.device_kind}',
                     cpus=os.cpu_count(), shape=FLAGS.shape,
                     input_len=FLAGS.input_len, rows=rows), f, indent=1)


if __name__ == '__main__':
  app.run(main)
