"""The jitted training and evaluation steps over a Trax model's pure function.

One `jax.jit` holds the forward pass, the loss, the backward pass and the
optimizer update (a trax optimizer's `tree_update`), with the training state
donated so that weights and optimizer slots are updated in place.

Mixed precision: weights and optimizer slots stay float32 ("master weights");
inside the step they are cast to `compute_dtype` (e.g. bfloat16) before the
model runs, so the matmuls run in that dtype while gradients arrive in float32
through the cast.  The loss is computed in float32.

Several devices: pass a `DataParallel` to `make_train_step` and the same step
runs over a 1-D mesh of devices (one or many processes) with `jax.jit` and
`jax.sharding`: each global batch is split along its batch dimension, the
weights are replicated, and XLA inserts the gradient all-reduce.  With
`shard_optimizer` the optimizer slots are split across the devices as well
(ZeRO stage 1): each device keeps and updates 1/n of each slot array and the
updated weights are all-gathered.  Without a `DataParallel` (one device) the
step is exactly the single-device one.
"""

import collections
import math

import jax
from jax import numpy as jnp
import numpy as np

TrainState = collections.namedtuple('TrainState', 'weights slots state')
"""weights: the model's weight tree (float32); slots: the optimizer's slots;
state: the model's non-trainable state tree."""


def cast_floats(tree, dtype):
  """Casts every floating-point leaf of `tree` to `dtype`; other leaves pass."""
  if dtype is None:
    return tree
  def cast(x):
    if hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype)
    return x
  return jax.tree_util.tree_map(cast, tree)


def cross_entropy(logits, targets, weights):
  """Weighted token cross-entropy, summed: sum_i w_i (logsumexp(z_i) - z_i[y_i]).

  Args:
    logits: (batch, length, vocab), any float dtype (upcast to float32).
    targets: (batch, length) int32.
    weights: (batch, length) float32.

  Returns:
    (loss_sum, weight_sum): float32 scalars; the mean loss in nats per token
    is loss_sum / weight_sum.
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  # A one-hot product rather than a gather: it fuses with the logsumexp pass
  # and its gradient needs no scatter.
  one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
  target_logit = jnp.sum(logits * one_hot, axis=-1)
  return jnp.sum((log_z - target_logit) * weights), jnp.sum(weights)


def accuracy_sum(logits, targets, weights):
  """sum_i w_i [argmax z_i == y_i]: weighted count of correct predictions."""
  return jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights)


def sequence_accuracy_sums(logits, targets, weights):
  """(rows with every weighted argmax right, rows with any weight), float32."""
  wrong = (jnp.argmax(logits, axis=-1) != targets) & (weights > 0)
  has_tokens = jnp.any(weights > 0, axis=-1)
  return (jnp.sum(has_tokens & ~jnp.any(wrong, axis=-1), dtype=jnp.float32),
          jnp.sum(has_tokens, dtype=jnp.float32))


def schedule_is_traceable(lr_schedule):
  """Whether `lr_schedule(step)` can be computed inside a jitted step."""
  try:
    jax.eval_shape(lr_schedule, jax.ShapeDtypeStruct((), jnp.int32))
    return True
  except Exception:  # pylint: disable=broad-except
    return False   # e.g. trax's multifactor compares the rate in Python.


def host_learning_rate(lr_schedule, step):
  """The schedule's rate at `step`, computed on the host CPU as a float32."""
  with jax.default_device(jax.local_devices(backend='cpu')[0]):
    return np.float32(lr_schedule(step))


AUX_LOSS = 'aux_loss'


def aux_losses(state):
  """Auxiliary losses that layers left in a model state tree.

  A layer with a loss of its own besides the LM loss (e.g. the Switch
  load-balancing loss, blocks.switch) keeps it as a dict entry named
  'aux_loss' in its state; this returns every such entry (a list of scalars,
  empty for models with none).
  """
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if path and getattr(path[-1], 'key', None) == AUX_LOSS:
      found.append(jnp.asarray(leaf, jnp.float32))
  return found


def model_inputs(model, batch):
  """What `model` is called on for a batch (inputs, targets, weights).

  A language model (n_in 1) takes inputs (batch, length); an encoder-decoder
  (n_in 2) takes (inputs (batch, input_len), targets (batch, target_len)) and
  shifts the targets right itself, as trax's encoder-decoders do.
  """
  return (batch[0], batch[1]) if model.n_in == 2 else batch[0]


