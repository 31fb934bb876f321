"""Language-modelling data: tokenizers, corpora and resumable batch iterators.

Every batch is a tuple ``(inputs, targets, weights)`` of numpy arrays of shape
``(batch_size, seq_len)``: ``inputs``/``targets`` int32, ``weights`` float32
(1.0 for real tokens, 0.0 for padding).  Each row comes from a window ``w`` of
``seq_len + 1`` tokens with ``inputs = w[:-1]`` and ``targets = w[1:]``.

Dataset names accepted by :func:`make_dataset`:

* ``python_docs`` - the CPython help topics (``pydoc_data.topics``), no network.
* ``PATH`` or ``text:PATH`` - a local UTF-8 text file.
* ``tfds:NAME[/CONFIG]`` - a prepared TensorFlow Datasets dataset, e.g.
  ``tfds:lm1b``, ``tfds:c4/en``, ``tfds:scientific_papers/arxiv``; streamed.

enwik8: TensorFlow Datasets 4.9.10 has no enwik8 builder (``tfds.list_builders()``
lists none), so ``enwik8`` / ``tfds:enwik8`` raise a ValueError; download the
file yourself and pass its path instead.

Sequence-to-sequence datasets (``copy``, ``spans:SOURCE``, ``summarize:tfds:NAME``;
batches of (inputs, targets) pairs for encoder-decoders) live in :mod:`training.seq2seq`;
:func:`make_dataset` builds them too.

TensorFlow, tensorflow_text and tensorflow_datasets are imported lazily.
"""
import hashlib
import itertools
import os

import numpy as np

EVAL_FRACTION = 0.05          # in-memory corpora: last 5% of tokens held out
SPM_TRAIN_EXAMPLES = 20_000   # TFDS: examples used to train a SentencePiece vocab
SHUFFLE_WINDOWS = 512         # TFDS: size of the seeded window shuffle buffer
TFDS_TEXT_FIELDS = {'lm1b': 'text', 'c4': 'text', 'scientific_papers': 'article',
                    'wikipedia': 'text', 'wiki40b': 'text'}
TFDS_EVAL_SPLITS = {'lm1b': 'test', 'c4': 'validation', 'scientific_papers': 'validation'}
TOKENIZERS = ('byte', 'spm')
DATASET_CHOICES = ("'python_docs', a text file path (or 'text:PATH'), or 'tfds:NAME[/CONFIG]'; "
                   "sequence-to-sequence: 'copy', 'spans:SOURCE' or 'summarize:tfds:NAME'")
