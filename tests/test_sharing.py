"""ALBERT-style cross-layer sharing (blocks.sharing) and the lab's relatives' variants.

  n_groups = 1:  x_l = B(x_{l-1}; W) for l = 1..L (one block's weights)
  n_groups = G:  layer l uses W_{floor(l G / L)}
  separate_norms: layer l uses its own norm weights, the shared W otherwise
"""
import functools

import jax
from jax import numpy as jnp
import numpy as np
import pytest
from trax import layers as tl
from trax import shapes

from blocks import sharing
from blocks import switch
from primer_trax import models as M
from training import model as model_lib
from training import trainer as T

RNG = jax.random.PRNGKey(0)
SIZE = dict(d_model=16, d_ff=32, n_layers=4, n_heads=2, max_len=16)
IDS = jax.random.randint(jax.random.PRNGKey(1), (2, 6), 0, 30)


def _model(mode='eval', **kw):
  model = sharing.SharedDecoderLM(30, mode=mode, **dict(SIZE, **kw))
  if mode != 'predict':
    model.init(shapes.signature(IDS), rng=RNG)
  return model


def _block_params():
  block = model_lib.DecoderBlock(16, 32, 2, max_len=16)
  return sum(T.count_params(l.init(shapes.ShapeDtype((2, 6, 16)))[0]) for l in block)


def test_parameter_counts():
  """Baseline minus (L - G) blocks; separate norms add back L - G blocks' norms."""
  base = model_lib.DecoderLM(30, mode='eval', **SIZE)
  base.init(shapes.signature(IDS))
  n_base, block = T.count_params(base.weights), _block_params()
  norms = 2 * 2 * 16  # two LayerNorms (scale, bias) per block
  assert n_base == 4 * block + (n_base - 4 * block)
  assert T.count_params(_model().weights) == n_base - 3 * block
  assert T.count_params(_model(n_groups=2).weights) == n_base - 2 * block
  assert T.count_params(_model(separate_norms=True).weights) == n_base - 3 * block + 3 * norms
  assert T.count_params(_model(n_groups=4).weights) == n_base
  # Same computation per token as the unshared model.
  assert T.train_flops_per_token(_model(), 6) == T.train_flops_per_token(base, 6)


def _apply_by_hand(model, block_weights):
  """Embedding, positions, one fresh block applied with block_weights[l], norm, Dense."""
  emb, pos, _, norm, dense = model.sublayers
  w_emb, w_pos, _, w_norm, w_dense = model.weights
  x = emb(IDS, weights=w_emb)
  x = pos(x, weights=w_pos)
  block = model_lib.DecoderBlock(16, 32, 2, max_len=16, mode='eval')
  block = tl.Serial(*block)
  block.init(shapes.signature(x))
  for w in block_weights:
    x = block(x, weights=w)
  return dense(norm(x, weights=w_norm), weights=w_dense)


def test_shared_model_equals_one_block_applied_n_times():
  model = _model()
  shared = model.sublayers[2]
  w = shared.block_weights(0)
  for layer in range(4):  # every layer runs with the same tree
    for a, b in zip(jax.tree_util.tree_leaves(shared.block_weights(layer)),
                    jax.tree_util.tree_leaves(w)):
      assert a is b
  np.testing.assert_allclose(model(IDS), _apply_by_hand(model, [w] * 4), atol=1e-5)
  # ... and not the same as applying it fewer times.
  assert np.abs(model(IDS) - _apply_by_hand(model, [w] * 3)).max() > 1e-3


