"""Optimizers for the trainer's per-array update: SM3 with momentum, and AGC.

Both are trax `Optimizer`s (`init(w)` -> slots, `update(step, g, w, slots,
opt_params)` -> (w, slots)), so `training.trainer` applies them unchanged and
gin selects them:

    training.train.optimizer = @training.optimizers.SM3()
    training.train.optimizer = @training.optimizers.AGC()
    training.optimizers.AGC.optimizer = @trax.optimizers.Adam()

SM3 (Anil et al., arXiv 1901.11150, SM3-II with the official code's
momentum).  For a weight of rank >= 2, one accumulator vector acc_d per
dimension d; each step, elementwise over the weight's entries i = (i_1, ...):

    A[i]   = min_d acc_d[i_d] + g[i]^2
    acc_d  = max of A over all dimensions but d
    gt[i]  = g[i] / sqrt(A[i])          (0 where A[i] = 0)
    m      = beta * m + (1 - beta) * gt (EMA momentum; gt itself if beta = 0)
    w      = w - lr * m

Vectors and scalars use diagonal AdaGrad: A = acc + g^2, acc = A.

trax's `trax.optimizers.SM3` computes the same update for weights of rank 1
and more (EMA momentum included; tests/test_optimizers.py checks it), but it
fails on scalar weights (e.g. ReZero's) and writes the new accumulators into
the slot lists it is given; this one handles scalars as diagonal AdaGrad and
leaves its inputs alone.  trax's grafting (second_moment_averaging < 1) is
not reproduced.

AGC (Brock et al., NFNets, arXiv 2102.06171): before the wrapped optimizer
sees a gradient, each unit i of the weight (its output index: the last axis;
the norm runs over all other axes, as for a Dense kernel (in, out) or a conv
kernel HWIO; vectors and scalars are their own units) is clipped:

    if |G_i| / max(|W_i|, eps) > clipping:
        G_i <- clipping * max(|W_i|, eps) / |G_i| * G_i

The paper leaves the final classifier layer unclipped; a per-array update
cannot tell which array that is, so here every array is clipped.
"""

import gin
from jax import numpy as jnp
from trax.optimizers import base as opt_base


def _dims_but(rank, d):
  return tuple(i for i in range(rank) if i != d)


@gin.configurable(module='training.optimizers')
class SM3(opt_base.Optimizer):
  """SM3-II with EMA momentum (see the module docstring for the equations).

  Slots per weight: (momentum, accumulators), momentum () when momentum is 0
  at construction; accumulators a tuple of one vector per dimension (rank
  >= 2) or one array of the weight's shape (rank <= 1).  Slots are float32.
  """

  def __init__(self, learning_rate=0.01, momentum=0.9, weight_decay=0.0):
    """Args:
      learning_rate: step size (the trainer overrides it with its schedule).
      momentum: EMA coefficient beta in [0, 1); 0 keeps no momentum slot.
      weight_decay: adds weight_decay * w to the preconditioned gradient
        (before momentum), as trax's SM3 does.
    """
    if not 0.0 <= momentum < 1.0:
      raise ValueError(f'momentum must be in [0, 1), not {momentum!r}.')
    self._has_momentum = momentum > 0.0
    super().__init__(learning_rate=learning_rate, momentum=momentum,
                     weight_decay=weight_decay)

  def init(self, weights):
    shape = weights.shape
    momentum = jnp.zeros(shape, jnp.float32) if self._has_momentum else ()
    if len(shape) <= 1:
      accumulators = (jnp.zeros(shape, jnp.float32),)
    else:
      accumulators = tuple(jnp.zeros((n,), jnp.float32) for n in shape)
    return momentum, accumulators

  def update(self, step, grads, weights, slots, opt_params):
    del step
    momentum, accumulators = slots
    g = grads.astype(jnp.float32)
    rank = g.ndim
    if rank <= 1:
      acc = accumulators[0] + g * g
      new_accumulators = (acc,)
    else:
      acc = accumulators[0].reshape((-1,) + (1,) * (rank - 1))
      for d in range(1, rank):
        shape = [1] * rank
        shape[d] = -1
        acc = jnp.minimum(acc, accumulators[d].reshape(shape))
      acc = acc + g * g
      new_accumulators = tuple(jnp.max(acc, axis=_dims_but(rank, d))
                               for d in range(rank))
    safe = jnp.where(acc > 0, acc, 1.0)
    update = jnp.where(acc > 0, g / jnp.sqrt(safe), 0.0)
    update = update + opt_params['weight_decay'] * weights.astype(jnp.float32)
    if self._has_momentum:
      beta = opt_params['momentum']
      momentum = beta * momentum + (1.0 - beta) * update
      update = momentum
    new_weights = weights - (opt_params['learning_rate'] * update).astype(
        weights.dtype)
    return new_weights, (momentum, new_accumulators)


