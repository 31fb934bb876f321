"""train.py from the command line: gin files, flags, resume, and bad input."""
import os
import subprocess
import sys

import gin
import pytest

import train
from training import checkpoint as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'gin', 'baseline', 'tiny.gin')


@pytest.fixture(autouse=True)
def _fresh_state():
  gin.clear_config()
  train.FLAGS.unparse_flags()
  yield
  gin.clear_config()
  train.FLAGS.unparse_flags()


def _main(*argv):
  """Runs train.py's main in this process; returns (exit code, stderr)."""
  train.FLAGS(['train.py', *argv])
  try:
    train.main(['train.py'])
    return 0
  except SystemExit as e:
    return e.code


def _error(capsys, *argv):
  code = _main(*argv)
  err = capsys.readouterr().err
  assert code == 1, err
  lines = [l for l in err.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1, err
  return lines[0]


def test_tiny_config_trains_and_resumes(tmp_path, capsys):
  out = str(tmp_path / 'run')
  assert _main(f'--gin_file={TINY}', f'--output_dir={out}', '--steps=10') == 0
  assert C.latest(out).endswith('ckpt_000000010')
  gin.clear_config()
  train.FLAGS.unparse_flags()
  assert _main(f'--gin_file={TINY}', f'--output_dir={out}', '--steps=20',
               '--gin_param=DecoderLM.n_layers=2') == 0
  printed = capsys.readouterr().out
  assert 'resumed from' in printed and 'train step 20' in printed
  assert 'sample: ' in printed


def test_primer_ez_tiny_config_trains(tmp_path, capsys):
  out = str(tmp_path)
  assert _main(f"--gin_file={os.path.join(ROOT, 'gin', 'primer', 'tiny.gin')}",
               f'--output_dir={out}', '--steps=10') == 0
  assert 'primer_trax.SquaredRelu' in open(os.path.join(out, 'config.gin')).read()
  assert 'train step 10' in capsys.readouterr().out


def test_missing_gin_file(tmp_path, capsys):
  line = _error(capsys, '--gin_file=/no/such.gin', f'--output_dir={tmp_path}')
  assert "Cannot read gin file '/no/such.gin'" in line and 'gin/' in line


def test_malformed_gin_file(tmp_path, capsys):
  bad = tmp_path / 'bad.gin'
  bad.write_text('DecoderLM.n_layers = = 3\n')
  line = _error(capsys, f'--gin_file={bad}', f'--output_dir={tmp_path}')
  assert 'is malformed or binds an unknown name' in line


def test_unknown_gin_binding(tmp_path, capsys):
  line = _error(capsys, '--gin_param=DecoderLM.n_layerz=3', f'--output_dir={tmp_path}')
  assert "gin binding 'DecoderLM.n_layerz=3' is invalid" in line


def test_unreadable_dataset(tmp_path, capsys):
  line = _error(capsys, f'--gin_file={TINY}', f'--output_dir={tmp_path}',
                '--dataset=/no/such/corpus.txt')
  assert '/no/such/corpus.txt' in line


def test_corrupted_checkpoint_is_reported_and_untouched(tmp_path, capsys):
  out = str(tmp_path)
  assert _main(f'--gin_file={TINY}', f'--output_dir={out}', '--steps=10') == 0
  npz = os.path.join(C.latest(out), 'arrays.npz')
  with open(npz, 'r+b') as f:
    f.seek(100)
    f.write(b'garbage')
  before = open(npz, 'rb').read()
  gin.clear_config()
  train.FLAGS.unparse_flags()
  line = _error(capsys, f'--gin_file={TINY}', f'--output_dir={out}', '--steps=20')
  assert 'is corrupted' in line and 'move it out of the run directory' in line
  assert open(npz, 'rb').read() == before
  assert C.latest(out).endswith('ckpt_000000010')


def test_command_line_flags_and_help():
  """The real CLI: --helpshort documents the flags; a bad enum value is refused."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  helped = subprocess.run([sys.executable, 'train.py', '--helpshort'], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
  for flag in ('--gin_file', '--gin_param', '--output_dir', '--steps',
               '--eval_every', '--seed', '--dataset'):
    assert flag in helped.stdout
  bad = subprocess.run([sys.executable, 'train.py', '--compute_dtype=float8',
                        '--output_dir=/tmp/x'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0
  assert 'value should be one of <float32|bfloat16|float16>' in bad.stderr
  missing = subprocess.run([sys.executable, 'train.py'], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
  assert missing.returncode != 0 and '--output_dir is required' in missing.stderr


def test_device_flags_are_checked(tmp_path, capsys):
  """--num_devices beyond the devices present, and incomplete jax.distributed
  flags (a real process: jax.distributed must start before JAX computes)."""
  line = _error(capsys, f'--gin_file={TINY}', f'--output_dir={tmp_path}',
                '--num_devices=2')
  assert 'num_devices must be between 1 and the 1 devices available, not 2' in line
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  env.pop('JAX_COORDINATOR_ADDRESS', None)
  bad = subprocess.run([sys.executable, 'train.py', f'--output_dir={tmp_path}',
                        '--num_processes=2'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1
  lines = [l for l in bad.stderr.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1 and 'cannot start jax.distributed' in lines[0]
  assert '--coordinator_address=HOST:PORT, --num_processes and --process_id' in lines[0]
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints'))


@pytest.mark.parametrize('path', sorted(
    os.path.relpath(os.path.join(d, f), ROOT)
    for d, _, files in os.walk(os.path.join(ROOT, 'gin')) for f in files
    if f.endswith('.gin')))
def test_shipped_gin_files_parse(path):
  """Every config under gin/ parses and binds only names that exist."""
  train.parse_gin([os.path.join(ROOT, path)], [])  # from any cwd
  assert gin.get_bindings('training.train') or gin.get_bindings('DecoderLM')


def test_decode_from_a_checkpoint(tmp_path, capsys):
  """training.decode rebuilds the model from the run folder and continues a prompt."""
  from training import decode
  from training import run
  out = str(tmp_path)
  assert _main(f'--gin_file={TINY}', f'--output_dir={out}', '--steps=10',
               '--compute_dtype=bfloat16') == 0
  model_fn, tokenizer, weights, dtype, meta = decode.load_run(out)
  assert meta['vocab_size'] == 256 and dtype is not None
  from training import sampling
  sampler = sampling.Sampler(model_fn(vocab_size=256, mode='predict'), batch_size=2,
                             compute_dtype=dtype)
  prompt = tokenizer.encode('The ')[None].repeat(2, 0)
  greedy = sampler.generate(weights, prompt, 12, temperature=0.0)
  assert greedy.shape == (2, 12) and (greedy[0] == greedy[1]).all()
  with pytest.raises(run.UserError, match='holds no checkpoint'):
    decode.load_run(str(tmp_path / 'empty'))
