"""Primer (So et al., arXiv 2109.08668) and the ablation lab.

layers:   squared ReLU and the causal depthwise convolution of multi-DConv-head attention.
variants: the single-change layers (RMSNorm, token shift, GLU feed-forwards,
          ReZero, shared-QK attention).
models:   PrimerLM (EZ / full) and VariantLM with the named VARIANTS.
lab:      python -m primer_trax.lab, the sweep and its report.
"""
