"""Sequence-to-sequence data (copy, T5 span corruption, summarization pairs),
two-input models through the trainer and run.train, and encoder-decoder decoding."""
import json
import os

import gin
import jax
import numpy as np
import pytest

from training import data
from training import metrics as metrics_lib
from training import run
from training import sampling
from training import seq2seq as S
from training import trainer as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ('The quick brown fox jumps over the lazy dog. ' * 3 + '\n\n'
        'Pack my box with five dozen liquor jugs.\n\n'
        'How vexingly quick daft zebras jump!\n\n' * 2)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for u, v in zip(x, y):
      np.testing.assert_array_equal(u, v)


def runs(mask):
  """Lengths of the runs of True in a bool array."""
  edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
  return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


# --- T5 span corruption ----------------------------------------------------

def test_span_counts_follow_t5_rule():
  """noise = round(0.15 L) in [1, L-1], spans = max(1, round(noise / 3))."""
  assert S.noise_span_counts(512) == (77, 26)   # c4_trax_data.gin's 512-token chunks
  assert S.noise_span_counts(100) == (15, 5)
  assert S.noise_span_counts(20) == (3, 1)
  assert S.noise_span_counts(1) == (1, 1)      # a length below 2 counts as 2


def test_noise_mask_density_and_span_lengths_match_trax():
  """For every length our mask has trax's noise count and span count (trax's
  random_spans_noise_mask, a translation of T5's), starts with a non-noise
  span, ends with noise, and its spans average noise/spans = ~3 tokens."""
  from trax.data import inputs as trax_inputs
  rng = np.random.default_rng(0)
  all_spans = []
  for length in list(range(2, 80)) + [100, 256, 512]:
    ours = S.random_spans_noise_mask(length, rng)
    np.random.seed(length)
    theirs = trax_inputs.random_spans_noise_mask(length)
    assert ours.shape == theirs.shape == (length,)
    assert ours.sum() == theirs.sum() == S.noise_span_counts(length)[0]
    assert len(runs(ours)) == len(runs(theirs)) == S.noise_span_counts(length)[1]
    assert not ours[0] and ours[-1]
    all_spans.extend(runs(ours))
  assert abs(np.mean(all_spans) - 3.0) < 0.3
  masks = [S.random_spans_noise_mask(512, np.random.default_rng(s)) for s in range(50)]
  assert all(m.mean() == 77 / 512 for m in masks)     # density 0.15 (rounded)
  assert len({m.tobytes() for m in masks}) == 50      # random span placement


def test_sentinels_on_a_hand_made_example():
  """a b c d e f g with noise spans (b c), (f g) -> inputs a <1> d e <2>,
  targets <1> b c <2> f g, where <k> = vocab_size - k."""
  v = 50
  tokens = np.array([11, 12, 13, 14, 15, 16, 17])
  mask = np.array([0, 1, 1, 0, 0, 1, 1], bool)
  x = S.spans_to_sentinels(tokens, mask, v)
  y = S.spans_to_sentinels(tokens, ~mask, v)
  np.testing.assert_array_equal(x, [11, 49, 14, 15, 48])
  np.testing.assert_array_equal(y, [49, 12, 13, 48, 16, 17])
  np.testing.assert_array_equal(S.merge_spans(x, y, v - 1, n_sentinels=10), tokens)
  # trax's consume_noise_mask gives the same pair for the same mask
  from trax.data import inputs as trax_inputs
  tx, ty = next(trax_inputs.consume_noise_mask(vocab_size=v)(iter([(tokens, mask)])))
  np.testing.assert_array_equal(tx, x)
  np.testing.assert_array_equal(ty, y)


def test_span_corrupt_is_recoverable_and_sized():
  v = 356
  for seed in range(20):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 256, 100)
    x, y = S.span_corrupt(tokens, rng, v)
    n_noise, n_spans = S.noise_span_counts(100)
    assert len(x) == 100 - n_noise + n_spans and len(y) == n_noise + n_spans
    np.testing.assert_array_equal(x[x >= 256], v - 1 - np.arange(n_spans))
    np.testing.assert_array_equal(y[y >= 256], v - 1 - np.arange(n_spans))
    assert y[0] == v - 1  # targets open with the first sentinel
    np.testing.assert_array_equal(S.merge_spans(x, y, v - 1), tokens)


def _spans_ds(seed=0, **kw):
  texts = {'train': TEXT.split('\n\n') * 2, 'eval': ['A held-out paragraph of text.'] * 3}
  kw = dict(dict(input_len=24, target_len=12, batch_size=3), **kw)
  return S.SpanCorruptionDataset('spans:test', lambda split: iter(texts[split]),
                                 data.ByteTokenizer(), seed=seed, **kw)


