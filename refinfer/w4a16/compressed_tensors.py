"""compressed-tensors "pack-quantized" checkpoints (llm-compressor's W4A16 and friends, 0.20.0).

One Linear with K inputs, N outputs, b = num_bits (1..8; 2..8 in practice), G groups:

    weight_packed      int32 [N, ceil(K*b/32)]  codes of row n packed along K, dense LSB-first
                                                (packing.py: codes may straddle words)
    weight_scale       [N, G]                    scale dtype = model dtype (fp16, bf16, fp32);
                                                strategy "group": G = ceil(K / group_size),
                                                strategy "channel": G = 1
    weight_zero_point  int32 [ceil(N*b/32), G]   asymmetric only, packed along N (dim 0)
    weight_shape       int64 [2]                 (N, K)

Codes and zero points are signed in [-2^(b-1), 2^(b-1) - 1]; pack_to_int32 adds 2^(b-1)
before packing and unpack_from_int32 subtracts it (compressors/pack_quantized/helpers.py).
refinfer keeps the unsigned fields, which changes nothing in the difference:

    W[n, k] = rnd( (q - zp) * scale ),  in the scale dtype (quantization/lifecycle/forward.py
              dequantize -> forward_helpers._dequantize)
            = rnd( scale * (field_q - field_zp) )
    symmetric: no zero point tensor, zp = 0, i.e. field_zp = 2^(b-1).
"""

from __future__ import annotations

import numpy as np

from .packing import pack_rows, unpack_rows, words_for

BITS = tuple(range(2, 9))


def offset(bits: int) -> int:
    return 1 << (bits - 1)


def weight_packed_shape(N: int, K: int, bits: int) -> tuple:
    return (N, words_for(K, bits))


def zero_point_shape(N: int, G: int, bits: int) -> tuple:
    return (words_for(N, bits), G)


def unpack_weight(weight_packed: np.ndarray, bits: int, K: int) -> np.ndarray:  # -> uint8[N, K] (code + 2^(b-1))
    return unpack_rows(weight_packed, bits, K)


def unpack_zero_point(zero_point: np.ndarray, bits: int, N: int) -> np.ndarray:  # -> int16[N, G] (zp + 2^(b-1))
    return np.ascontiguousarray(unpack_rows(np.ascontiguousarray(zero_point.T), bits, N).T).astype(np.int16)


def pack_weight(codes: np.ndarray, bits: int) -> np.ndarray:
    return pack_rows(codes, bits)


def pack_zero_point(zeros: np.ndarray, bits: int) -> np.ndarray:  # int16[N, G] -> int32[ceil(N*b/32), G]
    return np.ascontiguousarray(pack_rows(np.ascontiguousarray(np.asarray(zeros).T.astype(np.uint8)), bits).T)
