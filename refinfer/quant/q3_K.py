"""q3_K: 256 weights -> 16 sub-blocks of 16 with signed 6-bit scales, and 256 signed 3-bit
codes (110 bytes, 3.4375 bits/weight).

    byte 0..31    hmask[32]   bit s of hmask[r] is the high (3rd) bit of element 32s + r
    byte 32..95   qs[64]      low 2 bits, laid out as q2_K's qs: element 128h + 32s + r is
                              bits 2s..2s+1 of qs[32h + r]
    byte 96..107  scales[12]  16 six-bit scales: the low 4 bits of scale j are the LOW nibble
                              of scales[j] (j < 8) or the HIGH nibble of scales[j-8] (j >= 8);
                              the top 2 bits are bits 2(j//4)..2(j//4)+1 of scales[8 + j%4]
    byte 108..109 d           fp16 super-block scale

    sub-block j = element // 16:  w = (d * (sc[j] - 32)) * (low2 - (high bit set ? 0 : 4))

(ggml `dequantize_row_q3_K`: dl = d_all * (scale - 32), y = dl * q, in float32).

Quantize (ggml `quantize_row_q3_K_ref`): each sub-block gets a signed scale from
make_q3_quants(nmax=4, do_rmse=true): codes nearest_int(-4 x / max) clamped to -4..3, then up
to 5 sweeps of coordinate descent that move one code at a time when that raises
(sum w x l)^2 / (sum w l^2), w = x^2. The signed scale of largest |.| gives d = -max/32 and
6-bit scales nearest_int(-32 * scale / max) + 32; the codes are recomputed from the stored
values: q = clamp(nearest_int(x / (d * (sc - 32))), -4, 3) + 4.
"""

import numpy as np

from ._common import (F32, BlockType, as_blocks, blocks_to_bytes, f32_to_fp16_bits, fp16_to_f32,
                      map_chunks, nearest_int_c, new_blocks)
from .q2_K import pack_crumbs, unpack_crumbs
from ._weighted import importance_weights, map_chunks_weighted, sequential_sum, sum_squares
from .q6_K import GROUP_MAX_EPS, make_qx_quants, signed_absmax

