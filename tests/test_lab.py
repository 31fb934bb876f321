"""The ablation lab: a CPU-sized sweep, its report, resuming, bad input."""
import json
import os
import re

import gin
import pytest

from primer_trax import lab
from training import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'gin', 'primer', 'lab_tiny.gin')
TOKENS = 4 * 32 * 6  # lab_tiny: batch 4 x 32 tokens -> 6 steps


def _args(out, *extra):
  return lab.parse_args([f'--base_gin={TINY}', '--variants=baseline,primer_ez',
                         '--seeds=1', f'--tokens={TOKENS}', f'--output_dir={out}',
                         '--log_every=2', '--compilation_cache=', '--drop_checkpoints']
                        + list(extra))


@pytest.fixture(autouse=True)
def _no_gin_left_behind():
  """The lab configures gin in-process; later tests must not see it."""
  yield
  gin.clear_config()


@pytest.fixture(scope='module')
def sweep(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('lab'))
  report = lab.run_sweep(_args(out), log=lambda *a: None)
  gin.clear_config()
  yield out, report


def _row(report_text, name):
  rows = [l for l in report_text.splitlines() if l.startswith(f'| {name} |')]
  assert len(rows) == 1, report_text
  return [c.strip() for c in rows[0].strip('|').split('|')]


def test_sweep_writes_table_plots_and_runs(sweep):
  out, report = sweep
  for name in ('baseline', 'primer_ez'):
    done = lab.finished(lab.run_dir(out, name, 0))
    assert done['steps'] == 6
    assert not os.path.exists(os.path.join(lab.run_dir(out, name, 0), 'checkpoints'))
  with open(report) as f:
    text = f.read()
  header = [c.strip() for c in text.splitlines()[
      [i for i, l in enumerate(text.splitlines()) if l.startswith('| variant')][0]
  ].strip('|').split('|')]
  base, ez = _row(text, 'baseline'), _row(text, 'primer_ez')
  col = {name: i for i, name in enumerate(header)}
  # final train loss = the last logged training loss, seed 0 only (std 0).
  for name, row in (('baseline', base), ('primer_ez', ez)):
    records = metrics_lib.read_jsonl(
        os.path.join(lab.run_dir(out, name, 0), 'metrics.jsonl'), 'train')
    assert [r['step'] for r in records] == [2, 4, 6]
    assert row[col['final train loss']] == f'{records[-1]["loss"]:.4f} ± 0.0000'
    evals = metrics_lib.read_jsonl(
        os.path.join(lab.run_dir(out, name, 0), 'metrics.jsonl'), 'eval')
    assert row[col['final eval loss']] == f'{evals[-1]["loss"]:.4f} ± 0.0000'
    assert row[col['runs']] == '1'
  # Primer-EZ adds 3 taps per Q/K/V channel per layer: 2 layers x 3 x 96.
  summary = json.load(open(os.path.join(out, 'summary.json')))
  n_base = summary['variants']['baseline']['n_params']
  n_ez = summary['variants']['primer_ez']['n_params']
  assert n_ez - n_base == 2 * 3 * 3 * 32
  assert base[col['params']] == f'{n_base / 1e6:.2f}M'
  assert base[col['vs ref']] == '1.000' and base[col['time speedup']] == '1.00'
  assert base[col['steps to ref loss']].endswith('(1/1)')
  assert float(ez[col['vs ref']]) == pytest.approx(n_ez / n_base, abs=1e-3)
  assert re.fullmatch(r'[\d,]+', ez[col['tokens/s']])
  for png in ('loss_vs_tokens.png', 'loss_vs_time.png'):
    with open(os.path.join(out, png), 'rb') as f:
      data = f.read()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 5000


def test_parameter_flag(sweep):
  """primer_ez has ~1.4% more weights at the tiny size: flagged only above 1%."""
  out, _ = sweep
  plan = json.load(open(os.path.join(out, 'summary.json')))['plan']
  for tolerance, flagged in ((0.001, True), (0.02, False)):
    report = lab.write_report(out, ['baseline', 'primer_ez'], 1, plan, tolerance)
    row = _row(open(report).read(), 'primer_ez')
    assert ('parameters differ from baseline' in row[-1]) == flagged


