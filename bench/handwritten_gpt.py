"""A hand-written pure-JAX GPT and training step: the benchmark's reference.

Same shape and matmul FLOPs as `training.model.DecoderLM`: learned token and
position embeddings, n_layers pre-norm blocks (LayerNorm -> fused QKV ->
causal attention -> output projection; LayerNorm -> Dense(d_ff) -> GeLU ->
Dense(d_model)), a final LayerNorm and an untied Dense(vocab) head.  Dense
layers have biases, like trax's.

Parameters and Adam moments are float32; the loss casts the parameters to the
compute dtype, runs the model, and computes a float32 log-softmax loss.  One
`jax.jit` holds forward, backward and the Adam update, with the state donated.
"""

import functools

import jax
from jax import numpy as jnp


def _dense_init(key, n_in, n_out):
  w = jax.random.normal(key, (n_in, n_out), jnp.float32) * (n_in ** -0.5)
  return {'w': w, 'b': jnp.zeros((n_out,), jnp.float32)}


def _norm_init(d):
  return {'scale': jnp.ones((d,), jnp.float32), 'bias': jnp.zeros((d,), jnp.float32)}


def init_params(key, vocab, d_model, d_ff, n_layers, seq_len):
  """Returns the float32 parameter tree."""
  keys = iter(jax.random.split(key, 4 * n_layers + 3))
  blocks = []
  for _ in range(n_layers):
    blocks.append({
        'ln1': _norm_init(d_model),
        'qkv': _dense_init(next(keys), d_model, 3 * d_model),
        'proj': _dense_init(next(keys), d_model, d_model),
        'ln2': _norm_init(d_model),
        'ff1': _dense_init(next(keys), d_model, d_ff),
        'ff2': _dense_init(next(keys), d_ff, d_model),
    })
  return {
      'embed': jax.random.normal(next(keys), (vocab, d_model), jnp.float32),
      'pos': 0.02 * jax.random.normal(next(keys), (seq_len, d_model), jnp.float32),
      'blocks': blocks,
      'ln_f': _norm_init(d_model),
      'head': _dense_init(next(keys), d_model, vocab),
  }


def _layer_norm(p, x, eps=1e-6):
  """float32 statistics, output in x's dtype."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  return (y * p['scale'].astype(jnp.float32)
          + p['bias'].astype(jnp.float32)).astype(x.dtype)


def _dense(p, x):
  return x @ p['w'] + p['b']


ACTIVATIONS = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'relu2': lambda x: jnp.square(jax.nn.relu(x)),
}


def forward(params, ids, n_heads, activation='gelu'):
  """ids (batch, seq) int32 -> logits (batch, seq, vocab) in the params' dtype."""
  b, t = ids.shape
  x = params['embed'][ids] + params['pos'][:t]
  impl = ('cudnn' if jax.default_backend() == 'gpu'
          and x.dtype in (jnp.bfloat16, jnp.float16) else 'xla')
  for blk in params['blocks']:
    qkv = _dense(blk['qkv'], _layer_norm(blk['ln1'], x))
    qkv = qkv.reshape(b, t, 3, n_heads, -1)
    att = jax.nn.dot_product_attention(
        qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True,
        implementation=impl)
    x = x + _dense(blk['proj'], att.reshape(b, t, -1))
    h = ACTIVATIONS[activation](_dense(blk['ff1'], _layer_norm(blk['ln2'], x)))
    x = x + _dense(blk['ff2'], h)
  return _dense(params['head'], _layer_norm(params['ln_f'], x))


def loss_fn(params, batch, n_heads, compute_dtype, activation='gelu'):
  inputs, targets, weights = batch
  params = jax.tree_util.tree_map(lambda p: p.astype(compute_dtype), params)
  logits = forward(params, inputs, n_heads, activation).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def init_state(params):
  """(params, m, v): Adam moments start at zero."""
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  return params, zeros, jax.tree_util.tree_map(jnp.zeros_like, params)


def make_train_step(n_heads, compute_dtype=jnp.bfloat16, lr=3e-4, b1=0.9,
                    b2=0.999, eps=1e-5, weight_decay=1e-5, activation='gelu'):
  """Returns jitted `step(state, step_index, batch) -> (state, loss)`.

  Adam with bias correction and multiplicative weight decay (the same update
  as trax.optimizers.Adam's defaults); `state` is donated.
  """
  grad_fn = jax.value_and_grad(
      functools.partial(loss_fn, n_heads=n_heads, compute_dtype=compute_dtype,
                        activation=activation))

  def step(state, i, batch):
    params, m, v = state
    loss, grads = grad_fn(params, batch)
    t = jnp.asarray(i, jnp.float32) + 1.0
    c1, c2 = 1.0 - b1 ** t, 1.0 - b2 ** t
    m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
    v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
    params = jax.tree_util.tree_map(
        lambda p, m, v: (1 - weight_decay) * p
        - lr * (m / c1) / (jnp.sqrt(v / c2) + eps), params, m, v)
    return (params, m, v), loss

  return jax.jit(step, donate_argnums=(0,))


def matmul_params(vocab, d_model, d_ff, n_layers):
  """Weights in matmuls (no embeddings, positions, biases or norms)."""
  return n_layers * (4 * d_model * d_model + 2 * d_model * d_ff) + d_model * vocab
