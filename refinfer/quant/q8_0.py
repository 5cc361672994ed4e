"""q8_0: 32 weights -> fp16 scale and 32 int8 codes (34 bytes, 8.5 bits/weight).

    byte 0..1   d       fp16 scale
    byte 2..33  qs[32]  int8 codes, element order

    w = q * d.

Quantize (ggml `quantize_row_q8_0_ref`): d = max|x| / 127; q = roundf(x / d), where roundf
rounds half AWAY from zero (not NumPy's half-to-even). Also the activation type of the
q4_0/q5_0/q8_0 dot products in llama.cpp's CPU backend.

llama.cpp's x86 CPU backend quantizes with its own `quantize_row_q8_0` (ggml-cpu/arch/x86/
quants.c; the type's from_float, which ggml_set_rows uses to store a q8_0 KV cache):
q = round-half-even(x * (127 / max|x|)) (`_mm256_round_ps`, _MM_ROUND_NEAREST), the same d.
It rarely differs from the _ref codes (quantize_blocks_x86).
"""

import numpy as np

from ._common import (F32, BlockType, as_blocks, blocks_to_bytes, f32_to_fp16_bits, fp16_to_f32,
                      new_blocks, roundf, safe_reciprocal)

QK8_0 = 32
block_q8_0 = np.dtype([("d", "<u2"), ("qs", "i1", (QK8_0,))])
assert block_q8_0.itemsize == 2 + QK8_0


def codes(raw):  # uint8[n, 34] -> (q int8[n, 1, 32], d float32[n, 1], None): w = d * q
    b = as_blocks(raw, block_q8_0)
    return b["qs"][:, None], fp16_to_f32(b["d"])[:, None], None


def dequantize_blocks(raw):  # uint8[n, 34] -> float32[n, 32]
    q, d, _ = codes(raw)
    return q[:, 0].astype(np.float32) * d


def scale_and_codes(x):
    """(d float32[n], codes int32[n, 32]) shared by q8_0 and q8_1."""
    amax = np.max(np.abs(x), axis=-1)
    d = amax / F32(127)
    codes = roundf(x * safe_reciprocal(d)[:, None]).astype(np.int32)
    return d, codes


def quantize_blocks(x):  # float32[n, 32] -> uint8[n, 34]
    d, codes = scale_and_codes(x)
    b = new_blocks(len(x), block_q8_0)
    b["d"] = f32_to_fp16_bits(d)
    b["qs"] = codes
    return blocks_to_bytes(b)


def quantize_blocks_x86(x):  # float32[n, 32] -> uint8[n, 34], as the x86 quantize_row_q8_0
    x = np.asarray(x, dtype=np.float32)
    amax = np.max(np.abs(x), axis=-1)
    d = amax / F32(127)
    with np.errstate(divide="ignore"):
        idv = np.where(amax != 0, F32(127) / np.where(amax != 0, amax, F32(1)), F32(0)).astype(np.float32)
    b = new_blocks(len(x), block_q8_0)
    b["d"] = f32_to_fp16_bits(d)
    b["qs"] = np.rint(x * idv[:, None]).astype(np.int32)
    return blocks_to_bytes(b)


BLOCK = BlockType("q8_0", 8, QK8_0, block_q8_0, dequantize_blocks, quantize_blocks,
                  ggml_quantize="quantize_row_q8_0_ref", codes=codes)
