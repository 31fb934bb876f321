"""Layers and models around DecoderLM: the Transformer's relatives.

  switch.SwitchFF:         Switch Transformer top-1 mixture-of-experts FF
                           (DecoderLM's ff_layer switch).
  sharing.SharedDecoderLM: ALBERT-style cross-layer weight sharing.
  mixing.MixerLM, mixing.GatedMLPLM: attention-free causal MLP-Mixer and gMLP.
"""
