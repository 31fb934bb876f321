"""Sequence-to-sequence data for encoder-decoder models: (inputs, targets) pairs.

Every batch is a tuple ``(inputs, targets, weights)`` of numpy arrays:
``inputs`` int32 (batch_size, input_len), ``targets`` int32 (batch_size,
target_len) and ``weights`` float32 (batch_size, target_len), 1.0 on real
target tokens and 0.0 on padding.  Padding is id 0 (``PAD_ID``).  The model
is called on ``(inputs, targets)`` and shifts the targets right itself, as
trax's encoder-decoders do (``tl.ShiftRight`` inside the model), so
``targets`` here are the unshifted tokens the logits are scored against.

Dataset names (through :func:`training.data.make_dataset` or
:func:`make_dataset`):

* ``copy`` or ``copy:V`` - trax's sequence copy task as terraformer_copy.gin
  uses it (``trax.data.simple_sequence_copy_inputs``): inputs = targets = w,
  w uniform over the symbols 1 .. V-2 (V = 13 by default), one random length
  in 1 .. train_length per batch; padded to ``input_len``.  A second,
  longer held-out set ('long') has lengths train_length+1 .. long_length.
  Options: gin ``training.seq2seq.CopyDataset.*``.
* ``spans:SOURCE`` - T5 span corruption ("C4 span corruption" of
  terraformer_c4_medium.gin / c4_trax_data.gin): SOURCE is any LM corpus
  name of :mod:`training.data` (``tfds:c4/en``, ``python_docs``, a text file).
  Documents are tokenized, cut into chunks of ``chunk_len`` tokens, and each
  chunk is corrupted with noise density 0.15 and mean span length 3; EOS is
  appended to inputs and targets.  Options: gin
  ``training.seq2seq.SpanCorruptionDataset.*``.
* ``summarize:tfds:NAME`` - (document, summary) text pairs of a TFDS dataset,
  e.g. ``summarize:tfds:scientific_papers/arxiv`` (article -> abstract, as in
  scientific_papers_terraformer.gin): inputs truncated to input_len - 1 tokens
  (at least one pad, like trax's appended 0), targets truncated to
  target_len - 1 tokens and closed with EOS.

Sentinels (span corruption): as in T5, the vocabulary is the tokenizer's plus
``extra_ids`` (100) ids at its top, and the k-th span (k = 1, 2, ...) of a
chunk becomes id ``vocab_size - k``.  trax's c4_trax_data.gin instead binds
the vocab to the SentencePiece size (32000), so there its sentinels reuse the
last pieces' ids; here they never collide with text.

Determinism: the copy task's batch of step s is a function of (seed, s), so
``batches(s)`` starts there at no cost.  The streamed datasets draw each
example's randomness from (seed, epoch, example index) and shuffle with a
seeded buffer, so ``batches(s)`` replays the stream and skips s batches.
"""

import itertools

import gin
import numpy as np

from training import data as data_lib

PAD_ID = 0
EXTRA_IDS = 100          # T5's sentinel count
SHUFFLE_EXAMPLES = 512   # streamed datasets: seeded shuffle buffer size
SPLIT_TRAIN, SPLIT_EVAL, SPLIT_LONG = 0, 1, 2
PAIR_FIELDS = {'scientific_papers': ('article', 'abstract'),
               'cnn_dailymail': ('article', 'highlights'),
               'big_patent': ('description', 'abstract'),
               'billsum': ('text', 'summary')}
NAME_CHOICES = ("'copy', 'copy:V', 'spans:SOURCE' (SOURCE e.g. tfds:c4/en, python_docs "
                "or a text file) or 'summarize:tfds:NAME' (e.g. "
                "summarize:tfds:scientific_papers/arxiv)")


def is_seq2seq_name(name):
  """Whether ``name`` names a sequence-to-sequence dataset of this module."""
  return name == 'copy' or name.startswith(('copy:', 'spans:', 'summarize:'))


# --- T5 span corruption ---------------------------------------------------

def _segment(n_items, n_segments, rng):
  """Random lengths (n_segments,) >= 1 summing to n_items, all splits equally likely."""
  cuts = np.zeros(n_items - 1, bool)
  cuts[:n_segments - 1] = True
  rng.shuffle(cuts)
  bounds = np.concatenate([[0], np.flatnonzero(cuts) + 1, [n_items]])
  return np.diff(bounds)


