"""RTN in the three conventions against the libraries' own functions: AutoGPTQ's
Quantizer.find_params/quantize, AutoAWQ's pseudo_quantize_tensor, compressed-tensors'
calculate_qparams/quantize. Scales, zeros and codes must be equal, not close."""

from __future__ import annotations

import numpy as np
import pytest

import oracles_methods as om
from ci_skips import oracle_import
from refinfer.methods import rtn


def weights(kind: str, N: int, K: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        W = rng.normal(0, 0.02, (N, K))
    elif kind == "heavy":                     # Student-t, 2 d.o.f.: outliers like real LLM weights
        W = 0.01 * rng.standard_t(2, (N, K))
    else:                                     # one-signed groups and an all-zero row: the range edge cases
        W = np.abs(rng.normal(0, 0.02, (N, K)))
        W[1] = -W[1]
        W[2] = 0
    return W.astype(np.float32)


CASES = [(kind, bits, gs) for kind in ("normal", "heavy", "edge") for bits in (2, 3, 4, 8) for gs in (-1, 32, 128)]


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("kind,bits,gs", CASES)
def test_gptq_rtn_equals_autogptq_quantizer(kind, bits, gs, sym):
    torch = oracle_import("torch")
    quantizer, _ = om.autogptq()
    W = weights(kind, 7, 256, seed=bits * 10 + (gs % 7))
    t = rtn.gptq_rtn(W, bits, gs, sym)
    g = 256 if gs == -1 else gs
    q = quantizer.Quantizer()
    q.configure(bits, perchannel=True, sym=sym)
    for j in range(256 // g):
        x = torch.from_numpy(W[:, j * g:(j + 1) * g])
        q.find_params(x, weight=True)
        s, z = q.scale.numpy()[:, 0], q.zero.numpy()[:, 0]
        np.testing.assert_array_equal(t.scales[:, j], rtn.fp16_scales(s))
        np.testing.assert_array_equal(t.zeros[:, j], z.astype(np.int16))
        # s * (q - z) is one-to-one in q for s != 0: equal fake-quant weights mean equal codes.
        ours = s[:, None] * (t.codes[:, j * g:(j + 1) * g].astype(np.float32) - z[:, None])
        np.testing.assert_array_equal(ours, q.quantize(x).numpy())


def test_gptq_pack_rederives_the_same_codes():
    """QuantLinear.pack (qlinear_cuda_old.py l.127): round((W + z*s) / s_fp16), unclamped, from the
    fake-quant fp16 weight; it must give back the fasterquant codes (see rtn.py)."""
    torch = oracle_import("torch")
    for bits in (2, 3, 4, 8):
        W = weights("heavy", 64, 256, seed=bits)
        t = rtn.gptq_rtn(W, bits, 64, sym=False)
        s32, z = gptq_scale_zero(W, bits)
        Q = torch.from_numpy(s32[:, t.g_idx] * (t.codes.astype(np.float32) - z[:, t.g_idx])).half()
        sz = torch.from_numpy(z * s32)[:, t.g_idx]
        s16 = torch.from_numpy(s32).half()[:, t.g_idx]
        rederived = torch.round((Q + sz) / s16).to(torch.int).numpy()
        np.testing.assert_array_equal(rederived, t.codes)


def gptq_scale_zero(W, bits):
    N, K = W.shape
    s, z = rtn.gptq_find_params(W.reshape(N * K // 64, 64), bits, sym=False)
    return s.reshape(N, -1), z.reshape(N, -1)


@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("kind,bits,gs", [c for c in CASES if c[2] != -1 and c[1] in (3, 4, 8)])
def test_awq_rtn_equals_pseudo_quantize_tensor(kind, bits, gs, zero_point):
    torch = oracle_import("torch")
    W = weights(kind, 6, 256, seed=bits + gs)
    aq = om.awq_quantizer(w_bit=bits, group_size=gs, zero_point=zero_point)
    for dtype, tdtype in ((np.float16, torch.float16), (np.float32, torch.float32)):
        wq, scales, zeros, codes = rtn.awq_pseudo_quantize(W, bits, gs, zero_point, dtype)
        owq, oscales, ozeros = aq.pseudo_quantize_tensor(torch.from_numpy(W).to(tdtype))
        np.testing.assert_array_equal(scales, oscales.numpy())
        np.testing.assert_array_equal(wq, owq.numpy())          # one-to-one in the code for s != 0
        if zero_point:
            np.testing.assert_array_equal(zeros, ozeros.numpy())
    t = rtn.awq_rtn(W, bits, gs, zero_point)
    wq16 = rtn.awq_pseudo_quantize(W, bits, gs, zero_point, np.float16)[0]
    # AutoAWQ's fp16 fake-quant weight is fp16(s_fp16 * (q - z)): the IntGroupTensor's "f16" rounding.
    np.testing.assert_array_equal(t.dequantize(), wq16.astype(np.float32))


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("kind,bits,gs", [c for c in CASES if c[1] in (2, 4, 8)])
def test_ct_rtn_equals_calculate_qparams(kind, bits, gs, sym):
    torch = oracle_import("torch")
    calculate_qparams, QuantizationArgs, quantize = om.compressed_tensors()
    W = weights(kind, 5, 256, seed=bits * 3 + gs)
    t = rtn.ct_rtn(W, bits, gs, sym)
    strategy = "channel" if gs == -1 else "group"
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy=strategy,
                            group_size=None if gs == -1 else gs)
    g = 256 if gs == -1 else gs
    x = torch.from_numpy(W)
    xg = x.reshape(5, 256 // g, g)
    scale, zp = calculate_qparams(xg.amin(dim=2), xg.amax(dim=2), args)
    half = 2 ** (bits - 1)
    np.testing.assert_array_equal(t.scales, scale.numpy())
    np.testing.assert_array_equal(t.zeros, zp.numpy().astype(np.int16) + half)
    codes = quantize(x, scale, zp, args, dtype=torch.int8).numpy().astype(np.int16) + half
    np.testing.assert_array_equal(t.codes, codes)
