"""Memory of one jitted training step: reversible depth scaling, longest sequence.

Two modes.

--mode depth: a decoder LM made of the Terraformer's reversible blocks
(`terraformer.reversible.DecoderBlock`: attention half residual + feed-forward
half residual, two streams averaged at the end) at each depth in --depths,
built three ways with the same weights:
  reversible  terraformer.reversible.ReversibleSerial (backward recomputes);
  plain       the same blocks differentiated ordinarily
              (terraformer.reversible.NonReversibleSerial);
  standard    training.model.DecoderLM of the same width (pre-norm residual).
For each it compiles `training.trainer.make_train_step` (Adam) and reports
XLA's `compiled.memory_analysis()`: argument bytes (weights, Adam slots,
batch), temp bytes, and the estimated peak (arguments + outputs - aliased +
temp).  "act" is the activation part of temp: temp at the given batch minus
temp of the same model at batch 1 x 8 tokens (whose activations are
negligible), so weight-sized temporaries (gradients) cancel.  "act growth" is
act / act at the previous depth - 1: the issue's target is <= 10% per depth
doubling for the reversible stack.  On a GPU each configuration also runs one
step in a fresh process (--isolate, default on GPU) and reports
`memory_stats()['peak_bytes_in_use']`.

--mode maxlen: the longest sequence (batch --batch) for which one training
step of a causal reversible LM fits, with dense attention
(training.model.CausalSelfAttention) and with LSH attention
(--lsh_impl ours: terraformer.lsh.LSHSelfAttention; trax: trax's
tl.LSHSelfAttention; both with trax's constructor arguments).  Lengths double
from --min_len up to --max_len, then --refine bisection steps between the
last fit and the first failure (in multiples of --chunk_len).  "Fits" is
--fit_by run (one step executes without running out of memory; each length in
a fresh process with --isolate) or estimate (the compiled peak estimate is
below --memory_limit_gb; the default on a CPU, where running out of memory is
not a clean error).

Usage (CPU, tiny):
  PYTHONPATH=. python bench/memory.py --mode depth --depths 2,4 --d_model 32 \
      --d_ff 64 --n_heads 2 --seq 128 --batch 2
  PYTHONPATH=. python bench/memory.py --mode maxlen --d_model 32 --d_ff 64 \
      --n_heads 2 --min_len 256 --max_len 4096 --memory_limit_gb 0.05
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

# Measure against the whole device: no preallocation (also in the child
# processes, which inherit the environment); the parent then holds almost
# nothing while a child runs.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEPTH_VARIANTS = ('reversible', 'plain', 'standard')
ATTENTIONS = ('dense', 'lsh')
MB = 2.0 ** 20


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--mode', default='depth', choices=('depth', 'maxlen'))
  p.add_argument('--depths', default='2,4,8,16',
                 help='depth mode: comma list of layer counts')
  p.add_argument('--variants', default=','.join(DEPTH_VARIANTS),
                 help='depth mode: comma list of ' + ', '.join(DEPTH_VARIANTS))
  p.add_argument('--attentions', default=','.join(ATTENTIONS),
                 help='maxlen mode: comma list of ' + ', '.join(ATTENTIONS))
  p.add_argument('--vocab', type=int, default=256)
  p.add_argument('--d_model', type=int, default=512)
  p.add_argument('--d_ff', type=int, default=2048)
  p.add_argument('--n_heads', type=int, default=8)
  p.add_argument('--n_layers', type=int, default=2,
                 help='maxlen mode: decoder blocks')
  p.add_argument('--seq', type=int, default=1024, help='depth mode: length')
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--dtype', default='bfloat16',
                 choices=('bfloat16', 'float32'), help='compute dtype')
  p.add_argument('--min_len', type=int, default=1024)
  p.add_argument('--max_len', type=int, default=131072)
  p.add_argument('--refine', type=int, default=0,
                 help='maxlen mode: bisection steps after doubling')
  p.add_argument('--fit_by', default=None, choices=('run', 'estimate'),
                 help="default: 'run' on GPU/TPU, 'estimate' on CPU")
  p.add_argument('--memory_limit_gb', type=float, default=None,
                 help="budget for --fit_by estimate (default: the device's "
                      'bytes_limit, else 16)')
  p.add_argument('--lsh_impl', default='ours', choices=('ours', 'trax'))
  p.add_argument('--chunk_len', type=int, default=128, help='LSH chunk_len')
  p.add_argument('--n_hashes', type=int, default=1, help='LSH n_hashes')
  p.add_argument('--isolate', default=None, choices=('yes', 'no'),
                 help='each measurement in a fresh process (default: yes on '
                      'GPU/TPU, no on CPU)')
  p.add_argument('--out_json', default=None)
  p.add_argument('--_one', default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.depths = [int(d) for d in args.depths.split(',') if d]
  args.variants = [v for v in args.variants.split(',') if v]
  args.attentions = [a for a in args.attentions.split(',') if a]
  for v in args.variants:
    if v not in DEPTH_VARIANTS:
      p.error(f'--variants: unknown {v!r}; choose from {DEPTH_VARIANTS}')
  for a in args.attentions:
    if a not in ATTENTIONS:
      p.error(f'--attentions: unknown {a!r}; choose from {ATTENTIONS}')
  for name in ('vocab', 'd_model', 'd_ff', 'n_heads', 'n_layers', 'seq',
               'batch', 'min_len', 'max_len', 'chunk_len', 'n_hashes'):
    if getattr(args, name) < 1:
      p.error(f'--{name} must be >= 1')
  if any(d < 1 for d in args.depths):
    p.error('--depths must be positive integers')
  if args.d_model % args.n_heads:
    p.error('--n_heads must divide --d_model')
  if args.min_len > args.max_len:
    p.error('--min_len must be <= --max_len')
  return args


# ------------------------------------------------------------------ models

def reversible_lm(cfg, n_layers, max_len, stack, attention='dense'):
  """ids (b, t) -> logits (b, t, vocab): embedding, two streams through
  `n_layers` reversible decoder blocks, average, norm, projection."""
  from trax import layers as tl  # pylint: disable=g-import-not-at-top
  from terraformer import reversible  # pylint: disable=g-import-not-at-top
  from training import model as M  # pylint: disable=g-import-not-at-top
  d, heads = cfg['d_model'], cfg['n_heads']

  def attention_fn():
    if attention == 'dense':
      return M.CausalSelfAttention(d, heads, max_len=max_len)
    kwargs = dict(n_heads=heads, d_qk=d // heads, d_v=d // heads, causal=True,
                  chunk_len=cfg['chunk_len'], n_hashes=cfg['n_hashes'])
    if cfg['lsh_impl'] == 'trax':
      return tl.LSHSelfAttention(**kwargs)
    from terraformer import lsh  # pylint: disable=g-import-not-at-top
    return lsh.LSHSelfAttention(**kwargs)

  def feed_forward_fn():
    return tl.Serial(M.LayerNorm(), M.FeedForward(d, cfg['d_ff'], tl.Relu))

  blocks = [reversible.DecoderBlock(attention_fn, feed_forward_fn)
            for _ in range(n_layers)]
  return tl.Serial(
      M.Embedding(cfg['vocab'], d),
      tl.PositionalEncoding(max_len=max_len),
      tl.Select([0, 0]),
      stack(blocks),
      reversible.AverageStreams(),
      M.LayerNorm(),
      tl.Dense(cfg['vocab']),
  )


def build_model(cfg, variant, n_layers, seq, attention='dense'):
  from terraformer import reversible  # pylint: disable=g-import-not-at-top
  from training import model as M  # pylint: disable=g-import-not-at-top
  if variant == 'standard':
    from trax import layers as tl  # pylint: disable=g-import-not-at-top
    return M.DecoderLM(cfg['vocab'], cfg['d_model'], cfg['d_ff'], n_layers,
                       cfg['n_heads'], max_len=seq, activation=tl.Relu)
  stack = {'reversible': reversible.ReversibleSerial,
           'plain': reversible.NonReversibleSerial}[variant]
  return reversible_lm(cfg, n_layers, seq, stack, attention)


# ------------------------------------------------------------- measurement

def measure(cfg, variant, n_layers, batch, seq, attention='dense', run=False):
  """Compiles (and with `run`, executes) one training step.

  Returns a dict: params, argument/output/alias/temp bytes, estimated peak
  bytes, and with `run` the device's peak_bytes_in_use (None where the device
  keeps no statistics) and 'oom' if running out of memory.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax import numpy as jnp  # pylint: disable=g-import-not-at-top
  from trax import optimizers  # pylint: disable=g-import-not-at-top
  from training import trainer as T  # pylint: disable=g-import-not-at-top
  model = build_model(cfg, variant, n_layers, seq, attention)
  optimizer = optimizers.Adam()
  state = T.init_train_state(model, optimizer, (batch, seq), seed=0)
  params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
      state.weights))
  step_fn = T.make_train_step(model, optimizer, lambda step: 1e-3,
                              compute_dtype=jnp.dtype(cfg['dtype']))
  ids = jnp.zeros((batch, seq), jnp.int32)
  batch_arrays = (ids, ids, jnp.ones((batch, seq), jnp.float32))
  args = (state, jnp.asarray(0, jnp.int32), batch_arrays,
          jax.random.PRNGKey(0), jnp.asarray(1e-3, jnp.float32))
  row = dict(variant=variant, attention=attention, n_layers=n_layers,
             batch=batch, seq=seq, params=params)
  try:
    compiled = step_fn.lower(*args).compile()
    m = compiled.memory_analysis()
    row.update(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
               alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes)
    row['estimate'] = row['argument'] + row['output'] - row['alias'] + row['temp']
    if run:
      out = compiled(*args)
      jax.block_until_ready(out)
      stats = jax.devices()[0].memory_stats() or {}
      row['peak_in_use'] = stats.get('peak_bytes_in_use')
  except Exception as e:  # pylint: disable=broad-except
    if 'RESOURCE_EXHAUSTED' in str(e) or 'out of memory' in str(e).lower():
      row['oom'] = True
    else:
      raise
  return row


