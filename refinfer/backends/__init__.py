"""Backends: the ops the forward pass calls, each with an output-first signature.

`numpy` is the reference and defines every op; accelerated backends implement what they can
and inherit the reference (with one visible warning) for the rest.
"""

from __future__ import annotations

import importlib.util

from ..errors import RefinferError

BACKENDS = ("numpy", "numba", "cuda")
MODES = ("ideal", "ggml")
# numba (a required dependency; numpy only in a broken install): in ideal mode the same results
# as the reference (logits NMSE <= 2e-12, measured 1.8e-13, tests/test_numba_backend.py), much
# faster; in ggml mode the same bits as the reference's emulation of llama.cpp
# (tests/test_numba_ggml_exact.py). ggml mode defaults to the reference.
DEFAULT_BACKEND = "numba" if importlib.util.find_spec("numba") is not None else "numpy"


def check_backend_name(name: str | None, mode: str = "ideal") -> str:
    """The backend that get_backend(name, mode) would make, checked without importing it."""
    if mode not in MODES:
        raise RefinferError(f"unknown numeric mode {mode!r}; choose one of {', '.join(MODES)}",
                            hint="--mode ideal computes the exact model; --mode ggml reproduces llama.cpp's "
                                 "CPU roundings (bit-exact on --backend numpy and numba)")
    if name is None:
        return DEFAULT_BACKEND if mode == "ideal" else "numpy"
    if name not in BACKENDS:
        raise RefinferError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}",
                            hint="--backend numpy is the reference, numba the fast CPU kernels, cuda an NVIDIA "
                                 "GPU; `python -m refinfer backends` shows what each covers")
    return name


def get_backend(name: str | None = None, mode: str = "ideal", **kw):
    name = check_backend_name(name, mode)
    if name == "numpy":
        from .numpy_backend import NumpyBackend
        return NumpyBackend(mode=mode, **kw)
    if name == "numba":
        from .numba_backend import NumbaBackend
        return NumbaBackend(mode=mode, **kw)
    from .cuda_backend import CudaBackend
    return CudaBackend(mode=mode, **kw)
