"""ggml mode's kernels of the numba backend: the lane orders of the NumPy emulation
(../ggml_emulation.py, ../numpy_backend.py in mode "ggml"), bit for bit, compiled.

Every rounding of the emulation happens here at the same place: float32 products and sums
where ggml rounds to float, explicit fused multiply-adds (simd.fma / vfma: llvm.fma, one
rounding) where ggml's AVX2 code has _mm256_fmadd_ps or its C is contracted, 8-lane
accumulators reduced with ggml's own trees (simd.hsum8, simd.hsum8_reduce). Numba does not
contract a * b + c by itself (no fastmath here), and every float literal is a float32.

    matmul_q8      q4_0/q4_1/q5_0/q5_1/q8_0 weights (repacked, ../repack.py) against q8_0/q8_1
                   activations: ggml_vec_dot_*_q8_* and tinyBLAS_Q0_AVX (quant_dot)
    matmul_col64   K-quant, f32 and bf16 weights against the rounded activations: float64 sums of
                   exact products in column order (the emulation's column_order_matmul)
    matmul_f16     F16 weights: tinyBLAS's 8 lanes or ggml_vec_dot_f16's 4 x 8 (f16_dot_*)
    rmsnorm, rope, swiglu, attention: ggml_compute_forward_rms_norm_f32, rotate_pairs,
                   ggml_vec_swiglu_f32 (ggml_v_expf), and llama.cpp's non-flash attention over
                   the F16 cache (soft_max with ggml_v_expf, both F16 matmuls in their lane order)

The vectors run across weight rows (16 at a time), never across the lanes of one dot, so a
row's result does not depend on how many rows or tokens are computed with it.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from .jit import njit

from .. import blockdecode as bd
from .matmul import prefetch_block, store_rows
from .simd import (f32_bits, f32_of_bits, fma, hsum8, hsum8_reduce, vadd, vfma, vload, vload8, vload8_f16,
                   vload_f64, round_f16_s, vsplat, vsplat8, vstore, vstore8, vweights)

NEG0 = np.float32(-0.0)     # fma(a, b, -0) is the plain product a * b, signed zeros included
ZERO = np.float32(0)
ONE = np.float32(1)
DECODE_ONCE = 4             # tokens from which a group's codes are decoded once to float32


# ---- quantized weights against q8_0 / q8_1 activations --------------------------------------------
@njit(cache=True, inline="always")
def lane_sum(w, lane, off, i0, xt, k):
    """The exact integer sum of elements 4 lane .. 4 lane + 3 of a 32-element block (maddubs +
    madd) for 16 rows: w [J, R] the block's codes (J = 16: bytes of two nibbles, element j low
    and j + 16 high; J = 32: int8 codes or decoded float32), xt the activation codes from k."""
    J = w.shape[0]
    e = 4 * lane
    j0, sh = e % J, 4 * (e // J)
    s = vfma(vweights(w[j0], i0, sh, off), vsplat(xt[k + e]), vsplat(ZERO))
    s = vfma(vweights(w[j0 + 1], i0, sh, off), vsplat(xt[k + e + 1]), s)
    s = vfma(vweights(w[j0 + 2], i0, sh, off), vsplat(xt[k + e + 2]), s)
    return vfma(vweights(w[j0 + 3], i0, sh, off), vsplat(xt[k + e + 3]), s)


@njit(cache=True, inline="always")
def dot16(wg, g, off, xt, xdt, xst, d, m, i0, has_m, codes, prefetch):
    """Rows i0 .. i0 + 15 of group g for one token, as quant_dot: per block b and lane l,
    acc_l = fma(fp32(d_x * d_w), sumi_l, acc_l) (from -0: the first block's term is the
    plain product), then hsum8 over the lanes, plus summs = fma(m_w, s_x, summs) block by
    block for q8_1. wg [nb, J, R]: the group's codes, or its blocks decoded to float32;
    prefetch: ask for the codes ahead (matmul.prefetch_block) while reading them."""
    nb = wg.shape[0]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vsplat(NEG0)
    sm = vsplat(ZERO)
    for b in range(nb):
        if prefetch:
            prefetch_block(codes, g, b)
        w = wg[b]
        k = b * 32
        dd = vfma(vsplat(xdt[b]), vload(d[g, b], i0), vsplat(NEG0))
        a0 = vfma(dd, lane_sum(w, 0, off, i0, xt, k), a0)
        a1 = vfma(dd, lane_sum(w, 1, off, i0, xt, k), a1)
        a2 = vfma(dd, lane_sum(w, 2, off, i0, xt, k), a2)
        a3 = vfma(dd, lane_sum(w, 3, off, i0, xt, k), a3)
        a4 = vfma(dd, lane_sum(w, 4, off, i0, xt, k), a4)
        a5 = vfma(dd, lane_sum(w, 5, off, i0, xt, k), a5)
        a6 = vfma(dd, lane_sum(w, 6, off, i0, xt, k), a6)
        a7 = vfma(dd, lane_sum(w, 7, off, i0, xt, k), a7)
        if has_m:
            sm = vfma(vload(m[g, b], i0), vsplat(xst[b]), sm)
    h = vadd(vadd(vadd(a0, a4), vadd(a2, a6)), vadd(vadd(a1, a5), vadd(a3, a7)))
    return vadd(h, sm) if has_m else h


@njit(cache=True, inline="always")
def lane_sum2(w, lane, off, i0, xt, k):
    """lane_sum for rows i0 .. i0 + 31, the activation codes broadcast once for both halves."""
    J = w.shape[0]
    e = 4 * lane
    j0, sh = e % J, 4 * (e // J)
    x0, x1, x2, x3 = vsplat(xt[k + e]), vsplat(xt[k + e + 1]), vsplat(xt[k + e + 2]), vsplat(xt[k + e + 3])
    s = vfma(vweights(w[j0], i0, sh, off), x0, vsplat(ZERO))
    u = vfma(vweights(w[j0], i0 + 16, sh, off), x0, vsplat(ZERO))
    s = vfma(vweights(w[j0 + 1], i0, sh, off), x1, s)
    u = vfma(vweights(w[j0 + 1], i0 + 16, sh, off), x1, u)
    s = vfma(vweights(w[j0 + 2], i0, sh, off), x2, s)
    u = vfma(vweights(w[j0 + 2], i0 + 16, sh, off), x2, u)
    s = vfma(vweights(w[j0 + 3], i0, sh, off), x3, s)
    u = vfma(vweights(w[j0 + 3], i0 + 16, sh, off), x3, u)
    return s, u


@njit(cache=True, inline="always")
def dot32(res, wg, g, off, xt, xdt, xst, d, m, i0, has_m, codes, prefetch):
    """dot16 for rows i0 .. i0 + 31 at once (the decode path: each activation code broadcast
    once for 32 rows), stored to res[i0 : i0 + 32]; the same operations per row."""
    nb = wg.shape[0]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vsplat(NEG0)
    c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = vsplat(NEG0)
    sm = sn = vsplat(ZERO)
    for b in range(nb):
        if prefetch:
            prefetch_block(codes, g, b)
        w = wg[b]
        k = b * 32
        xb = vsplat(xdt[b])
        dd = vfma(xb, vload(d[g, b], i0), vsplat(NEG0))
        de = vfma(xb, vload(d[g, b], i0 + 16), vsplat(NEG0))
        s, u = lane_sum2(w, 0, off, i0, xt, k)
        a0, c0 = vfma(dd, s, a0), vfma(de, u, c0)
        s, u = lane_sum2(w, 1, off, i0, xt, k)
        a1, c1 = vfma(dd, s, a1), vfma(de, u, c1)
        s, u = lane_sum2(w, 2, off, i0, xt, k)
        a2, c2 = vfma(dd, s, a2), vfma(de, u, c2)
        s, u = lane_sum2(w, 3, off, i0, xt, k)
        a3, c3 = vfma(dd, s, a3), vfma(de, u, c3)
        s, u = lane_sum2(w, 4, off, i0, xt, k)
        a4, c4 = vfma(dd, s, a4), vfma(de, u, c4)
        s, u = lane_sum2(w, 5, off, i0, xt, k)
        a5, c5 = vfma(dd, s, a5), vfma(de, u, c5)
        s, u = lane_sum2(w, 6, off, i0, xt, k)
        a6, c6 = vfma(dd, s, a6), vfma(de, u, c6)
        s, u = lane_sum2(w, 7, off, i0, xt, k)
        a7, c7 = vfma(dd, s, a7), vfma(de, u, c7)
        if has_m:
            xsb = vsplat(xst[b])
            sm = vfma(vload(m[g, b], i0), xsb, sm)
            sn = vfma(vload(m[g, b], i0 + 16), xsb, sn)
    h = vadd(vadd(vadd(a0, a4), vadd(a2, a6)), vadd(vadd(a1, a5), vadd(a3, a7)))
    e = vadd(vadd(vadd(c0, c4), vadd(c2, c6)), vadd(vadd(c1, c5), vadd(c3, c7)))
    vstore(res, i0, vadd(h, sm) if has_m else h)
    vstore(res, i0 + 16, vadd(e, sn) if has_m else e)


@njit(cache=True, parallel=True)
def matmul_q8(out, xq, xd, xs, codes, d, m, off, has_m):
    """out float32[T, rows] for a repacked legacy-type W: codes uint8[G, nb, 16, R] (nibbles,
    stored as q - off) or int8[G, nb, 32, R], d/m float32[G, nb, R]; xq float32[T, cols] the
    q8 activation codes, xd/xs float32[T, nb] their fp16 d and s. The codes are exactly the
    integers ggml's dot kernels see (q4_0: q - 8, q5_0: q - 16, q4_1/q5_1 unsigned). With
    DECODE_ONCE tokens or more a group's blocks are decoded once to float32 (the same values)."""
    G, nb, J, R = codes.shape
    T = xq.shape[0]
    for g in prange(G):
        res = np.empty((T, R), np.float32)
        if T >= DECODE_ONCE:
            wbuf = np.empty((nb, 32, R), np.float32)
            for b in range(nb):
                for j in range(32):
                    for i0 in range(0, R, 16):
                        vstore(wbuf[b, j], i0, vweights(codes[g, b, j % J], i0, 4 * (j // J), off))
            for i0 in range(0, R, 16):        # tokens inside: a 16-row slice of wbuf stays in L1/L2
                for t in range(T):
                    vstore(res[t], i0, dot16(wbuf, g, off, xq[t], xd[t], xs[t], d, m, i0, has_m, codes, False))
        else:
            for t in range(T):
                for i0 in range(0, R, 32):     # repack's R is 32 or 64
                    dot32(res[t], codes[g], g, off, xq[t], xd[t], xs[t], d, m, i0, has_m, codes, t == 0 and i0 == 0)
        store_rows(out, res, g)


# ---- K-quant, f32 and bf16 weights: float64 in column order -------------------------------------------
@njit(cache=True, inline="always")
def col_dots(res, x, tile):
    """res float32[T, R] = float32(sum over columns c in order of x[t, c] * tile[c, i]) in
    float64, as column_order_matmul: a product of two float32 is exact in float64, so each FMA
    is the reference's add."""
    T, cols = x.shape
    R = tile.shape[1]
    acc = np.empty(8, np.float64)
    for t in range(T):
        xt = x[t]
        for i0 in range(0, R, 8):
            a = vsplat(0.0)
            for c in range(cols):
                a = vfma(vsplat(np.float64(xt[c])), vload_f64(tile[c], i0), a)
            vstore(acc, 0, a)
            for i in range(8):
                res[t, i0 + i] = acc[i]


@njit(cache=True, parallel=True)
def matmul_col64_float(out, x, dense):
    """out float32[T, rows] = x @ W.T in column order (col_dots) for float weights repacked as
    dense float32[G, cols, R] (f32, bf16: exact values)."""
    G = dense.shape[0]
    for g in prange(G):
        res = np.empty((x.shape[0], dense.shape[2]), np.float32)
        col_dots(res, x, dense[g])
        store_rows(out, res, g)


@njit(cache=True, parallel=True)
def matmul_col64(out, x, codes, d, m, off, has_m, nibbles):
    """out float32[T, rows] = x @ W.T in column order (col_dots) for a repacked K-quant W:
    each group's rows decoded to float32 first, w = fp32(q * d) (+ m) as dequantize_row_*;
    codes uint8[G, nb, B/2, R] (nibbles: byte j holds element j low, j + B/2 high, as q - off)
    or int8[G, nb, B, R]."""
    G, nb, J, R = codes.shape
    T, cols = x.shape
    B = cols // nb
    for g in prange(G):
        tile = np.empty((cols, R), np.float32)
        for b in range(nb):
            for j in range(B):
                sh = 4 * (j // J)
                for i in range(R):
                    c = np.int32(codes[g, b, j % J, i])
                    q = np.int32(np.int32((c >> sh) & 15) + off) if nibbles else c
                    v = np.float32(q) * d[g, b, i]
                    tile[b * B + j, i] = v + m[g, b, i] if has_m else v
        res = np.empty((T, R), np.float32)
        col_dots(res, x, tile)
        store_rows(out, res, g)


# ---- F16 weights -------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def dot_tinyblas(a, b, k):
    """sum a[c] * b[c] (a float32, b uint16 F16 bits) as tinyBLAS's F16 gemm: lane l takes
    c = l, l + 8, ... with one FMA each, then hsum8; k % 8 == 0."""
    acc = vsplat8(ZERO)
    for c in range(0, k, 8):
        acc = vfma(vload8(a, c), vload8_f16(b, c), acc)
    return hsum8(acc)


@njit(cache=True, inline="always")
def dot_vec(a, b, k):
    """sum a[c] * b[c] as ggml_vec_dot_f16 (AVX2): 4 accumulators of 8 lanes over steps of
    32, reduced (0+2) + (1+3) then hsum8_reduce to a double; the k % 32 rest added one by one
    in double as float32 products; returned as float32."""
    k32 = k - k % 32
    a0 = a1 = a2 = a3 = vsplat8(ZERO)
    for c in range(0, k32, 32):
        a0 = vfma(vload8(a, c), vload8_f16(b, c), a0)
        a1 = vfma(vload8(a, c + 8), vload8_f16(b, c + 8), a1)
        a2 = vfma(vload8(a, c + 16), vload8_f16(b, c + 16), a2)
        a3 = vfma(vload8(a, c + 24), vload8_f16(b, c + 24), a3)
    s = np.float64(hsum8_reduce(vadd(vadd(a0, a2), vadd(a1, a3))))
    for c in range(k32, k):
        s += np.float64(a[c] * bd.fp16_to_f32(b[c]))
    return np.float32(s)


@njit(cache=True)
def round_rows_f16(x):  # float32[T, k] -> each value rounded to F16 (the F16 vec_dot type)
    T, k = x.shape
    out = np.empty((T, k), np.float32)
    for t in range(T):
        for c in range(k):
            out[t, c] = round_f16_s(x[t, c])
    return out


@njit(cache=True, parallel=True)
def matmul_f16(out, x16, w, tinyblas):
    """out float32[T, rows] = x16 @ W.T for F16 weights w uint16[rows, k] and F16-valued x16
    float32[T, k]: tinyBLAS's order when tinyblas (the emulation's choice: T > 1, k % 8 == 0,
    rows % 4 == 0), else ggml_vec_dot_f16 row by row."""
    rows, k = w.shape
    T = x16.shape[0]
    for r in prange(rows):
        for t in range(T):
            out[t, r] = dot_tinyblas(x16[t], w[r], k) if tinyblas else dot_vec(x16[t], w[r], k)


# ---- per-token ops ------------------------------------------------------------------------------
@njit(cache=True)
def rmsnorm(out, x, weight, eps):
    """ggml_compute_forward_rms_norm_f32 then the weight: squares rounded to float, summed in
    double in index order, mean rounded to float, scale = 1/sqrtf(mean + eps), (x * scale) * w."""
    T, n = x.shape
    for t in range(T):
        s = 0.0
        for i in range(n):
            s += np.float64(x[t, i] * x[t, i])
        mean = np.float32(s / n)
        scale = ONE / np.float32(math.sqrt(mean + np.float32(eps)))
        for i in range(n):
            out[t, i] = (x[t, i] * scale) * weight[i]


@njit(cache=True)
def rope(x, cos, sin, neox):
    """rotate_pairs with FMA contraction, in place on x float32[T, heads, head_dim]:
    y0 = fma(x0, cos, -(x1 sin)), y1 = fma(x0, sin, x1 cos); pairs (2i, 2i+1), or (i, i + n/2)."""
    T, H, _ = x.shape
    half = cos.shape[1]
    for t in range(T):
        for h in range(H):
            for i in range(half):
                a = i if neox else 2 * i
                b = i + half if neox else 2 * i + 1
                x0, x1 = x[t, h, a], x[t, h, b]
                c, s = cos[t, i], sin[t, i]
                x[t, h, a] = fma(x0, c, -(x1 * s))
                x[t, h, b] = fma(x0, s, x1 * c)


# ggml_v_expf's constants (ggml_emulation.py gives their hex forms)
SHIFT = np.float32(12582912.0)
LOG2E = np.float32(1.44269502162933349609375)
LN2_HI = np.float32(0.693145751953125)
LN2_LO = np.float32(1.428606765330187045037746429443359375e-06)
P0, P1, P2, P3, P4 = (np.float32(float.fromhex(h)) for h in ("0x1.0e4020p-7", "0x1.573e2ep-5", "0x1.555e66p-3",
                                                             "0x1.fffdb6p-2", "0x1.ffffecp-1"))
C126, C192 = np.float32(126), np.float32(192)


@njit(cache=True, inline="always")
def of_u32(v):  # the float32 whose bits are v mod 2^32 (v an int64)
    u = v & 0xFFFFFFFF
    return f32_of_bits(np.int32(u - (1 << 32) if u >= (1 << 31) else u))


@njit(cache=True)
def expf_v(x):
    """ggml_v_expf for one float32 lane (expf_v in ggml_emulation.py): the shifter rounding,
    the two-step reduction, the polynomial by FMAs and the exponent assembled from bits, with
    its |n| > 126 and |n| > 192 branches."""
    z = fma(x, LOG2E, SHIFT)
    n = z - SHIFT
    b = fma(-n, LN2_LO, fma(-n, LN2_HI, x))
    e = (np.int64(f32_bits(z)) << 23) & 0xFFFFFFFF
    e = e - (1 << 32) if e >= (1 << 31) else e                      # the int32 of slli_epi32
    k = of_u32(e + 0x3F800000)
    u = b * b
    j = fma(fma(fma(P0, b, P1), u, fma(P2, b, P3)), u, P4 * b)
    if abs(n) > C126:
        g = np.int64(0x82000000) if n <= ZERO else np.int64(0)
        s1 = of_u32(g + 0x7F000000)
        if abs(n) > C192:
            return s1 * s1
        s2 = of_u32(e - g)
        return fma(s2, j, s2) * s1
    return fma(j, k, k)


@njit(cache=True, parallel=True)
def swiglu(out, gate, up, nv):
    """ggml_vec_swiglu_f32's vector part, columns 0 .. nv - 1 (nv a multiple of 8):
    (g / (1 + ggml_v_expf(0 - g))) * up in float32. The scalar tail (libm expf) is the caller's."""
    T = gate.shape[0]
    for t in prange(T):
        for i in range(nv):
            g = gate[t, i]
            out[t, i] = (g / (ONE + expf_v(ZERO - g))) * up[t, i]


# ---- attention over the F16 cache ---------------------------------------------------------------
@njit(cache=True)
def attend_row(o, qv, kf, vf, slots, n, kv, scale, batched):
    """One query row of llama.cpp's non-flash attention (_attention_ggml in numpy_backend.py):
    Q rounded to F16; kq = F16 dot of q and each K row (tinyBLAS's order for a batched segment
    when hd % 8 == 0, else ggml_vec_dot_f16); w = kq * scale; ggml_v_expf(w - max); the sum in
    double over groups of 8 positions (each hsum8); p = F16(y * float(1/sum)); o[d] = F16 dot of
    p with V's column d over the positions (tinyBLAS: lane = position % 8 when batched and
    hd % 4 == 0; else ggml_vec_dot_f16: accumulator (position % 32) / 8, lane position % 8).
    Positions from n on (masked, and the padding to 256) have p = 0 and add exact zeros: they
    are skipped, and their scores are not computed. (A non-finite value in a masked position's
    K or V row would give llama.cpp a NaN that this does not reproduce.)"""
    hd = qv.shape[0]
    q16 = np.empty(hd, np.float32)
    for d in range(hd):
        q16[d] = round_f16_s(qv[d])
    n8 = -(-n // 8) * 8
    y = np.zeros(n8, np.float32)
    tiny_kq = batched and hd % 8 == 0
    mx = np.float32(-np.inf)
    for s in range(n):
        krow = kf[slots[s], kv]
        kq = dot_tinyblas(q16, krow, hd) if tiny_kq else dot_vec(q16, krow, hd)
        y[s] = kq * scale
        mx = max(mx, y[s])
    for s in range(n):
        y[s] = expf_v(y[s] - mx)
    total = 0.0
    for s0 in range(0, n8, 8):
        total += np.float64(((y[s0] + y[s0 + 4]) + (y[s0 + 2] + y[s0 + 6]))
                            + ((y[s0 + 1] + y[s0 + 5]) + (y[s0 + 3] + y[s0 + 7])))
    inv = np.float32(1.0 / total)
    hd8 = hd // 8 * 8
    eight = batched and hd % 4 == 0          # 8 accumulator rows (the batched kernel) or 32
    acc = np.zeros((8 if eight else 32, hd), np.float32)
    for s in range(n):
        p = round_f16_s(y[s] * inv)
        vrow = vf[slots[s], kv]
        a = acc[s % acc.shape[0]]
        pv = vsplat8(p)
        for d in range(0, hd8, 8):
            vstore8(a, d, vfma(pv, vload8_f16(vrow, d), vload8(a, d)))
        for d in range(hd8, hd):
            a[d] = fma(p, bd.fp16_to_f32(vrow[d]), a[d])
    if eight:
        for d in range(hd):
            o[d] = (((acc[0, d] + acc[4, d]) + (acc[2, d] + acc[6, d]))
                    + ((acc[1, d] + acc[5, d]) + (acc[3, d] + acc[7, d])))
    else:
        for d in range(hd):
            h = np.empty(8, np.float32)
            for ln in range(8):
                h[ln] = (acc[ln, d] + acc[16 + ln, d]) + (acc[8 + ln, d] + acc[24 + ln, d])
            o[d] = np.float32(np.float64(((h[0] + h[4]) + (h[1] + h[5])) + ((h[2] + h[6]) + (h[3] + h[7]))))


@njit(cache=True, parallel=True)
def attention(out, q, kf, vf, slots, positions, seg_of_token, batched, scale):
    """Causal GQA attention of a ragged step over the paged F16 cache (kf, vf uint16 F16 bits
    [n_rows, n_kv, hd]); batched[j]: segment j has more than one token (llama.cpp then runs
    its batch kernels). One task per (token, head); token i is paired with N - 1 - i so that
    the threads' equal contiguous shares hold equal work under the causal mask."""
    N, n_heads, hd = q.shape
    group = n_heads // kf.shape[1]
    for task in prange((N + 1) // 2 * n_heads):
        i, h = task // n_heads, task % n_heads
        j = seg_of_token[i]
        attend_row(out[i, h], q[i, h], kf, vf, slots[j], positions[i] + 1, h // group, scale, batched[j])
        t = N - 1 - i
        if t != i:
            j = seg_of_token[t]
            attend_row(out[t, h], q[t, h], kf, vf, slots[j], positions[t] + 1, h // group, scale, batched[j])
