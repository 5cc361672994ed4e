"""Injected bugs in the integer-group weight type and its kernels, each caught by
tests/test_intgroup_backends.py's own checks (run by tests/test_mutants.py)."""

from __future__ import annotations

import numpy as np

import test_intgroup_backends as t
from refinfer.backends.numba_kernels import intgroup as ik
from refinfer.quant import intgroup
from test_mutants import Mutant

ACT_ORDER_SHAPE = (21, 96, 96, 3, True)


def _no_fp16_rounding(monkeypatch):
    """scale * (q - zero) kept in float32: the "exact" weights passed off as the deployed ones."""
    monkeypatch.setattr(intgroup, "round_to", lambda x, rounding: np.asarray(x, np.float32))


def _float32_accumulation(monkeypatch):
    """The numba kernel summing in float32 (a BLAS product over the batch) instead of float64
    in column order."""
    def matmul_table(out, x, codes_r, table_r, g_idx):
        nblk, K, R = codes_r.shape
        b, k, r = np.meshgrid(np.arange(nblk), np.arange(K), np.arange(R), indexing="ij")
        w = table_r[b, g_idx[k], codes_r, r].transpose(0, 2, 1).reshape(nblk * R, K)[: out.shape[1]]
        out[...] = x @ w.T
    monkeypatch.setattr(ik, "matmul_table", matmul_table)


def _table_zero_off_by_one(monkeypatch):
    """The kernels' tables built with zero + 1 (the GPTQ v1 convention applied twice)."""
    real = intgroup.IntGroupTensor.table

    def table(self):
        return real(intgroup.IntGroupTensor(self.name, self.codes, self.scales, (self.zeros + 1).astype(np.int16),
                                            self.g_idx, self.bits, self.rounding))
    monkeypatch.setattr(intgroup.IntGroupTensor, "table", table)


def _numba():
    from refinfer.backends import get_backend
    return get_backend("numba")


MUTANTS = [
    Mutant("intg_fp16_rounding_dropped", _no_fp16_rounding,
           lambda request: t.check_dequantize_is_torchs(ACT_ORDER_SHAPE)),
    Mutant("intg_numba_float32_accumulation", _float32_accumulation,
           lambda request: t.check_matmul_equals_reference(_numba(), (24, 128, 64, 4, True))),
    Mutant("intg_table_zero_off_by_one", _table_zero_off_by_one,
           lambda request: t.check_matmul_equals_reference(_numba(), ACT_ORDER_SHAPE)),
]
