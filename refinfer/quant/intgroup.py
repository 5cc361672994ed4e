"""The packed integer-group weight type: what GPTQ, AWQ and compressed-tensors checkpoints
(W4A16 and friends) hold once their container layout is unpacked.

One Linear W (rows = out_features N, cols = in_features K), as every producer defines it:

    W[n, k] = rnd( scales[n, g] * (codes[n, k] - zeros[n, g]) ),   g = g_idx[k]

    codes   uint8[N, K]    unsigned codes 0 .. 2^bits - 1 (compressed-tensors' signed codes
                           are stored + 2^(bits-1), its zero points likewise)
    zeros   int16[N, G]    the zero each library's dequantization really subtracts (GPTQ v1:
                           the stored zero + 1, masked, as AutoGPTQ computes it; see layouts)
    scales  float32[N, G]  exact values of the stored scales (fp16, bf16 or fp32)
    g_idx   int32[K]       group of input column k: k // group_size, or act-order's order
    rnd                    rounding to the scales' dtype: torch computes the product in that
                           dtype, so fp16 scales give an fp16 weight ("the weights as
                           deployed", the default); rounding="exact" keeps the float32 product

The product is exact in float32 (a 16-bit-or-narrower significand times an integer below
2^9), so rnd is the only rounding: it is the single rounding of torch's fp16 multiply in
AutoGPTQ's, AutoAWQ's and compressed-tensors' dequantization.

"A16" (W4A16): the kernels that deploy these checkpoints (exllama, Marlin, AutoGPTQ's CUDA
kernels) take fp16 activations and write fp16 outputs, accumulating in fp32 or fp16. a16=True
(refinfer.load(..., a16=True), a backend option) emulates the roundings at the boundary: the input rounded to fp16, the float32 result rounded
to fp16. The accumulation itself stays the mode's (a kernel's own summation order is not
reproduced). The default (a16=False) is the float32 model over the deployed weights.

The codes are kept one per byte, unpacked once at load: the layouts (refinfer/w4a16/) only
parse, and every backend reads the same arrays.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import ShapeError, UnsupportedError
from ._common import bf16_to_f32, f32_to_bf16_bits, f32_to_fp16_bits, fp16_to_f32

ROUNDINGS = ("f16", "bf16", "f32", "exact")


def round_to(x: np.ndarray, rounding: str) -> np.ndarray:
    """float32 x rounded to the named dtype's values (round to nearest even), as float32."""
    if rounding == "f16":
        return fp16_to_f32(f32_to_fp16_bits(x))
    if rounding == "bf16":
        return bf16_to_f32(f32_to_bf16_bits(x))
    if rounding in ("f32", "exact"):
        return np.asarray(x, np.float32)
    raise UnsupportedError(f"unknown weight rounding {rounding!r}; choose one of {', '.join(ROUNDINGS)}")


@dataclasses.dataclass(frozen=True)
class IntGroupType:
    """The registry entry backends dispatch on (QTensor.qtype's counterpart)."""
    name: str = "intg"
    block_size: int = 1


INTG = IntGroupType()


