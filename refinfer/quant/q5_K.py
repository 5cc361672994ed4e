"""q5_K: 256 weights -> 8 sub-blocks of 32 with 6-bit scales and mins, as q4_K, and 256
unsigned 5-bit codes (176 bytes, 5.5 bits/weight).

    byte 0..1     d           fp16 super-block scale of the sub-block scales
    byte 2..3     dmin        fp16 super-block scale of the sub-block mins
    byte 4..15    scales[12]  six-bit sc[j], m[j], packed exactly as in q4_K
    byte 16..47   qh[32]      bit j of qh[l] is the 5th bit of element 32j + l
    byte 48..175  qs[128]     low 4 bits, laid out as q4_K's qs: element 64g + l in the LOW
                              nibble of qs[32g + l], element 64g + 32 + l in the HIGH nibble

    sub-block j = element // 32:  w = (d * sc[j]) * q - (dmin * m[j]),  q in 0..31

(ggml `dequantize_row_q5_K`: d1 = d*sc, m1 = min*m, y = d1*q - m1, each rounded to float32).

Quantize (ggml `quantize_row_q5_K_ref`): as q4_K with nmax = 31 and the search
make_qkx2_quants(rmin=-0.5, rdelta=0.1, nstep=15).
"""

import numpy as np

from ._common import BlockType, as_blocks, blocks_to_bytes, fp16_to_f32, map_chunks, new_blocks
from ._weighted import map_chunks_weighted
from .q4_K import (K_SCALE_SIZE, QK_K, get_scale_min_k4, make_qkx2_quants, quantize_scales_mins,
                   quantize_weighted_codes, requantize, sub_block_weights)

block_q5_K = np.dtype([("d", "<u2"), ("dmin", "<u2"), ("scales", "u1", (K_SCALE_SIZE,)),
                       ("qh", "u1", (QK_K // 8,)), ("qs", "u1", (QK_K // 2,))])
assert block_q5_K.itemsize == 2 + 2 + 12 + 32 + 128


def codes(raw):  # uint8[n, 176] -> (q uint8[n, 8, 32], d1 float32[n, 8], -m1 float32[n, 8])
    """As q4_K.codes: w = d1 * q - m1 (dequantize_row_q5_K) returned as d * q + m, m = -m1."""
    b = as_blocks(raw, block_q5_K)
    n = len(b)
    d = fp16_to_f32(b["d"])[:, None]
    dmin = fp16_to_f32(b["dmin"])[:, None]
    sc, m = get_scale_min_k4(b["scales"])
    qs = b["qs"].reshape(n, 4, 1, 32)
    low = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(n, 8, 32)
    high = (b["qh"][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [n, 8, 32]
    with np.errstate(all="ignore"):  # random bytes: inf/NaN scales propagate as in C
        d1 = d * sc.astype(np.float32)  # [n, 8]
        m1 = dmin * m.astype(np.float32)
    return low | (high << 4), d1, -m1


def dequantize_blocks(raw):  # uint8[n, 176] -> float32[n, 256]
    q, d1, m = codes(raw)
    with np.errstate(all="ignore"):
        y = d1[:, :, None] * q.astype(np.float32) + m[:, :, None]
    return y.reshape(len(q), QK_K)


def _pack(d16, dmin16, packed, L):  # L uint8[n, 256] (0..31) -> uint8[n, 176]
    n = len(L)
    L = L.reshape(n, 8, 32)  # [n, sub-block j, l]
    b = new_blocks(n, block_q5_K)
    b["d"], b["dmin"], b["scales"] = d16, dmin16, packed
    high = (L >> 4).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None]
    b["qh"] = np.bitwise_or.reduce(high, axis=1)
    low = (L & 0xF).reshape(n, 4, 2, 32)
    b["qs"] = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    return blocks_to_bytes(b)


def _quantize(x):  # float32[n, 256] -> uint8[n, 176]
    n = len(x)
    xs = x.reshape(n * 8, 32)
    scales, mins, L = make_qkx2_quants(xs, sub_block_weights(xs), 31, -0.5, 0.1, 15, False)
    d16, dmin16, packed = quantize_scales_mins(scales.reshape(n, 8), mins.reshape(n, 8))
    return _pack(d16, dmin16, packed, requantize(x, L, d16, dmin16, packed, 31))


def quantize_blocks(x):  # float32[n, 256] -> uint8[n, 176]
    return map_chunks(_quantize, x, block_q5_K.itemsize)


def quantize_blocks_weighted(x, qw):  # float32[n, 256] x 2 -> uint8[n, 176]
    """ggml `quantize_row_q5_K_impl`: q4_K's weighted search with nmax = 31."""
    return map_chunks_weighted(lambda x, qw: _pack(*quantize_weighted_codes(x, qw, 31)), x, qw,
                               block_q5_K.itemsize)


BLOCK = BlockType("q5_K", 13, QK_K, block_q5_K, dequantize_blocks, quantize_blocks,
                  ggml_quantize="quantize_row_q5_K_ref", codes=codes)
