"""Weight kernels. The weights stay in GPU memory as their stored blocks, uint8[rows, row_bytes]
(no dense copy of a matrix exists on the device); every kernel decodes them on the fly with the
blockdecode helpers shared with the CPU kernels (device.py).

A matmul launch is grid (rows, ceil(T / tile)) x `threads`: thread block (r, y) computes output
row r for the tokens y*tile .. y*tile + tile - 1. The row's groups (a 32-element block, a
256-element K-quant super-block, or 32 elements of a float type) are dealt to LANES lanes,
group g to lane g % LANES, and each thread runs whole lanes: it decodes each of its groups once
into its own buffer and multiplies it into `tile` accumulators, one per token. The lanes'
partial sums are then added in lane order (device.lanes_total).

Batch invariance: every output element out[t, r] is the same float operations in the same
order, whatever T, the tile, the token's place in the tile or the number of threads:
    for each lane l:   acc_l = sum over g = l, l + LANES, ... of (sum over j of w[r, gG + j] * x[t, gG + j])
    out[t, r] = float32(sum over l of acc_l)
One kernel serves a decode (T = 1: one token of a tile) and a prompt (T tokens: each decoded
group serves `tile` of them); no split depends on T.

Kernels are built per block type (and tile), so `kind` is a compile-time constant and each
compiled kernel contains only its own type's decoder.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import cuda

from .device import LANES, bd, decode_group, group_size, lanes_total


@functools.cache
def dequantize_rows(kind):
    G = group_size(kind)

    @cuda.jit
    def kernel(out, raw, ids):
        """out[i] = row ids[i] of W (ggml_get_rows): out float32[n, cols], raw uint8[rows,
        row_bytes], ids int64[n]. One thread per (output row, group)."""
        n, cols = out.shape
        groups = cols // G
        gb = raw.shape[1] // groups                 # bytes per group
        k = cuda.grid(1)
        if k >= n * groups:
            return
        i, g = k // groups, k % groups
        buf = cuda.local.array(G, np.float32)
        decode_group(kind, raw[ids[i], g * gb:(g + 1) * gb], buf)
        for j in range(G):
            out[i, g * G + j] = buf[j]

    return kernel


@functools.cache
def matmul_float(kind, tile):
    G = group_size(kind)
    n_part = LANES * tile

    @cuda.jit
    def kernel(out, x, raw):
        """out float32[T, rows] = x float32[T, cols] @ W.T with W decoded to its float32 values
        (as dequantize_row_*). Every product w * x is exact in float64 and the sums are
        float64, rounded once: the ideal mode, and ggml's float vec_dots (f16/bf16/f32 and
        K-quants against dequantized q8_K activations) up to the order of the sum."""
        T, cols = x.shape
        groups = cols // G
        gb = raw.shape[1] // groups
        r, t0 = cuda.blockIdx.x, cuda.blockIdx.y * tile
        tid, nt = cuda.threadIdx.x, cuda.blockDim.x
        nt_tok = min(tile, T - t0)                  # tokens of this tile (the last may be short)
        buf = cuda.local.array(G, np.float32)
        acc = cuda.local.array(tile, np.float64)
        part = cuda.shared.array(n_part, np.float64)    # [LANES, tile]
        for lane in range(tid, LANES, nt):
            for i in range(tile):
                acc[i] = 0.0
            for g in range(lane, groups, LANES):
                decode_group(kind, raw[r, g * gb:(g + 1) * gb], buf)
                for i in range(nt_tok):
                    s = 0.0
                    for j in range(G):
                        s += np.float64(buf[j]) * np.float64(x[t0 + i, g * G + j])
                    acc[i] += s
            for i in range(tile):
                part[lane * tile + i] = acc[i]
        cuda.syncthreads()
        for i in range(tid, nt_tok, nt):
            out[t0 + i, r] = lanes_total(part, i, tile)

    return kernel


@cuda.jit
def quantize_act_q8(x, xq, xd, xs):
    """Activation rows x float32[T, cols] -> q8_0/q8_1 as the x86 quantize_row_q8_0/_q8_1:
    id = 127/amax, codes rint(x * id) (half to even), d = fp16(amax/127), s = fp16(d * sum(codes))
    with the unrounded float32 d. xq int8[T, cols], xd/xs float32[T, nb] (fp16-rounded values).
    One thread per (token, block)."""
    T, cols = x.shape
    nb = cols // 32
    k = cuda.grid(1)
    if k >= T * nb:
        return
    t, b = k // nb, k % nb
    amax = np.float32(0)
    for j in range(32):
        a = abs(x[t, b * 32 + j])
        if a > amax:
            amax = a
    d = amax / np.float32(127)
    idv = np.float32(127) / amax if amax != 0 else np.float32(0)
    total = np.float32(0)
    for j in range(32):
        c = round(x[t, b * 32 + j] * idv)           # half to even, an integer in -127..127
        xq[t, b * 32 + j] = c
        total += np.float32(c)
    xd[t, b] = bd.round_f16(d)
    xs[t, b] = bd.round_f16(d * total)


@functools.cache
def matmul_q8(kind, tile):
    has_m = kind == bd.Q4_1 or kind == bd.Q5_1
    n_part = LANES * tile

    @cuda.jit
    def kernel(out, xq, xd, xs, raw):
        """ggml mode, q4_0/q4_1/q5_0/q5_1/q8_0 weights against q8_0/q8_1 activations (xq int8
        codes [T, cols], xd/xs float32[T, nb]) as ggml_vec_dot_*_q8_*: per block the exact
        int32 dot of the codes, then out = sum of fp32(d_w * d_x) * sumi (+ m_w * s_x), summed
        in float64 in the lanes' order and rounded once to float32 (ggml's products, another
        order of the sum)."""
        T, cols = xq.shape
        nb = cols // 32
        ts = raw.shape[1] // nb                     # bytes per block
        r, t0 = cuda.blockIdx.x, cuda.blockIdx.y * tile
        tid, nt = cuda.threadIdx.x, cuda.blockDim.x
        nt_tok = min(tile, T - t0)
        codes = cuda.local.array(32, np.int32)
        acc = cuda.local.array(tile, np.float64)
        part = cuda.shared.array(n_part, np.float64)    # [LANES, tile]
        for lane in range(tid, LANES, nt):
            for i in range(tile):
                acc[i] = 0.0
            for b in range(lane, nb, LANES):
                blk = raw[r, b * ts:(b + 1) * ts]
                dw = bd.f16_at(blk, 0)
                mw = bd.f16_at(blk, 2) if has_m else np.float32(0)
                for j in range(32):
                    codes[j] = bd.legacy_code(kind, blk, j)
                for i in range(nt_tok):
                    t = t0 + i
                    s = np.int32(0)
                    for j in range(32):
                        s += codes[j] * np.int32(xq[t, b * 32 + j])
                    acc[i] += np.float64(dw * xd[t, b]) * np.float64(s)
                    if has_m:
                        acc[i] += np.float64(mw) * np.float64(xs[t, b])
            for i in range(tile):
                part[lane * tile + i] = acc[i]
        cuda.syncthreads()
        for i in range(tid, nt_tok, nt):
            out[t0 + i, r] = lanes_total(part, i, tile)

    return kernel


@cuda.jit
def matmul_table(out, x, codes, table, g_idx):
    """Integer-group weights (refinfer/quant/intgroup.py): out float32[T, N] = x float32[T, K] @ W.T
    with W[n, k] = table[n, g_idx[k], codes[n, k]]. One thread per (token, row) sums in float64
    in column order, from 0: the NumPy reference's column_order_matmul operation for operation
    (a float32 product is exact in float64, so a fused multiply-add changes nothing), so the
    result is the reference's bits whatever T or the launch shape."""
    T, N = out.shape
    i = cuda.grid(1)
    if i >= T * N:
        return
    t, n = i // N, i % N
    acc = 0.0
    for k in range(x.shape[1]):
        acc += np.float64(x[t, k]) * np.float64(table[n, g_idx[k], codes[n, k]])
    out[t, n] = np.float32(acc)


@cuda.jit
def dequantize_rows_table(out, ids, codes, table, g_idx):
    """out float32[n, K] = rows ids of an integer-group matrix; one thread per element."""
    n, K = out.shape
    i = cuda.grid(1)
    if i >= n * K:
        return
    r, k = i // K, i % K
    out[r, k] = table[ids[r], g_idx[k], codes[ids[r], k]]
