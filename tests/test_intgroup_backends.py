"""The integer-group weight type (GPTQ / AWQ / compressed-tensors layers once unpacked,
refinfer/quant/intgroup.py) in every backend.

- Its dequantization is torch's: fp16 scales times (q - zero) as an fp16 tensor product, one
  rounding (the oracle is torch itself), or the float32 product with rounding="exact".
- Every backend's matmul equals the NumPy reference bit for bit (the README claims it: the
  kernels sum in float64 in column order like the reference), for T = 1, 2, 9, odd shapes,
  act-order g_idx, 2/3/4/8 bits and the dense path the kernels take for 8-bit small groups.
- A matmul row is the same bits alone and in any batch; a whole model of these weights passes
  the engine's batch-invariance check, and a batch-dependent matmul over the same weights fails
  it (the negative control).
- a16 rounds the input and the output to fp16; ggml mode runs the weights as F16.
"""

from __future__ import annotations

import numpy as np
import pytest

import refinfer
from ci_skips import oracle_import
from invariance_workloads import SHAPES, first_difference, run_batched
from refinfer.backends import get_backend
from refinfer.backends.numpy_backend import NumpyBackend, column_order_matmul, round_f16
from refinfer.errors import ShapeError, UnsupportedError
from refinfer.quant.intgroup import IntGroupTensor, from_weights

BACKENDS = ("numpy", "numba", "cuda")
# (rows N, cols K, group size, bits, act-order): odd N and K, groups that do not divide K, one group per row
SHAPES_W = [(13, 70, 32, 4, False), (21, 96, 96, 3, True), (9, 40, 8, 8, False), (5, 33, 11, 2, True),
            (16, 64, 16, 8, True), (24, 128, 64, 4, True)]


