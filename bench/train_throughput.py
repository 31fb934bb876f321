"""Training throughput: our trainer vs hand-written JAX vs trax's own Loop.

At each requested shape, trains three implementations of the same pre-norm
GPT for a fixed number of steps on synthetic random token batches that are
generated on the device beforehand (so input data is not measured):

  ours         training.model.DecoderLM + training.trainer.make_train_step,
               compute dtype from --dtype (float32 master weights).
  handwritten  bench/handwritten_gpt.py, a pure-JAX GPT of the same shape and
               matmul FLOPs, with a hand-written Adam, one jitted step.
  trax_loop    trax.models.TransformerLM trained by trax.supervised.training.Loop
               (float32 only: trax has no mixed precision).

Timing: compile plus --warmup untimed steps, then --repeats timed blocks of
--steps steps, each ended by one `jax.block_until_ready`; the median block
gives the step time.  The blocks of ours and handwritten alternate, so that
background load (e.g. a shared CPU) affects both alike.  trax_loop times one
block of --trax_steps after `loop.run(1)` twice, with output_dir=None (no
checkpoints, summaries or tf.io.gfile) and no eval task.  tokens/s = batch * seq / step time.  All three use the
same FLOP count, 6 * matmul params (head included, embeddings and positions
excluded) + 6 * n_layers * d_model * seq per token, and MFU divides by the
device's dense bf16 peak (`trainer.device_peak_flops`), '-' when unknown.

Usage:
  PYTHONPATH=. python bench/train_throughput.py --shapes tiny --steps 20 \
      --trax_steps 3 --append_to /tmp/bench.md
"""

import argparse
import datetime
import gc
import json
import shlex
import statistics
import sys
import time
import traceback

import jax
from jax import numpy as jnp

try:
  from bench import handwritten_gpt as H
except ImportError:  # run as a script from inside bench/
  import handwritten_gpt as H  # pylint: disable=g-import-not-at-top

SHAPES = {
    'tiny': dict(vocab=256, d_model=128, n_layers=2, n_heads=4, d_ff=512,
                 seq=128, batch=8),
    '52m': dict(vocab=32000, d_model=512, n_layers=6, n_heads=8, d_ff=2048,
                seq=1024, batch=16),
    '110m': dict(vocab=32000, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
                 seq=1024, batch=16),
    '335m': dict(vocab=32000, d_model=1024, n_layers=24, n_heads=16, d_ff=4096,
                 seq=1024, batch=16),
}
IMPLS = ('ours', 'handwritten', 'trax_loop')
N_DATA_BATCHES = 4   # distinct batches cycled through
LR = 3e-4


def flops_per_token(cfg):
  n = H.matmul_params(cfg['vocab'], cfg['d_model'], cfg['d_ff'], cfg['n_layers'])
  return 6 * n + 6 * cfg['n_layers'] * cfg['d_model'] * cfg['seq']


def make_batches(cfg, seed):
  """N_DATA_BATCHES device batches (inputs, targets, weights) of random ids."""
  key = jax.random.PRNGKey(seed)
  out = []
  for k in jax.random.split(key, N_DATA_BATCHES):
    ids = jax.random.randint(k, (cfg['batch'], cfg['seq'] + 1), 0, cfg['vocab'],
                             dtype=jnp.int32)
    out.append((ids[:, :-1], ids[:, 1:],
                jnp.ones((cfg['batch'], cfg['seq']), jnp.float32)))
  return jax.block_until_ready(out)


class Runner:
  """A jitted implementation ready to train: `run(n)` dispatches n steps and
  returns arrays to wait on; `loss()` is the last step's loss."""

  def __init__(self, step, state, batches, n_params, call):
    self.n_params = n_params
    self._step, self._state, self._batches, self._call = step, state, batches, call
    self._i = 0
    self._loss = None

  def run(self, n):
    for _ in range(n):
      batch = self._batches[self._i % len(self._batches)]
      self._state, self._loss = self._call(self._step, self._state, self._i,
                                           batch)
      self._i += 1
    return self._state, self._loss

  def loss(self):
    return None if self._loss is None else float(self._loss)


def _trax_activation(name):
  from trax import layers as tl  # pylint: disable=g-import-not-at-top
  if name == 'gelu':
    return tl.Gelu
  return lambda: tl.Fn('SquaredRelu', lambda x: jnp.square(jax.nn.relu(x)))


