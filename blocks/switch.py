"""Switch Transformer feed-forward layer (Fedus, Zoph & Shazeer, arXiv 2101.03961).

`SwitchFF` replaces the dense feed-forward of a decoder block (it is called
like `training.model.FeedForward`, so `DecoderLM(ff_layer=SwitchFF)` or the
gin binding `DecoderLM.ff_layer = @blocks.SwitchFF` switches it on).  For the
T = batch * length tokens of one call:

  router (float32 whatever the compute dtype; input jitter in training):
      p(x) = softmax(x W_r),  i*(x) = argmax_i p_i(x),  g(x) = p_{i*}(x)
  capacity (tokens each expert takes; eq. 3, truncated as Mesh TensorFlow):
      C = max(min_capacity, floor(capacity_factor * T / n_experts)), at most T
  a token is kept if fewer than C earlier tokens (in batch-major order) chose
  its expert; a dropped token gets output 0, so the block's residual passes it
  through unchanged.  Kept tokens:
      y(x) = g(x) * E_{i*}(x),   E_i(x) = act(x W1_i + b1_i) W2_i + b2_i
  load-balancing loss (eqs. 4-6), one per layer:
      f_i = (1/T) sum_x 1{i*(x) = i},  P_i = (1/T) sum_x p_i(x),
      aux = aux_loss_coef * N * sum_i f_i P_i      (= aux_loss_coef when uniform)

Tokens are dispatched to (n_experts, C, d) expert buffers by index (a gather
whose backward is a scatter-add), the experts run as two batched einsums and
the outputs are gathered back: the work is linear in T, with no Python loop
over experts and no (T, n_experts, C) one-hot tensor.

The layer leaves its auxiliary loss in its state, {'aux_loss': scalar,
'dropped_fraction': scalar} (float32); `training.trainer` adds every state
entry named 'aux_loss' to the training objective and reports the sum as the
metric 'aux_loss'.

Initialisation (the paper's section 2.4): truncated normal (at 2 standard
deviations, rescaled so the standard deviation is exact), mean 0, std
sqrt(init_scale / fan_in) with init_scale = 0.1; biases 0.  Decoding
('predict') drops no token, so it equals 'eval' mode wherever eval drops none.
"""

import math

import gin
import jax
from jax import numpy as jnp
from trax import layers as tl
from trax import shapes
from trax.layers import base

MODES = ('train', 'eval', 'predict')
EXPERT_WIDTHS = ('flops', 'params')
AUX_LOSS = 'aux_loss'
# Standard deviation of a unit normal truncated to [-2, 2].
_TRUNCATED_STD = 0.87962566103423978


def truncated_normal(key, shape, fan_in, scale):
  """Truncated normal (+-2 std) with standard deviation sqrt(scale / fan_in)."""
  std = math.sqrt(scale / fan_in) / _TRUNCATED_STD
  return jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * std


def expert_capacity(n_tokens, n_experts, capacity_factor, min_capacity=4):
  """C = max(min_capacity, floor(capacity_factor * n_tokens / n_experts)) <= n_tokens."""
  c = math.floor(capacity_factor * n_tokens / n_experts + 1e-6)
  return int(min(n_tokens, max(min_capacity, c)))


def route(x, router_w, capacity):
  """Top-1 routing with expert capacity, all in float32.

  Args:
    x: (T, d) tokens (any float dtype; cast to float32).
    router_w: (d, n_experts).
    capacity: tokens each expert takes (Python int).

  Returns:
    dict of expert (T,) int32 chosen expert, position (T,) int32 place in that
    expert's buffer (in token order), keep (T,) bool (position < capacity),
    gate (T,) float32 router probability of the chosen expert, probs
    (T, n_experts) float32, onehot (T, n_experts) float32 of the choice.
  """
  logits = jnp.dot(x.astype(jnp.float32), router_w.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  probs = jax.nn.softmax(logits, axis=-1)
  expert = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  onehot = jax.nn.one_hot(expert, probs.shape[-1], dtype=jnp.int32)
  position = jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=-1) - 1
  gate = jnp.take_along_axis(probs, expert[:, None], axis=-1)[:, 0]
  return dict(expert=expert, position=position, keep=position < capacity,
              gate=gate, probs=probs, onehot=onehot.astype(jnp.float32))


