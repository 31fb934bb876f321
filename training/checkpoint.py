"""Checkpoints as plain arrays (.npz) plus JSON: no pickle, written atomically.

Layout under a run's directory:

    checkpoints/ckpt_000001000/arrays.npz   every leaf of every saved tree
    checkpoints/ckpt_000001000/meta.json    step, leaf shapes and dtypes, the
                                            npz's sha256, and caller's metadata

A checkpoint is written to a temporary folder and renamed into place, so a
crash leaves either the whole checkpoint or none.  Only the newest `keep` are
kept.  Restoring checks the hash (corruption) and every leaf's shape and dtype
against the model being restored into (incompatibility), and fails with a
clear `CheckpointError` without touching any file.

Several devices and processes: a checkpoint always holds whole (global)
arrays, gathered to the host by `save` (arrays split across processes are
all-gathered, so every process calls `save`; only process 0 writes, and all
wait until it has).  `restore` returns host arrays that the caller places
with its current sharding, so a run can resume on any device count.  With
several processes the run directory must be on a filesystem they share.
"""

import hashlib
import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np

FORMAT_VERSION = 1
_PREFIX = 'ckpt_'


class CheckpointError(Exception):
  """A checkpoint that cannot be used; the message names the fix."""


def _sha256(path):
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _to_storable(x):
  """numpy array; bfloat16 and other ml_dtypes stored as same-width uints."""
  x = np.asarray(x)
  if x.dtype.kind == 'V' or x.dtype.type.__module__.startswith('ml_dtypes'):
    return x.view(np.dtype(f'uint{8 * x.dtype.itemsize}'))
  return x


def _from_stored(x, dtype_name):
  if x.dtype.name == dtype_name:
    return x
  return x.view(np.dtype(getattr(ml_dtypes, dtype_name)))


def checkpoint_dir(run_dir):
  return os.path.join(run_dir, 'checkpoints')


def list_checkpoints(run_dir):
  """Paths of complete checkpoints in `run_dir`, oldest first."""
  root = checkpoint_dir(run_dir)
  if not os.path.isdir(root):
    return []
  names = sorted(n for n in os.listdir(root)
                 if n.startswith(_PREFIX) and n[len(_PREFIX):].isdigit())
  return [os.path.join(root, n) for n in names]


def latest(run_dir):
  """The newest checkpoint's path, or None."""
  paths = list_checkpoints(run_dir)
  return paths[-1] if paths else None


def to_host(tree):
  """Every leaf as a numpy array of its global value, on any process.

  Arrays split across processes are all-gathered, so with several processes
  every process must call this at the same point.
  """
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree_util.tree_map(get, tree)


def _sync(name):
  """Waits for every process to reach this point (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def save(run_dir, step, trees, metadata=None, keep=3):
  """Writes `trees` (a dict of name -> pytree of arrays) as the step's checkpoint.

  Returns the checkpoint's path.  Older checkpoints beyond `keep` are removed.
  Device arrays, sharded or not, are gathered to the host first; with several
  processes every process must call this, and only process 0 writes.
  """
  host = {name: to_host(tree) for name, tree in trees.items()}
  final = os.path.join(checkpoint_dir(run_dir), f'{_PREFIX}{step:09d}')
  if jax.process_index() == 0:
    _write(run_dir, step, host, metadata, keep)
  _sync(f'checkpoint {final}')
  return final


def _write(run_dir, step, trees, metadata, keep):
  root = checkpoint_dir(run_dir)
  os.makedirs(root, exist_ok=True)
  final = os.path.join(root, f'{_PREFIX}{step:09d}')
  tmp = os.path.join(root, f'.tmp_{_PREFIX}{step:09d}_{os.getpid()}')
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  arrays, leaves = {}, {}
  for name, tree in trees.items():
    flat = jax.tree_util.tree_leaves(tree)
    leaves[name] = [[list(x.shape), x.dtype.name] for x in flat]
    for i, x in enumerate(flat):
      arrays[f'{name}/{i}'] = _to_storable(x)
  npz = os.path.join(tmp, 'arrays.npz')
  with open(npz, 'wb') as f:
    np.savez(f, **arrays)
    f.flush()
    os.fsync(f.fileno())
  meta = {'format_version': FORMAT_VERSION, 'step': int(step),
          'sha256': _sha256(npz), 'leaves': leaves,
          'metadata': metadata or {}}
  with open(os.path.join(tmp, 'meta.json'), 'w') as f:
    json.dump(meta, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  if os.path.exists(final):  # the same step saved again: replace it
    shutil.rmtree(final)
  os.replace(tmp, final)
  for old in list_checkpoints(run_dir)[:-keep] if keep else []:
    shutil.rmtree(old, ignore_errors=True)


def read_metadata(path):
  """The meta.json of the checkpoint at `path` as a dict."""
  meta_path = os.path.join(path, 'meta.json')
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(
        f'Checkpoint {path} is unreadable or corrupted ({e}); move it out of '
        'the run directory to resume from an older one, or start a new '
        '--output_dir.') from None
  if meta.get('format_version') != FORMAT_VERSION:
    raise CheckpointError(
        f'Checkpoint {path} has format version {meta.get("format_version")}, '
        f'this code reads version {FORMAT_VERSION}; use a matching version of '
        'this code or start a new --output_dir.')
  return meta


def restore(path, templates):
  """Reads the checkpoint at `path` into trees shaped like `templates`.

  Args:
    path: a checkpoint folder (see `latest`).
    templates: dict name -> pytree giving the structure, shapes and dtypes
      expected (e.g. freshly initialised weights and optimizer slots).

  Returns:
    (trees, meta): dict name -> pytree of numpy arrays (whole arrays, whatever
    the device count of the run that saved them), and the meta.json dict.

  Raises:
    CheckpointError: if the files are corrupted or do not fit `templates`.
  """
  meta = read_metadata(path)
  npz = os.path.join(path, 'arrays.npz')
  if not os.path.exists(npz) or _sha256(npz) != meta['sha256']:
    raise CheckpointError(
        f'Checkpoint {path} is corrupted (arrays.npz is missing or does not '
        'match its recorded sha256); move it out of the run directory to '
        'resume from an older one, or start a new --output_dir.')
  trees = {}
  with np.load(npz) as data:
    for name, template in templates.items():
      flat, treedef = jax.tree_util.tree_flatten(template)
      saved = meta['leaves'].get(name)
      if saved is None or len(saved) != len(flat):
        raise CheckpointError(
            f'Checkpoint {path} does not fit the configured model: it holds '
            f'{0 if saved is None else len(saved)} {name} arrays where the '
            f'model has {len(flat)}; use the gin config it was trained with '
            'or start a new --output_dir.')
      leaves = []
      for i, (want, (shape, dtype)) in enumerate(zip(flat, saved)):
        want_shape, want_dtype = tuple(np.shape(want)), np.dtype(want.dtype).name
        if tuple(shape) != want_shape or dtype != want_dtype:
          raise CheckpointError(
              f'Checkpoint {path} does not fit the configured model: {name} '
              f'array {i} is {dtype}{tuple(shape)} there but the model expects '
              f'{want_dtype}{want_shape}; use the gin config it was trained '
              'with or start a new --output_dir.')
        leaves.append(_from_stored(data[f'{name}/{i}'], dtype))
      trees[name] = jax.tree_util.tree_unflatten(treedef, leaves)
  return trees, meta
