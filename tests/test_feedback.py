"""Feedback Transformer: the memory equations, decoding, truncation, the task.

The reference is the paper / official code (facebookresearch/transformer-
sequential models/feedback.py); trax has no Feedback layer.  Equations:

    x_t^0 = E[token_t]
    x_t^l = y + FF_l(LN2_l(y)),  y = x_t^{l-1} + Attn_l(LN1_l(x_t^{l-1}), m_{t-S..t-1})
    m_t   = sum_{l=0..L} softmax(w)_l x_t^l
    Attn: scores_j = (q.k_j + q.key_pe[:, j]) / sqrt(dh), k_j = LN1(m_j) Wk,
          v_j = LN1(m_j) Wv, j over the S slots oldest first, m_p = 0 for p < 0.
"""
import os

import gin
import jax
from jax import numpy as jnp
import numpy as np
import pytest
from trax import shapes

import train
from feedback import data as fdata
from feedback import model as fm
from training import checkpoint as ckpt_lib
from training import sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, D, FF, L, H, S, BLOCK, T, B = 13, 16, 24, 2, 2, 4, 4, 10, 2
KW = dict(d_model=D, d_ff=FF, n_layers=L, n_heads=H, span=S, block_len=BLOCK,
          max_len=T)


def _model(shared, mode, **kw):
  return fm.FeedbackLM(V, shared_kv=shared, mode=mode, **dict(KW, **kw))


_CACHE = {}


def _setup(shared):
  """(eval model, jitted eval fn, weights with every leaf perturbed, ids)."""
  if shared not in _CACHE:
    model = _model(shared, 'eval', unroll=3)  # 3 does not divide the block of 4
    model.init(shapes.ShapeDtype((B, T), np.int32), rng=jax.random.PRNGKey(0))
    leaves, tree = jax.tree_util.tree_flatten(model.weights)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    weights = jax.tree_util.tree_unflatten(tree, [
        x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    fn = jax.jit(lambda w, x: model.pure_fn(x, w, model.state, None)[0])
    ids = np.random.RandomState(0).randint(0, V, (B, T)).astype(np.int32)
    _CACHE[shared] = (model, fn, weights, ids)
  return _CACHE[shared]


def _ln(x, scale, bias):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + fm.EPSILON) * scale + bias


def reference_logits(weights, ids, shared):
  """The paper's equations, one position, layer and memory slot at a time."""
  w = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), weights)
  embed, key_pe, mem_logits, kv, layers, head = w
  dh = D // H
  mix = np.exp(mem_logits) / np.exp(mem_logits).sum()
  memories, logits = [], []
  for t in range(ids.shape[1]):
    x = embed[ids[:, t]]
    states = [x]
    for l, (wq, wo, n2s, n2b, w1, b1, w2, b2) in enumerate(layers):
      g = 0 if shared else l
      q = (_ln(x, kv[0][g], kv[1][g]) @ wq).reshape(B, H, dh)
      heads = np.zeros((B, H, dh))
      for bi in range(B):
        for h in range(H):
          scores, values = [], []
          for j in range(S):  # slot j holds m_{t - S + j}
            p = t - S + j
            m = memories[p][bi] if p >= 0 else np.zeros(D)
            hm = _ln(m, kv[0][g], kv[1][g])
            k = (hm @ kv[2][g]).reshape(H, dh)[h]
            values.append((hm @ kv[3][g]).reshape(H, dh)[h])
            scores.append((q[bi, h] @ k + q[bi, h] @ key_pe[:, j]) / np.sqrt(dh))
          p = np.exp(np.array(scores) - max(scores))
          heads[bi, h] = (p / p.sum()) @ np.array(values)
      y = x + heads.reshape(B, H * dh) @ wo
      x = y + np.maximum(_ln(y, n2s, n2b) @ w1 + b1, 0) @ w2 + b2
      states.append(x)
    memories.append(sum(c * s for c, s in zip(mix, states)))
    logits.append(_ln(x, head[0], head[1]) @ head[2] + head[3])
  return np.stack(logits, axis=1)


@pytest.mark.parametrize('shared', [True, False])
def test_memory_equations_match_direct_implementation(shared):
  """Eval-mode logits (blocks of 4, truncation on) equal the loop-based
  equations in float64, with every weight (memory mix included) perturbed."""
  _, fn, weights, ids = _setup(shared)
  got = np.asarray(fn(weights, ids))
  want = reference_logits(weights, ids, shared)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)
  assert np.abs(want).max() > 1.0  # not trivially small


