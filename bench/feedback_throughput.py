"""Training throughput: Feedback Transformer vs the parallel DecoderLM.

For each batch size, trains `feedback.model.FeedbackLM` and
`training.model.DecoderLM` of the same width, depth, heads and feed-forward
size with the project's jitted step (`training.trainer.make_train_step`, Adam)
on random token batches prepared on the device beforehand, and reports
training tokens/s and the Feedback/Decoder ratio (the paper's known cost:
the Feedback model runs sequentially over positions; labml reports 5-10x).

Timing: compile plus --warmup untimed steps, then --repeats blocks of --steps
steps, each ended by `jax.block_until_ready`; the median block gives the step
time; the two models' blocks alternate so background load hits both alike.
tokens/s = batch * seq / step time.

Usage (CPU smoke test; on a GPU use --size algorithmic or enwik8_small):
  PYTHONPATH=. python bench/feedback_throughput.py --size tiny \
      --batch_sizes 2,8 --steps 3 --repeats 2
"""

import argparse
import datetime
import statistics
import sys
import time

import jax
from jax import numpy as jnp

SIZES = {
    'tiny': dict(vocab=32, d_model=64, d_ff=128, n_layers=2, n_heads=2, seq=64,
                 span=32, block_len=32),
    # gin/feedback/algorithmic_3var.gin (the Feedback model; 4 layers)
    'algorithmic': dict(vocab=28, d_model=256, d_ff=1024, n_layers=4, n_heads=4,
                        seq=256, span=100, block_len=64),
    # a small enwik8 model: 6 layers, span 512, blocks of 128
    'enwik8_small': dict(vocab=256, d_model=512, d_ff=2048, n_layers=6, n_heads=8,
                         seq=512, span=512, block_len=128),
}


def build(kind, cfg, args):
  from feedback import model as fm  # pylint: disable=g-import-not-at-top
  from training import model as tm  # pylint: disable=g-import-not-at-top
  common = dict(d_model=cfg['d_model'], d_ff=cfg['d_ff'], n_layers=cfg['n_layers'],
                n_heads=cfg['n_heads'], max_len=cfg['seq'], mode='train')
  if kind == 'feedback':
    return fm.FeedbackLM(cfg['vocab'], span=cfg['span'], block_len=cfg['block_len'],
                         shared_kv=args.shared_kv, unroll=args.unroll, **common)
  return tm.DecoderLM(cfg['vocab'], **common)


class Runner:
  """One model's jitted train step, state and batches."""

  def __init__(self, kind, cfg, batch, args):
    import trax  # pylint: disable=g-import-not-at-top
    from training import trainer as T  # pylint: disable=g-import-not-at-top
    model = build(kind, cfg, args)
    opt = trax.optimizers.Adam(learning_rate=1e-4, weight_decay_rate=0.0)
    self.state = T.init_train_state(model, opt, (batch, cfg['seq']), args.seed)
    self.params = T.count_params(self.state.weights)
    self.flops = T.train_flops_per_token(model, cfg['seq'])
    dtype = None if args.dtype == 'float32' else jnp.dtype(args.dtype)
    self.step = T.make_train_step(model, opt, lambda s: 1e-4, compute_dtype=dtype,
                                  clip_grad_norm=0.1)
    key = jax.random.PRNGKey(args.seed)
    self.batches = []
    for k in jax.random.split(key, 2):
      ids = jax.random.randint(k, (batch, cfg['seq'] + 1), 0, cfg['vocab'], jnp.int32)
      self.batches.append((ids[:, :-1], ids[:, 1:],
                           jnp.ones((batch, cfg['seq']), jnp.float32)))
    self.rng = jax.random.PRNGKey(args.seed + 1)
    self.i = 0
    self.loss = None

  def run(self, n):
    for _ in range(n):
      self.state, metrics = self.step(self.state, self.i,
                                      self.batches[self.i % 2], self.rng, 0.0)
      self.i += 1
      self.loss = metrics['loss']
    jax.block_until_ready(self.loss)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--size', default='tiny', choices=sorted(SIZES))
  p.add_argument('--batch_sizes', default='8,32,128')
  p.add_argument('--steps', type=int, default=10, help='steps per timed block')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--shared_kv', action='store_true')
  p.add_argument('--unroll', type=int, default=1, help='FeedbackLM unroll')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--append_to', default=None, help='append the table to this file')
  args = p.parse_args()
  cfg = SIZES[args.size]
  device = jax.devices()[0].device_kind
  from training import trainer as T  # pylint: disable=g-import-not-at-top
  peak = T.device_peak_flops()  # MFU against the bf16 peak, as elsewhere
  lines = [
      f'Feedback vs DecoderLM training throughput, size {args.size} {cfg}, '
      f'shared_kv={args.shared_kv}, unroll={args.unroll}, {args.dtype}, '
      f'device {device}, '
      f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC',
      f'command: python {" ".join(sys.argv)}', '',
      '| batch | feedback params | decoder params | feedback tok/s | '
      'decoder tok/s | decoder / feedback | feedback MFU | decoder MFU |',
      '|---|---|---|---|---|---|---|---|']
  print('\n'.join(lines), flush=True)
  for batch in [int(b) for b in args.batch_sizes.split(',')]:
    runners = {k: Runner(k, cfg, batch, args) for k in ('feedback', 'decoder')}
    for r in runners.values():
      r.run(1 + args.warmup)  # compile and warm up
    times = {k: [] for k in runners}
    for _ in range(args.repeats):
      for k, r in runners.items():
        t0 = time.perf_counter()
        r.run(args.steps)
        times[k].append((time.perf_counter() - t0) / args.steps)
    tps = {k: batch * cfg['seq'] / statistics.median(v) for k, v in times.items()}
    mfu = {k: ('n/a' if peak is None else
               f'{100 * tps[k] * runners[k].flops / peak:.2f}%') for k in runners}
    row = (f"| {batch} | {runners['feedback'].params:,} | "
           f"{runners['decoder'].params:,} | {tps['feedback']:,.0f} | "
           f"{tps['decoder']:,.0f} | {tps['decoder'] / tps['feedback']:.1f}x | "
           f"{mfu['feedback']} | {mfu['decoder']} |")
    print(row, flush=True)
    lines.append(row)
  if args.append_to:
    with open(args.append_to, 'a') as f:
      f.write('\n'.join(lines) + '\n\n')


if __name__ == '__main__':
  main()
