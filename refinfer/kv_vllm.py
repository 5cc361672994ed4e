"""vLLM's fp8 KV caches (`kv_cache_dtype="fp8"` / `"fp8_e4m3"` and `"fp8_e5m2"`), per tensor, with
scale 1.0 (vLLM's default when a checkpoint ships no k_scale / v_scale; checkpoint scales are not
read here).

Row layout: head_dim bytes, one fp8 code per element, nothing else.

    store  code = __nv_cvt_float_to_fp8(float(x) / scale, __NV_SATFINITE, E4M3 or E5M2):
           round to nearest even, values beyond the largest finite one saturate to it (448 for
           e4m3, 57344 for e5m2), NaN stays NaN (csrc/quantization/fp8/nvidia/quant_utils.cuh,
           scaled_vec_conversion)
    load   x = float(fp8) * scale (vLLM converts to the cache's half after the multiply; with
           scale 1.0 every fp8 value is exact in fp16 and float32, so there is nothing to round)

e4m3 ("fn": no infinities): sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is
subnormal (m/8 * 2^-6); 0x7F / 0xFF are NaN. e5m2: IEEE-like, bias 15, exponent 31 is inf/NaN.
"""

from __future__ import annotations

import numpy as np

from .kv_cache import CacheType, register_cache_type

F32 = np.float32


def _positive_values(exp_bits, man_bits, bias, finite_top):
    """float64 value of each positive code 0 .. top (ascending), top = the largest finite code."""
    codes = np.arange(finite_top + 1)
    e, m = codes >> man_bits, codes & ((1 << man_bits) - 1)
    sub = m / (1 << man_bits) * 2.0 ** (1 - bias)
    norm = (1 + m / (1 << man_bits)) * 2.0 ** (e - bias)
    return np.where(e == 0, sub, norm)


class Fp8Format:
    def __init__(self, name, exp_bits, man_bits, bias, finite_top, nan_code):
        self.name, self.nan_code = name, nan_code
        self.values = _positive_values(exp_bits, man_bits, bias, finite_top)   # float64[finite_top + 1]
        self.max = self.values[-1]
        table = np.full(256, np.nan)
        table[:finite_top + 1] = self.values
        table[128:128 + finite_top + 1] = -self.values
        if finite_top + 1 < 128 and exp_bits == 5:                              # e5m2: inf, then NaNs
            table[finite_top + 1], table[128 + finite_top + 1] = np.inf, -np.inf
        self.decode_table = table.astype(np.float32)

    def encode(self, x) -> np.ndarray:
        """float32 -> codes: round to nearest even (the even code on a tie), saturate to the
        largest finite value, NaN to the NaN code (with its sign)."""
        x = np.asarray(x, np.float32)
        ax = np.abs(x).astype(np.float64)
        v = self.values
        hi = np.clip(np.searchsorted(v, ax, side="left"), 1, len(v) - 1)
        lo = hi - 1
        d_lo, d_hi = ax - v[lo], v[hi] - ax
        code = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
        code = np.where(ax <= v[0], 0, code)
        code = np.where(ax >= self.max, len(v) - 1, code)                      # __NV_SATFINITE (inf too)
        code = np.where(np.isnan(x), self.nan_code, code)
        sign = np.signbit(x).astype(np.int64) << 7
        return (code | sign).astype(np.uint8)

    def decode(self, codes) -> np.ndarray:
        return self.decode_table[np.asarray(codes, np.uint8)]


E4M3 = Fp8Format("e4m3", 4, 3, 7, 0x7E, 0x7F)
E5M2 = Fp8Format("e5m2", 5, 2, 15, 0x7B, 0x7F)


def _fp8_type(name, fmt: Fp8Format, scale=1.0):
    def store(dst, rows):
        dst[...] = fmt.encode(np.asarray(rows, F32) / F32(scale))

    def load(src):
        return (fmt.decode(np.ascontiguousarray(src)) * F32(scale)).astype(np.float32)

    def parts(src):                                    # w = fp8 value of codes * scale
        return {"codes": np.ascontiguousarray(src).astype(np.int32),
                "scale": np.full(src.shape[:-1] + (1,), scale, np.float32)}

    doc = (f"vLLM's {name} KV cache ({fmt.name}), per tensor, scale {scale}: round to nearest even, "
           f"saturating to +-{fmt.max:g}")
    return CacheType(name, lambda hd: hd, store, load, doc, kind="fp8", parts=parts)


FP8_E4M3 = _fp8_type("fp8", E4M3)
FP8_E5M2 = _fp8_type("fp8_e5m2", E5M2)
for _t in (FP8_E4M3, FP8_E5M2):
    register_cache_type(_t)
