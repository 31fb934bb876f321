r"""Generates text from a trained run's newest checkpoint.

    python -m training.decode --output_dir=runs/small --prompt='The ' --length=100

The run's folder holds what decoding needs: `config.gin` (the model) and the
checkpoints, whose metadata names the tokenizer.  Decoding runs in 'predict'
mode with the whole loop on the device (`training.sampling`).

A sequence-to-sequence run (an encoder-decoder trained on copy, spans:... or
summarize:...) decodes targets for the encoder inputs given as --prompt (text,
or space-separated ids for the copy task), truncated to the run's input
length; greedy with --temperature=0:

    python -m training.decode --output_dir=runs/copy --prompt='3 5 7 2' --temperature=0
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

FLAGS = flags.FLAGS


def define_flags():
  """Defined only when run as a program, so train.py's flags don't clash."""
  flags.DEFINE_string('output_dir', None, 'a run folder written by train.py.')
  flags.DEFINE_string('checkpoint', None, 'a checkpoint folder (default: the newest).')
  flags.DEFINE_string('prompt', 'The ', 'text to continue (a seq2seq run: the '
                      'encoder input).')
  flags.DEFINE_integer('length', 100, 'tokens to generate.')
  flags.DEFINE_integer('num_samples', 1, 'continuations decoded together (batched).')
  flags.DEFINE_float('temperature', 0.8, 'sampling temperature; 0 is greedy.')
  flags.DEFINE_integer('top_k', None, 'sample among the k most likely tokens.')
  flags.DEFINE_integer('seed', 0, 'sampling seed.')

def load_run(run_dir, checkpoint=None):
  """(model_fn, tokenizer, weights, compute_dtype, meta) of a train.py run."""
  import gin  # pylint: disable=g-import-not-at-top
  from training import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from training import configurables  # pylint: disable=g-import-not-at-top,unused-import
  from training import data as data_lib  # pylint: disable=g-import-not-at-top
  from training import model as model_lib  # pylint: disable=g-import-not-at-top
  from training import run  # pylint: disable=g-import-not-at-top
  from trax import shapes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  path = checkpoint or ckpt_lib.latest(run_dir)
  config = os.path.join(run_dir, 'config.gin')
  if not path or not os.path.exists(config):
    raise run.UserError(f'{run_dir} holds no checkpoint and config.gin; pass '
                        'the --output_dir of a train.py run.')
  gin.clear_config()
  gin.parse_config_file(config)
  bindings = gin.get_bindings('training.train')
  model_fn = bindings.get('model', model_lib.DecoderLM)
  meta = ckpt_lib.read_metadata(path)['metadata']
  if 'input_len' in meta:  # sequence-to-sequence run
    from training import seq2seq  # pylint: disable=g-import-not-at-top
    tokenizer = seq2seq.tokenizer_for_run(meta['dataset'], meta['vocab_size'],
                                          meta.get('vocab_file'))
  else:
    tokenizer = (data_lib.SentencePieceTokenizer(meta['vocab_file'])
                 if meta.get('vocab_file') else data_lib.ByteTokenizer())
  template = model_fn(vocab_size=meta['vocab_size'], mode='eval')
  ids = shapes.ShapeDtype((1, 1), np.int32)
  template.init((ids, ids) if template.n_in == 2 else ids)
  try:
    trees, _ = ckpt_lib.restore(path, {'weights': template.weights})
  except ckpt_lib.CheckpointError as e:
    raise run.UserError(str(e)) from None
  dtype = run.DTYPES[meta.get('compute_dtype', 'float32')]
  return model_fn, tokenizer, trees['weights'], dtype, meta


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS.output_dir:
    raise app.UsageError('--output_dir is required: a run folder of train.py.')
  from training import run  # pylint: disable=g-import-not-at-top
  from training import sampling  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  try:
    model_fn, tokenizer, weights, dtype, meta = load_run(
        FLAGS.output_dir, FLAGS.checkpoint)
  except run.UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  if 'input_len' in meta:
    _decode_seq2seq(model_fn, tokenizer, weights, dtype, meta)
    return
  sampler = sampling.Sampler(model_fn(vocab_size=meta['vocab_size'], mode='predict'),
                             batch_size=FLAGS.num_samples, compute_dtype=dtype)
  prompt = np.tile(tokenizer.encode(FLAGS.prompt)[None], (FLAGS.num_samples, 1))
  try:
    out = sampler.generate(weights, prompt, FLAGS.length, FLAGS.temperature,
                           FLAGS.top_k, FLAGS.seed)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  for row in out:
    print(FLAGS.prompt + tokenizer.decode(row))


def decode_seq2seq(model_fn, tokenizer, weights, compute_dtype, meta, text,
                   length, num_samples=1, temperature=0.0, top_k=None, seed=0):
  """Target texts an encoder-decoder run decodes for the encoder input `text`.

  The input is tokenized, cut to the run's input length and 0-padded; each
  output stops after the first EOS.
  """
  from training import sampling  # pylint: disable=g-import-not-at-top
  from training import seq2seq  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  input_len = meta['input_len']
  ids = tokenizer.encode(text)[:input_len]
  inputs = np.zeros((num_samples, input_len), np.int32)
  inputs[:, :len(ids)] = ids
  sampler = sampling.Sampler(model_fn(vocab_size=meta['vocab_size'], mode='predict'),
                             batch_size=num_samples, compute_dtype=compute_dtype,
                             input_len=input_len)
  out = sampler.decode(weights, inputs, length, temperature, top_k, seed)
  texts = []
  for row in out:
    if not isinstance(tokenizer, seq2seq.IdTokenizer):
      ends = np.flatnonzero(row == tokenizer.eos_id)
      row = row[:ends[0]] if len(ends) else row
    texts.append(seq2seq.decode_ids(tokenizer, meta['vocab_size'], row))
  return texts


def _decode_seq2seq(model_fn, tokenizer, weights, dtype, meta):
  try:
    texts = decode_seq2seq(model_fn, tokenizer, weights, dtype, meta, FLAGS.prompt,
                           FLAGS.length, FLAGS.num_samples, FLAGS.temperature,
                           FLAGS.top_k, FLAGS.seed)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  for text in texts:
    print(text)


if __name__ == '__main__':
  define_flags()
  app.run(main)