@pytest.mark.parametrize('shared', [True, False])
def test_predict_token_by_token_equals_eval(shared):
  """Prefill 3 tokens, then one at a time: the same logits as eval mode."""
  _, fn, weights, ids = _setup(shared)
  want = np.asarray(fn(weights, ids))
  pred = _model(shared, 'predict')
  pred.init(shapes.ShapeDtype((B, 1), np.int32))
  call = jax.jit(lambda w, x, s: pred.pure_fn(x, w, s, None))
  out, state = call(weights, ids[:, :3], pred.state)
  outs = [out]
  for i in range(3, T):
    out, state = call(weights, ids[:, i:i + 1], state)
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, axis=1), want, atol=1e-5, rtol=1e-5)
  n_buf, pos = state
  assert n_buf.shape == (B, S, D)  # fixed span, one vector per memory
  assert int(pos) == T


def test_sampler_greedy_with_prompt_follows_eval_argmax():
  """training.sampling.Sampler (prompt of 3, 7 new tokens, greedy) picks the
  argmax of eval-mode logits on the sequence it produces."""
  _, fn, weights, ids = _setup(True)
  sampler = sampling.Sampler(_model(True, 'predict'), batch_size=B)
  new = sampler.generate(weights, ids[:, :3], T - 3, temperature=0)
  seq = np.concatenate([ids[:, :3], new], axis=1).astype(np.int32)
  logits = np.asarray(fn(weights, seq))
  np.testing.assert_array_equal(new, logits[:, 2:-1].argmax(-1))


def test_causality():
  """Changing token 6 changes no logits before position 6, and later ones."""
  _, fn, weights, ids = _setup(False)
  other = ids.copy()
  other[:, 6] = (other[:, 6] + 1) % V
  a, b = np.asarray(fn(weights, ids)), np.asarray(fn(weights, other))
  np.testing.assert_array_equal(a[:, :6], b[:, :6])
  assert np.abs(a[:, 6:] - b[:, 6:]).max(axis=-1).min() > 1e-4


def test_position_does_not_attend_to_its_own_layer_outputs():
  """Adding a vector to x_t^l at t = 5 leaves x_t^0..x_t^{l-1} unchanged
  (layers below do not see m_t), changes x_t^l..x_t^L only through the
  residual stream, and changes every layer >= 1 of position t + 1 (which
  attends to m_t).  Positions before t are untouched."""
  _, _, weights, ids = _setup(False)
  model = _setup(False)[0]
  cfg = model.config
  emb = jnp.asarray(weights[0])[ids]
  run = jax.jit(lambda off: fm.feedback_forward(weights, cfg, emb, BLOCK,
                                                offsets=off)[1])
  base = np.asarray(run(jnp.zeros((B, T, L + 1, D))))
  for layer in range(L + 1):
    off = np.zeros((B, T, L + 1, D), np.float32)
    off[:, 5, layer] = np.random.RandomState(layer).randn(B, D)  # not constant:
    # LN1 would cancel a constant shift of m_t
    hid = np.asarray(run(jnp.asarray(off)))
    np.testing.assert_array_equal(hid[:, :5], base[:, :5])
    np.testing.assert_array_equal(hid[:, 5, :layer], base[:, 5, :layer])
    assert np.abs(hid[:, 5, layer:] - base[:, 5, layer:]).min() > 0
    assert np.abs(hid[:, 6, 1:] - base[:, 6, 1:]).max(axis=-1).min() > 1e-6


def test_truncated_gradients_stop_at_the_block():
  """d x_t^L / d x_p^0 is zero for p before t's block (block_len 4: t = 9 is
  in block [8, 12)) and nonzero inside it; without truncation it is nonzero
  for earlier p too."""
  _, _, weights, ids = _setup(True)
  cfg = _setup(True)[0].config
  emb = jnp.asarray(weights[0])[ids]

  def grad_norms(truncate):
    def top9(e):
      return jnp.sum(fm.feedback_forward(weights, cfg, e, BLOCK, truncate)[0][:, 9])
    g = jax.grad(top9)(emb)
    return np.abs(np.asarray(g)).sum(axis=(0, 2))  # per position

  cut, full = grad_norms(True), grad_norms(False)
  assert np.all(cut[:8] == 0)
  assert np.all(cut[8:10] > 0) and np.all(cut[10:] == 0)
  assert np.all(full[:10] > 0)


