"""Tests for training/data.py (tiny shapes; TF-based tests share one TF import)."""
import itertools
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from training import data  # noqa: E402


def take(it, n):
    return list(itertools.islice(it, n))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)


def check_batch(batch, batch_size, seq_len, vocab_size):
    inputs, targets, weights = batch
    assert inputs.shape == targets.shape == weights.shape == (batch_size, seq_len)
    assert inputs.dtype == np.int32 and targets.dtype == np.int32 and weights.dtype == np.float32
    assert inputs.min() >= 0 and inputs.max() < vocab_size and targets.max() < vocab_size
    real = weights[:, :-1] * weights[:, 1:] > 0  # both positions are real tokens
    np.testing.assert_array_equal(targets[:, :-1][real], inputs[:, 1:][real])


@pytest.fixture(scope='module')
def docs():
    return data.make_dataset('python_docs', seq_len=32, batch_size=4, seed=0)


@pytest.fixture
def small_file(tmp_path):
    path = tmp_path / 'corpus.txt'
    # numbered words: no two windows of the file are equal
    path.write_text('é ' + ' '.join(f'w{i}' for i in range(500)), encoding='utf-8')
    return str(path)


def test_byte_tokenizer_round_trip():
    tok = data.ByteTokenizer()
    text = 'héllo, wörld ✓\n\tend'
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and len(ids) == len(text.encode('utf-8'))
    assert ids.max() < tok.vocab_size == 256
    assert tok.decode(ids) == text
    assert tok.decode([0xff, ord('a')]) == '\ufffda'


def test_python_docs_batches(docs):
    assert docs.vocab_size == 256 and isinstance(docs.tokenizer, data.ByteTokenizer)
    assert 'python_docs' in docs.description and 'byte-level' in docs.description
    assert docs.n_train_tokens > 400_000
    batches = take(docs.batches(), 3)
    for batch in batches:
        check_batch(batch, 4, 32, 256)
        assert batch[2].min() == 1.0  # packed training rows are never padded
        np.testing.assert_array_equal(batch[1][:, :-1], batch[0][:, 1:])
    assert not np.array_equal(batches[0][0], batches[1][0])


def test_determinism_and_seed():
    a = data.make_dataset('python_docs', seq_len=16, batch_size=2, seed=3)
    b = data.make_dataset('python_docs', seq_len=16, batch_size=2, seed=3)
    c = data.make_dataset('python_docs', seq_len=16, batch_size=2, seed=4)
    assert_same_batches(take(a.batches(), 5), take(b.batches(), 5))
    assert not np.array_equal(take(a.batches(), 1)[0][0], take(c.batches(), 1)[0][0])


def test_resume_mid_run(docs):
    full = take(docs.batches(0), 12)
    assert_same_batches(take(docs.batches(7), 5), full[7:])