def load_balancing_loss(probs, onehot, coef=1e-2):
  """coef * N * sum_i f_i P_i: f the fraction of tokens per expert, P the mean probs."""
  n_experts = probs.shape[-1]
  f = jnp.mean(onehot, axis=0)
  p = jnp.mean(probs, axis=0)
  return coef * n_experts * jnp.sum(f * p)


def _check(name, ok, allowed, value):
  if not ok:
    raise ValueError(f'SwitchFF {name} must be {allowed}, not {value!r}.')


@gin.configurable(module='blocks')
class SwitchFF(base.Layer):
  """Switch (top-1 mixture-of-experts) feed-forward; see the module docstring.

  (batch, length, d_model) -> (batch, length, d_model), in the input's dtype.
  Weights: router (d_model, n_experts); w1 (n_experts, d_model, h),
  b1 (n_experts, h), w2 (n_experts, h, d_model), b2 (n_experts, d_model), with
  h = d_ff ('flops': each token costs what the dense FF costs, n_experts times
  the parameters) or d_ff / n_experts ('params': the dense FF's parameters).
  """

  def __init__(self, d_model, d_ff, activation=tl.Gelu, dropout=0.0,
               mode='train', n_experts=8, capacity_factor=1.25,
               eval_capacity_factor=2.0, min_capacity=4, expert_dropout=None,
               jitter=1e-2, aux_loss_coef=1e-2, init_scale=0.1,
               expert_width='flops'):
    """Builds the layer; bad arguments raise ValueError here.

    Args:
      d_model, d_ff, activation, dropout, mode: as `training.model.FeedForward`
        (activation is a layer class such as tl.Gelu).
      n_experts: number of experts N (>= 1).
      capacity_factor: capacity factor in 'train' mode (> 0).
      eval_capacity_factor: capacity factor in 'eval' mode (> 0; Mesh TF 2.0).
      min_capacity: smallest capacity (Mesh TF's min_expert_capacity, 4).
      expert_dropout: dropout rate on the experts' hidden units in 'train'
        mode (the paper fine-tunes with 0.4); None: `dropout`.
      jitter: router inputs are multiplied by U(1 - jitter, 1 + jitter) in
        'train' mode (Mesh TF's input jitter); 0 disables it.
      aux_loss_coef: alpha of the load-balancing loss (0.01).
      init_scale: s of the truncated-normal init, std sqrt(s / fan_in).
      expert_width: 'flops' (hidden d_ff per expert) or 'params' (d_ff /
        n_experts, which n_experts must divide).
    """
    super().__init__(name=f'SwitchFF_e{n_experts}')
    _check('mode', mode in MODES, f'one of {MODES}', mode)
    _check('n_experts', isinstance(n_experts, int) and n_experts >= 1,
           'an integer >= 1', n_experts)
    for name, value in (('capacity_factor', capacity_factor),
                        ('eval_capacity_factor', eval_capacity_factor),
                        ('init_scale', init_scale)):
      _check(name, isinstance(value, (int, float)) and value > 0, 'positive', value)
    _check('min_capacity', isinstance(min_capacity, int) and min_capacity >= 1,
           'an integer >= 1', min_capacity)
    _check('expert_width', expert_width in EXPERT_WIDTHS,
           f'one of {EXPERT_WIDTHS}', expert_width)
    if expert_dropout is None:
      expert_dropout = dropout
    for name, value in (('dropout', dropout), ('expert_dropout', expert_dropout),
                        ('jitter', jitter)):
      _check(name, 0 <= value < 1, 'in [0, 1)', value)
    if expert_width == 'params':
      if d_ff % n_experts:
        raise ValueError(
            f"SwitchFF with expert_width='params' splits d_ff ({d_ff}) over "
            f'n_experts ({n_experts}), which must divide it; change one of '
            "them or use expert_width='flops'.")
      hidden = d_ff // n_experts
    else:
      hidden = d_ff
    self._d_model, self._hidden, self._n_experts = d_model, hidden, n_experts
    self._mode = mode
    self._capacity_factor = (capacity_factor if mode == 'train'
                             else eval_capacity_factor)
    self._min_capacity = min_capacity
    self._expert_dropout = expert_dropout if mode == 'train' else 0.0
    self._jitter = jitter if mode == 'train' else 0.0
    self._aux_loss_coef = aux_loss_coef
    self._init_scale = init_scale
    self._activation = activation()

  def capacity(self, n_tokens):
    """Expert capacity for a call on n_tokens tokens (all of them in 'predict')."""
    if self._mode == 'predict':
      return n_tokens
    return expert_capacity(n_tokens, self._n_experts, self._capacity_factor,
                           self._min_capacity)

  def forward(self, x):
    router_w, w1, b1, w2, b2 = self.weights
    shape, d = x.shape, x.shape[-1]
    x = x.reshape(-1, d)
    n_tokens, n_experts = x.shape[0], self._n_experts
    capacity = self.capacity(n_tokens)
    if self._jitter or self._expert_dropout:
      jitter_rng, dropout_rng = jax.random.split(self.rng)
    router_in = x.astype(jnp.float32)
    if self._jitter:
      router_in = router_in * jax.random.uniform(
          jitter_rng, router_in.shape, jnp.float32,
          1.0 - self._jitter, 1.0 + self._jitter)
    r = route(router_in, router_w, capacity)
    # Slot of each token in the flattened (n_experts * capacity) buffers;
    # dropped tokens point at one extra slot that holds zeros.
    slot = jnp.where(r['keep'], r['expert'] * capacity + r['position'],
                     n_experts * capacity)
    token_of_slot = jnp.full((n_experts * capacity + 1,), n_tokens, jnp.int32)
    token_of_slot = token_of_slot.at[slot].set(jnp.arange(n_tokens, dtype=jnp.int32))
    padded = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)], axis=0)
    inputs = padded[token_of_slot[:-1]].reshape(n_experts, capacity, d)
    h = jnp.einsum('ecd,edh->ech', inputs, w1) + b1[:, None, :]
    # The activation layer (weightless) runs as a pure function, so that no
    # tracer is left in it.
    h, _ = self._activation.pure_fn(h, *self._activation_params,
                                    jax.random.PRNGKey(0))
    if self._expert_dropout:
      keep = jax.random.bernoulli(dropout_rng, 1.0 - self._expert_dropout, h.shape)
      h = jnp.where(keep, h / (1.0 - self._expert_dropout), jnp.zeros_like(h))
    out = jnp.einsum('ech,ehd->ecd', h, w2) + b2[:, None, :]
    out = jnp.concatenate([out.reshape(-1, d), jnp.zeros((1, d), out.dtype)], axis=0)
    gate = jnp.where(r['keep'], r['gate'], 0.0).astype(x.dtype)
    y = out[slot] * gate[:, None]
    self.state = {
        AUX_LOSS: load_balancing_loss(r['probs'], r['onehot'], self._aux_loss_coef),
        'dropped_fraction': 1.0 - jnp.mean(r['keep'].astype(jnp.float32))}
    return y.reshape(shape)

  def init_weights_and_state(self, input_signature):
    d, h, e = input_signature.shape[-1], self._hidden, self._n_experts
    k_router, k1, k2 = jax.random.split(self.rng, 3)
    s = self._init_scale
    self.weights = (truncated_normal(k_router, (d, e), d, s),
                    truncated_normal(k1, (e, d, h), d, s), jnp.zeros((e, h), jnp.float32),
                    truncated_normal(k2, (e, h, d), h, s), jnp.zeros((e, d), jnp.float32))
    self.state = {AUX_LOSS: jnp.zeros((), jnp.float32),
                  'dropped_fraction': jnp.zeros((), jnp.float32)}
    self._activation_params = self._activation.init(
        shapes.ShapeDtype((1, h), jnp.float32))

  def matmul_params(self):
    """Weights one token multiplies with: the router and one expert."""
    d, h = self._d_model, self._hidden
    return d * self._n_experts + 2 * d * h