def _qkv_layer(kernel_size):
  if not kernel_size:
    return None
  from primer_trax import layers as P  # pylint: disable=g-import-not-at-top
  return lambda mode: P.MultiDConv(kernel_size, mode=mode)


def setup_ours(cfg, args, batches, dtype):
  import trax  # pylint: disable=g-import-not-at-top
  from trax import layers as tl  # pylint: disable=g-import-not-at-top
  from training import model as M  # pylint: disable=g-import-not-at-top
  from training import trainer as T  # pylint: disable=g-import-not-at-top
  m = M.DecoderLM(cfg['vocab'], d_model=cfg['d_model'], d_ff=cfg['d_ff'],
                  n_layers=cfg['n_layers'], n_heads=cfg['n_heads'],
                  max_len=cfg['seq'], activation=_trax_activation(args.activation),
                  qkv_layer=_qkv_layer(args.qkv_conv))
  opt = trax.optimizers.Adam(learning_rate=1e-4)
  ts = T.init_train_state(m, opt, (cfg['batch'], cfg['seq']), args.seed)
  theirs = T.train_flops_per_token(m, cfg['seq'])
  if theirs != flops_per_token(cfg):
    print(f'NOTE: trainer.train_flops_per_token = {theirs:,} but the bench '
          f'formula gives {flops_per_token(cfg):,}; the bench uses its own.',
          file=sys.stderr)
  step = T.make_train_step(m, opt, lambda s: LR, compute_dtype=dtype)
  rng = jax.random.PRNGKey(args.seed + 1)

  def call(step, ts, i, batch):
    ts, metrics = step(ts, i, batch, rng, 0.0)
    return ts, metrics['loss']

  return Runner(step, ts, batches, T.count_params(ts.weights), call)


def setup_handwritten(cfg, args, batches, dtype):
  params = H.init_params(jax.random.PRNGKey(args.seed), cfg['vocab'],
                         cfg['d_model'], cfg['d_ff'], cfg['n_layers'],
                         cfg['seq'])
  n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
  step = H.make_train_step(cfg['n_heads'], compute_dtype=dtype, lr=LR,
                           activation=args.activation)
  return Runner(step, H.init_state(params), batches, n_params,
                lambda step, state, i, batch: step(state, i, batch))


def bench_trax_loop(cfg, args, batches):
  """trax's TransformerLM trained by trax's Loop, float32."""
  import trax  # pylint: disable=g-import-not-at-top
  from trax import layers as tl  # pylint: disable=g-import-not-at-top
  from trax.supervised import training  # pylint: disable=g-import-not-at-top
  model = trax.models.TransformerLM(
      cfg['vocab'], d_model=cfg['d_model'], d_ff=cfg['d_ff'],
      n_layers=cfg['n_layers'], n_heads=cfg['n_heads'], max_len=cfg['seq'],
      dropout=0.0, ff_activation=tl.Gelu, mode='train')

  def stream():  # TransformerLM shifts its inputs right: (x, x, w).
    i = 0
    while True:
      inputs, _, weights = batches[i % len(batches)]
      yield inputs, inputs, weights
      i += 1

  never = lambda step: False
  task = training.TrainTask(
      stream(), tl.WeightedCategoryCrossEntropy(),
      trax.optimizers.Adam(learning_rate=1e-4),
      lr_schedule=lambda step: LR, n_steps_per_checkpoint=10**9,
      n_steps_per_permanent_checkpoint=10**9)
  # output_dir=None: no checkpoints, summaries or data counters written (and
  # no tf.io.gfile calls); eval is off without eval tasks.
  loop = training.Loop(model, task, output_dir=None, checkpoint_at=never,
                       permanent_checkpoint_at=never, eval_at=never,
                       n_devices=1, random_seed=args.seed)
  n_params = sum(w.size for w in jax.tree_util.tree_leaves(model.weights))
  trainer = loop._trainer_per_task[0]  # pylint: disable=protected-access

  def sync():
    jax.block_until_ready(
        trainer._accelerated_model_with_loss.weights)  # pylint: disable=protected-access

  loop.run(1)   # compile
  loop.run(1)
  sync()
  t0 = time.perf_counter()
  loop.run(args.trax_steps)
  sync()
  times = [time.perf_counter() - t0]
  return dict(times=times, steps=args.trax_steps, params=n_params, loss=None)