def test_resume_across_epochs_covers_each_window_once(small_file):
    ds = data.make_dataset(small_file, seq_len=16, batch_size=4, seed=1)
    w = ds.windows_per_epoch
    steps = 3 * w // 4 + 2  # past two epoch boundaries
    full = take(ds.batches(0), steps)
    assert_same_batches(take(ds.batches(w // 4 - 1), 4), full[w // 4 - 1:w // 4 + 3])
    assert_same_batches(take(ds.batches(steps - 3), 3), full[-3:])
    # the first epoch is a permutation of distinct windows of the training region
    rows = np.concatenate([b[0] for b in full])[:w]
    assert len({r.tobytes() for r in rows}) == w


def test_eval_is_fixed_and_held_out(docs):
    ev = docs.eval_batches(3)
    assert_same_batches(ev, docs.eval_batches(3))
    for batch in ev:
        check_batch(batch, 4, 32, 256)
    stream = docs.tokens.astype(np.uint8).tobytes()
    train, held = stream[:docs.n_train_tokens], stream[docs.n_train_tokens:]
    for inputs, _, weights in ev:
        for row, w in zip(inputs, weights):
            assert held.find(row[w > 0].astype(np.uint8).tobytes()) >= 0
    for inputs, _, _ in take(docs.batches(), 20):
        for row in inputs:
            assert train.find(row.astype(np.uint8).tobytes()) >= 0


def test_text_file_dataset(small_file):
    ds = data.make_dataset(small_file, seq_len=16, batch_size=2)
    ds2 = data.make_dataset('text:' + small_file, seq_len=16, batch_size=2)
    assert small_file in ds.description
    first = take(ds.batches(), 3)
    assert_same_batches(first, take(ds2.batches(), 3))
    check_batch(first[0], 2, 16, 256)
    text = data.load_corpus_text(small_file)
    assert ds.tokenizer.decode(first[0][0][0]) in text


@pytest.mark.parametrize('kwargs, error, words', [
    (dict(name='nope'), ValueError, ['Unknown dataset', 'python_docs', 'tfds:']),
    (dict(tokenizer='bpe'), ValueError, ['Unknown tokenizer', 'byte', 'spm']),
    (dict(name='/no/such/file.txt'), FileNotFoundError, ['/no/such/file.txt', 'does not exist']),
    (dict(name='text:/no/such/file'), FileNotFoundError, ['does not exist']),
    (dict(seq_len=0), ValueError, ['seq_len', 'positive']),
    (dict(batch_size=-2), ValueError, ['batch_size', 'positive']),
    (dict(seq_len=2.5), ValueError, ['seq_len', 'positive']),
    (dict(name='enwik8'), ValueError, ['enwik8', 'file path', 'tfds:lm1b']),
    (dict(name='tfds:enwik8'), ValueError, ['no enwik8 builder']),
    (dict(tokenizer='spm', vocab_file='/no/such.model'), FileNotFoundError, ['/no/such.model']),
    (dict(vocab_file='/x.model'), ValueError, ["tokenizer='spm'"]),
])
def test_bad_arguments(kwargs, error, words):
    args = dict(name='python_docs', seq_len=8, batch_size=2)
    args.update(kwargs)
    with pytest.raises(error) as info:
        data.make_dataset(args.pop('name'), **args)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize('content, error, words', [
    (b'', ValueError, ['empty']),
    (b'   \n\n', ValueError, ['empty']),
    (b'\xff\xfe\x00bad', ValueError, ['UTF-8']),
    (b'too short for windows of 32 tokens', ValueError, ['too short', 'seq_len=32']),
])
def test_bad_corpus_files(tmp_path, content, error, words):
    path = tmp_path / 'c.txt'
    path.write_bytes(content)
    with pytest.raises(error) as info:
        data.make_dataset(str(path), seq_len=32, batch_size=2)
    for word in words:
        assert word in str(info.value)


def test_resume_rejects_negative_step(docs):
    with pytest.raises(ValueError, match='start_step'):
        next(docs.batches(-1))


# --- SentencePiece (tensorflow_text) -------------------------------------------------

@pytest.fixture(scope='module')
def spm_ds(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp('spm'))
    return data.make_dataset('python_docs', seq_len=24, batch_size=3, tokenizer='spm',
                             spm_vocab_size=300, cache_dir=cache), cache


def test_spm_dataset(spm_ds):
    ds, cache = spm_ds
    tok = ds.tokenizer
    assert isinstance(tok, data.SentencePieceTokenizer) and ds.vocab_size == tok.vocab_size == 300
    assert os.path.dirname(tok.model_path) == cache and os.path.isfile(tok.model_path)
    assert 'sentencepiece vocab 300' in ds.description
    text = data.load_corpus_text('python_docs')[:2000]
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and len(ids) < len(text) and ids.max() < 300
    assert tok.decode(ids) == text
    for batch in take(ds.batches(), 3) + ds.eval_batches(2):
        check_batch(batch, 3, 24, 300)
    # the cached vocab is reused: same file, same batches
    mtime = os.path.getmtime(tok.model_path)
    again = data.make_dataset('python_docs', seq_len=24, batch_size=3, tokenizer='spm',
                              spm_vocab_size=300, cache_dir=cache)
    assert again.tokenizer.model_path == tok.model_path
    assert os.path.getmtime(tok.model_path) == mtime
    assert_same_batches(take(again.batches(5), 2), take(ds.batches(), 7)[5:])
    via_file = data.make_dataset('python_docs', seq_len=24, batch_size=3, tokenizer='spm',
                                 vocab_file=tok.model_path)
    assert_same_batches(take(via_file.batches(), 2), take(ds.batches(), 2))


def test_train_sentencepiece_deterministic(tmp_path):
    import sentencepiece
    text = data.load_corpus_text('python_docs')[:60_000]
    pieces = []
    for name in ('a', 'b'):
        path = data.train_sentencepiece([text], str(tmp_path / name), vocab_size=200, seed=0)
        proc = sentencepiece.SentencePieceProcessor(model_file=path)
        pieces.append([proc.id_to_piece(i) for i in range(proc.get_piece_size())])
    assert pieces[0] == pieces[1] and len(pieces[0]) == 200


# --- TFDS (the real tfds.load, patched by tfds.testing.mock_data) ------------------------

def test_tfds_not_prepared(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        data.make_dataset('tfds:lm1b', seq_len=8, batch_size=2, data_dir=str(tmp_path))
    msg = str(info.value)
    assert 'not available in ' + str(tmp_path) in msg and '`tfds build lm1b --data_dir' in msg


def test_tfds_unknown_name(tmp_path):
    with pytest.raises(ValueError, match='Unknown TFDS dataset'):
        data.make_dataset('tfds:surely_not_a_dataset', seq_len=8, batch_size=2,
                          data_dir=str(tmp_path))


def test_tfds_lm1b_mocked(tmp_path):
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=12):
        ds = data.make_dataset('tfds:lm1b', seq_len=16, batch_size=3, seed=0,
                               data_dir=str(tmp_path))
        ds.shuffle_windows = 8  # keep the test small: 12 random sentences give ~14 windows a pass
        assert isinstance(ds, data.StreamingLMDataset) and ds.eval_split == 'test'
        assert 'tfds:lm1b' in ds.description
        full = take(ds.batches(0), 8)  # 12 short examples: several passes over the split
        for batch in full:
            check_batch(batch, 3, 16, 256)
            assert batch[2].min() == 1.0
        assert any((b[0] == data.ByteTokenizer.eos_id).any() for b in full)  # documents are packed
        assert_same_batches(take(ds.batches(5), 3), full[5:])
        ev = ds.eval_batches(2)
        assert_same_batches(ev, ds.eval_batches(2))
        for batch in ev:
            check_batch(batch, 3, 16, 256)
        assert ev[0][2].sum() > 0
        other = data.make_dataset('tfds:lm1b', seq_len=16, batch_size=3, seed=1,
                                  data_dir=str(tmp_path))
        other.shuffle_windows = 8
        assert not np.array_equal(take(other.batches(), 1)[0][0], full[0][0])
