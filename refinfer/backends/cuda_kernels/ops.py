"""The per-token ops of the cuda backend: the arithmetic of the numba backend's ops
(numba_kernels/ops.py), one CUDA thread per output element or one thread block per row; the
`ggml` flags select llama.cpp's roundings, as there. The KV-cache ops (store_kv, attention)
are in kv.py.

Every output element depends on its own token's row only: rope and swiglu are elementwise, and
rmsnorm's sum of squares has the fixed lane order of device.LANES, whatever the thread count.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .device import LANES, lanes_total


@cuda.jit
def rmsnorm(out, x, weight, eps, ggml):
    """out[T, dim] = x / sqrt(mean(x^2) + eps) * weight; one thread block per token. ideal:
    mean of squares in float64, the quotient rounded once; ggml
    (ggml_compute_forward_rms_norm_f32): squares rounded to float, summed in double,
    scale = 1/sqrtf(mean + eps) in float."""
    t = cuda.blockIdx.x
    tid, nt = cuda.threadIdx.x, cuda.blockDim.x
    n = x.shape[1]
    part = cuda.shared.array(LANES, np.float64)
    for lane in range(tid, LANES, nt):
        s = 0.0
        for i in range(lane, n, LANES):
            if ggml:
                s += np.float64(x[t, i] * x[t, i])
            else:
                s += np.float64(x[t, i]) * np.float64(x[t, i])
        part[lane] = s
    cuda.syncthreads()
    s = lanes_total(part, 0, 1)
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
