"""A reversible layer stack whose gradient does not store per-block activations.

`ReversibleSerial(*layers)` is a drop-in for trax's `tl.ReversibleSerial`:
the same constructor, the same sublayers, the same weight and state trees
(it subclasses `tl.ReversibleSerial` and only replaces how the stack is run
and differentiated), so a model switches by changing the class name and
trax weights load unchanged.  Use it like trax's:

    from terraformer import reversible
    stack = reversible.ReversibleSerial(
        reversible.DecoderBlock(attention_fn, feed_forward_fn) * n_layers)
    # stream (x1, x2) -> (y1, y2); e.g. start with tl.ReversibleSelect([0, 0])
    # and end with an average of the two streams.

How the memory saving works (RevNet, arXiv 1707.04585; Reformer, 2001.04451):
a block `ReversibleHalfResidual(F)` maps (x1, x2) -> (x1 + F(x2), x2), so its
input can be computed from its output: x1 = y1 - F(y2).  The stack's pure
function (`pure_fn`, which the trainer differentiates with plain `jax.grad`)
is a `jax.custom_vjp` whose forward pass keeps only the stack's output (plus
weights, the layer states before and after, and the rng).  Its backward pass
walks the blocks from the last to the first: it reconstructs each block's
input from its output and takes that block's vector-Jacobian product, so only
one block's activations are alive at a time and activation memory stays flat
as the stack gets deeper.  Costs: one more forward pass of every block during
the backward pass, and reconstructed inputs that differ from the forward ones
by rounding (float32: ~1e-7 relative per block; in bfloat16 the error is much
larger, as in trax).

Randomness and discrete choices are replayed exactly:
  - every sublayer gets the same rng in the recomputation as in the forward
    pass (the stack splits its rng as `tl.Serial` does, and the half residual
    splits its own as trax's does), so dropout masks and Gumbel noise repeat;
  - a state `(saved, {'running_second_time': ()})` (trax's protocol, used by
    `terraformer.sparse_ff.SparseFF`) is handed to the recomputation as
    `(saved_after_forward, {'running_second_time_yes': ()})`, so a SparseFF
    reuses the units it chose in the forward pass instead of re-drawing them
    from reconstructed (rounded) inputs;
  - an attention layer with trax's `forward_and_or_backward` method (trax's
    efficient attention, LSH) is recomputed from its state after the forward
    pass with `update_state=False`, i.e. with the hash buckets it saved.

The recomputation starts each sublayer from its state before the forward pass,
so layers with state that changes in training still see what they saw.
In 'predict' mode (any sublayer built with mode='predict') the stack runs as
an ordinary `tl.Serial`: decoding needs no gradients and keeps caches in state.

`NonReversibleSerial(*layers)` runs the same sublayers with the same weights
as plain differentiable code (all activations kept); benchmarks and tests
compare against it.

trax's own `tl.ReversibleSerial` reaches a similar effect through trax's
`Layer._do_custom_gradients`; this module is ours, independent of that
machinery, tested against it and against ordinary autodiff
(tests/test_reversible.py).  One difference matters: trax's backward runs an
attention layer from its state *after* the forward pass, which is right for
trax's LSH (it saves its buckets there) but wrong for `terraformer.lsh`,
whose state holds the hash key the next call will use (trax's stack then
gives gradients off by O(1); this one matches ordinary autodiff).
"""

import jax
from trax import layers as tl
from trax.layers import base

from training import model as model_lib

_FIRST_PASS = 'running_second_time'
_SECOND_PASS = 'running_second_time_yes'


# ---------------------------------------------------------------- stack helpers

def _as_tuple(x):
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _take(stack, n):
  """The first n items of the stack: one array if n == 1, else a tuple."""
  return stack[0] if n == 1 else tuple(stack[:n])


def _put(outputs, stack, n):
  """Replaces the first n items of the stack by `outputs`."""
  return _as_tuple(outputs) + tuple(stack[n:])


def _split(rng, n):
  if rng is None:
    return (None,) * n
  return jax.random.split(rng, n)


