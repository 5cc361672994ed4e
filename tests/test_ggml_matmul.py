"""`ggml` numeric mode: each matmul against ggml's own CPU result (the activation quantizer and
vec_dot that MUL_MAT uses, called through ctypes). Bit for bit for the types the README claims
(q4_0, q4_1, q5_0, q5_1, q8_0, f16); the others within REL_TOL, measured as
max|ours - ggml| / max|ggml|."""

from __future__ import annotations

import numpy as np
import pytest

from oracle import ggml_cpu
from refinfer.backends.numpy_backend import NumpyBackend
from refinfer.weights import QTensor
from refinfer import quant

EXACT_TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "f16"]
# Not bit-exact: refinfer sums exact products in float64, ggml rounds each block's scale product
# d_w * d_x to float32 (K-quants) or sums float32 lanes (bf16, f32). Largest measured over both
# seeds: bf16 1.0e-7, f32 1.0e-7, q2_K 1.2e-7, q3_K 7.9e-8, q4_K 2.4e-7, q5_K 2.4e-7, q6_K 1.7e-7.
REL_TOL = 1e-6
TYPES = EXACT_TYPES + ["bf16", "f32", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K"]


def _inputs(seed, rows=37, n=512, T=3):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, n)).astype(np.float32) * 0.05
    x = rng.standard_normal((T, n)).astype(np.float32)
    x[:, rng.choice(n, 4, replace=False)] *= 30.0  # outlier channels, as in real activations
    return w, x


def check_matmul(ggml, name, seed):
    w, x = _inputs(seed)
    raw = ggml.quantize(w, name)                      # the weights as llama.cpp stores them
    wt = QTensor("w", raw, quant.get_type(name), w.shape)
    expected = ggml_cpu().matmul(x, raw, name)         # [T, rows]
    out = np.empty_like(expected)
    NumpyBackend(mode="ggml").matmul(out, x, wt)
    if name in EXACT_TYPES:
        np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32), err_msg=name)
    else:
        rel = np.max(np.abs(out - expected)) / np.max(np.abs(expected))
        assert rel <= REL_TOL, f"{name}: relative error {rel:.3g} > {REL_TOL}"


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_ggml_mode_matmul_equals_ggml_cpu(ggml, name, seed):
    check_matmul(ggml, name, seed)


# NMSE of ideal mode against ggml's CPU on _inputs(7), measured; the q8_K activation blocks
# span 256 values, so the outlier channels cost q4_K's activations more precision
IDEAL_VS_GGML_NMSE = {"q4_0": 7.7e-5, "q4_1": 7.5e-5, "q8_0": 7.7e-5, "q4_K": 5.8e-4}


@pytest.mark.parametrize("name", list(IDEAL_VS_GGML_NMSE))
def test_ideal_mode_differs_from_ggml_by_activation_quantization(ggml, name):
    """ideal mode is NOT ggml's arithmetic: it must sit measurably away from it (otherwise the
    ggml mode would be emulating nothing), but only by activation-quantization noise: within a
    factor of 10 of the measured NMSE either way."""
    w, x = _inputs(7)
    raw = ggml.quantize(w, name)
    wt = QTensor("w", raw, quant.get_type(name), w.shape)
    expected = ggml_cpu().matmul(x, raw, name)
    out = np.empty_like(expected)
    NumpyBackend(mode="ideal").matmul(out, x, wt)
    nmse = np.sum((out - expected) ** 2) / np.sum(expected ** 2)
    measured = IDEAL_VS_GGML_NMSE[name]
    assert measured / 10 < nmse < measured * 10, (name, nmse)
