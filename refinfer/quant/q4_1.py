"""q4_1: 32 weights -> fp16 scale, fp16 minimum and 32 unsigned 4-bit codes (20 bytes, 5 bits/weight).

    byte 0..1   d       fp16 scale
    byte 2..3   m       fp16 minimum
    byte 4..19  qs[16]  qs[j] low nibble = element j, high nibble = element j+16

    w = q * d + m,  q in 0..15.

Quantize (ggml `quantize_row_q4_1_ref`): min/max by plain scans; d = (max - min) / 15;
codes = min(15, trunc((x - min) / d + 0.5)) with the unrounded float32 d and min.
"""

import numpy as np

from ._common import (F32, BlockType, as_blocks, blocks_to_bytes, c_float_to_int8, f32_to_fp16_bits,
                      fp16_to_f32, new_blocks, safe_reciprocal, split_nibbles)

QK4_1 = 32
block_q4_1 = np.dtype([("d", "<u2"), ("m", "<u2"), ("qs", "u1", (QK4_1 // 2,))])
assert block_q4_1.itemsize == 2 + 2 + QK4_1 // 2


def codes(raw):  # uint8[n, 20] -> (q uint8[n, 1, 32], d, m float32[n, 1]): w = d * q + m
    b = as_blocks(raw, block_q4_1)
    return split_nibbles(b["qs"])[:, None], fp16_to_f32(b["d"])[:, None], fp16_to_f32(b["m"])[:, None]


def dequantize_blocks(raw):  # uint8[n, 20] -> float32[n, 32]
    q, d, m = codes(raw)
    return q[:, 0].astype(np.float32) * d + m  # two roundings (no FMA), as dequantize_row_q4_1


def min_max(x):
    """First-occurrence min and max per row: the values ggml's `if (v < min)` / `if (v > max)`
    scans keep (this matters for signed zeros: fp16(-0.0) != fp16(+0.0))."""
    mn = np.take_along_axis(x, np.argmin(x, axis=-1)[:, None], axis=-1)[:, 0]
    mx = np.take_along_axis(x, np.argmax(x, axis=-1)[:, None], axis=-1)[:, 0]
    return mn, mx


def quantize_blocks(x):  # float32[n, 32] -> uint8[n, 20]
    mn, mx = min_max(x)
    with np.errstate(over="ignore"):
        d = (mx - mn) / F32(15)
    idv = safe_reciprocal(d)
    with np.errstate(over="ignore", invalid="ignore"):
        codes = np.minimum(15, c_float_to_int8((x - mn[:, None]) * idv[:, None] + F32(0.5)))
    b = new_blocks(len(x), block_q4_1)
    b["d"] = f32_to_fp16_bits(d)
    b["m"] = f32_to_fp16_bits(mn)
    lo, hi = codes[:, :16] & 0xFF, codes[:, 16:] & 0xFF
    b["qs"] = (lo | (hi << 4)) & 0xFF
    return blocks_to_bytes(b)


BLOCK = BlockType("q4_1", 3, QK4_1, block_q4_1, dequantize_blocks, quantize_blocks,
                  ggml_quantize="quantize_row_q4_1_ref", codes=codes)
