"""ALBERT-style cross-layer weight sharing for DecoderLM (Lan et al., 1909.11942).

`SharedDecoderLM` is `training.model.DecoderLM` (same arguments, same gin
bindings of `training.DecoderLM` for the size and switches) whose n_layers
decoder blocks share weights:

  n_groups = 1 (ALBERT's default): every layer applies the same block weights,
      x_l = B(x_{l-1}; W)  for l = 1..L,
  n_groups = G: layers are split into G contiguous groups of L / G layers
      (ALBERT's num_hidden_groups); layer l uses W_{floor(l G / L)},
  separate_norms: each layer keeps its own norm weights (scale, bias), only
      the attention and feed-forward weights are shared.

The computation per token is unchanged (L blocks are applied); the weights
are those of G blocks (+ L - G blocks' norms with separate_norms).  Each layer
keeps its own state (the predict-mode key/value cache, a Switch layer's
auxiliary loss), so decoding and `training.trainer.aux_losses` work as in
DecoderLM.
"""

import inspect

import gin
import jax
from trax import layers as tl
from trax.layers import base

from training import model as model_lib


def _is_norm(layer):
  from trax.layers import normalization  # pylint: disable=g-import-not-at-top
  from primer_trax import variants  # pylint: disable=g-import-not-at-top
  return isinstance(layer, (normalization.LayerNorm, variants.RMSNorm))


def norm_mask(layer):
  """For each leaf of layer.weights (flattened), whether it is a norm's weight."""
  n_leaves = len(jax.tree_util.tree_leaves(layer.weights))
  if _is_norm(layer):
    return [True] * n_leaves
  if not layer.sublayers:
    return [False] * n_leaves
  mask = [m for s in layer.sublayers for m in norm_mask(s)]
  if len(mask) != n_leaves:
    raise ValueError(f'Cannot tell the norm weights of {layer.name} apart '
                     '(its weights are not those of its sublayers); use '
                     'separate_norms=False.')
  return mask


def _own_property(attr, from_cache):
  """A property stored in self.<attr>; setting trax's `from_cache` marker is a no-op."""
  def set_own(self, value):
    if not (isinstance(value, dict) and value == from_cache):
      setattr(self, attr, value)
  return property(lambda self: getattr(self, attr), set_own)


class SharedBlocks(base.Layer):
  """Applies L blocks in series with shared weights; see the module docstring.

  (batch, length, d) -> (batch, length, d).  `blocks` are L layers of the
  same structure (each keeps its own state).  Weights: (groups, norms) with
  groups a tuple of G tuples of one block's shared weight leaves, and norms a
  tuple of L tuples of norm-weight leaves (empty without separate_norms).
  The blocks are this layer's sublayers only for walking the model (FLOP
  counting); its weights are not theirs.
  """

  def __init__(self, blocks, n_groups=1, separate_norms=False):
    super().__init__(name=f'SharedBlocks_{len(blocks)}x{n_groups}')
    n_layers = len(blocks)
    if not isinstance(n_groups, int) or n_groups < 1 or n_layers % n_groups:
      raise ValueError(f'n_groups ({n_groups!r}) must be a positive integer '
                       f'that divides n_layers ({n_layers}); change one of them.')
    self._blocks = list(blocks)
    self._sublayers = tuple(blocks)
    self._n_groups = n_groups
    self._separate_norms = separate_norms
    self._treedef, self._mask = None, None
    self._weights, self._state = (), ()

  # This layer's weights and state are its own, not tuples of its sublayers'.
  weights = _own_property('_weights', base.GET_WEIGHTS_FROM_CACHE)
  state = _own_property('_state', base.GET_STATE_FROM_CACHE)

  def group(self, layer):
    """Index of the weight group layer `layer` (0-based) uses."""
    return layer * self._n_groups // len(self._blocks)

  def block_weights(self, layer, weights=None):
    """The full weight tree block `layer` runs with (from `weights` or own)."""
    groups, norms = self.weights if weights is None else weights
    shared = iter(groups[self.group(layer)])
    own = iter(norms[layer]) if self._separate_norms else iter(())
    leaves = [next(own) if (m and self._separate_norms) else next(shared)
              for m in self._mask]
    return jax.tree_util.tree_unflatten(self._treedef, leaves)

  def _split_leaves(self, tree):
    leaves = jax.tree_util.tree_leaves(tree)
    if not self._separate_norms:
      return tuple(leaves), ()
    return (tuple(w for w, m in zip(leaves, self._mask) if not m),
            tuple(w for w, m in zip(leaves, self._mask) if m))

  def forward(self, x):
    rngs = jax.random.split(self.rng, len(self._blocks))
    states = []
    for i, block in enumerate(self._blocks):
      x, s = block.pure_fn(x, self.block_weights(i), self.state[i], rngs[i])
      states.append(s)
    self.state = tuple(states)
    return x

  def init_weights_and_state(self, input_signature):
    rngs = jax.random.split(self.rng, len(self._blocks))
    groups, norms, states = [], [], []
    for i, block in enumerate(self._blocks):
      weights, state = block.init(input_signature, rng=rngs[i])
      if i == 0:
        self._treedef = jax.tree_util.tree_structure(weights)
        self._mask = norm_mask(block)
      shared, norm = self._split_leaves(weights)
      if i * self._n_groups % len(self._blocks) == 0:  # first layer of a group
        groups.append(shared)
      norms.append(norm)
      states.append(state)
      # Keep only shapes in the block (for FLOP counting), not a second copy.
      block.weights = jax.tree_util.tree_map(
          lambda w: jax.ShapeDtypeStruct(w.shape, w.dtype), weights)
    self.weights = (tuple(groups), tuple(norms))
    self.state = tuple(states)


def _decoder_setting(name, kwargs):
  """A DecoderLM argument: from kwargs, else gin's binding, else its default."""
  if name in kwargs:
    return kwargs[name]
  try:
    return gin.query_parameter(f'training.DecoderLM.{name}')
  except ValueError:
    return inspect.signature(model_lib.DecoderLM).parameters[name].default


@gin.configurable(module='blocks')
def SharedDecoderLM(vocab_size, n_groups=1, separate_norms=False, mode='train',
                    **kwargs):
  """DecoderLM whose blocks share weights (ALBERT); see the module docstring.

  Args:
    vocab_size: number of token ids.
    n_groups: number of distinct blocks; must divide n_layers (1: all shared).
    separate_norms: give every layer its own norm weights.
    mode: 'train', 'eval' or 'predict'.
    **kwargs: DecoderLM's arguments (size and switches); unset ones come
      from gin bindings of training.DecoderLM.

  Returns:
    A layer (batch, length) int32 -> (batch, length, vocab_size) logits.
  """
  n_layers = _decoder_setting('n_layers', kwargs)
  if not isinstance(n_groups, int) or n_groups < 1 or n_layers % n_groups:
    raise ValueError(f'n_groups ({n_groups!r}) must be a positive integer that '
                     f'divides n_layers ({n_layers}); change one of them.')
  model = model_lib.DecoderLM(vocab_size, mode=mode, **kwargs)
  layers = model.sublayers
  # DecoderLM is Embedding, PositionalEncoding, the blocks' layers, norm, Dense.
  body = layers[2:-2]
  per_block = len(body) // n_layers
  blocks = [tl.Serial(*body[i * per_block:(i + 1) * per_block])
            for i in range(n_layers)]
  return tl.Serial(layers[0], layers[1],
                   SharedBlocks(blocks, n_groups, separate_norms),
                   layers[-2], layers[-1])
