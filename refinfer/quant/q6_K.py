"""q6_K: 256 weights -> 16 sub-blocks of 16 with signed 8-bit scales, and 256 signed 6-bit
codes (210 bytes, 6.5625 bits/weight).

    byte 0..127    ql[128]     low 4 bits: element 128h + 32j + l (h < 2, j < 4, l < 32) is
                               in ql[64h + 32(j % 2) + l], LOW nibble for j < 2, HIGH for j >= 2
    byte 128..191  qh[64]      high 2 bits of the same element: bits 2j..2j+1 of qh[32h + l]
    byte 192..207  scales[16]  int8 sub-block scales, sub-block = element // 16
    byte 208..209  d           fp16 super-block scale

    w = (d * scales[element // 16]) * (q - 32),  q = low4 | high2 << 4 in 0..63

(ggml `dequantize_row_q6_K`: y = d * sc * q evaluated left to right in float32).

Quantize (ggml `quantize_row_q6_K_ref`): each sub-block gets a signed scale from
make_qx_quants(nmax=32, rmse_type=1): start from iscale = -32/max (max = the signed element of
largest |x|), then try the 18 inverse scales -(32 + 0.1*is)/max (is = -9..9, is != 0) and keep
the one that maximizes (sum w x l)^2 / (sum w l^2) with weights w = x^2; its scale is the
least-squares sum(w x l) / sum(w l^2). The signed scale of largest |.| gives d = -max/128 and
the int8 scales nearest_int(-128 * scale / max); the codes are then recomputed from the
stored fp16 d: q = clamp(nearest_int(x / (d * scale)), -32, 31) + 32.
"""

import numpy as np

from ._common import (F32, BlockType, as_blocks, blocks_to_bytes, f32_to_fp16_bits, fp16_to_f32,
                      map_chunks, nearest_int_c, new_blocks)
