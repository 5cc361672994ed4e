"""`ggml` numeric mode: each quantized matmul equals ggml's own CPU result (the activation
quantizer and vec_dot that MUL_MAT uses, called through ctypes) to relative error <= 1e-6,
measured as max|ours - ggml| / max|ggml|. Only float32 summation order differs."""

from __future__ import annotations

import numpy as np
import pytest

from oracle import ggml_cpu
from refinfer.backends.numpy_backend import NumpyBackend
from refinfer.weights import QTensor
from refinfer import quant

TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "f16", "bf16", "f32", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K"]
REL_TOL = 1e-6


def _inputs(seed, rows=37, n=512, T=3):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, n)).astype(np.float32) * 0.05
    x = rng.standard_normal((T, n)).astype(np.float32)
    x[:, rng.choice(n, 4, replace=False)] *= 30.0  # outlier channels, as in real activations
    return w, x


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_ggml_mode_matmul_equals_ggml_cpu(ggml, name, seed):
    w, x = _inputs(seed)
    raw = ggml.quantize(w, name)                      # the weights as llama.cpp stores them
    wt = QTensor("w", raw, quant.get_type(name), w.shape)
    expected = ggml_cpu().matmul(x, raw, name)         # [T, rows]
    out = np.empty_like(expected)
    NumpyBackend(mode="ggml").matmul(out, x, wt)
    rel = np.max(np.abs(out - expected)) / np.max(np.abs(expected))
    assert rel <= REL_TOL, f"{name}: relative error {rel:.3g} > {REL_TOL}"


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q8_0", "q4_K"])
def test_ideal_mode_differs_from_ggml_by_activation_quantization(ggml, name):
    """ideal mode is NOT ggml's arithmetic: it must sit measurably away from it (otherwise the
    ggml mode would be emulating nothing), but only by activation-quantization noise."""
    w, x = _inputs(7)
    raw = ggml.quantize(w, name)
    wt = QTensor("w", raw, quant.get_type(name), w.shape)
    expected = ggml_cpu().matmul(x, raw, name)
    out = np.empty_like(expected)
    NumpyBackend(mode="ideal").matmul(out, x, wt)
    nmse = np.sum((out - expected) ** 2) / np.sum(expected ** 2)
    assert 1e-8 < nmse < 1e-3, nmse
