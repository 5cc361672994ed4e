"""Scalar conventions shared by the block formats, written to match ggml's C bit for bit.

All arithmetic is float32; a float64 intermediate would round differently (see
ggml-numerics notes: `x32 * id32 + 8.5` promotes to float64 in NumPy scalar code).
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def fp16_to_f32(bits: np.ndarray) -> np.ndarray:
    """IEEE binary16 bit patterns (uint16, any shape) -> float32 (exact)."""
    return np.asarray(bits, dtype="<u2").view(np.float16).astype(np.float32)


def f32_to_fp16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> binary16 bits, round-to-nearest-even with subnormals, overflow to inf.

    Matches ggml's GGML_FP32_TO_FP16 (F16C `vcvtps2ph` and the portable fallback) on every
    non-NaN input; NaN never reaches here because quantize() rejects non-finite input.
    """
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=np.float32).astype("<f2").view("<u2")


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32: the bits are the top half of a float32."""
    return (np.asarray(bits, dtype="<u2").astype("<u4") << 16).view("<f4")


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits as ggml_compute_fp32_to_bf16: round to nearest even,
    NaN kept quiet with bit 6 set."""
    u = np.asarray(x, dtype="<f4").view("<u4").astype(np.uint64)
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(is_nan, (u >> 16) | 64, rounded).astype("<u2")


def c_float_to_int8(t: np.ndarray) -> np.ndarray:
    """C `(int8_t)t` / `(uint8_t)t` for float32 t, as compiled for x86-64.

    The compiler converts through a 32-bit integer (cvttss2si: truncate toward zero; NaN,
    inf and out-of-range give 0x80000000) and keeps the low byte. In-range values simply
    truncate; the rest only arises for degenerate scales (e.g. float32-subnormal blocks,
    where 1/d overflows). Returned as int32 holding the low byte's signed value.
    """
    t = np.asarray(t, dtype=np.float32)
    ok = np.isfinite(t) & (np.abs(t) < F32(2.0**31))
    i32 = np.where(ok, np.trunc(np.where(ok, t, F32(0))), F32(0)).astype(np.int64)
    i32 = np.where(ok, i32, -(2**31))
    return ((i32 & 0xFF) ^ 0x80) - 0x80


def roundf(x: np.ndarray) -> np.ndarray:
    """C roundf: half AWAY from zero (NumPy's rint is half to even). Returns float32.

    Computed as floor(|x|) + (frac >= 0.5) because `trunc(x + 0.5)` is wrong for
    x = 0.49999997 (the sum rounds up to 1.0 in float32).
    """
    x = np.asarray(x, dtype=np.float32)
    a = np.abs(x)
    fl = np.floor(a)
    r = fl + (a - fl >= F32(0.5)).astype(np.float32)
    return np.copysign(r, x).astype(np.float32)


def nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int (K-quants, q8_K): round half to even, valid for |x| <= 4194303."""
    return np.rint(np.asarray(x, dtype=np.float32)).astype(np.int32)


def first_absmax(x: np.ndarray) -> np.ndarray:
    """Per row, the signed value with the largest |x|, first one winning ties; 0.0 for an
    all-zero row. Matches the `if (amax < fabsf(v)) { amax = fabsf(v); max = v; }` scan that
    starts from amax = max = 0.0f (so a row of -0.0 gives +0.0, not -0.0)."""
    idx = np.argmax(np.abs(x), axis=-1)
    v = np.take_along_axis(x, idx[..., None], axis=-1)[..., 0]
    return np.where(np.abs(v) > 0, v, F32(0.0)).astype(np.float32)


def safe_reciprocal(d: np.ndarray) -> np.ndarray:
    """`d ? 1.0f/d : 0.0f` in float32."""
    d = np.asarray(d, dtype=np.float32)
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(d != 0, F32(1.0) / np.where(d != 0, d, F32(1.0)), F32(0.0)).astype(np.float32)


def split_nibbles(qs: np.ndarray) -> np.ndarray:
    """qs[..., 16] -> codes[..., 32]: element j is the LOW nibble of qs[j], element j+16 the
    HIGH nibble (ggml's layout for q4_0/q4_1/q5_0/q5_1; not adjacent pairs)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def unpack_qh(qh: np.ndarray) -> np.ndarray:
    """qh[..., 4] bytes, read as a little-endian uint32 -> bits[..., 32]: bit i is element i's
    5th bit (q5_0/q5_1)."""
    return np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")


def pack_qh(bits: np.ndarray) -> np.ndarray:
    """bits[..., 32] (0/1) -> qh[..., 4], inverse of unpack_qh."""
    return np.packbits(bits.astype(np.uint8), axis=-1, bitorder="little")


class BlockType:
    """One ggml block type: its layout (a NumPy structured dtype whose fields follow ggml's
    block_* struct) and its reference dequantize/quantize over rows of whole blocks.

    dequantize_blocks: uint8[n, type_size] -> float32[n, block_size]
    quantize_blocks:   float32[n, block_size] -> uint8[n, type_size]  (None: not implemented)
    codes:             uint8[n, type_size] -> (q int8/uint8[n, S, B], d float32[n, S], m float32[n, S]
                       or None): the integer codes of w = d * q + m per sub-block of B elements,
                       with d and m the float32 values dequantize_row_* computes (None: a float type)
    """

    def __init__(self, name, type_id, block_size, layout, dequantize_blocks, quantize_blocks,
                 *, ggml_quantize=None, activation_only=False, codes=None):
        self.name = name
        self.type_id = type_id
        self.block_size = block_size
        self.layout = np.dtype(layout)
        self.type_size = self.layout.itemsize
        self.dequantize_blocks = dequantize_blocks
        self.codes = codes
        self.quantize_blocks = quantize_blocks
        self.ggml_quantize = ggml_quantize  # the ggml function whose bytes quantize_blocks equals
        self.activation_only = activation_only  # q8_1/q8_K: vec_dot types, never in model files

    def __repr__(self):
        return f"BlockType({self.name}, id={self.type_id}, {self.block_size} per {self.type_size} bytes)"


def as_blocks(raw: np.ndarray, layout: np.dtype) -> np.ndarray:
    """uint8[n, itemsize] -> structured[n] view with ggml's field names."""
    return np.ascontiguousarray(raw, dtype=np.uint8).view(layout)[:, 0]


def new_blocks(n: int, layout: np.dtype) -> np.ndarray:
    return np.zeros(n, dtype=layout)


def blocks_to_bytes(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.uint8).reshape(len(blocks), blocks.dtype.itemsize)


def nearest_int_c(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int (ggml-quants.c) exactly as it runs: add 1.5 * 2**23 in float32 and
    read the low mantissa bits back. For |x| <= 4194303 that is round half to even (the same as
    nearest_int above); beyond that range, and for NaN/inf (which degenerate fp16 scales can
    produce inside the K-quant searches), it returns the same wrapped value the C code does.
    Returns int32."""
    v = (np.asarray(x, dtype=np.float32) + F32(12582912.0)).view(np.int32)
    return (v & 0x007FFFFF) - 0x00400000


def map_chunks(fn, x: np.ndarray, type_size: int, chunk: int = 4096) -> np.ndarray:
    """fn over float32[n, block_size] in row chunks -> uint8[n, type_size]; bounds the
    temporaries of the vectorized K-quant searches (each holds a few arrays per chunk row)."""
    out = np.empty((len(x), type_size), dtype=np.uint8)
    for start in range(0, len(x), chunk):
        out[start:start + chunk] = fn(np.asarray(x[start:start + chunk], dtype=np.float32))
    return out
