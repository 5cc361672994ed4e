"""Injected bugs in the backends' attention over quantized KV caches, each caught by
tests/test_kv_backends.py's own checks (run by tests/test_mutants.py). The numba kernels are
compiled, so the bugs go in at the Python level they are dispatched from."""

from __future__ import annotations

import numpy as np

import test_kv_backends as t
from refinfer.backends import numba_backend
from refinfer.backends.numba_kernels import ops as ok
from test_mutants import Mutant


def _calibrated_heads_swapped(monkeypatch):
    """int8-calibrated's per-head (scale, zp) handed to the kernel in the wrong head order."""
    real = numba_backend.row_params
    monkeypatch.setattr(numba_backend, "row_params", lambda ct, n_kv: None if real(ct, n_kv) is None
                        else np.ascontiguousarray(real(ct, n_kv)[:, ::-1]))


def _q4_0_read_as_q4_1(monkeypatch):
    """The kind table maps q4_0 to q4_1's decoder (bytes 2..3 read as a min, the codes shifted)."""
    monkeypatch.setitem(ok.KV_KINDS, "q4_0", ok.KV_KINDS["q4_1"])


def _float32_prefill(monkeypatch):
    """A step of several tokens through a float32 BLAS shortcut: not batch-invariant."""
    real = numba_backend.NumbaBackend.attention

    def attention(self, out, q, pool, layer, meta):
        if len(q) == 1:
            return real(self, out, q, pool, layer, meta)
        t.float32_batch_attention(self, out, q, pool, layer, meta)
    monkeypatch.setattr(numba_backend.NumbaBackend, "attention", attention)


MUTANTS = [
    Mutant("kv_backends_calibrated_heads_swapped", _calibrated_heads_swapped,
           lambda request: t.check_numba_type("int8-calibrated")),
    Mutant("kv_backends_q4_0_read_as_q4_1", _q4_0_read_as_q4_1, lambda request: t.check_numba_type("q4_0")),
    Mutant("kv_backends_float32_prefill", _float32_prefill, lambda request: t.check_invariance(
        numba_backend.NumbaBackend(), "lmdeploy-int8")),
]
