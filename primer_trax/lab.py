r"""The ablation lab: each variant alone, same token budget, several seeds.

    python -m primer_trax.lab --base_gin=gin/primer/lab_35m.gin \
        --variants=baseline,squared_relu,dconv,primer_ez,token_shift,geglu,relu2_glu \
        --seeds=3 --tokens=20000000 --dataset=PATH --output_dir=reports/primer_35m

Every run is `training.run.train` in this process, with the base gin config,
the model `primer_trax.VariantLM(variant=NAME)` (the baseline DecoderLM with
only that variant's change, or for the Transformer's relatives another model
function given the baseline's size, see primer_trax/models.py) and seed s; it
lives in <output_dir>/runs/<variant>/seed<s>.  A run is finished when its folder holds
lab_done.json (written after its final checkpoint); rerunning the command
skips finished runs, resumes unfinished ones from their checkpoints, and
rewrites the report from all finished runs:

  report.md          the table (loss, bits per byte, time to the baseline's
                     loss, throughput, parameters, FLOPs) and how to read it
  summary.json       the same numbers, per run and per variant
  loss_vs_tokens.png, loss_vs_time.png   mean training loss over seeds
                     (band: min to max over seeds)

Per-run overhead is kept small: no TensorBoard, no text sample, one
evaluation and one checkpoint at the end, a SentencePiece vocabulary trained
once for the whole sweep, and a persistent XLA compilation cache shared by
the runs (seeds of one variant compile identical programs).
"""

import argparse
import json
import math
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DONE = 'lab_done.json'


class LabError(Exception):
  """A problem the user can fix; the message says what and how."""


def parse_args(argv):
  """The lab's flags; see the module docstring."""
  p = argparse.ArgumentParser(
      prog='python -m primer_trax.lab',
      description='Trains each variant for the same token budget over several '
                  'seeds and writes a Markdown report with plots.')
  p.add_argument('--base_gin', required=True,
                 help='gin file of the baseline (size, data, optimizer), e.g. '
                      'gin/primer/lab_35m.gin')
  p.add_argument('--variants', default='baseline,squared_relu,dconv,primer_ez',
                 help='comma-separated names from primer_trax.models.VARIANTS; '
                      'the first is the reference (normally baseline)')
  p.add_argument('--seeds', type=int, default=3, help='seeds 0..N-1 per variant')
  p.add_argument('--tokens', type=int, required=True,
                 help='training tokens per run (steps = ceil(tokens / (batch * seq)))')
  p.add_argument('--output_dir', required=True,
                 help='sweep folder: runs/, report.md, summary.json, *.png')
  p.add_argument('--gin_param', action='append', default=[],
                 help='extra gin binding applied after --base_gin (repeatable)')
  p.add_argument('--dataset', help='overrides training.train.dataset (e.g. a text file)')
  p.add_argument('--tokenizer', choices=('byte', 'spm'),
                 help='overrides training.train.tokenizer')
  p.add_argument('--vocab_file', help='SentencePiece model (else trained once)')
  p.add_argument('--log_every', type=int,
                 help='steps between logged losses (default: about 60 points a run)')
  p.add_argument('--eval_every', type=int,
                 help='steps between evaluations (default: once, at the end)')
  p.add_argument('--param_tolerance', type=float, default=0.02,
                 help='flag variants whose parameters differ from the '
                      "reference's by more than this fraction")
  p.add_argument('--compilation_cache', default='default',
                 help="persistent XLA cache folder ('default': <output_dir>/jax_cache, "
                      "'' to disable)")
  p.add_argument('--drop_checkpoints', action='store_true',
                 help="delete a run's checkpoints once it is finished (its "
                      'metrics and lab_done.json stay)')
  p.add_argument('--report_only', action='store_true',
                 help='write the report from finished runs; train nothing')
  args = p.parse_args(argv)
  if args.seeds < 1 or args.tokens < 1:
    p.error('--seeds and --tokens must be positive.')
  return args


# ---------------------------------------------------------------- configuring

def _configure(base_gin, variant, gin_params):
  """Fresh gin config: base file, extra bindings, then the variant's model."""
  import gin  # pylint: disable=g-import-not-at-top
  import training.configurables  # pylint: disable=g-import-not-at-top,unused-import
  import primer_trax.models  # pylint: disable=g-import-not-at-top,unused-import
  gin.clear_config()
  gin.add_config_file_search_path(ROOT)
  try:
    gin.parse_config_file(base_gin)
  except (OSError, IOError) as e:
    raise LabError(f'Cannot read --base_gin {base_gin!r} ({e.__class__.__name__}); '
                   'check the path (lab configs are in gin/primer/).') from None
  except Exception as e:  # pylint: disable=broad-except
    raise LabError(f'--base_gin {base_gin!r} is malformed or binds an unknown '
                   f'name: {_first_line(e)}.') from None
  bindings = list(gin_params) + [
      'training.train.model = @primer_trax.VariantLM',
      f"primer_trax.VariantLM.variant = '{variant}'"]
  for binding in bindings:
    try:
      gin.parse_config(binding)
    except Exception as e:  # pylint: disable=broad-except
      raise LabError(f'gin binding {binding!r} is invalid: {_first_line(e)}.') from None


