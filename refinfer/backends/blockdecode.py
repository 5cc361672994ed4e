"""Per-element decoding of the ggml block formats, as plain scalar-argument Numba functions.

Every helper takes the bytes of one block (`blk`, a uint8 array starting at the block) and an
element index j, and returns what ggml's `dequantize_row_*` writes for that element, bit for
bit: the same float32 operations in the same order (see refinfer/quant/<type>.py for the
layouts). They use no NumPy array functions, so the same source also compiles as numba.cuda
device functions, and runs as plain Python under the CUDA simulator (hence the int() around
ldexp exponents: Python's math.ldexp accepts no NumPy integer). The float types take the whole
row as `blk` (their block is one element).

Integer-code helpers (`*_code`) return the signed integer q of w = d * q (+ m) that ggml's
vec_dot multiplies against the q8 activation codes.
"""

from __future__ import annotations

import math

import numpy as np

from .numba_kernels.jit import njit

# Kind numbers for the kernels' dispatch (a kernel is compiled once for all kinds).
F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = range(13)
KINDS = {"f32": F32, "f16": F16, "bf16": BF16, "q4_0": Q4_0, "q4_1": Q4_1, "q5_0": Q5_0,
         "q5_1": Q5_1, "q8_0": Q8_0, "q2_K": Q2_K, "q3_K": Q3_K, "q4_K": Q4_K, "q5_K": Q5_K,
         "q6_K": Q6_K}
LEGACY = (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)   # 32-element blocks with w = d*q (+ m)
KQUANTS = (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)  # 256-element super-blocks

_jit = njit(cache=True)


# ---- scalars --------------------------------------------------------------------------------
@_jit
def fp16_to_f32(h):
    """IEEE binary16 bits (an integer 0..65535) -> float32, exact (ldexp of an integer)."""
    h = np.int32(h)
    e = (h >> 10) & 0x1F
    mant = h & 0x3FF
    if e == 0:
        v = np.float32(math.ldexp(np.float64(mant), -24))             # subnormal: mant * 2^-24
    elif e == 31:
        v = np.float32(np.inf) if mant == 0 else np.float32(np.nan)
    else:
        v = np.float32(math.ldexp(np.float64(1024 + mant), int(e - 25)))   # (1.mant) * 2^(e-15)
    return -v if (h >> 15) & 1 else v


@_jit
def bf16_to_f32(h):
    """bfloat16 bits -> float32: the top half of a float32, decoded arithmetically."""
    h = np.int32(h)
    e = (h >> 7) & 0xFF
    mant = h & 0x7F
    if e == 0:
        v = np.float32(math.ldexp(np.float64(mant), -133))
    elif e == 255:
        v = np.float32(np.inf) if mant == 0 else np.float32(np.nan)
    else:
        v = np.float32(math.ldexp(np.float64(128 + mant), int(e - 134)))
    return -v if (h >> 15) & 1 else v


@_jit
def f32_from_bytes(b0, b1, b2, b3):
    """Four little-endian bytes of an IEEE binary32 -> its value."""
    u = np.int64(b0) | (np.int64(b1) << 8) | (np.int64(b2) << 16) | (np.int64(b3) << 24)
    e = (u >> 23) & 0xFF
    mant = u & 0x7FFFFF
    if e == 0:
        v = np.float32(math.ldexp(np.float64(mant), -149))
    elif e == 255:
        v = np.float32(np.inf) if mant == 0 else np.float32(np.nan)
    else:
        v = np.float32(math.ldexp(np.float64(0x800000 + mant), int(e - 150)))
    return -v if (u >> 31) & 1 else v


