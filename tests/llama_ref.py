"""llama.cpp as the oracle for whole-model numbers: teacher-forced logits under its default
settings and under the variants that define its own noise floor (refinfer.llama_oracle)."""

from __future__ import annotations

import numpy as np
import pytest

VARIANTS = ("default", "single_token", "flash_attn", "kv_f32")


def llama_logits(path, tokens, variant="default", n_ctx=None) -> np.ndarray:
    """float32[len(tokens), vocab] teacher-forced logits from llama.cpp."""
    pytest.importorskip("llama_cpp")
    from refinfer.llama_oracle import llama_logits as _logits
    return _logits(path, tokens, variant, n_ctx=n_ctx)


def noise_floor(path, tokens):
    """(default logits, {variant: compare_logits vs the default, 'worst': ...})."""
    pytest.importorskip("llama_cpp")
    from refinfer.llama_oracle import noise_floor as _floor
    return _floor(path, tokens)
