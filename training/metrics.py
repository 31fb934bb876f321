"""Metrics to stdout, a JSONL file and TensorBoard event files.

Each record is `(split, step, {name: float})`, e.g. ('train', 100,
{'loss': 2.1, 'tokens_per_s': 5e4}).  Records append to
`<run_dir>/metrics.jsonl`, one JSON object per line, and to TensorBoard event
files under `<run_dir>/tb/<split>` (written through `tf.summary`, imported on
first use; pass tensorboard=False to skip TensorFlow entirely).
"""

import json
import math
import os
import sys
import time


def format_line(split, step, values):
  """'train step 100 | loss 2.1000 | tokens_per_s 50,000'."""
  parts = [f'{split} step {step}']
  for name, value in values.items():
    if isinstance(value, float) and abs(value) >= 100:
      parts.append(f'{name} {value:,.0f}')
    elif isinstance(value, float) and 0 < abs(value) < 1e-3:
      parts.append(f'{name} {value:.3g}')
    elif isinstance(value, float):
      parts.append(f'{name} {value:.4f}')
    else:
      parts.append(f'{name} {value}')
  return ' | '.join(parts)


class MetricsWriter:
  """Writes metric records to stdout, JSONL and (optionally) TensorBoard."""

  def __init__(self, run_dir, tensorboard=True, stream=None):
    os.makedirs(run_dir, exist_ok=True)
    self._jsonl = open(os.path.join(run_dir, 'metrics.jsonl'), 'a')
    self._tb_dir = os.path.join(run_dir, 'tb') if tensorboard else None
    self._tb_writers = {}
    self._stream = stream

  def _tb_writer(self, split):
    if split not in self._tb_writers:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tb_writers[split] = tf.summary.create_file_writer(
          os.path.join(self._tb_dir, split))
    return self._tb_writers[split]

  def write(self, split, step, values):
    values = {k: float(v) for k, v in values.items()}
    print(format_line(split, step, values), file=self._stream or sys.stdout,
          flush=True)
    record = {'split': split, 'step': int(step), 'time': time.time()}
    record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    if self._tb_dir:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      writer = self._tb_writer(split)
      with writer.as_default():
        for name, value in values.items():
          tf.summary.scalar(name, value, step=int(step))
      writer.flush()

  def close(self):
    self._jsonl.close()
    for writer in self._tb_writers.values():
      writer.close()


def read_jsonl(path, split=None):
  """The records of a metrics.jsonl file (optionally one split's), in order."""
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if split is None or r['split'] == split]
