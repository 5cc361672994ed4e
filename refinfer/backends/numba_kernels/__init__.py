"""Numba CPU kernels of the `numba` backend: quantized matmuls (matmul.py) and the small
per-token ops (ops.py). Element decoding comes from ..blockdecode, shared with other backends."""
