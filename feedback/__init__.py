"""Feedback Transformer (Fan et al. 2020, arXiv 2002.09402) as a Trax layer."""
