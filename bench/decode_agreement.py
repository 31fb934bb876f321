r"""Do two forms of a decoding step choose the same tokens?  (A GPU check.)

Samples greedily from one random-weight model of `decode_speed.py`'s
shapes and variants (weights in --dtype) with the fused decoding blocks off
and on (`training.model.FUSED_DECODING_GPU` and `terraformer.sparse_ff`'s
and `sparse_qkv`'s, all together, or with --compare one sparse layer's
alone; each form its own Sampler, compiled with the switches set) and
prints the share of equal tokens and where they first differ.  Then it feeds both builds the same tokens (the prompt and
the unfused path's choices; `training.sampling.Sampler.forced_logits`) and
prints how far apart their logits are and the unfused path's top-2 margin
wherever the two argmaxes differ.  Greedy decoding on random weights meets
near ties, so a difference at a tiny margin with logits a few 1e-6 apart is
rounding; a large logit difference is a bug.  With --dtype=bfloat16 it
also prints how far each form's logits are from the unfused float32 ones.
--fused_on_cpu runs the fused kernels interpreted on a CPU (slow;
`training.model.FUSED_ON_CPU`).

    python bench/decode_agreement.py --shape=small --batch=1 --n_tokens=150
    python bench/decode_agreement.py --variant=sparse_ff_qkv --dtype=bfloat16
    python bench/decode_agreement.py --variant=sparse_ff_qkv --compare=sparse_qkv

(The fused blocks run for one row only: with --batch above 1 both forms
are the same program.)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
import jax
import numpy as np

from bench import decode_speed  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_integer('n_tokens', 150, 'tokens decoded.')
flags.DEFINE_integer('seed', 0, 'weights and prompt.')
flags.DEFINE_string('variant', 'dense', 'one of decode_speed.VARIANTS.')
flags.DEFINE_enum('compare', 'all', ['all', 'sparse_ff', 'sparse_qkv'],
                  'all: every fused form off against every one on; '
                  'sparse_ff / sparse_qkv: only that layer\'s fused step '
                  'off against on, the others on in both builds.')
flags.DEFINE_bool('fused_on_cpu', False, 'on a CPU, run the fused forms '
                  'interpreted (training.model.FUSED_ON_CPU).')


def main(argv):
  del argv
  from terraformer import models  # pylint: disable=g-import-not-at-top
  from terraformer import sparse_ff  # pylint: disable=g-import-not-at-top
  from terraformer import sparse_qkv  # pylint: disable=g-import-not-at-top
  from training import model as model_lib  # pylint: disable=g-import-not-at-top
  from training import sampling  # pylint: disable=g-import-not-at-top
  from trax import shapes  # pylint: disable=g-import-not-at-top
  dtype = decode_speed.compute_dtype()
  print(jax.devices()[0].device_kind, jax.__version__)
  model_lib.FUSED_ON_CPU = FLAGS.fused_on_cpu
  kwargs = decode_speed.model_kwargs(FLAGS.shape, FLAGS.variant)
  max_len = max(FLAGS.max_len, FLAGS.n_tokens + 8)
  eval_model = models.TerraformerLM(mode='eval', max_len=max_len, **kwargs)
  eval_model.init(shapes.ShapeDtype((1, 8), np.int32),
                  rng=jax.random.PRNGKey(FLAGS.seed))
  weights = jax.device_put(eval_model.weights)
  prompt = np.random.RandomState(FLAGS.seed).randint(
      0, kwargs['vocab_size'], (FLAGS.batch, 4)).astype(np.int32)

  def fusion(on):  # the switches, read when a step is traced
    compared = FLAGS.compare  # the switches not compared stay on
    model_lib.FUSED_DECODING_GPU = on or compared != 'all'
    sparse_ff.FUSED_DECODING_GPU = on or compared not in ('all', 'sparse_ff')
    sparse_qkv.FUSED_DECODING_GPU = on or compared not in ('all', 'sparse_qkv')

  out, samplers = {}, {}
  for fused in (False, True):
    fusion(fused)
    samplers[fused] = sampling.Sampler(
        models.TerraformerLM(mode='predict', max_len=max_len, **kwargs),
        batch_size=FLAGS.batch, compute_dtype=dtype)
    out[fused] = np.asarray(samplers[fused].generate(
        weights, prompt, FLAGS.n_tokens, temperature=0.0))
  same = out[False] == out[True]
  first = [int(np.argmin(r)) if not r.all() else None for r in same]
  print(f'{FLAGS.variant}, {FLAGS.shape}, {FLAGS.dtype}, batch {FLAGS.batch}, {FLAGS.n_tokens} greedy tokens: '
        f'{same.mean():.1%} equal ({FLAGS.compare} fused off / on); first difference per row: {first}')
  # Both builds fed the same sequence (the prompt, then the unfused path's
  # tokens): how far apart their logits are, and how close the unfused
  # path's top two were where the argmax differs (a near tie, or not).
  seq = np.concatenate([prompt, out[False]], axis=1)[:, :-1]
  logits = {}
  for fused in (False, True):
    fusion(fused)
    logits[fused] = samplers[fused].forced_logits(weights, seq)
  a, b = logits[False], logits[True]
  diff = np.abs(a - b)
  top2 = np.sort(a, axis=-1)[..., -2:]
  margin = top2[..., 1] - top2[..., 0]
  differs = np.argmax(a, -1) != np.argmax(b, -1)
  print(f'forced logits over {seq.shape[1]} positions: max |on - off| '
        f'{diff.max():.3g} (logits std {a.std():.3g}), median per position '
        f'{np.median(diff.max(-1)):.3g}; argmax differs at {int(differs.sum())} '
        f'positions, top-2 margins there {np.round(margin[differs], 5).tolist()[:8]} '
        f'(median margin everywhere {np.median(margin):.3g})')
  if dtype is not None:
    # Which of the two is nearer the same model in float32 (unfused)?
    fusion(False)
    exact = sampling.Sampler(
        models.TerraformerLM(mode='predict', max_len=max_len, **kwargs),
        batch_size=FLAGS.batch).forced_logits(weights, seq)
    for fused in (False, True):
      gap = np.abs(logits[fused] - exact)
      print(f'fused {"on" if fused else "off"} against float32 (unfused): max '
            f'{gap.max():.3g}, median per position {np.median(gap.max(-1)):.3g}, '
            f'argmax equal at {np.mean(np.argmax(logits[fused], -1) == np.argmax(exact, -1)):.1%}')


if __name__ == '__main__':
  app.run(main)
