"""The numba kernel for the packed integer-group weights (GPTQ, AWQ, compressed-tensors;
refinfer/quant/intgroup.py), ideal mode.

    out[t, n] = float32( sum_k float64(x[t, k]) * float64(W[n, k]) )   in order of k, from 0

W[n, k] = table[n, g_idx[k], codes[n, k]]: a row's possible weight values are a table of
2^bits float32 per group (IntGroupTensor.table(), with the deployed fp16 rounding already
applied), so the kernel dequantizes by one lookup per code, fused into the dot. A float32
times float32 product is exact in float64, so an FMA and a multiply-then-add give the same
sum, and the chain is the NumPy reference's column_order_matmul operation for operation: the
result is bit-identical to the reference, for every T (batch-invariant by construction).

Rows go 8 at a time: their 8 chains are independent, which gives the CPU 8 FMAs in flight while
each chain keeps its own strict order. A group of 8 rows is decoded once to float64 in a
scratch buffer and reused by every token; a decode step (T = 1) looks each weight up straight
into its chain.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .jit import njit

ROWS = 8


def repack(codes, table):
    """(codes uint8[N, K], table float32[N, G, L]) -> (uint8[nblk, K, ROWS], float32[nblk, G, L, ROWS]):
    8 rows side by side, so that one column of a block is 8 adjacent bytes and one table entry
    8 adjacent floats. The last block is padded with rows of code 0 and table 0.0."""
    N, K = codes.shape
    pad = -N % ROWS
    if pad:
        codes = np.concatenate([codes, np.zeros((pad, K), codes.dtype)])
        table = np.concatenate([table, np.zeros((pad,) + table.shape[1:], table.dtype)])
    nblk = codes.shape[0] // ROWS
    codes_r = np.ascontiguousarray(codes.reshape(nblk, ROWS, K).transpose(0, 2, 1))
    table_r = np.ascontiguousarray(table.reshape(nblk, ROWS, *table.shape[1:]).transpose(0, 2, 3, 1))
    return codes_r, table_r


@njit(cache=True, parallel=True)
def matmul_table(out, x, codes_r, table_r, g_idx):
    # out float32[T, N]; x float32[T, K]; codes_r, table_r as repack() makes them; g_idx int32[K]
    T, K = x.shape
    N = out.shape[1]
    for b in prange(codes_r.shape[0]):
        n0 = b * ROWS
        nr = min(ROWS, N - n0)
        acc = np.zeros(ROWS)
        if T == 1:          # decode: each weight is looked up once anyway, straight into the chains
            for k in range(K):
                xk = np.float64(x[0, k])
                g = g_idx[k]
                for r in range(ROWS):
                    acc[r] += xk * np.float64(table_r[b, g, codes_r[b, k, r], r])
            for r in range(nr):
                out[0, n0 + r] = np.float32(acc[r])
            continue
        w = np.empty((K, ROWS))     # the block's weights in float64, decoded once for every token
        for k in range(K):
            g = g_idx[k]
            for r in range(ROWS):
                w[k, r] = table_r[b, g, codes_r[b, k, r], r]
        for t in range(T):
            for r in range(ROWS):
                acc[r] = 0.0
            for k in range(K):
                xk = np.float64(x[t, k])
                for r in range(ROWS):
                    acc[r] += xk * w[k, r]
            for r in range(nr):
                out[t, n0 + r] = np.float32(acc[r])


@njit(cache=True, parallel=True)
def dequantize_rows_table(out, ids, codes_r, table_r, g_idx):
    # out float32[len(ids), K] = W[ids]
    K = codes_r.shape[1]
    for i in prange(len(ids)):
        b, r = ids[i] // ROWS, ids[i] % ROWS
        for k in range(K):
            out[i, k] = table_r[b, g_idx[k], codes_r[b, k, r], r]
