"""Importance-weighted quantization: what ggml_quantize_chunk writes when llama-quantize is
given an importance matrix (`quantize_q*(src, dst, nrow, n_per_row, quant_weights)` with
quant_weights != NULL, which runs `quantize_row_*_impl` row by row instead of `_ref`).

    quantize_rows(x float32[n_rows, n_per_row], qtype, quant_weights float32[n_per_row] or None)
        -> uint8[n_rows, row_bytes]

The same quant_weights (one imatrix entry: the mean squared activation of each input column)
weigh every row of a 2-D weight. The K-quants' weighted searches live in their modules
(q2_K..q6_K `quantize_blocks_weighted`); the legacy types' are here:

  * q4_0 / q5_0 (quantize_row_q4_0_impl / q5_0_impl): per row sigma2 = mean(x^2) over the
    whole row; per block of 32 the weights qw * sqrt(sigma2 + x^2) and make_qx_quants(nmax=8 /
    16, rmse_type=1) weighted by them: d = its scale, codes = its L (0..15 / 0..31). An all-zero
    block stores d = 0 and codes 0 (the _ref function writes codes 8 / 16).
  * q4_1 / q5_1: the same weights and make_qkx3_quants(nmax=15 / 31, rmin=-0.9, rdelta=0.05,
    nstep=36): d = its scale, m = -its min.
  * q8_0 ignores the importance matrix (quantize_q8_0 always runs the _ref function).
"""

from __future__ import annotations

import numpy as np

from ..errors import NonFiniteError, ShapeError
from . import get_type, q2_K, q3_K, q4_K, q5_K, q6_K, quantize
from ._common import F32, blocks_to_bytes, f32_to_fp16_bits, new_blocks, pack_qh
from ._weighted import importance_weights, sum_squares
from .q4_0 import block_q4_0
from .q4_1 import block_q4_1
from .q4_K import make_qkx2_quants
from .q5_0 import block_q5_0
from .q5_1 import block_q5_1
from .q6_K import make_qx_quants


def _legacy_weights(x, qw):  # x float32[n_rows, k], qw float32[k] -> (blocks [n*k/32, 32], weights)
    n_rows, k = x.shape
    sigma2 = sum_squares(x) / F32(k)  # [n_rows], the whole row's mean square
    xb = x.reshape(-1, 32)
    qwb = np.broadcast_to(qw.reshape(1, k // 32, 32), (n_rows, k // 32, 32)).reshape(-1, 32)
    return xb, importance_weights(xb, qwb, np.repeat(sigma2, k // 32))


def _symmetric(x, qw, nmax, layout):  # q4_0 (nmax 8), q5_0 (nmax 16)
    xb, w = _legacy_weights(x, qw)
    d, L = make_qx_quants(xb, nmax, w)  # L = code + nmax
    b = new_blocks(len(xb), layout)
    with np.errstate(over="ignore"):
        b["d"] = f32_to_fp16_bits(d)
    b["qs"] = (L[:, :16] & 0x0F) | ((L[:, 16:] & 0x0F) << 4)
    if nmax == 16:
        b["qh"] = pack_qh((L & 0x10) >> 4)
    return blocks_to_bytes(b)


def _affine(x, qw, nmax, layout):  # q4_1 (nmax 15), q5_1 (nmax 31)
    xb, w = _legacy_weights(x, qw)
    d, the_min, L = make_qkx2_quants(xb, w, nmax, -0.9, 0.05, 36, False)  # make_qkx3's arithmetic
    b = new_blocks(len(xb), layout)
    with np.errstate(over="ignore"):
        b["d"], b["m"] = f32_to_fp16_bits(d), f32_to_fp16_bits(-the_min)
    b["qs"] = (L[:, :16] & 0x0F) | ((L[:, 16:] & 0x0F) << 4)
    if nmax == 31:
        b["qh"] = pack_qh((L & 0x10) >> 4)
    return blocks_to_bytes(b)


_LEGACY = {
    "q4_0": lambda x, qw: _symmetric(x, qw, 8, block_q4_0),
    "q5_0": lambda x, qw: _symmetric(x, qw, 16, block_q5_0),
    "q4_1": lambda x, qw: _affine(x, qw, 15, block_q4_1),
    "q5_1": lambda x, qw: _affine(x, qw, 31, block_q5_1),
}
_KQUANTS = {"q2_K": q2_K, "q3_K": q3_K, "q4_K": q4_K, "q5_K": q5_K, "q6_K": q6_K}
WEIGHTED_TYPES = tuple(_LEGACY) + tuple(_KQUANTS)  # the types an importance matrix changes


def quantize_rows(x, qtype, quant_weights=None) -> np.ndarray:
    """Rows of one weight matrix -> its quantized rows, as ggml_quantize_chunk(qtype, x, ...,
    quant_weights) writes them."""
    t = get_type(qtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if quant_weights is None or t.name not in WEIGHTED_TYPES:
        return quantize(x, t)
    if x.ndim != 2:
        raise ShapeError(f"quantize_rows needs a 2-D [rows, n_per_row] array, got shape {x.shape}")
    n_rows, k = x.shape
    qw = np.ascontiguousarray(quant_weights, dtype=np.float32).reshape(-1)
    if qw.shape[0] != k:
        raise ShapeError(f"{t.name}: the importance weights have {qw.shape[0]} entries for rows of {k}")
    if k % t.block_size:
        raise ShapeError(f"{t.name}: rows of {k} elements are not a multiple of the block size {t.block_size}")
    if not np.isfinite(x).all():
        return quantize(x, t)  # raises quantize's NonFiniteError, naming the element
    if not np.isfinite(qw).all():
        raise NonFiniteError(f"{t.name}: the importance weights contain non-finite values",
                             hint="llama.cpp rejects such an imatrix too; recompute it")
    if t.name in _LEGACY:
        out = _LEGACY[t.name](x, qw)
    else:
        nb = k // t.block_size
        blocks = x.reshape(-1, t.block_size)
        qwb = np.broadcast_to(qw.reshape(1, nb, t.block_size), (n_rows, nb, t.block_size)).reshape(-1, t.block_size)
        out = _KQUANTS[t.name].quantize_blocks_weighted(blocks, qwb)
    return out.reshape(n_rows, nb_bytes(t, k))


def nb_bytes(t, k: int) -> int:
    return k // t.block_size * t.type_size
