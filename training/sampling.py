"""Autoregressive sampling in 'predict' mode, with the whole loop on the device.

The prompt goes through the model in one call (filling the attention caches),
then a `lax.scan` runs one jitted model step per new token and samples on the
device: no host round trip per token.  Works for any model that follows the
project's convention `model_fn(vocab_size=..., mode='predict')` and keeps its
decoding state in layer state.
"""

import functools

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


class Sampler:
  """Generates continuations of prompts with a predict-mode model.

  Args:
    predict_model: the model built with mode='predict' (not yet initialised).
    batch_size: number of sequences decoded together.
    compute_dtype: dtype the float weights are cast to (None keeps them).
  """

  def __init__(self, predict_model, batch_size=1, compute_dtype=None):
    from trax import shapes  # pylint: disable=g-import-not-at-top
    self._model = predict_model
    self._model.init(shapes.ShapeDtype((batch_size, 1), np.int32))
    self._initial_state = self._model.state
    self._dtype = compute_dtype
    self._batch_size = batch_size
    self.max_length = max_length(predict_model)

  @functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
  def _generate(self, weights, prompt, rng, n_new, temperature, top_k):
    from training.trainer import cast_floats  # pylint: disable=g-import-not-at-top
    weights = cast_floats(weights, self._dtype)
    model = self._model
    rngs = jax.random.split(rng, n_new)
    # Caches and other float state compute in the weights' dtype too.
    state = cast_floats(self._initial_state, self._dtype)
    logits, state = model.pure_fn(prompt, weights, state, rngs[0])
    first = choose_next(logits[:, -1], rngs[0], temperature, top_k)

    def one_token(carry, rng_t):
      token, state = carry
      logits, state = model.pure_fn(token[:, None], weights, state, rng_t)
      nxt = choose_next(logits[:, -1], rng_t, temperature, top_k)
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
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.shape[0] != self._batch_size:
      raise ValueError(f'prompt batch {prompt.shape[0]} != sampler batch '
                       f'{self._batch_size}; build the Sampler with that batch.')
    if n_new < 1:
      raise ValueError(f'n_new must be at least 1, not {n_new}.')
    total = prompt.shape[1] + n_new
    if self.max_length is not None and total > self.max_length:
      raise ValueError(
          f'prompt length {prompt.shape[1]} + n_new {n_new} = {total} tokens '
          f'exceeds the model\'s predict-mode cache of {self.max_length} '
          f'positions (its max_len); generate fewer tokens or build the '
          f'model with a larger max_len.')
    out = self._generate(weights, prompt, jax.random.PRNGKey(seed), n_new,
                         temperature, top_k)
    return np.asarray(out)

