"""What the training loop around the jitted step costs.

Times, at one model shape, milliseconds per step of:

  A  the bare jitted step on one device-resident batch, traced learning rate
  B  A, with a fresh numpy batch from the data pipeline every step
  C  B, with trax's multifactor schedule evaluated on the host every step
  D  the whole `training.run.train` loop (data prefetch, metrics, logging),
     read from the tokens/s it logs (eval and checkpoints excluded)

Usage:
  PYTHONPATH=. python bench/loop_overhead.py --d_model 768 --n_layers 12 \
      --seq_len 1024 --batch_size 16 --steps 60
"""

import argparse
import functools
import json
import os
import tempfile
import time

import jax
from jax import numpy as jnp
import numpy as np


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--d_model', type=int, default=128)
  p.add_argument('--n_layers', type=int, default=2)
  p.add_argument('--seq_len', type=int, default=128)
  p.add_argument('--batch_size', type=int, default=8)
  p.add_argument('--steps', type=int, default=30)
  p.add_argument('--dtype', default='bfloat16')
  args = p.parse_args()

  import trax  # pylint: disable=g-import-not-at-top
  from trax.supervised import lr_schedules  # pylint: disable=g-import-not-at-top
  from training import data, run, trainer  # pylint: disable=g-import-not-at-top
  from training import model as model_lib  # pylint: disable=g-import-not-at-top

  d, n = args.d_model, args.n_layers
  model_fn = functools.partial(model_lib.DecoderLM, d_model=d, d_ff=4 * d,
                               n_layers=n, n_heads=max(1, d // 64),
                               max_len=args.seq_len)
  dtype = run.DTYPES[args.dtype]
  ds = data.make_dataset('python_docs', seq_len=args.seq_len,
                         batch_size=args.batch_size)
  schedule = lr_schedules.multifactor(factors='constant * linear_warmup',
                                      constant=1e-3, warmup_steps=100)
  tokens = args.batch_size * args.seq_len

  def timed(name, one_step, state):
    for i in range(3):
      state = one_step(state, i)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(3, 3 + args.steps):
      state = one_step(state, i)
    jax.block_until_ready(state)
    ms = (time.perf_counter() - start) / args.steps * 1e3
    print(f'{name}: {ms:.2f} ms/step, {tokens / ms * 1e3:,.0f} tokens/s', flush=True)
    return ms

  rows = {}
  m = model_fn(vocab_size=ds.vocab_size)
  opt = trax.optimizers.Adam(learning_rate=1e-3, weight_decay_rate=0.0)
  key = jax.random.PRNGKey(0)
  fixed = jax.device_put(next(ds.batches(0)))
  batches = ds.batches(0)

  traced = trainer.make_train_step(m, opt, lambda s: 1e-3, dtype)
  state = trainer.init_train_state(m, opt, (args.batch_size, args.seq_len), 0)
  rows['A bare step'] = timed(
      'A bare step', lambda s, i: traced(s, i, fixed, key, 0.0)[0], state)
  state = trainer.init_train_state(m, opt, (args.batch_size, args.seq_len), 0)
  rows['B + numpy batches'] = timed(
      'B + numpy batches', lambda s, i: traced(s, i, next(batches), key, 0.0)[0],
      state)
  host = trainer.make_train_step(m, opt, schedule, dtype)
  state = trainer.init_train_state(m, opt, (args.batch_size, args.seq_len), 0)
  rows['C + host schedule'] = timed(
      'C + host schedule', lambda s, i: host(
          s, i, next(batches), key, trainer.host_learning_rate(schedule, i))[0],
      state)

  with tempfile.TemporaryDirectory() as run_dir:
    n_steps = 3 + args.steps
    run.train(run_dir, steps=n_steps, model=model_fn, optimizer=opt,
              lr_schedule=schedule, batch_size=args.batch_size,
              seq_len=args.seq_len, compute_dtype=args.dtype,
              log_every=args.steps, eval_every=0, checkpoint_every=0,
              tensorboard=False, sample_length=0)
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
      last = [json.loads(l) for l in f][-1]
  rows['D run.train loop'] = tokens / last['tokens_per_s'] * 1e3
  print(f"D run.train loop: {rows['D run.train loop']:.2f} ms/step, "
        f"{last['tokens_per_s']:,.0f} tokens/s", flush=True)

  print(f'\nshape d_model {d}, {n} layers, batch {args.batch_size} x '
        f'{args.seq_len}, {args.dtype}, {jax.devices()[0].device_kind}')
  print('| variant | ms/step | vs A |\n|---|---:|---:|')
  for name, ms in rows.items():
    print(f"| {name} | {ms:.2f} | {ms / rows['A bare step']:.2f}x |")


if __name__ == '__main__':
  main()
