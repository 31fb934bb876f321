r"""Where one decoded token's time goes: device kernels per token, by kind.

Builds one of `decode_speed.py`'s models (800M shape by default), decodes
`--tokens` tokens with `training.sampling.Sampler` under `jax.profiler`, and
reads the trace back: the number of device kernels per token, the sum of
their durations against the wall time per token (the rest is idle device
time between kernels), and the kernels grouped by name with their share.
With --hlo_out it also writes XLA's optimized program of the decoding loop.

    python bench/decode_profile.py --variant=dense
    python bench/decode_profile.py --variant=sparse_ff_qkv --top=30
    python bench/decode_profile.py --variant=dense --dtype=bfloat16

A profiler adds a little time per kernel; use `decode_speed.py` for the
figures, this for the breakdown.
"""

import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import numpy as np

from bench import decode_speed  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string('variant', 'dense', 'one of decode_speed.VARIANTS.')
flags.DEFINE_integer('top', 25, 'kernel names listed.')
flags.DEFINE_string('hlo_out', None, 'write the optimized HLO of the loop here.')
flags.DEFINE_integer('sequence', 0, 'also list this many consecutive kernels '
                     '(name, us, gap before) from the middle of the trace.')


def device_events(trace_dir):
  """[(name, start_us, dur_us)] of the device (non-host) tracks of a trace."""
  path = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)
  path += glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'),
                    recursive=True)
  if not path:
    raise FileNotFoundError(f'no trace written under {trace_dir}')
  with gzip.open(path[0]) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  names = {}
  for e in events:
    if e.get('ph') == 'M' and e.get('name') == 'process_name':
      names[e['pid']] = e['args']['name']
  device_pids = {p for p, n in names.items()
                 if '/device:' in n and 'host' not in n.lower()}
  out = []
  for e in events:
    if e.get('ph') == 'X' and e.get('pid') in device_pids and 'dur' in e:
      out.append((e['name'], float(e['ts']), float(e['dur'])))
  out.sort(key=lambda x: x[1])
  return out, sorted(names[p] for p in device_pids)


def main(argv):
  del argv
  decode_speed.set_one_row_gemm()
  _, sampler, weights = decode_speed.build_ours(
      decode_speed.model_kwargs(FLAGS.shape, FLAGS.variant),
      decode_speed.compute_dtype())
  prompt = np.zeros((FLAGS.batch, 1), np.int32)
  n = FLAGS.warmup + FLAGS.tokens
  sampler.generate(weights, prompt, n, temperature=0.0)  # compile
  t = time.perf_counter()
  sampler.generate(weights, prompt, n, temperature=0.0)
  wall = time.perf_counter() - t
  if FLAGS.hlo_out:
    lowered = sampler._generate.lower(  # pylint: disable=protected-access
        sampler._decoding_weights(weights),  # as generate hands them over
        jax.numpy.asarray(prompt), jax.random.PRNGKey(0), n, 0.0, None)
    with open(FLAGS.hlo_out, 'w') as f:
      f.write(lowered.compile().as_text())
  trace_dir = tempfile.mkdtemp()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    sampler.generate(weights, prompt, n, temperature=0.0)
  events, tracks = device_events(trace_dir)
  if not events:
    raise RuntimeError(
        f'no device events in the trace (tracks: {tracks}); this tool reads '
        f'accelerator kernels, and a CPU backend ({jax.default_backend()} '
        f'here) records none: use bench/decode_layers.py on a CPU.')
  span = events[-1][1] + events[-1][2] - events[0][1]
  busy = sum(d for _, _, d in events)
  per = n  # the loop runs one model step per token (the prompt's included)
  print(f'{FLAGS.variant}: {len(events)} device events over {n} tokens '
        f'({len(events) / per:.1f} per token); wall {wall / n * 1e3:.3f} ms/token '
        f'untraced, traced span {span / per / 1e3:.3f} ms/token, kernels busy '
        f'{busy / per / 1e3:.3f} ms/token ({busy / span:.0%} of the span); '
        f'tracks: {tracks}')
  gaps = np.diff([s for _, s, _ in events]) - np.array([d for _, _, d in events[:-1]])
  print(f'gap between kernels: median {np.median(gaps):.2f} us, mean '
        f'{np.mean(gaps):.2f} us, total {gaps.sum() / per / 1e3:.3f} ms/token')
  by = collections.defaultdict(list)
  for name, _, d in events:
    by[name].append(d)
  rows = sorted(by.items(), key=lambda kv: -sum(kv[1]))
  print('\n| kernel | calls/token | us each (median) | ms/token | share |')
  print('|---|---:|---:|---:|---:|')
  for name, ds in rows[:FLAGS.top]:
    print(f'| {name[:70]} | {len(ds) / per:.1f} | {np.median(ds):.2f} | '
          f'{sum(ds) / per / 1e3:.4f} | {sum(ds) / busy:.1%} |')
  if FLAGS.sequence:
    start = len(events) // 2
    print(f'\n{FLAGS.sequence} consecutive kernels from event {start}:')
    for i in range(start, min(start + FLAGS.sequence, len(events))):
      name, s, d = events[i]
      gap = s - events[i - 1][1] - events[i - 1][2]
      print(f'  {d:7.2f} us  gap {gap:6.2f}  {name[:90]}')
  small = [d for _, _, d in events if d < 3.0]
  print(f'\nkernels under 3 us: {len(small) / per:.1f} per token, '
        f'{sum(small) / per / 1e3:.3f} ms/token')


if __name__ == '__main__':
  app.run(main)
