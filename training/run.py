"""One training run: data -> model -> jitted steps -> metrics and checkpoints.

`train(run_dir, ...)` is what `train.py` calls after parsing flags and gin.  It
resumes from the newest checkpoint in `run_dir`, evaluates every `eval_every`
steps, logs every `log_every` steps, checkpoints every `checkpoint_every`
steps and at the end, and finishes with a sample of generated text.

Determinism: the batch, the dropout key and the learning rate of step s
depend only on (seed, s), and the optimizer state is checkpointed, so a run
resumed from a checkpoint computes exactly the losses an uninterrupted run
would (on the same machine and software).

Several devices: by default each global batch of `batch_size` sequences is
split across all devices (of all processes, once `jax.distributed` is
initialised, see train.py), with the weights replicated; `num_devices` uses
the first n devices of one process instead, and `shard_optimizer` splits the
optimizer slots across the devices (see `trainer.DataParallel`).  The losses
equal the single-device ones up to float32 rounding.  Checkpoints hold whole
arrays, written by process 0, so a run may resume on another device count:
the restored arrays are laid out anew for the devices at hand (only the global
batch size must divide by the new count).  Each process reads the global
batch of every step and places only its own devices' rows; metrics, samples
and checkpoints are written by process 0.
"""

import json
import math
import os
import queue
import threading
import time

import gin
import jax
from jax import numpy as jnp
import numpy as np


from training import checkpoint as ckpt_lib
from training import data as data_lib
from training import metrics as metrics_lib
from training import model as model_lib
from training import sampling
from training import seq2seq as seq2seq_lib
from training import trainer as trainer_lib

