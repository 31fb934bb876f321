"""Timing helpers shared by the bench scripts (wall-clock, results waited for)."""

import time

import jax
import numpy as np


def best_time(f, *args, repeats=5):
  """(seconds of the fastest of `repeats` calls f(*args), the result of a
  first, untimed call that compiles it)."""
  out = jax.block_until_ready(f(*args))
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    best = min(best, time.perf_counter() - t)
  return best, out


def loop_time(step, x, consts, iters, repeats=3):
  """(seconds per iteration of x = step(x, consts), `iters` iterations in
  one jitted on-device loop, the fastest of `repeats` calls; the final x)."""
  @jax.jit
  def loop(x, consts):
    return jax.lax.fori_loop(0, iters, lambda i, x: step(x, consts), x)

  best, out = best_time(loop, x, consts, repeats=repeats)
  return best / iters, np.asarray(out)


def paired_times(run, n0, n1, repeats):
  """(median of run(n0), median of run(n1), median of run(n1) - run(n0)):
  `repeats` back-to-back pairs of calls; run(n) returns the seconds one call
  took (e.g. decoding n tokens).  Differencing within a pair keeps a change
  of the machine's speed between pairs out of the per-item time; the
  difference of the two medians would not."""
  pairs = np.array([(run(n0), run(n1)) for _ in range(repeats)])
  return (float(np.median(pairs[:, 0])), float(np.median(pairs[:, 1])),
          float(np.median(pairs[:, 1] - pairs[:, 0])))


def stream_stamps(stream, n):
  """time.perf_counter() as each of the next n items of `stream` is ready."""
  stamps = []
  for _ in range(n):
    jax.block_until_ready(next(stream))
    stamps.append(time.perf_counter())
  return stamps