def noise_span_counts(length, noise_density=0.15, mean_noise_span_length=3.0):
  """(noise tokens, noise spans) of a sequence of ``length`` tokens (T5's rule).

  noise = round(length * density) clipped to [1, length - 1], spans =
  max(1, round(noise / mean span)); a length below 2 counts as 2.
  """
  length = max(length, 2)
  n_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  return n_noise, max(int(round(n_noise / mean_noise_span_length)), 1)


def random_spans_noise_mask(length, rng, noise_density=0.15, mean_noise_span_length=3.0):
  """Bool mask (length,) of T5 span corruption: which tokens are noise.

  The sequence alternates non-noise and noise spans, starting with a non-noise
  span and ending with a noise span; the noise and non-noise token counts are
  fixed by :func:`noise_span_counts` and each is split into the same number of
  spans at uniformly random cut points.

  Args:
    length: tokens in the sequence (>= 1).
    rng: a numpy Generator.
    noise_density: fraction of tokens that are noise.
    mean_noise_span_length: average noise span length.
  """
  n = max(length, 2)
  n_noise, n_spans = noise_span_counts(length, noise_density, mean_noise_span_length)
  noise_lengths = _segment(n_noise, n_spans, rng)
  keep_lengths = _segment(n - n_noise, n_spans, rng)
  spans = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)
  is_noise = np.repeat(np.tile([False, True], n_spans), spans)
  return is_noise[:length]


def spans_to_sentinels(tokens, mask, vocab_size):
  """Replaces each run of masked tokens by one sentinel, vocab_size - k for the k-th run.

  Args:
    tokens: int (length,).
    mask: bool (length,).
    vocab_size: the model's vocabulary size (sentinels are its top ids).

  Returns:
    int32 (length - masked + runs,).
  """
  tokens, mask = np.asarray(tokens, np.int32), np.asarray(mask, bool)
  prev = np.concatenate([[False], mask[:-1]])
  starts = mask & ~prev
  out = np.where(starts, vocab_size - np.cumsum(starts), tokens)
  return out[~(mask & prev)].astype(np.int32)


def span_corrupt(tokens, rng, vocab_size, noise_density=0.15, mean_noise_span_length=3.0):
  """T5 span corruption of ``tokens`` (length,) -> (inputs, targets), int32 each.

  inputs keep the non-noise tokens with each noise span replaced by its
  sentinel; targets hold each noise span preceded by the same sentinel (the
  non-noise spans become sentinels).  E.g. tokens a b c d e f g with noise
  spans (b c) and (f g) give inputs a <1> d e <2>, targets <1> b c <2> f g
  (<k> = vocab_size - k).  :func:`merge_spans` inverts it.
  """
  mask = random_spans_noise_mask(len(tokens), rng, noise_density, mean_noise_span_length)
  return (spans_to_sentinels(tokens, mask, vocab_size),
          spans_to_sentinels(tokens, ~mask, vocab_size))


def merge_spans(inputs, targets, first_sentinel, n_sentinels=EXTRA_IDS):
  """The original tokens from a span-corrupted (inputs, targets) pair.

  Ids in (first_sentinel - n_sentinels, first_sentinel] are sentinels; each
  sentinel in inputs is replaced by the tokens that follow the same sentinel
  in targets.  Trailing EOS / padding must be removed first.
  """
  def is_sentinel(t):
    return first_sentinel - n_sentinels < t <= first_sentinel
  fills, current = {}, None
  for t in targets:
    if is_sentinel(t):
      current = int(t)
      fills[current] = []
    elif current is not None:
      fills[current].append(int(t))
  out = []
  for t in inputs:
    out.extend(fills.get(int(t), []) if is_sentinel(t) else [int(t)])
  return np.asarray(out, np.int32)


# --- Batches --------------------------------------------------------------

def to_batch(pairs, input_len, target_len):
  """[(inputs, targets)] -> (inputs (B, input_len), targets (B, target_len), weights).

  Each sequence is padded with PAD_ID (it must already fit); weights are 1.0
  on the real target tokens.
  """
  b = len(pairs)
  inputs = np.full((b, input_len), PAD_ID, np.int32)
  targets = np.full((b, target_len), PAD_ID, np.int32)
  weights = np.zeros((b, target_len), np.float32)
  for i, (x, y) in enumerate(pairs):
    inputs[i, :len(x)] = x
    targets[i, :len(y)] = y
    weights[i, :len(y)] = 1.0
  return inputs, targets, weights


