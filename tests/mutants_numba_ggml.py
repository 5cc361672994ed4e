"""Injected bugs in the numba backend's ggml mode, each caught by tests/test_numba_ggml_exact.py's
own checks (run by tests/test_mutants.py)."""

from __future__ import annotations

import test_numba_ggml_exact as t
from test_mutants import Mutant

MUTANTS = [
    # RoPE rotates with a multiply and an add where ggml's compiled loop has an FMA
    Mutant("numba_ggml_rope_without_fma", t.rope_without_fma,
           lambda request: t.check_activation_op("rope")),
    # one output of the q8 matmul one ulp off: the whole-model logits see it
    Mutant("numba_ggml_matmul_one_ulp", t.matmul_one_ulp_off,
           lambda request: t.check_model_bits(t.FIXTURES_DIR / "tiny-llama-q4_1.gguf", 3, 0)),
]
