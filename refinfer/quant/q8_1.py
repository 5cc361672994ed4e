"""q8_1: 32 activations -> fp16 scale, fp16 sum and 32 int8 codes (36 bytes).

    byte 0..1   d       fp16 scale
    byte 2..3   s       fp16(d_f32 * sum(qs)): lets q4_1/q5_1 dots add m * sum(x) cheaply
    byte 4..35  qs[32]  int8 codes

    x = q * d.

The activation (vec_dot) type of q4_1 and q5_1 in llama.cpp's CPU backend; ggml has no
dequantize for it, refinfer's is the obvious q * d. Quantize matches `quantize_row_q8_1_ref`:
codes as q8_0 (roundf), s computed with the unrounded float32 d.
"""

import numpy as np

from ._common import BlockType, as_blocks, blocks_to_bytes, f32_to_fp16_bits, fp16_to_f32, new_blocks
from .q8_0 import scale_and_codes

QK8_1 = 32
block_q8_1 = np.dtype([("d", "<u2"), ("s", "<u2"), ("qs", "i1", (QK8_1,))])
assert block_q8_1.itemsize == 2 + 2 + QK8_1


def dequantize_blocks(raw):  # uint8[n, 36] -> float32[n, 32]
    b = as_blocks(raw, block_q8_1)
    return b["qs"].astype(np.float32) * fp16_to_f32(b["d"])[:, None]


def quantize_blocks(x):  # float32[n, 32] -> uint8[n, 36]
    d, codes = scale_and_codes(x)
    b = new_blocks(len(x), block_q8_1)
    b["d"] = f32_to_fp16_bits(d)
    b["qs"] = codes
    # C sums the stored int8 codes; they differ from `codes` when 1/d overflowed (amax < ~4e-37)
    b["s"] = f32_to_fp16_bits(b["qs"].astype(np.int32).sum(axis=-1).astype(np.float32) * d)
    return blocks_to_bytes(b)


BLOCK = BlockType("q8_1", 9, QK8_1, block_q8_1, dequantize_blocks, quantize_blocks,
                  ggml_quantize="quantize_row_q8_1_ref", activation_only=True)