class Seq2SeqDataset:
  """Common interface of the (inputs, targets) datasets.

  Attributes: name, tokenizer, vocab_size (of the model: tokenizer's plus any
  sentinels), input_len, target_len, batch_size, seed, description.
  """
  seq2seq = True

  def __init__(self, name, tokenizer, vocab_size, input_len, target_len, batch_size,
               seed, description):
    self.name, self.tokenizer, self.vocab_size = name, tokenizer, vocab_size
    self.input_len, self.target_len = input_len, target_len
    self.seq_len = input_len
    self.batch_size, self.seed, self.description = batch_size, seed, description

  def batches(self, start_step=0):
    """Yields the training batches of steps start_step, start_step+1, ... forever."""
    raise NotImplementedError

  def eval_batches(self, n_batches):
    """List of n_batches held-out batches, identical on every call."""
    raise NotImplementedError

  def extra_eval_batches(self, n_batches):
    """{name: list of batches} of further held-out sets (e.g. longer sequences)."""
    del n_batches
    return {}

  def decode(self, ids):
    """Ids -> text (see `decode_ids`)."""
    return decode_ids(self.tokenizer, self.vocab_size, ids)


def decode_ids(tokenizer, vocab_size, ids):
  """Ids -> text; ids above the tokenizer's vocabulary (sentinels) show as
  T5's <extra_id_k>, k = vocab_size - 1 - id."""
  n, parts, run = tokenizer.vocab_size, [], []
  for t in np.asarray(ids).tolist():
    if t < n:
      run.append(t)
      continue
    if run:
      parts.append(tokenizer.decode(run))
      run = []
    parts.append(f'<extra_id_{vocab_size - 1 - t}>')
  if run:
    parts.append(tokenizer.decode(run))
  return (' ' if isinstance(tokenizer, IdTokenizer) else '').join(parts)


def tokenizer_for_run(dataset, vocab_size, vocab_file=None):
  """The tokenizer of a finished seq2seq run, from its checkpoint metadata."""
  if dataset == 'copy' or dataset.startswith('copy:'):
    return IdTokenizer(vocab_size)
  if vocab_file:
    return data_lib.SentencePieceTokenizer(vocab_file)
  return data_lib.ByteTokenizer()


class IdTokenizer:
  """Token ids as text: encode('3 4 5') -> [3, 4, 5]; decode joins with spaces."""
  eos_id = PAD_ID

  def __init__(self, vocab_size):
    self.vocab_size = vocab_size

  def encode(self, text):
    return np.asarray([int(t) for t in text.split()], np.int32)

  def decode(self, ids):
    return ' '.join(str(int(i)) for i in ids)


@gin.configurable(module='training.seq2seq',
                  denylist=['input_len', 'target_len', 'batch_size', 'seed'])
