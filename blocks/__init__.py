"""Feed-forward and stacking blocks for DecoderLM and its relatives.

  switch.SwitchFF:         Switch Transformer top-1 mixture-of-experts FF.
  sharing.SharedDecoderLM: ALBERT-style cross-layer weight sharing.
"""
