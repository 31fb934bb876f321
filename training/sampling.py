"""Autoregressive sampling in 'predict' mode, with the whole loop on the device.

The prompt goes through the model in one call (filling the attention caches),
then a `lax.scan` runs one jitted model step per new token and samples on the
device: no host round trip per token.  Works for any model that follows the
project's convention `model_fn(vocab_size=..., mode='predict')` and keeps its
decoding state in layer state.

Encoder-decoder models (n_in 2, trax's convention: called on (inputs,
targets), first output the logits) decode with `Sampler.decode`: every call
passes the encoder inputs (the model encodes them on its first call and keeps
what it needs in state, e.g. trax's `tl.Cache`) and one target token; the
first target token is `start_id` (0, what the model's own shift-right puts
first in training).
"""

import functools
import weakref

import jax
from jax import numpy as jnp
import numpy as np


def choose_next(logits, rng, temperature=1.0, top_k=None):
  """Next token ids from (batch, vocab) logits.

  temperature 0 is greedy (argmax); top_k keeps the k most likely tokens.
  """
  logits = logits.astype(jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def max_length(layer):
  """The longest sequence `layer` can decode: the smallest predict-mode cache
  (or position table) among its sublayers, or None if it has none.

  Layers announce it as an integer attribute `_max_len` (ours and trax's
  attention caches and positional encodings do).
  """
  found = []
  def visit(sub):
    value = getattr(sub, '_max_len', None)
    if isinstance(value, int) and not isinstance(value, bool):
      found.append(value)
    for s in sub.sublayers:
      visit(s)
  visit(layer)
  return min(found) if found else None


# XLA:CPU hands some fusions (reductions, small matmuls, convolutions) to the
# YNNPACK library.  Inside the decoding loop each such call costs far more
# than its arithmetic (measured: the one-query attention's multiply-and-sum
# over a 16 x 128 x 64 cache slice took about 250 us as a YNN fusion, 60 us as
# XLA's own loop; a 24-layer dense model at the 800M shape decoded in 92-99
# instead of 143 ms per token on 2 cores, in 31 instead of 33 ms on 16), so
# the decoding loop is compiled without them on a CPU.
CPU_DECODE_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}


def decode_compiler_options():
  """XLA options for the decoding loop on the default backend, or None.

  `CPU_DECODE_OPTIONS` on a CPU, if this jaxlib knows them (a jaxlib
  without the option compiles with its defaults); None elsewhere.  The
  answer is cached per backend name (read on each call), so a caller that
  once saw another backend does not fix it for the CPU.
  """
  options = _compiler_options_for(jax.default_backend())
  return dict(options) if options is not None else None


@functools.lru_cache(maxsize=None)
def _compiler_options_for(backend):
  if backend != 'cpu':
    return None
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_DECODE_OPTIONS).lower(
        jnp.zeros(())).compile()
  except Exception:  # pylint: disable=broad-except
    return None
  return tuple(CPU_DECODE_OPTIONS.items())


# On a CPU the Sampler hands each `training.model.Dense` its kernel transposed,
# (d_out, d_in), and the layer multiplies by it in that form
# (`training.model.out_in_dot`).  XLA:CPU reads a row's product with a
# (d_in, d_out) matrix at well under the bandwidth when d_in > d_out.
# The transposed kernels are made once per weight tree and kept while that
# tree's arrays live (so decoding holds those kernels twice).
CPU_KERNELS_OUT_IN = True
# The same off the CPU (GPU, TPU): the Dense layers then multiply a single row
# by `training.model.one_row_dot_out_in`.  On an H100 (2026-12-06,
# BENCHMARKS.md) XLA:GPU read a row's product with the (d_out, d_in) matrix at
# 1.85-2.32 TB/s against 1.1-1.9 TB/s for the (d_in, d_out) forms, and the
# 800M dense decoder took 0.95-0.99 ms/token against 1.15-1.18 ms/token.
GPU_KERNELS_OUT_IN = True


def out_in_kernels(model):
  """Marks `model`'s Dense layers for kernels stored (d_out, d_in).

  Calls `use_kernel_out_in()` on every `training.model.Dense` whose kernel is one
  leaf of `model.weights` (a kernel shared with another leaf is left as it
  is) and returns a list of booleans over those leaves: True where the leaf
  is such a kernel, to be handed to the layer transposed.
  """
  from training import model as model_lib  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_leaves(model.weights)
  mask = [False] * len(leaves)
  where = {}  # id of a leaf -> its positions
  for i, leaf in enumerate(leaves):
    where.setdefault(id(leaf), []).append(i)

  def visit(layer):
    if isinstance(layer, model_lib.Dense):
      found = where.get(id(layer.kernel()), [])
      if len(found) == 1:
        mask[found[0]] = True
        layer.use_kernel_out_in()
    for sub in layer.sublayers:
      visit(sub)
  visit(model)
  return mask