def _first_line(e):
  text = str(e).strip()
  return text.splitlines()[0] if text else repr(e)


def _train_setting(name, default):
  import gin  # pylint: disable=g-import-not-at-top
  try:
    return gin.query_parameter(f'training.train.{name}')
  except ValueError:
    return default


def _shared_vocab(args, output_dir):
  """The --vocab_file to pass to every run (None for bytes): trained once."""
  tokenizer = args.tokenizer or _train_setting('tokenizer', 'byte')
  if tokenizer != 'spm' or args.vocab_file:
    return args.vocab_file
  from training import data as data_lib  # pylint: disable=g-import-not-at-top
  dataset = args.dataset or _train_setting('dataset', 'python_docs')
  ds = data_lib.make_dataset(dataset, seq_len=8, batch_size=1, tokenizer='spm',
                             cache_dir=os.path.join(output_dir, 'vocab'),
                             data_dir=_train_setting('data_dir', None))
  return os.path.abspath(ds.tokenizer.model_path)


def _model_info(variant, vocab_size, seq_len):
  """(parameters, training FLOPs per token) of the configured variant."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from trax import shapes  # pylint: disable=g-import-not-at-top
  from primer_trax import models  # pylint: disable=g-import-not-at-top
  from training import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  model = models.VariantLM(vocab_size, variant, mode='train')
  model.init(shapes.ShapeDtype((1, seq_len), np.int32))
  return (trainer_lib.count_params(model.weights),
          trainer_lib.train_flops_per_token(model, seq_len))


# ---------------------------------------------------------------- running

def run_dir(output_dir, variant, seed):
  return os.path.join(output_dir, 'runs', variant, f'seed{seed}')


def finished(path):
  """The lab_done.json record of a finished run, or None."""
  try:
    with open(os.path.join(path, DONE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def run_sweep(args, log=print):
  """Trains every (seed, variant) not yet finished; returns the report path."""
  from primer_trax import models  # pylint: disable=g-import-not-at-top
  names = [n.strip() for n in args.variants.split(',') if n.strip()]
  if not names:
    raise LabError('--variants is empty; give names such as baseline,primer_ez.')
  try:
    models.check_variants(names)
  except ValueError as e:
    raise LabError(str(e)) from None
  if len(set(names)) != len(names):
    raise LabError(f'--variants lists a name twice: {args.variants}.')
  os.makedirs(args.output_dir, exist_ok=True)
  _configure(args.base_gin, names[0], args.gin_param)
  batch_size = _train_setting('batch_size', 16)
  seq_len = _train_setting('seq_len', 256)
  steps = max(1, math.ceil(args.tokens / (batch_size * seq_len)))
  plan = dict(base_gin=args.base_gin, tokens=args.tokens, steps=steps,
              batch_size=batch_size, seq_len=seq_len, variants=names,
              seeds=args.seeds, gin_param=args.gin_param, dataset=args.dataset)
  if not args.report_only:
    vocab_file = _shared_vocab(args, args.output_dir)
    info = {}
    for seed in range(args.seeds):
      for name in names:
        _run_one(args, name, seed, steps, vocab_file, info, log)
  return write_report(args.output_dir, names, args.seeds, plan,
                      args.param_tolerance, command=_command())


def _run_one(args, name, seed, steps, vocab_file, info, log):
  from training import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from training import run  # pylint: disable=g-import-not-at-top
  path = run_dir(args.output_dir, name, seed)
  done = finished(path)
  if done and done['steps'] == steps:
    log(f'lab: {name} seed {seed}: finished earlier, skipped')
    return
  if done and done['steps'] > steps:
    raise LabError(f'{path} was trained for {done["steps"]} steps, more than the '
                   f'{steps} that --tokens={args.tokens} gives; use the same '
                   '--tokens or a new --output_dir.')
  _configure(args.base_gin, name, args.gin_param)
  overrides = dict(steps=steps, seed=seed, tensorboard=False, sample_length=0,
                   checkpoint_every=0, keep_checkpoints=1,
                   eval_every=args.eval_every or steps,
                   log_every=args.log_every or max(1, steps // 60))
  for key in ('dataset', 'tokenizer'):
    if getattr(args, key):
      overrides[key] = getattr(args, key)
  if vocab_file:
    overrides['vocab_file'] = vocab_file
  log(f'lab: {name} seed {seed}: training {steps} steps in {path}')
  start = time.time()
  try:
    result = run.train(path, **overrides)
  except run.UserError as e:
    raise LabError(f'{name} seed {seed}: {e}') from None
  seconds = time.time() - start
  meta = ckpt_lib.read_metadata(result['checkpoint'])['metadata']
  seq_len = _train_setting('seq_len', 256)
  if name not in info:
    info[name] = _model_info(name, meta['vocab_size'], seq_len)
  n_params, flops = info[name]
  record = dict(variant=name, seed=seed, steps=result['step'], loss=result['loss'],
                eval_loss=result['eval_loss'], n_params=n_params,
                flops_per_token=flops, run_seconds=seconds,
                checkpoint=result['checkpoint'])
  with open(os.path.join(path, DONE + '.tmp'), 'w') as f:
    json.dump(record, f, indent=1)
  os.replace(os.path.join(path, DONE + '.tmp'), os.path.join(path, DONE))
  if args.drop_checkpoints:
    shutil.rmtree(ckpt_lib.checkpoint_dir(path), ignore_errors=True)


def _command():
  return 'python -m primer_trax.lab ' + ' '.join(sys.argv[1:])


# ---------------------------------------------------------------- reading runs

def read_curve(path, batch_size, seq_len):
  """Training curve of one run: list of (step, tokens, train seconds, loss).

  Train seconds exclude compilation, evaluation and checkpoints: each logged
  interval's steps divided by its logged tokens/s (the first interval's rate
  stands in for its compiling first step).  A step logged twice (a run
  resumed after a crash) keeps its last record.
  """
  from training import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  by_step = {}
  for r in metrics_lib.read_jsonl(os.path.join(path, 'metrics.jsonl'), 'train'):
    by_step[r['step']] = r
  curve, prev_step, seconds = [], 0, 0.0
  for step in sorted(by_step):
    r = by_step[step]
    tokens_per_s = r.get('tokens_per_s')
    if isinstance(tokens_per_s, (int, float)) and tokens_per_s > 0:
      seconds += (step - prev_step) * batch_size * seq_len / tokens_per_s
    prev_step = step
    loss = r['loss'] if isinstance(r['loss'], (int, float)) else float('nan')
    curve.append((step, step * batch_size * seq_len, seconds, loss))
  return curve


def read_eval(path, step):
  """The eval record at `step` (dict), or {}."""
  from training import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  records = [r for r in metrics_lib.read_jsonl(os.path.join(path, 'metrics.jsonl'), 'eval')
             if r['step'] == step]
  return records[-1] if records else {}


def _first_reaching(curve, target):
  for step, _, seconds, loss in curve:
    if loss <= target:
      return step, seconds
  return None


def _mean_std(values):
  values = [v for v in values if v is not None and math.isfinite(v)]
  if not values:
    return None, None
  mean = sum(values) / len(values)
  if len(values) == 1:
    return mean, 0.0
  var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
  return mean, math.sqrt(var)


def _matched(name):
  """What a variant is meant to share with the reference (models.MATCHES)."""
  from primer_trax import models  # pylint: disable=g-import-not-at-top
  return models.VARIANTS[name].matched if name in models.VARIANTS else 'params'


def summarize(output_dir, names, seeds, batch_size, seq_len, tolerance):
  """Per-variant numbers from the finished runs (see report.md's notes)."""
  runs = {}
  for name in names:
    for seed in range(seeds):
      path = run_dir(output_dir, name, seed)
      done = finished(path)
      if done:
        curve = read_curve(path, batch_size, seq_len)
        ev = read_eval(path, done['steps'])
        total_s = curve[-1][2] if curve else None
        runs[(name, seed)] = dict(
            done, curve=curve, eval_loss=ev.get('loss', done.get('eval_loss')),
            bits_per_byte=ev.get('bits_per_byte'), train_seconds=total_s,
            final_train_loss=curve[-1][3] if curve else done['loss'],
            tokens_per_s=(done['steps'] * batch_size * seq_len / total_s
                          if total_s else None))
  ref = names[0]
  ref_runs = [r for (n, _), r in runs.items() if n == ref]
  target, _ = _mean_std([r['final_train_loss'] for r in ref_runs])
  variants = {}
  for name in names:
    mine = [runs[(name, s)] for s in range(seeds) if (name, s) in runs]
    if not mine:
      variants[name] = dict(runs=0)
      continue
    reached = [_first_reaching(r['curve'], target) for r in mine] if target else []
    hits = [h for h in reached if h]
    v = dict(runs=len(mine), n_params=mine[0]['n_params'],
             flops_per_token=mine[0]['flops_per_token'],
             train_loss=_mean_std([r['final_train_loss'] for r in mine]),
             eval_loss=_mean_std([r['eval_loss'] for r in mine]),
             bits_per_byte=_mean_std([r['bits_per_byte'] for r in mine]),
             tokens_per_s=_mean_std([r['tokens_per_s'] for r in mine]),
             reached=len(hits),
             run_seconds=sum(r['run_seconds'] for r in mine),
             steps_to_target=_mean_std([h[0] for h in hits]),
             seconds_to_target=_mean_std([h[1] for h in hits]))
    variants[name] = v
  base = variants.get(ref, {})
  for name, v in variants.items():
    v['flags'] = []
    if not v['runs'] or not base.get('runs'):
      continue
    v['param_ratio'] = v['n_params'] / base['n_params']
    if abs(v['param_ratio'] - 1) > tolerance and _matched(name) == 'params':
      v['flags'].append(f'parameters differ from {ref} by '
                        f'{100 * (v["param_ratio"] - 1):+.1f}% (> {100 * tolerance:g}%)')
    if base['tokens_per_s'][0] and v['tokens_per_s'][0]:
      v['throughput_ratio'] = v['tokens_per_s'][0] / base['tokens_per_s'][0]
    if base['seconds_to_target'][0] and v['seconds_to_target'][0]:
      v['time_speedup'] = base['seconds_to_target'][0] / v['seconds_to_target'][0]
    if v['reached'] < v['runs']:
      v['flags'].append(f'{v["runs"] - v["reached"]} of {v["runs"]} runs never '
                        f"reached {ref}'s final loss")
  return runs, variants, target


# ---------------------------------------------------------------- the report

def _pm(ms, spec):
  mean, std = ms
  if mean is None:
    return '-'
  return f'{mean:{spec}} ± {std:{spec}}'


def _fmt(x, spec, none='-'):
  return none if x is None else f'{x:{spec}}'


def markdown_table(names, variants):
  head = ('| variant | runs | params | vs ref | MFLOPs/token | final train loss | '
          'final eval loss | eval bits/byte | steps to ref loss | '
          'train s to ref loss | time speedup | tokens/s | tokens/s vs ref | flags |')
  lines = [head, '|' + '---|' * 14]
  for name in names:
    v = variants[name]
    if not v['runs']:
      lines.append(f'| {name} | 0 |' + ' - |' * 12)
      continue
    lines.append(' | '.join([
        f'| {name}', str(v['runs']), f'{v["n_params"] / 1e6:.2f}M',
        _fmt(v.get('param_ratio'), '.3f'), f'{v["flops_per_token"] / 1e6:.1f}',
        _pm(v['train_loss'], '.4f'), _pm(v['eval_loss'], '.4f'),
        _pm(v['bits_per_byte'], '.4f'),
        _pm(v['steps_to_target'], '.0f') + f' ({v["reached"]}/{v["runs"]})',
        _pm(v['seconds_to_target'], '.1f'), _fmt(v.get('time_speedup'), '.2f'),
        _fmt(v['tokens_per_s'][0], ',.0f'), _fmt(v.get('throughput_ratio'), '.3f'),
        '; '.join(v['flags']) or '']) + ' |')
  return '\n'.join(lines)


def plot(runs, names, path_tokens, path_time):
  """Mean training loss over seeds against tokens and against train seconds."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  for out, column, xlabel in ((path_tokens, 1, 'training tokens'),
                              (path_time, 2, 'training seconds (no compile/eval)')):
    fig, ax = plt.subplots(figsize=(8, 5))
    upper = []
    for name in names:
      curves = [r['curve'] for (n, _), r in sorted(runs.items()) if n == name and r['curve']]
      if not curves:
        continue
      n = min(len(c) for c in curves)
      xs = np.mean([[p[column] for p in c[:n]] for c in curves], axis=0)
      ys = np.array([[p[3] for p in c[:n]] for c in curves])
      line, = ax.plot(xs, ys.mean(0), label=f'{name} ({len(curves)})')
      if len(curves) > 1:
        ax.fill_between(xs, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
      upper.append(ys.mean(0)[n // 10:].max() if n > 1 else ys.max())
    if upper:
      low = min(min(p[3] for p in r['curve']) for r in runs.values() if r['curve'])
      ax.set_ylim(low - 0.02 * abs(low), max(upper) + 0.02 * abs(max(upper)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel('training loss (nats/token)')
    ax.set_title('training loss, mean over seeds (band: min to max)')
    ax.grid(alpha=0.3)
    if upper:
      ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _run_seconds(variants):
  per = [f'{n} {v["run_seconds"]:.0f} s' for n, v in variants.items() if v['runs']]
  total = sum(v['run_seconds'] for v in variants.values() if v['runs'])
  return f'{total:.0f} s ({", ".join(per)}; a variant\'s first run compiles)'


def write_report(output_dir, names, seeds, plan, tolerance, command=''):
  """Writes report.md, summary.json and the two PNGs; returns report.md's path."""
  import jax  # pylint: disable=g-import-not-at-top
  runs, variants, target = summarize(output_dir, names, seeds, plan['batch_size'],
                                     plan['seq_len'], tolerance)
  missing = [f'{n} seed {s}' for n in names for s in range(seeds) if (n, s) not in runs]
  plot(runs, names, os.path.join(output_dir, 'loss_vs_tokens.png'),
       os.path.join(output_dir, 'loss_vs_time.png'))
  device = jax.devices()[0].device_kind
  ref = names[0]
  text = [
      '# Ablation lab report', '',
      f'`{command}`' if command else '', '',
      f'- base config: `{plan["base_gin"]}`; extra bindings: {plan["gin_param"] or "none"}',
      f'- data: {plan["dataset"] or "as the base config"}; batch {plan["batch_size"]} x '
      f'{plan["seq_len"]} tokens; {plan["steps"]} steps = '
      f'{plan["steps"] * plan["batch_size"] * plan["seq_len"]:,} tokens per run '
      f'(asked {plan["tokens"]:,})',
      f'- seeds 0..{seeds - 1}; device: {device}; written '
      f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}',
      f'- wall-clock of the finished runs, compilation, data setup, evaluation '
      f'and checkpoints included: {_run_seconds(variants)}',
      f'- reference: **{ref}**, final training loss (mean over its seeds) '
      f'{_fmt(target, ".4f")}', '',
      markdown_table(names, variants), '',
      '![loss against tokens](loss_vs_tokens.png)',
      '![loss against time](loss_vs_time.png)', '',
      '## How to read it', '',
      '- Values are mean ± sample standard deviation over seeds.',
      '- *final train loss*: the last logged training loss (mean over the last '
      'logging interval); *final eval loss* and *bits/byte*: held-out data at the '
      'last step.',
      f'- *steps / train s to ref loss*: first logged step at which a run\'s '
      f'training loss is at or below {ref}\'s final training loss, averaged over '
      'the runs that reach it (in brackets: how many did).  Seconds are '
      'training time from the logged tokens/s: no compilation, evaluation or '
      'checkpoints.  *time speedup*: ref\'s seconds over the variant\'s.',
      '- *tokens/s*: tokens over training seconds; *vs ref*: ratio to the '
      'reference (above 1 is faster).',
      '- *params*: all weights; *vs ref*: ratio.  FLOPs per token count '
      '6 x matmul weights + 6 x layers x d_attn x seq (training.trainer).',
      f'- A variant whose parameters differ from {ref}\'s by more than '
      f'{100 * tolerance:g}% is flagged if it is meant to be parameter-matched '
      "(matched: params); 'flops' variants share the FLOPs per token, 'size' "
      'ones the widths and depth (primer_trax/models.py).',
  ]
  if missing:
    text += ['', f'Not finished (rerun the command to train them): {", ".join(missing)}.']
  for name in names:
    from primer_trax import models  # pylint: disable=g-import-not-at-top
    text.append(f'- `{name}` (matched: {_matched(name)}): '
                f'{models.VARIANTS[name].description}'
                if name in models.VARIANTS else f'- `{name}`')
  path = os.path.join(output_dir, 'report.md')
  with open(path, 'w') as f:
    f.write('\n'.join(text) + '\n')
  summary = dict(plan=plan, device=device, reference=ref, reference_loss=target,
                 variants=variants, missing=missing,
                 runs=[{k: v for k, v in r.items() if k != 'curve'}
                       for r in runs.values()])
  with open(os.path.join(output_dir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1, default=str)
  return path


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  if args.compilation_cache:
    import jax  # pylint: disable=g-import-not-at-top
    cache = (os.path.join(args.output_dir, 'jax_cache')
             if args.compilation_cache == 'default' else args.compilation_cache)
    jax.config.update('jax_compilation_cache_dir', os.path.abspath(cache))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  try:
    path = run_sweep(args)
  except LabError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'lab: report in {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
