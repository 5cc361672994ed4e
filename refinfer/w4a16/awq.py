"""AWQ checkpoints (AutoAWQ 0.2.9, LMDeploy `lite auto_awq`): 4-bit codes, true zeros, fp16 scales.

GEMM layout (AutoAWQ WQLinear_GEMM.from_linear; what vLLM, transformers and LMDeploy read),
K inputs, N outputs, gs group size (-1: gs = K), G = K / gs:

    qweight  int32 [K, N/8]   codes packed along N, interleaved
    qzeros   int32 [G, N/8]   true zeros, packed the same way
    scales   fp16  [G, N]     (LMDeploy keeps the model dtype, e.g. bf16)

    word c of row k holds columns 8c .. 8c+7 in the order AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]:
        bit 31    28 27    24 23    20 19    16 15    12 11     8 7      4 3      0
           [ n=8c+7 ][ n=8c+5 ][ n=8c+3 ][ n=8c+1 ][ n=8c+6 ][ n=8c+4 ][ n=8c+2 ][  n=8c  ]
    i.e. nibble i holds column 8c + AWQ_ORDER[i]; unpacking takes nibbles in the order
    AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7] (AutoAWQ utils/packing_utils.py unpack_awq +
    reverse_awq_order).

    Dequantization (packing_utils.dequantize_gemm): W[n, k] = fp16((code - z[g, n]) * scales[g, n]),
    g = k // gs.

GEMV layout (AutoAWQ WQLinear_GEMV.from_linear; CUDA-only kernel), packed along K, natural order:

    qweight  int32 [N, K/8]   nibble i of word c holds input 8c + i
    qzeros   int32 [N, Zw]    zero of group g at nibble g % 8 of word g // 8; zero-padded words
    scales   fp16  [N, 8*Zw]  the first G columns hold the scales, the rest zeros
    Zw = calculate_zeros_width(K, gs): ceil(G / 8) rounded up to a multiple of 1, 2 or 4 for
         gs >= 128, 64, 32 (other group sizes: AutoAWQ raises NotImplementedError)

    The GEMV kernel (llm-awq's gemv_kernel_g64/g128, as shipped in AutoAWQ's awq_ext) computes
    `float dequantized_weight = scaling_factor * (q - zero)` in float32 with no fp16 rounding,
    so GEMV weights are the float32 product (rounding "f32").
"""

from __future__ import annotations

import numpy as np

from .packing import pack_rows, unpack_rows

BITS = 4
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # np.argsort(AWQ_ORDER)


def unpack_gemm_rows(words: np.ndarray, n_cols: int) -> np.ndarray:  # int32[R, n/8] -> uint8[R, n]
    nib = unpack_rows(words, BITS, words.shape[1] * 8)
    return np.ascontiguousarray(nib.reshape(len(words), -1, 8)[:, :, AWQ_REVERSE_ORDER].reshape(len(words), -1)[:, :n_cols])


def pack_gemm_rows(values: np.ndarray) -> np.ndarray:  # uint8[R, n] (n % 8 == 0) -> int32[R, n/8]
    values = np.asarray(values, np.uint8)
    R = len(values)
    return pack_rows(values.reshape(R, -1, 8)[:, :, AWQ_ORDER].reshape(R, -1), BITS)


def unpack_gemm(qweight, qzeros, scales):  # -> codes uint8[N, K], zeros int16[N, G], scales f32[N, G]
    N = qweight.shape[1] * 8
    codes = unpack_gemm_rows(qweight, N).T
    zeros = unpack_gemm_rows(qzeros, N).T.astype(np.int16)
    return np.ascontiguousarray(codes), np.ascontiguousarray(zeros), np.ascontiguousarray(scales.T, np.float32)


def pack_gemm(codes, zeros, scales):  # [N, K], [N, G], [N, G] -> qweight, qzeros, scales (fp16 [G, N])
    return (pack_gemm_rows(np.ascontiguousarray(codes.T)), pack_gemm_rows(np.ascontiguousarray(zeros.T)),
            np.ascontiguousarray(scales.T))


def calculate_zeros_width(in_features: int, group_size: int = 128, pack_num: int = 8) -> int | None:
    """AutoAWQ modules/linear/gemv.py calculate_zeros_width; None where it raises NotImplementedError."""
    multiplier = 1 if group_size >= 128 else {64: 2, 32: 4}.get(group_size)
    if multiplier is None:
        return None
    base = -(-(in_features // group_size) // pack_num)
    return -(-base // multiplier) * multiplier


def unpack_gemv(qweight, qzeros, scales, K: int, G: int):  # -> codes [N, K], zeros int16[N, G], scales f32[N, G]
    codes = unpack_rows(qweight, BITS, K)
    zeros = unpack_rows(qzeros, BITS, G).astype(np.int16)
    return codes, zeros, np.ascontiguousarray(scales[:, :G], np.float32)


def pack_gemv(codes, zeros, scales, group_size: int):  # -> qweight [N, K/8], qzeros [N, Zw], scales [N, 8*Zw]
    N, K = codes.shape
    Zw = calculate_zeros_width(K, group_size)
    qzeros = np.zeros((N, Zw), np.int32)
    packed = pack_rows(zeros, BITS)
    qzeros[:, :packed.shape[1]] = packed
    padded = np.zeros((N, 8 * Zw), scales.dtype)
    padded[:, :scales.shape[1]] = scales
    return pack_rows(codes, BITS), qzeros, padded
