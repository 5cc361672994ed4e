"""Pieces shared by the importance-weighted quantizers (ggml's `quantize_row_*_impl`, what
`ggml_quantize_chunk` runs when llama-quantize is given an importance matrix).

An importance matrix holds, per column of a weight matrix, the mean of the squared
activations that multiply it (refinfer/imatrix.py); the weighted quantizers minimise
sum_i qw_i * f(x_i) * (x_i - q_i)^2 instead of the unweighted error of the `_ref` functions.
"""

from __future__ import annotations

import numpy as np

from ._common import F32, nearest_int_c

GROUP_MAX_EPS = np.float32(1e-15)


def map_chunks_weighted(fn, x, qw, type_size: int, chunk: int = 4096) -> np.ndarray:
    """fn(x, qw) over float32[n, block_size] row chunks -> uint8[n, type_size] (as map_chunks)."""
    out = np.empty((len(x), type_size), dtype=np.uint8)
    for start in range(0, len(x), chunk):
        out[start:start + chunk] = fn(np.asarray(x[start:start + chunk], dtype=np.float32),
                                      np.asarray(qw[start:start + chunk], dtype=np.float32))
    return out


def sum_squares(x) -> np.ndarray:  # float32[m, n] -> float32[m]
    """sum_j x_j * x_j, sequentially in float32 (`for (j...) sum_x2 += x[j]*x[j];`)."""
    s = np.zeros(len(x), dtype=np.float32)
    with np.errstate(over="ignore"):
        for j in range(x.shape[1]):
            s = s + x[:, j] * x[:, j]
    return s


def sequential_sum(w) -> np.ndarray:  # float32[m, n] -> float32[m]
    s = np.zeros(len(w), dtype=np.float32)
    for j in range(w.shape[1]):
        s = s + w[:, j]
    return s


def importance_weights(x, qw, sigma2) -> np.ndarray:  # float32[m, n], qw [m, n], sigma2 [m] -> [m, n]
    """weight_l = qw_l * sqrtf(sigma2 + x_l * x_l), the K-quant and legacy impl weighting."""
    with np.errstate(over="ignore"):
        return qw * np.sqrt(sigma2[:, None] + x * x)


def make_qp_quants(x, nmax: int, qw):
    """ggml `make_qp_quants(n, nmax, x, L, quant_weights)` for many rows at once: the
    non-negative sub-block scales (or mins) x float32[m, n] of a super-block, weighted by qw
    float32[m, n] -> (scale float32[m], L uint8[m, n] in 0..nmax).

    Start from iscale = nmax / max(x), try the 8 inverse scales (nmax + 0.1 is) / max (is =
    -4..4, is != 0) and keep the one of least weighted squared error; then up to 5 sweeps of
    coordinate descent raising (sum w x l)^2 / (sum w l^2), one code at a time, in element
    order (the sums are updated after each accepted move, so the loop over elements stays
    sequential). A sweep that changes nothing leaves the state as it was, so running all 5
    sweeps gives what C's early `break` gives. L is a uint8_t array in C: a negative code
    (a negative x) wraps, and the wrapped value is what the descent reads back."""
    m, n = x.shape
    with np.errstate(all="ignore"):
        mx = np.zeros(m, dtype=np.float32)
        for i in range(n):  # MAX(max, x[i]) = max > x ? max : x
            mx = np.where(mx > x[:, i], mx, x[:, i])
        zero = mx < GROUP_MAX_EPS
        iscale = F32(nmax) / mx
        L0 = (nearest_int_c(iscale[:, None] * x) & 0xFF).astype(np.float32)
        scale = F32(1) / iscale
        best_mse = np.zeros(m, dtype=np.float32)
        for i in range(n):
            diff = x[:, i] - scale * L0[:, i]
            best_mse = best_mse + qw[:, i] * diff * diff
        for is_ in range(-4, 5):
            if is_ == 0:
                continue
            iscale_is = (F32(0.1) * F32(is_) + F32(nmax)) / mx
            scale_is = F32(1) / iscale_is
            mse = np.zeros(m, dtype=np.float32)
            for i in range(n):
                l = np.minimum(nmax, nearest_int_c(iscale_is * x[:, i])).astype(np.float32)
                diff = x[:, i] - scale_is * l
                mse = mse + qw[:, i] * diff * diff
            better = mse < best_mse
            best_mse = np.where(better, mse, best_mse)
            iscale = np.where(better, iscale_is, iscale)
        l = np.minimum(nmax, nearest_int_c(iscale[:, None] * x))  # int, enters the sums unwrapped
        L = (l & 0xFF).astype(np.float32)
        l = l.astype(np.float32)
        sumlx = np.zeros(m, dtype=np.float32)
        suml2 = np.zeros(m, dtype=np.float32)
        for i in range(n):
            sumlx = sumlx + qw[:, i] * x[:, i] * l[:, i]
            suml2 = suml2 + qw[:, i] * l[:, i] * l[:, i]
        for _ in range(5):
            for i in range(n):
                w, xi, li = qw[:, i], x[:, i], L[:, i]
                slx = sumlx - w * xi * li
                sl2 = suml2 - w * li * li
                new_l = np.minimum(nmax, nearest_int_c(xi * sl2 / slx))
                stored = (new_l & 0xFF).astype(np.float32)
                new_l = new_l.astype(np.float32)
                slx2 = slx + w * xi * new_l
                sl22 = sl2 + w * new_l * new_l
                accept = ((slx > 0) & (sl2 > 0) & (new_l != li)
                          & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22))
                L[:, i] = np.where(accept, stored, li)
                sumlx = np.where(accept, slx2, sumlx)
                suml2 = np.where(accept, sl22, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    L = np.where(zero[:, None], 0, L).astype(np.uint8)
    return np.where(zero, F32(0), scale).astype(np.float32), L