@dataclasses.dataclass(eq=False)
class IntGroupTensor:
    name: str
    codes: np.ndarray       # uint8[N, K]
    scales: np.ndarray      # float32[N, G]
    zeros: np.ndarray       # int16[N, G]
    g_idx: np.ndarray       # int32[K]
    bits: int
    rounding: str = "f16"   # see round_to; "exact" = no rounding of the product
    info: dict = dataclasses.field(default_factory=dict)  # method, format, group_size, act_order, ... (inspect)
    qtype: IntGroupType = INTG

    def __post_init__(self):
        N, K = self.codes.shape
        if self.codes.dtype != np.uint8 or self.scales.dtype != np.float32 or self.zeros.dtype != np.int16 \
                or self.g_idx.dtype != np.int32:
            raise ShapeError(f"{self.name}: IntGroupTensor wants uint8 codes, float32 scales, int16 zeros, "
                             f"int32 g_idx; got {self.codes.dtype}, {self.scales.dtype}, {self.zeros.dtype}, "
                             f"{self.g_idx.dtype}")
        G = self.scales.shape[1] if self.scales.ndim == 2 else -1
        if self.scales.shape != (N, G) or self.zeros.shape != (N, G) or self.g_idx.shape != (K,):
            raise ShapeError(f"{self.name}: codes {self.codes.shape}, scales {self.scales.shape}, zeros "
                             f"{self.zeros.shape}, g_idx {self.g_idx.shape} do not agree")
        if K and (int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= G):
            raise ShapeError(f"{self.name}: g_idx has groups {int(self.g_idx.min())}..{int(self.g_idx.max())}, "
                             f"but there are {G} groups of scales")
        if not 1 <= self.bits <= 8 or (K and int(self.codes.max()) >> self.bits):
            raise ShapeError(f"{self.name}: codes up to {int(self.codes.max()) if K else 0} do not fit {self.bits} bits")
        round_to(np.zeros(0, np.float32), self.rounding)

    @property
    def shape(self) -> tuple:
        return tuple(self.codes.shape)

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[1])

    def dequantize(self, rows=None) -> np.ndarray:  # -> float32[rows, K]
        sel = slice(None) if rows is None else rows
        codes = self.codes[sel].astype(np.int32)
        z = self.zeros[sel].astype(np.int32)[..., self.g_idx]       # [rows, K]
        s = self.scales[sel][..., self.g_idx]
        return round_to(s * (codes - z).astype(np.float32), self.rounding)

    def table(self) -> np.ndarray:
        """float32[N, G, 2^bits]: every weight value a (row, group) can take, indexed by code.
        W[n, k] = table[n, g_idx[k], codes[n, k]]: the backends' fused kernels read this."""
        q = np.arange(1 << self.bits, dtype=np.int32)
        t = self.scales[:, :, None] * (q[None, None, :] - self.zeros.astype(np.int32)[:, :, None]).astype(np.float32)
        return round_to(t, self.rounding)

    def kernel_tables(self):
        """(codes uint8[N, K], table float32[N, G', L], g_idx int32[K]) for the fused kernels, with
        W[n, k] = table[n, g_idx[k], codes[n, k]]: the per-group tables, or, where those would be
        larger than the float32 weights (8-bit with small groups), the dense weights as a one-entry
        table per column (codes 0, g_idx = k)."""
        N, K = self.shape
        if N * self.n_groups << self.bits <= N * K:
            return self.codes, self.table(), self.g_idx
        return np.zeros((N, K), np.uint8), self.dequantize()[:, :, None], np.arange(K, dtype=np.int32)

    def take_rows(self, idx, name=None) -> "IntGroupTensor":
        """The rows idx (output features) in that order: the loader's q/k permutation."""
        idx = np.asarray(idx)
        return dataclasses.replace(self, name=name or self.name, codes=np.ascontiguousarray(self.codes[idx]),
                                   scales=np.ascontiguousarray(self.scales[idx]),
                                   zeros=np.ascontiguousarray(self.zeros[idx]))

    def with_rounding(self, rounding: str) -> "IntGroupTensor":
        return dataclasses.replace(self, rounding=rounding)

    @property
    def nbytes(self) -> int:
        """Bytes as stored in a checkpoint: bits per code, plus 16-bit scales and zeros per group, plus g_idx
        when act-order needs it (what "real bits per weight" counts)."""
        N, K = self.shape
        packed = (N * K * self.bits + 7) // 8
        per_group = N * self.n_groups * (2 + self.bits / 8)
        return int(packed + per_group + (4 * K if self.info.get("act_order") else 0))

    @property
    def bits_per_weight(self) -> float:
        N, K = self.shape
        return 8.0 * self.nbytes / max(1, N * K)

    def release_pages(self):
        pass

    def __repr__(self):
        return f"IntGroupTensor({self.name!r}, {self.bits}-bit, {self.n_groups} groups, {self.shape})"


def from_weights(name, codes, scales, zeros, g_idx=None, *, bits, group_size=None, rounding="f16", info=None):
    """Build an IntGroupTensor from arrays in any integer/float dtype (checked, converted).
    g_idx defaults to k // group_size (group_size None or -1: one group per row)."""
    codes = np.asarray(codes)
    K = codes.shape[1]
    if g_idx is None:
        gs = K if group_size in (None, -1) else int(group_size)
        g_idx = np.arange(K) // gs
    return IntGroupTensor(name, np.ascontiguousarray(codes, np.uint8), np.ascontiguousarray(scales, np.float32),
                          np.ascontiguousarray(zeros, np.int16), np.ascontiguousarray(g_idx, np.int32),
                          int(bits), rounding, dict(info or {}))


__all__ = ["IntGroupTensor", "IntGroupType", "INTG", "ROUNDINGS", "round_to", "from_weights"]
