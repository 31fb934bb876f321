"""Primer (So et al., arXiv 2109.08668): squared ReLU and multi-DConv-head attention."""
