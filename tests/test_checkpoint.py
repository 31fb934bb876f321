"""Checkpoints: round trip, retention, atomicity, corruption and mismatch errors."""
import hashlib
import json
import os

import ml_dtypes
import numpy as np
import pytest

from training import checkpoint as C


def _trees(scale=1.0):
  return {'weights': ((np.arange(6, dtype=np.float32).reshape(2, 3) * scale, ()),
                      {'b': (np.ones(4) * scale).astype(ml_dtypes.bfloat16)}),
          'slots': (np.zeros(3, np.float32),)}


def _digest(run_dir):
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(run_dir)):
    for name in sorted(files):
      with open(os.path.join(root, name), 'rb') as f:
        h.update(name.encode() + f.read())
  return h.hexdigest()


def test_round_trip_keeps_values_and_dtypes(tmp_path):
  path = C.save(str(tmp_path), 7, _trees(2.0), metadata={'note': 'x'})
  got, meta = C.restore(path, _trees())
  assert meta['step'] == 7 and meta['metadata'] == {'note': 'x'}
  np.testing.assert_array_equal(got['weights'][0][0], _trees(2.0)['weights'][0][0])
  assert got['weights'][1]['b'].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got['weights'][1]['b'].astype(np.float32), 2.0)


def test_keeps_newest_n_and_leaves_no_temporaries(tmp_path):
  for step in (1, 2, 3, 4):
    C.save(str(tmp_path), step, _trees(), keep=2)
  names = sorted(os.listdir(C.checkpoint_dir(str(tmp_path))))
  assert names == ['ckpt_000000003', 'ckpt_000000004']
  assert C.latest(str(tmp_path)).endswith('ckpt_000000004')


def test_corrupted_arrays_are_detected_and_left_alone(tmp_path):
  path = C.save(str(tmp_path), 1, _trees())
  npz = os.path.join(path, 'arrays.npz')
  data = bytearray(open(npz, 'rb').read())
  data[len(data) // 2] ^= 0xFF
  open(npz, 'wb').write(bytes(data))
  before = _digest(str(tmp_path))
  with pytest.raises(C.CheckpointError, match='corrupted'):
    C.restore(path, _trees())
  assert _digest(str(tmp_path)) == before


def test_unreadable_metadata(tmp_path):
  path = C.save(str(tmp_path), 1, _trees())
  open(os.path.join(path, 'meta.json'), 'w').write('{not json')
  with pytest.raises(C.CheckpointError, match='unreadable or corrupted'):
    C.restore(path, _trees())


def test_other_format_version(tmp_path):
  path = C.save(str(tmp_path), 1, _trees())
  meta = json.load(open(os.path.join(path, 'meta.json')))
  meta['format_version'] = 99
  json.dump(meta, open(os.path.join(path, 'meta.json'), 'w'))
  with pytest.raises(C.CheckpointError, match='format version 99'):
    C.restore(path, _trees())


def test_incompatible_model(tmp_path):
  path = C.save(str(tmp_path), 1, _trees())
  other = _trees()
  other['weights'] = ((np.zeros((2, 4), np.float32), ()), {'b': other['weights'][1]['b']})
  with pytest.raises(C.CheckpointError, match=r'expects float32\(2, 4\)'):
    C.restore(path, other)
  fewer = {'weights': (np.zeros(1, np.float32),), 'slots': _trees()['slots']}
  with pytest.raises(C.CheckpointError, match='holds 2 weights arrays where the model has 1'):
    C.restore(path, fewer)
