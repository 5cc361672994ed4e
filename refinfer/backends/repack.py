"""Weight matrices repacked once, at first use, for the numba backend's matmul kernels.

Every quantized type stores, per sub-block of B elements, integer codes q and float32 d, m
with w = d * q + m (m absent for q4_0, q5_0, q8_0, q3_K, q6_K); `BlockType.codes` returns
them exactly as ggml's dequantize_row_* computes them. The kernels want R rows side by side
("row-interleaved", as ggml's repacked q4_0_8x8 formats), so that one SIMD instruction works
on R rows at the same column and every row's sum keeps a fixed order:

    nibbles  uint8[G, nb, B/2, R]  4-bit types: byte j holds element j (low nibble) and j + B/2
                                   (high nibble), each stored as q - off (0..15)
    int8     int8[G, nb, B, R]     q5_0, q5_1, q5_K, q6_K, q8_0
    d, m     float32[G, nb, R]     per sub-block (m all zero when the type has none)
    float    float32[G, cols, R]   f32, f16, bf16 (exact float32 values)

G = ceil(rows / R) groups of R rows; the last is padded with zero rows (codes 0, d = m = 0),
which the kernels compute and do not store. The loader's raw blocks stay as they are (embed,
ggml mode and the NumPy reference read those); the backend releases their resident pages.
"""

from __future__ import annotations

import numpy as np

R_WIDE, R_NARROW = 64, 32   # rows per group; the kernels' vector loops run 32 floats at a time
# 4-bit codes q in off .. off + 15, packed two to a byte as q - off
NIBBLE_OFFSET = {"q4_0": -8, "q4_1": 0, "q4_K": 0, "q2_K": 0, "q3_K": -4}


class Repacked:
    """One weight matrix in the kernels' layout (see the module docstring)."""

    def __init__(self, layout, codes, d, m, rows, cols, block, off, has_m):
        self.layout = layout        # "nibbles" | "int8" | "float"
        self.codes = codes
        self.d, self.m = d, m       # float32[G, nb, R] (empty for "float")
        self.rows, self.cols = rows, cols
        self.block = block          # B elements per sub-block
        self.off = off              # nibble offset
        self.has_m = has_m

    @property
    def group(self):            # R
        return self.codes.shape[-1]

    @property
    def nbytes(self):
        return self.codes.nbytes + self.d.nbytes + self.m.nbytes


def rows_per_group(rows):
    """Wide groups where there are enough of them for every thread; narrow ones for small
    matrices (k/v projections), so that two threads still get equal shares."""
    return R_WIDE if rows >= 16 * R_WIDE else R_NARROW


def _groups(a, R):  # [rows, ...] -> [G, R, ...], zero-padded
    pad = -len(a) % R
    if pad:
        a = np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)])
    return a.reshape(-1, R, *a.shape[1:])


def repack(w, chunk_groups=64) -> Repacked:
    """QTensor w (rows, cols) -> Repacked, chunk_groups groups of rows at a time (bounds the
    temporaries: a 49152 x 576 q8_0 matrix at once needs about 100 MB of them)."""
    rows, cols = w.shape
    t = w.qtype
    R = rows_per_group(rows)
    G = -(-rows // R)
    if t.codes is None:   # f32, f16, bf16
        dense = np.empty((G, cols, R), np.float32)
        for g0 in range(0, G, chunk_groups):
            part = np.asarray(w.dequantize(slice(g0 * R, (g0 + chunk_groups) * R)), dtype=np.float32)
            dense[g0: g0 + chunk_groups] = _groups(part.reshape(-1, cols), R).transpose(0, 2, 1)
        empty = np.zeros((0, 0, 0), np.float32)
        return Repacked("float", dense, empty, empty, rows, cols, 1, 0, False)
    B = t.codes(np.asarray(w.raw[:1]).reshape(-1, t.type_size))[0].shape[-1]
    nb = cols // B
    off = NIBBLE_OFFSET.get(t.name)
    layout = "int8" if off is None else "nibbles"
    codes = np.empty((G, nb, B if off is None else B // 2, R), np.int8 if off is None else np.uint8)
    d = np.empty((G, nb, R), np.float32)
    m = np.zeros((G, nb, R), np.float32)
    has_m = False
    for g0 in range(0, G, chunk_groups):
        raw = np.asarray(w.raw[g0 * R: (g0 + chunk_groups) * R])
        q, dp, mp = t.codes(raw.reshape(-1, t.type_size))             # [n * blocks, S, B]
        n = len(raw)
        q = _groups(q.reshape(n, nb, B), R)                              # [g, R, nb, B]
        if off is not None:
            u = (q.astype(np.int16) - off).astype(np.uint8)
            q = u[..., : B // 2] | (u[..., B // 2:] << 4)                # [g, R, nb, B/2]
        codes[g0: g0 + chunk_groups] = q.transpose(0, 2, 3, 1)          # [g, nb, B or B/2, R]
        d[g0: g0 + chunk_groups] = _groups(dp.reshape(n, nb), R).transpose(0, 2, 1)
        if mp is not None:
            has_m = True
            m[g0: g0 + chunk_groups] = _groups(mp.reshape(n, nb), R).transpose(0, 2, 1)
    return Repacked(layout, codes, d, m, rows, cols, B, off or 0, has_m)