def test_rerun_resumes_without_retraining(sweep, monkeypatch):
  out, _ = sweep
  metrics = os.path.join(lab.run_dir(out, 'primer_ez', 0), 'metrics.jsonl')
  before = open(metrics).read()

  def no_training(*args, **kwargs):
    raise AssertionError('a finished run was trained again')

  monkeypatch.setattr('training.run.train', no_training)
  logs = []
  report = lab.run_sweep(_args(out), log=logs.append)
  assert sum('skipped' in l for l in logs) == 2
  assert open(metrics).read() == before
  assert '| primer_ez | 1 |' in open(report).read()


def test_unknown_variant_lists_known_ones(tmp_path):
  args = lab.parse_args([f'--base_gin={TINY}', '--variants=baseline,swishglu',
                         '--tokens=100', f'--output_dir={tmp_path}'])
  with pytest.raises(lab.LabError, match=r"Unknown variant\(s\) 'swishglu'; known "
                     r'variants: baseline, squared_relu, dconv'):
    lab.run_sweep(args)


def test_bad_base_gin(tmp_path):
  args = lab.parse_args(['--base_gin=gin/primer/nope.gin', '--tokens=100',
                         f'--output_dir={tmp_path}'])
  with pytest.raises(lab.LabError, match='Cannot read --base_gin'):
    lab.run_sweep(args)


def test_train_py_trains_and_decodes_a_variant(tmp_path, capsys):
  """train.py --gin_file=gin/primer/lab_tiny.gin with the variant switch."""
  import gin  # pylint: disable=g-import-not-at-top
  import train  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  train.FLAGS.unparse_flags()
  try:
    train.FLAGS(['train.py', f'--gin_file={TINY}', f'--output_dir={tmp_path}',
                 "--gin_param=primer_trax.VariantLM.variant='token_shift'",
                 '--steps=2', '--eval_every=0', '--sample_length=6', '--tensorboard=false'])
    train.main(['train.py'])
  finally:
    gin.clear_config()
    train.FLAGS.unparse_flags()
  config = open(os.path.join(tmp_path, 'config.gin')).read()
  assert "VariantLM.variant = 'token_shift'" in config
  printed = capsys.readouterr().out
  assert 'train step 2' in printed and 'sample: ' in printed  # predict mode decodes


def test_read_curve_times_and_resumed_duplicates(tmp_path):
  """seconds = sum of interval steps * batch * seq / tokens_per_s; a step
  logged twice (resumed run) keeps its last record."""
  records = [('train', 2, 5.0, 100.0), ('train', 4, 4.0, 200.0), ('eval', 4, 3.9, None),
             ('train', 4, 3.5, 400.0), ('train', 6, 3.0, 50.0)]
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    for split, step, loss, tps in records:
      r = {'split': split, 'step': step, 'time': 0.0, 'loss': loss}
      if tps:
        r['tokens_per_s'] = tps
      f.write(json.dumps(r) + '\n')
  curve = lab.read_curve(str(tmp_path), batch_size=2, seq_len=5)
  assert [c[0] for c in curve] == [2, 4, 6]
  assert [c[1] for c in curve] == [20, 40, 60]
  assert [c[3] for c in curve] == [5.0, 3.5, 3.0]
  assert [c[2] for c in curve] == pytest.approx([0.2, 0.2 + 0.05, 0.25 + 0.4])
  assert lab._first_reaching(curve, 3.6) == (4, pytest.approx(0.25))  # pylint: disable=protected-access
  assert lab._first_reaching(curve, 2.0) is None  # pylint: disable=protected-access


def test_report_only_without_runs_lists_them_as_missing(tmp_path):
  args = _args(str(tmp_path), '--report_only')
  report = open(lab.run_sweep(args)).read()
  assert '| baseline | 0 |' in report
  assert 'Not finished (rerun the command to train them): baseline seed 0, primer_ez seed 0' in report