ALTERNATIVES = ("python_docs, tfds:lm1b, tfds:c4/en, tfds:scientific_papers/arxiv "
                "or a local file path")


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab_size 256, id 0 (NUL) doubles as end-of-document."""
    vocab_size = 256
    eos_id = 0

    def encode(self, text):
        """str -> int32 array (n_bytes,)."""
        return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        """int array (n,) -> str; invalid UTF-8 sequences become U+FFFD."""
        return np.asarray(ids, dtype=np.uint8).tobytes().decode('utf-8', errors='replace')


class SentencePieceTokenizer:
    """A trained SentencePiece ``.model``; encodes/decodes with tensorflow_text."""

    def __init__(self, model_path):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"SentencePiece model {model_path!r} does not exist; pass an existing .model "
                "file or omit vocab_file to train one.")
        import sentencepiece
        self.model_path = model_path
        with open(model_path, 'rb') as f:
            self._model = f.read()
        try:
            proc = sentencepiece.SentencePieceProcessor(model_proto=self._model)
        except RuntimeError as e:
            raise ValueError(f"{model_path!r} is not a valid SentencePiece model; "
                             "pass a .model file written by SentencePieceTrainer.") from e
        self.vocab_size = proc.get_piece_size()
        self.eos_id = proc.eos_id() if proc.eos_id() >= 0 else proc.unk_id()
        self._tf_tokenizer = None

    def _tok(self):
        if self._tf_tokenizer is None:
            import tensorflow_text
            self._tf_tokenizer = tensorflow_text.SentencepieceTokenizer(model=self._model)
        return self._tf_tokenizer

    def encode(self, text):
        """str -> int32 array (n_pieces,)."""
        return self._tok().tokenize(text).numpy().astype(np.int32)

    def encode_batch(self, texts):
        """list of str -> list of int32 arrays."""
        if not texts:
            return []
        return [np.asarray(r, np.int32) for r in self._tok().tokenize(list(texts)).to_list()]

    def decode(self, ids):
        """int array (n,) -> str."""
        import tensorflow as tf
        out = self._tok().detokenize(tf.constant(np.asarray(ids, np.int32)))
        return out.numpy().decode('utf-8', errors='replace')


def train_sentencepiece(texts, model_prefix, vocab_size, seed=0):
    """Trains a unigram SentencePiece model on ``texts`` (line by line), returns the .model path.

    Whitespace is kept verbatim (identity normalisation, '\\n' is its own piece) so
    decode(encode(s)) == s for characters seen in training.  If the text cannot
    support ``vocab_size`` pieces the vocab comes out smaller (soft limit).
    Deterministic for a given input and seed (fixed thread count).
    """
    import sentencepiece
    lines = (line for text in texts for line in text.split('\n') if line.strip())
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    sentencepiece.set_random_generator_seed(seed)
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=lines, model_prefix=model_prefix, vocab_size=vocab_size,
            model_type='unigram', character_coverage=1.0, normalization_rule_name='identity',
            remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, user_defined_symbols=['\n'],
            hard_vocab_limit=False, max_sentence_length=1 << 16, num_threads=8, minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training with vocab_size={vocab_size} failed ({e}); "
                         "use a larger vocab size or more text.") from e
    return model_prefix + '.model'


def _parse_name(name):
    """-> ('python_docs', None) | ('file', path) | ('tfds', tfds_name)."""
    if name == 'python_docs':
        return 'python_docs', None
    if name.startswith('tfds:'):
        if name[5:].split('/')[0].lower() == 'enwik8':
            raise ValueError("TFDS 4.9.10 has no enwik8 builder; download enwik8 yourself and "
                             f"pass its file path, or use one of {ALTERNATIVES}.")
        return 'tfds', name[5:]
    if name.startswith('text:'):
        return 'file', name[5:]
    if os.sep in name or name.endswith('.txt') or os.path.exists(name):
        return 'file', name
    if name.lower() == 'enwik8':
        raise ValueError("enwik8 has no TFDS builder in TFDS 4.9.10 and is not bundled; "
                         f"download it and pass its file path, or use one of {ALTERNATIVES}.")
    raise ValueError(f"Unknown dataset {name!r}; use {DATASET_CHOICES}.")


def load_corpus_text(name):
    """Whole text of an in-memory corpus ('python_docs' or a text file path)."""
    kind, path = _parse_name(name)
    if kind == 'python_docs':
        from pydoc_data.topics import topics
        return '\n\n'.join(topics[k] for k in sorted(topics))
    if kind == 'tfds':
        raise ValueError(f"{name!r} is a streamed TFDS dataset; load it with make_dataset.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Text file {path!r} does not exist or is not a file; pass the "
                                "path of a readable UTF-8 text file (optionally as 'text:PATH').")
    try:
        with open(path, encoding='utf-8') as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"Cannot read {path!r} as UTF-8 text ({e}); "
                         "pass a readable UTF-8 file.") from e


def _to_batch(windows, seq_len):
    """B int windows (each 2..seq_len+1 long) -> (inputs, targets, weights), each (B, seq_len)."""
    shape = (len(windows), seq_len)
    inputs, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    weights = np.zeros(shape, np.float32)
    for i, w in enumerate(windows):
        n = len(w) - 1
        inputs[i, :n], targets[i, :n], weights[i, :n] = w[:-1], w[1:], 1.0
    return inputs, targets, weights


class LMDataset:
    """Common interface; see InMemoryLMDataset and StreamingLMDataset."""

    def __init__(self, name, tokenizer, seq_len, batch_size, seed, description):
        self.name, self.tokenizer, self.seed = name, tokenizer, seed
        self.vocab_size = tokenizer.vocab_size
        self.seq_len, self.batch_size = seq_len, batch_size
        self.description = description

    def batches(self, start_step=0):
        """Yields the training batches of steps start_step, start_step+1, ... forever."""
        raise NotImplementedError

    def eval_batches(self, n_batches):
        """List of n_batches held-out batches, identical on every call."""
        raise NotImplementedError


class InMemoryLMDataset(LMDataset):
    """A flat token array; the last 5% (>= 2 windows) is the eval set.

    Epoch e is a permutation (rng([seed, e])) of the non-overlapping windows of
    seq_len+1 tokens starting at a random offset in [0, seq_len]; step s takes
    windows s*B .. s*B+B-1 of the endless sequence of epochs, so any step is
    computed directly and resumption is exact and free.
    """

    def __init__(self, name, tokens, tokenizer, seq_len, batch_size, seed, label):
        span = seq_len + 1
        n_eval = max(int(len(tokens) * EVAL_FRACTION), 2 * span)
        if len(tokens) - n_eval < 2 * span:
            raise ValueError(f"Corpus {name!r} has {len(tokens):,} tokens, too short for "
                             f"seq_len={seq_len} (needs at least {4 * span:,}); use a smaller "
                             "seq_len or a longer corpus.")
        self.tokens = np.asarray(tokens, np.int32)
        self.n_train_tokens = len(tokens) - n_eval
        self.windows_per_epoch = (self.n_train_tokens - seq_len) // span
        super().__init__(name, tokenizer, seq_len, batch_size, seed,
                         f"{label}, {self.n_train_tokens:,} train tokens, {n_eval:,} eval tokens")

    def _epoch_order(self, epoch):
        """-> (start offset, permutation of window indices) of one epoch."""
        rng = np.random.default_rng([self.seed, epoch])
        return int(rng.integers(0, self.seq_len + 1)), rng.permutation(self.windows_per_epoch)

    def _batch_at(self, step, cache):
        w, span = self.windows_per_epoch, self.seq_len + 1
        g = step * self.batch_size + np.arange(self.batch_size)
        starts = np.empty(self.batch_size, np.int64)
        for epoch in np.unique(g // w):
            if epoch not in cache:
                cache.clear()  # keep only the current epoch's permutation
                cache[epoch] = self._epoch_order(int(epoch))
            offset, perm = cache[epoch]
            mask = g // w == epoch
            starts[mask] = offset + perm[g[mask] % w] * span
        win = self.tokens[starts[:, None] + np.arange(span)]
        return win[:, :-1].copy(), win[:, 1:].copy(), np.ones(win[:, 1:].shape, np.float32)

    def batches(self, start_step=0):
        """Yields (inputs, targets, weights), each (batch_size, seq_len), for each step on."""
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}.")
        cache = {}
        for step in itertools.count(start_step):
            yield self._batch_at(step, cache)

    def eval_batches(self, n_batches):
        """Consecutive windows of the held-out tail (last one padded), cycled if too few."""
        span = self.seq_len + 1
        held = self.tokens[self.n_train_tokens:]
        windows = [held[i:i + span] for i in range(0, len(held) - 1, span)]
        b = self.batch_size
        return [_to_batch([windows[(k * b + i) % len(windows)] for i in range(b)], self.seq_len)
                for k in range(n_batches)]


class StreamingLMDataset(LMDataset):
    """A TFDS text dataset streamed in file order: documents are tokenized, joined
    with EOS, cut into windows of seq_len+1 tokens and passed through a seeded
    shuffle buffer; the train split repeats forever.

    batches(start_step) replays the stream from the start and skips
    start_step*batch_size windows, so resuming costs re-reading and re-tokenizing
    every token consumed so far (about start_step*batch_size*(seq_len+1) tokens).
    """

    def __init__(self, name, tfds_name, eval_split, tokenizer, seq_len, batch_size, seed,
                 data_dir):
        self.tfds_name, self.eval_split, self.data_dir = tfds_name, eval_split, data_dir
        super().__init__(name, tokenizer, seq_len, batch_size, seed,
                         f"{name}, {_tok_desc(tokenizer)}, streamed (eval split '{eval_split}')")
        self.shuffle_windows = SHUFFLE_WINDOWS
        self._eval_cache = {}

    def _windows(self, split):
        """Yields windows (int32, seq_len+1) of one pass over ``split``; the last is shorter."""
        span, buf = self.seq_len + 1, np.zeros(0, np.int32)
        for chunk in _batched(_tfds_texts(self.tfds_name, split, self.data_dir), 256):
            ids = [np.append(t, self.tokenizer.eos_id) for t in self.tokenizer.encode_batch(chunk)]
            buf = np.concatenate([buf] + ids).astype(np.int32)
            n = len(buf) // span
            for row in buf[:n * span].reshape(n, span):
                yield row.copy()  # a copy, so pooled windows do not pin whole chunks
            buf = buf[n * span:]
        if len(buf) > 1:
            yield buf

    def _train_windows(self):
        """Yields the train split's full windows in file order, pass after pass, forever."""
        while True:
            n = 0
            for w in self._windows('train'):
                if len(w) < self.seq_len + 1:
                    continue  # drop each epoch's short tail, training rows are never padded
                n += 1
                yield w
            if n == 0:
                raise ValueError(f"TFDS dataset {self.tfds_name!r} has no full window of "
                                 f"seq_len+1={self.seq_len + 1} tokens in its train split; "
                                 "use a smaller seq_len.")

    def batches(self, start_step=0):
        """Yields (inputs, targets, weights), each (batch_size, seq_len), for each step on."""
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}.")
        windows = _shuffled(self._train_windows(), self.shuffle_windows,
                            np.random.default_rng([self.seed]))
        windows = itertools.islice(windows, start_step * self.batch_size, None)
        for group in _batched(windows, self.batch_size):
            yield _to_batch(group, self.seq_len)

    def eval_batches(self, n_batches):
        """First n_batches*batch_size windows of the eval split (cycled if it is shorter)."""
        if n_batches not in self._eval_cache:
            need = n_batches * self.batch_size
            windows = list(itertools.islice(self._windows(self.eval_split), need))
            if not windows:
                raise ValueError(f"Eval split {self.eval_split!r} of {self.tfds_name!r} is empty.")
            b = self.batch_size
            self._eval_cache[n_batches] = [
                _to_batch([windows[(k * b + i) % len(windows)] for i in range(b)], self.seq_len)
                for k in range(n_batches)]
        return self._eval_cache[n_batches]


