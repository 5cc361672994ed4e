"""Quantized matmul kernels, reading the stored blocks directly (no dense copy of the weights).

Rows of W are independent, so every kernel runs `prange` over output rows. The generic kernels
(K-quants, f16, bf16, and every type's exact dequantization) decode a block with the
blockdecode helpers into a small float32 buffer (32 values, or 256 for a K-quant super-block)
that stays in L1, then multiply it into the activations. The 32-element types have their own
kernels further down, with the block scales decoded once per matrix and no dispatch per
element: they carry SmolLM2-style q4/q8_0 models.

Float sums are not reassociated (fastmath is off), so instead of one running sum per row the
ideal kernels keep 32 independent lane sums, lane j collecting every element j (mod 32): that
loop vectorizes without reassociation, and the 32 lanes are added in float64 at the end. The
integer block dots of ggml mode are int32 sums, which LLVM may vectorize freely (exact).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .. import blockdecode as bd

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
def dequantize_tile(out, raw, r0, kind):
    """out[i] = row r0 + i of W, for the rows of out (a tile for a BLAS matmul)."""
    cols = out.shape[1]
    G = group_size(kind)
    gb = raw.shape[1] * G // cols
    for i in prange(out.shape[0]):
        row = raw[r0 + i]
        buf = np.empty(G, np.float32)
        for g in range(cols // G):
            decode_group(kind, row[g * gb:(g + 1) * gb], buf)
            for j in range(G):
                out[i, g * G + j] = buf[j]


@njit(cache=True, parallel=True)
def matvec_f32(out, x, raw, kind):
    """ideal mode, one token: out float32[rows] = W @ x, x float32[cols]. Float dequantize then
    dot: 32 float32 lane sums per row (lane j takes elements j mod 32), added in float64."""
    rows = raw.shape[0]
    cols = x.shape[0]
    G = group_size(kind)
    gb = raw.shape[1] * G // cols
    for r in prange(rows):
        row = raw[r]
        buf = np.empty(G, np.float32)
        lanes = np.zeros(LANES, np.float32)
        for g in range(cols // G):
            decode_group(kind, row[g * gb:(g + 1) * gb], buf)
            base = g * G
            for c in range(G // LANES):
                for j in range(LANES):
                    lanes[j] += buf[c * LANES + j] * x[base + c * LANES + j]
        acc = 0.0
        for j in range(LANES):
            acc += lanes[j]
        out[r] = acc


@njit(cache=True, parallel=True)
def matvec_f32_dense(out, x, w):
    """ideal mode, f32 weights (w float32[rows, cols] is the file's own data): as matvec_f32."""
    rows, cols = w.shape
    for r in prange(rows):
        lanes = np.zeros(LANES, np.float32)
        for c in range(cols // LANES):
            for j in range(LANES):
                lanes[j] += w[r, c * LANES + j] * x[c * LANES + j]
        acc = 0.0
        for j in range(LANES):
            acc += lanes[j]
        out[r] = acc


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


# ---- fast paths for the 32-element types -------------------------------------------------------
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
def block_sums(x):  # float32[cols] -> float64[cols // 32]: the sum of x over each block
    nb = x.shape[0] // 32
    xs = np.empty(nb, np.float64)
    for b in range(nb):
        s = 0.0
        for j in range(32):
            s += x[b * 32 + j]
        xs[b] = s
    return xs


@njit(cache=True, parallel=True)
def matvec_nibbles(out, x, raw, d, m, ts, qs, qh, off):
    """ideal, one token, q4_0/q4_1/q5_0/q5_1: out float32[rows] = W @ x with
    sum_j (c_j d + m) x_j = sum_j (c_j d) x_j + m sum_j x_j: the c_j d products are the
    dequantized values of q4_0/q5_0 exactly, and the minimum term of q4_1/q5_1 is one float64
    multiply-add per block (a different rounding from dequantize-then-dot, within float32
    accuracy; see tests/test_numba_backend.py). 32 float32 lane sums per row.
    Bytes and activations are read through slices of one block: with them LLVM emits
    contiguous vector loads (indexing raw[r, o + j] keeps Numba's negative-index check per
    element and ends up as byte-by-byte inserts)."""
    rows, nb = d.shape
    xs = block_sums(x)
    for r in prange(rows):
        lanes = np.zeros(LANES, np.float32)
        macc = 0.0
        for b in range(nb):
            blk = raw[r, b * ts: (b + 1) * ts]
            nib = blk[qs: qs + 16]
            xb = x[b * 32: b * 32 + 32]
            h = qh_word(blk, qh) if qh >= 0 else np.int64(0)
            db = d[r, b]
            macc += m[r, b] * xs[b]
            for j in range(16):
                q = np.int64(nib[j])
                c0 = ((q & 15) | (((h >> j) & 1) << 4)) + off
                c1 = ((q >> 4) | (((h >> (j + 16)) & 1) << 4)) + off
                lanes[j] += (np.float32(c0) * db) * xb[j]
                lanes[j + 16] += (np.float32(c1) * db) * xb[j + 16]
        acc = macc
        for j in range(LANES):
            acc += lanes[j]
        out[r] = acc


@njit(cache=True, parallel=True)
def matvec_q4(out, x, raw, d, m, ts, qs, off):
    """ideal, one token, q4_0/q4_1: matvec_nibbles without the fifth bit (no 64-bit shifts).
    Each step computes two rows, r and r + half: two independent streams of weight bytes keep
    more loads in flight (about 20% faster when the weights come from DRAM); each row's sums
    are exactly those of a one-row loop."""
    rows, nb = d.shape
    xs = block_sums(x)
    half = (rows + 1) // 2
    for i in prange(half):
        r0 = np.int64(i)
        r1 = r0 + half if r0 + half < rows else r0   # odd rows: the last step does r0 twice
        l0 = np.zeros(LANES, np.float32)
        l1 = np.zeros(LANES, np.float32)
        m0 = 0.0
        m1 = 0.0
        for b in range(nb):
            n0 = raw[r0, b * ts + qs: b * ts + qs + 16]
            n1 = raw[r1, b * ts + qs: b * ts + qs + 16]
            xb = x[b * 32: b * 32 + 32]
            d0, d1 = d[r0, b], d[r1, b]
            m0 += m[r0, b] * xs[b]
            m1 += m[r1, b] * xs[b]
            for j in range(16):
                q0 = np.int32(n0[j])
                q1 = np.int32(n1[j])
                l0[j] += (np.float32((q0 & 15) + off) * d0) * xb[j]
                l0[j + 16] += (np.float32((q0 >> 4) + off) * d0) * xb[j + 16]
                l1[j] += (np.float32((q1 & 15) + off) * d1) * xb[j]
                l1[j + 16] += (np.float32((q1 >> 4) + off) * d1) * xb[j + 16]
        a0, a1 = m0, m1
        for j in range(LANES):
            a0 += l0[j]
            a1 += l1[j]
        out[r0] = a0
        out[r1] = a1


@njit(cache=True, parallel=True)
def matvec_q8_0(out, x2, blocks, d):
    """ideal, one token, q8_0: blocks int8[rows, nb, 34] (d@0, int8 qs@2) and x2 float32[nb, 32]
    are free reshaped views; with constant offsets into them the loop vectorizes without a
    per-block slice. Two rows per step, as matvec_q4."""
    rows, nb, _ = blocks.shape
    half = (rows + 1) // 2
    for i in prange(half):
        r0 = np.int64(i)
        r1 = r0 + half if r0 + half < rows else r0
        l0 = np.zeros(LANES, np.float32)
        l1 = np.zeros(LANES, np.float32)
        for b in range(nb):
            d0, d1 = d[r0, b], d[r1, b]
            for j in range(32):
                l0[j] += (np.float32(blocks[r0, b, 2 + j]) * d0) * x2[b, j]
                l1[j] += (np.float32(blocks[r1, b, 2 + j]) * d1) * x2[b, j]
        a0 = 0.0
        a1 = 0.0
        for j in range(LANES):
            a0 += l0[j]
            a1 += l1[j]
        out[r0] = a0
        out[r1] = a1


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
def tile_nibbles(out, raw, r0, d, m, ts, qs, qh, off):
    """Rows r0 .. r0 + len(out) of a q4_0/q4_1/q5_0/q5_1 W as float32 (a tile for BLAS),
    decoded as matvec_nibbles does (block slices, no per-element dispatch)."""
    nb = d.shape[1]
    for i in prange(out.shape[0]):
        for b in range(nb):
            blk = raw[r0 + i, b * ts: (b + 1) * ts]
            nib = blk[qs: qs + 16]
            o = out[i, b * 32: b * 32 + 32]
            h = qh_word(blk, qh) if qh >= 0 else np.int64(0)
            db, mb = d[r0 + i, b], m[r0 + i, b]
            for j in range(16):
                q = np.int64(nib[j])
                o[j] = np.float32(((q & 15) | (((h >> j) & 1) << 4)) + off) * db + mb
                o[j + 16] = np.float32(((q >> 4) | (((h >> (j + 16)) & 1) << 4)) + off) * db + mb


@njit(cache=True, parallel=True)
def tile_q8_0(out, blocks, r0, d):
    """Rows r0 .. r0 + len(out) of a q8_0 W (blocks int8[rows, nb, 34]) as float32."""
    nb = d.shape[1]
    for i in prange(out.shape[0]):
        for b in range(nb):
            db = d[r0 + i, b]
            for j in range(32):
                out[i, b * 32 + j] = np.float32(blocks[r0 + i, b, 2 + j]) * db


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
