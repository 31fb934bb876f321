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


def median_times(run, lengths, repeats):
  """[median of `repeats` calls run(n) for n in lengths]; run(n) returns
  the seconds one call took (e.g. decoding n tokens)."""
  return [float(np.median([run(n) for _ in range(repeats)])) for n in lengths]


def stream_stamps(stream, n):
  """time.perf_counter() as each of the next n items of `stream` is ready."""
  stamps = []
  for _ in range(n):
    jax.block_until_ready(next(stream))
    stamps.append(time.perf_counter())
  return stamps
