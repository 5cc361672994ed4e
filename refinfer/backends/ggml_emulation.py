"""llama.cpp's CPU kernels, lane by lane, in NumPy: the arithmetic of the x86 AVX2 + FMA + F16C
build (no AVX512), so that `ggml` mode reproduces its float32 results bit for bit.

Every float in these kernels is float32 and every rounding happens where the C code rounds:

- A vector FMA (_mm256_fmadd_ps) rounds once. `fma_f32` computes a*b exactly in float64 and
  the sum with round-to-odd, which then rounds to the correct float32 (a double rounding
  through plain float64 would be wrong when the sum lands exactly on a float32 midpoint).
- Dot products keep 8 float lanes (one __m256) and sum them at the end in a fixed order
  (`hsum8`); which element feeds which lane is what each kernel's docstring describes.
- ggml's scalar C is compiled with FP contraction: x*y + z in one expression is an FMA there
  too (seen in the disassembly of ggml_vec_dot_q4_1_q8_1 and the RoPE loop).
- expf/silu in softmax and SwiGLU are ggml's own polynomial (ggml_v_expf), not libm.

Arrays are vectorized over rows and tokens; lanes are an explicit axis of length 8.
"""

from __future__ import annotations

import numpy as np

from ..quant._common import f32_to_fp16_bits, fp16_to_f32

F32 = np.float32
LANES = 8                      # floats per __m256
_CHUNK = 1 << 17               # lane elements per step of the blocked loops: cache-sized


def round_f16(x) -> np.ndarray:
    """float32 -> its nearest binary16 value (round to nearest even: GGML_FP32_TO_FP16, _mm256_cvtps_ph(x, 0))."""
    return fp16_to_f32(f32_to_fp16_bits(np.asarray(x, np.float32)))


def fma_f32(a, b, c, out=None, work=None) -> np.ndarray:
    """float32 fma(a, b, c) = round32(a*b + c) with one rounding, as _mm256_fmadd_ps.

    a*b of two float32 is exact in float64. The float64 sum s = a*b + c can round; rounding s
    once more to float32 is still correct unless s sits exactly on a float32 midpoint (low 29
    mantissa bits = 1000...0) with a nonzero error, where round-to-odd breaks the tie the way
    the exact sum would. Subnormal float32 results are not special-cased (they do not occur in
    these kernels' accumulators). `out` (float32, may be c) and `work` (float64) are optional
    buffers of the result's shape: hot loops pass them to avoid allocating."""
    shape = np.broadcast_shapes(np.shape(a), np.shape(b), np.shape(c))
    s = np.empty(shape, np.float64) if work is None else work
    np.multiply(a, b, out=s, dtype=np.float64)                        # exact product
    np.add(s, c, out=s)
    low = s.view(np.uint32).reshape(shape + (2,))[..., 0]             # low mantissa word (little-endian)
    tie = np.bitwise_and(low, np.uint32(0x1FFFFFFF)) == np.uint32(0x10000000)
    if tie.any():
        idx = np.nonzero(tie)
        pi = np.broadcast_to(a, shape)[idx].astype(np.float64) * np.broadcast_to(b, shape)[idx]
        ci, si = np.broadcast_to(c, shape)[idx].astype(np.float64), s[idx]
        bb = si - pi
        err = (pi - (si - bb)) + (ci - bb)                            # TwoSum: the exact remainder
        bits = si.view(np.int64) + np.where(err == 0, 0, np.where(np.sign(err) == np.sign(si), 1, -1))
        s[idx] = bits.view(np.float64)                                # round to odd: off the tie
    if out is None:
        return s.astype(np.float32)
    np.copyto(out, s, casting="same_kind")
    return out


def hsum8(v) -> np.ndarray:
    """Sum of 8 float32 lanes (axis 0) as hsum_float_8 (arch/x86/quants.c) and tinyBLAS's
    hsum(__m256): fold the high 128 bits onto the low, then movehl, then movehdup:
    ((v0+v4) + (v2+v6)) + ((v1+v5) + (v3+v7))."""
    v = np.asarray(v, np.float32)
    h = v[4:] + v[:4]
    return (h[0] + h[2]) + (h[1] + h[3])


