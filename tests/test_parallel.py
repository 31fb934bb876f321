"""Data parallelism over several devices (CPU host devices).

JAX fixes its device count when it starts, so the multi-device runs happen in
a child process started with XLA_FLAGS=--xla_force_host_platform_device_count=4:
this file run as a script is that worker.  Its runs leave metrics and
checkpoints, plus a JSON report, for the tests to compare with the 1-device
reference run that this process trains meanwhile.

Float32 rounding: the 4-device step sums the gradient in a different order
(per-device partial sums, then an all-reduce), so losses and weights agree
with one device to rounding, not bit for bit.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
TINY = dict(batch_size=4, seq_len=32, log_every=1, eval_every=3, eval_batches=2,
            checkpoint_every=3, sample_length=4, tensorboard=False, steps=STEPS)
RTOL, ATOL = 1e-5, 2e-6   # float32 rounding of a differently ordered sum


def _env(n_devices):
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={n_devices}',
             JAX_PLATFORMS='cpu')
  return env


def _losses(run_dir, split='train'):
  path = os.path.join(run_dir, 'metrics.jsonl')
  return [json.loads(l)['loss'] for l in open(path)
          if json.loads(l)['split'] == split]


def _arrays(run_dir, step=STEPS):
  """Every array (weights and slots) of the run's checkpoint at `step`."""
  path = os.path.join(run_dir, 'checkpoints', f'ckpt_{step:09d}', 'arrays.npz')
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


# --- the worker (runs in a child process with 4 CPU devices) ----------------

def _worker(out_dir):
  """run.train on 4 devices, resumed on 2 with ZeRO; the ZeRO layout; errors."""
  import gin  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import trax  # pylint: disable=g-import-not-at-top
  import train  # pylint: disable=g-import-not-at-top
  from training import model as model_lib  # pylint: disable=g-import-not-at-top
  from training import run  # pylint: disable=g-import-not-at-top
  from training import trainer as T  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 4, jax.devices()
  report = {}

  def train_run(name, **kw):
    gin.clear_config()
    train.parse_gin([os.path.join(ROOT, 'gin', 'baseline', 'tiny.gin')], [])
    args = dict(TINY)
    args.update(kw)
    return run.train(os.path.join(out_dir, name), **args)

  # Steps 1-3 on all 4 devices, then resumed on 2 with the optimizer split.
  train_run('run', steps=3, eval_every=0, sample_length=0)
  report['run'] = train_run('run', num_devices=2, shard_optimizer=True)
  for name, kw in (('indivisible', dict(batch_size=6)),
                   ('too_many', dict(num_devices=5))):
    try:
      train_run(name, **kw)
      report[name] = None
    except run.UserError as e:
      report[name] = str(e)

  # The layout a ZeRO step keeps, at the trainer level.
  model = model_lib.DecoderLM(256, d_model=32, d_ff=64, n_layers=1, n_heads=2,
                              max_len=8)
  opt = trax.optimizers.Adam()
  state = T.init_train_state(model, opt, (4, 8), seed=0)
  parallel = T.DataParallel(jax.devices(), shard_optimizer=True)
  step = T.make_train_step(model, opt, lambda s: 1e-3, parallel=parallel)
  batch = parallel.put_batch((np.zeros((4, 8), np.int32),) * 2
                             + (np.ones((4, 8), np.float32),))
  state, _ = step(parallel.put_state(state), 0, batch, jax.random.PRNGKey(0), 0.0)
  specs = lambda tree: [[list(x.shape), list(x.sharding.spec)]
                        for x in jax.tree_util.tree_leaves(tree)]
  report['slot_specs'] = specs(state.slots)
  report['weight_specs'] = specs(state.weights)
  report['batch_spec'] = list(batch[0].sharding.spec)
  leaves = jax.tree_util.tree_leaves(state.slots)
  report['slot_bytes_per_device'] = [
      sum(x.addressable_shards[i].data.nbytes for x in leaves) for i in range(4)]
  report['slot_bytes'] = sum(x.nbytes for x in leaves)
  with open(os.path.join(out_dir, 'report.json'), 'w') as f:
    json.dump(report, f)


# --- the tests ---------------------------------------------------------------

