"""q2_K: 256 weights -> 16 sub-blocks of 16, each with a 4-bit scale and a 4-bit min, and 256
unsigned 2-bit codes (84 bytes, 2.625 bits/weight).

    byte 0..15   scales[16]  sub-block j: scale sc[j] = scales[j] & 15, min m[j] = scales[j] >> 4
    byte 16..79  qs[64]      element 128h + 32s + r (h < 2, s < 4, r < 32) is bits 2s..2s+1 of
                             qs[32h + r]
    byte 80..81  d           fp16 super-block scale of the scales
    byte 82..83  dmin        fp16 super-block scale of the mins

    sub-block j = element // 16:  w = (d * sc[j]) * q - (dmin * m[j]),  q in 0..3

(ggml `dequantize_row_q2_K`: dl = d*sc, ml = min*m, y = dl*q - ml, each rounded to float32).

Quantize (ggml `quantize_row_q2_K_ref`): per sub-block make_qkx2_quants(nmax=3, weights |x|,
rmin=-0.5, rdelta=0.1, nstep=15, mean absolute error); the 16 scales and mins are quantized
to 4 bits against their maxima (d = max_scale/15, dmin = max_min/15) and the codes recomputed
from the stored values: q = clamp(nearest_int((x + dmin*m) / (d*sc)), 0, 3).
"""

import numpy as np

from ._common import (F32, BlockType, as_blocks, blocks_to_bytes, f32_to_fp16_bits, fp16_to_f32,
                      map_chunks, nearest_int_c, new_blocks)
from ._weighted import (importance_weights, make_qp_quants, map_chunks_weighted, sequential_sum,
                        sum_squares)
from .q4_K import make_qkx2_quants, positive_max