class CopyDataset(Seq2SeqDataset):
  """trax's sequence copy task (``simple_sequence_copy_inputs``): targets = inputs.

  Each batch draws one length l (uniform over its split's lengths) and
  batch_size sequences w of l symbols uniform in 1 .. vocab_size - 2; inputs =
  targets = w padded with 0, weights 1 on w.  terraformer_copy.gin: vocab 13,
  batch 128, train lengths 1 .. 32, eval lengths 4 .. 32, padding to 32.

  Args:
    vocab_size: symbols 1 .. vocab_size-2 (trax's randint high bound is
      exclusive at vocab_size - 1); 0 is padding.
    input_len: padded length of train / eval rows (target_len is the same).
    target_len: must equal input_len (or be None).
    batch_size, seed: batch rows; seed of every draw.
    train_length: longest training sequence (default input_len).
    eval_min_length: shortest eval sequence (eval lengths go up to train_length).
    long_length: held-out set 'long' has lengths train_length+1 .. long_length,
      padded to long_length (default 2 * train_length; 0 or None: no such set).
  """

  def __init__(self, vocab_size=13, *, input_len, target_len=None, batch_size, seed=0,
               train_length=None, eval_min_length=4, long_length=-1):
    if target_len not in (None, input_len):
      raise ValueError(f"The copy task's target_len must equal its input length (seq_len "
                       f"{input_len}), not {target_len}; leave target_len unset.")
    if vocab_size < 3:
      raise ValueError(f"vocab_size must be at least 3 for the copy task, got {vocab_size}.")
    train_length = input_len if train_length is None else train_length
    if not 1 <= train_length <= input_len:
      raise ValueError(f"train_length must be between 1 and the input length {input_len}, "
                       f"got {train_length}.")
    long_length = 2 * train_length if long_length == -1 else (long_length or 0)
    if long_length and long_length <= train_length:
      raise ValueError(f"long_length must exceed train_length {train_length} (or be 0 to "
                       f"skip the long held-out set), got {long_length}.")
    self.train_length, self.long_length = train_length, long_length
    self.eval_min_length = min(max(eval_min_length, 1), train_length)
    desc = (f"copy task, symbols 1..{vocab_size - 2}, train lengths 1..{train_length}, "
            f"eval {self.eval_min_length}..{train_length}"
            + (f", long eval {train_length + 1}..{long_length}" if long_length else ''))
    super().__init__('copy', IdTokenizer(vocab_size), vocab_size, input_len, input_len,
                     batch_size, seed, desc)

  def _batch(self, split, index, lo, hi, pad_len):
    rng = np.random.default_rng([self.seed, split, index])
    length = int(rng.integers(lo, hi + 1))
    w = rng.integers(1, self.vocab_size - 1, (self.batch_size, length)).astype(np.int32)
    return to_batch(list(zip(w, w)), pad_len, pad_len)

  def batches(self, start_step=0):
    if start_step < 0:
      raise ValueError(f"start_step must be >= 0, got {start_step}.")
    for step in itertools.count(start_step):
      yield self._batch(SPLIT_TRAIN, step, 1, self.train_length, self.input_len)

  def eval_batches(self, n_batches):
    return [self._batch(SPLIT_EVAL, k, self.eval_min_length, self.train_length,
                        self.input_len) for k in range(n_batches)]

  def extra_eval_batches(self, n_batches):
    if not self.long_length:
      return {}
    return {'long': [self._batch(SPLIT_LONG, k, self.train_length + 1, self.long_length,
                                 self.long_length) for k in range(n_batches)]}


class StreamingSeq2SeqDataset(Seq2SeqDataset):
  """Examples from ``examples(split, epoch)`` (an iterator of (inputs, targets)
  int arrays that already fit), shuffled by a seeded buffer, the train split
  repeated forever; eval batches are the eval split's first examples.
  """

  def __init__(self, name, tokenizer, vocab_size, input_len, target_len, batch_size, seed,
               description, examples):
    super().__init__(name, tokenizer, vocab_size, input_len, target_len, batch_size, seed,
                     description)
    self._examples = examples
    self.shuffle_examples = SHUFFLE_EXAMPLES
    self._eval_cache = {}

  def _train_examples(self):
    """Yields the train split's examples in file order, epoch after epoch, forever."""
    for epoch in itertools.count():
      n = 0
      for ex in self._examples('train', epoch):
        n += 1
        yield ex
      if n == 0:
        raise ValueError(f"Dataset {self.name!r} has no training example.")

  def batches(self, start_step=0):
    if start_step < 0:
      raise ValueError(f"start_step must be >= 0, got {start_step}.")
    examples = data_lib._shuffled(  # pylint: disable=protected-access
        self._train_examples(), self.shuffle_examples,
        np.random.default_rng([self.seed, SPLIT_TRAIN]))
    examples = itertools.islice(examples, start_step * self.batch_size, None)
    for group in data_lib._batched(examples, self.batch_size):  # pylint: disable=protected-access
      yield to_batch(group, self.input_len, self.target_len)

  def eval_batches(self, n_batches):
    if n_batches not in self._eval_cache:
      b = self.batch_size
      found = list(itertools.islice(self._examples('eval', 0), n_batches * b))
      if not found:
        raise ValueError(f"The eval split of {self.name!r} has no example.")
      self._eval_cache[n_batches] = [
          to_batch([found[(k * b + i) % len(found)] for i in range(b)],
                   self.input_len, self.target_len) for k in range(n_batches)]
    return self._eval_cache[n_batches]


def _fits(length, input_len, density, mean_span):
  """Whether a chunk of ``length`` tokens gives inputs (+EOS) of at most input_len."""
  n_noise, n_spans = noise_span_counts(length, density, mean_span)
  return length - n_noise + n_spans + 1 <= input_len