def decoding_out_in(model):
  """`out_in_kernels(model)` when decoding hands kernels over transposed
  (CPU_KERNELS_OUT_IN on a CPU, GPU_KERNELS_OUT_IN elsewhere) and some
  kernel is marked; None otherwise."""
  on_cpu = jax.default_backend() == 'cpu'
  if CPU_KERNELS_OUT_IN if on_cpu else GPU_KERNELS_OUT_IN:
    marked = out_in_kernels(model)
    return marked if any(marked) else None
  return None


# Whether the Sampler hands layers that offer one (`decoding_forms`) their
# weights in a decoding form.  Made inside the loop, ConvQKV's side-by-side
# kernel was rebuilt at every token on an H200 (2026-12-04: XLA:GPU did not
# hoist it; 1.7-2.0 us per layer and token).
DECODING_FORMS = True


def decoding_forms(model):
  """Marks the layers of `model` that take their weights in a decoding form.

  A layer offers one with a method `use_decoding_form()`, which switches it
  to that form and returns the function that makes it from the layer's own
  weights (as `layer.weights` holds them), or returns None and switches
  nothing (e.g. outside 'predict' mode).  `sparse_qkv.ConvQKV` is one: it
  takes its convolution kernels already side by side.  Returns
  [(path, function)] over the marked layers, path being the indices that
  lead from model.weights to the layer's weights (a layer with sublayers
  holds one entry per sublayer).
  """
  forms = []
  seen = set()  # a layer used twice holds its weights at its first place

  def visit(layer, path):
    if id(layer) in seen:
      return
    seen.add(id(layer))
    use = getattr(layer, 'use_decoding_form', None)
    form = use() if use is not None else None
    if form is not None:
      forms.append((path, form))
      return
    for i, sub in enumerate(layer.sublayers):
      visit(sub, path + (i,))
  visit(model, ())
  return forms


def subtree_at(tree, path):
  for i in path:
    tree = tree[i]
  return tree


def replace_at(tree, path, new):
  """`tree` (nested tuples) with the subtree at `path` replaced by `new`."""
  if not path:
    return new
  return tuple(replace_at(t, path[1:], new) if j == path[0] else t
               for j, t in enumerate(tree))


@jax.jit
def _transposed(arrays):
  return [a.T for a in arrays]


def transpose_marked(weights, marked):
  """`weights` with the leaves `marked` (booleans over its leaves, from
  `out_in_kernels`) transposed; the other leaves are the same objects."""
  leaves, treedef = jax.tree_util.tree_flatten(weights)
  moved = iter(_transposed([a for a, m in zip(leaves, marked) if m]))
  return jax.tree_util.tree_unflatten(
      treedef, [next(moved) if m else a for a, m in zip(leaves, marked)])


def prepare_for_decoding(weights, out_in, forms, make_forms=None):
  """`weights` as decoding hands them over: the leaves marked in `out_in`
  (from `decoding_out_in`: None for none) transposed and the layers in `forms`
  (from `decoding_forms`) given their decoding forms.  make_forms:
  [subtree at each path] -> [its form] (default: each form called in turn;
  the Sampler passes one jitted call)."""
  tree = transpose_marked(weights, out_in) if out_in is not None else weights
  if forms:
    subtrees = [subtree_at(tree, path) for path, _ in forms]
    made = (make_forms(subtrees) if make_forms is not None
            else [form(w) for (_, form), w in zip(forms, subtrees)])
    for (path, _), new in zip(forms, made):
      tree = replace_at(tree, path, new)
  return tree


def _weak(leaf):
  """A weak reference to `leaf`, or (for a leaf that takes none) a callable
  that matches nothing."""
  try:
    return weakref.ref(leaf)
  except TypeError:
    return lambda: None


def match_structure(weights, template):
  """`weights` laid out like `template` (the predict model's own weights).

  A model built in another mode may nest the same weights differently (trax
  wraps a predict-mode encoder in `tl.Cache`, one tuple level deeper); the
  leaves must be the same arrays in the same order.  Returns `weights`
  itself when the layouts already agree.
  """
  leaves, treedef = jax.tree_util.tree_flatten(weights)
  want, want_def = jax.tree_util.tree_flatten(template)
  if treedef == want_def:
    return weights
  if len(leaves) != len(want) or any(
      np.shape(a) != np.shape(b) for a, b in zip(leaves, want)):
    raise ValueError(
        f'the weights ({len(leaves)} arrays) do not fit the predict-mode model '
        f'({len(want)} arrays); build it with the configuration it was trained with.')
  return jax.tree_util.tree_unflatten(want_def, leaves)