def test_shared_kv_parameter_counts():
  """Shared K/V has one (LN1, Wk, Wv); per-layer has L of them."""
  counts = {}
  for shared in (True, False):
    m = _model(shared, 'eval')
    m.init(shapes.ShapeDtype((1, T), np.int32))
    counts[shared] = sum(x.size for x in jax.tree_util.tree_leaves(m.weights))
  per_group = 2 * D + 2 * D * D  # LN scale and bias, Wk, Wv (H * dh = D)
  layer = 2 * D * D + 2 * D + D * FF + FF + FF * D + D
  common = V * D + (D // H) * S + (L + 1) + 2 * D + D * V + V
  assert counts[True] == common + L * layer + per_group
  assert counts[False] == common + L * layer + L * per_group


@pytest.mark.parametrize('kw, words', [
    (dict(span=0), 'span must be a positive integer'),
    (dict(block_len=-2), 'block_len must be a positive integer'),
    (dict(span=T + 1), 'span (11) is longer than the sequence (max_len 10)'),
    (dict(block_len=T + 5), 'block_len (15) is longer than the sequence'),
    (dict(n_heads=3), 'd_model (16) must be a multiple of n_heads (3)'),
    (dict(mode='decode'), "mode must be one of ('train', 'eval', 'predict')"),
    (dict(unroll=0), 'unroll must be a positive integer'),
])
def test_bad_arguments_fail_at_build_time(kw, words):
  kw = dict(dict(KW, shared_kv=True, mode='train'), **kw)
  with pytest.raises(ValueError) as e:
    fm.FeedbackLM(V, **kw)
  assert words in str(e.value)


def test_sequence_longer_than_max_len_fails_at_init():
  with pytest.raises(Exception, match='Input length 12 exceeds FeedbackLM max_len 10'):
    _model(True, 'train').init(shapes.ShapeDtype((1, 12), np.int32))  # trax's LayerError


@pytest.mark.parametrize('saved, loaded, words', [
    (dict(shared=True), dict(shared=False),
     'weights array 3 is float32(1, 16) there but the model expects float32(2, 16)'),
    (dict(shared=True, span=4), dict(shared=True, span=3),
     'weights array 1 is float32(8, 4) there but the model expects float32(8, 3)'),
])
def test_checkpoint_with_other_memory_settings_is_refused_clearly(
    tmp_path, saved, loaded, words):
  """Restoring into a model with another K/V sharing or span names the array,
  both shapes and the fix (use the run's gin config)."""
  def weights(shared, span=S):
    m = fm.FeedbackLM(V, **dict(KW, span=span, shared_kv=shared, mode='eval'))
    m.init(shapes.ShapeDtype((1, T), np.int32))
    return m.weights
  path = ckpt_lib.save(str(tmp_path), 1, {'weights': weights(**saved)})
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ckpt_lib.restore(path, {'weights': weights(**loaded)})
  message = str(e.value)
  assert 'does not fit the configured model' in message
  assert 'use the gin config it was trained with' in message
  assert words in message


@pytest.fixture
def _fresh_flags():
  gin.clear_config()
  train.FLAGS.unparse_flags()
  yield
  gin.clear_config()
  train.FLAGS.unparse_flags()


def test_tiny_config_trains_through_train_py(tmp_path, capsys, _fresh_flags):
  """train.py with gin/feedback/tiny.gin: trains, evaluates, checkpoints and
  samples (predict mode through the Sampler)."""
  out = str(tmp_path / 'run')
  train.FLAGS(['train.py', f"--gin_file={os.path.join(ROOT, 'gin', 'feedback', 'tiny.gin')}",
               f'--output_dir={out}', '--steps=6', '--eval_every=6',
               '--checkpoint_every=6', '--log_every=3', '--seq_len=32',
               '--sample_length=4', '--notensorboard'])
  train.main(['train.py'])
  printed = capsys.readouterr().out
  assert 'FeedbackLM.span = 16' in open(os.path.join(out, 'config.gin')).read()
  assert 'train step 6 | loss' in printed and 'sample: ' in printed
  assert ckpt_lib.latest(out).endswith('ckpt_000000006')


def test_length_curriculum_resumes_on_longer_programs(tmp_path, capsys, _fresh_flags):
  """gin/feedback/curriculum_short.gin then curriculum_long.gin on one
  --output_dir: phase 2 resumes phase 1's checkpoint with longer programs and
  another batch size (tiny CPU sizes through --gin_param)."""
  out, gin_dir = str(tmp_path / 'run'), os.path.join(ROOT, 'gin', 'feedback')
  for phase, seq_len, batch, steps in (('short', 32, 4, 2), ('long', 64, 2, 3)):
    train.FLAGS.unparse_flags()
    gin.clear_config()
    train.FLAGS(['train.py', f"--gin_file={os.path.join(gin_dir, 'algorithmic_3var_cpu.gin')}",
                 f"--gin_file={os.path.join(gin_dir, f'curriculum_{phase}.gin')}",
                 f'--gin_param=training.train.seq_len={seq_len}',
                 f'--gin_param=training.train.batch_size={batch}',
                 '--gin_param=feedback.make_dataset.n_train=8',
                 f'--output_dir={out}', f'--steps={steps}', f'--eval_every={steps}',
                 '--log_every=1', '--notensorboard'])
    train.main(['train.py'])
    config = open(os.path.join(out, 'config.gin')).read()
    assert f'training.train.seq_len = {seq_len}' in config
    assert 'FeedbackLM.dropout = 0.0' in config
  printed = capsys.readouterr().out
  assert 'resumed from' in printed and 'at step 2' in printed
  assert 'one program per row of 64 tokens' in printed
  assert 'train step 3 | loss' in printed and 'eval step 3 | loss' in printed
  assert ckpt_lib.latest(out).endswith('ckpt_000000003')
  before = open(os.path.join(out, 'config_before_step_2.gin')).read()
  assert 'training.train.seq_len = 32' in before  # phase 1's settings are kept


# --- the algorithmic task ---------------------------------------------------

def test_algorithmic_data_is_deterministic_and_answers_are_right():
  ds = fdata.AlgorithmicDataset(3, 64, 4, seed=7, n_train=20)
  again = fdata.AlgorithmicDataset(3, 64, 4, seed=7, n_train=20)
  other = fdata.AlgorithmicDataset(3, 64, 4, seed=8, n_train=20)
  first = [next(ds.batches(s)) for s in (0, 9)]  # step 9 spans two epochs
  stream = ds.batches(0)
  for _ in range(9):
    next(stream)
  for a, b in zip(first[1], next(stream)):  # resuming = continuing
    np.testing.assert_array_equal(a, b)
  for a, b in zip(first[0], next(again.batches(0))):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first[0][0], next(other.batches(0))[0])
  evals = ds.eval_batches(3)
  for a, b in zip(evals[2], again.eval_batches(3)[2]):
    np.testing.assert_array_equal(a, b)
  train_rows = {r.tobytes() for r in ds._train_set()[0]}
  assert not any(r.tobytes() in train_rows for b in evals for r in b[0])

  vocab = fdata.VOCAB
  n_answers = 0
  for inputs, targets, weights in first + evals:
    assert inputs.shape == targets.shape == weights.shape == (4, 64)
    for x, y, w in zip(inputs, targets, weights):
      words = [vocab[i] for i in x if vocab[i] != fdata.PAD]
      assert words[-1] == 'END' and len(set(words[:-1]) & {'x', 'y', 'z'}) > 0
      assert not set(words) & {'p', 'r'}  # 3 variables only
      answers = [int(vocab[t]) for t, wt in zip(y, w) if wt]
      assert answers == fdata.run_program(words)  # an independent interpreter
      assert all(vocab[x[i]] == ';' and vocab[x[i - 2]] == 'print'
                 for i in np.flatnonzero(w))
      n_answers += len(answers)
  assert n_answers > 20