def _batched(iterable, n):
    """Yields lists of n consecutive items (itertools.batched needs Python 3.12)."""
    it = iter(iterable)
    while group := list(itertools.islice(it, n)):
        yield group


def _shuffled(items, buffer_size, rng):
    """Yields ``items`` reordered by a seeded shuffle buffer of ``buffer_size`` items.

    Once the buffer is full, each new item replaces the buffered one drawn by
    ``rng.integers``, which is yielded. Items still buffered when ``items`` ends
    are dropped (the train streams never end).
    """
    pool = []
    for item in items:
        if len(pool) < buffer_size:
            pool.append(item)
            continue
        i = rng.integers(len(pool))
        yield pool[i]
        pool[i] = item


def _tfds_texts(tfds_name, split, data_dir):
    """Yields the text field of each example of ``split`` as str, in file order."""
    import tensorflow_datasets as tfds
    ds = _tfds_load(tfds_name, split, data_dir)
    field = TFDS_TEXT_FIELDS.get(tfds_name.split('/')[0], 'text')
    if field not in ds.element_spec:
        raise ValueError(f"TFDS dataset {tfds_name!r} has no text field {field!r}; its fields are "
                         f"{sorted(ds.element_spec)}; add it to TFDS_TEXT_FIELDS.")
    for batch in tfds.as_numpy(ds.map(lambda ex: ex[field]).batch(256)):
        yield from (t.decode('utf-8', errors='replace') for t in batch)