QK_K = 256
block_q2_K = np.dtype([("scales", "u1", (QK_K // 16,)), ("qs", "u1", (QK_K // 4,)),
                       ("d", "<u2"), ("dmin", "<u2")])
assert block_q2_K.itemsize == 16 + 64 + 2 + 2


def unpack_crumbs(qs):  # uint8[n, 64] -> uint8[n, 256]
    """2-bit codes in q2_K/q3_K order: element 128h + 32s + r = (qs[32h + r] >> 2s) & 3."""
    q = qs.reshape(len(qs), 2, 1, 32)
    return ((q >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3).reshape(len(qs), 256)


def pack_crumbs(L):  # uint8[n, 256] (0..3) -> uint8[n, 64]
    L = L.astype(np.uint8).reshape(len(L), 2, 4, 32)
    shifted = L << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    return np.bitwise_or.reduce(shifted, axis=2).reshape(len(L), 64)


def codes(raw):  # uint8[n, 84] -> (q uint8[n, 16, 16], dl float32[n, 16], -ml float32[n, 16])
    """Sub-block codes and scales: w = dl * q - ml (dequantize_row_q2_K) as d * q + m, m = -ml."""
    b = as_blocks(raw, block_q2_K)
    n = len(b)
    d = fp16_to_f32(b["d"])[:, None]
    dmin = fp16_to_f32(b["dmin"])[:, None]
    with np.errstate(all="ignore"):  # random bytes: inf/NaN scales propagate as in C
        dl = d * (b["scales"] & 0xF).astype(np.float32)  # [n, 16]
        ml = dmin * (b["scales"] >> 4).astype(np.float32)
    return unpack_crumbs(b["qs"]).reshape(n, 16, 16), dl, -ml


def _requantize_and_pack(x, L, packed, d16, dmin16):
    """The last step both quantizers share: each sub-block's codes again from the stored (fp16)
    scales and mins, q = nearest_int((x + m) / d) clamped to 0..3 (the first codes L are kept
    where d == 0), then the block bytes."""
    n = len(x)
    with np.errstate(all="ignore"):
        d = fp16_to_f32(d16)[:, None] * (packed & 0xF).astype(np.float32)  # [n, 16]
        m = fp16_to_f32(dmin16)[:, None] * (packed >> 4).astype(np.float32)
        q = np.clip(nearest_int_c((x.reshape(n, 16, 16) + m[:, :, None]) / d[:, :, None]), 0, 3)
    L = np.where((d != 0)[:, :, None], q, L.reshape(n, 16, 16)).reshape(n, QK_K)
    b = new_blocks(n, block_q2_K)
    b["scales"], b["qs"], b["d"], b["dmin"] = packed, pack_crumbs(L), d16, dmin16
    return blocks_to_bytes(b)


def dequantize_blocks(raw):  # uint8[n, 84] -> float32[n, 256]
    q, dl, m = codes(raw)
    with np.errstate(all="ignore"):
        y = dl[:, :, None] * q.astype(np.float32) + m[:, :, None]
    return y.reshape(len(q), QK_K)


def _quantize(x):  # float32[n, 256] -> uint8[n, 84]
    n = len(x)
    xs = x.reshape(n * 16, 16)
    scales, mins, L = make_qkx2_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
    max_scale, max_min = positive_max(scales), positive_max(mins)
    with np.errstate(all="ignore"):
        # C: y.scales[j] = l (a uint8_t: low byte), then |= l << 4 for the mins
        ls = np.where((max_scale > 0)[:, None],
                      nearest_int_c((F32(15) / max_scale)[:, None] * scales) & 0xFF, 0)
        lm = np.where((max_min > 0)[:, None], nearest_int_c((F32(15) / max_min)[:, None] * mins), 0)
        packed = ((ls | (lm << 4)) & 0xFF).astype(np.uint8)
        d16 = np.where(max_scale > 0, f32_to_fp16_bits(max_scale / F32(15)), 0).astype(np.uint16)
        dmin16 = np.where(max_min > 0, f32_to_fp16_bits(max_min / F32(15)), 0).astype(np.uint16)
    return _requantize_and_pack(x, L, packed, d16, dmin16)


def quantize_blocks(x):  # float32[n, 256] -> uint8[n, 84]
    return map_chunks(_quantize, x, block_q2_K.itemsize)


BLOCK = BlockType("q2_K", 10, QK_K, block_q2_K, dequantize_blocks, quantize_blocks,
                  ggml_quantize="quantize_row_q2_K_ref", codes=codes)


def _quantize_weighted(x, qw):  # float32[n, 256] x 2 -> uint8[n, 84]
    """quantize_row_q2_K_impl: per super-block sigma2 = mean(x^2) (not twice it, as in the other
    K-quants); per sub-block of 16 the weights qw * sqrt(sigma2 + x^2) and
    make_qkx3_quants(nmax=3, rmin=-0.9, rdelta=0.05, nstep=36); the 16 scales and mins get
    4-bit codes from make_qp_quants(nmax=15) weighted by the sub-blocks' weight sums; the codes
    are recomputed from the stored values."""
    n = len(x)
    sigma2 = sum_squares(x) / F32(QK_K)
    xs = x.reshape(n * 16, 16)
    w = importance_weights(xs, qw.reshape(n * 16, 16), np.repeat(sigma2, 16))
    sw = sequential_sum(w).reshape(n, 16)
    scales, mins, L = make_qkx2_quants(xs, w, 3, -0.9, 0.05, 36, False)
    dm, Ls = make_qp_quants(scales.reshape(n, 16), 15, sw)
    mm, Lm = make_qp_quants(mins.reshape(n, 16), 15, sw)
    with np.errstate(all="ignore"):
        packed = ((Ls.astype(np.int32) | (Lm.astype(np.int32) << 4)) & 0xFF).astype(np.uint8)
        d16, dmin16 = f32_to_fp16_bits(dm), f32_to_fp16_bits(mm)
    return _requantize_and_pack(x, L, packed, d16, dmin16)


def quantize_blocks_weighted(x, qw):  # float32[n, 256] x 2 -> uint8[n, 84]
    """ggml `quantize_row_q2_K_impl` (quantize_q2_K with an importance matrix)."""
    return map_chunks_weighted(_quantize_weighted, x, qw, block_q2_K.itemsize)
