"""Data-parallel training throughput: tokens/s on 1, 2, 4, ... devices.

For each shape (see bench/train_throughput.py: 110m and 335m are the shapes of
gin/baseline/110m.gin and 335m.gin) and each device count n, trains our
DecoderLM with `training.trainer.make_train_step` on the first n devices: one
device runs the plain single-device step, n > 1 the `DataParallel` step
(batch split across the devices, weights replicated, optionally the optimizer
slots split with --shard_optimizer).  Synthetic random token batches are
placed on the devices beforehand, so input data is not measured.

Scaling: --scaling weak (default) keeps the batch per device fixed (global
batch = n x the shape's batch), strong keeps the global batch fixed.  Scaling
efficiency = tokens/s on n devices / (n x tokens/s on 1 device).

Timing as in train_throughput.py: compile plus --warmup untimed steps, then
--repeats timed blocks of --steps steps, each ended by one
`jax.block_until_ready`; the median block gives the step time.  The blocks of
the device counts alternate, so that background load affects all alike.

Usage (a GPU machine):
  PYTHONPATH=. python bench/data_parallel.py --shapes 110m,335m --devices 1,2
On a CPU with forced host devices (a smoke test):
  XLA_FLAGS=--xla_force_host_platform_device_count=4 PYTHONPATH=. \\
      python bench/data_parallel.py --shapes tiny --devices 1,2,4 --append_to ''
"""

import argparse
import gc
import statistics
import sys
import time
import traceback

import jax
from jax import numpy as jnp
import numpy as np

try:
  from bench import train_throughput as TT
except ImportError:  # run as a script from inside bench/
  import train_throughput as TT  # pylint: disable=g-import-not-at-top

N_DATA_BATCHES = 4   # distinct batches cycled through
LR = 3e-4


def host_batches(batch, seq, vocab, seed):
  """N_DATA_BATCHES host batches (inputs, targets, weights) of random ids."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(N_DATA_BATCHES):
    ids = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    out.append((ids[:, :-1], ids[:, 1:], np.ones((batch, seq), np.float32)))
  return out


class Runner:
  """One device count's jitted step, state and placed batches."""

  def __init__(self, model, opt, host_state, batches, n_devices, args, dtype):
    from training import trainer as T  # pylint: disable=g-import-not-at-top
    self.parallel = (T.DataParallel(jax.devices()[:n_devices],
                                    args.shard_optimizer)
                     if n_devices > 1 else None)
    if self.parallel:
      self.state = self.parallel.put_state(host_state)
      self.batches = [self.parallel.put_batch(b) for b in batches]
    else:
      self.state = jax.device_put(host_state)
      self.batches = jax.device_put(batches)
    self.step = T.make_train_step(model, opt, lambda s: LR, dtype,
                                  parallel=self.parallel)
    self.key = jax.random.PRNGKey(args.seed + 1)
    self.i = 0
    self.loss = None

  def run(self, n):
    for _ in range(n):
      batch = self.batches[self.i % len(self.batches)]
      self.state, metrics = self.step(self.state, self.i, batch, self.key, 0.0)
      self.loss = metrics['loss']
      self.i += 1
    return self.loss


def run_shape(name, args, dtype, peak):
  """Times every device count at one shape; returns table rows."""
  import trax  # pylint: disable=g-import-not-at-top
  from training import model as M  # pylint: disable=g-import-not-at-top
  from training import trainer as T  # pylint: disable=g-import-not-at-top
  cfg = TT.SHAPES[name]
  model = M.DecoderLM(cfg['vocab'], d_model=cfg['d_model'], d_ff=cfg['d_ff'],
                      n_layers=cfg['n_layers'], n_heads=cfg['n_heads'],
                      max_len=cfg['seq'])
  opt = trax.optimizers.Adam(learning_rate=1e-4)
  host_state = jax.device_get(
      T.init_train_state(model, opt, (cfg['batch'], cfg['seq']), args.seed))
  n_params = T.count_params(host_state.weights)
  fpt = TT.flops_per_token(cfg)
  runners, rows = {}, []
  for n in args.devices:
    batch = cfg['batch'] * n if args.scaling == 'weak' else cfg['batch']
    row = dict(shape=name, devices=n, batch=batch, seq=cfg['seq'],
               params=n_params, shard_optimizer=args.shard_optimizer and n > 1)
    rows.append(row)
    if batch % n:
      row['error'] = f'global batch {batch} not divisible by {n} devices'
      continue
    print(f'[{name}] {n} device(s), batch {batch}: compiling and warming up',
          file=sys.stderr, flush=True)
    try:
      runners[n] = Runner(model, opt, host_state,
                          host_batches(batch, cfg['seq'], cfg['vocab'], args.seed),
                          n, args, dtype)
      jax.block_until_ready(runners[n].run(args.warmup))
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      runners.pop(n, None)
      row['error'] = f'{type(e).__name__}: {e}'.splitlines()[0][:200]
  times = {n: [] for n in runners}
  for _ in range(args.repeats):
    for n, runner in runners.items():
      t0 = time.perf_counter()
      jax.block_until_ready(runner.run(args.steps))
      times[n].append(time.perf_counter() - t0)
  for row in rows:
    n = row['devices']
    if n not in runners:
      continue
    step_s = statistics.median(times[n]) / args.steps
    tps = row['batch'] * row['seq'] / step_s
    row.update(block_times_s=times[n], steps=args.steps, step_time_s=step_s,
               tokens_per_s=tps, tokens_per_s_per_device=tps / n,
               loss=float(runners[n].loss),
               mfu=fpt * tps / (peak * n) if peak else None)
    print(f'[{name}] {n} device(s): {step_s * 1e3:.2f} ms/step, {tps:,.0f} '
          f'tok/s', file=sys.stderr, flush=True)
  base = next((r for r in rows if r['devices'] == 1 and 'tokens_per_s' in r),
              None)
  for row in rows:
    if base and 'tokens_per_s' in row:
      row['efficiency'] = row['tokens_per_s'] / (row['devices'] *
                                                 base['tokens_per_s'])
  runners.clear()
  gc.collect()
  return rows