def test_algorithmic_dataset_through_make_dataset():
  from training import data as data_lib
  ds = data_lib.make_dataset('algorithmic:5', seq_len=32, batch_size=2, seed=0)
  assert ds.vocab_size == len(fdata.VOCAB) and ds.n_vars == 5
  assert '5 variables' in ds.description
  text = 'x = 3 ; print x ;'
  assert ds.tokenizer.decode(ds.tokenizer.encode(text)) == text
  with pytest.raises(ValueError, match='1 to 5'):
    data_lib.make_dataset('algorithmic:7', seq_len=32, batch_size=2)
  with pytest.raises(ValueError, match="'algorithmic:N'"):
    data_lib.make_dataset('algorithmic:x', seq_len=32, batch_size=2)


def test_algorithmic_training_set_size_is_a_gin_binding(_fresh_flags):
  """feedback.make_dataset.n_train sets the number of training programs (the
  default is the official 10,000); bad values are refused."""
  from training import data as data_lib
  default = data_lib.make_dataset('algorithmic:3', seq_len=32, batch_size=8)
  with gin.unlock_config():
    gin.bind_parameter('feedback.make_dataset.n_train', 40)
    small = data_lib.make_dataset('algorithmic:3', seq_len=32, batch_size=8)
    assert small.n_train == 40 and '40 train programs' in small.description
    assert default.n_train == fdata.N_TRAIN
    programs = {small.example('train', i)[0].tobytes() for i in range(40)}
    batches = small.batches()
    rows = np.concatenate([next(batches)[0] for _ in range(6)])  # 48 rows
    assert {r.tobytes() for r in rows} == programs  # the 40 programs, all of them
    gin.bind_parameter('feedback.make_dataset.n_train', 0)
    with pytest.raises(ValueError, match='n_train .training programs. must be a positive'):
      data_lib.make_dataset('algorithmic:3', seq_len=32, batch_size=8)
