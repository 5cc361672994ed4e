"""The per-token ops of the numba backend, each the same arithmetic as the NumPy reference
(numpy_backend.py) in the same numeric mode; `ggml` flags select llama.cpp's roundings."""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from .jit import njit

from .. import blockdecode as bd
from .. import kvdecode as kd
from .prefetch import prefetch
from .simd import fma, vfma, vload, vload_f64, vsplat, vstore, vsum


@njit(cache=True)
def rmsnorm(out, x, weight, eps, ggml):
    """out[T, dim] = x / sqrt(mean(x^2) + eps) * weight. ideal: mean of squares in float64 and
    the quotient rounded once; ggml (ggml_compute_forward_rms_norm_f32): squares rounded to
    float, summed in double, scale = 1/sqrtf(mean + eps) in float."""
    T, n = x.shape
    for t in range(T):
        if ggml:
            s = 0.0
            for i in range(n):
                s += np.float64(x[t, i] * x[t, i])
            mean = np.float32(s / n)
            scale = np.float32(1) / np.float32(math.sqrt(mean + np.float32(eps)))
            for i in range(n):
                out[t, i] = (x[t, i] * scale) * weight[i]
        else:
            s = 0.0
            for i in range(n):
                s += np.float64(x[t, i]) * np.float64(x[t, i])
            r = math.sqrt(s / n + eps)
            for i in range(n):
                out[t, i] = np.float32(np.float64(x[t, i]) / r) * weight[i]


@njit(cache=True)
def rope(x, cos, sin, neox):
    """Rotate x[T, heads, head_dim] in place by the angles cos/sin[T, rope_dim/2]; pairs
    (2i, 2i+1), or (i, i + rope_dim/2) when neox. float32, as the reference."""
    T, H, _ = x.shape
    half = cos.shape[1]
    for t in range(T):
        for h in range(H):
            for i in range(half):
                a = i if neox else 2 * i
                b = i + half if neox else 2 * i + 1
                x0, x1 = x[t, h, a], x[t, h, b]
                c, s = cos[t, i], sin[t, i]
                x[t, h, a] = x0 * c - x1 * s
                x[t, h, b] = x0 * s + x1 * c


@njit(cache=True)
def store_f16(cache, pos0, x):
    """cache[pos0 + t] = fp16-rounded x[t] (llama.cpp's F16 KV cache)."""
    T, H, D = x.shape
    for t in range(T):
        for h in range(H):
            for d in range(D):
                cache[pos0 + t, h, d] = bd.round_f16(x[t, h, d])


LOG2E = 1.4426950408889634
LN2_HI = 0.6931471803691238      # 0x3FE62E42FEE00000: k * LN2_HI is exact for |k| < 2^11
LN2_LO = 1.9082149292705877e-10  # ln 2 - LN2_HI


@njit(cache=True, fastmath={"contract"})
def exp_nonpositive(x, bits):
    """x[i] = exp(x[i]) in place for x[i] <= 0 (softmax after subtracting the maximum), float64,
    within about 1 ulp of libm. A loop LLVM can vectorize (a libm call per element cost 7-20 ns,
    most of a 512-token prefill's attention): exp(x) = 2^k exp(r) with k = rint(x / ln 2),
    r = x - k ln 2 in two parts (Cody-Waite), |r| <= ln2 / 2, exp(r) by its Taylor series to
    r^13 (truncation < 1e-17), 2^k from its exponent bits (bits int64[len(x)] is scratch).
    Below -708 the result is 0 (exp would be < 3e-308); NaN stays NaN."""
    n = x.shape[0]
    for i in range(n):
        xi = max(x[i], -708.0)
        k = np.rint(xi * LOG2E)
        r = (xi - k * LN2_HI) - k * LN2_LO
        p = 1.0 / 6227020800.0                  # 1/13!, then Horner down to 1/0!
        p = p * r + 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
        p = p * r + 1.0 / 5040.0
        p = p * r + 1.0 / 720.0
        p = p * r + 1.0 / 120.0
        p = p * r + 1.0 / 24.0
        p = p * r + 1.0 / 6.0
        p = p * r + 0.5
        p = p * r + 1.0
        p = p * r + 1.0
        x[i] = 0.0 if x[i] <= -708.0 else p
        bits[i] = (np.int64(k) + 1023) << 52    # the float64 2^k
    scale = bits.view(np.float64)
    for i in range(n):
        x[i] *= scale[i]


