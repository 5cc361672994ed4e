"""refinfer: a readable reference inference engine for Llama-family models."""

__version__ = "0.1.0"


def load(path=None, backend="numpy", mode="ideal", **kw):
    """Load a model: a .gguf file or an HF safetensors directory (None: the default model)."""
    from .model import load as _load
    return _load(path, backend=backend, mode=mode, **kw)
