r"""Trains a language model from flags and gin files.

    python train.py --gin_file=gin/baseline/small.gin --output_dir=runs/small

Flags set the run (where, how long, which data); gin files and --gin_param
set the model, optimizer and schedule (see gin/).  A flag given on the command
line overrides the same setting in gin.  Rerunning the same command resumes
from the newest checkpoint in --output_dir.

Several devices: every local device is used (data parallel: the global
--batch_size is split across them; --num_devices uses fewer, and
--shard_optimizer splits the optimizer state across them).  Several hosts:
start the same command on every host with --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (or --distributed on SLURM, Open MPI and
TPU pods, or with JAX_COORDINATOR_ADDRESS etc. set, where JAX detects them);
--output_dir must then be on a filesystem all hosts share.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')  # TensorFlow (imported by trax) is chatty.

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_multi_string('gin_file', [], 'gin config file(s), applied in order.')
flags.DEFINE_multi_string('gin_param', [],
                          'gin bindings, e.g. "training.DecoderLM.n_layers=4"; '
                          'applied after the files.')
flags.DEFINE_string('output_dir', None,
                    'run folder: checkpoints, metrics.jsonl, tb/, samples.txt. '
                    'Resumes from its newest checkpoint.')
flags.DEFINE_integer('steps', None, 'total training steps.')
flags.DEFINE_integer('eval_every', None, 'evaluate every this many steps (0: never).')
flags.DEFINE_integer('log_every', None, 'log training metrics every this many steps.')
flags.DEFINE_integer('checkpoint_every', None, 'checkpoint every this many steps.')
flags.DEFINE_integer('keep_checkpoints', None, 'how many newest checkpoints to keep.')
flags.DEFINE_integer('seed', None, 'random seed (init, data order, dropout, sampling).')
flags.DEFINE_string('dataset', None,
                    'python_docs (built in), a text file path, or tfds:NAME '
                    '(e.g. tfds:lm1b, tfds:c4/en, tfds:scientific_papers/arxiv).')
flags.DEFINE_enum('tokenizer', None, ['byte', 'spm'],
                  'byte-level, or SentencePiece (trained on the data if no '
                  '--vocab_file).')
flags.DEFINE_string('vocab_file', None, 'SentencePiece .model file.')
flags.DEFINE_string('data_dir', None, 'TFDS data directory.')
flags.DEFINE_integer('batch_size', None, 'sequences per batch.')
flags.DEFINE_integer('seq_len', None, 'tokens per sequence (encoder inputs of a '
                     'sequence-to-sequence dataset).')
flags.DEFINE_integer('target_len', None, 'target tokens per example of a '
                     'sequence-to-sequence dataset (copy, spans:..., summarize:...).')
flags.DEFINE_enum('compute_dtype', None, ['float32', 'bfloat16', 'float16'],
                  'dtype of the matmuls; weights stay float32.')
flags.DEFINE_integer('sample_length', None, 'tokens of text generated at the end.')
flags.DEFINE_string('sample_prompt', None, 'prompt of the text generated at the end.')
flags.DEFINE_bool('tensorboard', None, 'write TensorBoard event files.')
flags.DEFINE_integer('num_devices', None,
                     'train on the first n local devices (default: all devices '
                     'of all processes; the batch is split across them).')
flags.DEFINE_bool('shard_optimizer', None,
                  'split the optimizer slots across the devices (ZeRO-1) to '
                  'save memory.')
flags.DEFINE_string('coordinator_address', None,
                    'HOST:PORT of process 0, to train with several processes '
                    '(jax.distributed); with --num_processes and --process_id.')
flags.DEFINE_integer('num_processes', None, 'number of processes (jax.distributed).')
flags.DEFINE_integer('process_id', None, "this process's index, 0 .. num_processes-1.")
flags.DEFINE_bool('distributed', False,
                  'initialise jax.distributed, detecting the cluster (SLURM, '
                  'Open MPI, TPU, JAX_COORDINATOR_ADDRESS) for flags not given.')

# Flags that map one to one onto arguments of training.run.train.
_TRAIN_ARGS = ('steps', 'eval_every', 'log_every', 'checkpoint_every',
               'keep_checkpoints', 'seed', 'dataset', 'tokenizer', 'vocab_file',
               'data_dir', 'batch_size', 'seq_len', 'target_len', 'compute_dtype',
               'sample_length', 'sample_prompt', 'tensorboard', 'num_devices',
               'shard_optimizer')


def init_distributed(coordinator_address=None, num_processes=None,
                     process_id=None, auto=False):
  """Starts jax.distributed if the flags or JAX_COORDINATOR_ADDRESS ask for it.

  Must run before JAX touches a device.  Returns whether it started; raises
  ValueError (a message naming the flags) if it cannot.
  """
  given = [coordinator_address, num_processes, process_id]
  if not (auto or any(v is not None for v in given)
          or os.environ.get('JAX_COORDINATOR_ADDRESS')):
    return False
  import jax  # pylint: disable=g-import-not-at-top
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
  except (ValueError, TypeError, RuntimeError) as e:
    raise ValueError(
        f'cannot start jax.distributed ({_first_line(e)}); give all of '
        '--coordinator_address=HOST:PORT, --num_processes and --process_id, '
        'or run where JAX detects the cluster (SLURM, Open MPI, TPU).') from None
  return True


def parse_gin(files, bindings):
  """Applies gin files then bindings; raises run.UserError on any problem."""
  import gin  # pylint: disable=g-import-not-at-top
  from training import run  # pylint: disable=g-import-not-at-top
  import training.configurables  # pylint: disable=g-import-not-at-top,unused-import
  # `include 'gin/...'` lines resolve against the project root from any cwd.
  gin.add_config_file_search_path(os.path.dirname(os.path.abspath(__file__)))
  for path in files:
    try:
      gin.parse_config_file(path)
    except (OSError, IOError) as e:
      raise run.UserError(
          f'Cannot read gin file {path!r} ({e.__class__.__name__}); check the '
          'path (the configs shipped with the project are under gin/).') from None
    except Exception as e:  # pylint: disable=broad-except
      raise run.UserError(
          f'gin file {path!r} is malformed or binds an unknown name: '
          f'{_first_line(e)}; fix that line (see gin/ for working configs).') from None
  for binding in bindings:
    try:
      gin.parse_config(binding)
    except Exception as e:  # pylint: disable=broad-except
      raise run.UserError(
          f'gin binding {binding!r} is invalid: {_first_line(e)}; bindings look '
          'like "training.DecoderLM.n_layers=4".') from None


def _first_line(e):
  return str(e).strip().splitlines()[0] if str(e).strip() else repr(e)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}; all options are '
                         '--flags (see --helpshort).')
  if not FLAGS.output_dir:
    raise app.UsageError('--output_dir is required: the folder for this run '
                         '(it is resumed if it holds checkpoints).')
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  try:
    init_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                     FLAGS.process_id, FLAGS.distributed)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  from training import run  # pylint: disable=g-import-not-at-top
  try:
    parse_gin(FLAGS.gin_file, FLAGS.gin_param)
    overrides = {name: getattr(FLAGS, name) for name in _TRAIN_ARGS
                 if getattr(FLAGS, name) is not None}
    run.train(FLAGS.output_dir, **overrides)
  except run.UserError as e:
    message = str(e).split('\n  In call to configurable')[0]  # gin's addition
    print(f'error: {message}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
