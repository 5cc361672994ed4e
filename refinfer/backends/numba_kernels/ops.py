"""The per-token ops of the numba backend, each the same arithmetic as the NumPy reference
(numpy_backend.py) in the same numeric mode; `ggml` flags select llama.cpp's roundings."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .. import blockdecode as bd


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


@njit(cache=True, fastmath={"contract"})
def attend(o, qs, kt, vv, n, scale):
    """o float32[G, hd] = softmax(scale * K[:n] q_g) V[:n] for the G query heads qs float32[G, hd]
    of one token that share a KV head: kt float64[hd, S] (K transposed), vv float64[S, hd].
    Scores, softmax and the V sum in float64; every sum runs in a fixed order (over d for a
    score, over positions for o). The heads go through each block of K and V rows together,
    so those rows are read from L1 once per head instead of from L2."""
    G, hd = qs.shape
    p = np.zeros((G, n), np.float64)
    d = 0
    while d + 4 <= hd:                    # p[s] += q[d] k[d, s] for d, d+1, d+2, d+3 in turn
        k0, k1, k2, k3 = kt[d], kt[d + 1], kt[d + 2], kt[d + 3]
        for g in range(G):
            q0, q1 = np.float64(qs[g, d]), np.float64(qs[g, d + 1])
            q2, q3 = np.float64(qs[g, d + 2]), np.float64(qs[g, d + 3])
            pg = p[g]
            for s in range(n):
                pg[s] = pg[s] + q0 * k0[s] + q1 * k1[s] + q2 * k2[s] + q3 * k3[s]
        d += 4
    for d in range(d, hd):
        kd = kt[d]
        for g in range(G):
            qd, pg = np.float64(qs[g, d]), p[g]
            for s in range(n):
                pg[s] += qd * kd[s]
    tot = np.empty(G, np.float64)
    for g in range(G):
        for s in range(n):
            p[g, s] *= scale
        tot[g] = softmax_numerators(p[g])
    acc = np.zeros((G, hd), np.float64)
    s = 0
    while s + 4 <= n:                     # acc[d] += p[s] v[s, d] for s, s+1, s+2, s+3 in turn
        v0, v1, v2, v3 = vv[s], vv[s + 1], vv[s + 2], vv[s + 3]
        for g in range(G):
            p0, p1, p2, p3 = p[g, s], p[g, s + 1], p[g, s + 2], p[g, s + 3]
            a = acc[g]
            for e in range(hd):
                a[e] = a[e] + p0 * v0[e] + p1 * v1[e] + p2 * v2[e] + p3 * v3[e]
        s += 4
    for s in range(s, n):
        vs = vv[s]
        for g in range(G):
            ps, a = p[g, s], acc[g]
            for e in range(hd):
                a[e] += ps * vs[e]
    for g in range(G):
        for e in range(hd):
            o[g, e] = acc[g, e] / tot[g]    # normalized once, as attend_one


@njit(cache=True, fastmath={"reassoc", "contract"})
def scores_one(p, qv, k, kv, scale):
    """p[s] = scale * (q . k[s, kv]) in float64 for s < len(p); each dot reassociated so that
    it vectorizes over d."""
    hd = qv.shape[0]
    for s in range(p.shape[0]):
        acc = 0.0
        for d in range(hd):
            acc += np.float64(qv[d]) * np.float64(k[s, kv, d])
        p[s] = acc * scale


@njit(cache=True, fastmath={"contract"})
def weighted_rows(acc, p, v, kv):
    """acc[e] += p[s] v[s, kv, e] for s < len(p), in order of s (vectorized over e)."""
    for s in range(p.shape[0]):
        ps = p[s]
        for e in range(acc.shape[0]):
            acc[e] += ps * np.float64(v[s, kv, e])


@njit(cache=True)
def attend_one(o, qv, k, v, kv, n, scale):
    """attend for a single query (decode) straight from the float32 cache k/v[S, n_kv, hd]
    (for one query the transposed copy of attend's prefill path would cost as much as the
    attention itself); the weights are normalized once at the end. Split into small
    functions: written as one, LLVM vectorized it 2.3x worse (22 us against 9.3 for 512
    positions)."""
    p = np.empty(n, np.float64)
    scores_one(p, qv, k, kv, scale)
    tot = softmax_numerators(p)
    acc = np.zeros(qv.shape[0], np.float64)
    weighted_rows(acc, p, v, kv)
    for e in range(acc.shape[0]):
        o[e] = acc[e] / tot


@njit(cache=True, parallel=True)
def attention(out, q, k, v, pos0):
    """ideal mode: causal GQA attention over the cache, q[T, n_heads, hd], k/v[S, n_kv, hd] ->
    out[T, n_heads, hd] (attend per token and KV head). The reference's sums run in BLAS's order;
    these in a fixed order of their own. K and V are first copied to float64, K transposed
    so that each score loop runs over consecutive positions and vectorizes across them. The
    parallel loop takes query t together with T - 1 - t, so that equal shares of it (Numba
    splits a prange into contiguous chunks) hold equal work under the causal mask; no
    [heads, T, S] temporaries (the reference allocates about 100 MB of them per layer in a
    512-token prefill)."""
    T, n_heads, hd = q.shape
    S, n_kv, _ = k.shape
    group = n_heads // n_kv
    scale = 1.0 / math.sqrt(hd)
    if T == 1:                            # decode: no copies, one dot per position
        for h in prange(n_heads):
            attend_one(out[0, h], q[0, h], k, v, h // group, S, scale)
        return
    kt = np.empty((n_kv, hd, S), np.float64)
    vv = np.empty((n_kv, S, hd), np.float64)
    for kd in prange(n_kv * hd):          # rows of kt written in order (writing them a column
        kh, d = kd // hd, kd % hd         # at a time cost 4.5x more: a page per element)
        for s in range(S):
            kt[kh, d, s] = k[s, kh, d]
    for s in prange(S):
        for kh in range(n_kv):
            for d in range(hd):
                vv[kh, s, d] = v[s, kh, d]
    half = (T + 1) // 2
    for i in prange(half * n_kv):
        t, kv = i // n_kv, i % n_kv
        h = kv * group                    # the query heads of this KV head
        attend(out[t, h: h + group], q[t, h: h + group], kt[kv], vv[kv], S - T + t + 1, scale)
        if T - 1 - t != t:
            t = T - 1 - t
            attend(out[t, h: h + group], q[t, h: h + group], kt[kv], vv[kv], S - T + t + 1, scale)


@njit(cache=True, parallel=True)
def attention_ggml(out, q, k, v, pos0):
    """ggml mode: as attention, with Q rounded to F16, K.Q in float32, scaled, exp in float32,
    sum in double, probabilities rounded to F16 (the F16 V matmul), V sum rounded once to
    float32 (llama.cpp's non-flash attention with an F16 cache)."""
    T, n_heads, hd = q.shape
    group = n_heads // k.shape[1]
    scale = 1.0 / math.sqrt(hd)
    for th in prange(T * n_heads):
        t, h = th // n_heads, th % n_heads
        kv = h // group
        n = pos0 + t + 1                      # visible positions
        qv = np.empty(hd, np.float64)
        for d in range(hd):
            qv[d] = bd.round_f16(q[t, h, d])
        p = np.empty(n, np.float64)
        sc = np.empty(n, np.float32)
        mx = np.float32(-np.inf)
        for s in range(n):
            acc = 0.0
            for d in range(hd):
                acc += qv[d] * np.float64(k[s, kv, d])
            sc[s] = np.float32(acc) * np.float32(scale)
            mx = max(mx, sc[s])
        tot = 0.0
        for s in range(n):
            e = np.exp(np.float32(sc[s] - mx))
            sc[s] = e
            tot += np.float64(e)
        inv = np.float32(1.0 / tot)
        for s in range(n):
            p[s] = bd.round_f16(sc[s] * inv)
        o = np.zeros(hd, np.float64)
        for s in range(n):
            for d in range(hd):
                o[d] += p[s] * np.float64(v[s, kv, d])
        for d in range(hd):
            out[t, h, d] = o[d]


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