def test_span_corruption_dataset_batches_recover_the_text():
  ds = _spans_ds()
  assert ds.vocab_size == 256 + 100 and ds.chunk_len == 24  # 24 - 4 + 1 + EOS fits
  ds.shuffle_examples = 1  # file order, to compare with the chunks
  chunks = [c for c in ds.chunks('train')]
  batches = take(ds.batches(0), 4)
  rows = [(x, y, w) for b in batches for x, y, w in zip(*b)]
  for (x, y, w), chunk in zip(rows, chunks):
    assert x.shape == (24,) and y.shape == w.shape == (12,)
    n = int(w.sum())
    np.testing.assert_array_equal(w[:n], 1)
    assert y[n - 1] == 0 and (y[n:] == 0).all()  # EOS (byte 0) then padding
    xs = x[:len(x) - np.argmax(x[::-1] != 0)]  # strip padding
    np.testing.assert_array_equal(S.merge_spans(xs, y[:n - 1], ds.vocab_size - 1), chunk)
  shuffled = _spans_ds()
  shuffled.shuffle_examples = 4
  full = take(shuffled.batches(0), 4)
  assert_same(take(shuffled.batches(2), 2), full[2:])  # resume at step 2
  assert not all(np.array_equal(a[0], b[0]) for a, b in zip(full, batches))
  assert_same(take(_spans_ds().batches(0), 2), take(_spans_ds().batches(0), 2))
  other = take(_spans_ds(seed=1).batches(0), 1)[0]
  assert not np.array_equal(other[0], take(_spans_ds().batches(0), 1)[0][0])
  ev = ds.eval_batches(2)
  assert_same(ev, ds.eval_batches(2))
  assert ev[0][2].sum() > 0
  assert '<extra_id_0>' in ds.decode(ev[0][1][0])
  with pytest.raises(ValueError, match='target_len 5 is too short'):
    _spans_ds(target_len=5)
  with pytest.raises(ValueError, match='chunk_len 30'):
    _spans_ds(chunk_len=30)


def test_spans_over_a_local_corpus_and_mocked_c4(tmp_path):
  path = tmp_path / 'corpus.txt'
  path.write_text(TEXT * 4)
  ds = data.make_dataset(f'spans:{path}', seq_len=32, target_len=16, batch_size=2)
  assert isinstance(ds, S.SpanCorruptionDataset) and ds.seq2seq
  b = next(ds.batches())
  assert b[0].shape == (2, 32) and b[1].shape == (2, 16)
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=6):  # the real tfds.load, mocked records
    c4 = data.make_dataset('spans:tfds:c4/en', seq_len=32, target_len=16, batch_size=2,
                           data_dir=str(tmp_path))
    c4.shuffle_examples = 4
    batches = take(c4.batches(0), 3)
    assert_same(take(c4.batches(1), 2), batches[1:])
    assert all(bt[2].sum() > 0 for bt in batches)
    assert c4.eval_batches(1)[0][0].shape == (2, 32)
  assert 'T5 span corruption' in c4.description


def test_summarization_pairs_from_mocked_scientific_papers(tmp_path):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=5):
    ds = data.make_dataset('summarize:tfds:scientific_papers/arxiv', seq_len=12,
                           target_len=6, batch_size=2, data_dir=str(tmp_path))
    first = next(iter(tfds.as_numpy(tfds.load('scientific_papers/arxiv', split='validation',
                                              data_dir=str(tmp_path)))))
    ev = ds.eval_batches(1)[0]
    ds.shuffle_examples = 2
    train = take(ds.batches(0), 3)
    assert_same(take(ds.batches(2), 1), train[2:])
  assert "eval split 'validation'" in ds.description
  tok = data.ByteTokenizer()
  article, abstract = tok.encode(first['article'].decode()), tok.encode(first['abstract'].decode())
  np.testing.assert_array_equal(ev[0][0, :11], article[:11])
  assert ev[0][0, 11] == 0  # at least one pad, like trax's appended 0
  np.testing.assert_array_equal(ev[1][0], np.append(abstract[:5], tok.eos_id))
  np.testing.assert_array_equal(ev[2][0], 1.0)
  with pytest.raises(ValueError, match='summarize:tfds:NAME'):
    data.make_dataset('summarize:python_docs', seq_len=8, batch_size=2)


# --- Copy task -------------------------------------------------------------