DTYPES = {'float32': None, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


class UserError(Exception):
  """A problem the user can fix; the message says what and how."""


class _NoMetrics:
  """Stands in for the MetricsWriter on processes other than 0."""

  def write(self, split, step, values):
    pass

  def close(self):
    pass


def _data_parallel(num_devices, shard_optimizer, batch_size):
  """The DataParallel layout for this run, or None to train on one device."""
  devices = jax.devices()
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise UserError(f'num_devices must be between 1 and the {len(devices)} '
                      f'devices available, not {num_devices}.')
    if jax.process_count() > 1 and num_devices != len(devices):
      raise UserError(
          f'num_devices {num_devices} differs from the {len(devices)} devices '
          f'of the {jax.process_count()} processes; with several processes '
          'every device is used: leave num_devices unset.')
    devices = devices[:num_devices]
  if len(devices) == 1:
    return None
  parallel = trainer_lib.DataParallel(devices, shard_optimizer)
  try:
    parallel.check_batch_size(batch_size)
  except ValueError as e:
    raise UserError(f'{e} (set --batch_size or --num_devices)') from None
  return parallel


def _default_optimizer():
  from trax import optimizers  # pylint: disable=g-import-not-at-top
  return optimizers.Adam(learning_rate=1e-3, weight_decay_rate=0.0)


def _default_schedule():
  from trax.supervised import lr_schedules  # pylint: disable=g-import-not-at-top
  return lr_schedules.multifactor(
      factors='constant * linear_warmup', constant=1e-3, warmup_steps=100)


def _prefetch(iterator, size=2):
  """Runs `iterator` in a background thread, `size` items ahead."""
  q = queue.Queue(maxsize=size)
  sentinel = object()

  def work():
    try:
      for item in iterator:
        q.put(item)
    except Exception as e:  # pylint: disable=broad-except
      q.put(e)
    q.put(sentinel)

  threading.Thread(target=work, daemon=True).start()
  while True:
    item = q.get()
    if item is sentinel:
      return
    if isinstance(item, Exception):
      raise item
    yield item


def _check_finite(value, step, run_dir):
  if not math.isfinite(value):
    last = ckpt_lib.latest(run_dir)
    kept = f'the newest checkpoint ({last}) is kept' if last else 'no checkpoint was written'
    raise UserError(
        f'The training loss became {value} at step {step}; {kept}. Lower the '
        'learning rate (e.g. --gin_param="multifactor.constant=3e-4"), clip '
        'gradients (--gin_param="training.train.clip_grad_norm=1.0") or compute in '
        'float32.')


def _make_dataset(dataset, tokenizer, vocab_file, data_dir, seq_len, batch_size,
                  seed, run_dir, target_len=None):
  try:
    return data_lib.make_dataset(
        dataset, seq_len=seq_len, batch_size=batch_size, seed=seed,
        tokenizer=tokenizer, vocab_file=vocab_file, data_dir=data_dir,
        cache_dir=os.path.join(run_dir, 'vocab'), target_len=target_len)
  except (ValueError, FileNotFoundError, OSError) as e:
    raise UserError(str(e)) from None


def _bytes_per_token(ds, eval_batches):
  """Average UTF-8 bytes per token on the eval data (1.0 for byte-level)."""
  if isinstance(ds.tokenizer, data_lib.ByteTokenizer):
    return 1.0
  ids = np.concatenate([b[1].reshape(-1) for b in eval_batches[:4]])
  return len(ds.tokenizer.decode(ids).encode('utf-8')) / max(len(ids), 1)


@gin.configurable(module='training', denylist=['run_dir'])
def train(run_dir, *, steps=1000, model=model_lib.DecoderLM, optimizer=None,
          lr_schedule=None, clip_grad_norm=None, batch_size=16, seq_len=256,
          dataset='python_docs', tokenizer='byte', vocab_file=None,
          data_dir=None, seed=0, compute_dtype='float32', log_every=50,
          eval_every=500, eval_batches=8, checkpoint_every=500,
          keep_checkpoints=3, tensorboard=True, sample_prompt='The ',
          sample_length=200, sample_temperature=0.8, num_devices=None,
          shard_optimizer=False, target_len=None):
  """Trains `model` on `dataset` in `run_dir`, resuming if it holds checkpoints.

  Args:
    run_dir: folder for checkpoints, metrics.jsonl, TensorBoard and samples.
    steps: total training steps (a resumed run continues up to this).
    model: function (vocab_size=, mode=) -> Trax layer mapping (batch, length)
      int32 ids to (batch, length, vocab) logits.
    optimizer: a trax optimizer instance (default Adam, lr from the schedule).
    lr_schedule: function step -> learning rate (default: trax multifactor,
      1e-3 with 100 warm-up steps).
    clip_grad_norm: clip the global gradient norm to this (None: no clipping).
    batch_size, seq_len: global batch shape in tokens; batch_size must be a
      multiple of the device count (each device gets batch_size / n rows).
    dataset, tokenizer, vocab_file, data_dir: see `training.data.make_dataset`.
    seed: seeds initialisation, data order, dropout and sampling.
    compute_dtype: 'float32', 'bfloat16' or 'float16' (weights stay float32).
    log_every, eval_every, checkpoint_every: intervals in steps (0 disables
      eval / intermediate checkpoints; a checkpoint is always written at the end).
    eval_batches: batches of held-out data per evaluation.
    keep_checkpoints: how many of the newest checkpoints to keep.
    tensorboard: also write TensorBoard event files.
    sample_prompt, sample_length, sample_temperature: the text generated at
      the end (sample_length 0 skips it; at most seq_len tokens in all).
    num_devices: train on the first n local devices (None: all devices of all
      processes; one device runs the single-device step unchanged).
    shard_optimizer: split the optimizer slots across the devices (ZeRO-1);
      no effect on one device.
    target_len: target length of a sequence-to-sequence dataset (None: the
      dataset's default, seq_len); with such a dataset (`training.seq2seq`)
      the model takes (inputs (batch, seq_len), targets (batch, target_len))
      and its first output is the logits (batch, target_len, vocab); eval adds
      sequence_accuracy and the dataset's further held-out sets (e.g. the copy
      task's longer sequences, logged as split 'eval_long').

  Returns:
    dict with the final 'step', last train 'loss', last 'eval_loss' (or None),
    'checkpoint' path and generated 'sample' text.
  """
  if compute_dtype not in DTYPES:
    raise UserError(f'compute_dtype {compute_dtype!r} is not one of '
                    f'{sorted(DTYPES)}; pick one of those.')
  for name, value in (('steps', steps), ('batch_size', batch_size),
                      ('seq_len', seq_len), ('log_every', log_every)):
    if value <= 0:
      raise UserError(f'{name} must be positive, not {value}.')
  dtype = DTYPES[compute_dtype]
  parallel = _data_parallel(num_devices, shard_optimizer, batch_size)
  n_devices = parallel.n_devices if parallel else 1
  chief = jax.process_index() == 0
  say = print if chief else lambda *a, **k: None
  os.makedirs(run_dir, exist_ok=True)
  ds = _make_dataset(dataset, tokenizer, vocab_file, data_dir, seq_len,
                     batch_size, seed, run_dir, target_len)
  say(f'data: {ds.description}', flush=True)
  seq2seq = getattr(ds, 'seq2seq', False)

  optimizer = optimizer or _default_optimizer()
  lr_schedule = lr_schedule or _default_schedule()
  train_model = model(vocab_size=ds.vocab_size, mode='train')
  eval_model = model(vocab_size=ds.vocab_size, mode='eval')
  _check_model_inputs(train_model, seq2seq, dataset)
  if seq2seq:  # encoder-decoder: (inputs, targets) in, target tokens scored
    batch_shape = ((batch_size, ds.input_len), (batch_size, ds.target_len))
    tokens_per_row = ds.input_len + ds.target_len
  else:
    batch_shape, tokens_per_row = (batch_size, seq_len), seq_len
  state = trainer_lib.init_train_state(train_model, optimizer, batch_shape, seed)
  eval_model.init(trainer_lib.input_signature(batch_shape))
  n_params = trainer_lib.count_params(state.weights)
  # FLOPs are counted for decoder-only LMs; an encoder-decoder logs no MFU.
  flops_per_token = (None if seq2seq else
                     trainer_lib.train_flops_per_token(train_model, seq_len))
  peak = trainer_lib.device_peak_flops()
  peak = peak and peak * n_devices

  start = 0
  last = ckpt_lib.latest(run_dir)
  if last:
    try:
      trees, meta = ckpt_lib.restore(
          last, {'weights': state.weights, 'slots': state.slots})
    except ckpt_lib.CheckpointError as e:
      raise UserError(str(e)) from None
    state = trainer_lib.TrainState(trees['weights'], trees['slots'], state.state)
    start = meta['step']
    say(f'resumed from {last} at step {start}', flush=True)
  if parallel:  # replicated weights; slots replicated or split (ZeRO-1)
    state = parallel.put_state(state)
    put_batch = parallel.put_batch
    devices = (f'{n_devices} x {jax.devices()[0].device_kind} '
               f'({jax.process_count()} process(es), data parallel'
               f'{", sharded optimizer" if shard_optimizer else ""})')
  else:
    state = jax.device_put(state)
    put_batch = jax.device_put
    devices = f'device {jax.devices()[0].device_kind}'
  flops_text = (f', {flops_per_token / 1e6:.1f} MFLOPs per token (train)'
                if flops_per_token else '')
  say(f'model: {n_params:,} parameters{flops_text}, {devices}, '
      f'compute {compute_dtype}', flush=True)

  train_step = trainer_lib.make_train_step(
      train_model, optimizer, lr_schedule, dtype, clip_grad_norm, parallel)
  eval_step = trainer_lib.make_eval_step(eval_model, dtype, parallel)
  host_lr = not trainer_lib.schedule_is_traceable(lr_schedule)
  held_out = ds.eval_batches(eval_batches)  # also gives bytes per token
  sample_source = held_out[0] if held_out else None
  # bits per byte: LM text only (seq2seq targets hold sentinels / symbols)
  bytes_per_token = (None if seq2seq else
                     _bytes_per_token(ds, held_out) if held_out else 1.0)
  held_out = [put_batch(b) for b in held_out]
  more_held_out = ({name: [put_batch(b) for b in batches] for name, batches in
                    ds.extra_eval_batches(eval_batches).items()}
                   if seq2seq and eval_every else {})
  writer = (metrics_lib.MetricsWriter(run_dir, tensorboard=tensorboard)
            if chief else _NoMetrics())
  vocab_path = getattr(ds.tokenizer, 'model_path', None)
  vocab_path = vocab_path and os.path.abspath(vocab_path)
  config_text = gin.config_str()
  if chief:
    config_path = os.path.join(run_dir, 'config.gin')
    if start and os.path.exists(config_path):
      with open(config_path) as f:
        old = f.read()
      if old != config_text:  # resumed with other settings: keep the old ones
        os.replace(config_path, os.path.join(run_dir, f'config_before_step_{start}.gin'))
    with open(config_path, 'w') as f:
      f.write(config_text)

  def evaluate(step):
    loss = None
    for name, batches in [('', held_out)] + sorted(more_held_out.items()):
      sums = np.zeros(5 if seq2seq else 3)
      for batch in batches:
        sums += np.array(jax.device_get(eval_step(state.weights, state.state, batch)))
      values = {'loss': sums[0] / max(sums[1], 1.0),
                'accuracy': sums[2] / max(sums[1], 1.0)}
      if bytes_per_token:
        values['bits_per_byte'] = trainer_lib.bits(values['loss']) / bytes_per_token
      if len(sums) > 3:  # two-input model: whole target sequences right
        values['sequence_accuracy'] = sums[3] / max(sums[4], 1.0)
      writer.write('eval_' + name if name else 'eval', step, values)
      loss = values['loss'] if loss is None else loss
    return loss

  def save(step, last_loss):
    _check_finite(last_loss, step, run_dir)
    return ckpt_lib.save(
        run_dir, step, {'weights': state.weights, 'slots': state.slots},
        metadata={'n_params': n_params, 'dataset': dataset,
                  'vocab_size': ds.vocab_size, 'vocab_file': vocab_path,
                  'compute_dtype': compute_dtype, 'n_devices': n_devices,
                  'gin_config': config_text,
                  **({'input_len': ds.input_len, 'target_len': ds.target_len}
                     if seq2seq else {})},
        keep=keep_checkpoints)

  key = jax.random.PRNGKey(seed)
  pending, loss, eval_loss, path = [], float('nan'), None, last
  tick, tick_step = time.time(), start
  def inputs():  # runs in a background thread, ahead of the device
    for step, batch in zip(range(start, steps), ds.batches(start)):
      lr = (trainer_lib.host_learning_rate(lr_schedule, step) if host_lr
            else np.float32(0))
      yield step, put_batch(batch), lr

  for step, batch, lr in _prefetch(inputs()):
    state, step_metrics = train_step(state, step, batch, key, lr)
    pending.append(step_metrics)
    done = step + 1
    if step == start:  # throughput excludes the first step's compilation
      jax.block_until_ready(step_metrics)
      tick, tick_step = time.time(), done
    if done % log_every == 0 or done == steps:
      fetched = jax.device_get(pending)
      pending = []
      timed_tokens = (done - tick_step) * batch_size * tokens_per_row
      elapsed = time.time() - tick
      tick, tick_step = time.time(), done
      losses = [float(m['loss']) for m in fetched]
      loss = float(np.mean(losses))
      for value in losses:
        _check_finite(value, done, run_dir)
      values = {'loss': loss, 'learning_rate': float(fetched[-1]['learning_rate']),
                'gradients_l2': float(fetched[-1]['gradients_l2'])}
      if bytes_per_token:
        values['bits_per_byte'] = trainer_lib.bits(loss) / bytes_per_token
      if 'aux_loss' in fetched[-1]:  # layers' auxiliary losses (trainer.aux_losses)
        values['aux_loss'] = float(np.mean([float(m['aux_loss']) for m in fetched]))
      if timed_tokens:  # none when only the compiling step ran since the last log
        values['tokens_per_s'] = timed_tokens / elapsed
        if peak and flops_per_token:
          values['mfu'] = flops_per_token * values['tokens_per_s'] / peak
      writer.write('train', done, values)
    do_eval = eval_every and done % eval_every == 0
    do_save = (checkpoint_every and done % checkpoint_every == 0) or done == steps
    if do_eval or do_save:  # throughput counts training time, not this pause
      jax.block_until_ready(step_metrics)
      paused = time.time()
      if do_eval:
        eval_loss = evaluate(done)
      if do_save:
        if pending:  # make sure the loss is finite before saving
          loss = float(jax.device_get(pending[-1]['loss']))
        path = save(done, loss)
        say(f'checkpoint: {path}', flush=True)
      tick += time.time() - paused
  if eval_every and steps % eval_every and start < steps:
    eval_loss = evaluate(steps)
  writer.close()

  sample = ''
  if seq2seq:  # decode the first held-out example's targets from its inputs
    length = min(sample_length, ds.target_len)
    if length > 0 and chief and sample_source is not None:
      weights = ckpt_lib.to_host(state.weights) if parallel else state.weights
      sample = _seq2seq_sample(model, ds, weights, sample_source, length,
                               sample_temperature, seed, dtype, run_dir, steps)
    return {'step': max(start, steps), 'loss': loss, 'eval_loss': eval_loss,
            'checkpoint': path, 'sample': sample}
  # Positions past seq_len were never trained: generate within the context.
  length = min(sample_length, seq_len - len(ds.tokenizer.encode(sample_prompt)))
  if length > 0 and chief:
    # Replicated weights: decode on one device from the host copy.
    weights = ckpt_lib.to_host(state.weights) if parallel else state.weights
    sample = generate_text(model, ds.tokenizer, ds.vocab_size, weights,
                           sample_prompt, length, sample_temperature, seed, dtype)
    with open(os.path.join(run_dir, 'samples.txt'), 'a') as f:
      f.write(json.dumps({'step': steps, 'prompt': sample_prompt,
                          'text': sample}) + '\n')
    print(f'sample: {sample_prompt}{sample}', flush=True)
  return {'step': max(start, steps), 'loss': loss, 'eval_loss': eval_loss,
          'checkpoint': path, 'sample': sample}


def _check_model_inputs(model, seq2seq, dataset):
  if seq2seq and model.n_in != 2:
    raise UserError(
        f'dataset {dataset!r} gives (inputs, targets) pairs but the model takes '
        f'{model.n_in} input(s); use an encoder-decoder model taking (inputs, '
        'targets), e.g. training.seq2seq.Transformer or the Terraformer.')
  if not seq2seq and model.n_in != 1:
    raise UserError(
        f'the model takes {model.n_in} inputs (an encoder-decoder) but dataset '
        f'{dataset!r} is a language-modelling corpus; use a sequence-to-sequence '
        'dataset (copy, spans:SOURCE, summarize:tfds:NAME) or a decoder-only model.')


def _seq2seq_sample(model, ds, weights, batch, length, temperature, seed,
                    compute_dtype, run_dir, step):
  """Decodes the targets of `batch`'s first row from its inputs; logs and
  returns the text (also written to samples.txt)."""
  inputs = np.asarray(batch[0][:1])
  expected = np.asarray(batch[1][0])[np.asarray(batch[2][0]) > 0]
  out = generate_seq2seq(model, ds.vocab_size, weights, inputs, length,
                         temperature, seed, compute_dtype)[0]
  if not isinstance(ds.tokenizer, seq2seq_lib.IdTokenizer):  # text: stop at EOS
    ends = np.flatnonzero(out == ds.tokenizer.eos_id)
    out = out[:ends[0] + 1] if len(ends) else out
  decode = getattr(ds, 'decode', ds.tokenizer.decode)
  text, want = decode(out), decode(expected)
  source = decode(inputs[0][inputs[0] != 0])
  with open(os.path.join(run_dir, 'samples.txt'), 'a') as f:
    f.write(json.dumps({'step': step, 'inputs': source, 'text': text,
                        'targets': want}) + '\n')
  print(f'sample: inputs {source!r}\n  decoded {text!r}\n  targets {want!r}',
        flush=True)
  return text


def generate_seq2seq(model, vocab_size, weights, inputs, length,
                     temperature=0.0, seed=0, compute_dtype=None, top_k=None):
  """Decodes `length` target tokens for encoder inputs (batch, input_len);
  returns (batch, length) int32 ids (temperature 0: greedy)."""
  sampler = sampling.Sampler(model(vocab_size=vocab_size, mode='predict'),
                             batch_size=inputs.shape[0],
                             compute_dtype=compute_dtype,
                             input_len=inputs.shape[1])
  return sampler.decode(weights, inputs, length, temperature=temperature,
                        top_k=top_k, seed=seed)


def generate_text(model, tokenizer, vocab_size, weights, prompt, length,
                  temperature=0.8, seed=0, compute_dtype=None, top_k=None):
  """Continues the text `prompt` by `length` tokens; returns the new text."""
  sampler = sampling.Sampler(model(vocab_size=vocab_size, mode='predict'),
                             batch_size=1, compute_dtype=compute_dtype)
  ids = tokenizer.encode(prompt)[None, :]
  out = sampler.generate(weights, ids, length, temperature=temperature,
                         top_k=top_k, seed=seed)
  return tokenizer.decode(out[0])
