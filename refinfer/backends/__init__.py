"""Backends: the ops the forward pass calls, each with an output-first signature.

`numpy` is the reference and defines every op; accelerated backends implement what they can
and inherit the reference (with one visible warning) for the rest.
"""

from __future__ import annotations

import importlib.util
import warnings

from ..errors import RefinferError

BACKENDS = ("numpy", "numba", "cuda")
MODES = ("ideal", "ggml")
# numba (a required dependency; numpy only in a broken install): in ideal mode the same results
# as the reference (logits NMSE <= 2e-12, measured 1.8e-13, tests/test_numba_backend.py), much
# faster. ggml mode defaults to the reference, which reproduces llama.cpp's SIMD summation
# order that the numba kernels only approximate.
DEFAULT_BACKEND = "numba" if importlib.util.find_spec("numba") is not None else "numpy"


class InexactModeWarning(UserWarning):
    """A backend asked for ggml mode that does not reproduce llama.cpp's bits."""


# ggml mode on numba: the kernels round like ggml but sum in another order. On SmolLM2 Q4_1 and
# a 16-token prompt, `dump --mode ggml --backend numba` then `compare --llama-cpp` differs from
# Qcur-0 on (NMSE 8e-15) and ends at a logit NMSE of 1.4e-3; over a text its KLD against
# llama.cpp is 2.3e-3, where ggml mode on numpy gives 0.
_INEXACT = {("numba", "ggml"): "ggml mode on the numba backend is not llama.cpp-exact: its kernels sum in "
                                "another order (on SmolLM2 its logits differ from llama.cpp's by NMSE 1.4e-3); "
                                "use --backend numpy for llama.cpp's bits"}


def check_backend_name(name: str | None, mode: str = "ideal") -> str:
    """The backend that get_backend(name, mode) would make, checked without importing it."""
    if mode not in MODES:
        raise RefinferError(f"unknown numeric mode {mode!r}; choose one of {', '.join(MODES)}",
                            hint="--mode ideal computes the exact model; --mode ggml reproduces llama.cpp's "
                                 "CPU roundings (bit-exact on --backend numpy)")
    if name is None:
        return DEFAULT_BACKEND if mode == "ideal" else "numpy"
    if name not in BACKENDS:
        raise RefinferError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}",
                            hint="--backend numpy is the reference, numba the fast CPU kernels, cuda an NVIDIA "
                                 "GPU; `python -m refinfer backends` shows what each covers")
    return name


def get_backend(name: str | None = None, mode: str = "ideal", **kw):
    name = check_backend_name(name, mode)
    if (name, mode) in _INEXACT:
        warnings.warn(_INEXACT[name, mode], InexactModeWarning, stacklevel=2)
    if name == "numpy":
        from .numpy_backend import NumpyBackend
        return NumpyBackend(mode=mode, **kw)
    if name == "numba":
        from .numba_backend import NumbaBackend
        return NumbaBackend(mode=mode, **kw)
    from .cuda_backend import CudaBackend
    return CudaBackend(mode=mode, **kw)