from ._weighted import map_chunks_weighted

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)  # below this a group counts as all zero (ggml-quants.c)
block_q6_K = np.dtype([("ql", "u1", (QK_K // 2,)), ("qh", "u1", (QK_K // 4,)),
                       ("scales", "i1", (QK_K // 16,)), ("d", "<u2")])
assert block_q6_K.itemsize == 128 + 64 + 16 + 2


def signed_absmax(v):  # float32[m, n] -> (max float32[m], amax float32[m])
    """`if (fabsf(v) > amax) { amax = fabsf(v); max = v; }` from amax = max = 0: the first
    element of strictly largest |v| (NaN never wins), with its sign; (0, 0) if none is > 0."""
    a = np.where(np.abs(v) > 0, np.abs(v), F32(0))  # NaN -> 0: skipped like in C
    idx = np.argmax(a, axis=-1)[:, None]
    amax = np.take_along_axis(a, idx, axis=-1)[:, 0]
    max_ = np.where(amax > 0, np.take_along_axis(v, idx, axis=-1)[:, 0], F32(0))
    return max_.astype(np.float32), amax


def make_qx_quants(x, nmax, qw=None):
    """ggml `make_qx_quants(n, nmax, x, L, rmse_type=1, qw)` for many sub-blocks at once:
    x float32[m, n], qw float32[m, n] or None -> (scale float32[m], L uint8[m, n] in 0..2*nmax-1).

    The weights are qw (an importance matrix's) when given, else x^2 (rmse_type 1). All sums
    run over the elements sequentially in float32, as in C."""
    m, n = x.shape
    max_, amax = signed_absmax(x)
    zero = amax < GROUP_MAX_EPS  # C: all codes 0 (not nmax) and scale 0
    with np.errstate(over="ignore"):
        w = x * x if qw is None else qw  # the rmse weights; inf for |x| > 1.8e19, as in C

    def fit(iscale):  # float32[m] -> (l float32[m, n] signed, sumlx, suml2)
        l = np.clip(nearest_int_c(iscale[:, None] * x), -nmax, nmax - 1).astype(np.float32)
        sumlx = np.zeros(m, dtype=np.float32)
        suml2 = np.zeros(m, dtype=np.float32)
        for i in range(n):
            sumlx = sumlx + w[:, i] * x[:, i] * l[:, i]
            suml2 = suml2 + w[:, i] * l[:, i] * l[:, i]
        return l, sumlx, suml2

    with np.errstate(all="ignore"):
        l, sumlx, suml2 = fit(F32(-nmax) / max_)
        L = l
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for is_ in range(-9, 10):
            if is_ == 0:
                continue
            l, sumlx, suml2 = fit(-(F32(nmax) + F32(0.1) * F32(is_)) / max_)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better[:, None], l, L)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    L = np.where(zero[:, None], 0, L + F32(nmax)).astype(np.uint8)
    return np.where(zero, F32(0), scale), L


def codes(raw):  # uint8[n, 210] -> (q int8[n, 16, 16], d * sc float32[n, 16], None): w = (d * sc) * q
    b = as_blocks(raw, block_q6_K)
    n = len(b)
    ql = b["ql"].reshape(n, 2, 1, 2, 32)  # [n, h, ., j % 2, l]
    low = np.concatenate([ql & 0xF, ql >> 4], axis=2).reshape(n, 2, 4, 32)  # [n, h, j, l]
    qh = b["qh"].reshape(n, 2, 1, 32)
    high = (qh >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3
    q = ((low | (high << 4)).astype(np.int8) - np.int8(32)).reshape(n, 16, 16)
    with np.errstate(all="ignore"):  # random bytes: inf/NaN scales propagate as in C
        dl = fp16_to_f32(b["d"])[:, None] * b["scales"].astype(np.float32)
    return q, dl, None


def dequantize_blocks(raw):  # uint8[n, 210] -> float32[n, 256]
    q, dl, _ = codes(raw)
    with np.errstate(all="ignore"):
        y = dl[:, :, None] * q.astype(np.float32)
    return y.reshape(len(q), QK_K)


def _quantize(x, qw=None):  # float32[n, 256], qw float32[n, 256] or None -> uint8[n, 210]
    """quantize_row_q6_K_ref, or quantize_row_q6_K_impl with quant_weights qw: the same steps,
    the sub-block fits weighted by qw itself instead of x^2."""
    n = len(x)
    scales, L = make_qx_quants(x.reshape(n * 16, 16), 32, None if qw is None else qw.reshape(n * 16, 16))
    scales = scales.reshape(n, 16)
    max_scale, max_abs_scale = signed_absmax(scales)
    zero = max_abs_scale < GROUP_MAX_EPS  # C writes an all-zero block
    with np.errstate(all="ignore"):
        iscale = F32(-128) / max_scale
        d16 = np.where(zero, 0, f32_to_fp16_bits(F32(1) / iscale)).astype(np.uint16)
        # MIN(127, nearest_int(.)) stored into an int8_t: keep the low byte, signed
        sc = np.minimum(127, nearest_int_c(iscale[:, None] * scales))
        sc = np.where(zero[:, None], 0, ((sc & 0xFF) ^ 0x80) - 0x80).astype(np.int8)
        d = fp16_to_f32(d16)[:, None] * sc.astype(np.float32)  # [n, 16]
        q = np.clip(nearest_int_c(x.reshape(n, 16, 16) / d[:, :, None]), -32, 31) + 32
    L = np.where((d != 0)[:, :, None], q, L.reshape(n, 16, 16)).astype(np.uint8)
    L = np.where(zero[:, None, None], 0, L).reshape(n, 2, 4, 32)  # [n, h, j, l]
    b = new_blocks(n, block_q6_K)
    low = (L & 0xF).reshape(n, 2, 2, 2, 32)  # [n, h, j // 2, j % 2, l]
    b["ql"] = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    high = (L >> 4) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    b["qh"] = np.bitwise_or.reduce(high, axis=2).reshape(n, 64)
    b["scales"] = sc
    b["d"] = d16
    return blocks_to_bytes(b)


def quantize_blocks(x):  # float32[n, 256] -> uint8[n, 210]
    return map_chunks(_quantize, x, block_q6_K.itemsize)


def quantize_blocks_weighted(x, qw):  # float32[n, 256] x 2 -> uint8[n, 210]
    """ggml `quantize_row_q6_K_impl` (quantize_q6_K with an importance matrix)."""
    return map_chunks_weighted(_quantize, x, qw, block_q6_K.itemsize)


BLOCK = BlockType("q6_K", 14, QK_K, block_q6_K, dequantize_blocks, quantize_blocks,
                  ggml_quantize="quantize_row_q6_K_ref", codes=codes)
