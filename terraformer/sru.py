"""SRU, the simple recurrent unit of the Terraformer's feed-forward path.

Lei et al., "Simple Recurrent Units for Highly Parallelizable Recurrence"
(arXiv 1709.02755), in the variant of trax 1.4.1 `tl.SRU`, which the
Terraformer adds next to its feed-forward block (`ff_use_sru`).  For an input
x (batch, length, n_units) and t along the length:

    r_t, f_t, y_t = split(x_t @ W + b, 3)           W (n_units, 3 n_units)
    r_t = sigmoid(r_t),  f_t = sigmoid(f_t)
    c_t = f_t * c_{t-1} + (1 - f_t) * y_t            c_0 = 0 (or the carry)
    h_t = activation(c_t) * r_t + x_t * (1 - r_t) * sqrt(3)

(the sqrt(3) is trax's).  The recurrence is linear in c, so it runs as a
parallel prefix scan (`jax.lax.associative_scan`) over the length instead of
trax's step-by-step `Scan`: pairs (a, b) meaning c -> a * c + b compose as
(a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2).

`SRU(n_units, activation=None, mode='train')` takes trax's arguments and has
trax's weight tree (the only arrays are W and b, at the place where trax's
combinator tree keeps them), so trax weights load unchanged.  Differences:
  - in 'predict' mode the carry c (batch, n_units) float32 is in the state
    from the start (zeros), where trax's state holds it only after the first
    call; decoding one token at a time equals 'eval' on the whole sequence;
  - the recurrence is computed in float32 and the output cast back to the
    input's dtype (trax returns float32 for bfloat16 inputs).
"""

import jax
from jax import numpy as jnp
from trax import shapes
from trax.layers import base
from trax.layers import initializers as init

MODES = ('train', 'eval', 'predict')

# Where trax's `tl.SRU` combinator tree keeps things: its weight tree is
# (Branch((), (Dense, [])), Split, Parallel(Sigmoid, Sigmoid) (one layer used
# twice, hence the cache marker), Fn, Parallel([], [], Branch(zeros, [])),
# Scan(cell), Select, [activation], Fn).  The state tree has the same shape,
# with the Scan's carry at index 5.
_WEIGHTS_MARK = {'__marker_for_cached_weights_': ()}
_STATE_MARK = {'__marker_for_cached_state_': ()}
_SCAN = 5


def _tree(dense, mark, scan, activation):
  """trax's SRU tree with `dense` in the Dense slot and `scan` at the Scan."""
  empty_branch = ((), (), ((), ((), ())))
  tree = [((), (dense, ())), (), (((), (), ()), mark), (), empty_branch, scan,
          ()]
  if activation is not None:
    tree.append(activation)
  tree.append(())
  return tuple(tree)


def linear_recurrence(a, b, c0):
  """c_t = a_t * c_{t-1} + b_t along axis 1, from c_0 = c0.

  Args:
    a, b: (batch, length, n) float arrays.
    c0: (batch, n) initial value.

  Returns:
    (batch, length, n): c_1 ... c_length.
  """
  def compose(first, second):
    a1, b1 = first
    a2, b2 = second
    return a1 * a2, a2 * b1 + b2
  a_prod, b_acc = jax.lax.associative_scan(compose, (a, b), axis=1)
  return a_prod * c0[:, None, :] + b_acc


class SRU(base.Layer):
  """Simple recurrent unit: (batch, length, n_units) -> same.

  Equations in the module docstring.  Weights: trax's tree holding
  W (n_units, 3 n_units) and b (3 n_units,) (`dense_weights` picks them).
  State: trax's tree; in 'predict' mode it holds the carry (batch, n_units).
  """

  def __init__(self, n_units, activation=None, mode='train'):
    """Creates an SRU layer.

    Args:
      n_units: depth of the input and output (the highway term adds x).
      activation: optional trax layer applied to c (e.g. `tl.Tanh()`).
      mode: 'train', 'eval' or 'predict' (keeps the carry for decoding).

    Raises:
      ValueError: if n_units is not a positive integer or mode is unknown.
    """
    if isinstance(n_units, bool) or not isinstance(n_units, int) or n_units < 1:
      raise ValueError(f'SRU: n_units must be a positive integer, not '
                       f'{n_units!r}.')
    if mode not in MODES:
      raise ValueError(f'SRU: mode must be one of {MODES}, not {mode!r}.')
    super().__init__(n_in=1, n_out=1, name=f'SRU_{n_units}')
    self._n_units = n_units
    self._activation = activation
    self._mode = mode

  def _check(self, shape):
    if len(shape) != 3 or shape[-1] != self._n_units:
      raise ValueError(
          f'SRU_{self._n_units}: input must be (batch, length, '
          f'{self._n_units}), got shape {tuple(shape)}.')

  def init_weights_and_state(self, input_signature):
    shape = input_signature.shape
    self._check(shape)
    n = self._n_units
    r_w, r_b, r_act = jax.random.split(self.rng, 3)
    # tl.Dense's default initialisers.
    w = init.GlorotUniformInitializer()((n, 3 * n), r_w)
    b = init.RandomNormalInitializer(1e-6)((3 * n,), r_b)
    act_w = act_s = None
    if self._activation is not None:
      sig = shapes.ShapeDtype(shape[:2] + (n,), jnp.float32)
      act_w, act_s = self._activation.init(sig, rng=r_act)
    carry = ()
    if self._mode == 'predict':
      carry = (jnp.zeros((shape[0], n), jnp.float32),)
    self.weights = _tree((w, b), _WEIGHTS_MARK, ((),), act_w)
    self.state = _tree((), _STATE_MARK, ((), carry), act_s)

  def forward(self, x):
    """(batch, length, n_units) -> (batch, length, n_units)."""
    self._check(x.shape)
    n = self._n_units
    w, b = self.weights[0][1][0]
    rfy = jnp.dot(x, w) + b
    r = jax.nn.sigmoid(rfy[..., :n]).astype(jnp.float32)
    f = jax.nn.sigmoid(rfy[..., n:2 * n]).astype(jnp.float32)
    y = rfy[..., 2 * n:].astype(jnp.float32)
    carry = self.state[_SCAN][1]
    if self._mode == 'predict' and carry:
      c0 = carry[0]
    else:
      c0 = jnp.zeros((x.shape[0], n), jnp.float32)
    c = linear_recurrence(f, y * (1.0 - f), c0)
    if self._mode == 'predict':
      state = list(self.state)
      state[_SCAN] = ((), (c[:, -1],))
      self.state = tuple(state)
    if self._activation is not None:
      c, act_state = self._activation.pure_fn(
          c, self.weights[7], self.state[7], self.rng)
      state = list(self.state)
      state[7] = act_state
      self.state = tuple(state)
    h = c * r + x.astype(jnp.float32) * (1.0 - r) * (3 ** 0.5)
    return h.astype(x.dtype)


def dense_weights(sru_weights):
  """(W, b) of an SRU weight tree (ours or trax's: the same tree)."""
  return sru_weights[0][1][0]