def unitwise_norm(x):
  """L2 norm of each unit of `x`, broadcastable to x.shape (float32).

  Rank >= 2: over all axes but the last (shape (1, ..., 1, out)).  Rank <= 1:
  the absolute value of each entry.
  """
  x = x.astype(jnp.float32)
  if x.ndim <= 1:
    return jnp.abs(x)
  return jnp.sqrt(jnp.sum(x * x, axis=tuple(range(x.ndim - 1)), keepdims=True))


def adaptive_clip(grads, weights, clipping, eps=1e-3):
  """AGC of one gradient array given its weight array (same shape).

  Returns G with each unit i scaled to clipping * max(|W_i|, eps) / |G_i|
  wherever |G_i| / max(|W_i|, eps) > clipping; other units unchanged.
  """
  max_norm = clipping * jnp.maximum(unitwise_norm(weights), eps)
  g_norm = unitwise_norm(grads)
  scale = jnp.where(g_norm > max_norm,
                    max_norm / jnp.maximum(g_norm, 1e-30), 1.0)
  return (grads.astype(jnp.float32) * scale).astype(grads.dtype)


@gin.configurable(module='training.optimizers')
class AGC(opt_base.Optimizer):
  """Adaptive gradient clipping in front of any trax optimizer.

  `update` clips the gradient unit-wise against the weight (see
  `adaptive_clip`) and hands it to `optimizer.update`; slots and
  hyperparameters (`opt_params`) are the wrapped optimizer's.
  """

  def __init__(self, optimizer=None, clipping=0.01, eps=1e-3):
    """Args:
      optimizer: the trax optimizer to wrap (an instance; required).
      clipping: lambda, the largest allowed |G_i| / max(|W_i|, eps).
      eps: floor of the weight norm (so zero-initialised units can move).
    """
    if not isinstance(optimizer, opt_base.Optimizer):
      raise ValueError('AGC needs optimizer= a trax optimizer instance (e.g. '
                       'training.optimizers.AGC.optimizer = '
                       f'@trax.optimizers.Adam()), not {optimizer!r}.')
    if not clipping > 0:
      raise ValueError(f'clipping must be positive, not {clipping!r}.')
    if not eps > 0:
      raise ValueError(f'eps must be positive, not {eps!r}.')
    # No super().__init__(): the hyperparameters are the wrapped optimizer's.
    self._optimizer = optimizer
    self._clipping = clipping
    self._eps = eps
    self._slots = None
    self._clip_grad_norm = None

  @property
  def optimizer(self):
    return self._optimizer

  @property
  def _init_opt_params(self):  # what the base class's opt_params reads
    return self._optimizer.opt_params

  @_init_opt_params.setter
  def _init_opt_params(self, opt_params):
    self._optimizer.opt_params = opt_params

  def init(self, weights):
    return self._optimizer.init(weights)

  def update(self, step, grads, weights, slots, opt_params):
    grads = adaptive_clip(grads, weights, self._clipping, self._eps)
    return self._optimizer.update(step, grads, weights, slots, opt_params)