@_jit
def round_f16(x):
    """float32 -> the float32 value of its nearest binary16 (ties to even, subnormals,
    overflow to inf), as GGML_FP32_TO_FP16 followed by GGML_FP16_TO_FP32."""
    if x != x or x == 0.0 or math.isinf(x):
        return np.float32(x)
    m, e = math.frexp(np.float64(x))     # |x| = m * 2^e, 0.5 <= |m| < 1
    ulp = max(e - 11, -24)              # binary16 keeps 11 significant bits, down to 2^-24
    # exact scaling by a power of two, then round() half to even (np.rint does not compile for CUDA)
    r = round(math.ldexp(np.float64(x), -ulp))
    v = math.ldexp(np.float64(r), ulp)
    if abs(v) > 65504.0:
        return np.float32(math.copysign(np.inf, v))
    return np.float32(v)


@_jit
def by(blk, o):
    """Byte o as int32: Numba promotes uint8 mixed with int64 to float, so widen first."""
    return np.int32(blk[o])


@_jit
def u16(blk, o):
    return np.int32(blk[o]) | (np.int32(by(blk, o + 1)) << 8)


@_jit
def f16_at(blk, o):
    return fp16_to_f32(u16(blk, o))


# ---- float types (block of one element) ------------------------------------------------------
@_jit
def f32_value(blk, j):
    return f32_from_bytes(by(blk, 4 * j), by(blk, 4 * j + 1), by(blk, 4 * j + 2), by(blk, 4 * j + 3))


@_jit
def f16_value(blk, j):
    return f16_at(blk, 2 * j)


@_jit
def bf16_value(blk, j):
    return bf16_to_f32(u16(blk, 2 * j))


# ---- 32-element types: q4_0 d@0 qs@2 | q4_1 d@0 m@2 qs@4 | q5_0 d@0 qh@2 qs@6 |
#      q5_1 d@0 m@2 qh@4 qs@8 | q8_0 d@0 qs@2 (int8). Element j < 16 is the low nibble of
#      qs[j], element j >= 16 the high nibble of qs[j - 16]; bit j of qh (little-endian u32)
#      is element j's 5th bit.
@_jit
def nibble(blk, qs, j):
    if j < 16:
        return np.int32(by(blk, qs + j) & 0x0F)
    return np.int32(by(blk, qs + j - 16) >> 4)


@_jit
def qh_bit(blk, qh, j):
    return np.int32((by(blk, qh + (j >> 3)) >> (j & 7)) & 1)


@_jit
def q4_0_code(blk, j):
    return nibble(blk, 2, j) - 8


@_jit
def q4_1_code(blk, j):
    return nibble(blk, 4, j)


@_jit
def q5_0_code(blk, j):
    return (nibble(blk, 6, j) | (qh_bit(blk, 2, j) << 4)) - 16


@_jit
def q5_1_code(blk, j):
    return nibble(blk, 8, j) | (qh_bit(blk, 4, j) << 4)


@_jit
def q8_0_code(blk, j):
    v = np.int32(by(blk, 2 + j))
    return v - 256 if v > 127 else v


@_jit
def q4_0_value(blk, j):
    return np.float32(q4_0_code(blk, j)) * f16_at(blk, 0)                    # (q - 8) * d


@_jit
def q4_1_value(blk, j):
    return np.float32(q4_1_code(blk, j)) * f16_at(blk, 0) + f16_at(blk, 2)   # q * d + m, two roundings


@_jit
def q5_0_value(blk, j):
    return np.float32(q5_0_code(blk, j)) * f16_at(blk, 0)


@_jit
def q5_1_value(blk, j):
    return np.float32(q5_1_code(blk, j)) * f16_at(blk, 0) + f16_at(blk, 2)


@_jit
def q8_0_value(blk, j):
    return np.float32(q8_0_code(blk, j)) * f16_at(blk, 0)


@_jit
def legacy_code(kind, blk, j):
    if kind == Q4_0:
        return q4_0_code(blk, j)
    if kind == Q4_1:
        return q4_1_code(blk, j)
    if kind == Q5_0:
        return q5_0_code(blk, j)
    if kind == Q5_1:
        return q5_1_code(blk, j)
    return q8_0_code(blk, j)