def _replay_state(old, new):
  """The state a sublayer gets when its forward pass is recomputed.

  Any `(saved, {'running_second_time': ()})` node of the old state becomes
  `(saved_after_forward, {'running_second_time_yes': ()})`; the rest of the
  old state is kept.
  """
  if (isinstance(old, tuple) and len(old) == 2 and isinstance(old[1], dict)
      and _FIRST_PASS in old[1]):
    return (new[0], {_SECOND_PASS: ()})
  if isinstance(old, (tuple, list)) and isinstance(new, (tuple, list)):
    if len(old) == len(new):
      return type(old)(_replay_state(o, n) for o, n in zip(old, new))
  return old


def _is_predict(layer):
  """Whether `layer` or any of its sublayers was built with mode='predict'."""
  if getattr(layer, '_mode', None) == 'predict':
    return True
  return any(_is_predict(sub) for sub in layer.sublayers)


def _add_ct(a, b):
  """Sum of two cotangents; float0 (integer inputs) counts as zero."""
  if getattr(a, 'dtype', None) == jax.dtypes.float0:
    return b
  if getattr(b, 'dtype', None) == jax.dtypes.float0:
    return a
  return a + b


# ------------------------------------------------------------- plain forwards

def _apply(layer, x, weights, state, rng):
  """Runs one sublayer as plain differentiable code: (outputs, new_state).

  Reversible layers are run through their `forward` (not `pure_fn`, which in
  trax attaches trax's own custom gradient); half residuals and nested stacks
  are unrolled here.
  """
  if isinstance(layer, tl.ReversibleHalfResidual):
    return _half_residual_apply(layer, x, weights, state, rng)
  if isinstance(layer, tl.ReversibleSerial):
    return _serial_apply(layer.sublayers, x, weights, state, rng)
  if isinstance(layer, tl.ReversibleLayer):
    saved = layer.weights, layer.state, layer.rng
    try:
      layer.weights, layer.state = weights, state
      layer._rng = rng  # pylint: disable=protected-access
      y = layer.forward(x)
      return y, layer.state
    finally:
      layer.weights, layer.state = saved[0], saved[1]
      layer._rng = saved[2]  # pylint: disable=protected-access
  return layer.pure_fn(x, weights, state, rng)


def _serial_apply(layers, xs, weights, state, rng):
  """A stack of sublayers, as `tl.Serial` runs it (same rng split)."""
  stack = _as_tuple(xs)
  new_state = []
  for layer, w, s, r in zip(layers, weights, state, _split(rng, len(layers))):
    y, s = _apply(layer, _take(stack, layer.n_in), w, s, r)
    stack = _put(y, stack, layer.n_in)
    new_state.append(s)
  return _take(stack, len(stack)), tuple(new_state)


def _half_residual_apply(layer, xs, weights, state, rng):
  """[acc, *ctx] -> [acc + f(ctx), *ctx], as trax's ReversibleHalfResidual."""
  acc, *ctx = _as_tuple(xs)
  residual, new_state = _residual(layer, tuple(ctx), weights, state, rng)
  return (acc + residual,) + tuple(ctx), new_state


def _residual(layer, ctx, weights, state, rng, replay_from=None):
  """f(ctx) of a half residual: its sublayers in turn, result on top.

  With `replay_from` (the state after the forward pass) this is the
  recomputation: states are replayed (see `_replay_state`), and an attention
  layer with `forward_and_or_backward` reuses its saved state.
  """
  subs = layer.sublayers
  stack = ctx
  new_state = []
  for i, (sub, w, s, r) in enumerate(
      zip(subs, weights, state, _split(rng, len(subs)))):
    x = _take(stack, sub.n_in)
    if replay_from is None:
      y, s = sub.pure_fn(x, w, s, r)
    elif i > 0 and hasattr(sub, 'forward_and_or_backward'):
      y = _saved_state_attention(sub, replay_from[i], r)(x, w)
    else:
      y, s = sub.pure_fn(x, w, _replay_state(s, replay_from[i]), r)
    stack = _put(y, stack, sub.n_in)
    new_state.append(s)
  return stack[0], tuple(new_state)


