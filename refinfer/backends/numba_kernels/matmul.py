"""Quantized matmul kernels of the numba backend.

ideal mode reads the weights repacked by ../repack.py: R rows side by side, codes and
float32 sub-block scales. One kernel per layout serves any number of tokens T (a decode step
and a 512-token prefill alike) and is batch-invariant: out[t, r] is, per sub-block of B
elements,

    s = sum_j q_j x[t, j]        FMAs in order of j, float32, from 0
    acc = fma(d, s, acc)          then acc = fma(m, xs[t], acc) when the type has a minimum m

over the sub-blocks in order (float weights: one FMA chain over the columns). That chain
depends on row t of x and the weights only: not on T, the other tokens, the thread count
(threads take whole groups of rows) or the CPU (every FMA is llvm.fma, simd.py). Per group
and sub-block the codes are decoded once to float32 in L1 and reused by every token; tokens
go through 8 at a time with their accumulators in registers (tile8), which is what makes a
prefill fast, and the rest one at a time (tile1), with the same operations per lane.

ggml mode reads the stored blocks directly: the exact int32 block dots of ggml's
vec_dot_*_q8_* against quantized activations (matmul_q8), or a float64 dot for the types whose
vec_dot is a float dot (matmul_f64); the generic kernels decode a block with the blockdecode
helpers into a small float32 buffer that stays in L1.

tile_nibbles / tile_int8 dequantize tiles of repacked rows to float32 with the reference's
roundings: the non-invariant BLAS prefill (NumbaBackend(batch_invariant=False)) multiplies them.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .jit import njit

from .. import blockdecode as bd
from .prefetch import prefetch
from .simd import vfma, vload, vsplat, vstore, vweights

LANES = 32


@njit(cache=True)
def group_size(kind):
    """Elements decoded at a time: a K-quant super-block, else 32 (one legacy block, or 32
    elements of a float type)."""
    return 256 if kind >= bd.Q2_K else 32


@njit(cache=True)
def decode_group(kind, blk, buf):
    """Values of the group whose bytes start at blk -> buf[:group_size(kind)]."""
    if kind >= bd.Q2_K:
        bd.decode_kquant(kind, blk, buf, 0)
    elif kind >= bd.Q4_0:
        bd.decode_legacy(kind, blk, buf, 0)
    elif kind == bd.F16:
        for j in range(32):
            buf[j] = bd.f16_value(blk, j)
    elif kind == bd.BF16:
        for j in range(32):
            buf[j] = bd.bf16_value(blk, j)
    else:
        for j in range(32):
            buf[j] = bd.f32_value(blk, j)


@njit(cache=True)
def dequantize_rows(out, raw, ids, kind):
    """out[i] = row ids[i] of W (ggml_get_rows): out float32[n, cols], raw uint8[rows, row_bytes]."""
    cols = out.shape[1]
    G = group_size(kind)
    gb = raw.shape[1] * G // cols  # bytes per group
    for i in range(len(ids)):
        row = raw[ids[i]]
        buf = np.empty(G, np.float32)
        for g in range(cols // G):
            decode_group(kind, row[g * gb:(g + 1) * gb], buf)
            for j in range(G):
                out[i, g * G + j] = buf[j]


@njit(cache=True, parallel=True)
def matmul_f64(out, x, raw, kind):
    """ggml mode for weights whose vec_dot is a float dot (f32/f16/bf16 after rounding x to
    the vec_dot type; K-quants against the dequantized q8_K activations): out float32[T, rows]
    = float32(sum in float64 of w * x). Each float32 * float32 product is exact in float64, so
    this equals the reference's float64 matmul up to float64 rounding."""
    rows = raw.shape[0]
    T, cols = x.shape
    G = group_size(kind)
    gb = raw.shape[1] * G // cols
    for r in prange(rows):
        row = raw[r]
        buf = np.empty(G, np.float32)
        lanes = np.zeros((T, LANES), np.float64)
        for g in range(cols // G):
            decode_group(kind, row[g * gb:(g + 1) * gb], buf)
            base = g * G
            for t in range(T):
                for c in range(G // LANES):
                    for j in range(LANES):
                        lanes[t, j] += np.float64(buf[c * LANES + j]) * np.float64(x[t, base + c * LANES + j])
        for t in range(T):
            acc = 0.0
            for j in range(LANES):
                acc += lanes[t, j]
            out[t, r] = acc


@njit(cache=True, parallel=True)
def block_dots(sumi, xq, raw, kind):
    """The exact integer block dots of ggml's vec_dot_*_q8_*: sumi int32[T, rows, nb] =
    sum_j q_w[j] * q_x[j] per 32-element block, xq int8[T, cols] the activation codes."""
    rows = raw.shape[0]
    T, cols = xq.shape
    ts = raw.shape[1] * 32 // cols
    for r in prange(rows):
        row = raw[r]
        codes = np.empty(32, np.int32)
        for b in range(cols // 32):
            blk = row[b * ts:(b + 1) * ts]
            for j in range(32):
                codes[j] = bd.legacy_code(kind, blk, j)
            for t in range(T):
                s = np.int32(0)
                for j in range(32):
                    s += codes[j] * np.int32(xq[t, b * 32 + j])
                sumi[t, r, b] = s


@njit(cache=True)
def quantize_act_q8(x, xq, xd, xs):
    """Activation rows x float32[T, cols] -> q8_0/q8_1 as the x86 quantize_row_q8_0/_q8_1:
    id = 127/amax, codes rint(x * id) (half to even), d = fp16(amax/127), s = fp16(d * sum(codes))
    with the unrounded float32 d. xq int8[T, cols], xd/xs float32[T, nb] (fp16-rounded values)."""
    T, cols = x.shape
    for t in range(T):
        for b in range(cols // 32):
            amax = np.float32(0)
            for j in range(32):
                a = abs(x[t, b * 32 + j])
                if a > amax:
                    amax = a
            d = amax / np.float32(127)
            idv = np.float32(127) / amax if amax != 0 else np.float32(0)
            total = np.float32(0)
            for j in range(32):
                c = np.rint(x[t, b * 32 + j] * idv)
                xq[t, b * 32 + j] = np.int8(c)
                total += np.float32(c)
            xd[t, b] = bd.round_f16(d)
            xs[t, b] = bd.round_f16(d * total)


# ---- ggml mode, 32-element types -------------------------------------------------------------
# w = c * d + m with c the integer code and d, m the block's fp16 scale and minimum, decoded once
# per matrix into float32[rows, nb] arrays (m = 0 for q4_0/q5_0/q8_0). A q4/q5 code is
#   c = (nibble | qh_bit << 4) + off
# with the nibble at qs[j] (low, element j) or qs[j - 16] (high, element j >= 16), qh_bit from
# the little-endian uint32 at qh (0 when the type has none), off = -8, 0, -16, 0 for q4_0,
# q4_1, q5_0, q5_1: one kernel with the layout as integer parameters and no branch per element.

@njit(cache=True)
def qh_word(row, o):
    return (np.int64(row[o]) | (np.int64(row[o + 1]) << 8) | (np.int64(row[o + 2]) << 16)
            | (np.int64(row[o + 3]) << 24))


@njit(cache=True)
def legacy_codes(blk, is_q8, qs, qh, off, codes):
    """Integer codes of the 32-element block blk (its bytes) -> codes int32[32]."""
    if is_q8:
        q8 = blk[2:34]
        for j in range(32):
            q = np.int32(q8[j])
            codes[j] = q - ((q >> 7) << 8)
    else:
        h = qh_word(blk, qh) if qh >= 0 else np.int64(0)
        nib = blk[qs: qs + 16]
        for j in range(16):
            q = np.int64(nib[j])
            codes[j] = ((q & 15) | (((h >> j) & 1) << 4)) + off
            codes[j + 16] = ((q >> 4) | (((h >> (j + 16)) & 1) << 4)) + off


@njit(cache=True, parallel=True)
def matmul_q8(out, xq, xd, xs, raw, d, m, has_m, is_q8, ts, qs, qh, off):
    """ggml mode for q4_0/q4_1/q5_0/q5_1/q8_0 weights against q8_0/q8_1 activations (xq int8
    codes [T, cols], xd/xs float32 [T, nb] their fp16-rounded d and s): per block the exact
    int32 sumi, then out = sum of fp32(d_w * d_x) * sumi (+ m_w * s_x), in float64, rounded
    once to float32 (ggml_vec_dot_*_q8_* up to the order of the float additions)."""
    rows, nb = d.shape
    T = xq.shape[0]
    for r in prange(rows):
        codes = np.empty(32, np.int32)
        acc = np.zeros(T, np.float64)
        for b in range(nb):
            legacy_codes(raw[r, b * ts: (b + 1) * ts], is_q8, qs, qh, off, codes)
            dw, mw = d[r, b], m[r, b]
            for t in range(T):
                xb = xq[t, b * 32: b * 32 + 32]
                s = np.int32(0)
                for j in range(32):
                    s += codes[j] * np.int32(xb[j])
                acc[t] += np.float64(dw * xd[t, b]) * np.float64(s)
                if has_m:
                    acc[t] += np.float64(mw) * np.float64(xs[t, b])
        for t in range(T):
            out[t, r] = acc[t]


# ---- ideal mode on repacked weights (see the module docstring and ../repack.py) -------------------
AHEAD = 2048              # bytes of codes prefetched ahead of the one being read (prefetch.py)
RT = 32                   # rows per register tile: two f32x16 vectors
ZERO = np.float32(0)


@njit(cache=True)
def prefetch_block(codes, g, b):
    """Prefetch the codes AHEAD bytes after sub-block (g, b), one cache line at a time; a flat
    view, so the next group's rows are covered too."""
    G, nb, J, R = codes.shape
    flat = codes.reshape(-1)
    step = 64 // codes.itemsize
    start = (g * nb + b) * J * R + AHEAD // codes.itemsize
    for k in range(start, min(start + J * R, flat.shape[0]), step):
        prefetch(flat, k)


@njit(cache=True)
def prefetch_scales(d, m, g, b):  # d, m of the sub-block two on (in the next group after the last)
    G, nb, R = d.shape
    g2, b2 = np.int64(g), np.int64(b) + 2
    if b2 >= nb:
        g2, b2 = g2 + 1, b2 - nb
    if g2 < G:
        for i in range(0, R, 16):
            prefetch(d[g2, b2], i)
            prefetch(m[g2, b2], i)


@njit(cache=True)
def block_sums(x, B):  # float32[T, cols] -> float32[T, cols // B]: sum of each row over each sub-block
    T, cols = x.shape
    xs = np.empty((T, cols // B), np.float32)
    for t in range(T):
        for b in range(cols // B):
            s = 0.0
            for j in range(B):
                s += x[t, b * B + j]
            xs[t, b] = s
    return xs


@njit(cache=True, inline="always")
def finish(acc, i0, s0, s1, d, m, xs, scaled, has_m):
    """acc[i0 : i0 + 32] of one token after a sub-block: acc = fma(d, s, acc), then fma(m, xs, .)
    (scaled), or acc = s (float weights: s already started from acc)."""
    if scaled:
        s0 = vfma(s0, vload(d, i0), vload(acc, i0))
        s1 = vfma(s1, vload(d, i0 + 16), vload(acc, i0 + 16))
        if has_m:
            s0 = vfma(vload(m, i0), vsplat(xs), s0)
            s1 = vfma(vload(m, i0 + 16), vsplat(xs), s1)
    vstore(acc, i0, s0)
    vstore(acc, i0 + 16, s1)


@njit(cache=True, inline="always")
def start(acc, i0, scaled):  # the running sums a sub-block starts from: 0 (scaled) or acc
    if scaled:
        return vsplat(ZERO), vsplat(ZERO)
    return vload(acc, i0), vload(acc, i0 + 16)


@njit(cache=True, inline="always")
def tile1(acc, w, passes, off, x, base, xs, d, m, t, i0, scaled, has_m):
    """One token t, rows i0 .. i0 + 31 of a group, one sub-block w [J, R] (float32 weights, or
    int8 codes, or uint8 bytes of two 4-bit codes: passes = 2, the low nibbles are elements
    0 .. J - 1, the high ones J .. 2J - 1): s[i] = fma(w_k[i], x[t, base + k], s[i]) for the
    sub-block's elements k in order, codes decoded exactly in registers, then finish. tile8
    does the same for 8 tokens at once."""
    a0, c0 = start(acc[t], i0, scaled)
    xt = x[t]
    k = base
    for p in range(passes):
        for j in range(w.shape[0]):
            wj = w[j]
            s = vsplat(xt[k])
            a0 = vfma(vweights(wj, i0, 4 * p, off), s, a0)
            c0 = vfma(vweights(wj, i0 + 16, 4 * p, off), s, c0)
            k += 1
    finish(acc[t], i0, a0, c0, d, m, xs[t], scaled, has_m)


@njit(cache=True, inline="always")
def tile8(acc, w, passes, off, x, base, xs, d, m, t, i0, scaled, has_m):
    """tile1 for tokens t .. t + 7: 16 accumulators in registers, each weight vector decoded
    once for 8 tokens. Every lane runs tile1's chain of operations, so each token gets the
    same bits as alone."""
    a0, c0 = start(acc[t], i0, scaled)
    a1, c1 = start(acc[t + 1], i0, scaled)
    a2, c2 = start(acc[t + 2], i0, scaled)
    a3, c3 = start(acc[t + 3], i0, scaled)
    a4, c4 = start(acc[t + 4], i0, scaled)
    a5, c5 = start(acc[t + 5], i0, scaled)
    a6, c6 = start(acc[t + 6], i0, scaled)
    a7, c7 = start(acc[t + 7], i0, scaled)
    x0, x1, x2, x3, x4, x5, x6, x7 = x[t], x[t + 1], x[t + 2], x[t + 3], x[t + 4], x[t + 5], x[t + 6], x[t + 7]
    k = base
    for p in range(passes):
        for j in range(w.shape[0]):
            wj = w[j]
            u, v = vweights(wj, i0, 4 * p, off), vweights(wj, i0 + 16, 4 * p, off)
            s = vsplat(x0[k])
            a0, c0 = vfma(u, s, a0), vfma(v, s, c0)
            s = vsplat(x1[k])
            a1, c1 = vfma(u, s, a1), vfma(v, s, c1)
            s = vsplat(x2[k])
            a2, c2 = vfma(u, s, a2), vfma(v, s, c2)
            s = vsplat(x3[k])
            a3, c3 = vfma(u, s, a3), vfma(v, s, c3)
            s = vsplat(x4[k])
            a4, c4 = vfma(u, s, a4), vfma(v, s, c4)
            s = vsplat(x5[k])
            a5, c5 = vfma(u, s, a5), vfma(v, s, c5)
            s = vsplat(x6[k])
            a6, c6 = vfma(u, s, a6), vfma(v, s, c6)
            s = vsplat(x7[k])
            a7, c7 = vfma(u, s, a7), vfma(v, s, c7)
            k += 1
    finish(acc[t], i0, a0, c0, d, m, xs[t], scaled, has_m)
    finish(acc[t + 1], i0, a1, c1, d, m, xs[t + 1], scaled, has_m)
    finish(acc[t + 2], i0, a2, c2, d, m, xs[t + 2], scaled, has_m)
    finish(acc[t + 3], i0, a3, c3, d, m, xs[t + 3], scaled, has_m)
    finish(acc[t + 4], i0, a4, c4, d, m, xs[t + 4], scaled, has_m)
    finish(acc[t + 5], i0, a5, c5, d, m, xs[t + 5], scaled, has_m)
    finish(acc[t + 6], i0, a6, c6, d, m, xs[t + 6], scaled, has_m)
    finish(acc[t + 7], i0, a7, c7, d, m, xs[t + 7], scaled, has_m)


@njit(cache=True, inline="always")
def decode_codes(wbuf, w, passes, off):  # wbuf float32[passes * J, R] = the weights of sub-block w [J, R]
    J, R = w.shape
    for p in range(passes):
        for j in range(J):
            for i0 in range(0, R, 16):
                vstore(wbuf[p * J + j], i0, vweights(w[j], i0, 4 * p, off))


@njit(cache=True, inline="always")
def store_rows(out, acc, g):
    """out[:, g * R + i] = acc[:, i] for the rows of group g that exist (the last is padded)."""
    R = acc.shape[1]
    for t in range(acc.shape[0]):
        for i in range(min(R, out.shape[1] - g * R)):
            out[t, g * R + i] = acc[t, i]


@njit(cache=True, parallel=True)
def matmul_repacked(out, x, xs, codes, passes, d, m, off, has_m, scaled):
    """out float32[T, rows] = x float32[T, cols] @ W.T over a repacked W (../repack.py), any T:
      codes  uint8[G, nb, B/2, R] (4-bit: byte j holds element j low, j + B/2 high, as q - off;
             passes = 2), int8[G, nb, B, R], or float32[G, cols/32, 32, R] (float weights, 32 columns a
             "sub-block", scaled=False: no d, the chain runs on through the columns);
      d, m   float32[G, nb, R]; xs float32[T, nb] the sub-block sums of x (block_sums).
    Per group g (threads take whole groups) and sub-block b, every token runs tile1's chain:
    with fewer than 8 tokens straight from the codes, decoded in registers (decode: no
    buffer to write and read back); with 8 or more from the sub-block decoded once to float32
    (wbuf, in L1), 8 tokens at a time (tile8) and the rest one at a time. The weights are the
    same exact values either way, so every path gives each token the same bits."""
    G, nb, J, R = codes.shape
    T = x.shape[0]
    for g in prange(G):
        acc = np.zeros((T, R), np.float32)
        wbuf = np.empty((J * passes, R), np.float32)
        for b in range(nb):
            prefetch_block(codes, g, b)
            if scaled:
                prefetch_scales(d, m, g, b)
            w, base, xsb, db, mb = codes[g, b], b * J * passes, xs[:, b], d[g, b], m[g, b]
            if T >= 8:                    # decode the sub-block once for all the tokens
                decode_codes(wbuf, w, passes, off)
            t = 0
            while t + 8 <= T:
                for i0 in range(0, R, RT):
                    tile8(acc, wbuf, 1, off, x, base, xsb, db, mb, t, i0, scaled, has_m)
                t += 8
            while t < T:
                for i0 in range(0, R, RT):
                    if T >= 8:
                        tile1(acc, wbuf, 1, off, x, base, xsb, db, mb, t, i0, scaled, has_m)
                    else:                 # a decode step: straight from the codes
                        tile1(acc, w, passes, off, x, base, xsb, db, mb, t, i0, scaled, has_m)
                t += 1
        store_rows(out, acc, g)


@njit(cache=True, parallel=True)
def tile_nibbles(out, g0, codes, d, m, off, has_m):
    """Rows g0 * R .. g0 * R + len(out) of a 4-bit repacked W as float32 (a tile for BLAS):
    w = d * q (+ m) with two roundings, as dequantize_row_* (no fastmath: no FMA here)."""
    _, nb, H, R = codes.shape
    B = 2 * H
    for r in prange(out.shape[0]):
        g, i = g0 + r // R, r % R
        for b in range(nb):
            db, mb = d[g, b, i], m[g, b, i]
            for j in range(H):
                v = np.int32(codes[g, b, j, i])
                lo = np.float32(np.int32(np.int32(v & 15) + off)) * db
                hi = np.float32(np.int32(np.int32(v >> 4) + off)) * db
                out[r, b * B + j] = lo + mb if has_m else lo
                out[r, b * B + H + j] = hi + mb if has_m else hi


@njit(cache=True, parallel=True)
def tile_int8(out, g0, codes, d, m, has_m):
    """As tile_nibbles for 8-bit codes int8[G, nb, B, R]."""
    _, nb, B, R = codes.shape
    for r in prange(out.shape[0]):
        g, i = g0 + r // R, r % R
        for b in range(nb):
            db, mb = d[g, b, i], m[g, b, i]
            for j in range(B):
                v = np.float32(codes[g, b, j, i]) * db
                out[r, b * B + j] = v + mb if has_m else v
