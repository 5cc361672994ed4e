"""q4_K: 256 weights -> a super-block of 8 sub-blocks of 32, each with a 6-bit scale and a
6-bit min, and 256 unsigned 4-bit codes (144 bytes, 4.5 bits/weight).

    byte 0..1     d           fp16 super-block scale of the sub-block scales
    byte 2..3     dmin        fp16 super-block scale of the sub-block mins
    byte 4..15    scales[12]  8 six-bit scales sc[j] and 8 six-bit mins m[j], packed as
                                j < 4:  sc[j] = scales[j] & 63,  m[j] = scales[j+4] & 63
                                j >= 4: sc[j] = (scales[j+4] & 15) | (scales[j-4] >> 6) << 4
                                        m[j]  = (scales[j+4] >> 4) | (scales[j]   >> 6) << 4
    byte 16..143  qs[128]     element 64g + l (l < 32) is the LOW nibble of qs[32g + l],
                              element 64g + 32 + l the HIGH nibble (g = 0..3)

    sub-block j = element // 32:  w = (d * sc[j]) * q - (dmin * m[j]),  q in 0..15

in float32, in that order (ggml `dequantize_row_q4_K`: d1 = d*sc, m1 = min*m, y = d1*q - m1).
The products are exact (an 11-bit fp16 significand times 6-bit and 4-bit integers fits in
float32), so the subtraction is the only rounding; inf/NaN in d or dmin propagate as in C.

Quantize (ggml `quantize_row_q4_K_ref`, what `ggml_quantize_chunk` runs without an imatrix):
per sub-block, weights w_i = sqrt(mean(x^2)) + |x_i| and make_qkx2_quants(nmax=15,
rmin=-1, rdelta=0.1, nstep=20) searches 21 candidate scales for the weighted least-squares
(scale, min); the 8 scales and mins are then quantized to 6 bits against their maxima
(d = max_scale/63, dmin = max_min/63) and the codes recomputed from the stored fp16 values:
q = clamp(nearest_int((x + dmin*m) / (d*sc)), 0, 15).
"""

import numpy as np

from ._common import (F32, BlockType, as_blocks, blocks_to_bytes, f32_to_fp16_bits, fp16_to_f32,
                      map_chunks, nearest_int_c, new_blocks)
from ._weighted import (importance_weights, make_qp_quants, map_chunks_weighted, sequential_sum,
                        sum_squares)