def _logits_fn(model, compute_dtype):
  """-> logits_fn(weights, state, x, rng) -> (logits, new_state).

  Models with several outputs (e.g. trax's encoder-decoders return
  (logits, targets)) give their first output as the logits.
  """
  def logits_fn(weights, state, inputs, rng):
    out, new_state = model.pure_fn(inputs, cast_floats(weights, compute_dtype),
                                   state, rng)
    return (out[0] if model.n_out > 1 else out), new_state
  return logits_fn


def clip_by_global_norm(grads, max_norm, norm=None):
  """Scales the whole gradient tree down so its L2 norm is at most max_norm."""
  norm = global_norm(grads) if norm is None else norm
  scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))
  return jax.tree_util.tree_map(lambda g: (g * scale).astype(g.dtype), grads)


def global_norm(tree):
  """L2 norm of all leaves of `tree` taken as one vector."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree_util.tree_leaves(tree)))


def apply_optimizer(optimizer, step, grads, weights, slots, opt_params):
  """A trax optimizer's per-array `update` over the whole tree.

  The same arithmetic as `optimizer.tree_update`, without the gradient and
  weight norms it also computes (the step computes the gradient norm once).
  Returns (new_weights, new_slots).
  """
  from trax import fastmath  # pylint: disable=g-import-not-at-top
  old_weights = fastmath.tree_flatten(weights)
  updated = [optimizer.update(step, g, w, s, opt_params)
             for g, w, s in zip(fastmath.tree_flatten(grads), old_weights, slots)]
  flat_weights = [new.astype(old.dtype) for (new, _), old in zip(updated, old_weights)]
  new_weights, _ = fastmath.tree_unflatten(flat_weights, weights)
  return new_weights, tuple(s for _, s in updated)


def make_train_step(model, optimizer, lr_schedule, compute_dtype=None,
                    clip_grad_norm=None, parallel=None):
  """Returns `step_fn(train_state, step, batch, key, lr) -> (train_state, metrics)`.

  One jitted function (train_state donated): forward in `compute_dtype`,
  float32 loss, gradients, optional clipping of the global gradient norm to
  `clip_grad_norm`, and the trax optimizer's update with the learning rate
  `lr_schedule(step)`.  Dropout and other randomness use
  `fold_in(key, step)`, so a step's randomness depends only on key and step.
  When the schedule cannot be traced, pass its value
  as `lr` (see `host_learning_rate`); otherwise `lr` is ignored.
  Metrics are float32 device scalars: loss (mean nats per token), weight_sum,
  learning_rate, gradients_l2 (before clipping).  Models whose layers leave
  auxiliary losses in their state (see `aux_losses`) train on loss + their
  sum, reported as aux_loss ('loss' stays the LM loss).

  With `parallel` (a `DataParallel`), `train_state` and `batch` must be laid
  out by `parallel.put_state` and `parallel.put_batch`; the step keeps that
  layout (metrics come back replicated).  The loss is the mean over the global
  batch, so the update equals the single-device one up to float32 rounding.
  """
  logits_fn = _logits_fn(model, compute_dtype)
  traced_lr = schedule_is_traceable(lr_schedule)
  base_opt_params = optimizer.opt_params  # hyperparameters; no slots built

  def loss(weights, state, batch, rng):
    _, targets, token_weights = batch
    logits, new_state = logits_fn(weights, state, model_inputs(model, batch), rng)
    loss_sum, weight_sum = cross_entropy(logits, targets, token_weights)
    mean = loss_sum / jnp.maximum(weight_sum, 1.0)
    aux = aux_losses(new_state)  # none: the objective is the LM loss alone
    aux_sum = sum(aux) if aux else None
    objective = mean if aux_sum is None else mean + aux_sum
    return objective, (new_state, weight_sum, mean, aux_sum)

  grad_fn = jax.value_and_grad(loss, has_aux=True)

  def step_fn(train_state, step, batch, key, lr):
    weights, slots, state = train_state
    rng = jax.random.fold_in(key, step)
    (_, (new_state, weight_sum, mean, aux)), grads = grad_fn(
        weights, state, batch, rng)
    if parallel is not None and parallel.shard_optimizer:
      # Reduce-scatter the gradients to the slots' layout: each device clips
      # and updates its part of every array; the weights are gathered after.
      grads = parallel.constrain(grads, parallel.slot_sharding)
      weights = parallel.constrain(weights, parallel.slot_sharding)
    grad_norm = global_norm(grads)
    if clip_grad_norm is not None:
      grads = clip_by_global_norm(grads, clip_grad_norm, grad_norm)
    lr = lr_schedule(step) if traced_lr else lr
    opt_params = dict(base_opt_params, learning_rate=jnp.asarray(lr, jnp.float32))
    new_weights, new_slots = apply_optimizer(
        optimizer, step, grads, weights, slots, opt_params)
    metrics = {'loss': mean, 'weight_sum': weight_sum,
               'learning_rate': opt_params['learning_rate'],
               'gradients_l2': grad_norm}
    if aux is not None:
      metrics['aux_loss'] = aux
    new_train_state = TrainState(new_weights, new_slots, new_state)
    if parallel is not None:
      new_train_state = parallel.constrain_state(new_train_state)
      metrics = parallel.constrain(metrics, parallel.replicated_sharding)
    return new_train_state, metrics

  return jax.jit(step_fn, donate_argnums=(0,))


def make_eval_step(model, compute_dtype=None, parallel=None):
  """Returns jitted `eval_fn(weights, state, batch) -> (loss_sum, weight_sum, correct)`.

  For a two-input (encoder-decoder) model it also returns (sequences_correct,
  sequences): rows whose weighted tokens are all predicted right, and rows
  with any weight.  With `parallel`, pass weights and batch laid out by it;
  the sums come back replicated.
  """
  logits_fn = _logits_fn(model, compute_dtype)
  def eval_fn(weights, state, batch):
    _, targets, token_weights = batch
    logits, _ = logits_fn(weights, state, model_inputs(model, batch),
                          jax.random.PRNGKey(0))
    loss_sum, weight_sum = cross_entropy(logits, targets, token_weights)
    sums = loss_sum, weight_sum, accuracy_sum(logits, targets, token_weights)
    if model.n_in == 2:
      sums += sequence_accuracy_sums(logits, targets, token_weights)
    if parallel is not None:
      sums = parallel.constrain(sums, parallel.replicated_sharding)
    return sums
  return jax.jit(eval_fn)


def input_signature(batch_shape):
  """ShapeDtype of int32 ids for a (batch, length) shape, or a tuple of them
  for a tuple of shapes (one per model input, e.g. ((batch, input_len),
  (batch, target_len)) for an encoder-decoder)."""
  from trax import shapes  # pylint: disable=g-import-not-at-top
  if isinstance(batch_shape[0], (tuple, list)):
    return tuple(shapes.ShapeDtype(tuple(s), np.int32) for s in batch_shape)
  return shapes.ShapeDtype(tuple(batch_shape), np.int32)


def init_train_state(model, optimizer, batch_shape, seed):
  """Initialises the model for int32 inputs and the optimizer.

  batch_shape: (batch, length), or one such shape per model input (see
  `input_signature`).  Returns a TrainState of device arrays.
  """
  model.init(input_signature(batch_shape), rng=jax.random.PRNGKey(seed))
  slots, _ = optimizer.tree_init(model.weights)
  return TrainState(model.weights, slots, model.state)


# --- Data parallelism -------------------------------------------------------

DATA_AXIS = 'data'


class DataParallel:
  """The layout of training over a 1-D mesh of devices (axis 'data').

  Batches (batch, length) are split along the batch dimension, so the global
  batch size must be a multiple of the device count.  Weights and model state
  are replicated.  Optimizer slots are replicated too, or with
  `shard_optimizer` split along their largest dimension that the device count
  divides (arrays with no such dimension stay replicated).

  Works across processes (after `jax.distributed.initialize`): `devices` are
  then all processes' devices, and every process passes the same global host
  arrays to `put_state` / `put_batch`, each placing only its own devices' part.
  """

  def __init__(self, devices=None, shard_optimizer=False):
    devices = list(jax.devices() if devices is None else devices)
    self.mesh = jax.sharding.Mesh(np.array(devices), (DATA_AXIS,))
    self.n_devices = len(devices)
    self.shard_optimizer = shard_optimizer
    self.batch_sharding = jax.sharding.NamedSharding(
        self.mesh, jax.sharding.PartitionSpec(DATA_AXIS))
    self.replicated = jax.sharding.NamedSharding(
        self.mesh, jax.sharding.PartitionSpec())

  def check_batch_size(self, batch_size, name='batch_size'):
    """Raises ValueError unless `batch_size` splits evenly over the devices."""
    if batch_size % self.n_devices:
      raise ValueError(
          f'{name} {batch_size} is not divisible by the {self.n_devices} '
          'devices it is split over; use a multiple of '
          f'{self.n_devices} (the global batch size) or fewer devices.')

  def replicated_sharding(self, x):  # pylint: disable=unused-argument
    return self.replicated

  def slot_sharding(self, x):
    """Sharding of one optimizer slot (or weight, for the update) `x`."""
    if not self.shard_optimizer:
      return self.replicated
    shape = np.shape(x)
    dims = [i for i, d in enumerate(shape) if d >= self.n_devices
            and d % self.n_devices == 0]
    if not dims:
      return self.replicated
    spec = [None] * len(shape)
    spec[max(dims, key=lambda i: shape[i])] = DATA_AXIS
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec))

  def state_shardings(self, train_state):
    """A TrainState of shardings, one per leaf of `train_state`."""
    weights, slots, state = train_state
    tree_map = jax.tree_util.tree_map
    return TrainState(tree_map(self.replicated_sharding, weights),
                      tree_map(self.slot_sharding, slots),
                      tree_map(self.replicated_sharding, state))

  @staticmethod
  def constrain(tree, sharding_fn):
    """Inside jit: lays every leaf x of `tree` out as `sharding_fn(x)`."""
    return jax.tree_util.tree_map(
        lambda x: jax.lax.with_sharding_constraint(x, sharding_fn(x)), tree)

  def constrain_state(self, train_state):
    return jax.tree_util.tree_map(jax.lax.with_sharding_constraint, train_state,
                                  self.state_shardings(train_state))

  def put_state(self, train_state):
    """Host (or single-device) arrays -> TrainState laid out for the step."""
    return place(train_state, self.state_shardings(train_state))

  def put_batch(self, batch):
    """A global host batch (tuple of (batch, ...) arrays) -> sharded arrays."""
    return place(batch, jax.tree_util.tree_map(lambda _: self.batch_sharding,
                                               batch))


def place(tree, shardings):
  """Puts each leaf of `tree` (the global value) on devices with its sharding.

  One process: `jax.device_put`.  Several processes: each builds its
  addressable shards from its own copy of the global value.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)
  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(
        x.shape, sharding, lambda index: np.asarray(x[index]))
  return jax.tree_util.tree_map(put, tree, shardings)