def test_groups_and_separate_norms_use_the_right_weights():
  grouped = _model(n_groups=2)
  shared = grouped.sublayers[2]
  assert [shared.group(l) for l in range(4)] == [0, 0, 1, 1]
  w0, w1 = shared.block_weights(0), shared.block_weights(2)
  assert np.abs(jax.tree_util.tree_leaves(w0)[2] - jax.tree_util.tree_leaves(w1)[2]).max() > 0
  np.testing.assert_allclose(grouped(IDS), _apply_by_hand(grouped, [w0, w0, w1, w1]),
                             atol=1e-5)
  model = _model(separate_norms=True)
  shared = model.sublayers[2]
  groups, norms = model.weights[2]
  assert len(groups) == 1 and len(norms) == 4 and len(norms[0]) == 4  # 2 x (scale, bias)
  # Give every layer its own norm scale: layer l scales by (l + 1).
  norms = tuple(tuple(jnp.full_like(w, l + 1.0) for w in n) for l, n in enumerate(norms))
  weights = list(model.weights)
  weights[2] = (groups, norms)
  model.weights = tuple(weights)
  trees = [shared.block_weights(l) for l in range(4)]
  mask = sharing.norm_mask(shared.sublayers[0])
  for l, tree in enumerate(trees):
    leaves = jax.tree_util.tree_leaves(tree)
    assert all(float(w.ravel()[0]) == l + 1.0 for w, m in zip(leaves, mask) if m)
    shared_leaves = [w for w, m in zip(leaves, mask) if not m]
    assert len(shared_leaves) == len(groups[0])
    assert all(a is b for a, b in zip(shared_leaves, groups[0]))
  np.testing.assert_allclose(model(IDS), _apply_by_hand(model, trees), atol=1e-5)


def test_predict_equals_eval_and_switch_state_per_layer():
  """Per-layer caches: token-by-token decoding equals eval; each layer keeps its aux loss."""
  model = _model()
  want = model(IDS)
  pred = _model('predict')
  pred.init(shapes.ShapeDtype((2, 1), np.int32))
  state, outs = pred.state, []
  for t in range(6):
    out, state = pred.pure_fn(IDS[:, t:t + 1], model.weights, state, RNG)
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, 1), want, atol=1e-5)
  ff = functools.partial(switch.SwitchFF, n_experts=2)
  moe = _model(ff_layer=ff)
  assert len(T.aux_losses(moe.state)) == 4
  _, state = moe.pure_fn(IDS, moe.weights, moe.state, RNG)
  aux = [float(a) for a in T.aux_losses(state)]
  assert all(a > 0 for a in aux) and len(set(aux)) == 4  # each layer's own routing


def test_bad_groups_fail_at_build_time():
  with pytest.raises(ValueError, match=r'n_groups \(3\) must be a positive integer '
                                       r'that divides n_layers \(4\)'):
    sharing.SharedDecoderLM(30, n_groups=3, **SIZE)
  with pytest.raises(ValueError, match='n_groups'):
    sharing.SharedDecoderLM(30, n_groups=0, **SIZE)


def test_lab_variants_of_the_relatives():
  """switch_N: N experts of width d_ff (same FLOPs); shared; mixer and gmlp get the size."""
  size = dict(SIZE, n_layers=2)
  def build(name):
    model = M.VariantLM(30, name, mode='eval', **size)
    model.init(shapes.signature(IDS), rng=RNG)
    return model
  base = build('baseline')
  n_base, flops = T.count_params(base.weights), T.train_flops_per_token(base, 6)
  ff = 16 * 32 + 32 + 32 * 16 + 16
  for n in (2, 4):
    model = build(f'switch_{n}')
    assert f'SwitchFF_e{n}' in str(model)
    assert T.count_params(model.weights) == n_base + 2 * ((n - 1) * ff + 16 * n)
    assert T.train_flops_per_token(model, 6) == flops + 6 * 2 * 16 * n  # + router
  assert T.count_params(build('shared').weights) == n_base - _block_params()
  for name in ('mixer', 'gmlp'):
    model = build(name)
    assert 'CausalDotProductAttention' not in str(model)
    assert model(IDS).shape == (2, 6, 30)
  assert M.VARIANTS['switch_2'].matched == 'flops'
  assert M.VARIANTS['mixer'].matched == 'size'
