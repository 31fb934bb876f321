r"""Per-token decoding time, unbatched: the paper's Table 1 protocol.

"Sparse is Enough in Scaling Transformers" (Table 1) times one decoded token,
batch 1, after warm-up, for a dense model, +sparse FF, +sparse QKV and
+both.  This script builds those four decoder-only models at the paper's
800M-class shape (24 layers, d_model 1024, 16 heads, vocabulary 32000;
FF sparsity 64, QKV sparsity 16, kernel 3; d_ff 4096, raised to 6144 when
the QKV is sparse to give back the parameters that Q, K, V lose, as the
paper and trax's timing test do) and times

  ours: `terraformer.TerraformerLM` in predict mode through
        `training.sampling.Sampler` (the whole loop on the device); the
        per-token time is (T(warmup + tokens) - T(warmup)) / tokens, so the
        prompt and the call overhead cancel (the median over --repeats
        back-to-back pairs of the two calls);
  trax: trax 1.4.1's own `ConfigurableTransformerLM` with the same settings,
        decoded by `trax.supervised.decoding.autoregressive_sample_stream`
        (the time between consecutive tokens after `warmup` tokens).

With both, --rounds R times them alternately, R rounds back to back per
model (trax's later rounds continue its stream), and reports the medians of
the rounds and the median of the per-round trax/ours ratios: a shared
machine's bandwidth moves from minute to minute, and pairing the two
measurements keeps such a change from landing on one impl only.  With
--alternate_models every model is built first and each round times them
all in turn; the "vs dense" column is then the median of the per-round
ratios too.

It also measures the machine's memory bandwidth (the better of an XLA copy
of a large array, bytes read + written over time, and a matrix-vector
product over a large matrix, bytes read over time; read before each model
and after the last, the best kept) and reports each model's floor: the bytes of
weights one token must read (every weight, except that the embedding and
position tables give one row, and `SparseFF` reads only its chosen rows of W1
and W2) divided by that bandwidth.  Key/value-cache reads are reported apart.

    python bench/decode_speed.py                        # 800M, CPU or GPU
    python bench/decode_speed.py --shape=tiny --impls=ours,trax   # seconds
    python bench/decode_speed.py --dtype=bfloat16 --out_json=/tmp/d.json
    python bench/decode_speed.py --variants=dense --rounds=5   # paired

Weights are random: decoding speed does not depend on their values, except
through which units the sparse FF picks (any choice reads the same bytes).
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
from jax import numpy as jnp
import numpy as np

from bench import timing  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_enum('shape', '800m', ['800m', 'small', 'tiny'], 'model size.')
flags.DEFINE_list('variants', ['dense', 'sparse_ff', 'sparse_qkv', 'sparse_ff_qkv'],
                  'which models.')
flags.DEFINE_list('impls', ['ours', 'trax'], 'ours and/or trax.')
flags.DEFINE_integer('warmup', 4, 'tokens decoded before timing.')
flags.DEFINE_integer('tokens', 12, 'tokens timed.')
flags.DEFINE_integer('repeats', 3, 'timing repeats (ours: pairs of calls; the median difference is kept).')
flags.DEFINE_integer('rounds', 1, 'with both impls: time ours and trax '
                     'alternately this many times per model (each round '
                     'both, back to back) and report the median of the '
                     'rounds and of their trax/ours ratios.')
flags.DEFINE_bool('alternate_models', False, 'build every model first, then '
                  'time them in turn in each of the --rounds; "vs dense" is '
                  'then the median of the per-round ratios to the first model '
                  '(holds all the models in memory at once).')
flags.DEFINE_integer('max_len', 256, 'predict-mode cache length (both impls).')
flags.DEFINE_integer('batch', 1, 'sequences decoded together.')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'weight dtype (ours).')
flags.DEFINE_integer('bandwidth_mib', 1024, 'array size for the bandwidth test.')
flags.DEFINE_string('out_json', None, 'also write the results here.')
flags.DEFINE_enum('one_row_gemm', 'auto', ['auto', 'on', 'off'],
                  'training.model.ONE_ROW_AS_GEMM: how Dense multiplies one '
                  'row (auto: a two-row GEMM off the CPU).')
flags.DEFINE_bool('cpu_kernels_out_in', True, 'On a CPU, hand Dense layers their kernels transposed (training.sampling.CPU_KERNELS_OUT_IN).')
flags.DEFINE_enum('one_query_gpu', None, ['pallas', 'xla'], 'Off a CPU, a decoding step\'s cache update and attention (training.model.ONE_QUERY_GPU; default: its value).')
flags.DEFINE_bool('decoding_forms', True, 'Hand layers that offer one their weights in a decoding form (training.sampling.DECODING_FORMS): ConvQKV its kernels side by side.')
flags.DEFINE_bool('fused_decoding_gpu', None, 'Off a CPU, run the dense decoder\'s pre-norm blocks as fused products (training.model.FUSED_DECODING_GPU; default: its value).')
flags.DEFINE_bool('fused_sparse_ff_gpu', None, 'Off a CPU, with the fused blocks, run SparseFF\'s decoding step as its per-block kernel (terraformer.sparse_ff.FUSED_DECODING_GPU; default: its value).')
flags.DEFINE_bool('fused_sparse_qkv_gpu', None, 'Off a CPU, with the fused blocks, run the sparse-QKV attention\'s decoding step as its three kernels (terraformer.sparse_qkv.FUSED_DECODING_GPU; default: its value).')
flags.DEFINE_bool('gpu_kernels_out_in', True, 'Off a CPU, hand Dense layers their kernels transposed too (training.sampling.GPU_KERNELS_OUT_IN).')
flags.DEFINE_list('out_in_tiling', [], 'block_n,block_k,num_warps overriding '
                  'training.gemv.default_tiling_out_in for every out-in '
                  'kernel (0 keeps that default; block_k: the largest power '
                  'of 2 up to it dividing d_in), to compare '
                  'tilings in whole models.')
flags.DEFINE_string('one_row_gpu', '',
                    'Overrides of training.model.ONE_ROW_GPU_FORMS, e.g. '
                    '"ff=gemv,attention=gemv,head=gemv" (training.model.ONE_ROW_FORMS).')

SHAPES = {
    '800m': dict(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16,
                 d_ff_dense=4096, d_ff_sparse=6144, ff_sparsity=64,
                 attention_sparsity=16),
    'small': dict(vocab_size=8000, d_model=512, n_layers=8, n_heads=8,
                  d_ff_dense=2048, d_ff_sparse=3072, ff_sparsity=32,
                  attention_sparsity=8),
    'tiny': dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4,
                 d_ff_dense=256, d_ff_sparse=384, ff_sparsity=8,
                 attention_sparsity=4),
}
VARIANTS = {  # (sparse FF, sparse QKV)
    'dense': (False, False),
    'sparse_ff': (True, False),
    'sparse_qkv': (False, True),
    'sparse_ff_qkv': (True, True),
}


def model_kwargs(shape, variant):
  s = SHAPES[shape]
  ff, qkv = VARIANTS[variant]
  return dict(vocab_size=s['vocab_size'], d_model=s['d_model'],
              n_layers=s['n_layers'], n_heads=s['n_heads'],
              d_ff=s['d_ff_sparse'] if qkv else s['d_ff_dense'],
              ff_sparsity=s['ff_sparsity'] if ff else 0,
              attention_sparsity=s['attention_sparsity'] if qkv else 0,
              attention_kernel_size=3)


def memory_bandwidth(mib):
  """Bytes per second, the better of two XLA measurements on `mib` MiB:
  a copy (bytes read + written) and a matrix-vector product (bytes read;
  on a CPU XLA spreads a dot over all cores but a copy may use one)."""
  n = mib * 2**20 // 4
  x = jnp.ones((n,), jnp.float32)
  copy = 2 * n * 4 / timing.best_time(jax.jit(lambda a: a * 1.0001), x)[0]
  m = jnp.ones((n // 4096, 4096), jnp.float32)
  v = jnp.ones((4096,), jnp.float32)
  matvec = n * 4 / timing.best_time(jax.jit(lambda a, b: a @ b), m, v)[0]
  del x, m
  return max(copy, matvec), copy, matvec


def bytes_per_token(model, dtype=None):
  """(weight bytes one decoded token reads, key/value-cache bytes it reads),
  the float arrays counted in `dtype` (the Sampler's compute_dtype) if given."""
  from trax.layers import attention as tl_attention  # pylint: disable=g-import-not-at-top
  from trax.layers import core as tl_core  # pylint: disable=g-import-not-at-top
  from terraformer import sparse_ff  # pylint: disable=g-import-not-at-top

  def item(a):  # bytes per element as decoding holds the array
    if dtype is not None and jnp.issubdtype(a.dtype, jnp.floating):
      return jnp.dtype(dtype).itemsize
    return a.dtype.itemsize

  def weights_bytes(layer):
    if isinstance(layer, (tl_core.Embedding, tl_attention.PositionalEncoding)):
      w = jax.tree_util.tree_leaves(layer.weights)
      return sum(a.shape[-1] * item(a) for a in w)  # one row
    if isinstance(layer, sparse_ff.SparseFF):
      m1, m2, mb, w1, w2, b2 = layer.weights
      d1, _, d_model = w1.shape
      dense = sum(a.size * item(a) for a in (m1, m2, mb, b2))
      return dense + d1 * d_model * (item(w1) + item(w2))
    if layer.sublayers:
      return sum(weights_bytes(s) for s in layer.sublayers)
    return sum(a.size * item(a)
               for a in jax.tree_util.tree_leaves(layer.weights))

  def cache_bytes(layer):
    own = 0
    state = layer.state
    if (not layer.sublayers and isinstance(state, tuple) and len(state) == 3
        and getattr(state[0], 'ndim', 0) >= 3):  # (keys, values, index)
      own = state[0].size * item(state[0]) * 2
    return own + sum(cache_bytes(s) for s in layer.sublayers)

  return weights_bytes(model), cache_bytes(model)


def set_one_row_gemm():
  """Applies --one_row_gemm to training.model.ONE_ROW_AS_GEMM."""
  from training import model as model_lib  # pylint: disable=g-import-not-at-top
  model_lib.ONE_ROW_AS_GEMM = {'auto': None, 'on': True, 'off': False}[FLAGS.one_row_gemm]
  for item in filter(None, FLAGS.one_row_gpu.split(',')):
    role, form = item.split('=')
    if role not in model_lib.ONE_ROW_GPU_FORMS or form not in model_lib.ONE_ROW_FORMS:
      raise ValueError(f'--one_row_gpu: {item!r}: roles '
                       f'{sorted(model_lib.ONE_ROW_GPU_FORMS)}, forms {model_lib.ONE_ROW_FORMS}')
    model_lib.ONE_ROW_GPU_FORMS[role] = form


def compute_dtype():
  """The Sampler's compute_dtype that --dtype names (None: float32)."""
  return None if FLAGS.dtype == 'float32' else jnp.bfloat16


def set_out_in_tiling(block_n, block_k, num_warps):
  """Makes training.gemv's default out-in tiling (block_n, block_k,
  num_warps), each 0 keeping the default; block_k the largest power of 2
  up to the one given that divides the kernel's d_in."""
  from training import gemv as gemv_lib  # pylint: disable=g-import-not-at-top
  library = gemv_lib.default_tiling_out_in
  library = getattr(library, 'library', library)  # not an earlier override
  powers = [2 ** i for i in reversed(range(block_k.bit_length()))]

  def tiling(d_out, d_in):
    n, k, w = library(d_out, d_in)
    if block_k:
      k = gemv_lib._largest_divisor(d_in, powers)  # pylint: disable=protected-access
    return block_n or n, k, num_warps or w
  tiling.library = library
  gemv_lib.default_tiling_out_in = tiling


def build_ours(kwargs, dtype=None):
  """(predict-mode TerraformerLM, its Sampler, its weights on the device)."""
  from terraformer import models  # pylint: disable=g-import-not-at-top
  from training import sampling  # pylint: disable=g-import-not-at-top
  from training import trainer  # pylint: disable=g-import-not-at-top
  model = models.TerraformerLM(mode='predict', max_len=FLAGS.max_len, **kwargs)
  sampling.CPU_KERNELS_OUT_IN = FLAGS.cpu_kernels_out_in
  sampling.GPU_KERNELS_OUT_IN = FLAGS.gpu_kernels_out_in
  sampling.DECODING_FORMS = FLAGS.decoding_forms
  from training import model as model_lib  # pylint: disable=g-import-not-at-top
  if FLAGS.one_query_gpu:
    model_lib.ONE_QUERY_GPU = FLAGS.one_query_gpu
  if FLAGS.fused_decoding_gpu is not None:
    model_lib.FUSED_DECODING_GPU = FLAGS.fused_decoding_gpu
  from terraformer import sparse_ff  # pylint: disable=g-import-not-at-top
  if FLAGS.fused_sparse_ff_gpu is not None:
    sparse_ff.FUSED_DECODING_GPU = FLAGS.fused_sparse_ff_gpu
  if FLAGS.fused_sparse_qkv_gpu is not None:
    from terraformer import sparse_qkv  # pylint: disable=g-import-not-at-top
    sparse_qkv.FUSED_DECODING_GPU = FLAGS.fused_sparse_qkv_gpu
  if FLAGS.out_in_tiling:
    set_out_in_tiling(*map(int, FLAGS.out_in_tiling))
  sampler = sampling.Sampler(model, batch_size=FLAGS.batch, compute_dtype=dtype)
  weights = jax.device_put(trainer.cast_floats(model.weights, dtype))
  return model, sampler, weights


def ours_timer(kwargs, dtype):
  """(facts about our model, measure, last): measure() times one round, in
  seconds per token (the median of --repeats pairs, see the module docstring),
  and leaves that round's seconds per call in last['s_per_call']."""
  from training import trainer  # pylint: disable=g-import-not-at-top
  model, sampler, weights = build_ours(kwargs, dtype)
  params = trainer.count_params(model.weights)
  w_bytes, c_bytes = bytes_per_token(model, dtype)
  prompt = np.zeros((FLAGS.batch, 1), np.int32)
  n0, n1 = FLAGS.warmup, FLAGS.warmup + FLAGS.tokens

  def run(n):
    t = time.perf_counter()
    sampler.generate(weights, prompt, n, temperature=0.0)  # returns numpy
    return time.perf_counter() - t

  run(n0), run(n1)  # compile both lengths
  last = {}

  def measure():
    _, t1, dt = timing.paired_times(run, n0, n1, FLAGS.repeats)
    last['s_per_call'] = t1 / n1
    return dt / FLAGS.tokens

  facts = dict(params=params, weight_bytes=w_bytes, cache_bytes=c_bytes)
  return facts, measure, last


def trax_timer(kwargs):
  """measure: each call takes the next --tokens + 1 tokens of one trax
  decoding stream (after --warmup untimed ones) and returns the median gap
  between consecutive tokens, in seconds, and their mean."""
  from trax import layers as tl  # pylint: disable=g-import-not-at-top
  from trax import shapes  # pylint: disable=g-import-not-at-top
  from trax.models.research import configurable_transformer as ct  # pylint: disable=g-import-not-at-top
  from trax.supervised import decoding  # pylint: disable=g-import-not-at-top
  if kwargs['attention_sparsity']:
    attention = functools.partial(
        tl.MultiplicativeConvCausalAttention,
        sparsity=kwargs['attention_sparsity'],
        length_kernel_size=kwargs['attention_kernel_size'],
        max_inference_length=FLAGS.max_len)
  else:
    attention = functools.partial(tl.CausalAttention,
                                  max_inference_length=FLAGS.max_len)
  model = ct.ConfigurableTransformerLM(
      kwargs['vocab_size'], d_model=kwargs['d_model'], d_ff=kwargs['d_ff'],
      n_layers=kwargs['n_layers'], n_heads=kwargs['n_heads'],
      max_len=FLAGS.max_len, dropout=0.0, ff_dropout=0.0, mode='predict',
      ff_sparsity=kwargs['ff_sparsity'], attention_type=attention)
  model.init(shapes.ShapeDtype((FLAGS.batch, 1), np.int32))
  stream = decoding.autoregressive_sample_stream(
      model, batch_size=FLAGS.batch, temperature=0.0)

  timing.stream_stamps(stream, FLAGS.warmup - 1)

  def measure():
    gaps = np.diff(timing.stream_stamps(stream, FLAGS.tokens + 1))
    return float(np.median(gaps)), float(np.mean(gaps))

  return measure


def main(argv):
  del argv
  for v in FLAGS.variants:
    if v not in VARIANTS:
      raise app.UsageError(f'unknown variant {v!r}; known: {sorted(VARIANTS)}')
  if FLAGS.rounds < 1:
    raise app.UsageError('--rounds must be at least 1.')
  if ('trax' in FLAGS.impls
      and FLAGS.warmup + FLAGS.rounds * (FLAGS.tokens + 1) > FLAGS.max_len):
    raise app.UsageError(
        f'trax decodes --warmup + --rounds * (--tokens + 1) = '
        f'{FLAGS.warmup + FLAGS.rounds * (FLAGS.tokens + 1)} tokens in one '
        f'stream, more than --max_len ({FLAGS.max_len}); lower one of them.')
  dtype = compute_dtype()
  set_one_row_gemm()
  device = jax.devices()[0]
  bw, copy_bw, matvec_bw = memory_bandwidth(FLAGS.bandwidth_mib)
  print(f'device: {device.platform} {device.device_kind}, {os.cpu_count()} CPUs; '
        f'memory bandwidth {copy_bw / 1e9:.1f} GB/s (copy), {matvec_bw / 1e9:.1f} '
        f'GB/s (matvec); shape {FLAGS.shape}, batch '
        f'{FLAGS.batch}, cache {FLAGS.max_len}, ours in {FLAGS.dtype}', flush=True)
  rows = []
  readings = [(copy_bw, matvec_bw)]

  def build(variant):
    """(row, ours timer or None, ours' last round, trax timer or None)."""
    kwargs = model_kwargs(FLAGS.shape, variant)
    row = dict(variant=variant, **kwargs)
    ours = trax = ours_last = None
    if 'ours' in FLAGS.impls:
      facts, ours, ours_last = ours_timer(kwargs, dtype)
      row['ours'] = dict(facts, rounds=[])
    if 'trax' in FLAGS.impls:
      trax = trax_timer(kwargs)
      row['trax'] = dict(rounds=[], rounds_mean=[])
    return row, ours, ours_last, trax

  def one_round(row, ours, trax, r):
    tag = f' (round {r + 1}/{FLAGS.rounds})' if FLAGS.rounds > 1 else ''
    if ours:
      o = ours()
      row['ours']['rounds'].append(o)
      print(f"{row['variant']:14s} ours {o * 1e3:8.3f} ms/token, "
            f"{row['ours']['params'] / 1e6:6.1f}M params, reads "
            f"{row['ours']['weight_bytes'] / 1e6:7.1f} MB weights + "
            f"{row['ours']['cache_bytes'] / 1e6:5.1f} MB cache{tag}", flush=True)
    if trax:
      t, t_mean = trax()
      row['trax']['rounds'].append(t)
      row['trax']['rounds_mean'].append(t_mean)
      print(f"{row['variant']:14s} trax {t * 1e3:8.3f} ms/token{tag}", flush=True)

  # Rounds alternate the impls (and with --alternate_models the models too),
  # so that a shared machine's slow and fast minutes fall on all of them.
  if FLAGS.alternate_models:
    built = [build(v) for v in FLAGS.variants]
    for r in range(FLAGS.rounds):
      for row, ours, _, trax in built:
        one_round(row, ours, trax, r)
  else:
    built = []
    for i, variant in enumerate(FLAGS.variants):
      if i:
        readings.append(memory_bandwidth(FLAGS.bandwidth_mib)[1:])
      built.append(build(variant))
      row, ours, _, trax = built[-1]
      for r in range(FLAGS.rounds):
        one_round(row, ours, trax, r)
  for row, ours, ours_last, trax in built:
    if ours:
      row['ours']['s_per_token'] = float(np.median(row['ours']['rounds']))
      row['ours']['s_per_call'] = ours_last['s_per_call']
      if FLAGS.alternate_models:  # the first model's time over this one's
        first = built[0][0]['ours']['rounds']
        row['ours']['vs_first'] = float(np.median(
            [f / o for f, o in zip(first, row['ours']['rounds'])]))
    if trax:
      row['trax']['s_per_token'] = float(np.median(row['trax']['rounds']))
      row['trax']['s_per_token_mean'] = float(np.mean(row['trax']['rounds_mean']))
      if FLAGS.alternate_models:
        first = built[0][0]['trax']['rounds']
        row['trax']['vs_first'] = float(np.median(
            [f / t for f, t in zip(first, row['trax']['rounds'])]))
    if ours and trax:
      row['trax_over_ours'] = float(np.median(
          [t / o for t, o in zip(row['trax']['rounds'], row['ours']['rounds'])]))
    rows.append(row)

  # A shared machine's bandwidth moves from minute to minute: the floor uses
  # the best of the readings taken before each model and after the last.
  readings.append(memory_bandwidth(FLAGS.bandwidth_mib)[1:])
  copy_bw = max(c for c, _ in readings)
  matvec_bw = max(m for _, m in readings)
  bw = max(copy_bw, matvec_bw)
  print('memory bandwidth readings (copy / matvec GB/s): ' + ', '.join(
      f'{c / 1e9:.1f} / {m / 1e9:.1f}' for c, m in readings), flush=True)
  for row in rows:
    if 'ours' in row:
      row['ours']['floor_s'] = row['ours']['weight_bytes'] / bw

  print('\n| model | params | ours ms/token | vs dense | floor ms | ours/floor '
        '| trax ms/token | vs dense | trax/ours |')
  print('|---|---|---|---|---|---|---|---|---|')
  base = rows[0]
  for row in rows:
    cells = [row['variant']]
    o, t = row.get('ours'), row.get('trax')
    if o:
      bo = base['ours']['s_per_token']
      cells += [f"{o['params'] / 1e6:.0f}M", f"{o['s_per_token'] * 1e3:.3f}",
                f"{o.get('vs_first', bo / o['s_per_token']):.2f}x",
                f"{o['floor_s'] * 1e3:.3f}",
                f"{o['s_per_token'] / o['floor_s']:.2f}"]
    else:
      cells += ['', '', '', '', '']
    if t:
      bt = base['trax']['s_per_token']
      cells += [f"{t['s_per_token'] * 1e3:.3f}",
                f"{t.get('vs_first', bt / t['s_per_token']):.2f}x",
                f"{row['trax_over_ours']:.1f}x" if o else '']
    else:
      cells += ['', '', '']
    print('| ' + ' | '.join(cells) + ' |')
  if FLAGS.out_json:
    with open(FLAGS.out_json, 'w') as f:
      json.dump(dict(device=f'{device.platform} {device.device_kind}',
                     cpus=os.cpu_count(), bandwidth=bw, copy_bandwidth=copy_bw,
                     bandwidth_readings=readings,
                     matvec_bandwidth=matvec_bw, dtype=FLAGS.dtype,
                     max_len=FLAGS.max_len, batch=FLAGS.batch, rows=rows), f, indent=1)


if __name__ == '__main__':
  app.run(main)