@njit(cache=True)
def softmax_numerators(p):
    """p[s] = exp(p[s] - max p) in place (float64 scores); returns their sum."""
    mx = -np.inf
    for s in range(p.shape[0]):
        mx = max(mx, p[s])
    for s in range(p.shape[0]):
        p[s] -= mx
    exp_nonpositive(p, np.empty(p.shape[0], np.int64))
    tot = 0.0
    for s in range(p.shape[0]):
        tot += p[s]
    return tot


# ---- attention over the paged KV cache ------------------------------------------------------------
# K and V of one layer are the pool's rows viewed as kf, vf [n_blocks * block_size, n_kv, hd]
# (float32 for an f32 pool, uint16 F16 bits for an f16 one); slots int64[n_seg, S] gives, per
# segment, the row of each of its positions (its block table expanded: block * block_size +
# offset), so a position reads the same value through whatever block holds it.

AHEAD_ROWS = 8   # K/V rows prefetched ahead: a long cache's rows come from L3, not L2


@njit(cache=True, inline="always")
def prefetch_row(a, slot, kv):
    row = a[slot, kv]
    for i in range(0, row.shape[0], 64 // row.itemsize):
        prefetch(row, i)


@njit(cache=True, inline="always")
def dot_rest(lanes, q, k, hd8):  # the score from its 8 lanes and the d >= hd8 remainder
    dot = vsum(lanes)
    for d in range(hd8, q.shape[0]):
        dot = fma(q[d], np.float64(k[d]), dot)
    return dot


@njit(cache=True, inline="always")
def add_row(acc, ps, vrow, hd8):  # acc[d] = fma(ps, v[d], acc[d]) for every d
    pv = vsplat(ps)
    for d in range(0, hd8, 8):
        vstore(acc, d, vfma(pv, vload_f64(vrow, d), vload(acc, d)))
    for d in range(hd8, acc.shape[0]):
        acc[d] = fma(ps, np.float64(vrow[d]), acc[d])


@njit(cache=True, inline="always")
def scores4(p, q64, s, k0, k1, k2, k3, hd8, scale):
    """p[g, s .. s + 3] = scale * (q_g . k) for four float32 rows k0..k3 (attend_heads' order)."""
    for g in range(q64.shape[0]):
        qg = q64[g]
        l0 = l1 = l2 = l3 = vsplat(0.0)
        for d in range(0, hd8, 8):
            qd = vload(qg, d)
            l0 = vfma(qd, vload_f64(k0, d), l0)
            l1 = vfma(qd, vload_f64(k1, d), l1)
            l2 = vfma(qd, vload_f64(k2, d), l2)
            l3 = vfma(qd, vload_f64(k3, d), l3)
        p[g, s] = dot_rest(l0, qg, k0, hd8) * scale
        p[g, s + 1] = dot_rest(l1, qg, k1, hd8) * scale
        p[g, s + 2] = dot_rest(l2, qg, k2, hd8) * scale
        p[g, s + 3] = dot_rest(l3, qg, k3, hd8) * scale


@njit(cache=True, inline="always")
def score1(p, q64, s, k0, hd8, scale):
    """p[g, s] = scale * (q_g . k0), the same operations as one chain of scores4."""
    for g in range(q64.shape[0]):
        qg = q64[g]
        l0 = vsplat(0.0)
        for d in range(0, hd8, 8):
            l0 = vfma(vload(qg, d), vload_f64(k0, d), l0)
        p[g, s] = dot_rest(l0, qg, k0, hd8) * scale


@njit(cache=True, inline="always")
def add_rows4(acc, p, s, v0, v1, v2, v3, hd8):
    """acc[g] += p[g, s + i] * v_i for the four float32 rows v0..v3, FMAs in position order."""
    hd = acc.shape[1]
    for g in range(acc.shape[0]):
        ag = acc[g]
        p0, p1, p2, p3 = vsplat(p[g, s]), vsplat(p[g, s + 1]), vsplat(p[g, s + 2]), vsplat(p[g, s + 3])
        for d in range(0, hd8, 8):
            a = vfma(p0, vload_f64(v0, d), vload(ag, d))
            a = vfma(p1, vload_f64(v1, d), a)
            a = vfma(p2, vload_f64(v2, d), a)
            vstore(ag, d, vfma(p3, vload_f64(v3, d), a))
        for d in range(hd8, hd):
            ag[d] = fma(p[g, s + 3], np.float64(v3[d]), fma(p[g, s + 2], np.float64(v2[d]),
                        fma(p[g, s + 1], np.float64(v1[d]), fma(p[g, s], np.float64(v0[d]), ag[d]))))


@njit(cache=True, inline="always")
def widen_queries(qs):  # float32[G, hd] -> float64[G, hd]
    G, hd = qs.shape
    q64 = np.empty((G, hd), np.float64)
    for g in range(G):
        for d in range(hd):
            q64[g, d] = qs[g, d]
    return q64


@njit(cache=True, inline="always")
def normalize(o, acc, tot):  # o[g, d] = acc[g, d] / tot[g], rounded once to float32
    for g in range(o.shape[0]):
        for d in range(o.shape[1]):
            o[g, d] = acc[g, d] / tot[g]


@njit(cache=True, inline="always")
def softmax_rows(p):  # -> tot float64[G]: each row of p exp(p - max) in place, its sum
    tot = np.empty(p.shape[0], np.float64)
    for g in range(p.shape[0]):
        tot[g] = softmax_numerators(p[g])
    return tot


@njit(cache=True)
def attend_heads(o, qs, kf, vf, slots, n, kv, scale):
    """ideal mode, the G query heads qs float32[G, hd] of one token that share KV head kv:
    o float32[G, hd] = softmax(scale * K q) V over positions 0 .. n - 1, per head in float64,
    each sum in a fixed order that depends on hd and n only:
      score  q . k over d as 8 lanes (lane u takes d = u, u + 8, ...; simd.vsum adds the lanes in
             a fixed tree) then the d >= hd // 8 * 8 rest in order, all FMAs;
      softmax  max, exp (exp_nonpositive), the denominator summed over positions in order;
      V sum  per output element, FMAs over positions in order; normalized once at the end.
    The heads go together so that each K and V row is read once (from L3 for a long cache)
    for all of them; positions go 4 at a time (independent score chains, and a V accumulator
    loaded and stored once per 4 FMAs), the rest one at a time, with the same operations."""
    G, hd = qs.shape
    hd8 = hd // 8 * 8
    q64 = widen_queries(qs)
    p = np.empty((G, n), np.float64)
    s = 0
    while s < n:
        for a in range(s + AHEAD_ROWS, min(s + AHEAD_ROWS + 4, n)):
            prefetch_row(kf, slots[a], kv)
        if s + 4 <= n:
            scores4(p, q64, s, kf[slots[s], kv], kf[slots[s + 1], kv], kf[slots[s + 2], kv], kf[slots[s + 3], kv],
                    hd8, scale)
            s += 4
        else:
            score1(p, q64, s, kf[slots[s], kv], hd8, scale)
            s += 1
    tot = softmax_rows(p)
    acc = np.zeros((G, hd), np.float64)
    s = 0
    while s < n:
        for a in range(s + AHEAD_ROWS, min(s + AHEAD_ROWS + 4, n)):
            prefetch_row(vf, slots[a], kv)
        if s + 4 <= n:
            add_rows4(acc, p, s, vf[slots[s], kv], vf[slots[s + 1], kv], vf[slots[s + 2], kv], vf[slots[s + 3], kv],
                      hd8)
            s += 4
        else:
            for g in range(G):
                add_row(acc[g], p[g, s], vf[slots[s], kv], hd8)
            s += 1
    normalize(o, acc, tot)


# ---- attention over quantized rows (any cache type with a kind in KV_KINDS) -----------------------
# kb, vb are the pool's bytes of one layer, uint8[n_blocks * block_size, n_kv, row_bytes]; a row is
# decoded once per task into a float32 scratch row (every supported type decodes to float32
# values: ggml's dequantize_row_*, LMDeploy's loads rounded once, as the reference's load), and
# then goes through exactly the arithmetic of attend_heads (scores4, score1, add_rows4, add_row):
# an f32 pool through this path gives attend_heads' bits. A type with per-layer parameters
# (int8-calibrated) gets them as par float32[2, n_kv] (scale, zp per KV head); others ignore par.
KV_KINDS = {"f32": bd.F32, "f16": bd.F16, "bf16": bd.BF16, "q8_0": bd.Q8_0, "q4_0": bd.Q4_0,
            "q4_1": bd.Q4_1, "q5_0": bd.Q5_0, "q5_1": bd.Q5_1, **kd.KINDS}


@njit(cache=True, inline="always")
def f16_bits_to_f32_bits(h):
    """IEEE binary16 bits -> the bits of the same value as a binary32 (exact): the integer form
    of blockdecode.fp16_to_f32, which a loop can vectorize (ldexp per element cost 50 ns)."""
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    mant = h & 0x3FF
    if e == 31:
        return sign | 0x7F800000 | (mant << 13)                  # inf, NaN (payload kept)
    if e != 0:
        return sign | ((e + 112) << 23) | (mant << 13)          # rebias 15 -> 127
    if mant == 0:
        return sign
    sh = 0                                                      # subnormal: normalize the mantissa
    while (mant & 0x400) == 0:
        mant <<= 1
        sh += 1
    return sign | ((113 - sh) << 23) | ((mant & 0x3FF) << 13)


@njit(cache=True)
def decode_row_lmdeploy(kind, row, out, scale, zp):
    """An LMDeploy or int8-calibrated row -> out float32[hd]: kvdecode's codes, and its formulas
    (kvdecode._tm, _pt, int8_calibrated_elem: float64, rounded once) with the row's fp16 scale
    and zero decoded once instead of per element (ldexp per element made a row 10x slower)."""
    hd = out.shape[0]
    if kind == kd.INT8_CALIBRATED:
        for d in range(hd):
            out[d] = kd.int8_calibrated_elem(row, d, scale, zp)
        return
    if kind == kd.FP8_E4M3:
        for d in range(hd):
            out[d] = kd.fp8_e4m3_elem(row, d, hd)
        return
    if kind == kd.FP8_E5M2:
        for d in range(hd):
            out[d] = kd.fp8_e5m2_elem(row, d, hd)
        return
    nc = row.shape[0] - 4                        # codes, then scale and zero (zeros) fp16
    s = np.float64(bd.f16_at(row, nc))
    z = np.float64(bd.f16_at(row, nc + 2))
    if kind == kd.LMDEPLOY_INT8:                 # q * scale + zero
        for d in range(hd):
            out[d] = np.float32(np.float64(kd.by(row, d)) * s + z)
    elif kind == kd.LMDEPLOY_INT4:
        for d in range(hd):
            out[d] = np.float32(np.float64(kd.tm_int4_code(row, d)) * s + z)
    elif kind == kd.LMDEPLOY_PT_INT8:            # (q - zeros) * scale
        for d in range(hd):
            out[d] = np.float32((np.float64(kd.by(row, d)) - z) * s)
    else:
        for d in range(hd):
            out[d] = np.float32((np.float64(kd.pt_int4_code(row, d, hd)) - z) * s)


@njit(cache=True)
def decode_row(kind, row, out, bits, scale, zp):
    """out float32[hd] = the values of one cache row (its bytes row uint8[row_bytes]), as the
    cache type's load gives them; bits is out viewed as uint32. Quantized rows: hd // 32
    blocks, each through blockdecode's per-element code functions with its scales read once
    (dequantize_row_*: code * d, or code * d + m, in float32); float rows by their bit
    patterns; LMDeploy and calibrated rows element by element through kvdecode (scale, zp: the
    calibrated type's, for this row's layer and KV head)."""
    hd = out.shape[0]
    if kind >= kd.LMDEPLOY_INT8:
        decode_row_lmdeploy(kind, row, out, scale, zp)
        return
    if kind == bd.F32:
        for d in range(hd):
            bits[d] = (np.uint32(row[4 * d]) | (np.uint32(row[4 * d + 1]) << 8) | (np.uint32(row[4 * d + 2]) << 16)
                       | (np.uint32(row[4 * d + 3]) << 24))
        return
    if kind == bd.F16:
        for d in range(hd):
            bits[d] = f16_bits_to_f32_bits(np.uint32(row[2 * d]) | (np.uint32(row[2 * d + 1]) << 8))
        return
    if kind == bd.BF16:                                         # the top half of a float32
        for d in range(hd):
            bits[d] = (np.uint32(row[2 * d]) << 16) | (np.uint32(row[2 * d + 1]) << 24)
        return
    ts = row.shape[0] // (hd // 32)
    for b in range(hd // 32):
        blk = row[b * ts:(b + 1) * ts]
        o = 32 * b
        dd = bd.f16_at(blk, 0)
        if kind == bd.Q8_0:
            for j in range(32):
                out[o + j] = np.float32(bd.q8_0_code(blk, j)) * dd
        elif kind == bd.Q4_0:
            for j in range(32):
                out[o + j] = np.float32(bd.q4_0_code(blk, j)) * dd
        elif kind == bd.Q5_0:
            for j in range(32):
                out[o + j] = np.float32(bd.q5_0_code(blk, j)) * dd
        elif kind == bd.Q4_1:
            m = bd.f16_at(blk, 2)
            for j in range(32):
                out[o + j] = np.float32(bd.q4_1_code(blk, j)) * dd + m
        else:
            m = bd.f16_at(blk, 2)
            for j in range(32):
                out[o + j] = np.float32(bd.q5_1_code(blk, j)) * dd + m


@njit(cache=True)
def attend_heads_rows(o, qs, kb, vb, slots, n, kv, scale, k_kind, v_kind, k_par, v_par):
    """attend_heads over K and V rows of any kind (kb, vb: bytes), each row decoded once."""
    G, hd = qs.shape
    hd8 = hd // 8 * 8
    q64 = widen_queries(qs)
    p = np.empty((G, n), np.float64)
    buf = np.empty((4, hd), np.float32)
    bits = buf.view(np.uint32)
    s = 0
    while s < n:
        if s + 4 <= n:
            for i in range(4):
                decode_row(k_kind, kb[slots[s + i], kv], buf[i], bits[i], k_par[0, kv], k_par[1, kv])
            scores4(p, q64, s, buf[0], buf[1], buf[2], buf[3], hd8, scale)
            s += 4
        else:
            decode_row(k_kind, kb[slots[s], kv], buf[0], bits[0], k_par[0, kv], k_par[1, kv])
            score1(p, q64, s, buf[0], hd8, scale)
            s += 1
    tot = softmax_rows(p)
    acc = np.zeros((G, hd), np.float64)
    s = 0
    while s < n:
        if s + 4 <= n:
            for i in range(4):
                decode_row(v_kind, vb[slots[s + i], kv], buf[i], bits[i], v_par[0, kv], v_par[1, kv])
            add_rows4(acc, p, s, buf[0], buf[1], buf[2], buf[3], hd8)
            s += 4
        else:
            decode_row(v_kind, vb[slots[s], kv], buf[0], bits[0], v_par[0, kv], v_par[1, kv])
            for g in range(G):
                add_row(acc[g], p[g, s], buf[0], hd8)
            s += 1
    normalize(o, acc, tot)


@njit(cache=True)
def attend_row_ggml(o, qv, kf, vf, slots, n, kv, scale):
    """ggml mode, one query row over an F16 cache (kf, vf: the F16 bits, uint16):
    Q rounded to F16, K.Q in float64 over exact F16 x F16 products, rounded to float32 and
    scaled, exp in float32, the sum in double, probabilities rounded to F16 (the F16 V
    matmul), the V sum in float64 rounded once to float32 (llama.cpp's non-flash attention,
    up to its SIMD summation order)."""
    hd = qv.shape[0]
    q16 = np.empty(hd, np.float64)
    for d in range(hd):
        q16[d] = bd.round_f16(qv[d])
    sc = np.empty(n, np.float32)
    mx = np.float32(-np.inf)
    for s in range(n):
        krow = kf[slots[s], kv]
        acc = 0.0
        for d in range(hd):
            acc += q16[d] * np.float64(bd.fp16_to_f32(krow[d]))
        sc[s] = np.float32(acc) * np.float32(scale)
        mx = max(mx, sc[s])
    tot = 0.0
    for s in range(n):
        e = np.exp(np.float32(sc[s] - mx))
        sc[s] = e
        tot += np.float64(e)
    inv = np.float32(1.0 / tot)
    out = np.zeros(hd, np.float64)
    for s in range(n):
        ps = np.float64(bd.round_f16(sc[s] * inv))
        vrow = vf[slots[s], kv]
        for d in range(hd):
            out[d] += ps * np.float64(bd.fp16_to_f32(vrow[d]))
    for d in range(hd):
        o[d] = out[d]


@njit(cache=True, parallel=True)
def attention(out, q, kf, vf, slots, positions, seg_of_token):
    """ideal mode, causal GQA attention over the paged cache: q, out float32[N, n_heads, hd];
    token i attends to positions 0 .. positions[i] of its segment's sequence (rows
    slots[seg_of_token[i]]). One task per (token, KV head), whatever N and the segments are: a
    decode token and a prefill token run the same attend_heads. The parallel loop takes token
    i together with N - 1 - i, so that the equal contiguous shares Numba gives each thread
    hold equal work under the causal mask."""
    N, n_heads, hd = q.shape
    n_kv = kf.shape[1]
    G = n_heads // n_kv
    scale = 1.0 / math.sqrt(hd)
    for task in prange((N + 1) // 2 * n_kv):
        i, kv = task // n_kv, task % n_kv
        h = kv * G
        attend_heads(out[i, h: h + G], q[i, h: h + G], kf, vf, slots[seg_of_token[i]], positions[i] + 1, kv, scale)
        t = N - 1 - i
        if t != i:
            attend_heads(out[t, h: h + G], q[t, h: h + G], kf, vf, slots[seg_of_token[t]], positions[t] + 1, kv, scale)


@njit(cache=True, parallel=True)
def attention_rows(out, q, kb, vb, slots, positions, seg_of_token, k_kind, v_kind, k_par, v_par):
    """attention (same tasks, same pairing of token i with N - 1 - i) over rows of any kind:
    kb, vb uint8[n_blocks * block_size, n_kv, row_bytes], decoded by attend_heads_rows."""
    N, n_heads, hd = q.shape
    n_kv = kb.shape[1]
    G = n_heads // n_kv
    scale = 1.0 / math.sqrt(hd)
    for task in prange((N + 1) // 2 * n_kv):
        i, kv = task // n_kv, task % n_kv
        h = kv * G
        attend_heads_rows(out[i, h: h + G], q[i, h: h + G], kb, vb, slots[seg_of_token[i]], positions[i] + 1, kv,
                          scale, k_kind, v_kind, k_par, v_par)
        t = N - 1 - i
        if t != i:
            attend_heads_rows(out[t, h: h + G], q[t, h: h + G], kb, vb, slots[seg_of_token[t]], positions[t] + 1,
                              kv, scale, k_kind, v_kind, k_par, v_par)


@njit(cache=True, parallel=True)
def attention_ggml(out, q, kf, vf, slots, positions, seg_of_token):
    """ggml mode: attention with attend_row_ggml (kf, vf the F16 bits)."""
    N, n_heads, hd = q.shape
    group = n_heads // kf.shape[1]
    scale = 1.0 / math.sqrt(hd)
    for task in prange((N + 1) // 2 * n_heads):
        i, h = task // n_heads, task % n_heads
        attend_row_ggml(out[i, h], q[i, h], kf, vf, slots[seg_of_token[i]], positions[i] + 1, h // group, scale)
        t = N - 1 - i
        if t != i:
            attend_row_ggml(out[t, h], q[t, h], kf, vf, slots[seg_of_token[t]], positions[t] + 1, h // group, scale)


@njit(cache=True, parallel=True)
def swiglu(out, gate, up, ggml):
    """out = silu(gate) * up, silu(g) = g / (1 + exp(-g)): in float64 then rounded (ideal),
    or in float32 (ggml). ideal takes e = exp(-|g|) from the vectorized exp_nonpositive and
    writes silu(g) = g e / (1 + e) for g < 0 (the same value within float64 rounding)."""
    T, n = gate.shape
    for t in prange(T):
        if ggml:
            for i in range(n):
                g = gate[t, i]
                out[t, i] = (g / (np.float32(1) + np.exp(-g))) * up[t, i]
            continue
        e = np.empty(n, np.float64)
        for i in range(n):
            e[i] = -abs(np.float64(gate[t, i]))
        exp_nonpositive(e, np.empty(n, np.int64))
        for i in range(n):
            g = np.float64(gate[t, i])
            s = g / (1.0 + e[i]) if g >= 0 else g * e[i] / (1.0 + e[i])
            out[t, i] = np.float32(s) * up[t, i]