def _tfds_load(tfds_name, split, data_dir):
    """tfds.load with download=False, turning its errors into one-sentence messages."""
    import tensorflow_datasets as tfds
    try:
        return tfds.load(tfds_name, split=split, data_dir=data_dir, shuffle_files=False,
                         download=False)
    except tfds.core.DatasetNotFoundError as e:
        raise ValueError(f"Unknown TFDS dataset {tfds_name!r}; pick a name from "
                         f"tfds.list_builders() (for example {ALTERNATIVES}).") from e
    except (AssertionError, FileNotFoundError) as e:
        where = data_dir or '~/tensorflow_datasets'
        raise FileNotFoundError(
            f"TFDS dataset {tfds_name} is not available in {where}; prepare it with "
            f"`tfds build {tfds_name} --data_dir {where}` on a machine with network, "
            "or pass --data_dir.") from e


def _spm_for(name, texts, vocab_size, cache_dir, seed):
    """Trains (or reuses) a cached vocab named by a hash of (dataset name, vocab size)."""
    key = hashlib.sha1(f'{name}|{vocab_size}'.encode()).hexdigest()[:12]
    prefix = os.path.join(cache_dir or 'spm', f'spm_{key}_{vocab_size}')
    path = prefix + '.model'
    if not os.path.isfile(path):
        path = train_sentencepiece(texts, prefix, vocab_size, seed=seed)
    return SentencePieceTokenizer(path)


