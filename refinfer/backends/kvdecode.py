"""Per-element decoding of the LMDeploy and calibrated KV-cache rows (refinfer/kv_lmdeploy.py), as
plain scalar-argument Numba functions in the style of blockdecode.py: no NumPy array functions,
so the same source compiles for Numba CPU kernels and as numba.cuda device functions.

`row` is the uint8 row of one position and KV head (codes, then the row's parameters), `j` the
element index, `hd` the head_dim. Each returns the float32 value the type's ideal load gives,
bit for bit; the `_exact` variants the ggml-mode (fp16 arithmetic) load. Every formula is
evaluated in float64, where it is exact (8-bit codes, fp16 parameters), and rounded once, so a
compiler that contracts the multiply-add into an fma (NVVM does by default) gets the same bits.

    lmdeploy-int8     q = row[j]                                    x = q * scale + zero
    lmdeploy-int4     q = nibble ORDER^-1 of word j // 8            x = q * scale + zero
    lmdeploy-pt-int8  q = row[j]                                    x = (q - zeros) * scale
    lmdeploy-pt-int4  q = low nibble of row[j] (j < hd/2), else the high nibble of row[j - hd/2]
    int8-calibrated   q = int8(row[j])                              x = q * scale + zp
                      (scale, zp: the layer's and head's, CalibratedLayerType.scale / .zp)
    fp8, fp8_e5m2     the e4m3 / e5m2 value of row[j] (vLLM's per-tensor cache, scale 1.0)
"""

from __future__ import annotations

import math

import numpy as np

from .blockdecode import by, f16_at, round_f16
from .numba_kernels.jit import njit

_jit = njit(cache=True)

# kinds for the kernels' dispatch, after blockdecode's
LMDEPLOY_INT8, LMDEPLOY_INT4, LMDEPLOY_PT_INT8, LMDEPLOY_PT_INT4, INT8_CALIBRATED, FP8_E4M3, FP8_E5M2 = range(100, 107)
KINDS = {"lmdeploy-int8": LMDEPLOY_INT8, "lmdeploy-int4": LMDEPLOY_INT4, "lmdeploy-pt-int8": LMDEPLOY_PT_INT8,
         "lmdeploy-pt-int4": LMDEPLOY_PT_INT4, "int8-calibrated": INT8_CALIBRATED, "fp8": FP8_E4M3,
         "fp8_e5m2": FP8_E5M2}


# ---- codes ----------------------------------------------------------------------------------
@_jit
def tm_int4_code(row, j):
    """TurboMind's pack: in each 4-byte word, element e of the group of 8 sits in nibble
    (0, 4, 1, 5, 2, 6, 3, 7)[e] (the inverse of ORDER = 0, 2, 4, 6, 1, 3, 5, 7): even elements
    in bytes 0 and 1, odd ones in bytes 2 and 3, the lower element in the low nibble."""
    e = j & 7
    k = (e >> 1) + 4 * (e & 1)              # nibble index of element e
    b = by(row, (j >> 3) * 4 + (k >> 1))
    return np.int32((b >> (4 * (k & 1))) & 0x0F)


@_jit
def pt_int4_code(row, j, hd):
    h = hd >> 1
    if j < h:
        return np.int32(by(row, j) & 0x0F)
    return np.int32(by(row, j - h) >> 4)


@_jit
def i8(row, j):
    b = by(row, j)
    return np.int32(b - 256) if b > 127 else np.int32(b)


# ---- TurboMind: q * scale + zero (scale, zero fp16 after hd (int4: hd/2) code bytes) ------------
@_jit
def _tm(q, row, nc):
    return np.float64(q) * np.float64(f16_at(row, nc)) + np.float64(f16_at(row, nc + 2))


@_jit
def lmdeploy_int8_elem(row, j, hd):
    return np.float32(_tm(by(row, j), row, hd))


@_jit
def lmdeploy_int4_elem(row, j, hd):
    return np.float32(_tm(tm_int4_code(row, j), row, hd >> 1))


@_jit
def lmdeploy_int8_exact_elem(row, j, hd):
    return round_f16(_tm(by(row, j), row, hd))                 # __hfma: one fp16 rounding


@_jit
def lmdeploy_int4_exact_elem(row, j, hd):
    return round_f16(_tm(tm_int4_code(row, j), row, hd >> 1))


# ---- PyTorch engine: (q - zeros) * scale ------------------------------------------------------
@_jit
def _pt(q, row, nc):
    return (np.float64(q) - np.float64(f16_at(row, nc + 2))) * np.float64(f16_at(row, nc))


@_jit
def _pt_exact(q, row, nc):
    d = round_f16(np.float64(q) - np.float64(f16_at(row, nc + 2)))    # fp16 subtract, then fp16 multiply
    return round_f16(np.float64(d) * np.float64(f16_at(row, nc)))


@_jit
def lmdeploy_pt_int8_elem(row, j, hd):
    return np.float32(_pt(by(row, j), row, hd))


@_jit
def lmdeploy_pt_int4_elem(row, j, hd):
    return np.float32(_pt(pt_int4_code(row, j, hd), row, hd >> 1))


@_jit
def lmdeploy_pt_int8_exact_elem(row, j, hd):
    return _pt_exact(by(row, j), row, hd)


@_jit
def lmdeploy_pt_int4_exact_elem(row, j, hd):
    return _pt_exact(pt_int4_code(row, j, hd), row, hd >> 1)


# ---- int8-calibrated: q * scale + zp, the layer's (and head's) float32 scale and zp ------------------
@_jit
def int8_calibrated_elem(row, j, scale, zp):
    return np.float32(np.float64(i8(row, j)) * np.float64(scale) + np.float64(zp))


@_jit
def lmdeploy_elem(kind, row, j, hd):
    """The ideal value of element j of a row of an LMDeploy kind (not int8-calibrated, which needs its scale and zp)."""
    if kind == LMDEPLOY_INT8:
        return lmdeploy_int8_elem(row, j, hd)
    if kind == LMDEPLOY_INT4:
        return lmdeploy_int4_elem(row, j, hd)
    if kind == LMDEPLOY_PT_INT8:
        return lmdeploy_pt_int8_elem(row, j, hd)
    return lmdeploy_pt_int4_elem(row, j, hd)


# ---- vLLM fp8 (refinfer/kv_vllm.py): one code per element, scale 1.0 ------------------------------
@_jit
def fp8_value(b, man_bits, bias, e4m3):
    """The value of fp8 code b (e4m3fn: no infinities, 0x7F NaN; e5m2: exponent 31 inf / NaN)."""
    b = np.int32(b)
    e_bits = 7 - man_bits
    e = (b >> man_bits) & ((1 << e_bits) - 1)
    m = b & ((1 << man_bits) - 1)
    if e4m3 and e == 15 and m == 7:
        v = np.float64(np.nan)
    elif not e4m3 and e == 31:
        v = np.float64(np.inf) if m == 0 else np.float64(np.nan)
    elif e == 0:
        v = math.ldexp(np.float64(m), int(1 - bias - man_bits))
    else:
        v = math.ldexp(np.float64((1 << man_bits) + m), int(e - bias - man_bits))
    return np.float32(-v if (b >> 7) & 1 else v)


@_jit
def fp8_e4m3_elem(row, j, hd):
    return fp8_value(by(row, j), 3, 7, True)


@_jit
def fp8_e5m2_elem(row, j, hd):
    return fp8_value(by(row, j), 2, 15, False)