def _saved_state_attention(layer, state, rng):
  """(inputs, weights) -> output of a trax-style efficient attention layer,
  computed from its saved `state` (update_state=False), differentiable
  through the layer's own `forward_and_or_backward`."""
  @jax.custom_vjp
  def attend(x, w):
    return layer.forward_and_or_backward(
        x, w, state, rng, compute_output=True, update_state=False)[0]

  def fwd(x, w):
    return attend(x, w), (x, w)

  def bwd(res, ct):
    x, w = res
    _, _, x_ct, w_ct = layer.forward_and_or_backward(
        x, w, state, rng, output_grad=ct, compute_output=False,
        update_state=False)
    return x_ct, w_ct

  attend.defvjp(fwd, bwd)
  return attend


# ------------------------------------------------------ reverse and backward

def _reverse_and_vjp(layer, y, y_ct, weights, state, new_state, rng):
  """One sublayer backwards: (input, input cotangent, weight cotangent).

  y, y_ct: tuples of the layer's n_out outputs and their cotangents.
  """
  if isinstance(layer, tl.ReversibleHalfResidual):
    acc_out, ctx = y[0], tuple(y[1:])
    acc_ct, ctx_ct = y_ct[0], tuple(y_ct[1:])
    residual_fn = lambda c, w: _residual(layer, c, w, state, rng,
                                         replay_from=new_state)[0]
    residual, vjp = jax.vjp(residual_fn, ctx, weights)
    more_ctx_ct, w_ct = vjp(acc_ct)
    x = (acc_out - residual,) + ctx
    x_ct = (acc_ct,) + tuple(map(_add_ct, ctx_ct, more_ctx_ct))
    return x, x_ct, w_ct
  if isinstance(layer, tl.ReversibleSerial):
    return _serial_backward(layer.sublayers, y, y_ct, weights, state,
                            new_state, rng)
  try:
    x = layer.reverse(_take(y, layer.n_out), weights, state, new_state, rng)
  except NotImplementedError:  # only trax's combined method: use it.
    x, (x_ct, w_ct) = layer.reverse_and_grad(
        _take(y, layer.n_out), _take(y_ct, layer.n_out), weights, state,
        new_state, rng)
    return _as_tuple(x), _as_tuple(x_ct), w_ct
  replay = _replay_state(state, new_state)
  _, vjp = jax.vjp(lambda x, w: _apply(layer, x, w, replay, rng)[0],
                   x, weights)
  x_ct, w_ct = vjp(_take(y_ct, layer.n_out))
  return _as_tuple(x), _as_tuple(x_ct), w_ct


def _serial_backward(layers, ys, ys_ct, weights, state, new_state, rng):
  """From a stack's outputs: its inputs, their cotangents, weight cotangents."""
  stack, stack_ct = _as_tuple(ys), _as_tuple(ys_ct)
  rngs = _split(rng, len(layers))
  w_cts = [None] * len(layers)
  for i in reversed(range(len(layers))):
    layer = layers[i]
    n = layer.n_out
    x, x_ct, w_cts[i] = _reverse_and_vjp(
        layer, stack[:n], stack_ct[:n], weights[i], state[i], new_state[i],
        rngs[i])
    stack, stack_ct = x + stack[n:], x_ct + stack_ct[n:]
  return stack, stack_ct, tuple(w_cts)


