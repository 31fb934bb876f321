"""The fused decoding blocks lower for a GPU: Pallas's Triton lowering runs here.

Interpreted runs (the other fused-decoding tests) cannot see Triton's rules
(e.g. every array a kernel loads has a power-of-2 size).  Exporting a
predict step for CUDA lowers each Pallas kernel to Triton on this CPU, so
these tests catch a kernel that would fail to compile on the GPU, and
count the Triton kernels a one-token step runs.
"""
import jax
from jax import export
import numpy as np
import pytest
from trax import shapes

from terraformer import models
from terraformer import sparse_ff
from terraformer import sparse_qkv
from training import model as model_lib
from training import sampling


def _triton_calls(monkeypatch, d_model, n_heads, d_ff=None, **mix):
  """Triton kernels in a one-token predict step exported for CUDA."""
  monkeypatch.setattr(model_lib, 'FUSED_DECODING_GPU', True)
  monkeypatch.setattr(sparse_ff, 'FUSED_DECODING_GPU', True)
  monkeypatch.setattr(sparse_qkv, 'FUSED_DECODING_GPU', True)
  cfg = dict(vocab_size=64, d_model=d_model, d_ff=d_ff or 4 * d_model, n_layers=1,
             n_heads=n_heads, max_len=32, **mix)
  eval_model = models.TerraformerLM(mode='eval', **cfg)
  eval_model.init(shapes.ShapeDtype((1, 4), np.int32))
  model = models.TerraformerLM(mode='predict', **cfg)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  sampler = sampling.Sampler(model)
  weights = sampler._decoding_weights(eval_model.weights)
  step = jax.jit(lambda x, w, s: model.pure_fn(x, w, s, jax.random.PRNGKey(0)))
  exported = export.export(
      step, platforms=['cuda'],
      disabled_checks=[export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')])(
          np.zeros((1, 1), np.int32), weights, sampler._initial_state)
  return exported.mlir_module().count('__gpu$xla.gpu.triton')


@pytest.mark.parametrize('mix,kernels', [
    ({}, 5),                        # QKV, attention, output; two feed-forward
    (dict(ff_sparsity=8), 5),       # dense attention 3; SparseFF 2
    (dict(attention_sparsity=4), 5),  # sparse attention 3; feed-forward 2
    (dict(attention_sparsity=4, share_qk=True), 5),
    (dict(attention_sparsity=4, ff_sparsity=8), 5),
])
def test_fused_blocks_lower_to_triton(mix, kernels, monkeypatch):
  assert _triton_calls(monkeypatch, 64, 4, **mix) == kernels


def test_widths_triton_cannot_load_whole_fall_back_to_xla(monkeypatch):
  """d_model 48 (no power of 2): the fused blocks decline and the step
  lowers with XLA's kernels only (the LayerNorm's row does not fit)."""
  assert _triton_calls(monkeypatch, 48, 4) == 0


def test_sparse_blocks_lower_with_factored_dense_in_parts(monkeypatch):
  """d_model 128: the FactoredDense kernel writes two parts of m (blocks of
  64 inputs), which the convolution and attention kernels sum as they read."""
  assert _triton_calls(monkeypatch, 128, 4, attention_sparsity=4,
                       ff_sparsity=8) == 5


def test_sparse_ff_kernel_lowers_with_its_controller_in_pieces(monkeypatch):
  """d_ff 384 in blocks of 8: the controller's width 48 is read as pieces
  of 32 and 16 (no padding)."""
  assert _triton_calls(monkeypatch, 64, 4, d_ff=384, ff_sparsity=8) == 5


@pytest.mark.parametrize('mix', [
    dict(attention_sparsity=16), dict(attention_sparsity=16, share_qk=True)])
def test_sparse_attention_with_16_modules_lowers_to_three_kernels(mix, monkeypatch):
  """16 modules of 16 (d_model 256): the attention's three kernels, the
  feed-forward's two."""
  assert _triton_calls(monkeypatch, 256, 16, **mix) == 5
