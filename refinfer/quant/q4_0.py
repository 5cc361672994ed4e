"""q4_0: 32 weights -> one fp16 scale and 32 signed 4-bit codes (18 bytes, 4.5 bits/weight).

    byte 0..1   d       fp16 scale
    byte 2..17  qs[16]  qs[j] low nibble = code of element j, high nibble = element j+16

    w = (q - 8) * d,  q in 0..15, so the grid is [-8, 7] * d.

Quantize (ggml `quantize_row_q4_0_ref`): max is the signed element of largest |x| (first one
wins ties); d = max / -8 so that max itself maps to code 0 (-8*d = max); codes are
min(15, trunc(x/d + 8.5)) computed with the UNROUNDED float32 d and id = 1/d.
"""

import numpy as np

from ._common import (F32, BlockType, as_blocks, blocks_to_bytes, c_float_to_int8, f32_to_fp16_bits,
                      first_absmax, fp16_to_f32, new_blocks, safe_reciprocal, split_nibbles)

QK4_0 = 32
block_q4_0 = np.dtype([("d", "<u2"), ("qs", "u1", (QK4_0 // 2,))])
assert block_q4_0.itemsize == 2 + QK4_0 // 2


def codes(raw):  # uint8[n, 18] -> (q int8[n, 1, 32], d float32[n, 1], None): w = d * q
    b = as_blocks(raw, block_q4_0)
    q = split_nibbles(b["qs"]).astype(np.int8) - np.int8(8)
    return q[:, None], fp16_to_f32(b["d"])[:, None], None


def dequantize_blocks(raw):  # uint8[n, 18] -> float32[n, 32]
    q, d, _ = codes(raw)
    return q[:, 0].astype(np.float32) * d


def quantize_blocks(x):  # float32[n, 32] -> uint8[n, 18]
    max_ = first_absmax(x)
    d = max_ / F32(-8)
    idv = safe_reciprocal(d)
    codes = np.minimum(15, c_float_to_int8(x * idv[:, None] + F32(8.5)))
    b = new_blocks(len(x), block_q4_0)
    b["d"] = f32_to_fp16_bits(d)
    # C stores MIN(15, code) as uint8 with no mask; only degenerate (negative) codes differ
    # from masking, and they are emulated by c_float_to_int8's wrap-around.
    lo, hi = codes[:, :16] & 0xFF, codes[:, 16:] & 0xFF
    b["qs"] = (lo | (hi << 4)) & 0xFF
    return blocks_to_bytes(b)


BLOCK = BlockType("q4_0", 2, QK4_0, block_q4_0, dequantize_blocks, quantize_blocks,
                  ggml_quantize="quantize_row_q4_0_ref", codes=codes)
