"""Injected bugs in the W4A16 layouts that refinfer's own round trip cannot see (the writer and
the reader share them), each caught by tests/test_quantize_output_oracles.py's comparison with
the libraries' own unpacking (run by tests/test_mutants.py)."""

from __future__ import annotations

import numpy as np

import test_quantize_output_oracles as t
from refinfer.w4a16 import awq, gptq
from test_mutants import Mutant


def _awq_natural_nibble_order(monkeypatch):
    """AWQ GEMM packed and unpacked in natural order instead of [0, 2, 4, 6, 1, 3, 5, 7]
    (AutoAWQ issues #275, #566)."""
    monkeypatch.setattr(awq, "AWQ_ORDER", list(range(8)))
    monkeypatch.setattr(awq, "AWQ_REVERSE_ORDER", list(range(8)))


def _gptq_v1_stores_true_zeros(monkeypatch):
    """A v2 checkpoint (true zeros) written and read as v1, the "!!!!" mix-up of vLLM #26092."""
    monkeypatch.setattr(gptq, "stored_from_zeros", lambda zeros, bits, fmt: np.asarray(zeros, np.uint8))
    monkeypatch.setattr(gptq, "zeros_from_stored", lambda stored, bits, fmt, qlinear: stored.astype(np.int16))


def _check(name):
    def check(request):
        src = request.getfixturevalue("tiny_llama_f32")
        t.check_linears_unpack_to_refinfers_weights(*t.write_case(name, src, request.getfixturevalue("tmp_path")))
    return check


MUTANTS = [
    Mutant("w4a16_awq_natural_nibble_order", _awq_natural_nibble_order, _check("awq")),
    Mutant("w4a16_gptq_v1_with_true_zeros", _gptq_v1_stores_true_zeros, _check("gptq-3bit-sym")),
]
