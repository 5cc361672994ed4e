"""q5_1: 32 weights -> fp16 scale, fp16 minimum and 32 unsigned 5-bit codes (24 bytes, 6 bits/weight).

    byte 0..1   d       fp16 scale
    byte 2..3   m       fp16 minimum
    byte 4..7   qh[4]   little-endian uint32; bit i = 5th (high) bit of element i
    byte 8..23  qs[16]  low 4 bits: qs[j] low nibble = element j, high nibble = element j+16

    w = q * d + m,  q in 0..31.

Quantize (ggml `quantize_row_q5_1_ref`): d = (max - min) / 31;
codes = (uint8)trunc((x - min)/d + 0.5) -- no clamp in C (31.5 cannot be reached).
"""

import numpy as np

from ._common import (F32, BlockType, as_blocks, blocks_to_bytes, c_float_to_int8, f32_to_fp16_bits,
                      fp16_to_f32, new_blocks, pack_qh, safe_reciprocal, split_nibbles, unpack_qh)
from .q4_1 import min_max

QK5_1 = 32
block_q5_1 = np.dtype([("d", "<u2"), ("m", "<u2"), ("qh", "u1", (4,)), ("qs", "u1", (QK5_1 // 2,))])
assert block_q5_1.itemsize == 2 + 2 + 4 + QK5_1 // 2


def codes(raw):  # uint8[n, 24] -> (q uint8[n, 1, 32], d, m float32[n, 1]): w = d * q + m
    b = as_blocks(raw, block_q5_1)
    q = split_nibbles(b["qs"]) | (unpack_qh(b["qh"]) << 4)
    return q[:, None], fp16_to_f32(b["d"])[:, None], fp16_to_f32(b["m"])[:, None]


def dequantize_blocks(raw):  # uint8[n, 24] -> float32[n, 32]
    q, d, m = codes(raw)
    return q[:, 0].astype(np.float32) * d + m


def quantize_blocks(x):  # float32[n, 32] -> uint8[n, 24]
    mn, mx = min_max(x)
    with np.errstate(over="ignore"):
        d = (mx - mn) / F32(31)
    idv = safe_reciprocal(d)
    with np.errstate(over="ignore", invalid="ignore"):
        codes = c_float_to_int8((x - mn[:, None]) * idv[:, None] + F32(0.5)) & 0xFF
    b = new_blocks(len(x), block_q5_1)
    b["d"] = f32_to_fp16_bits(d)
    b["m"] = f32_to_fp16_bits(mn)
    b["qs"] = (codes[:, :16] & 0x0F) | ((codes[:, 16:] & 0x0F) << 4)
    b["qh"] = pack_qh((codes & 0x10) >> 4)
    return blocks_to_bytes(b)


BLOCK = BlockType("q5_1", 7, QK5_1, block_q5_1, dequantize_blocks, quantize_blocks,
                  ggml_quantize="quantize_row_q5_1_ref", codes=codes)
