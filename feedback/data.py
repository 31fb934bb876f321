"""The Feedback Transformer paper's algorithmic task: tracking variables.

A program is a sequence of statements over `n_vars` variables (x, y, z, p, r)
holding integers in [1, 10]; each statement is, with equal probability:

    x = 5 ;          assign a variable that has no value yet
    x ++ ;  x -- ;   increment / decrement, only if the result stays in [1, 10]
    print x ;        the model must output x's current value at the ';'
    if x < 4 : S     (or >, against a constant or another variable) where S is
                     an assignment, ++ or --, executed only if the test holds

An impossible choice is drawn again.  Every input token has a label: the value
at the ';' of a print statement, '_' everywhere else; as in the official
setup (`--data-omit-labels _`) only the values are scored, so `weights` is 1
at print answers and 0 elsewhere, and eval accuracy is answer accuracy.  The
rules follow the official generator (facebookresearch/transformer-sequential,
data/gen_data_algo_seq.py); this code is written independently.

Unlike the official stream of 100-statement tasks cut into blocks, each row
here is one program of statements filling `seq_len` tokens (closed by 'END'
and padding), so a model sees whole programs from an empty state.
Examples are a pure function of (seed, split, index): the train split is
`n_train` programs (10,000 as in the official data) visited in a seeded
permutation per epoch, the eval split is a separate set of programs.
"""

import random

import gin
import numpy as np

VARIABLES = ('x', 'y', 'z', 'p', 'r')
MIN_VALUE, MAX_VALUE = 1, 10
OPERATIONS = ('=', '++', '--', 'if', 'print')
PAD, UNK, BLANK, END = '<pad>', '<unk>', '_', 'END'
VOCAB = ((PAD, UNK, BLANK, END, ';', ':', '=', '++', '--', 'if', 'print', '<', '>')
         + VARIABLES + tuple(str(v) for v in range(MIN_VALUE, MAX_VALUE + 1)))
N_TRAIN = 10_000
N_EVAL = 1_000


class _Retry(Exception):
  """The drawn statement is impossible in the current state."""


def _statement(rng, names, state, nested=False):
  """Draws one statement, updating `state`; -> (tokens, labels)."""
  while True:
    try:
      return _try_statement(rng, names, state, nested)
    except _Retry:
      continue


def _try_statement(rng, names, state, nested):
  op = rng.choice(OPERATIONS)
  defined = sorted(state)
  if op == '=':
    free = [v for v in names if v not in state]
    if not free:
      raise _Retry
    var = rng.choice(free)
    state[var] = rng.randint(MIN_VALUE, MAX_VALUE)
    tokens = [var, '=', str(state[var]), ';']
  elif op in ('++', '--'):
    if not defined:
      raise _Retry
    var = rng.choice(defined)
    new = state[var] + (1 if op == '++' else -1)
    if not MIN_VALUE <= new <= MAX_VALUE:
      raise _Retry
    state[var] = new
    tokens = [var, op, ';']
  elif op == 'print':
    if nested or not defined:
      raise _Retry
    var = rng.choice(defined)
    return [op, var, ';'], [BLANK, BLANK, str(state[var])]
  else:  # 'if'
    if nested or not defined:
      raise _Retry
    if rng.random() < 0.5:
      if len(defined) < 2:
        raise _Retry
      var, other = rng.sample(defined, 2)
      bound, bound_token = state[other], other
    else:
      var = rng.choice(defined)
      bound = rng.randint(MIN_VALUE, MAX_VALUE)
      bound_token = str(bound)
    less = rng.random() < 0.5
    holds = state[var] < bound if less else state[var] > bound
    body, _ = _statement(rng, names, state if holds else dict(state), nested=True)
    tokens = ['if', var, '<' if less else '>', bound_token, ':'] + body
  return tokens, [BLANK] * len(tokens)


def generate_program(rng, n_vars, n_tokens):
  """Statements until the next would not fit before 'END' in n_tokens tokens.

  Args:
    rng: a `random.Random`.
    n_vars: number of variables (1..5).
    n_tokens: the program's length budget, 'END' included (at least 2).

  Returns:
    (tokens, labels): equal-length lists of str, at most n_tokens long.
  """
  names = VARIABLES[:n_vars]
  state, tokens, labels = {}, [], []
  while True:
    stmt, lab = _statement(rng, names, state)
    if len(tokens) + len(stmt) + 1 > n_tokens:
      break
    tokens += stmt
    labels += lab
  return tokens + [END], labels + [BLANK]


def run_program(tokens):
  """Executes a program (list of str) directly; -> the printed values, in order.

  An interpreter independent of the generator, used to check its answers.
  """
  state, printed, i = {}, [], 0

  def simple(i):  # executes `var = N ;`, `var ++ ;` or `var -- ;` at i
    var, op = tokens[i], tokens[i + 1]
    if op == '=':
      state[var] = int(tokens[i + 2])
      return i + 4
    state[var] += 1 if op == '++' else -1
    return i + 3

  while tokens[i] != END:
    if tokens[i] == 'print':
      printed.append(state[tokens[i + 1]])
      i += 3
    elif tokens[i] == 'if':
      var, cmp, bound = tokens[i + 1], tokens[i + 2], tokens[i + 3]
      bound = state[bound] if bound in VARIABLES else int(bound)
      holds = state[var] < bound if cmp == '<' else state[var] > bound
      body = i + 5
      end = body + (4 if tokens[body + 1] == '=' else 3)
      if holds:
        simple(body)
      i = end
    else:
      i = simple(i)
  return printed


