"""Scaling Transformers (Terraformer) layers, built as Trax layers."""
