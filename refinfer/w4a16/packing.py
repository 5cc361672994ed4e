"""Dense LSB-first bit packing into 32-bit words: the one packing every W4A16 layout uses.

Element i of a row of b-bit codes occupies bits i*b .. i*b+b-1 of the row's bit stream, and
word j holds stream bits 32j .. 32j+31 (bit 0 = least significant). For b = 2, 4, 8 that is the
classic "32/b codes per word, code j at shift b*j"; for b = 3, 5, 6, 7 a code may straddle two
words. 3-bit, 32 codes in 3 words (AutoGPTQ's QuantLinear.pack bits == 3 writes exactly this):

    word0  v0..v9 at bits 0,3,...,27   v10 bits 0-1 at 30-31
    word1  v10 bit 2 at 0              v11..v20 at bits 1,4,...,28   v21 bit 0 at 31
    word2  v21 bits 1-2 at 0-1         v22..v31 at bits 2,5,...,29

compressed-tensors' pack_to_int32/unpack_from_int32 (0.20) pack the same stream, padded to a
whole number of 32-code groups and cut to ceil(n*b/32) words. The last word's unused high bits
are zero when written and ignored when read.
"""

from __future__ import annotations

import numpy as np


def words_for(n_codes: int, bits: int) -> int:
    return (n_codes * bits + 31) // 32


def unpack_rows(words: np.ndarray, bits: int, n_codes: int) -> np.ndarray:  # int32[R, W] -> uint8[R, n_codes]
    words = np.ascontiguousarray(words).astype("<u4", copy=False)
    R = words.shape[0]
    stream = np.unpackbits(words.view(np.uint8).reshape(R, -1), axis=1, bitorder="little")  # [R, 32W]
    fields = stream[:, :n_codes * bits].reshape(R, n_codes, bits)
    return np.packbits(fields, axis=2, bitorder="little")[:, :, 0]


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:  # uint8[R, n] -> int32[R, words_for(n, bits)]
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    R, n = codes.shape
    fields = np.unpackbits(codes[:, :, None], axis=2, count=bits, bitorder="little").reshape(R, n * bits)
    W = words_for(n, bits)
    stream = np.zeros((R, 32 * W), np.uint8)
    stream[:, :n * bits] = fields
    return np.packbits(stream, axis=1, bitorder="little").view("<u4").view(np.int32).reshape(R, W)