# ---- K-quants (256 elements) -----------------------------------------------------------------
@_jit
def crumb(blk, qs, j):
    """2-bit code of element j = 128h + 32s + r: bits 2s..2s+1 of qs[32h + r] (q2_K, q3_K)."""
    h, s, r = j >> 7, (j >> 5) & 3, j & 31
    return np.int32((by(blk, qs + 32 * h + r) >> (2 * s)) & 3)


@_jit
def q2_K_value(blk, j):
    # scales@0, qs@16, d@80, dmin@82; sub-block of 16: (d * sc) * q - (dmin * m)
    sc = by(blk, j >> 4)
    dl = f16_at(blk, 80) * np.float32(sc & 0xF)
    ml = f16_at(blk, 82) * np.float32(sc >> 4)
    return dl * np.float32(crumb(blk, 16, j)) - ml


@_jit
def q3_K_scale(blk, s):
    """Six-bit scale s (0..63, before the -32) from scales@96 (see q3_K.py)."""
    low = (by(blk, 96 + s) & 0xF) if s < 8 else (by(blk, 96 + s - 8) >> 4)
    high = (by(blk, 96 + 8 + (s & 3)) >> (2 * (s >> 2))) & 3
    return np.int32(low | (high << 4))


@_jit
def q3_K_code(blk, j):
    # hmask@0: bit (j // 32) of hmask[j % 32] set means no -4 offset
    hbit = (by(blk, j & 31) >> (j >> 5)) & 1
    return crumb(blk, 32, j) - (0 if hbit else 4)


@_jit
def q3_K_value(blk, j):
    dl = f16_at(blk, 108) * np.float32(q3_K_scale(blk, j >> 4) - 32)
    return dl * np.float32(q3_K_code(blk, j))


@_jit
def scale_min_k4(blk, o, s):
    """ggml get_scale_min_k4 over the 12 scale bytes at blk[o:]: (sc, m) of sub-block s."""
    if s < 4:
        return np.int32(by(blk, o + s) & 63), np.int32(by(blk, o + s + 4) & 63)
    sc = (by(blk, o + s + 4) & 0xF) | ((by(blk, o + s - 4) >> 6) << 4)
    m = (by(blk, o + s + 4) >> 4) | ((by(blk, o + s) >> 6) << 4)
    return np.int32(sc), np.int32(m)


@_jit
def q4_K_nibble(blk, qs, j):
    """Element 64g + l (l < 32) is the low nibble of qs[32g + l], 64g + 32 + l the high one."""
    g, l = j >> 6, j & 63
    if l < 32:
        return np.int32(by(blk, qs + 32 * g + l) & 0xF)
    return np.int32(by(blk, qs + 32 * g + l - 32) >> 4)


@_jit
def q4_K_value(blk, j):
    # d@0, dmin@2, scales@4, qs@16; sub-block of 32: (d * sc) * q - (dmin * m)
    sc, m = scale_min_k4(blk, 4, j >> 5)
    return (f16_at(blk, 0) * np.float32(sc)) * np.float32(q4_K_nibble(blk, 16, j)) - f16_at(blk, 2) * np.float32(m)


@_jit
def q5_K_value(blk, j):
    # d@0, dmin@2, scales@4, qh@16 (bit j // 32 of qh[j % 32]), qs@48
    sc, m = scale_min_k4(blk, 4, j >> 5)
    q = q4_K_nibble(blk, 48, j) | ((np.int32(by(blk, 16 + (j & 31)) >> (j >> 5)) & 1) << 4)
    return (f16_at(blk, 0) * np.float32(sc)) * np.float32(q) - f16_at(blk, 2) * np.float32(m)


@_jit
def q6_K_code(blk, j):
    # ql@0, qh@128: element 128h + 32k + l: low 4 bits in ql[64h + 32(k % 2) + l] (low nibble
    # for k < 2), high 2 bits at bits 2k..2k+1 of qh[32h + l]; code = q - 32
    h, k, l = j >> 7, (j >> 5) & 3, j & 31
    b = by(blk, 64 * h + 32 * (k & 1) + l)
    low = (b & 0xF) if k < 2 else (b >> 4)
    high = (by(blk, 128 + 32 * h + l) >> (2 * k)) & 3
    return np.int32(low | (high << 4)) - 32