def _train_one_device(run_dir):
  """The reference: tiny.gin on this process's single device, 6 steps."""
  import gin  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import train  # pylint: disable=g-import-not-at-top
  from training import run  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 1
  gin.clear_config()
  try:
    train.parse_gin([os.path.join(ROOT, 'gin', 'baseline', 'tiny.gin')], [])
    run.train(run_dir, **dict(TINY, sample_length=0))
  finally:
    gin.clear_config()


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Starts the worker, trains the 1-device reference meanwhile, waits."""
  out = str(tmp_path_factory.mktemp('parallel'))
  worker = subprocess.Popen([sys.executable, os.path.abspath(__file__), out],
                            cwd=ROOT, env=_env(4), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  try:
    _train_one_device(os.path.join(out, 'reference'))
  finally:
    log = worker.communicate(timeout=900)[0]
  assert worker.returncode == 0, log[-3000:]
  report = json.load(open(os.path.join(out, 'report.json')))
  return out, report, log


def _assert_same_checkpoint(run_dir, ref_dir, step):
  """Every weight and Adam slot array of the two runs' checkpoints at `step`."""
  want, got = _arrays(ref_dir, step), _arrays(run_dir, step)
  assert sorted(want) == sorted(got) and len(want) > 10
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=ATOL,
                               err_msg=key)


def test_four_devices_match_one_device(runs):
  """Steps 1-3 on 4 devices: the 1-device losses and checkpoint, to rounding."""
  out, _, log = runs
  run_dir, ref = os.path.join(out, 'run'), os.path.join(out, 'reference')
  np.testing.assert_allclose(_losses(run_dir)[:3], _losses(ref)[:3], rtol=RTOL)
  _assert_same_checkpoint(run_dir, ref, 3)
  assert '4 x cpu (1 process(es), data parallel), compute float32' in log
  meta = json.load(open(os.path.join(run_dir, 'checkpoints', 'ckpt_000000003',
                                     'meta.json')))
  assert meta['metadata']['n_devices'] == 4


def test_resume_on_two_devices_with_sharded_optimizer(runs):
  """Resumed from the 4-device checkpoint on 2 devices with the optimizer
  state split (a device count and layout change): steps 4-6, the eval loss
  and the final checkpoint equal the uninterrupted 1-device run's."""
  out, report, log = runs
  run_dir, ref = os.path.join(out, 'run'), os.path.join(out, 'reference')
  assert 'resumed from' in log and report['run']['step'] == STEPS
  assert '2 x cpu (1 process(es), data parallel, sharded optimizer)' in log
  losses = _losses(run_dir)
  assert len(losses) == STEPS and losses[-1] < losses[0] - 0.05
  np.testing.assert_allclose(losses, _losses(ref), rtol=RTOL)
  evals = _losses(run_dir, 'eval')  # the first part did not evaluate
  assert len(evals) == 1
  np.testing.assert_allclose(evals[-1], _losses(ref, 'eval')[-1], rtol=RTOL)
  _assert_same_checkpoint(run_dir, ref, STEPS)
  assert report['run']['sample'] and 'sample: ' in log  # decoded from host weights


def test_sharded_optimizer_splits_the_slots(runs):
  """ZeRO-1 layout after a step: Adam's slots of a (32, 64) kernel split 4
  ways along dim 1, of a (64,) bias along dim 0; weights replicated; each
  device holds a quarter of the slot bytes."""
  _, report, _ = runs
  specs = [(tuple(shape), tuple(spec)) for shape, spec in report['slot_specs']]
  assert ((32, 64), (None, 'data')) in specs and ((64,), ('data',)) in specs
  assert ((256, 32), ('data',)) in specs
  assert all(spec == [] for _, spec in report['weight_specs'])
  assert report['batch_spec'] == ['data']
  assert report['slot_bytes_per_device'] == [report['slot_bytes'] // 4] * 4


def test_indivisible_batch_and_too_many_devices_are_refused(runs):
  _, report, _ = runs
  assert report['indivisible'].startswith(
      'batch_size 6 is not divisible by the 4 devices')
  assert 'use a multiple of 4' in report['indivisible']
  assert report['too_many'].startswith(
      'num_devices must be between 1 and the 4 devices available, not 5.')


def test_single_device_step_is_unchanged():
  """Without DataParallel the step is the plain jit (no sharding constraints)."""
  import jax  # pylint: disable=g-import-not-at-top
  import trax  # pylint: disable=g-import-not-at-top
  from training import model as model_lib  # pylint: disable=g-import-not-at-top
  from training import trainer as T  # pylint: disable=g-import-not-at-top
  model = model_lib.DecoderLM(32, d_model=16, d_ff=32, n_layers=1, n_heads=2,
                              max_len=8)
  opt = trax.optimizers.Adam()
  state = T.init_train_state(model, opt, (2, 8), seed=0)
  step = T.make_train_step(model, opt, lambda s: 1e-3)
  batch = (np.zeros((2, 8), np.int32),) * 2 + (np.ones((2, 8), np.float32),)
  text = step.lower(state, 0, batch, jax.random.PRNGKey(0), 0.0).as_text()
  assert 'sharding' not in text.lower()


if __name__ == '__main__':
  sys.path.insert(0, ROOT)
  _worker(sys.argv[1])