@gin.configurable(module='training.seq2seq',
                  denylist=['name', 'texts', 'tokenizer', 'input_len', 'target_len',
                            'batch_size', 'seed'])
class SpanCorruptionDataset(StreamingSeq2SeqDataset):
  """T5 span corruption over a text source (C4 in terraformer_c4_medium.gin).

  Each document is tokenized and cut into consecutive chunks of chunk_len
  tokens (trax's generate_sequential_chunks); every non-empty chunk is
  corrupted (:func:`span_corrupt`) with randomness from (seed, split, epoch,
  chunk index) and EOS is appended to inputs and targets.

  Args:
    name: the dataset name (for messages).
    texts: function split ('train' | 'eval') -> iterator of document strings.
    tokenizer: a tokenizer of training.data (byte or SentencePiece).
    input_len, target_len: padded lengths (c4_trax_data.gin: 512 and 256).
    batch_size, seed: rows per batch; seed of the corruption and shuffling.
    noise_density, mean_noise_span_length: T5's 0.15 and 3.0.
    extra_ids: sentinel ids added above the tokenizer's vocabulary.
    chunk_len: tokens per chunk (default: the longest chunk whose inputs,
      with EOS, fit input_len; 512 -> 512).
  """

  def __init__(self, name, texts, tokenizer, *, input_len, target_len, batch_size, seed=0,
               noise_density=0.15, mean_noise_span_length=3.0, extra_ids=EXTRA_IDS,
               chunk_len=None):
    if not 0 < noise_density < 1:
      raise ValueError(f"noise_density must be in (0, 1), got {noise_density}.")
    if mean_noise_span_length < 1:
      raise ValueError(f"mean_noise_span_length must be >= 1, got {mean_noise_span_length}.")
    if chunk_len is None:
      chunk_len = input_len
      while chunk_len > 1 and not _fits(chunk_len, input_len, noise_density,
                                        mean_noise_span_length):
        chunk_len -= 1
    if chunk_len < 1 or not _fits(chunk_len, input_len, noise_density,
                                  mean_noise_span_length):
      raise ValueError(f"chunk_len {chunk_len} gives corrupted inputs longer than the input "
                       f"length {input_len}; use a smaller chunk_len or a larger seq_len.")
    n_noise, n_spans = noise_span_counts(chunk_len, noise_density, mean_noise_span_length)
    if n_noise + n_spans + 1 > target_len:
      raise ValueError(f"target_len {target_len} is too short for chunks of {chunk_len} tokens "
                       f"(targets need {n_noise + n_spans + 1} with EOS); use target_len >= "
                       f"{n_noise + n_spans + 1}.")
    if n_spans > extra_ids:
      raise ValueError(f"Chunks of {chunk_len} tokens have {n_spans} noise spans but only "
                       f"extra_ids={extra_ids} sentinels; raise extra_ids.")
    self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
    self.chunk_len, self.extra_ids = chunk_len, extra_ids
    self._texts = texts
    vocab_size = tokenizer.vocab_size + extra_ids
    desc = (f"{name}: T5 span corruption (noise {noise_density}, mean span "
            f"{mean_noise_span_length}, {extra_ids} sentinels) of {chunk_len}-token chunks, "
            f"{data_lib._tok_desc(tokenizer)}")  # pylint: disable=protected-access
    super().__init__(name, tokenizer, vocab_size, input_len, target_len, batch_size, seed,
                     desc, self._corrupted)

  def chunks(self, split):
    """Yields the token chunks (int32, 1..chunk_len long) of one pass over ``split``."""
    for group in data_lib._batched(self._texts(split), 64):  # pylint: disable=protected-access
      for ids in self.tokenizer.encode_batch(group):
        for start in range(0, len(ids), self.chunk_len):
          yield np.asarray(ids[start:start + self.chunk_len], np.int32)

  def _corrupted(self, split, epoch):
    split_id = SPLIT_TRAIN if split == 'train' else SPLIT_EVAL
    eos = self.tokenizer.eos_id
    for i, chunk in enumerate(self.chunks(split)):
      rng = np.random.default_rng([self.seed, split_id, epoch, i])
      x, y = span_corrupt(chunk, rng, self.vocab_size, self.noise_density,
                          self.mean_noise_span_length)
      yield np.append(x, eos), np.append(y, eos)