def _chunks(text, size=1 << 16):
    """Splits text after newlines into pieces of about ``size`` chars (for batched encoding)."""
    start = 0
    while start < len(text):
        end = text.find('\n', start + size)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def make_dataset(name='python_docs', *, seq_len, batch_size, seed=0, tokenizer='byte',
                 vocab_file=None, spm_vocab_size=8000, cache_dir=None, data_dir=None,
                 target_len=None):
    """Builds an LMDataset; see the module docstring for the accepted names.

    Sequence-to-sequence names (``copy``, ``spans:SOURCE``, ``summarize:tfds:NAME``)
    build a :class:`training.seq2seq.Seq2SeqDataset` with inputs of seq_len and
    targets of target_len tokens (None: its default); target_len only applies there.
    """
    from training import seq2seq  # pylint: disable=g-import-not-at-top
    if seq2seq.is_seq2seq_name(name):
        return seq2seq.make_dataset(
            name, input_len=seq_len, target_len=target_len, batch_size=batch_size, seed=seed,
            tokenizer=tokenizer, vocab_file=vocab_file, spm_vocab_size=spm_vocab_size,
            cache_dir=cache_dir, data_dir=data_dir)
    if target_len is not None:
        raise ValueError(f"target_len only applies to sequence-to-sequence datasets "
                         f"({seq2seq.NAME_CHOICES}), not to {name!r}; leave it unset.")
    sizes = {'seq_len': seq_len, 'batch_size': batch_size, 'spm_vocab_size': spm_vocab_size}
    for arg, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}.")
    if name == 'algorithmic' or name.startswith('algorithmic:'):  # Feedback paper's task
        from feedback import data as feedback_data
        return feedback_data.make_dataset(name, seq_len=seq_len, batch_size=batch_size,
                                          seed=seed)
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"Unknown tokenizer {tokenizer!r}; choose one of "
                         f"{', '.join(TOKENIZERS)}.")
    if vocab_file is not None and tokenizer != 'spm':
        raise ValueError("vocab_file only applies to tokenizer='spm'; "
                         "drop it or pass tokenizer='spm'.")
    kind, arg = _parse_name(name)
    if kind == 'tfds':
        _tfds_load(arg, 'train', data_dir)  # fail early if it is missing
        spm_texts = itertools.islice(_tfds_texts(arg, 'train', data_dir), SPM_TRAIN_EXAMPLES)
    else:
        text = load_corpus_text(name)
        if not text.strip():
            raise ValueError(f"Corpus {name!r} is empty; pass a file that contains text.")
        spm_texts = [text[:int(len(text) * (1 - EVAL_FRACTION))]]  # the vocab never sees eval text
    if tokenizer == 'byte':
        tok = ByteTokenizer()
    elif vocab_file:
        tok = SentencePieceTokenizer(vocab_file)
    else:
        tok = _spm_for(name, spm_texts, spm_vocab_size, cache_dir, seed)
    if kind == 'tfds':
        eval_split = TFDS_EVAL_SPLITS.get(arg.split('/')[0]) or _tfds_eval_split(arg, data_dir)
        return StreamingLMDataset(name, arg, eval_split, tok, seq_len, batch_size, seed, data_dir)
    # encoded in newline-aligned chunks to keep each tokenizer call small
    tokens = np.concatenate(tok.encode_batch(list(_chunks(text))))
    label = 'python_docs (pydoc topics)' if kind == 'python_docs' else f'text file {arg}'
    return InMemoryLMDataset(name, tokens, tok, seq_len, batch_size, seed,
                             f"{label}, {_tok_desc(tok)}")


def _tfds_eval_split(tfds_name, data_dir):
    """'validation' if the prepared dataset has it, else 'test'."""
    import tensorflow_datasets as tfds
    splits = tfds.builder(tfds_name, data_dir=data_dir).info.splits
    return 'validation' if 'validation' in splits or 'test' not in splits else 'test'


def _tok_desc(tok):
    if isinstance(tok, ByteTokenizer):
        return 'byte-level'
    return f'sentencepiece vocab {tok.vocab_size} ({tok.model_path})'