def test_copy_task_batches():
  """inputs = targets = w, symbols 1..V-2, one length per batch, 0-padded."""
  ds = data.make_dataset('copy:13', seq_len=16, batch_size=8, seed=3)
  assert isinstance(ds, S.CopyDataset) and ds.vocab_size == 13
  lengths = set()
  for x, y, w in take(ds.batches(0), 40):
    assert x.shape == y.shape == w.shape == (8, 16)
    np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(w, (x != 0).astype(np.float32))
    n = int(w[0].sum())
    assert (w.sum(1) == n).all() and 1 <= n <= 16 and (w[:, :n] == 1).all()
    assert x[:, :n].min() >= 1 and x[:, :n].max() <= 11
    lengths.add(n)
  assert len(lengths) > 8
  assert_same(take(ds.batches(5), 3), take(ds.batches(0), 8)[5:])
  ev = ds.eval_batches(3)
  assert_same(ev, ds.eval_batches(3))
  assert all(4 <= b[2][0].sum() <= 16 for b in ev)
  long = ds.extra_eval_batches(3)['long']
  for x, y, w in long:
    assert x.shape == (8, 32) and 16 < w[0].sum() <= 32
  assert not np.array_equal(take(data.make_dataset('copy', seq_len=16, batch_size=8,
                                                    seed=4).batches(), 1)[0][0],
                            take(ds.batches(), 1)[0][0])
  with pytest.raises(ValueError, match="target_len must equal"):
    data.make_dataset('copy', seq_len=16, target_len=8, batch_size=2)
  with pytest.raises(ValueError, match='copy:13'):
    data.make_dataset('copy:x', seq_len=16, batch_size=2)
  with pytest.raises(ValueError, match='target_len only applies'):
    data.make_dataset('python_docs', seq_len=16, target_len=8, batch_size=2)


# --- Two-input models: trainer, run, decoding -----------------------------

def test_run_trains_evaluates_resumes_and_decodes_a_seq2seq_model(tmp_path):
  """gin/seq2seq/copy_tiny.gin through run.train: train, eval (also the longer
  held-out copies), checkpoint, resume, sample; then training.decode."""
  import train  # pylint: disable=import-outside-toplevel
  from training import decode  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  train.parse_gin([os.path.join(ROOT, 'gin', 'seq2seq', 'copy_tiny.gin')], [])
  kw = dict(seq_len=8, batch_size=8, log_every=2, eval_every=4, eval_batches=1,
            checkpoint_every=4, sample_length=8, lr_schedule=lambda s: 1e-2)
  a = str(tmp_path / 'a')
  try:
    run.train(a, steps=4, **dict(kw, sample_length=0))
    out = run.train(a, steps=8, **kw)  # resumes from step 4
    assert out['checkpoint'].endswith('ckpt_000000008')
    records = metrics_lib.read_jsonl(os.path.join(a, 'metrics.jsonl'))
    train_losses = [r['loss'] for r in records if r['split'] == 'train']
    assert len(train_losses) == 4 and train_losses[-1] < train_losses[0]
    assert 'bits_per_byte' not in records[0] and 'mfu' not in records[0]
    long = [r for r in records if r['split'] == 'eval_long']
    assert [r['step'] for r in long] == [4, 8] and 'sequence_accuracy' in long[0]
    ev = [r for r in records if r['split'] == 'eval']
    assert 0 <= ev[-1]['accuracy'] <= 1 and out['eval_loss'] == ev[-1]['loss']
    assert ev[-1]['sequence_accuracy'] <= ev[-1]['accuracy']
    with open(os.path.join(a, 'samples.txt')) as f:
      sample = json.loads(f.readlines()[-1])
    assert len(sample['text'].split()) == 8 and sample['targets']
    model_fn, tok, weights, dtype, meta = decode.load_run(a)
    assert meta['input_len'] == meta['target_len'] == 8
    assert isinstance(tok, S.IdTokenizer)
    texts = decode.decode_seq2seq(model_fn, tok, weights, dtype, meta, '3 4 5', 8)
    assert len(texts) == 1 and len(texts[0].split()) == 8
    # greedy predict-mode decoding == eval-mode argmax over its own output
    out = np.array([[int(t) for t in texts[0].split()]], np.int32)
    x = np.array([[3, 4, 5, 0, 0, 0, 0, 0]], np.int32)
    eval_model = model_fn(vocab_size=13, mode='eval')
    _, state = eval_model.init(T.input_signature(((1, 8), (1, 8))))
    logits = jax.jit(eval_model.pure_fn)((x, out), weights, state, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.argmax(logits[0][0], -1), out)
    sampler = sampling.Sampler(model_fn(vocab_size=13, mode='predict'), input_len=8)
    with pytest.raises(ValueError, match='Sampler.decode'):
      sampler.generate(weights, x, 4)
    with pytest.raises(ValueError, match='inputs shape'):
      sampler.decode(weights, x[:, :4], 4)
    with pytest.raises(ValueError, match='input_len'):
      sampling.Sampler(model_fn(vocab_size=13, mode='predict'))
    with pytest.raises(run.UserError, match='encoder-decoder'):
      run.train(str(tmp_path / 'c'), steps=1, dataset='python_docs', seq_len=8,
                batch_size=2)
  finally:
    gin.clear_config()