class PairsDataset(StreamingSeq2SeqDataset):
  """(input text, target text) pairs, e.g. arXiv article -> abstract.

  As scientific_papers_terraformer.gin: pairs with an empty side are dropped,
  inputs are truncated to input_len - 1 tokens (then padded: trax appends a
  0), targets to target_len - 1 tokens followed by EOS.

  Args:
    pairs: function split ('train' | 'eval') -> iterator of (str, str).
  """

  def __init__(self, name, pairs, tokenizer, *, input_len, target_len, batch_size, seed=0,
               description=None):
    if input_len < 2 or target_len < 2:
      raise ValueError(f"seq_len and target_len must be at least 2 for {name!r}, got "
                       f"{input_len} and {target_len}.")
    self._pairs = pairs
    desc = description or (f"{name}: (input, target) pairs, inputs {input_len}, targets "
                           f"{target_len}, {data_lib._tok_desc(tokenizer)}")  # pylint: disable=protected-access
    super().__init__(name, tokenizer, tokenizer.vocab_size, input_len, target_len,
                     batch_size, seed, desc, self._tokenized)

  def _tokenized(self, split, epoch):
    del epoch  # no randomness per example
    eos = self.tokenizer.eos_id
    for group in data_lib._batched(self._pairs(split), 64):  # pylint: disable=protected-access
      xs = self.tokenizer.encode_batch([x for x, _ in group])
      ys = self.tokenizer.encode_batch([y for _, y in group])
      for x, y in zip(xs, ys):
        if len(x) and len(y):
          yield (np.asarray(x[:self.input_len - 1], np.int32),
                 np.append(y[:self.target_len - 1], eos).astype(np.int32))


# --- Sources --------------------------------------------------------------

def _eval_split(tfds_name, data_dir):
  base = tfds_name.split('/')[0]
  return (data_lib.TFDS_EVAL_SPLITS.get(base)
          or data_lib._tfds_eval_split(tfds_name, data_dir))  # pylint: disable=protected-access


def _text_source(source, data_dir):
  """texts(split) for an LM corpus name, and an iterator of texts for a vocab."""
  kind, arg = data_lib._parse_name(source)  # pylint: disable=protected-access
  if kind == 'tfds':
    data_lib._tfds_load(arg, 'train', data_dir)  # pylint: disable=protected-access
    splits = {'train': 'train', 'eval': _eval_split(arg, data_dir)}
    def texts(split):
      return data_lib._tfds_texts(arg, splits[split], data_dir)  # pylint: disable=protected-access
    return texts, itertools.islice(texts('train'), data_lib.SPM_TRAIN_EXAMPLES)
  text = data_lib.load_corpus_text(source)
  if not text.strip():
    raise ValueError(f"Corpus {source!r} is empty; pass a file that contains text.")
  cut = int(len(text) * (1 - data_lib.EVAL_FRACTION))
  parts = {'train': text[:cut], 'eval': text[cut:]}
  def texts(split):  # documents: paragraphs separated by blank lines
    return (d for d in parts[split].split('\n\n') if d.strip())
  return texts, [parts['train']]


