r"""Trains a language model from flags and gin files.

    python train.py --gin_file=gin/baseline/small.gin --output_dir=runs/small

Flags set the run (where, how long, which data); gin files and --gin_param
set the model, optimizer and schedule (see gin/).  A flag given on the command
line overrides the same setting in gin.  Rerunning the same command resumes
from the newest checkpoint in --output_dir.
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
flags.DEFINE_integer('seq_len', None, 'tokens per sequence.')
flags.DEFINE_enum('compute_dtype', None, ['float32', 'bfloat16', 'float16'],
                  'dtype of the matmuls; weights stay float32.')
flags.DEFINE_integer('sample_length', None, 'tokens of text generated at the end.')
flags.DEFINE_string('sample_prompt', None, 'prompt of the text generated at the end.')
flags.DEFINE_bool('tensorboard', None, 'write TensorBoard event files.')

# Flags that map one to one onto arguments of training.run.train.
_TRAIN_ARGS = ('steps', 'eval_every', 'log_every', 'checkpoint_every',
               'keep_checkpoints', 'seed', 'dataset', 'tokenizer', 'vocab_file',
               'data_dir', 'batch_size', 'seq_len', 'compute_dtype',
               'sample_length', 'sample_prompt', 'tensorboard')


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