QK_K = 256
K_SCALE_SIZE = 12
block_q4_K = np.dtype([("d", "<u2"), ("dmin", "<u2"), ("scales", "u1", (K_SCALE_SIZE,)),
                       ("qs", "u1", (QK_K // 2,))])
assert block_q4_K.itemsize == 2 + 2 + 12 + 128


def get_scale_min_k4(scales):  # uint8[n, 12] -> (sc uint8[n, 8], m uint8[n, 8])
    """The 6-bit sub-block scales and mins of q4_K/q5_K (ggml `get_scale_min_k4`)."""
    q = scales.astype(np.uint8)
    sc = np.concatenate([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def pack_scale_min_k4(ls, lm):  # ls, lm uint8[n, 8] (0..63) -> uint8[n, 12]
    """Inverse of get_scale_min_k4: the low 6 bits of sub-blocks 0..3 in bytes 0..7, the low 4
    bits of sub-blocks 4..7 in bytes 8..11, their top 2 bits in the top bits of bytes 0..7."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    out = np.empty((len(ls), K_SCALE_SIZE), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep, use_mad):
    """ggml `make_qkx2_quants` for many sub-blocks at once: x, weights float32[m, n] ->
    (scale float32[m], the_min float32[m] (>= 0, subtracted), L uint8[m, n]).

    For each of nstep+1 candidate inverse scales (rmin + rdelta*is + nmax)/(max - min) it
    rounds the codes, solves the 2x2 weighted least-squares system for (scale, min) (min
    clamped to <= 0) and keeps the candidate with the smallest weighted error (|err| if
    use_mad, else err^2). Every sum runs over the elements in C's order, one float32
    operation at a time, so the result is bit-identical; rows are independent sub-blocks.
    """
    m, n = x.shape
    with np.errstate(all="ignore"):
        mn, mx = x[:, 0].copy(), x[:, 0].copy()
        sum_w = weights[:, 0].copy()
        sum_x = sum_w * x[:, 0]
        for i in range(1, n):
            xi, wi = x[:, i], weights[:, i]
            mn = np.where(xi < mn, xi, mn)
            mx = np.where(xi > mx, xi, mx)
            sum_w = sum_w + wi
            sum_x = sum_x + wi * xi
        mn = np.where(mn > 0, F32(0), mn)
        flat, flat_min = mx == mn, mn  # C returns scale 0, all codes 0, the_min = -min here

        def codes(iscale):  # float32[m] -> float32[m, n]: clamp(nearest_int(iscale*(x - min)))
            # kept as float32 (exact small integers) because they enter float32 sums
            return np.clip(nearest_int_c(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(np.float32)

        def error(scale, min_, Lc):  # sum_i w_i * |scale*L_i + min - x_i|^p, sequential
            err = np.zeros(m, dtype=np.float32)
            for i in range(n):
                diff = scale * Lc[:, i] + min_ - x[:, i]
                diff = np.abs(diff) if use_mad else diff * diff
                err = err + weights[:, i] * diff
            return err

        iscale = F32(nmax) / (mx - mn)
        scale = F32(1) / iscale
        L = codes(iscale)
        best_error = error(scale, mn, L)
        for is_ in range(nstep + 1):
            # min is the best candidate's so far, in both the range and the offset (as in C)
            iscale = (F32(rmin) + F32(rdelta) * F32(is_) + F32(nmax)) / (mx - mn)
            Laux = codes(iscale)
            sum_l = np.zeros(m, dtype=np.float32)
            sum_l2 = np.zeros(m, dtype=np.float32)
            sum_xl = np.zeros(m, dtype=np.float32)
            for i in range(n):
                wl = weights[:, i] * Laux[:, i]
                sum_l = sum_l + wl
                sum_l2 = sum_l2 + wl * Laux[:, i]
                sum_xl = sum_xl + wl * x[:, i]
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            clamp = this_min > 0  # the format can only subtract a min: refit the scale alone
            this_min = np.where(clamp, F32(0), this_min)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
            cur_error = error(this_scale, this_min, Laux)
            better = (D > 0) & (cur_error < best_error)
            L = np.where(better[:, None], Laux, L)
            best_error = np.where(better, cur_error, best_error)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
        scale = np.where(flat, F32(0), scale)
        mn = np.where(flat, flat_min, mn)
        L = np.where(flat[:, None], F32(0), L)
    return scale, -mn, L.astype(np.uint8)


def positive_max(v):  # float32[n, k] -> float32[n]
    """`max = 0; for each v: if (v > max) max = v;`: the largest positive value, else +0."""
    return np.max(np.where(v > 0, v, F32(0)), axis=-1)


def quantize_scales_mins(scales, mins):  # float32[n, 8] x 2 -> (d16, dmin16 uint16[n], packed uint8[n, 12])
    """The 6-bit scale/min step shared by quantize_row_q4_K_ref and quantize_row_q5_K_ref."""
    max_scale, max_min = positive_max(scales), positive_max(mins)
    with np.errstate(all="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
        # C stores nearest_int into a uint8_t (keeping the low byte) before MIN(63, .)
        ls = np.minimum(63, nearest_int_c(inv_scale[:, None] * scales) & 0xFF)
        lm = np.minimum(63, nearest_int_c(inv_min[:, None] * mins) & 0xFF)
        d16 = f32_to_fp16_bits(max_scale / F32(63))
        dmin16 = f32_to_fp16_bits(max_min / F32(63))
    return d16, dmin16, pack_scale_min_k4(ls, lm)


def requantize(x, L, d16, dmin16, packed, nmax):  # x float32[n, 256], L uint8[n*8, 32] -> uint8[n, 256]
    """Second pass of quantize_row_q4_K_ref/q5_K_ref: codes against the stored fp16 d, dmin and
    6-bit sc, m; a sub-block whose d*sc is 0 keeps the codes of the search."""
    n = len(x)
    sc, m = get_scale_min_k4(packed)
    with np.errstate(all="ignore"):
        d = fp16_to_f32(d16)[:, None] * sc.astype(np.float32)  # [n, 8]
        dm = fp16_to_f32(dmin16)[:, None] * m.astype(np.float32)
        xs = x.reshape(n, 8, 32)
        q = np.clip(nearest_int_c((xs + dm[:, :, None]) / d[:, :, None]), 0, nmax)
    return np.where((d != 0)[:, :, None], q, L.reshape(n, 8, 32)).reshape(n, QK_K).astype(np.uint8)


def sub_block_weights(xs):  # float32[m, 32] -> float32[m, 32]
    """weights = sqrt(sum(x^2)/32) + |x|, the sum taken sequentially as in C."""
    sum_x2 = np.zeros(len(xs), dtype=np.float32)
    with np.errstate(over="ignore"):
        for i in range(xs.shape[1]):
            sum_x2 = sum_x2 + xs[:, i] * xs[:, i]
    av_x = np.sqrt(sum_x2 / F32(32))
    return av_x[:, None] + np.abs(xs)


def codes(raw):  # uint8[n, 144] -> (q uint8[n, 8, 32], d1 float32[n, 8], -m1 float32[n, 8])
    """Sub-block codes and scales: w = d1 * q - m1 (dequantize_row_q4_K), returned as
    w = d * q + m with m = -m1 (x - y and x + (-y) are the same float)."""
    b = as_blocks(raw, block_q4_K)
    n = len(b)
    d = fp16_to_f32(b["d"])[:, None]
    dmin = fp16_to_f32(b["dmin"])[:, None]
    sc, m = get_scale_min_k4(b["scales"])
    with np.errstate(all="ignore"):  # random bytes: inf/NaN scales propagate as in C
        d1 = d * sc.astype(np.float32)  # [n, 8]
        m1 = dmin * m.astype(np.float32)
    qs = b["qs"].reshape(n, 4, 1, 32)
    return np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(n, 8, 32), d1, -m1


def dequantize_blocks(raw):  # uint8[n, 144] -> float32[n, 256]
    q, d1, m = codes(raw)
    with np.errstate(all="ignore"):
        y = d1[:, :, None] * q.astype(np.float32) + m[:, :, None]
    return y.reshape(len(q), QK_K)


def _quantize(x):  # float32[n, 256] -> uint8[n, 144]
    n = len(x)
    xs = x.reshape(n * 8, 32)
    scales, mins, L = make_qkx2_quants(xs, sub_block_weights(xs), 15, -1.0, 0.1, 20, False)
    d16, dmin16, packed = quantize_scales_mins(scales.reshape(n, 8), mins.reshape(n, 8))
    L = requantize(x, L, d16, dmin16, packed, 15).reshape(n, 4, 2, 32)
    b = new_blocks(n, block_q4_K)
    b["d"], b["dmin"], b["scales"] = d16, dmin16, packed
    b["qs"] = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(n, 128)
    return blocks_to_bytes(b)


def quantize_blocks(x):  # float32[n, 256] -> uint8[n, 144]
    return map_chunks(_quantize, x, block_q4_K.itemsize)


def quantize_weighted_codes(x, qw, nmax):  # float32[n, 256] x 2 -> (d16, dmin16, packed, L uint8[n, 256])
    """The search of quantize_row_q4_K_impl / q5_K_impl (nmax 15 / 31), given importance
    weights qw: per super-block sigma2 = 2 mean(x^2); per sub-block of 32 the weights
    qw * sqrt(sigma2 + x^2) and make_qkx3_quants(rmin=-0.9, rdelta=0.05, nstep=36) (with
    weights given it is make_qkx2_quants' arithmetic); then the 8 scales and the 8 mins get
    6-bit codes from make_qp_quants(nmax=63) weighted by the sub-blocks' weight sums, and the
    codes are recomputed from the stored values as in the _ref function."""
    n = len(x)
    sigma2 = F32(2) * sum_squares(x) / F32(QK_K)
    xs = x.reshape(n * 8, 32)
    w = importance_weights(xs, qw.reshape(n * 8, 32), np.repeat(sigma2, 8))
    sw = sequential_sum(w).reshape(n, 8)
    scales, mins, L = make_qkx2_quants(xs, w, nmax, -0.9, 0.05, 36, False)
    d_block, Ls = make_qp_quants(scales.reshape(n, 8), 63, sw)
    m_block, Lm = make_qp_quants(mins.reshape(n, 8), 63, sw)
    if nmax == 31:  # quantize_row_q5_K_impl clamps the codes to 6 bits; q4_K's does not
        Ls, Lm = np.minimum(63, Ls), np.minimum(63, Lm)
    packed = pack_scale_min_k4(Ls, Lm)  # exact for any uint8, as C's byte-wise |= is
    with np.errstate(over="ignore"):
        d16, dmin16 = f32_to_fp16_bits(d_block), f32_to_fp16_bits(m_block)
    return d16, dmin16, packed, requantize(x, L, d16, dmin16, packed, nmax)


def _quantize_weighted(x, qw):  # float32[n, 256] x 2 -> uint8[n, 144]
    n = len(x)
    d16, dmin16, packed, L = quantize_weighted_codes(x, qw, 15)
    L = L.reshape(n, 4, 2, 32)
    b = new_blocks(n, block_q4_K)
    b["d"], b["dmin"], b["scales"] = d16, dmin16, packed
    b["qs"] = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(n, 128)
    return blocks_to_bytes(b)


def quantize_blocks_weighted(x, qw):  # float32[n, 256] x 2 -> uint8[n, 144]
    """ggml `quantize_row_q4_K_impl` (quantize_q4_K with an importance matrix)."""
    return map_chunks_weighted(_quantize_weighted, x, qw, block_q4_K.itemsize)


BLOCK = BlockType("q4_K", 12, QK_K, block_q4_K, dequantize_blocks, quantize_blocks,
                  ggml_quantize="quantize_row_q4_K_ref", codes=codes)