def _tfds_pairs(tfds_name, split, data_dir):
  """Yields (input, target) strings of a TFDS summarization dataset, in file order."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  ds = data_lib._tfds_load(tfds_name, split, data_dir)  # pylint: disable=protected-access
  base = tfds_name.split('/')[0]
  if base not in PAIR_FIELDS:
    raise ValueError(f"No (input, target) fields known for TFDS dataset {tfds_name!r}; "
                     f"known: {', '.join(sorted(PAIR_FIELDS))} (add it to PAIR_FIELDS).")
  src, tgt = PAIR_FIELDS[base]
  for batch in tfds.as_numpy(ds.map(lambda ex: (ex[src], ex[tgt])).batch(64)):
    for x, y in zip(*batch):
      yield (x.decode('utf-8', errors='replace'), y.decode('utf-8', errors='replace'))


def _make_tokenizer(name, tokenizer, vocab_file, spm_texts, spm_vocab_size, cache_dir, seed):
  if tokenizer not in data_lib.TOKENIZERS:
    raise ValueError(f"Unknown tokenizer {tokenizer!r}; choose one of "
                     f"{', '.join(data_lib.TOKENIZERS)}.")
  if vocab_file is not None and tokenizer != 'spm':
    raise ValueError("vocab_file only applies to tokenizer='spm'; "
                     "drop it or pass tokenizer='spm'.")
  if tokenizer == 'byte':
    return data_lib.ByteTokenizer()
  if vocab_file:
    return data_lib.SentencePieceTokenizer(vocab_file)
  return data_lib._spm_for(name, spm_texts, spm_vocab_size, cache_dir, seed)  # pylint: disable=protected-access


def make_dataset(name, *, input_len, target_len=None, batch_size, seed=0, tokenizer='byte',
                 vocab_file=None, spm_vocab_size=8000, cache_dir=None, data_dir=None):
  """Builds a Seq2SeqDataset; see the module docstring for the names.

  target_len None means input_len.
  """
  target_len = input_len if target_len is None else target_len
  sizes = {'seq_len': input_len, 'target_len': target_len, 'batch_size': batch_size}
  for arg, value in sizes.items():
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"{arg} must be a positive integer, got {value!r}.")
  if name == 'copy' or name.startswith('copy:'):
    kwargs = {}
    if name.startswith('copy:'):
      try:
        kwargs['vocab_size'] = int(name[5:])
      except ValueError:
        raise ValueError(f"Bad copy task {name!r}; use 'copy' or 'copy:V' with V the "
                         "vocabulary size, e.g. copy:13.") from None
    return CopyDataset(input_len=input_len, target_len=target_len, batch_size=batch_size,
                       seed=seed, **kwargs)
  if name.startswith('spans:'):
    texts, spm_texts = _text_source(name[6:], data_dir)
    tok = _make_tokenizer(name, tokenizer, vocab_file, spm_texts, spm_vocab_size, cache_dir,
                          seed)
    return SpanCorruptionDataset(name, texts, tok, input_len=input_len,
                                 target_len=target_len, batch_size=batch_size, seed=seed)
  if name.startswith('summarize:'):
    kind, arg = data_lib._parse_name(name[10:])  # pylint: disable=protected-access
    if kind != 'tfds':
      raise ValueError(f"{name!r}: summarization pairs come from TFDS; use "
                       "summarize:tfds:NAME, e.g. summarize:tfds:scientific_papers/arxiv.")
    data_lib._tfds_load(arg, 'train', data_dir)  # pylint: disable=protected-access
    splits = {'train': 'train', 'eval': _eval_split(arg, data_dir)}
    def pairs(split):
      return _tfds_pairs(arg, splits[split], data_dir)
    spm_texts = (t for pair in itertools.islice(pairs('train'), data_lib.SPM_TRAIN_EXAMPLES)
                 for t in pair)
    tok = _make_tokenizer(name, tokenizer, vocab_file, spm_texts, spm_vocab_size, cache_dir,
                          seed)
    return PairsDataset(name, pairs, tok, input_len=input_len, target_len=target_len,
                        batch_size=batch_size, seed=seed,
                        description=(f"{name}: article -> summary, inputs {input_len}, targets "
                                     f"{target_len}, {data_lib._tok_desc(tok)}, eval split "  # pylint: disable=protected-access
                                     f"'{splits['eval']}'"))
  raise ValueError(f"Unknown sequence-to-sequence dataset {name!r}; use {NAME_CHOICES}.")


# --- A baseline encoder-decoder -------------------------------------------

@gin.configurable(module='training.seq2seq')
def Transformer(vocab_size, d_model=512, d_ff=2048, n_encoder_layers=6,  # pylint: disable=invalid-name
                n_decoder_layers=6, n_heads=8, dropout=0.1, max_len=2048, mode='train'):
  """trax's encoder-decoder Transformer under the project's model convention.

  (inputs (batch, input_len), targets (batch, target_len)) -> (logits (batch,
  target_len, vocab_size), targets); the decoder shifts targets right inside
  the model and in 'predict' mode caches the encoder and takes one target
  token per call.  A dense baseline for the seq2seq datasets.
  """
  from trax import models  # pylint: disable=g-import-not-at-top
  return models.Transformer(vocab_size, d_model=d_model, d_ff=d_ff,
                            n_encoder_layers=n_encoder_layers,
                            n_decoder_layers=n_decoder_layers, n_heads=n_heads,
                            dropout=dropout, max_len=max_len, mode=mode)