class AlgorithmicTokenizer:
  """Whitespace-separated words of VOCAB; unknown words map to '<unk>'."""
  vocab_size = len(VOCAB)
  eos_id = VOCAB.index(END)
  pad_id = VOCAB.index(PAD)
  _ids = {w: i for i, w in enumerate(VOCAB)}

  def encode(self, text):
    """str -> int32 array (n_words,)."""
    unk = self._ids[UNK]
    return np.array([self._ids.get(w, unk) for w in text.split()], np.int32)

  def encode_batch(self, texts):
    return [self.encode(t) for t in texts]

  def decode(self, ids):
    """int array -> str, padding dropped."""
    return ' '.join(VOCAB[int(i)] for i in np.asarray(ids).reshape(-1)
                    if int(i) != self.pad_id)


class AlgorithmicDataset:
  """Batches of (inputs, targets, weights), each (batch_size, seq_len).

  Same interface as `training.data.LMDataset`: batches(start_step),
  eval_batches(n_batches), vocab_size, tokenizer, description.
  """

  def __init__(self, n_vars, seq_len, batch_size, seed=0, n_train=N_TRAIN,
               name=None):
    if not 1 <= n_vars <= len(VARIABLES):
      raise ValueError(f'The algorithmic task has 1 to {len(VARIABLES)} '
                       f'variables, not {n_vars}; use e.g. algorithmic:3.')
    if seq_len < 8:
      raise ValueError(f'The algorithmic task needs seq_len >= 8, not {seq_len}.')
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1:
      raise ValueError(f'feedback.make_dataset.n_train (training programs) must be '
                       f'a positive integer, not {n_train!r}.')
    self.name = name or f'algorithmic:{n_vars}'
    self.n_vars, self.seq_len, self.batch_size = n_vars, seq_len, batch_size
    self.seed, self.n_train = seed, n_train
    self.tokenizer = AlgorithmicTokenizer()
    self.vocab_size = self.tokenizer.vocab_size
    self.description = (f'algorithmic task, {n_vars} variables, one program per '
                        f'row of {seq_len} tokens, {n_train:,} train programs, '
                        'scored on print answers only')
    self._train = None

  def example(self, split, index):
    """Row `index` of 'train' or 'eval': (inputs, targets, weights), (seq_len,)."""
    rng = random.Random(f'{self.seed}/{split}/{self.n_vars}/{self.seq_len}/{index}')
    tokens, labels = generate_program(rng, self.n_vars, self.seq_len)
    ids = self.tokenizer._ids  # pylint: disable=protected-access
    inputs = np.full(self.seq_len, self.tokenizer.pad_id, np.int32)
    targets = np.full(self.seq_len, ids[BLANK], np.int32)
    inputs[:len(tokens)] = [ids[w] for w in tokens]
    targets[:len(labels)] = [ids[w] for w in labels]
    weights = (targets != ids[BLANK]).astype(np.float32)
    return inputs, targets, weights

  def _rows(self, split, indices):
    rows = [self.example(split, int(i)) for i in indices]
    return tuple(np.stack(r) for r in zip(*rows))

  def _train_set(self):
    if self._train is None:
      self._train = self._rows('train', range(self.n_train))
    return self._train

  def batches(self, start_step=0):
    """Yields the training batches of steps start_step, start_step+1, ..."""
    if start_step < 0:
      raise ValueError(f'start_step must be >= 0, got {start_step}.')
    data, n, b = self._train_set(), self.n_train, self.batch_size
    step, perms = start_step, {}
    while True:
      g = step * b + np.arange(b)
      idx = np.empty(b, np.int64)
      for epoch in np.unique(g // n):
        if epoch not in perms:
          perms = {epoch: np.random.default_rng([self.seed, int(epoch)]).permutation(n)}
        mask = g // n == epoch
        idx[mask] = perms[epoch][g[mask] % n]
      yield tuple(a[idx] for a in data)
      step += 1

  def eval_batches(self, n_batches):
    """n_batches held-out batches (programs never in the train split)."""
    b = self.batch_size
    return [self._rows('eval', range(k * b, (k + 1) * b)) for k in range(n_batches)]


@gin.configurable(module='feedback', allowlist=['n_train'])
def make_dataset(name, *, seq_len, batch_size, seed=0, n_train=N_TRAIN):
  """'algorithmic' (3 variables) or 'algorithmic:N' -> AlgorithmicDataset.

  n_train: training programs (gin: `feedback.make_dataset.n_train`); the
  official data has 10,000; programs are generated up front (about 2,000 a
  second on one core).
  """
  _, _, n = name.partition(':')
  if n and not n.isdigit():
    raise ValueError(f'Unknown dataset {name!r}; the algorithmic task is named '
                     "'algorithmic' or 'algorithmic:N' with N variables (1 to 5).")
  return AlgorithmicDataset(int(n or 3), seq_len, batch_size, seed, n_train, name=name)
