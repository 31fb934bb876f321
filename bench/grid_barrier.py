"""What a grid-wide barrier inside one Pallas kernel costs on a GPU, against
ending one kernel and starting the next.

The sparse decoding steps run 5 kernels a layer on a GPU, each 3-5 us where
its bytes would take about 1 us (BENCHMARKS.md, s32).  If the programs of one
kernel could wait for each other (every program adds 1 to a counter in global
memory, then polls it until all have arrived), a layer's stages could run in
one kernel.  This times the two ways of running `--phases` dependent steps,
each step's program p reading the row program p + 1 wrote in the step
before (so each step needs every program of the last one):

  chained:    one kernel per step (what the decoders do now);
  barriered:  one kernel, a barrier between steps (rows ping-pong between
              two buffers; the counter only grows, carried from call to call:
              a program that finds the counter at c before its own addition
              waits for it to reach (c // G + 1) * G).

Both run in an on-device loop (bench/timing.loop_time); their outputs must
agree (row p ends as x[(p + phases) % G] + phases), which also checks that
the barrier lets every program see the rows the others wrote.  Prints
microseconds per step for each grid size.

    python bench/grid_barrier.py             # on the GPU machine
    python bench/grid_barrier.py --interpret --grids=1   # a CPU check
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
import numpy as np

from bench import timing  # pylint: disable=g-import-not-at-top
from training import gemv as gemv_lib

FLAGS = flags.FLAGS
flags.DEFINE_list('grids', ['16', '64', '128', '256'], 'programs per kernel.')
flags.DEFINE_integer('phases', 8, 'dependent steps per iteration.')
flags.DEFINE_integer('width', 64, 'floats per program row.')
flags.DEFINE_integer('iters', 200, 'iterations per timing.')
flags.DEFINE_integer('warps', 4, 'warps per program.')
flags.DEFINE_integer('max_spins', 1 << 16,
                     'polls before a program gives up waiting (no hang if '
                     'the programs cannot all run at once).')
flags.DEFINE_bool('interpret', False, 'run the kernels interpreted (a CPU check).')


def chained(x, phases, warps, interpret):
  """`phases` kernels, each row p <- row p + 1 of the last plus 1."""
  g, w = x.shape

  def step(x_ref, o_ref):
    p = pl.program_id(0)
    o_ref[...] = x_ref[pl.ds((p + 1) % g, 1), :] + 1.0

  call = pl.pallas_call(
      step, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(g,),
      in_specs=[gemv_lib.whole_block(x.shape)],
      out_specs=pl.BlockSpec((1, w), lambda p: (p, 0)),
      interpret=interpret, **gemv_lib.compiler_params(interpret, warps))
  for _ in range(phases):
    x = call(x)
  return x


def wait_for_all(counter_ref, n_programs, max_spins, interpret):
  """Inside a kernel: arrive at the barrier and wait for every program.
  Returns the polls it took (max_spins if it gave up)."""
  atomic_add = gemv_lib.pl_triton.atomic_add
  if interpret:  # (the interpreter takes no scalar index)
    add = lambda n: atomic_add(counter_ref, pl.ds(0, 1),
                               jnp.full((1,), n, jnp.int32))[0]
  else:  # a scalar: for a (1,) block Pallas's Triton lowering (jax 0.10-0.11)
    # emits a float addition on the integer counter, which never grows.
    add = lambda n: atomic_add(counter_ref, jnp.int32(0), jnp.int32(n))
  before = add(1)
  target = (before // n_programs + 1) * n_programs

  def waiting(c):
    seen, spins = c
    return (seen - target < 0) & (spins < max_spins)  # wraps at 2^31 correctly

  def poll(c):
    return add(0), c[1] + 1

  return jax.lax.while_loop(waiting, poll, (before + 1, 0))[1]


def barriered(x, counter, phases, warps, interpret, max_spins):
  """The same steps in one kernel; (rows, counter, the most polls a program
  took at one barrier)."""
  g, w = x.shape

  def kernel(x_ref, c_ref, o_ref, co_ref, s_ref):
    del c_ref  # aliased to co_ref
    p = pl.program_id(0)
    src = pl.ds((p + 1) % g, 1)
    most = 0
    row = x_ref[src, :] + 1.0
    for k in range(1, phases):
      o_ref[k % 2, pl.ds(p, 1), :] = row
      most = jnp.maximum(most, wait_for_all(co_ref, g, max_spins, interpret))
      row = o_ref[k % 2, src, :] + 1.0
    o_ref[phases % 2, pl.ds(p, 1), :] = row
    s_ref[pl.ds(p, 1)] = jnp.full((1,), most, jnp.int32)

  out, counter, spins = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((2, g, w), x.dtype),
                 jax.ShapeDtypeStruct(counter.shape, counter.dtype),
                 jax.ShapeDtypeStruct((g,), jnp.int32)),
      grid=(g,),
      in_specs=[gemv_lib.whole_block(x.shape),
                gemv_lib.whole_block(counter.shape)],
      out_specs=(gemv_lib.whole_block((2, g, w)),
                 gemv_lib.whole_block(counter.shape),
                 gemv_lib.whole_block((g,))),
      input_output_aliases={1: 1},
      interpret=interpret, **gemv_lib.compiler_params(interpret, warps),
  )(x, counter)
  return out[phases % 2], counter, jnp.max(spins)


def main(argv):
  del argv
  phases, iters = FLAGS.phases, FLAGS.iters
  print(f'device: {jax.devices()[0].device_kind}; {phases} steps an '
        f'iteration, {iters} iterations, width {FLAGS.width}, '
        f'{FLAGS.warps} warps')
  print('| programs | chained us/step | barriered us/step | most polls | agree |')
  print('|---|---|---|---|---|')
  for g in map(int, FLAGS.grids):
    x = jnp.asarray(np.random.RandomState(g).randn(g, FLAGS.width), jnp.float32)
    want = np.roll(np.asarray(x), -phases, axis=0) + phases

    def run_chained(x, _):
      return chained(x, phases, FLAGS.warps, FLAGS.interpret)
    t_chain, got_chain = timing.loop_time(run_chained, x, (), iters=1, repeats=1)
    t_chain, _ = timing.loop_time(run_chained, x, (), iters)

    def run_barriered(carry, _):
      x, counter, spins = carry
      x, counter, s = barriered(x, counter, phases, FLAGS.warps,
                                FLAGS.interpret, FLAGS.max_spins)
      return x, counter, jnp.maximum(spins, s)
    start = (x, jnp.zeros((1,), jnp.int32), jnp.int32(0))
    _, (got_bar, _, spins) = timing.best_time(
        jax.jit(lambda c: run_barriered(c, ())), start, repeats=0)
    if int(spins) >= FLAGS.max_spins:
      print(f'| {g} | | | gave up after {int(spins)} polls | |', flush=True)
      continue
    loop = jax.jit(lambda c: jax.lax.fori_loop(
        0, iters, lambda i, c: run_barriered(c, ()), c))
    t_bar, (_, _, more) = timing.best_time(loop, start, repeats=3)
    t_bar /= iters
    spins = max(int(spins), int(more))
    agree = bool(np.allclose(got_chain, want) and np.allclose(got_bar, want))
    gave_up = ' (gave up)' if spins >= FLAGS.max_spins else ''
    print(f'| {g} | {1e6 * t_chain / phases:.2f} | {1e6 * t_bar / phases:.2f} '
          f'| {spins}{gave_up} | {agree} |', flush=True)


if __name__ == '__main__':
  app.run(main)
