"""The trace reader of bench/decode_profile.py, on traces written here,
bench/timing.py's paired timing, and bench/grid_barrier.py's kernels
(interpreted)."""

import gzip
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from bench import decode_profile
from bench import grid_barrier
from bench import timing


def _write_trace(directory, events, name='host.trace.json.gz'):
  path = os.path.join(directory, 'plugins', 'profile', 'run', name)
  os.makedirs(os.path.dirname(path))
  with gzip.open(path, 'wt') as f:
    json.dump({'traceEvents': events}, f)


def _meta(pid, name):
  return {'ph': 'M', 'name': 'process_name', 'pid': pid, 'args': {'name': name}}


def test_device_events_keeps_device_kernels_in_time_order(tmp_path):
  events = [
      _meta(1, '/host:CPU'),
      _meta(2, '/device:GPU:0'),
      _meta(3, '/device:GPU:0 host threads'),  # a host track named after a device
      {'ph': 'X', 'pid': 2, 'name': 'fusion_2', 'ts': 30.0, 'dur': 4.0},
      {'ph': 'X', 'pid': 1, 'name': 'ExecuteHelper', 'ts': 5.0, 'dur': 50.0},
      {'ph': 'X', 'pid': 2, 'name': 'gemv', 'ts': 10.0, 'dur': 6.5},
      {'ph': 'X', 'pid': 3, 'name': 'launch', 'ts': 11.0, 'dur': 1.0},
      {'ph': 'X', 'pid': 2, 'name': 'no_duration', 'ts': 12.0},
      {'ph': 'i', 'pid': 2, 'name': 'instant', 'ts': 13.0, 'dur': 1.0},
  ]
  _write_trace(str(tmp_path), events)
  got, tracks = decode_profile.device_events(str(tmp_path))
  assert got == [('gemv', 10.0, 6.5), ('fusion_2', 30.0, 4.0)]
  assert tracks == ['/device:GPU:0']


def test_device_events_reads_a_bare_event_list_and_perfetto_name(tmp_path):
  events = [_meta(7, '/device:GPU:0'),
            {'ph': 'X', 'pid': 7, 'name': 'k', 'ts': 1, 'dur': 2}]
  _write_trace(str(tmp_path), events, name='perfetto_trace.json.gz')
  # The list form (no 'traceEvents' wrapper) is read too.
  path = os.path.join(str(tmp_path), 'plugins', 'profile', 'run',
                      'perfetto_trace.json.gz')
  with gzip.open(path, 'wt') as f:
    json.dump(events, f)
  assert decode_profile.device_events(str(tmp_path))[0] == [('k', 1.0, 2.0)]


def test_device_events_names_the_directory_without_a_trace(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    decode_profile.device_events(str(tmp_path))


def test_paired_times_keeps_a_speed_change_between_pairs_out():
  # run(n) takes (overhead + n * per_item) * slowdown; the machine slows
  # 1.5x after the second call.  Paired, every difference is one speed's
  # (8 fast, 12 slow); timing all the short calls first and then all the
  # long ones would difference a fast median (12) from a slow one (30): 18,
  # more than the slow machine's own 12.
  slowdowns = iter([1, 1, 1.5, 1.5, 1.5, 1.5])
  calls = []

  def run(n):
    calls.append(n)
    return (10.0 + 0.5 * n) * next(slowdowns)

  t0, t1, dt = timing.paired_times(run, 4, 20, repeats=3)
  assert calls == [4, 20, 4, 20, 4, 20]
  assert (t0, t1, dt) == (18.0, 30.0, 12.0)


def test_grid_barrier_kernels_step_and_count_arrivals_interpreted():
  """One program (the interpreter runs programs one after another, so a
  barrier can only be passed alone): both forms add 1 per step, and the
  barriered one arrives once between each pair of steps, on top of the
  counter it was given."""
  x = jnp.arange(8, dtype=jnp.float32).reshape(1, 8)
  chained = grid_barrier.chained(x, 3, 4, interpret=True)
  got, counter, polls = grid_barrier.barriered(
      x, jnp.full((1,), 5, jnp.int32), 3, 4, interpret=True, max_spins=4)
  np.testing.assert_array_equal(chained, x + 3)
  np.testing.assert_array_equal(got, x + 3)
  assert int(counter[0]) == 5 + 2 and int(polls) == 0


@pytest.mark.parametrize('variant', ['dense', 'sparse_ff_qkv'])
def test_decode_speed_counts_bytes_in_the_compute_dtype(variant):
  """The floor of a bfloat16 decoder: every float weight and the caches in
  2 bytes, half of float32 (a floor counted in float32 said a bf16 model ran
  below it)."""
  from bench import decode_speed  # pylint: disable=g-import-not-at-top
  from terraformer import models  # pylint: disable=g-import-not-at-top
  from trax import shapes  # pylint: disable=g-import-not-at-top
  model = models.TerraformerLM(mode='predict', max_len=16,
                               **decode_speed.model_kwargs('tiny', variant))
  model.init(shapes.ShapeDtype((1, 1), np.int32))
  f32 = decode_speed.bytes_per_token(model)
  bf16 = decode_speed.bytes_per_token(model, jnp.bfloat16)
  assert f32[0] > 0 and f32[1] > 0
  assert bf16 == (f32[0] // 2, f32[1] // 2)


def test_decode_speed_out_in_tiling_override_keeps_unset_fields(monkeypatch):
  """--out_in_tiling replaces the fields given, keeps the defaults of those
  left 0, takes as block_k the largest power of 2 up to the one given that
  divides the row's width, and a second override starts
  from the library's defaults, not the first override."""
  from bench import decode_speed  # pylint: disable=g-import-not-at-top
  from training import gemv as gemv_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(gemv_lib, 'default_tiling_out_in',
                      gemv_lib.default_tiling_out_in)
  library = gemv_lib.default_tiling_out_in(3072, 1024)
  decode_speed.set_out_in_tiling(8, 2048, 0)
  assert gemv_lib.default_tiling_out_in(3072, 1024) == (8, 1024, library[2])
  assert gemv_lib.default_tiling_out_in(1024, 4096)[:2] == (8, 2048)
  assert gemv_lib.default_tiling_out_in(1024, 6144)[:2] == (8, 2048)
  decode_speed.set_out_in_tiling(0, 4096, 0)
  assert gemv_lib.default_tiling_out_in(1024, 6144)[1] == 2048
  decode_speed.set_out_in_tiling(0, 0, 4)
  assert gemv_lib.default_tiling_out_in(3072, 1024) == library[:2] + (4,)
