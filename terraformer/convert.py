"""Load a trax `ConfigurableTerraformer` checkpoint into our model's weights.

trax writes a checkpoint as `<name>.pkl.gz`, a gzipped *pickle* of a dict
whose 'flat_weights' is either the list of weight arrays itself (older
checkpoints, `Layer.save_to_file`) or an int (the gzip level, newer
`training.Loop.save_checkpoint`, the format of the released
gs://trax-ml/terraformer/medium and big checkpoints), in which case the arrays
are in `<name>.weights.npy.gz`, one `np.save` after another (bfloat16 arrays
stored as uint16 bits).  The list holds the model's non-empty weight arrays in
the order trax's `tree_flatten` visits them.

SECURITY: unpickling a file runs code that the file names.  `.pkl.gz` files
are read only with the explicit opt-in `allow_pickle=True` (`--allow_pickle`
on the command line); without it they are refused with a ValueError.  Only
opt in for files you trust.  The `.weights.npy.gz` file next to a newer
checkpoint holds plain arrays and is read without pickle (no opt-in needed):
pass its path instead when you can.

`terraformer.terraformer.ConfigurableTerraformer` built with the same
arguments as the trax model has the same weight arrays in the same order, so
`weights_from_flat` walks our model and takes the arrays in turn; the layers
whose layout differs from trax's are mapped on the way:
  - `SparseFF`: W1 (d_model, d1, N) -> (d1, N, d_model) and W2
    (N, d1, d_model) -> (d1, N, d_model) (see `sparse_ff.weights_from_trax`);
  - `LocallyConvDense` with one module: trax's Dense kernel (C, M) ->
    conv kernel (1, 1, C, M) (see `sparse_qkv.weights_from_trax`);
  - a layer used twice (the shared input/output embedding) takes its arrays
    once, as trax stores it once.
Every array's shape is checked: the first misfit raises ValueError naming the
weight's path in our model and both shapes.

Command line (writes a checkpoint of this project, training/checkpoint.py):

    python -m terraformer.convert --checkpoint model_200000.pkl.gz \\
        --allow_pickle --gin_file gin/terraformer/scientific_papers_lsh.gin \\
        --output_dir runs/converted --input_length 15360 --target_length 1024
"""

import gzip
import pickle

from absl import app
from absl import flags
import ml_dtypes
import numpy as np
from trax.layers import base

from terraformer import sparse_ff
from terraformer import sparse_qkv

_NPY_SUFFIX = '.weights.npy.gz'
_PKL_SUFFIX = '.pkl.gz'


def read_npy_gz(path):
  """The arrays of a trax `.npy.gz` weights file (no pickle involved)."""
  arrays = []
  with gzip.open(path, 'rb') as f:
    while f.peek(1):
      arrays.append(np.load(f, allow_pickle=False))
  return [a.view(ml_dtypes.bfloat16) if a.dtype == np.uint16 else a
          for a in arrays]


def read_trax_checkpoint(path, allow_pickle=False):
  """The flat weight arrays of a trax checkpoint.

  Args:
    path: `<name>.pkl.gz` (a pickle: needs allow_pickle=True) or
      `<name>.weights.npy.gz` (plain arrays, read without pickle).
    allow_pickle: opt-in to unpickle a `.pkl.gz` file.  Unpickling runs code
      named by the file: only for files you trust.

  Returns:
    The list of weight arrays (numpy), in trax's order.

  Raises:
    ValueError: a pickle without the opt-in, or not a trax checkpoint.
    FileNotFoundError: the file, or the weights file it points to, is missing.
  """
  path = str(path)
  if path.endswith(_NPY_SUFFIX):
    return read_npy_gz(path)
  if not allow_pickle:
    raise ValueError(
        f'{path} is a pickle, and unpickling runs code named by the file. '
        f'Pass allow_pickle=True (--allow_pickle) if you trust it, or pass '
        f'the <name>{_NPY_SUFFIX} file next to it, which is read without '
        f'pickle.')
  with gzip.open(path, 'rb') as f:
    d = pickle.load(f)
  if not isinstance(d, dict) or 'flat_weights' not in d:
    raise ValueError(f'{path} is not a trax checkpoint: no flat_weights.')
  flat = d['flat_weights']
  if isinstance(flat, int):  # Newer format: arrays in a separate file.
    stem = path[:-len(_PKL_SUFFIX)] if path.endswith(_PKL_SUFFIX) else path
    return read_npy_gz(stem + _NPY_SUFFIX)
  return [np.asarray(a) for a in flat]


def _array_paths(tree, prefix):
  """(path, leaf) pairs of a weight tree, in flatten order."""
  if isinstance(tree, dict):
    return []  # the cached-weights marker, or empty
  if isinstance(tree, (tuple, list)):
    out = []
    for i, sub in enumerate(tree):
      out += _array_paths(sub, f'{prefix}[{i}]')
    return out
  if tree is None:
    return []
  return [(prefix, tree)]