SETUP = {'ours': setup_ours, 'handwritten': setup_handwritten}


def _error(e):
  traceback.print_exc()
  return f'{type(e).__name__}: {e}'.splitlines()[0][:200]


def run_shape(name, args, dtype, peak):
  """Benchmarks every requested implementation at one shape; returns rows.

  The jitted implementations are compiled and warmed up first, then their
  timed blocks are interleaved (ours, handwritten, ours, ...) so that a
  change in background load hits all of them alike; trax_loop runs last.
  """
  cfg = SHAPES[name]
  batches = make_batches(cfg, args.seed)
  fpt = flops_per_token(cfg)
  results, runners = {}, {}
  for impl in [i for i in args.impls if i in SETUP]:
    print(f'[{name}] {impl}: compiling and warming up', file=sys.stderr,
          flush=True)
    try:
      runners[impl] = SETUP[impl](cfg, args, batches, dtype)
      jax.block_until_ready(runners[impl].run(args.warmup))
    except Exception as e:  # pylint: disable=broad-except
      runners.pop(impl, None)
      results[impl] = dict(error=_error(e))
  times = {impl: [] for impl in runners}
  for _ in range(args.repeats):
    for impl, runner in runners.items():
      t0 = time.perf_counter()
      jax.block_until_ready(runner.run(args.steps))
      times[impl].append(time.perf_counter() - t0)
  for impl, runner in runners.items():
    results[impl] = dict(times=times[impl], steps=args.steps,
                         params=runner.n_params, loss=runner.loss())
  runners.clear()
  gc.collect()
  if 'trax_loop' in args.impls and args.trax_steps > 0:
    print(f'[{name}] trax_loop: compiling and running', file=sys.stderr,
          flush=True)
    try:
      results['trax_loop'] = bench_trax_loop(cfg, args, batches)
    except Exception as e:  # pylint: disable=broad-except
      results['trax_loop'] = dict(error=_error(e))
    gc.collect()

  rows = []
  for impl in args.impls:
    if impl not in results:
      continue
    res = results[impl]
    row = dict(shape=name, impl=impl,
               dtype='float32' if impl == 'trax_loop' else args.dtype,
               batch=cfg['batch'], seq=cfg['seq'], flops_per_token=fpt)
    if 'error' in res:
      row['error'] = res['error']
    else:
      step_s = statistics.median(res['times']) / res['steps']
      tps = cfg['batch'] * cfg['seq'] / step_s
      row.update(params=int(res['params']), steps=res['steps'],
                 block_times_s=res['times'], step_time_s=step_s,
                 tokens_per_s=tps, loss=res['loss'],
                 mfu=fpt * tps / peak if peak else None)
      print(f'[{name}] {impl}: {step_s * 1e3:.2f} ms/step, {tps:,.0f} tok/s, '
            f'final loss {res["loss"]}', file=sys.stderr, flush=True)
    rows.append(row)
  base = results.get('handwritten', {}).get('times')
  if base:
    base_s = statistics.median(base) / args.steps
    for r in rows:
      if r.get('step_time_s'):
        r['vs_handwritten'] = r['step_time_s'] / base_s
  return rows


def _fmt(x, spec, none='-'):
  return none if x is None else format(x, spec)