class Sampler:
  """Generates continuations of prompts with a predict-mode model.

  Args:
    predict_model: the model built with mode='predict' (not yet initialised).
    batch_size: number of sequences decoded together.
    compute_dtype: dtype the float weights are cast to (None keeps them).
    input_len: for an encoder-decoder (n_in 2), the length of the encoder
      inputs it is initialised for (required then; unused otherwise).

  It marks the model's `training.model.Dense` layers to take their kernels
  transposed (`out_in_kernels`; CPU_KERNELS_OUT_IN on a CPU,
  GPU_KERNELS_OUT_IN elsewhere, both on by default), and the layers that
  offer a decoding form of their weights to take that (`decoding_forms`),
  and hands the weights over that way, made once per weight tree; run the
  model through the Sampler from then on.
  """

  def __init__(self, predict_model, batch_size=1, compute_dtype=None,
               input_len=None):
    from trax import shapes  # pylint: disable=g-import-not-at-top
    self._model = predict_model
    self.two_inputs = predict_model.n_in == 2
    if self.two_inputs:
      if not input_len:
        raise ValueError('input_len is required for an encoder-decoder model '
                         '(n_in 2): pass the encoder input length.')
      signature = (shapes.ShapeDtype((batch_size, input_len), np.int32),
                   shapes.ShapeDtype((batch_size, 1), np.int32))
    else:
      signature = shapes.ShapeDtype((batch_size, 1), np.int32)
    self._model.init(signature)
    self._input_len = input_len
    self._initial_state = self._model.state
    self._template = self._model.weights
    self._dtype = compute_dtype
    self._batch_size = batch_size
    self.max_length = max_length(predict_model)
    self._out_in = decoding_out_in(predict_model)
    self._forms = decoding_forms(predict_model) if DECODING_FORMS else []
    self._make_forms = jax.jit(lambda subtrees: [
        form(w) for (_, form), w in zip(self._forms, subtrees)])
    self._prepared = None  # (weak references to the leaves it was made from, tree)
    self._generate = jax.jit(self._generate_fn, static_argnums=(3, 4, 5),
                             compiler_options=decode_compiler_options())
    self._forced = jax.jit(self._forced_fn,
                           compiler_options=decode_compiler_options())

  def _step(self, weights, tokens, state, rng, inputs=None):
    """The model over `tokens` -> (the last position's logits, state)."""
    x = tokens if inputs is None else (inputs, tokens)
    out, state = self._model.pure_fn(x, weights, state, rng)
    out = out[0] if self._model.n_out > 1 else out
    return out[:, -1], state

  def _cast(self, weights):
    """Weights and the initial state (caches and other float state) in the
    compute dtype."""
    from training.trainer import cast_floats  # pylint: disable=g-import-not-at-top
    return (cast_floats(weights, self._dtype),
            cast_floats(self._initial_state, self._dtype))

  def _check(self, tokens, total, what):
    """Refuses a batch other than the sampler's and `total` positions beyond
    the predict-mode cache (`what` says how they add up)."""
    if tokens.shape[0] != self._batch_size:
      raise ValueError(f'prompt batch {tokens.shape[0]} != sampler batch '
                       f'{self._batch_size}; build the Sampler with that batch.')
    if self.max_length is not None and total > self.max_length:
      raise ValueError(
          f'{what} = {total} tokens exceeds the model\'s predict-mode cache '
          f'of {self.max_length} positions (its max_len); use fewer tokens '
          f'or build the model with a larger max_len.')

  def _generate_fn(self, weights, prompt, rng, n_new, temperature, top_k,
                   inputs=None):
    weights, state = self._cast(weights)
    rngs = jax.random.split(rng, n_new)
    logits, state = self._step(weights, prompt, state, rngs[0], inputs)
    first = choose_next(logits, rngs[0], temperature, top_k)

    def one_token(carry, rng_t):
      token, state = carry
      logits, state = self._step(weights, token[:, None], state, rng_t, inputs)
      nxt = choose_next(logits, rng_t, temperature, top_k)
      return (nxt, state), token

    (last, _), fed = jax.lax.scan(one_token, (first, state), rngs[1:])
    return jnp.concatenate([fed.T, last[:, None]], axis=1)

  def generate(self, weights, prompt, n_new, temperature=1.0, top_k=None, seed=0):
    """Continues `prompt` by `n_new` tokens.

    Args:
      weights: the model's weight tree (from training; same structure).
      prompt: (batch, prompt_length) int32, batch equal to batch_size.
      n_new: tokens to generate (prompt_length + n_new <= the model's max_len).
      temperature, top_k: see `choose_next`.
      seed: sampling seed.

    Returns:
      (batch, n_new) int32 numpy array of generated ids.
    """
    if self.two_inputs:
      raise ValueError('this is an encoder-decoder model (n_in 2); decode '
                       'targets from encoder inputs with Sampler.decode.')
    return self._run(weights, prompt, n_new, temperature, top_k, seed)

  def forced_logits(self, weights, tokens):
    """The logits of the decoding path fed `tokens` one position at a time.

    Runs the step `generate` runs (weights in their decoding forms and the
    compute dtype, one row per step) over the given tokens instead of the
    chosen ones, so two builds of the decoder (fusion on and off, say) can be
    compared logit by logit on the same sequence.

    Args:
      weights: the model's weight tree.
      tokens: (batch, length) int32, batch equal to batch_size.

    Returns:
      (batch, length, vocab) float32 numpy array; [:, t] scores the token
      after tokens[:, t].
    """
    if self.two_inputs:
      raise ValueError('forced_logits runs a decoder-only model (n_in 1).')
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
      raise ValueError(f'tokens must be (batch, length), not {tuple(tokens.shape)}.')
    self._check(tokens, tokens.shape[1], f'length {tokens.shape[1]}')
    weights = self._decoding_weights(match_structure(weights, self._template))
    return np.asarray(self._forced(weights, tokens))

  def _forced_fn(self, weights, tokens):
    weights, state = self._cast(weights)

    def one_token(state, token):
      logits, state = self._step(weights, token[:, None], state,
                                 jax.random.PRNGKey(0))
      return state, logits.astype(jnp.float32)
    return jnp.swapaxes(jax.lax.scan(one_token, state, tokens.T)[1], 0, 1)

  def decode(self, weights, inputs, n_new, temperature=0.0, top_k=None, seed=0,
             prompt=None, start_id=0):
    """Decodes target tokens of an encoder-decoder given its encoder inputs.

    Args:
      weights: the model's weight tree.
      inputs: (batch, input_len) int32 encoder inputs, 0-padded, input_len as
        given to the Sampler.
      n_new: target tokens to generate.
      temperature, top_k, seed: see `choose_next` (temperature 0: greedy).
      prompt: (batch, k) target tokens to force first, starting with
        start_id (default: [[start_id]] per row).
      start_id: the first decoder token (0, as the model's shift-right).

    Returns:
      (batch, n_new) int32 numpy array: the target tokens after the prompt.
    """
    if not self.two_inputs:
      raise ValueError('decode needs an encoder-decoder model (n_in 2); '
                       'continue a prompt with Sampler.generate.')
    inputs = jnp.asarray(inputs, jnp.int32)
    if inputs.shape != (self._batch_size, self._input_len):
      raise ValueError(f'inputs shape {tuple(inputs.shape)} != the sampler\'s '
                       f'({self._batch_size}, {self._input_len}); pad the '
                       'inputs or build the Sampler with that input_len.')
    if prompt is None:
      prompt = np.full((self._batch_size, 1), start_id, np.int32)
    return self._run(weights, prompt, n_new, temperature, top_k, seed, inputs)

  def _run(self, weights, prompt, n_new, temperature, top_k, seed, inputs=None):
    prompt = jnp.asarray(prompt, jnp.int32)
    if n_new < 1:
      raise ValueError(f'n_new must be at least 1, not {n_new}.')
    self._check(prompt, prompt.shape[1] + n_new,
                f'prompt length {prompt.shape[1]} + n_new {n_new}')
    weights = self._decoding_weights(match_structure(weights, self._template))
    out = self._generate(weights, prompt, jax.random.PRNGKey(seed), n_new,
                         temperature, top_k, inputs)
    return np.asarray(out)

  def _decoding_weights(self, weights):
    """`prepare_for_decoding` of `weights` with this model's marks, made
    once and reused while the same weight arrays come back."""
    if self._out_in is None and not self._forms:
      return weights
    leaves = jax.tree_util.tree_leaves(weights)
    if self._prepared is not None and all(
        ref() is leaf for ref, leaf in zip(self._prepared[0], leaves)):
      return self._prepared[1]
    tree = prepare_for_decoding(weights, self._out_in, self._forms,
                                self._make_forms)
    self._prepared = ([_weak(leaf) for leaf in leaves], tree)
    return tree
