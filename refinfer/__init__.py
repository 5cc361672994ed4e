"""refinfer: a readable reference inference engine for Llama-family models."""

import os as _os

__version__ = "0.1.0"

# Two thread pools share the cores in a prefill: OpenBLAS's (the tile matmuls) and Numba's
# (every other op). Each keeps its idle threads spinning after a call, OpenBLAS for about
# 2^28 cycles and libgomp (Numba's OpenMP layer) for 300k iterations, so on a 2-core machine
# each pool's next call waited for a time slice: a 512-token prefill of SmolLM2 on 2 threads
# ran at about 200 tok/s, and at about 590 with short spins. Both libraries read these when
# they load (numpy's import, Numba's first parallel kernel); values already set are kept.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")   # 2^4 cycles
_os.environ.setdefault("GOMP_SPINCOUNT", "5000")


def load(path=None, backend=None, mode="ideal", **kw):
    """Load a model: a .gguf file or an HF safetensors directory (None: the default model).
    backend None: numba in ideal mode when it is installed, else the NumPy reference (as the
    command line)."""
    from .model import load as _load
    return _load(path, backend=backend, mode=mode, **kw)


def __getattr__(name):
    # refinfer.Engine and refinfer.GenerationResult without importing numpy at `import refinfer`
    if name == "Engine":
        from .engine import Engine
        return Engine
    if name == "GenerationResult":
        from .generation import GenerationResult
        return GenerationResult
    raise AttributeError(f"module 'refinfer' has no attribute {name!r}")
