"""q8_K: 256 values -> a float32 scale, 256 int8 codes and 16 int16 partial sums (292 bytes).
The activation type of the K-quant dot products in llama.cpp's CPU backend; never stored in
model files.

    byte 0..3     d          float32 scale (not fp16)
    byte 4..259   qs[256]    int8 codes, element order
    byte 260..291 bsums[16]  int16, bsums[j] = sum of qs[16j .. 16j+15] (lets a dot product
                             apply a sub-block min without touching the codes)

    w = d * q.

Quantize (ggml `quantize_row_q8_K_ref`): max = the signed element of largest |x| (first one
wins ties); iscale = -127/max; q = min(127, nearest_int(iscale * x)) with nearest_int rounding
half to even; d = 1/iscale. An all-zero block is written as zeros. Because the sign of max is
kept, the element of largest |x| gets code -127 and all codes lie in -127..127.
"""

import numpy as np

from ._common import F32, BlockType, as_blocks, blocks_to_bytes, nearest_int_c, new_blocks
from .q6_K import signed_absmax

QK_K = 256
block_q8_K = np.dtype([("d", "<f4"), ("qs", "i1", (QK_K,)), ("bsums", "<i2", (QK_K // 16,))])
assert block_q8_K.itemsize == 4 + 256 + 32


def dequantize_blocks(raw):  # uint8[n, 292] -> float32[n, 256]
    b = as_blocks(raw, block_q8_K)
    with np.errstate(all="ignore"):  # random bytes: inf/NaN scales propagate as in C
        return b["d"].astype(np.float32)[:, None] * b["qs"].astype(np.float32)


def quantize_blocks(x):  # float32[n, 256] -> uint8[n, 292]
    x = np.asarray(x, dtype=np.float32)
    max_, amax = signed_absmax(x)
    zero = amax == 0
    with np.errstate(all="ignore"):
        iscale = F32(-127) / max_
        # MIN(127, v) stored into an int8_t: the low byte, signed (a no-op for finite input)
        q = np.minimum(127, nearest_int_c(iscale[:, None] * x))
        q = np.where(zero[:, None], 0, ((q & 0xFF) ^ 0x80) - 0x80)
        d = np.where(zero, F32(0), F32(1) / iscale)
    b = new_blocks(len(x), block_q8_K)
    b["d"] = d
    b["qs"] = q
    b["bsums"] = q.reshape(len(x), 16, 16).sum(axis=-1)
    return blocks_to_bytes(b)


BLOCK = BlockType("q8_K", 15, QK_K, block_q8_K, dequantize_blocks, quantize_blocks,
                  ggml_quantize="quantize_row_q8_K_ref", activation_only=True)
