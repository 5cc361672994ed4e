"""GPTQ checkpoints (AutoGPTQ 0.7.1, GPTQ-for-LLaMa, GPTQModel): qweight, qzeros, scales, g_idx.

One nn.Linear with K inputs, N outputs, b bits, group size gs (-1: one group, gs = K),
G = ceil(K / gs). Tensors are stored transposed to refinfer's (rows N, cols K) orientation:

    qweight  int32 [K*b/32, N]  codes packed along K: column n of word row r holds
                                codes of inputs 32r/b ..; dense LSB-first (packing.py),
                                so 3-bit codes straddle words (3 words per 32 codes)
    qzeros   int32 [G, N*b/32]  stored zeros packed along N, same bit order
    scales   fp16  [G, N]
    g_idx    int32 [K]          group of input k: k // gs, or act-order's (desc_act) order

    4-bit qweight word (one column n, inputs k = 8r .. 8r+7):
        bit 31      28 27      24         7       4 3       0
           [ k=8r+7  ][ k=8r+6  ]  ...  [ k=8r+1 ][  k=8r   ]

Zero points, v1 ("gptq", what AutoGPTQ writes) vs v2 ("gptq_v2", GPTQModel's internal form):
- v2 stores the true zero z.
- v1 stores z - 1 (AutoGPTQ QuantLinear.pack: `zeros -= 1` in uint32), and AutoGPTQ adds the
  1 back when it dequantizes. A true zero of 0 is stored as -1 = 0xFFFFFFFF shifted into place:
  every higher field of that word becomes all ones (quant-methods §8 pitfall 1).
  How the 1 is added back depends on the QuantLinear AutoGPTQ picks on a CPU
  (auto_gptq/utils/import_utils.py dynamically_import_QuantLinear, no CUDA kernels):
    qlinear_cuda_old (no act-order, or gs = -1), 2/4/8-bit:  z = (stored + 1) & maxq
    qlinear_cuda_old 3-bit, and qlinear_cuda (act-order):    z = (stored & maxq) + 1
  so a stored field of maxq (the zero-0 case) reads as 0 in the first and as 2^b in the
  second. refinfer reproduces both, and the loader reports every such field.
- symmetric checkpoints have z = 2^(b-1): 4-bit qzeros words are 0x77777777 in v1 and
  0x88888888 in v2 (8-bit: 0x7f7f7f7f / 0x80808080), which is how the loader tells them apart.

Dequantization (AutoGPTQ's torch forward, both QuantLinears):
    W[n, k] = fp16( scales[g, n] * (code[k, n] - z[g, n]) ),  g = g_idx[k]
(qlinear_cuda_old groups rows by k // gs and ignores g_idx; qlinear_cuda indexes by g_idx.)

static_groups only changes how the quantizer chose its groups, hence g_idx; the layout is the
same.
"""

from __future__ import annotations

import numpy as np

from .packing import pack_rows, unpack_rows, words_for

BITS = (2, 3, 4, 8)
SYM_ZERO_WORDS = {4: (0x77777777, 0x88888888), 8: (0x7F7F7F7F, 0x80808080)}  # (v1, v2)


def autogptq_qlinear(desc_act: bool, group_size: int) -> str:
    """The QuantLinear AutoGPTQ 0.7.1 uses without CUDA kernels (its `dynamically_import_QuantLinear`)."""
    return "qlinear_cuda" if desc_act and group_size != -1 else "qlinear_cuda_old"


def qweight_shape(N: int, K: int, bits: int) -> tuple:
    return (K * bits // 32, N)


def qzeros_shape(N: int, G: int, bits: int) -> tuple:
    return (G, words_for(N, bits))


def unpack_qweight(qweight: np.ndarray, bits: int, K: int) -> np.ndarray:  # int32[K*b/32, N] -> uint8[N, K]
    return unpack_rows(np.ascontiguousarray(qweight.T), bits, K)


def unpack_qzeros(qzeros: np.ndarray, bits: int, N: int) -> np.ndarray:  # int32[G, N*b/32] -> stored uint8[N, G]
    return np.ascontiguousarray(unpack_rows(qzeros, bits, N).T)


def zeros_from_stored(stored: np.ndarray, bits: int, fmt: str, qlinear: str) -> np.ndarray:
    """The zero AutoGPTQ's dequantization subtracts (int16[N, G]) from the stored fields."""
    stored = stored.astype(np.int16)
    if fmt == "gptq_v2":
        return stored
    maxq = (1 << bits) - 1
    if qlinear == "qlinear_cuda_old" and bits != 3:
        return (stored + 1) & maxq
    return (stored & maxq) + 1


def stored_from_zeros(zeros: np.ndarray, bits: int, fmt: str) -> np.ndarray:
    """Inverse of zeros_from_stored for true zeros 0..maxq. v1 stores z - 1 masked to its field,
    so a zero of 0 does not spill into its neighbours as AutoGPTQ's uint32 pack makes it do."""
    zeros = np.asarray(zeros, np.int16)
    if fmt == "gptq_v2":
        return zeros.astype(np.uint8)
    return ((zeros - 1) & ((1 << bits) - 1)).astype(np.uint8)


def pack_qweight(codes: np.ndarray, bits: int) -> np.ndarray:  # uint8[N, K] -> int32[K*b/32, N]
    return np.ascontiguousarray(pack_rows(codes, bits).T)


def pack_qzeros(stored: np.ndarray, bits: int) -> np.ndarray:  # stored uint8[N, G] -> int32[G, N*b/32]
    return pack_rows(np.ascontiguousarray(stored.T), bits)


def default_g_idx(K: int, group_size: int) -> np.ndarray:
    gs = K if group_size == -1 else group_size
    return (np.arange(K) // gs).astype(np.int32)
