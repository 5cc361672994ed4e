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


@njit(cache=True, parallel=True)
def attention(out, q, k, v, pos0, ggml):
    """Causal GQA attention over the cache: q[T, n_heads, hd], k/v[S, n_kv, hd] -> out[T,
    n_heads, hd]. ideal: scores, softmax and the V sum in float64. ggml: Q rounded to F16,
    K.Q in float32, scaled, exp in float32, sum in double, probabilities rounded to F16 (the
    F16 V matmul), V sum rounded once to float32."""
    T, n_heads, hd = q.shape
    group = n_heads // k.shape[1]
    scale = 1.0 / math.sqrt(hd)
    for th in prange(T * n_heads):
        t, h = th // n_heads, th % n_heads
        kv = h // group
        n = pos0 + t + 1                      # visible positions
        qv = np.empty(hd, np.float64)
        for d in range(hd):
            qv[d] = bd.round_f16(q[t, h, d]) if ggml else q[t, h, d]
        p = np.empty(n, np.float64)
        if ggml:
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
        else:
            mx = -np.inf
            for s in range(n):
                acc = 0.0
                for d in range(hd):
                    acc += qv[d] * np.float64(k[s, kv, d])
                p[s] = acc * scale
                mx = max(mx, p[s])
            tot = 0.0
            for s in range(n):
                p[s] = math.exp(p[s] - mx)
                tot += p[s]
            for s in range(n):
                p[s] /= tot
        o = np.zeros(hd, np.float64)
        for s in range(n):
            for d in range(hd):
                o[d] += p[s] * np.float64(v[s, kv, d])
        for d in range(hd):
            out[t, h, d] = o[d]


@njit(cache=True)
def swiglu(out, gate, up, ggml):
    """out = silu(gate) * up, silu(g) = g / (1 + exp(-g)): in float64 then rounded (ideal),
    or in float32 (ggml)."""
    T, n = gate.shape
    for t in range(T):
        for i in range(n):
            g = gate[t, i]
            if ggml:
                s = g / (np.float32(1) + np.exp(-g))
            else:
                g64 = np.float64(g)
                s = np.float32(g64 / (1.0 + math.exp(-g64)))
            out[t, i] = s * up[t, i]