def make_intg(N, K, gs, bits, act_order, seed=0, rounding="f16"):
    rng = np.random.default_rng([N, K, gs, bits, seed])
    G = -(-K // gs)
    g_idx = np.arange(K) // gs
    if act_order:
        g_idx = g_idx[rng.permutation(K)]
    scales = (rng.standard_normal((N, G)) * 0.02).astype(np.float16).astype(np.float32)
    return from_weights("blk.0.attn_q.weight", rng.integers(0, 1 << bits, (N, K)), scales,
                        rng.integers(0, 1 << bits, (N, G)), g_idx, bits=bits, rounding=rounding,
                        info={"method": "test", "act_order": act_order})


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    return get_backend(request.param)


@pytest.mark.parametrize("shape", SHAPES_W)
def test_dequantize_is_torchs_fp16_product(shape):
    check_dequantize_is_torchs(shape)


def check_dequantize_is_torchs(shape):
    torch = oracle_import("torch")
    w = make_intg(*shape)
    scales = torch.from_numpy(w.scales).half()[:, torch.from_numpy(w.g_idx).long()]          # [N, K] fp16
    zeros = torch.from_numpy(w.zeros.astype(np.int32))[:, torch.from_numpy(w.g_idx).long()]
    want = (scales * (torch.from_numpy(w.codes.astype(np.int32)) - zeros)).float().numpy()   # torch's fp16 multiply
    np.testing.assert_array_equal(w.dequantize(), want)
    exact = (torch.from_numpy(w.scales)[:, torch.from_numpy(w.g_idx).long()]
             * (torch.from_numpy(w.codes.astype(np.int32)) - zeros).float()).numpy()
    np.testing.assert_array_equal(w.with_rounding("exact").dequantize(), exact)
    assert not np.array_equal(exact, want), "the fp16 rounding should change some weights"


@pytest.mark.parametrize("shape", SHAPES_W)
def test_table_lookup_is_the_dequantized_matrix(shape):
    w = make_intg(*shape)
    t = w.table()
    np.testing.assert_array_equal(t[np.arange(w.shape[0])[:, None], w.g_idx[None, :], w.codes], w.dequantize())


@pytest.mark.parametrize("shape", SHAPES_W)
@pytest.mark.parametrize("rounding", ["f16", "exact"])
def test_matmul_equals_the_reference_bit_for_bit(backend, shape, rounding):
    check_matmul_equals_reference(backend, shape, rounding)


def check_matmul_equals_reference(backend, shape, rounding="f16"):
    w = make_intg(*shape, rounding=rounding)
    x = np.random.default_rng(1).standard_normal((9, w.shape[1])).astype(np.float32)
    want = column_order_matmul(x, w.dequantize().T).astype(np.float32)
    for T in (1, 2, 9):
        out = np.empty((T, w.shape[0]), np.float32)
        backend.matmul(out, x[:T], w)
        np.testing.assert_array_equal(out.view(np.uint32), want[:T].view(np.uint32), err_msg=f"{backend.name} T={T}")
        # the same row alone: batch-invariant
        alone = np.empty((1, w.shape[0]), np.float32)
        backend.matmul(alone, x[T - 1: T], w)
        np.testing.assert_array_equal(alone[0].view(np.uint32), out[T - 1].view(np.uint32))


def test_embed_rows(backend):
    w = make_intg(13, 70, 32, 4, True)
    out = np.empty((3, 70), np.float32)
    backend.embed(out, w, [12, 0, 5])
    np.testing.assert_array_equal(out, w.dequantize()[[12, 0, 5]])


def test_a16_rounds_input_and_output_to_fp16(backend):
    w = make_intg(21, 96, 96, 3, True)
    x = np.random.default_rng(2).standard_normal((3, 96)).astype(np.float32)
    backend.a16 = True
    try:
        out = np.empty((3, 21), np.float32)
        backend.matmul(out, x, w)
    finally:
        backend.a16 = False
    want = round_f16(column_order_matmul(round_f16(x), w.dequantize().T).astype(np.float32))
    np.testing.assert_array_equal(out, want)
    plain = np.empty_like(out)
    backend.matmul(plain, x, w)
    assert not np.array_equal(plain, out)


def test_ggml_mode_runs_the_weights_as_f16():
    from refinfer import quant
    from refinfer.weights import QTensor
    from refinfer.quant._common import f32_to_fp16_bits
    w = make_intg(16, 64, 16, 8, True)
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    be = NumpyBackend(mode="ggml")
    f16 = QTensor("w", f32_to_fp16_bits(w.dequantize()).view(np.uint8), quant.get_type("f16"), w.shape)
    a, b = np.empty((4, 16), np.float32), np.empty((4, 16), np.float32)
    be.matmul(a, x, w)
    be.matmul(b, x, f16)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(UnsupportedError, match="rounding is 'exact'"):
        be.matmul(a, x, w.with_rounding("exact"))


def test_inconsistent_arrays_are_rejected():
    w = make_intg(13, 70, 32, 4, False)
    with pytest.raises(ShapeError, match="g_idx has groups"):
        IntGroupTensor("t", w.codes, w.scales, w.zeros, (w.g_idx + 5).astype(np.int32), 4)
    with pytest.raises(ShapeError, match="do not fit 2 bits"):
        IntGroupTensor("t", w.codes, w.scales, w.zeros, w.g_idx, 2)
    with pytest.raises(ShapeError, match="do not agree"):
        IntGroupTensor("t", w.codes, w.scales[:, :1], w.zeros, w.g_idx, 4)


# ---- a whole model of integer-group weights through the engine's invariance check ------------

def _to_intg(qt, bits, gs, act_order, rng):
    """A fixture-made group-wise RTN of a float matrix (asymmetric, GPTQ's range convention): any
    codes serve here; the quantizers' own exactness is tested against AutoGPTQ/AutoAWQ elsewhere."""
    W = qt.dequantize()
    N, K = W.shape
    g_idx = np.arange(K) // gs
    if act_order:
        g_idx = g_idx[rng.permutation(K)]
    G = int(g_idx.max()) + 1
    maxq = (1 << bits) - 1
    scales = np.empty((N, G), np.float32)
    zeros = np.empty((N, G), np.int32)
    codes = np.empty((N, K), np.int32)
    for g in range(G):
        cols = g_idx == g
        lo = np.minimum(W[:, cols].min(1), 0)
        hi = np.maximum(W[:, cols].max(1), 0)
        s = np.where(hi > lo, (hi - lo) / maxq, 1).astype(np.float16).astype(np.float32)
        z = np.rint(-lo / s)
        scales[:, g], zeros[:, g] = s, z
        codes[:, cols] = np.clip(np.rint(W[:, cols] / s[:, None]) + z[:, None], 0, maxq)
    return from_weights(qt.name, codes, scales, zeros, g_idx, bits=bits)


def intg_model(path, backend):
    model = refinfer.load(path, backend=backend)
    rng = np.random.default_rng(0)
    for i, layer in enumerate(model.weights.layers):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            bits, gs, act = [(4, 32, False), (3, 16, True), (8, 64, True), (2, 32, False)][(i + len(name)) % 4]
            setattr(layer, name, _to_intg(getattr(layer, name), bits, gs, act, rng))
    return model


@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
def test_a_model_of_intg_weights_is_batch_invariant(tiny_quantized, backend_name):
    model = intg_model(tiny_quantized["f32"], backend_name)
    rng = np.random.default_rng(5)
    work = SHAPES["mixed"](rng, model.config.vocab_size)
    rows, _, _ = run_batched(model, work, rng, block_size=3)
    assert first_difference(model, work, rows) is None


class _BlasIntg(NumpyBackend):
    """Negative control: the integer-group matmul as one float32 BLAS product over the batch."""

    def intg_dot(self, out, x, w):
        out[...] = np.asarray(x, np.float32) @ self._dequantized(w).T


def test_negative_control_batch_dependent_intg_matmul_is_caught(tiny_quantized):
    model = intg_model(tiny_quantized["f32"], "numpy")
    model.backend = _BlasIntg()
    rng = np.random.default_rng(5)
    work = SHAPES["mixed"](rng, model.config.vocab_size)
    rows, _, _ = run_batched(model, work, rng, block_size=3)
    assert first_difference(model, work, rows) is not None


def test_numba_model_logits_match_the_reference(tiny_quantized):
    # The integer-group matmuls are bit-exact (above); the float ops around them are the numba
    # backend's usual ones (tests/test_numba_backend.py TOLERANCES; output is an f32 matrix, whose
    # kernel differs from the reference's float64 sum). Measured logits NMSE: 2.1e-14. Bound 2e-13.
    ids = [int(t) for t in np.random.default_rng(4).integers(3, 200, 12)]
    a = intg_model(tiny_quantized["f32"], "numpy").logits(ids).astype(np.float64)
    b = intg_model(tiny_quantized["f32"], "numba").logits(ids).astype(np.float64)
    nmse = np.mean((a - b) ** 2) / np.mean(a ** 2)
    assert nmse <= 2e-13, nmse
