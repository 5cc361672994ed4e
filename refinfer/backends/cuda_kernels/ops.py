"""The per-token ops of the cuda backend: the arithmetic of the numba backend's ops
(numba_kernels/ops.py), one CUDA thread per output element or one thread block per row; the
`ggml` flags select llama.cpp's roundings, as there. Attention is three kernels: scores (K.Q),
a row softmax, and the probability-weighted sum of V, over a KV cache in GPU memory.

Reductions over a row (rmsnorm, softmax) use block_sum / block_max: float64 partial sums per
thread, added in thread order.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .device import SCRATCH, bd, block_max, block_sum


@cuda.jit
def rmsnorm(out, x, weight, eps, ggml):
    """out[T, dim] = x / sqrt(mean(x^2) + eps) * weight; one thread block per token. ideal:
    mean of squares in float64, the quotient rounded once; ggml
    (ggml_compute_forward_rms_norm_f32): squares rounded to float, summed in double,
    scale = 1/sqrtf(mean + eps) in float."""
    t = cuda.blockIdx.x
    tid, nt = cuda.threadIdx.x, cuda.blockDim.x
    n = x.shape[1]
    scratch = cuda.shared.array(SCRATCH, np.float64)
    s = 0.0
    for i in range(tid, n, nt):
        if ggml:
            s += np.float64(x[t, i] * x[t, i])
        else:
            s += np.float64(x[t, i]) * np.float64(x[t, i])
    s = block_sum(scratch, s)
    if ggml:
        mean = np.float32(s / n)
        scale = np.float32(1) / np.float32(math.sqrt(mean + np.float32(eps)))
        for i in range(tid, n, nt):
            out[t, i] = (x[t, i] * scale) * weight[i]
    else:
        r = math.sqrt(s / n + eps)
        for i in range(tid, n, nt):
            out[t, i] = np.float32(np.float64(x[t, i]) / r) * weight[i]


@cuda.jit
def rope(x, cos, sin, neox):
    """Rotate x[T, heads, head_dim] in place by cos/sin[T, rope_dim/2]; pairs (2i, 2i+1), or
    (i, i + rope_dim/2) when neox. One thread per (token, head, pair), float32."""
    T, H, _ = x.shape
    half = cos.shape[1]
    k = cuda.grid(1)
    if k >= T * H * half:
        return
    t, h, i = k // (H * half), (k // half) % H, k % half
    a = i if neox else 2 * i
    b = i + half if neox else 2 * i + 1
    x0, x1 = x[t, h, a], x[t, h, b]
    c, s = cos[t, i], sin[t, i]
    x[t, h, a] = x0 * c - x1 * s
    x[t, h, b] = x0 * s + x1 * c


@cuda.jit
def store_kv(cache, pos0, x, ggml):
    """cache[pos0 + t] = x[t] (x float32[T, n_kv, hd]); ggml: rounded to binary16, the value
    llama.cpp's F16 KV cache gives back. One thread per element."""
    T, H, D = x.shape
    k = cuda.grid(1)
    if k >= T * H * D:
        return
    t, h, d = k // (H * D), (k // D) % H, k % D
    cache[pos0 + t, h, d] = bd.round_f16(x[t, h, d]) if ggml else x[t, h, d]


@cuda.jit
def attention_scores(scores, q, k, pos0, scale, ggml):
    """scores float64[n_heads, T, S][h, t, s] = (q[t, h] . k[s, h // group]) * scale for the
    visible positions s <= pos0 + t, -inf for the future ones (causal mask). ideal: float64;
    ggml: Q rounded to F16, the dot rounded to float, then scaled in float (kq then
    soft_max_ext's scale). One thread per score."""
    n_heads, T, S = scores.shape
    hd = q.shape[2]
    group = n_heads // k.shape[1]
    idx = cuda.grid(1)
    if idx >= n_heads * T * S:
        return
    h, t, s = idx // (T * S), (idx // S) % T, idx % S
    if s > pos0 + t:
        scores[h, t, s] = -math.inf
        return
    kv = h // group
    acc = 0.0
    for d in range(hd):
        qd = bd.round_f16(q[t, h, d]) if ggml else q[t, h, d]
        acc += np.float64(qd) * np.float64(k[s, kv, d])
    if ggml:
        scores[h, t, s] = np.float32(acc) * np.float32(scale)
    else:
        scores[h, t, s] = acc * scale


@cuda.jit
def softmax(p, pos0, ggml):
    """Row softmax in place over the visible positions of p float64[n_heads, T, S]; one thread
    block per (head, token). ideal: float64. ggml (ggml_vec_soft_max_f32 on float scores):
    exp in float, sum in double, probabilities scaled by a float 1/sum and rounded to F16
    (the F16 V matmul's operand)."""
    n_heads, T, _ = p.shape
    h, t = cuda.blockIdx.x // T, cuda.blockIdx.x % T
    tid, nt = cuda.threadIdx.x, cuda.blockDim.x
    n = pos0 + t + 1
    scratch = cuda.shared.array(SCRATCH, np.float64)
    mx = -math.inf
    for s in range(tid, n, nt):
        mx = max(mx, p[h, t, s])
    mx = block_max(scratch, mx)
    tot = 0.0
    for s in range(tid, n, nt):
        if ggml:
            e = np.float32(math.exp(np.float32(np.float32(p[h, t, s]) - np.float32(mx))))
        else:
            e = math.exp(p[h, t, s] - mx)
        p[h, t, s] = e
        tot += e
    tot = block_sum(scratch, tot)
    inv = np.float32(1.0 / tot)
    for s in range(tid, n, nt):
        if ggml:
            p[h, t, s] = bd.round_f16(np.float32(p[h, t, s]) * inv)
        else:
            p[h, t, s] = p[h, t, s] / tot


@cuda.jit
def attention_values(out, p, v, pos0):
    """out float32[T, n_heads, hd][t, h, d] = sum over visible s of p[h, t, s] * v[s, h // group, d],
    in float64, rounded once. One thread per output element."""
    T, n_heads, hd = out.shape
    group = n_heads // v.shape[1]
    k = cuda.grid(1)
    if k >= T * n_heads * hd:
        return
    t, h, d = k // (n_heads * hd), (k // hd) % n_heads, k % hd
    kv = h // group
    o = 0.0
    for s in range(pos0 + t + 1):
        o += p[h, t, s] * np.float64(v[s, kv, d])
    out[t, h, d] = o


@cuda.jit
def swiglu(out, gate, up, ggml):
    """out = silu(gate) * up, silu(g) = g / (1 + exp(-g)): in float64 then rounded (ideal), or
    in float (ggml). One thread per element."""
    T, n = gate.shape
    k = cuda.grid(1)
    if k >= T * n:
        return
    t, i = k // n, k % n
    g = gate[t, i]
    if ggml:
        s = g / (np.float32(1) + np.float32(math.exp(-g)))
    else:
        g64 = np.float64(g)
        s = np.float32(g64 / (1.0 + math.exp(-g64)))
    out[t, i] = s * up[t, i]