@_jit
def q6_K_value(blk, j):
    sc = np.int32(by(blk, 192 + (j >> 4)))
    sc = sc - 256 if sc > 127 else sc
    return (f16_at(blk, 208) * np.float32(sc)) * np.float32(q6_K_code(blk, j))   # d * sc * q, left to right


@_jit
def value(kind, blk, j):
    """Element j of the block at blk, for any kind."""
    if kind == Q4_0:
        return q4_0_value(blk, j)
    if kind == Q4_1:
        return q4_1_value(blk, j)
    if kind == Q5_0:
        return q5_0_value(blk, j)
    if kind == Q5_1:
        return q5_1_value(blk, j)
    if kind == Q8_0:
        return q8_0_value(blk, j)
    if kind == Q2_K:
        return q2_K_value(blk, j)
    if kind == Q3_K:
        return q3_K_value(blk, j)
    if kind == Q4_K:
        return q4_K_value(blk, j)
    if kind == Q5_K:
        return q5_K_value(blk, j)
    if kind == Q6_K:
        return q6_K_value(blk, j)
    if kind == F16:
        return f16_value(blk, j)
    if kind == BF16:
        return bf16_value(blk, j)
    return f32_value(blk, j)


# ---- whole blocks: the same arithmetic with the scales read once ------------------------------
@_jit
def decode_legacy(kind, blk, out, o):
    """The 32 values of a q4_0/q4_1/q5_0/q5_1/q8_0 block -> out[o : o + 32]."""
    d = f16_at(blk, 0)
    if kind == Q4_1 or kind == Q5_1:
        m = f16_at(blk, 2)
        for j in range(32):
            out[o + j] = np.float32(legacy_code(kind, blk, j)) * d + m
    else:
        for j in range(32):
            out[o + j] = np.float32(legacy_code(kind, blk, j)) * d


@_jit
def decode_kquant(kind, blk, out, o):
    """The 256 values of a q2_K..q6_K super-block -> out[o : o + 256]."""
    if kind == Q2_K:
        d, dmin = f16_at(blk, 80), f16_at(blk, 82)
        for s in range(16):
            dl = d * np.float32(by(blk, s) & 0xF)
            ml = dmin * np.float32(by(blk, s) >> 4)
            for i in range(16):
                out[o + 16 * s + i] = dl * np.float32(crumb(blk, 16, 16 * s + i)) - ml
    elif kind == Q3_K:
        d = f16_at(blk, 108)
        for s in range(16):
            dl = d * np.float32(q3_K_scale(blk, s) - 32)
            for i in range(16):
                out[o + 16 * s + i] = dl * np.float32(q3_K_code(blk, 16 * s + i))
    elif kind == Q4_K or kind == Q5_K:
        d, dmin = f16_at(blk, 0), f16_at(blk, 2)
        for s in range(8):
            sc, m = scale_min_k4(blk, 4, s)
            d1 = d * np.float32(sc)
            m1 = dmin * np.float32(m)
            for i in range(32):
                j = 32 * s + i
                if kind == Q4_K:
                    q = q4_K_nibble(blk, 16, j)
                else:
                    q = q4_K_nibble(blk, 48, j) | ((np.int32(by(blk, 16 + i) >> s) & 1) << 4)
                out[o + j] = d1 * np.float32(q) - m1
    else:
        d = f16_at(blk, 208)
        for s in range(16):
            sc = np.int32(by(blk, 192 + s))
            dl = d * np.float32(sc - 256 if sc > 127 else sc)
            for i in range(16):
                out[o + 16 * s + i] = dl * np.float32(q6_K_code(blk, 16 * s + i))