def weights_from_flat(model, flat_weights):
  """Our model's weight tree from trax's flat weight list.

  Args:
    model: an initialised `ConfigurableTerraformer` (any mode) built with the
      same arguments as the trax model that wrote `flat_weights`.
    flat_weights: list of arrays, as `read_trax_checkpoint` returns.

  Returns:
    A weight tree for `model` (assign to `model.weights`), arrays in the
    dtypes of the model's own weights.

  Raises:
    ValueError: naming the first weight path whose shape differs (and both
      shapes), or if the checkpoint has more or fewer arrays than the model.
  """
  arrays = list(flat_weights)
  position = [0]
  seen = set()

  def take(path, shape, dtype):
    i = position[0]
    if i >= len(arrays):
      raise ValueError(
          f'The checkpoint has {len(arrays)} weight arrays, fewer than the '
          f'model: none left for {path} (shape {tuple(shape)}); the model '
          f'config differs from the checkpoint\'s.')
    position[0] += 1
    array = np.asarray(arrays[i])
    if array.shape != tuple(shape):
      raise ValueError(
          f'Weight {path} (checkpoint array #{i}) has shape {array.shape} in '
          f'the checkpoint but {tuple(shape)} in the model; build the model '
          f'with the checkpoint\'s config.')
    return array.astype(dtype)

  def fill(layer, path):
    path = f'{path}/{layer.name}'
    if id(layer) in seen and _has_arrays(layer.weights):
      return base.GET_WEIGHTS_FROM_CACHE
    seen.add(id(layer))
    if isinstance(layer, sparse_ff.SparseFF):
      m1, m2, mb, w1, w2, b2 = layer.weights
      d1, n, d = w1.shape
      out = [take(f'{path}.{name}', w.shape, w.dtype)
             for name, w in (('m1', m1), ('m2', m2), ('mb', mb))]
      out.append(np.transpose(take(f'{path}.w1', (d, d1, n), w1.dtype),
                              (1, 2, 0)))
      out.append(np.transpose(take(f'{path}.w2', (n, d1, d), w2.dtype),
                              (1, 0, 2)))
      out.append(take(f'{path}.b2', b2.shape, b2.dtype))
      return tuple(out)
    if isinstance(layer, sparse_qkv.LocallyConvDense) and layer.n_modules == 1:
      kernel, bias = layer.weights
      k = take(f'{path}.kernel', kernel.shape[2:], kernel.dtype)
      return (k.reshape(kernel.shape), take(f'{path}.bias', bias.shape,
                                            bias.dtype))
    if layer.sublayers:
      return tuple(fill(s, f'{path}[{i}]')
                   for i, s in enumerate(layer.sublayers))
    weights = layer.weights
    leaves = _array_paths(weights, path)
    if not leaves:
      return weights
    filled = iter([take(p, w.shape, w.dtype) for p, w in leaves])
    return _rebuild(weights, filled)

  converted = fill(model, '')
  if position[0] != len(arrays):
    raise ValueError(
        f'The checkpoint has {len(arrays)} weight arrays but the model takes '
        f'{position[0]}: the model config differs from the checkpoint\'s '
        f'(next unused: array #{position[0]}, shape '
        f'{np.shape(arrays[position[0]])}).')
  return converted


def _has_arrays(tree):
  return bool(_array_paths(tree, ''))


def _rebuild(tree, filled):
  if isinstance(tree, dict) or tree is None:
    return tree
  if isinstance(tree, (tuple, list)):
    return type(tree)(_rebuild(t, filled) for t in tree)
  return next(filled)


def load_trax_checkpoint(model, path, allow_pickle=False):
  """Reads a trax checkpoint into `model` (initialised); returns the weights.

  See `read_trax_checkpoint` for `allow_pickle` (unpickling runs code: only
  for trusted files) and `weights_from_flat` for the mapping and errors.
  """
  weights = weights_from_flat(model, read_trax_checkpoint(path, allow_pickle))
  model.weights = weights
  return model.weights


# ----------------------------------------------------------------------------
# Command line.

FLAGS = flags.FLAGS


def _define_flags():
  """Command-line flags, defined only when run as a program (train.py defines
  flags of the same names, and both may be imported in one process)."""
  flags.DEFINE_string('checkpoint', None, 'trax checkpoint: <name>.pkl.gz '
                      '(needs --allow_pickle) or <name>.weights.npy.gz.')
  flags.DEFINE_bool('allow_pickle', False, 'Unpickle a .pkl.gz checkpoint. '
                    'Unpickling runs code named by the file: trusted files only.')
  flags.DEFINE_multi_string('gin_file', [], 'Gin files configuring '
                            'terraformer.ConfigurableTerraformer.')
  flags.DEFINE_multi_string('gin_param', [], 'Extra gin bindings.')
  flags.DEFINE_string('output_dir', None, 'Run directory to write our '
                      'checkpoint to (training/checkpoint.py format, step 0).')
  flags.DEFINE_integer('input_length', 512, 'Input length to initialise with.')
  flags.DEFINE_integer('target_length', 256, 'Target length to initialise with.')
  flags.DEFINE_integer('vocab_size', None, 'input_vocab_size (if gin does not '
                       'bind it).')


def main(argv):
  del argv
  # pylint: disable=g-import-not-at-top
  import gin
  from trax import shapes
  from jax import numpy as jnp
  from terraformer import terraformer
  from training import checkpoint as ckpt_lib
  # pylint: enable=g-import-not-at-top
  if not FLAGS.checkpoint or not FLAGS.output_dir:
    raise app.UsageError('--checkpoint and --output_dir are required.')
  gin.parse_config_files_and_bindings(FLAGS.gin_file, FLAGS.gin_param)
  kwargs = {'mode': 'eval'}
  if FLAGS.vocab_size:
    kwargs['input_vocab_size'] = FLAGS.vocab_size
  model = terraformer.ConfigurableTerraformer(**kwargs)
  model.init((shapes.ShapeDtype((1, FLAGS.input_length), jnp.int32),
              shapes.ShapeDtype((1, FLAGS.target_length), jnp.int32)))
  weights = load_trax_checkpoint(model, FLAGS.checkpoint,
                                 allow_pickle=FLAGS.allow_pickle)
  path = ckpt_lib.save(FLAGS.output_dir, 0, {'weights': weights},
                       metadata={'converted_from': str(FLAGS.checkpoint)})
  print(f'Wrote {path}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