def measure_isolated(args, cfg, **kwargs):
  """`measure` in a fresh process (so peak statistics start from zero)."""
  if not args.isolate:
    return measure(cfg, **kwargs)
  cmd = [sys.executable, __file__, '--_one',
         json.dumps(dict(cfg=cfg, kwargs=kwargs))]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  for line in done.stdout.splitlines():
    if line.startswith('RESULT '):
      return json.loads(line[len('RESULT '):])
  text = done.stdout + done.stderr
  if 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower():
    return dict(kwargs, oom=True)
  raise RuntimeError(f'measurement failed ({kwargs}):\n{text[-3000:]}')


def _mb(x):
  return '-' if x is None else f'{x / MB:.1f}'


def depth_mode(args, cfg, run):
  rows = []
  for variant in args.variants:
    prev_act = None
    for n in args.depths:
      row = measure_isolated(args, cfg, variant=variant, n_layers=n,
                             batch=args.batch, seq=args.seq, run=run)
      base = measure_isolated(args, cfg, variant=variant, n_layers=n,
                              batch=1, seq=8)  # weight-sized temporaries
      row['temp_weights_only'] = base['temp']
      if not row.get('oom'):
        row['act'] = row['temp'] - base['temp']
        row['act_growth'] = (None if prev_act in (None, 0)
                             else row['act'] / prev_act - 1.0)
        prev_act = row['act']
      rows.append(row)
  header = ('| variant | layers | params | args MB | temp MB | act MB | '
            'act growth | est. peak MB | run peak MB |\n'
            '|---|---|---|---|---|---|---|---|---|')
  lines = [header]
  for r in rows:
    if r.get('oom'):
      lines.append(f"| {r['variant']} | {r['n_layers']} | - | out of memory "
                   '| | | | | |')
      continue
    growth = ('-' if r['act_growth'] is None
              else f"{100 * r['act_growth']:+.1f}%")
    lines.append(
        f"| {r['variant']} | {r['n_layers']} | {r['params'] / 1e6:.2f}M | "
        f"{_mb(r['argument'])} | {_mb(r['temp'])} | {_mb(r['act'])} | "
        f"{growth} | {_mb(r['estimate'])} | {_mb(r.get('peak_in_use'))} |")
  return rows, '\n'.join(lines)


