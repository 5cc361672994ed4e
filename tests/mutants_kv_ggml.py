"""Injected bugs in ggml mode's emulation of llama.cpp's quantized KV caches, each caught by
tests/test_kv_ggml_exact.py's checks (run by tests/test_mutants.py)."""

from __future__ import annotations

import numpy as np

import test_kv_ggml_exact as t
from refinfer.backends import ggml_emulation as ge
from refinfer.backends import numpy_backend as nb
from refinfer.kv_cache import attn_rotation
from test_mutants import Mutant


def _models(request):
    return t.make_kv_models(request.getfixturevalue("tmp_path_factory"), request.getfixturevalue("vocab_dir"))


def _expf_correctly_rounded(monkeypatch):
    """The flash-attention softmax's expf as a correctly rounded exp, not glibc's."""
    monkeypatch.setattr(ge, "expf_libm", lambda x: np.exp(np.asarray(x, np.float64)).astype(np.float32))


def _no_v_rotation(monkeypatch):
    """V stored unrotated (llama.cpp rotates a quantized V with a 64-point Hadamard transform)."""
    monkeypatch.setattr(nb, "attn_rotation", lambda k, v, hd: (attn_rotation(k, v, hd)[0], 0))


def _max_update_skips_the_sum(monkeypatch):
    """The online softmax forgets to rescale the running sum on a new maximum (S += vs, not S*ms + vs)."""
    real = ge.fma_f32

    def fma(a, b, c, out=None, work=None):
        if np.ndim(a) == 1 and out is None and work is None:         # the S update: [R] operands
            return (np.asarray(a, np.float32) + np.asarray(c, np.float32)).astype(np.float32)
        return real(a, b, c, out=out, work=work)
    monkeypatch.setattr(ge, "fma_f32", fma)


def _q4_1_dot_without_its_min(monkeypatch):
    """A q4_1 K dotted with Q quantized to q8_0, not q8_1: the m * s term of ggml_vec_dot_q4_1_q8_1 is lost."""
    monkeypatch.setitem(nb.VEC_DOT_TYPE, "q4_1", "q8_0")


def _hadamard_in_float64(monkeypatch):
    """ggml mode's Hadamard transform in float64 (ggml_compute_forward_fwht rounds every butterfly to float32)."""
    real = nb.NumpyBackend.hadamard

    def hadamard(self, x, n):
        mode, self.mode = self.mode, "ideal"
        try:
            real(self, x, n)
        finally:
            self.mode = mode
    monkeypatch.setattr(nb.NumpyBackend, "hadamard", hadamard)


MUTANTS = [
    Mutant("kv_ggml_expf_correctly_rounded", _expf_correctly_rounded, lambda request: t.check_expf()),
    Mutant("kv_ggml_no_v_rotation", _no_v_rotation, lambda request: t.check_prefill(_models(request), 64, "fa", "q8_0")),
    Mutant("kv_ggml_max_update_skips_the_sum", _max_update_skips_the_sum,
           lambda request: t.check_prefill(_models(request), 32, "fa", "q4_0")),
    Mutant("kv_ggml_q4_1_dot_without_its_min", _q4_1_dot_without_its_min,
           lambda request: t.check_prefill(_models(request), 32, "mulmat", "q4_1")),
    Mutant("kv_ggml_hadamard_in_float64", _hadamard_in_float64,
           lambda request: t.check_rotations_equal_llama_cpp(_models(request))),
]
