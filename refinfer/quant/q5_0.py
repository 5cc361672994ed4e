"""q5_0: 32 weights -> fp16 scale and 32 signed 5-bit codes (22 bytes, 5.5 bits/weight).

    byte 0..1   d       fp16 scale
    byte 2..5   qh[4]   little-endian uint32; bit i = 5th (high) bit of element i
    byte 6..21  qs[16]  low 4 bits: qs[j] low nibble = element j, high nibble = element j+16

    w = (q - 16) * d,  q = low4 | high1 << 4 in 0..31, grid [-16, 15] * d.

Quantize (ggml `quantize_row_q5_0_ref`): as q4_0 with d = max / -16 and
codes = min(31, trunc(x/d + 16.5)).
"""

import numpy as np

from ._common import (F32, BlockType, as_blocks, blocks_to_bytes, c_float_to_int8, f32_to_fp16_bits,
                      first_absmax, fp16_to_f32, new_blocks, pack_qh, safe_reciprocal, split_nibbles,
                      unpack_qh)

QK5_0 = 32
block_q5_0 = np.dtype([("d", "<u2"), ("qh", "u1", (4,)), ("qs", "u1", (QK5_0 // 2,))])
assert block_q5_0.itemsize == 2 + 4 + QK5_0 // 2


def codes(raw):  # uint8[n, 22] -> (q int8[n, 1, 32], d float32[n, 1], None): w = d * q
    b = as_blocks(raw, block_q5_0)
    q = (split_nibbles(b["qs"]) | (unpack_qh(b["qh"]) << 4)).astype(np.int8) - np.int8(16)
    return q[:, None], fp16_to_f32(b["d"])[:, None], None


def dequantize_blocks(raw):  # uint8[n, 22] -> float32[n, 32]
    q, d, _ = codes(raw)
    return q[:, 0].astype(np.float32) * d


def quantize_blocks(x):  # float32[n, 32] -> uint8[n, 22]
    max_ = first_absmax(x)
    d = max_ / F32(-16)
    idv = safe_reciprocal(d)
    codes = np.minimum(31, c_float_to_int8(x * idv[:, None] + F32(16.5))) & 0xFF
    b = new_blocks(len(x), block_q5_0)
    b["d"] = f32_to_fp16_bits(d)
    b["qs"] = (codes[:, :16] & 0x0F) | ((codes[:, 16:] & 0x0F) << 4)
    b["qh"] = pack_qh((codes & 0x10) >> 4)
    return blocks_to_bytes(b)


BLOCK = BlockType("q5_0", 6, QK5_0, block_q5_0, dequantize_blocks, quantize_blocks,
                  ggml_quantize="quantize_row_q5_0_ref", codes=codes)
