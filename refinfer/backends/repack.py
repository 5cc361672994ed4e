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
which the kernels compute and do not store. The loader's raw blocks stay as they are: embed,
ggml mode and the NumPy reference read those.
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


def repack(w) -> Repacked:
    """QTensor w (rows, cols) -> Repacked."""
    rows, cols = w.shape
    t = w.qtype
    R = rows_per_group(rows)
    if t.codes is None:   # f32, f16, bf16
        dense = _groups(np.asarray(w.dequantize(), dtype=np.float32).reshape(rows, cols), R)
        empty = np.zeros((0, 0, 0), np.float32)
        return Repacked("float", np.ascontiguousarray(dense.transpose(0, 2, 1)), empty, empty,
                        rows, cols, 1, 0, False)
    q, d, m = t.codes(np.asarray(w.raw).reshape(-1, t.type_size))    # [rows * blocks, S, B]
    B = q.shape[-1]
    nb = cols // B
    q = _groups(q.reshape(rows, nb, B), R)                              # [G, R, nb, B]
    d = _groups(d.reshape(rows, nb), R)
    has_m = m is not None
    m = _groups(m.reshape(rows, nb), R) if has_m else np.zeros_like(d)
    off = NIBBLE_OFFSET.get(t.name)
    if off is not None:
        u = (q.astype(np.int16) - off).astype(np.uint8)
        q = u[..., : B // 2] | (u[..., B // 2:] << 4)                    # [G, R, nb, B/2]
        layout = "nibbles"
    else:
        q = q.astype(np.int8)
        layout = "int8"
    codes = np.ascontiguousarray(q.transpose(0, 2, 3, 1))               # [G, nb, B or B/2, R]
    d = np.ascontiguousarray(d.transpose(0, 2, 1), dtype=np.float32)    # [G, nb, R]
    m = np.ascontiguousarray(m.transpose(0, 2, 1), dtype=np.float32)
    return Repacked(layout, codes, d, m, rows, cols, B, off or 0, has_m)