def markdown(rows, header):
  lines = [header, '',
           '| shape | devices | global batch x seq | ms/step | tokens/s | '
           'tokens/s per device | scaling efficiency | MFU |',
           '|---|---:|---|---:|---:|---:|---:|---:|']
  for r in rows:
    if 'error' in r:
      lines.append(f"| {r['shape']} | {r['devices']} | {r['batch']}x{r['seq']} "
                   f"| - | - | - | - | error: {r['error'].replace('|', '/')} |")
      continue
    eff = r.get('efficiency')
    mfu = '-' if r['mfu'] is None else f"{100 * r['mfu']:.1f}%"
    lines.append(
        f"| {r['shape']} | {r['devices']} | {r['batch']}x{r['seq']} | "
        f"{r['step_time_s'] * 1e3:.2f} | {r['tokens_per_s']:,.0f} | "
        f"{r['tokens_per_s_per_device']:,.0f} | "
        f"{'-' if eff is None else f'{100 * eff:.1f}%'} | {mfu} |")
  return '\n'.join(lines) + '\n'


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--shapes', default='110m,335m',
                 help='comma list of ' + ', '.join(TT.SHAPES))
  p.add_argument('--devices', default='1,2,4',
                 help='comma list of device counts; counts above the devices '
                      'available are left out')
  p.add_argument('--scaling', default='weak', choices=('weak', 'strong'),
                 help='weak: the batch per device is the shape\'s batch; '
                      'strong: the global batch is')
  p.add_argument('--shard_optimizer', action='store_true',
                 help='split the optimizer slots across the devices (ZeRO-1)')
  p.add_argument('--steps', type=int, default=20, help='timed steps per block')
  p.add_argument('--warmup', type=int, default=3,
                 help='untimed steps after compiling')
  p.add_argument('--repeats', type=int, default=3,
                 help='timed blocks; the median is reported')
  p.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'))
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--append_to', default='BENCHMARKS.md',
                 help="Markdown file to append the table to; '' for none")
  p.add_argument('--out_json', default=None)
  args = p.parse_args(argv)
  args.shapes = [s for s in args.shapes.split(',') if s]
  for s in args.shapes:
    if s not in TT.SHAPES:
      p.error(f'unknown shape {s!r}; choose from {", ".join(TT.SHAPES)}')
  try:
    args.devices = sorted({int(d) for d in args.devices.split(',') if d})
  except ValueError:
    p.error(f'--devices must be a comma list of integers, not {args.devices!r}')
  if not args.devices or args.devices[0] < 1:
    p.error('--devices must list counts >= 1')
  if args.steps < 1 or args.repeats < 1 or args.warmup < 1:
    p.error('--steps, --repeats and --warmup must be >= 1')
  return args


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from training import trainer as T  # pylint: disable=g-import-not-at-top
  available = jax.device_count()
  skipped = [n for n in args.devices if n > available]
  args.devices = [n for n in args.devices if n <= available]
  if skipped:
    print(f'only {available} device(s): leaving out {skipped}', file=sys.stderr)
  if 1 not in args.devices:
    print('no 1-device run: scaling efficiency is left out', file=sys.stderr)
  dtype = jnp.dtype(args.dtype)
  device = jax.devices()[0]
  peak = T.device_peak_flops(device)
  rows = []
  for name in args.shapes:
    rows.extend(run_shape(name, args, dtype, peak))

  command, when = TT.invocation(argv)
  header = (f'### Data-parallel throughput: {device.device_kind} '
            f'({device.platform}, {available} device(s)), jax {jax.__version__}, '
            f'{when}\n\n`{command}`\n\n'
            f'{args.dtype} compute, float32 master weights, Adam; {args.scaling} '
            'scaling (' + ('batch per device fixed' if args.scaling == 'weak'
                           else 'global batch fixed')
            + '); optimizer slots '
            + ('split across devices (ZeRO-1)' if args.shard_optimizer
               else 'replicated')
            + f'; {args.steps} timed steps x {args.repeats} repeats (median). '
            'Scaling efficiency = tokens/s / (devices x 1-device tokens/s); '
            'MFU per device against the bf16 peak.')
  table = markdown(rows, header)
  TT.emit(table, rows, args, device, command, when)


if __name__ == '__main__':
  main()