# --- FLOP counting and MFU --------------------------------------------------

# Dense bf16 peak FLOP/s per device, by the start of jax's device_kind.
PEAK_FLOPS = {
    'NVIDIA H100 80GB HBM3': 989.4e12,  # SXM5
    'NVIDIA H100 PCIe': 756e12,
    'NVIDIA H200': 989.4e12,
    'NVIDIA A100': 312e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5p': 459e12,
    'TPU v6 lite': 918e12,
}


def device_peak_flops(device=None):
  """The device's dense bf16 peak in FLOP/s, or None when unknown (e.g. CPU)."""
  kind = (device or jax.devices()[0]).device_kind
  for prefix, peak in PEAK_FLOPS.items():
    if kind.startswith(prefix):
      return peak
  return None


def _matmul_params(model):
  """Parameters that take part in matmuls: all but embedding lookups and 1-D.

  A layer that reuses its weights (e.g. a convolution applied at several
  modules) says how many weights its matmuls amount to with `matmul_params()`.
  """
  # The raw classes: tl.* names are gin-wrapped subclasses of these.
  from trax.layers import attention, core  # pylint: disable=g-import-not-at-top
  def walk(layer):
    if isinstance(layer, (core.Embedding, attention.PositionalEncoding)):
      return 0
    if hasattr(layer, 'matmul_params'):  # layers whose weights are reused
      return layer.matmul_params()
    if layer.sublayers:
      return sum(walk(s) for s in layer.sublayers)
    leaves = jax.tree_util.tree_leaves(layer.weights)
    return sum(int(np.prod(w.shape)) for w in leaves if len(w.shape) >= 2)
  return walk(model)


def _attention_layers(model):
  """Sublayers that say their attention width (a `d_attn` that is not None:
  `training.model.CausalDotProductAttention`, the sparse QKV attention's
  `terraformer.sparse_qkv.DotProductCausalAttention`)."""
  if getattr(model, 'd_attn', None) is not None:
    return [model]
  return [a for s in model.sublayers for a in _attention_layers(s)]


def train_flops_per_token(model, seq_len):
  """Training FLOPs per token: 6 * matmul params + 6 * d_attn * seq_len per layer.

  The causal convention of llm.c (attention scores counted for the lower
  triangle only); d_attn = heads * head width.  `model` must be initialised.
  """
  attention = sum(a.d_attn for a in _attention_layers(model))
  return 6 * _matmul_params(model) + 6 * attention * seq_len


def count_params(weights):
  return sum(int(np.prod(w.shape)) for w in jax.tree_util.tree_leaves(weights))


def bits(nats):
  return nats / math.log(2)
