"""llama.cpp as the oracle for whole-model numbers: teacher-forced logits under its default
settings and under the variants that define its own noise floor."""

from __future__ import annotations

import numpy as np
import pytest

from refinfer.metrics import compare_logits

# llama.cpp's own settings that change its results (all are legitimate llama.cpp outputs)
VARIANTS = {
    "default": {},                                  # batch prefill, F16 KV cache, no flash attention
    "single_token": {"n_batch": 1, "n_ubatch": 1},  # one token per decode call
    "flash_attn": {"flash_attn": True},
    "kv_f32": {"type_k": 0, "type_v": 0},           # GGML_TYPE_F32 KV cache
}


def llama_logits(path, tokens, variant="default", n_ctx=None) -> np.ndarray:
    """float32[len(tokens), vocab] teacher-forced logits from llama.cpp."""
    llama_cpp = pytest.importorskip("llama_cpp")
    kw = dict(n_ctx=n_ctx or max(64, len(tokens)), logits_all=True, verbose=False, n_threads=2, seed=0)
    kw.update(VARIANTS[variant])
    llm = llama_cpp.Llama(model_path=str(path), **kw)
    try:
        llm.reset()
        llm.eval(list(tokens))
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


def noise_floor(path, tokens) -> dict:
    """compare_logits of every non-default variant against llama.cpp's default, plus 'worst':
    the largest nmse/kld and the smallest same_top among them."""
    base = llama_logits(path, tokens)
    out = {v: compare_logits(llama_logits(path, tokens, v), base) for v in VARIANTS if v != "default"}
    out["worst"] = {"nmse": max(r["nmse"] for r in out.values()),
                    "kld_mean": max(r["kld_mean"] for r in out.values()),
                    "same_top": min(r["same_top"] for r in out.values())}
    return base, out