def hsum8_reduce(v) -> np.ndarray:
    """Sum of 8 float32 lanes (axis 0) as GGML_F32x8_REDUCE's tail (simd-mappings.h): fold the
    halves, then two _mm_hadd_ps: ((v0+v4) + (v1+v5)) + ((v2+v6) + (v3+v7))."""
    v = np.asarray(v, np.float32)
    h = v[:4] + v[4:]
    return (h[0] + h[1]) + (h[2] + h[3])


def weight_lanes(wq) -> np.ndarray:
    """Weight codes float32[rows, nb, 32] -> [nb, 8, 4, rows]: block, lane, element of the lane,
    row; the layout quant_dot reads (made once per weight matrix)."""
    rows, nb, _ = wq.shape
    return np.ascontiguousarray(wq.reshape(rows, nb, LANES, 4).transpose(1, 2, 3, 0))


def quant_dot(wl, wd, xq, xd, wm=None, xs=None) -> np.ndarray:
    """out[T, rows] = dot of quantized weight rows with q8_0/q8_1 activation rows, as
    ggml_vec_dot_{q4_0,q5_0,q8_0}_q8_0 and ggml_vec_dot_{q4_1,q5_1}_q8_1 (AVX2) and
    tinyBLAS_Q0_AVX (llamafile sgemm; every variant: gemm, gemm4xN, gemmMx4) compute it.

    wl: weight_lanes of the integer codes as the kernel sees them (q4_0: q - 8, q5_0: q - 16,
    q8_0: q; q4_1/q5_1: the unsigned codes), wd/wm float32[rows, nb]; xq float32[T, nb, 32]
    codes, xd/xs float32[T, nb] (the fp16 values). Per block b, lane l holds the exact integer
    sum of elements 4l..4l+3 (maddubs + madd), and acc_l = fma(fp32(wd*xd), sum_l, acc_l).
    The result is hsum8(acc), plus for q8_1 summs = fma(wm, xs, summs) taken block by block
    (the C `summs += m*s`, contracted), added last."""
    nb, rows = wl.shape[0], wl.shape[-1]
    T = xq.shape[0]
    out = np.empty((T, rows), np.float32)
    xl = np.ascontiguousarray(xq.reshape(T, nb, LANES, 4).transpose(1, 2, 3, 0))        # [nb, 8, 4, T]
    step = max(1, _CHUNK // (LANES * T))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        acc = np.zeros((LANES, T, r1 - r0), np.float32)
        summs = np.zeros((T, r1 - r0), np.float32)
        sumi = np.empty(acc.shape, np.float32)
        work = np.empty(acc.shape, np.float64)
        for b in range(nb):
            # lane l: the 4 products of elements 4l..4l+3 (maddubs + madd), exact integers.
            # einsum rather than BLAS: k = 4 is too small for a GEMM to pay for its threads.
            np.einsum("ljt,ljr->ltr", xl[b], wl[b, :, :, r0:r1], out=sumi)
            dd = xd[:, b, None] * wd[None, r0:r1, b]                   # [T, R] float32 product
            if b == 0:                                                 # fma(dd, s, 0): the exact product, rounded once
                np.copyto(acc, np.multiply(dd, sumi, out=work, dtype=np.float64), casting="same_kind")
            else:
                fma_f32(dd, sumi, acc, out=acc, work=work)
            if wm is not None:
                fma_f32(wm[None, r0:r1, b], xs[:, b, None], summs, out=summs)
        out[:, r0:r1] = hsum8(acc) + summs if wm is not None else hsum8(acc)
    return out


def f16_dot_tinyblas(a, b) -> np.ndarray:
    """sum_k a[..., k] * b[..., k] for F16-valued float32 inputs (broadcasting over the leading
    axes) as llamafile's tinyBLAS<8, __m256, ...>::gemm_bloc (F16 x F16 -> F32, batch > 1):
    lane l accumulates elements k = l, l+8, l+16, ... with one FMA each, then hsum8.
    k must be a multiple of 8 (tinyBLAS declines otherwise)."""
    k = a.shape[-1]
    shape = np.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    acc = np.zeros((LANES,) + shape, np.float32)
    for l0 in range(0, k, LANES):
        av = np.moveaxis(a[..., l0:l0 + LANES], -1, 0)
        bv = np.moveaxis(b[..., l0:l0 + LANES], -1, 0)
        acc = fma_f32(av, bv, acc)
    return hsum8(acc)


def f16_dot_vec(a, b) -> np.ndarray:
    """sum_k a[..., k] * b[..., k] for F16-valued float32 inputs as ggml_vec_dot_f16 (AVX2,
    one row at a time, the batch-1 path): 4 accumulators of 8 lanes over steps of 32
    (element k goes to accumulator (k % 32) // 8, lane k % 8), reduced (0+2, 1+3, then 0+1,
    then hsum8_reduce) to a double; the n % 32 leftovers are added one by one in double as
    float32 products; the double is returned as float32."""
    k = a.shape[-1]
    np_ = k - k % 32
    shape = np.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    acc = np.zeros((4, LANES) + shape, np.float32)
    for i in range(0, np_, 32):
        av = np.moveaxis(a[..., i:i + 32], -1, 0).reshape((4, LANES) + a.shape[:-1])
        bv = np.moveaxis(b[..., i:i + 32], -1, 0).reshape((4, LANES) + b.shape[:-1])
        acc = fma_f32(av, bv, acc)
    s = (acc[0] + acc[2]) + (acc[1] + acc[3])
    sumf = hsum8_reduce(s).astype(np.float64)
    for i in range(np_, k):
        sumf = sumf + (a[..., i] * b[..., i]).astype(np.float32)
    return sumf.astype(np.float32)


# ggml_v_expf constants (vec.h): 1.5 * 2^23 rounding shifter, log2(e), ln2 split in two parts,
# and the degree-5 polynomial of exp(b) - 1 on [-ln2/2, ln2/2].
_SHIFT = F32(12582912.0)                     # 0x1.8p23f
_LOG2E = F32(1.44269502162933349609375)      # 0x1.715476p+0f
_LN2_HI = F32(0.693145751953125)             # 0x1.62e4p-1f
_LN2_LO = F32(1.428606765330187045037746429443359375e-06)  # 0x1.7f7d1cp-20f
_P = [F32(float.fromhex(h)) for h in ("0x1.0e4020p-7", "0x1.573e2ep-5", "0x1.555e66p-3",
                                       "0x1.fffdb6p-2", "0x1.ffffecp-1")]


def _as_f32(i):
    return np.asarray(i, np.int32).view(np.float32)


def expf_v(x) -> np.ndarray:
    """exp(x) as ggml_v_expf (AVX2 + FMA, vec.h), lane-wise: n = round(x*log2e) via the
    1.5*2^23 shifter, b = x - n*ln2 in two FMA steps, j = polynomial(b) by FMAs, and
    2^n * (1 + j) assembled from the exponent bits, with the |n| > 126 and |n| > 192 branches
    (overflow to inf, underflow to 0; exp(-inf) = 0)."""
    x = np.asarray(x, np.float32)
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        z = fma_f32(x, _LOG2E, _SHIFT)
        n = z - _SHIFT
        b = fma_f32(-n, _LN2_LO, fma_f32(-n, _LN2_HI, x))
        zi = z.view(np.int32).astype(np.int64)
        e = ((zi << 23) & 0xFFFFFFFF).astype(np.uint32).view(np.int32)          # slli_epi32, wraps
        k = _as_f32((e.astype(np.int64) + 0x3F800000).astype(np.uint32).view(np.int32))
        c = np.abs(n) > F32(126)
        u = b * b
        j = fma_f32(fma_f32(fma_f32(_P[0], b, _P[1]), u, fma_f32(_P[2], b, _P[3])), u, _P[4] * b)
        out = fma_f32(j, k, k)
        if c.any():
            g = np.where(n <= 0, np.int64(0x82000000), np.int64(0))
            s1 = _as_f32(((g + 0x7F000000) & 0xFFFFFFFF).astype(np.uint32).view(np.int32))
            s2 = _as_f32(((e.astype(np.int64) - g) & 0xFFFFFFFF).astype(np.uint32).view(np.int32))
            d = np.abs(n) > F32(192)
            big = np.where(d, s1 * s1, fma_f32(s2, j, s2) * s1)
            out = np.where(c, big, out).astype(np.float32)
    return out


def silu_v(x) -> np.ndarray:
    """silu(x) = x / (1 + expf(-x)) as ggml_v_silu: (0 - x), ggml_v_expf, add, divide, in float32."""
    x = np.asarray(x, np.float32)
    return x / (F32(1) + expf_v(F32(0) - x))


def swiglu(gate, up) -> np.ndarray:
    """silu(gate) * up as ggml_vec_swiglu_f32 (8 lanes at a time). Its scalar tail for a row
    length not divisible by 8 uses libm's expf: there the correctly rounded float64 exp stands
    in for glibc's expf."""
    gate = np.asarray(gate, np.float32)
    n = gate.shape[-1]
    nv = n - n % LANES
    out = np.empty(np.broadcast_shapes(gate.shape, np.shape(up)), np.float32)
    out[..., :nv] = silu_v(gate[..., :nv]) * up[..., :nv]
    if nv < n:
        g = gate[..., nv:]
        e = np.exp(-g.astype(np.float64)).astype(np.float32)
        out[..., nv:] = (g / (F32(1) + e)) * up[..., nv:]
    return out


def soft_max(x, scale, mask) -> np.ndarray:
    """Softmax over the last axis as ggml_compute_forward_soft_max_f32 (mask, no ALiBi, no
    sinks): w = x*scale + mask in float32 (slope 1: the contracted FMA is exact), max, then
    ggml_vec_soft_max_f32 over groups of 8: y = ggml_v_expf(w - max) and sum += double(hsum8(y))
    group by group; finally y *= float32(1.0 / sum). The row length must be a multiple of 8
    (llama.cpp pads the KV length to 256); callers pad with -inf, whose exp is exactly 0."""
    w = np.asarray(x, np.float32) * F32(scale) + np.asarray(mask, np.float32)
    n = w.shape[-1]
    if n % LANES:
        raise ValueError(f"soft_max row length {n} is not a multiple of {LANES}")
    mx = w.max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        y = expf_v(w - mx)
    g = y.reshape(y.shape[:-1] + (n // LANES, LANES))
    part = hsum8(np.moveaxis(g, -1, 0)).astype(np.float64)          # [..., n/8] per-group sums
    total = np.zeros(y.shape[:-1], np.float64)
    for i in range(n // LANES):                                      # sequential double sum
        total = total + part[..., i]
    inv = (1.0 / total).astype(np.float32)
    return y * inv[..., None]


def rope_rotate(x0, x1, cos, sin):
    """The rotation of one RoPE pair as rotate_pairs (ops.cpp) compiles with FMA contraction:
    y0 = fma(x0, cos, -(x1*sin)), y1 = fma(x0, sin, x1*cos), the inner products rounded."""
    y0 = fma_f32(x0, cos, -(x1 * sin))
    y1 = fma_f32(x0, sin, x1 * cos)
    return y0, y1


# ---- sincosf --------------------------------------------------------------------------------
# rope_yarn calls sincosf, and llama.cpp's results carry the C library's roundings: glibc's
# sinf/cosf/sincosf (since 2.28, from ARM's optimized-routines) evaluate a double-precision
# polynomial after a range reduction and are faithful (< 0.56 ulp), not correctly rounded, so a
# correctly rounded cos/sin differs from them in about 1 of 50 angles. This is that algorithm.
_HPI_INV = float.fromhex("0x1.45F306DC9C883p+23")     # 2/pi * 2^24: the quadrant in bits 24..31
_HPI = float.fromhex("0x1.921FB54442D18p0")           # pi/2
_HPI_HI = float.fromhex("0x1.921FB5p0")               # pi/2 split so that n * _HPI_HI is exact
_HPI_LO = _HPI - _HPI_HI
_PI63 = float.fromhex("0x1.921FB54442D18p-62")        # 2pi * 2^-64
_C = [1.0] + [float.fromhex(h) for h in ("-0x1.ffffffd0c621cp-2", "0x1.55553e1068f19p-5",
                                         "-0x1.6c087e89a359dp-10", "0x1.99343027bf8c3p-16")]
_S = [float.fromhex(h) for h in ("-0x1.555545995a603p-3", "0x1.1107605230bc4p-7", "-0x1.994eb3774cf24p-13")]
_SIGN = np.array([1.0, -1.0, -1.0, 1.0])
_INV_PIO4 = np.array([0xa2, 0xa2f9, 0xa2f983, 0xa2f9836e, 0xf9836e4e, 0x836e4e44, 0x6e4e4415,
                      0x4e441529, 0x441529fc, 0x1529fc27, 0x29fc2757, 0xfc2757d1, 0x2757d1f5,
                      0x57d1f534, 0xd1f534dd, 0xf534ddc0, 0x34ddc0db, 0xddc0db62, 0xc0db6295,
                      0xdb629599, 0x6295993c, 0x95993c43, 0x993c4390, 0x3c439041], np.uint64)


def _fma64(a, b, c):
    """a*b + c in float64 with the product's rounding error compensated (Dekker's TwoProduct),
    standing in for the fused multiply-adds of glibc's FMA build. It can differ from a true
    fma in the last double bit, which moves a float32 result only at a float32 midpoint."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    p = a * b
    split = 134217729.0                                                   # 2^27 + 1
    ah = a * split - (a * split - a)
    bh = b * split - (b * split - b)
    err = ((ah * bh - p) + ah * (b - bh) + (a - ah) * bh) + (a - ah) * (b - bh)
    s = p + c
    bb = s - p
    s_err = (p - (s - bb)) + (c - bb)
    return s + (err + s_err)


def sincosf(y):
    """(sin, cos) float32 of float32 angles, as glibc's sincosf (x86-64 FMA variant): tiny
    angles return (y, 1); |y| < pi/4 the polynomial directly; |y| < 120 one multiply-subtract
    by n*pi/2; beyond, an integer reduction with 4/pi to 192 bits. The quadrant picks signs
    and swaps the sine and cosine polynomials (the second table entry negates cosine)."""
    y = np.asarray(y, np.float32)
    yi = y.view(np.uint32).astype(np.int64)
    top = (yi >> 20) & 0x7FF
    x = y.astype(np.float64)
    n = np.zeros(y.shape, np.int64)
    q = np.zeros(y.shape, np.int64)                       # quadrant that picks sign and table
    mid = (top >= 0x3F4) & (top < 0x42F)
    r = x[mid] * _HPI_INV
    nm = (r.astype(np.int32).astype(np.int64) + 0x800000) >> 24
    x[mid] = (x[mid] - nm * _HPI_HI) - nm * _HPI_LO       # x - n*pi/2, fused in glibc
    n[mid], q[mid] = nm, nm
    large = (top >= 0x42F) & (top < 0x7F8)
    if large.any():
        xi = yi[large].astype(np.uint64)
        base = ((xi >> np.uint64(26)) & np.uint64(15)).astype(np.int64)
        shift = (xi >> np.uint64(23)) & np.uint64(7)
        m = ((xi & np.uint64(0xFFFFFF)) | np.uint64(0x800000)) << shift
        mask32 = np.uint64(0xFFFFFFFF)
        res0 = (m * _INV_PIO4[base]) & mask32                          # uint32 product wraps
        res1 = m * _INV_PIO4[base + 4]
        res2 = m * _INV_PIO4[base + 8]
        res0 = (res2 >> np.uint64(32)) | (res0 << np.uint64(32))
        res0 = res0 + res1
        nl = (res0 + (np.uint64(1) << np.uint64(61))) >> np.uint64(62)
        res0 = res0 - (nl << np.uint64(62))
        x[large] = res0.view(np.int64).astype(np.float64) * _PI63
        n[large] = nl.astype(np.int64)
        q[large] = nl.astype(np.int64) + (yi[large] >> 31)
    sgn = np.where(mid | large, _SIGN[q & 3], 1.0)
    neg_cos = np.where((mid | large) & (q & 2 != 0), -1.0, 1.0)
    xs = x * sgn
    x2 = x * x
    x3 = x2 * xs
    x4 = x2 * x2
    x5 = x3 * x2
    x6 = x4 * x2
    s1 = _fma64(x2, _S[2], _S[1])
    sin_p = _fma64(x5, s1, _fma64(x3, _S[0], xs))
    c2 = _fma64(x2, neg_cos * _C[4], neg_cos * _C[3])
    c1 = _fma64(x2, neg_cos * _C[1], neg_cos * _C[0])
    cos_p = _fma64(x6, c2, _fma64(x4, neg_cos * _C[2], c1))
    odd = (n & 1) == 1
    sin = np.where(odd, cos_p, sin_p).astype(np.float32)
    cos = np.where(odd, sin_p, cos_p).astype(np.float32)
    tiny = top < 0x398
    sin = np.where(tiny, y, sin)
    cos = np.where(tiny, np.float32(1), cos)
    return sin, cos


# ---- libm's expf ------------------------------------------------------------------------------
# The CPU flash-attention kernel calls the C library's scalar expf (glibc since 2.27: ARM's
# optimized-routines algorithm, sysdeps/ieee754/flt-32/e_expf.c with __exp2f_data): in double,
# x*N/ln2 = k + r with N = 32 table entries of 2^(i/N), then a degree-3 polynomial in r, and the
# double result rounded to float once. It is within 0.502 ulp, not correctly rounded, so a
# correctly rounded exp differs from it now and then. The x86-64 build's FMA variant contracts
# the polynomial's multiply-adds (which also matched libm on every tested input without them).
_EXP2F_N = 32
_EXP2F_TAB = np.array([int(h, 16) for h in (
    "3ff0000000000000 3fefd9b0d3158574 3fefb5586cf9890f 3fef9301d0125b51 "
    "3fef72b83c7d517b 3fef54873168b9aa 3fef387a6e756238 3fef1e9df51fdee1 "
    "3fef06fe0a31b715 3feef1a7373aa9cb 3feedea64c123422 3feece086061892d "
    "3feebfdad5362a27 3feeb42b569d4f82 3feeab07dd485429 3feea47eb03a5585 "
    "3feea09e667f3bcd 3fee9f75e8ec5f74 3feea11473eb0187 3feea589994cce13 "
    "3feeace5422aa0db 3feeb737b0cdc5e5 3feec49182a3f090 3feed503b23e255d "
    "3feee89f995ad3ad 3feeff76f2fb5e47 3fef199bdd85529c 3fef3720dcef9069 "
    "3fef5818dcfba487 3fef7c97337b9b5f 3fefa4afa2a490da 3fefd0765b6e4540").split()], np.uint64)
_EXP2F_SHIFT = float.fromhex("0x1.8p+52")                       # rounds z to an integer in its low bits
_EXP2F_INVLN2N = float.fromhex("0x1.71547652b82fep+0") * _EXP2F_N
_EXP2F_C = (float.fromhex("0x1.c6af84b912394p-5") / _EXP2F_N ** 3, float.fromhex("0x1.ebfce50fac4f3p-3") / _EXP2F_N ** 2,
            float.fromhex("0x1.62e42ff0c52d6p-1") / _EXP2F_N)


def expf_libm(x) -> np.ndarray:
    """float32 exp(x) as glibc's expf: |x| >= 88 takes the special cases (exp(-inf) = 0, inf
    and nan pass through, overflow to inf above 0x1.62e42ep6, 0 below -0x1.9fe368p6)."""
    x = np.asarray(x, np.float32)
    xd = x.astype(np.float64)
    with np.errstate(invalid="ignore"):                  # inf and nan inputs: replaced below
        z = _EXP2F_INVLN2N * xd
        kd = z + _EXP2F_SHIFT
        ki = kd.view(np.uint64)
        kd = kd - _EXP2F_SHIFT
        r = z - kd
    with np.errstate(over="ignore", invalid="ignore"):
        t = _EXP2F_TAB[ki % np.uint64(_EXP2F_N)] + (ki << np.uint64(52 - 5))   # 2^(k/N): wraps as the C uint64
    s = t.view(np.float64)
    c0, c1, c2 = _EXP2F_C
    y = _fma64(_fma64(c0, r, c1), r * r, _fma64(c2, r, 1.0)) * s
    with np.errstate(over="ignore", invalid="ignore"):
        out = y.astype(np.float32)
    big = np.abs(x) >= F32(88)
    if big.any() or np.isnan(x).any():
        out = np.where(x > F32(float.fromhex("0x1.62e42ep6")), F32(np.inf), out)
        out = np.where(x < F32(-float.fromhex("0x1.9fe368p6")), F32(0), out)
        out = np.where(np.isnan(x), x, out).astype(np.float32)
    return out


def flash_attn_one_chunk(scores, v_rows, n_pos, v_f16):
    """The online softmax of ggml_compute_forward_flash_attn_ext_f16_one_chunk (ggml-cpu/ops.cpp)
    for query rows whose K.Q scores are given: scores float32[R, S] (each kq_vec_dot result
    times the scale), v_rows float32[R or 1, S, DV] the V rows as v_to_float gives them, and
    n_pos int[R]: row r attends to positions 0 .. n_pos[r] - 1 (the causal mask's -inf entries
    are skipped, not added) -> float32[R, DV].

    Per position, in order (M the running max, S the sum, VKQ the accumulator):
        s > M:  M = s, ms = expf(Mold - M), VKQ *= ms, vs = 1
        else:   ms = 1, vs = expf(s - M)
        VKQ = fma(v, vs, VKQ) elementwise (ggml_vec_mad_f32; for an F16 V, ggml_vec_mad_f16:
              the same fma rounded to F16, and VKQ *= ms rounded to F16 too)
        S = fma(S, ms, vs)
    then VKQ *= 1/S (0 when S == 0). expf is the C library's (expf_libm)."""
    R, S_len = scores.shape
    DV = v_rows.shape[-1]
    M = np.full(R, -np.inf, np.float32)
    Ssum = np.zeros(R, np.float32)
    acc = np.zeros((R, DV), np.float32)
    n_pos = np.asarray(n_pos, np.int64)
    one = np.ones(R, np.float32)
    work = np.empty((R, DV), np.float64)
    for ic in range(S_len):
        act = n_pos > ic
        if not act.any():
            continue
        s = scores[:, ic]
        new = act & (s > M)
        old = act & ~new
        with np.errstate(invalid="ignore"):
            ms = np.where(new, expf_libm(np.where(new, M - s, F32(0))), one).astype(np.float32)
        vs = np.where(old, expf_libm(np.where(old, s - M, F32(0))), one).astype(np.float32)
        if new.any():
            acc[new] = acc[new] * ms[new, None]
            if v_f16:
                acc[new] = round_f16(acc[new])
        v = v_rows[:, ic] if v_rows.shape[0] == R else np.broadcast_to(v_rows[0, ic], (R, DV))
        upd = fma_f32(v, vs[:, None], acc, work=work)
        if v_f16:
            upd = round_f16(upd)
        acc = np.where(act[:, None], upd, acc)
        M = np.where(new, s, M)
        Ssum = np.where(act, fma_f32(Ssum, ms, vs), Ssum)
    with np.errstate(divide="ignore"):
        inv = np.where(Ssum == 0, F32(0), F32(1) / np.where(Ssum == 0, F32(1), Ssum)).astype(np.float32)
    return acc * inv[:, None]