def fits(args, cfg, attention, seq, run, limit):
  row = measure_isolated(args, cfg, variant='reversible',
                         n_layers=args.n_layers, batch=args.batch, seq=seq,
                         attention=attention, run=run)
  if row.get('oom'):
    return False, row
  if run:
    return True, row
  return row['estimate'] <= limit, row


def maxlen_mode(args, cfg, run, limit):
  rows, best = [], {}
  unit = args.chunk_len
  for attention in args.attentions:
    ok, bad = None, None
    seq = args.min_len
    while seq <= args.max_len:
      fit, row = fits(args, cfg, attention, seq, run, limit)
      rows.append(dict(row, fits=fit))
      if not fit:
        bad = seq
        break
      ok = seq
      seq *= 2
    for _ in range(args.refine):
      if ok is None or bad is None or bad - ok <= unit:
        break
      mid = (ok + bad) // 2 // unit * unit
      if mid in (ok, bad):
        break
      fit, row = fits(args, cfg, attention, mid, run, limit)
      rows.append(dict(row, fits=fit))
      ok, bad = (mid, bad) if fit else (ok, mid)
    best[attention] = ok
  lines = ['| attention | length | fits | est. peak MB | run peak MB |',
           '|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['attention']} | {r['seq']} | "
                 f"{'yes' if r['fits'] else 'no'} | {_mb(r.get('estimate'))} | "
                 f"{_mb(r.get('peak_in_use'))} |")
  lines.append('')
  for attention, ok in best.items():
    lines.append(f'longest {attention} length that fits: '
                 f'{ok if ok is not None else "none"}'
                 f'{" (the --max_len cap)" if ok == args.max_len else ""}')
  return rows, '\n'.join(lines), best


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args._one:  # pylint: disable=protected-access
    spec = json.loads(args._one)  # pylint: disable=protected-access
    print('RESULT ' + json.dumps(measure(spec['cfg'], **spec['kwargs'])))
    return None
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  on_cpu = device.platform == 'cpu'
  args.isolate = (args.isolate == 'yes') if args.isolate else not on_cpu
  cfg = dict(vocab=args.vocab, d_model=args.d_model, d_ff=args.d_ff,
             n_heads=args.n_heads, dtype=args.dtype, chunk_len=args.chunk_len,
             n_hashes=args.n_hashes, lsh_impl=args.lsh_impl)
  fit_by = args.fit_by or ('estimate' if on_cpu else 'run')
  run = not on_cpu if args.mode == 'depth' else fit_by == 'run'
  limit = None
  if args.mode == 'maxlen':
    stats = device.memory_stats() or {}
    limit = (args.memory_limit_gb * 2 ** 30 if args.memory_limit_gb
             else stats.get('bytes_limit', 16 * 2 ** 30))
  title = (f'### Training-step memory ({args.mode}): {device.device_kind} '
           f'({device.platform}), jax {jax.__version__}, compute {args.dtype}, '
           f"d_model {args.d_model}, d_ff {args.d_ff}, heads {args.n_heads}, "
           f'vocab {args.vocab}, batch {args.batch}')
  result = dict(device=device.device_kind, platform=device.platform,
                jax=jax.__version__, command=' '.join(sys.argv), args=vars(args))
  if args.mode == 'depth':
    rows, table = depth_mode(args, cfg, run)
    title += f', length {args.seq}'
  else:
    rows, table, best = maxlen_mode(args, cfg, run, limit)
    title += (f', {args.n_layers} reversible blocks, fit by {fit_by}'
              + (f' (limit {limit / 2 ** 30:.2f} GiB)' if fit_by == 'estimate'
                 else '')
              + f", LSH {args.lsh_impl} chunk_len {args.chunk_len} "
                f'n_hashes {args.n_hashes}')
    result['longest'] = best
  result['rows'] = rows
  print(title + '\n\n' + table, flush=True)
  if args.out_json:
    with open(args.out_json, 'w') as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == '__main__':
  main()