QK_K = 256
block_q3_K = np.dtype([("hmask", "u1", (QK_K // 8,)), ("qs", "u1", (QK_K // 4,)),
                       ("scales", "u1", (12,)), ("d", "<u2")])
assert block_q3_K.itemsize == 32 + 64 + 12 + 2


def unpack_scales(scales):  # uint8[n, 12] -> int32[n, 16] (0..63, before the -32)
    j = np.arange(16)
    low = np.where(j < 8, scales[:, j % 8] & 0xF, scales[:, j % 8] >> 4)
    high = (scales[:, 8 + j % 4] >> (2 * (j // 4))) & 3
    return (low | (high << 4)).astype(np.int32)


def pack_scales(ls):  # int[n, 16] (0..63) -> uint8[n, 12], inverse of unpack_scales
    ls = ls.astype(np.uint8)
    out = np.empty((len(ls), 12), dtype=np.uint8)
    out[:, 0:8] = (ls[:, 0:8] & 0xF) | ((ls[:, 8:16] & 0xF) << 4)
    high = (ls >> 4).reshape(len(ls), 4, 4) << (2 * np.arange(4, dtype=np.uint8))[None, :, None]
    out[:, 8:12] = np.bitwise_or.reduce(high, axis=1)  # [n, j % 4]
    return out


def make_q3_quants(x, nmax):
    """ggml `make_q3_quants(n, nmax, x, L, do_rmse=true)` for many sub-blocks at once:
    x float32[m, n] -> (scale float32[m], L uint8[m, n] in 0..2*nmax-1).

    The descent visits the elements in order and updates the running sums after each accepted
    move, so the loop over elements stays sequential; the rows (sub-blocks) are independent.
    A sweep that changes nothing leaves the state as it was, so running all 5 sweeps for every
    row gives what C's early `break` gives."""
    m, n = x.shape
    max_, amax = signed_absmax(x)
    zero = amax < GROUP_MAX_EPS  # C: all codes 0 (not nmax) and scale 0
    with np.errstate(over="ignore"):
        w = x * x  # the rmse weights; inf for |x| > 1.8e19, as in C
    with np.errstate(all="ignore"):
        iscale = F32(-nmax) / max_
        L = np.clip(nearest_int_c(iscale[:, None] * x), -nmax, nmax - 1).astype(np.float32)
        sumlx = np.zeros(m, dtype=np.float32)
        suml2 = np.zeros(m, dtype=np.float32)
        for i in range(n):
            sumlx = sumlx + w[:, i] * x[:, i] * L[:, i]
            suml2 = suml2 + w[:, i] * L[:, i] * L[:, i]
        for _ in range(5):
            for i in range(n):
                wi, xi, li = w[:, i], x[:, i], L[:, i]
                slx = sumlx - wi * xi * li
                sl2 = suml2 - wi * li * li
                new_l = np.clip(nearest_int_c(xi * sl2 / slx), -nmax, nmax - 1).astype(np.float32)
                slx2 = slx + wi * xi * new_l
                sl22 = sl2 + wi * new_l * new_l
                accept = ((slx > 0) & (new_l != li) & (sl22 > 0)
                          & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22))
                L[:, i] = np.where(accept, new_l, li)
                sumlx = np.where(accept, slx2, sumlx)
                suml2 = np.where(accept, sl22, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    L = np.where(zero[:, None], 0, L + F32(nmax)).astype(np.uint8)
    return np.where(zero, F32(0), scale), L


def codes(raw):  # uint8[n, 110] -> (q int8[n, 16, 16], dl float32[n, 16], None): w = dl * q
    b = as_blocks(raw, block_q3_K)
    n = len(b)
    d_all = fp16_to_f32(b["d"])[:, None]
    high = (b["hmask"][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [n, s, r]
    q = unpack_crumbs(b["qs"]).astype(np.int8) - np.int8(4) * (1 - high.reshape(n, QK_K).astype(np.int8))
    with np.errstate(all="ignore"):  # random bytes: inf/NaN scales propagate as in C
        dl = d_all * (unpack_scales(b["scales"]) - 32).astype(np.float32)  # [n, 16]
    return q.reshape(n, 16, 16), dl, None


def dequantize_blocks(raw):  # uint8[n, 110] -> float32[n, 256]
    q, dl, _ = codes(raw)
    with np.errstate(all="ignore"):
        y = dl[:, :, None] * q.astype(np.float32)
    return y.reshape(len(q), QK_K)


def _quantize(x):  # float32[n, 256] -> uint8[n, 110]
    n = len(x)
    scales, L = make_q3_quants(x.reshape(n * 16, 16), 4)
    scales = scales.reshape(n, 16)
    max_scale, _ = signed_absmax(scales)
    has_scale = max_scale != 0
    with np.errstate(all="ignore"):
        iscale = F32(-32) / max_scale
        # C: int8_t l = nearest_int(.) (low byte, signed), then MAX(-32, MIN(31, l)) + 32
        l = ((nearest_int_c(iscale[:, None] * scales) & 0xFF) ^ 0x80) - 0x80
        ls = np.where(has_scale[:, None], np.clip(l, -32, 31) + 32, 0)
        packed = np.where(has_scale[:, None], pack_scales(ls), 0).astype(np.uint8)
        d16 = np.where(has_scale, f32_to_fp16_bits(F32(1) / iscale), 0).astype(np.uint16)
        d = fp16_to_f32(d16)[:, None] * (unpack_scales(packed) - 32).astype(np.float32)  # [n, 16]
        q = np.clip(nearest_int_c(x.reshape(n, 16, 16) / d[:, :, None]), -4, 3) + 4
    L = np.where((d != 0)[:, :, None], q, L.reshape(n, 16, 16)).reshape(n, QK_K).astype(np.uint8)
    return _pack(packed, d16, L)


def _pack(packed, d16, L):  # L uint8[n, 256] (0..7) -> uint8[n, 110]
    n = len(L)
    b = new_blocks(n, block_q3_K)
    high = (L > 3).astype(np.uint8).reshape(n, 8, 32) << np.arange(8, dtype=np.uint8)[None, :, None]
    b["hmask"] = np.bitwise_or.reduce(high, axis=1)
    b["qs"] = pack_crumbs(np.where(L > 3, L - 4, L))
    b["scales"], b["d"] = packed, d16
    return blocks_to_bytes(b)


def quantize_blocks(x):  # float32[n, 256] -> uint8[n, 110]
    return map_chunks(_quantize, x, block_q3_K.itemsize)


def _quantize_weighted(x, qw):  # float32[n, 256] x 2 -> uint8[n, 110]
    """quantize_row_q3_K_impl: per super-block sigma2 = 2 mean(x^2); per sub-block of 16 the
    weights qw * sqrt(sigma2 + x^2) and make_qx_quants(nmax=4) weighted by them (not
    make_q3_quants); the 16 signed scales get 6-bit codes (offset 32) and the super-block scale
    from make_qx_quants(nmax=32) weighted by the sub-blocks' weight sums; the codes are then
    recomputed from the stored values."""
    n = len(x)
    sigma2 = F32(2) * sum_squares(x) / F32(QK_K)
    xs = x.reshape(n * 16, 16)
    w = importance_weights(xs, qw.reshape(n * 16, 16), np.repeat(sigma2, 16))
    sw = sequential_sum(w).reshape(n, 16)
    scales, L = make_qx_quants(xs, 4, w)
    d_block, Ls = make_qx_quants(scales.reshape(n, 16), 32, sw)  # Ls = code + 32 in 0..63
    packed = pack_scales(Ls)
    with np.errstate(all="ignore"):
        d16 = f32_to_fp16_bits(d_block)
        d = fp16_to_f32(d16)[:, None] * (unpack_scales(packed) - 32).astype(np.float32)  # [n, 16]
        q = np.clip(nearest_int_c(x.reshape(n, 16, 16) / d[:, :, None]), -4, 3) + 4
    L = np.where((d != 0)[:, :, None], q, L.reshape(n, 16, 16)).reshape(n, QK_K).astype(np.uint8)
    return _pack(packed, d16, L)


def quantize_blocks_weighted(x, qw):  # float32[n, 256] x 2 -> uint8[n, 110]
    """ggml `quantize_row_q3_K_impl` (quantize_q3_K with an importance matrix)."""
    return map_chunks_weighted(_quantize_weighted, x, qw, block_q3_K.itemsize)


BLOCK = BlockType("q3_K", 11, QK_K, block_q3_K, dequantize_blocks, quantize_blocks,
                  ggml_quantize="quantize_row_q3_K_ref", codes=codes)
