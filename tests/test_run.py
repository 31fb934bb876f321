"""End-to-end runs: outputs, determinism, exact resume, non-finite loss."""
import functools
import json
import os

import gin
from jax import numpy as jnp
import numpy as np
import pytest
import trax

from training import checkpoint as C
from training import metrics as M
from training import model as model_lib
from training import run

TINY = dict(
    model=functools.partial(model_lib.DecoderLM, d_model=32, d_ff=64, n_layers=2,
                            n_heads=2, max_len=64),
    batch_size=4, seq_len=32, log_every=1, eval_every=5, eval_batches=2,
    checkpoint_every=5, sample_length=8, tensorboard=False)


@pytest.fixture(autouse=True)
def _clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _train(run_dir, **kw):
  args = dict(TINY, steps=10, lr_schedule=lambda s: 3e-3,
              optimizer=trax.optimizers.Adam(weight_decay_rate=0.0))
  args.update(kw)
  return run.train(str(run_dir), **args)


def _losses(run_dir, split='train'):
  return [(r['step'], r['loss'])
          for r in M.read_jsonl(os.path.join(run_dir, 'metrics.jsonl'), split)]


def test_run_writes_everything_and_learns(tmp_path, capsys):
  out = _train(tmp_path, tensorboard=True)
  losses = _losses(tmp_path)
  assert [s for s, _ in losses] == list(range(1, 11))
  assert losses[-1][1] < losses[0][1]
  assert out['checkpoint'].endswith('ckpt_000000010')
  assert os.listdir(os.path.join(tmp_path, 'tb', 'train'))
  assert len(_losses(tmp_path, 'eval')) == 2
  sample = json.loads(open(os.path.join(tmp_path, 'samples.txt')).readline())
  assert sample['text'] == out['sample'] and len(out['sample'].encode('utf-8', 'replace')) > 0
  printed = capsys.readouterr().out
  assert 'train step 10 | loss' in printed and 'sample: ' in printed


def test_same_seed_same_losses_other_seed_differs(tmp_path):
  _train(tmp_path / 'a')
  _train(tmp_path / 'b')
  _train(tmp_path / 'c', seed=1)
  assert _losses(tmp_path / 'a') == _losses(tmp_path / 'b')
  assert _losses(tmp_path / 'a') != _losses(tmp_path / 'c')


def test_resume_gives_the_uninterrupted_losses(tmp_path):
  """Killed after step 5 (its checkpoint kept) and rerun: steps 6-10 match exactly."""
  _train(tmp_path / 'full')
  _train(tmp_path / 'cut', steps=5)
  out = _train(tmp_path / 'cut')
  full, cut = _losses(tmp_path / 'full'), _losses(tmp_path / 'cut')
  assert cut[5:] == full[5:] and [s for s, _ in cut[5:]] == list(range(6, 11))
  assert _losses(tmp_path / 'full', 'eval')[-1] == _losses(tmp_path / 'cut', 'eval')[-1]
  assert out['step'] == 10


def test_bfloat16_run(tmp_path):
  out = _train(tmp_path, compute_dtype='bfloat16')
  assert np.isfinite(out['loss'])


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_checkpoints(tmp_path):
  nan_after_5 = lambda s: jnp.where(s < 6, 3e-3, jnp.nan)
  with pytest.raises(run.UserError, match=r'loss became nan at step 8.*ckpt_000000005.*is kept'):
    _train(tmp_path, lr_schedule=nan_after_5)
  assert [os.path.basename(p) for p in C.list_checkpoints(str(tmp_path))] == ['ckpt_000000005']


def test_incompatible_checkpoint_is_refused_untouched(tmp_path):
  _train(tmp_path, steps=5)
  before = open(os.path.join(C.latest(str(tmp_path)), 'arrays.npz'), 'rb').read()
  wider = functools.partial(model_lib.DecoderLM, d_model=48, d_ff=64, n_layers=2,
                            n_heads=2, max_len=64)
  with pytest.raises(run.UserError, match='does not fit the configured model'):
    _train(tmp_path, model=wider)
  assert open(os.path.join(C.latest(str(tmp_path)), 'arrays.npz'), 'rb').read() == before


@pytest.mark.parametrize('kw,message', [
    (dict(dataset='/no/such/file.txt'), 'no/such/file.txt'),
    (dict(compute_dtype='float8'), "compute_dtype 'float8' is not one of"),
    (dict(steps=0), 'steps must be positive'),
])
def test_bad_arguments(tmp_path, kw, message):
  with pytest.raises(run.UserError, match=message):
    _train(tmp_path, **kw)
