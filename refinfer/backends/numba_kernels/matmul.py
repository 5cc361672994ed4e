"""Quantized matmul kernels of the numba backend.

ideal mode reads the weights repacked by ../repack.py: R rows side by side, codes and
float32 sub-block scales. A decode step (one token) is, per row and sub-block of B elements,

    out[r] += d * (sum_j q_j x_j) + m * (sum_j x_j)

with the inner sum over j in order, in float32, and each product-add fused (fastmath
"contract" only: no reassociation). The vector loops run across the R rows of a group, the
direction in which rows are independent, so LLVM vectorizes them without reordering any sum;
the result does not depend on the SIMD width or the thread count. A prefill (several tokens)
dequantizes tiles of rows to float32 with the reference's roundings and multiplies them with
BLAS, as the reference does with the whole matrix.

ggml mode reads the stored blocks directly: the exact int32 block dots of ggml's
vec_dot_*_q8_* against quantized activations (matmul_q8), or a float64 dot for the types whose
vec_dot is a float dot (matmul_f64); the generic kernels decode a block with the blockdecode
helpers into a small float32 buffer that stays in L1.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .. import blockdecode as bd
from .prefetch import prefetch

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
CONTRACT = {"contract"}   # fused multiply-adds; sums keep their order
AHEAD = 2048              # bytes of codes prefetched ahead of the one being read (prefetch.py)


@njit(cache=True)
def prefetch_block(codes, d, m, g, b):
    """Prefetch the codes AHEAD bytes after sub-block (g, b) and the scales two sub-blocks on;
    flat views, so the next group's rows are covered too."""
    G, nb, J, R = codes.shape
    flat = codes.reshape(-1)
    start = (g * nb + b) * J * R + AHEAD
    for k in range(start, min(start + J * R, flat.shape[0]), 64):
        prefetch(flat, k)
    k = (g * nb + b + 2) * R
    if k < G * nb * R:
        df, mf = d.reshape(-1), m.reshape(-1)
        for i in range(k, k + R, 16):
            prefetch(df, i)
            prefetch(mf, i)


@njit(cache=True)
def block_sums(x, B):  # float32[cols] -> float32[cols // B]: sum of x over each sub-block
    nb = x.shape[0] // B
    xs = np.empty(nb, np.float32)
    for b in range(nb):
        s = 0.0
        for j in range(B):
            s += x[b * B + j]
        xs[b] = s
    return xs


@njit(cache=True, fastmath=CONTRACT, inline="always")
def add_block(acc, bacc, d, m, xs, has_m):
    """acc[i] += d[i] * bacc[i] (+ m[i] * xs): one sub-block's terms of R rows; bacc[i] is
    sum_j q_j x_j of row i, xs sum_j x_j."""
    if has_m:
        for i in range(acc.shape[0]):
            acc[i] += bacc[i] * d[i] + m[i] * xs
    else:
        for i in range(acc.shape[0]):
            acc[i] += bacc[i] * d[i]


@njit(cache=True, inline="always")
def store_group(out, acc, g):
    """out[g * R + i] = acc[i] for the rows of group g that exist (the last group is padded)."""
    R = acc.shape[0]
    for i in range(min(R, out.shape[0] - g * R)):
        out[g * R + i] = acc[i]


@njit(cache=True, parallel=True, fastmath=CONTRACT)
def matvec_nibbles(out, x, codes, d, m, off, has_m):
    """out float32[rows] = W @ x for 4-bit codes: codes uint8[G, nb, H, R] (byte j of a
    sub-block: element j low, j + H high, each q - off), d, m float32[G, nb, R], x float32[cols]."""
    G, nb, H, R = codes.shape
    B = 2 * H
    o = np.int32(off)
    xs = block_sums(x, B)
    for g in prange(G):
        acc = np.zeros(R, np.float32)
        bacc = np.empty(R, np.float32)
        for b in range(nb):
            prefetch_block(codes, d, m, g, b)
            for i in range(R):
                bacc[i] = 0
            for j in range(H):
                xl, xh = x[b * B + j], x[b * B + H + j]
                c = codes[g, b, j]
                for i in range(R):
                    v = np.int32(c[i])
                    lo = np.int32(np.int32(v & 15) + o)   # np.int32 around each step: int32
                    hi = np.int32(np.int32(v >> 4) + o)   # vectors (Numba widens to int64)
                    bacc[i] += np.float32(lo) * xl + np.float32(hi) * xh
            add_block(acc, bacc, d[g, b], m[g, b], xs[b], has_m)
        store_group(out, acc, g)


@njit(cache=True, parallel=True, fastmath=CONTRACT)
def matvec_int8(out, x, codes, d, m, has_m):
    """out float32[rows] = W @ x for 8-bit codes: codes int8[G, nb, B, R], d, m float32[G, nb, R]."""
    G, nb, B, R = codes.shape
    xs = block_sums(x, B)
    for g in prange(G):
        acc = np.zeros(R, np.float32)
        bacc = np.empty(R, np.float32)
        for b in range(nb):
            prefetch_block(codes, d, m, g, b)
            for i in range(R):
                bacc[i] = 0
            for j in range(B):
                xj = x[b * B + j]
                c = codes[g, b, j]
                for i in range(R):
                    bacc[i] += np.float32(c[i]) * xj
            add_block(acc, bacc, d[g, b], m[g, b], xs[b], has_m)
        store_group(out, acc, g)


@njit(cache=True, parallel=True, fastmath=CONTRACT)
def matvec_float(out, x, w):
    """out float32[rows] = W @ x for float weights w float32[G, cols, R]: one sum per row, in
    column order."""
    G, cols, R = w.shape
    flat = w.reshape(-1)
    for g in prange(G):
        acc = np.zeros(R, np.float32)
        for c in range(cols):
            k = (g * cols + c) * R + AHEAD // 4
            if k < flat.shape[0]:
                for i in range(k, k + R, 16):
                    prefetch(flat, i)
            xc = x[c]
            wc = w[g, c]
            for i in range(R):
                acc[i] += wc[i] * xc
        store_group(out, acc, g)


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