def _reversible_apply(layers, xs, weights, state, rng):
  """The stack as a custom_vjp of (xs, weights, state, rng)."""

  single = not isinstance(xs, tuple)

  @jax.custom_vjp
  def run(xs, weights, state, rng):
    return _serial_apply(layers, xs, weights, state, rng)

  def fwd(xs, weights, state, rng):
    ys, new_state = _serial_apply(layers, xs, weights, state, rng)
    return (ys, new_state), (ys, weights, state, new_state, rng)

  def bwd(res, cts):
    ys, weights, state, new_state, rng = res
    ys_ct, _ = cts  # the state output has no cotangent worth passing on
    _, xs_ct, w_ct = _serial_backward(
        layers, ys, ys_ct, weights, state, new_state, rng)
    xs_ct = xs_ct[0] if single else xs_ct
    return xs_ct, w_ct, None, None

  run.defvjp(fwd, bwd)
  return run(xs, weights, state, rng)


# ------------------------------------------------------------------- layers

class ReversibleSerial(tl.ReversibleSerial):
  """trax's `ReversibleSerial`, differentiated without stored activations.

  Same constructor, sublayers, weights, state and outputs as
  `tl.ReversibleSerial(*layers)`; all sublayers must be reversible
  (`tl.ReversibleHalfResidual`, `tl.ReversibleSwap`, `tl.ReversibleSelect`,
  nested reversible stacks, ...).  See the module docstring.
  """

  @property
  def has_backward(self):
    # The custom gradient is inside `forward` (a jax.custom_vjp); trax's own
    # wrapper (`Layer._do_custom_gradients`) is not used.
    return False

  def forward(self, xs):
    if _is_predict(self):
      return super().forward(xs)
    if isinstance(xs, list):
      xs = tuple(xs)
    ys, new_state = _reversible_apply(self.sublayers, xs, self.weights,
                                      self.state, self.rng)
    self.state = new_state
    return ys


class NonReversibleSerial(tl.ReversibleSerial):
  """The same stack as `ReversibleSerial`, differentiated the ordinary way.

  Same constructor, weights, state and outputs; its gradient keeps every
  block's activations (memory grows with depth).  For comparisons only.
  """

  @property
  def has_backward(self):
    return False

  def forward(self, xs):
    if isinstance(xs, list):
      xs = tuple(xs)
    ys, new_state = _serial_apply(self.sublayers, xs, self.weights,
                                  self.state, self.rng)
    self.state = new_state
    return ys


def DecoderBlock(attention_fn, feed_forward_fn, n_attention_layers=1,
                 n_feedforward_layers=1, norm=model_lib.LayerNorm):
  """The Terraformer's reversible decoder block, as a list of sublayers.

  Two streams (x1, x2) -> (y1, y2), each (batch, length, d_model):

      n_attention_layers x [HalfResidual(norm, attention_layer=attention), Swap]
      n_feedforward_layers x [HalfResidual(feed_forward), Swap]

  as trax's Reformer/Terraformer decoder blocks are laid out (the attention
  half residual normalises its input; the feed-forward brings its own norm,
  as trax's `FeedForwardWithOptions` does).  Splice the list into
  `ReversibleSerial`.

  Args:
    attention_fn: () -> attention layer (batch, length, d) -> same.
    feed_forward_fn: () -> feed-forward layer (batch, length, d) -> same,
      including its pre-norm.
    n_attention_layers, n_feedforward_layers: how many of each half block.
    norm: () -> norm layer applied before the attention.

  Returns:
    A list of reversible layers.
  """
  for name, value in (('n_attention_layers', n_attention_layers),
                      ('n_feedforward_layers', n_feedforward_layers)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ValueError(f'{name} must be a non-negative integer, not {value!r}.')
  blocks = []
  for _ in range(n_attention_layers):
    blocks += [tl.ReversibleHalfResidual(norm(), attention_layer=attention_fn(),
                                         name='ReversibleHalfResidualDecoderAttn'),
               tl.ReversibleSwap()]
  for _ in range(n_feedforward_layers):
    blocks += [tl.ReversibleHalfResidual(feed_forward_fn(),
                                         name='ReversibleHalfResidualDecoderFF'),
               tl.ReversibleSwap()]
  return blocks


def AverageStreams():
  """(x1, x2) -> (x1 + x2) / 2: closes a two-stream reversible stack."""
  return base.Fn('AverageStreams', lambda x1, x2: (x1 + x2) / 2)