def markdown(rows, header):
  lines = [header, '',
           '| shape | impl | dtype | params | batch x seq | ms/step | tokens/s '
           '| MFU | step vs handwritten |',
           '|---|---|---|---:|---|---:|---:|---:|---:|']
  for r in rows:
    if 'error' in r:
      lines.append(f"| {r['shape']} | {r['impl']} | {r['dtype']} | - | "
                   f"{r['batch']}x{r['seq']} | - | - | - | "
                   f"error: {r['error'].replace('|', '/')} |")
      continue
    mfu = ('-' if r['mfu'] is None else
           f"{100 * r['mfu']:.{1 if r['mfu'] >= 1e-3 else 3}f}%")
    lines.append(
        f"| {r['shape']} | {r['impl']} | {r['dtype']} | "
        f"{r['params'] / 1e6:.2f}M | {r['batch']}x{r['seq']} | "
        f"{r['step_time_s'] * 1e3:.2f} | {r['tokens_per_s']:,.0f} | {mfu} | "
        f"{_fmt(r.get('vs_handwritten'), '.2f')}x |")
  return '\n'.join(lines) + '\n'


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--shapes', default='tiny',
                 help='comma list of ' + ', '.join(SHAPES))
  p.add_argument('--steps', type=int, default=20, help='timed steps per block')
  p.add_argument('--warmup', type=int, default=3,
                 help='untimed steps after compiling')
  p.add_argument('--repeats', type=int, default=3,
                 help='timed blocks; the median is reported')
  p.add_argument('--trax_steps', type=int, default=3,
                 help='timed trax Loop steps; 0 skips trax_loop')
  p.add_argument('--impls', default=','.join(IMPLS))
  p.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'))
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--activation', default='gelu', choices=('gelu', 'relu2'),
                 help='feed-forward activation of ours and handwritten')
  p.add_argument('--qkv_conv', type=int, default=0,
                 help="ours only: Primer's depthwise conv of this width after "
                      'the Q/K/V projections (0: none)')
  p.add_argument('--append_to', default='BENCHMARKS.md',
                 help="Markdown file to append the table to; '' for none")
  p.add_argument('--out_json', default=None)
  args = p.parse_args(argv)
  args.shapes = [s for s in args.shapes.split(',') if s]
  args.impls = [s for s in args.impls.split(',') if s]
  for s in args.shapes:
    if s not in SHAPES:
      p.error(f'unknown shape {s!r}; choose from {", ".join(SHAPES)}')
  for s in args.impls:
    if s not in IMPLS:
      p.error(f'unknown impl {s!r}; choose from {", ".join(IMPLS)}')
  if args.steps < 1 or args.repeats < 1 or args.warmup < 1:
    p.error('--steps, --repeats and --warmup must be >= 1')
  return args


def invocation(argv):
  """(the command line that reproduces this run, the local time now)."""
  command = 'PYTHONPATH=. python ' + ' '.join(
      shlex.quote(a) for a in [sys.argv[0]] + (sys.argv[1:] if argv is None
                                               else list(argv)))
  return command, datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')


def emit(table, rows, args, device, command, when):
  """Prints the table; writes --out_json and appends to --append_to if set."""
  if args.out_json:
    with open(args.out_json, 'w') as f:
      json.dump(dict(device=device.device_kind, jax=jax.__version__,
                     date=when, command=command, rows=rows), f, indent=1)
  if args.append_to:
    with open(args.append_to, 'a') as f:
      f.write('\n' + table)
  print(table, flush=True)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from training import trainer as T  # pylint: disable=g-import-not-at-top
  dtype = jnp.dtype(args.dtype)
  device = jax.devices()[0]
  peak = T.device_peak_flops(device)
  rows = []
  for name in args.shapes:
    rows.extend(run_shape(name, args, dtype, peak))

  command, when = invocation(argv)
  peak_s = f'{peak / 1e12:.1f} TFLOP/s bf16 peak' if peak else 'peak unknown'
  header = (f'### Training throughput: {device.device_kind} '
            f'({device.platform}, {jax.device_count()} device(s), {peak_s}), '
            f'jax {jax.__version__}, {when}\n\n`{command}`\n\n'
            f'{args.steps} timed steps x {args.repeats} repeats (median)'
            + (f'; trax_loop: {args.trax_steps} steps, float32'
               if 'trax_loop' in args.impls and args.trax_steps > 0 else '')
            + '. FLOPs/token = 6 x matmul params + 6 x layers x d_model x seq '
            'for every row; MFU against the bf16 peak.')
  table = markdown(rows, header)
  lines = []
  for name in args.shapes:
    t = {r['impl']: r.get('step_time_s') for r in rows if r['shape'] == name}
    if t.get('ours') and t.get('handwritten'):
      lines.append(f'{name}: ours / handwritten step time = '
                   f"{t['ours'] / t['handwritten']:.3f}x")
  if lines:
    table += '\n' + '\n'.join(lines) + '\n'

  emit(table, rows, args, device, command, when)


if __name__ == '__main__':
  main()
