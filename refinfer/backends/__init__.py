"""Backends: the ops the forward pass calls, each with an output-first signature.

`numpy` is the reference and defines every op; accelerated backends implement what they can
and inherit the reference (with one visible warning) for the rest.
"""

from __future__ import annotations

import importlib.util

from ..errors import RefinferError

BACKENDS = ("numpy", "numba", "cuda")
MODES = ("ideal", "ggml")
# numba when it is installed: in ideal mode the same results as the reference (logits NMSE
# <= 1e-10, tests/test_numba_backend.py), much faster. ggml mode defaults to the reference,
# which reproduces llama.cpp's SIMD summation order that the numba kernels only approximate.
DEFAULT_BACKEND = "numba" if importlib.util.find_spec("numba") is not None else "numpy"


def get_backend(name: str | None = None, mode: str = "ideal", **kw):
    if name is None:
        name = DEFAULT_BACKEND if mode == "ideal" else "numpy"
    if mode not in MODES:
        raise RefinferError(f"unknown numeric mode {mode!r}; choose one of {', '.join(MODES)}")
    if name == "numpy":
        from .numpy_backend import NumpyBackend
        return NumpyBackend(mode=mode, **kw)
    if name == "numba":
        from .numba_backend import NumbaBackend
        return NumbaBackend(mode=mode, **kw)
    if name == "cuda":
        from .cuda_backend import CudaBackend
        return CudaBackend(mode=mode, **kw)
    raise RefinferError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
