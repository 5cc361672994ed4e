"""GPTQ, as AutoGPTQ 0.7.1 runs it (quantization/gptq.py GPTQ.add_batch, GPTQ.fasterquant).

For one Linear, W float32[N, K] (rows = out_features) and its inputs X [tokens, K]:

    H = (2 / n_seq) * sum_tokens x x^T                    # add_batch, one call per sequence
    dead = diag(H) == 0: H[d, d] = 1, W[:, d] = 0         # inputs that are always 0
    act-order: perm = argsort(diag H, descending); W, H permuted
    H += percdamp * mean(diag H) * I
    Hinv = upper Cholesky factor of H^-1                  # H^-1 = Hinv^T Hinv
    for each 128-column block [i1, i2):
        for each column i of the block:
            group start (i % gs == 0): (s, z) = find_params(W[:, i:i+gs])
            q = s * (clamp(round(w / s) + z, 0, maxq) - z)
            err = (w - q) / Hinv[i, i]
            W[:, i:i2] -= err (x) Hinv[i, i:i2]          # error feedback inside the block
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]              # and onto the later blocks, at once

The quirk kept here, as in AutoGPTQ (and GPTQModel): find_params at a group start inside a block
reads W, which holds the later blocks' feedback but NOT this block's (that lives in the block's
copy W1). The two agree only when the group starts a block (gs = 128). static_groups instead
takes every group's (s, z) up front from the un-updated W, in the original column order.

float32 throughout, as AutoGPTQ. Two float32 programs that sum in different orders (the block
feedback matmul, LAPACK's Cholesky) give weights a few ulp apart, and a code whose w/s lies
within that of a rounding boundary (a near-tie) can flip; the error feedback then carries the
flip along that row (rows never interact). `margin` records each code's distance from its
rounding boundary so that tests can trace every mismatch to a near-tie.

Outputs: the codes of the returned IntGroupTensor are the integers fasterquant chose (q/s + z),
and its scales the fp16 values QuantLinear.pack stores (rtn.py explains why the packer's
re-derived codes are these); g_idx as fasterquant returns it:
    act-order, not static: g_idx[k] = (position of column k in perm) // gs
    otherwise:             g_idx[k] = k // gs
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..errors import RefinferError
from ..quant.intgroup import IntGroupTensor, from_weights
from .rtn import fp16_scales, gptq_codes, gptq_find_params


class Hessian:
    """GPTQ.add_batch: the running H = (2 / n) sum x x^T, n counting sequences (inp.shape[0])."""

    def __init__(self, K: int):
        self.H = np.zeros((K, K), np.float32)
        self.nsamples = 0

    def add_batch(self, inp: np.ndarray):
        """inp: [K] / [tokens, K] (one sequence) or [seqs, tokens, K]."""
        inp = np.asarray(inp, np.float32)
        if inp.ndim == 2:
            inp = inp[None]
        tmp = inp.shape[0]
        x = inp.reshape(-1, inp.shape[-1])                       # [tokens, K]
        self.H *= np.float32(self.nsamples / (self.nsamples + tmp))
        self.nsamples += tmp
        x = np.float32(math.sqrt(2 / self.nsamples)) * x
        self.H += x.T @ x


@dataclasses.dataclass
class GPTQResult:
    codes: np.ndarray     # float32[N, K], integer values, original column order
    scale: np.ndarray     # float32[N, G]  exact fp32 scales, group order of g_idx
    zero: np.ndarray      # float32[N, G]
    g_idx: np.ndarray     # int32[K]
    Q: np.ndarray         # float32[N, K]  fasterquant's fake-quantized weight (layer.weight after it)
    perm: np.ndarray | None
    margin: np.ndarray    # float32[N, K]  | frac(w/s) - 1/2 |: 0 = a tie of round(w/s)


def prepare(W: np.ndarray, H: np.ndarray, *, percdamp: float = 0.01, actorder: bool = False,
            name: str = "weight"):
    """fasterquant's set-up: dead columns, act-order, damping, Hinv.
    -> (W [N, K] float32, permuted, dead columns zeroed; H after the dead-column fix and before
    the permutation; perm or None; Hinv float32[K, K] upper triangular)."""
    W = np.array(W, np.float32)
    H = np.array(H, np.float32)
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H_fixed = H.copy()
    perm = None
    if actorder:
        # torch.argsort(descending=True) is not stable: among equal diag values the order is
        # unspecified; ties (exact float32 equality of two Hessian diagonals) are vanishingly rare.
        perm = np.argsort(-np.diag(H), kind="stable")
        W = W[:, perm]
        H = H[perm][:, perm]
    damp = np.float32(percdamp) * np.mean(np.diag(H), dtype=np.float32)
    idx = np.arange(H.shape[0])
    H[idx, idx] += damp
    return W, H_fixed, perm, hinv(H, name)


def hinv(H: np.ndarray, name: str = "weight") -> np.ndarray:
    """cholesky(cholesky_inverse(cholesky(H)), upper=True), in float32 as AutoGPTQ, by one Cholesky
    and one inverse: with J the reversal, J H J = L L^T gives H^-1 = U^T U for the upper U = J L^-1 J
    (AutoGPTQ's three LAPACK calls and this differ by ~4e-7 relative, like two LAPACKs)."""
    try:
        L = np.linalg.cholesky(np.ascontiguousarray(H[::-1, ::-1], np.float32))
    except np.linalg.LinAlgError:
        raise RefinferError(f"{name}: the damped Hessian is not positive definite (Cholesky failed)",
                            hint="raise --damp (e.g. 0.1), or give more calibration text (--calib-samples)")
    return np.ascontiguousarray(lower_inverse(L)[::-1, ::-1], np.float32)


def lower_inverse(L: np.ndarray) -> np.ndarray:
    """L^-1 for lower-triangular L, by halves: [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]
    (matmuls instead of LAPACK's general inverse: 3x faster at K = 1536)."""
    n = L.shape[0]
    if n <= 128:
        return np.linalg.inv(L)
    h = n // 2
    Ai, Ci = lower_inverse(L[:h, :h]), lower_inverse(L[h:, h:])
    out = np.zeros_like(L)
    out[:h, :h], out[h:, h:] = Ai, Ci
    out[h:, :h] = -(Ci @ (L[h:, :h] @ Ai))
    return out


def fasterquant(W: np.ndarray, H: np.ndarray, *, bits: int = 4, group_size: int = 128, sym: bool = True,
                actorder: bool = False, static_groups: bool = False, percdamp: float = 0.01, blocksize: int = 128,
                Hinv: np.ndarray | None = None, perm: np.ndarray | None = None, name: str = "weight"
                ) -> GPTQResult:
    """GPTQ.fasterquant. Hinv (the permuted, damped inverse factor) and perm may be passed in, to
    run the blocks on another implementation's factorisation."""
    N, K = W.shape
    W0 = np.array(W, np.float32)
    s_row, z_row = gptq_find_params(W0, bits, sym)               # before the dead columns are zeroed, as AG
    if Hinv is None:
        Wp, _, perm, Hinv = prepare(W0, H, percdamp=percdamp, actorder=actorder, name=name)
    else:
        dead = np.diag(H) == 0
        Wp = W0.copy()
        Wp[:, dead] = 0
        if actorder:
            Wp = Wp[:, perm]
        Hinv = np.asarray(Hinv, np.float32)
    gs = group_size

    groups = []
    if static_groups and gs != -1:
        Wd = Wp[:, np.argsort(perm)] if actorder else Wp         # un-permuted, dead columns zeroed
        groups = [gptq_find_params(Wd[:, i:i + gs], bits, sym) for i in range(0, K, gs)]

    # The loop runs on W transposed, [K, N], so that a column of W is a contiguous row here; every
    # element sees the same float32 operations as in AutoGPTQ.
    scales, zeros = [], []
    s, z = s_row, z_row
    Wt = np.ascontiguousarray(Wp.T)                              # W in fasterquant, updated in place
    codes_t = np.zeros_like(Wt)
    margin_t = np.zeros_like(Wt)
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1 = Wt[i1:i2].copy()                                    # W1 (transposed)
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if gs != -1:
                if not static_groups:
                    if col % gs == 0:
                        s, z = gptq_find_params(Wt[col:col + gs].T, bits, sym)   # reads W, not W1
                        scales.append(s)
                        zeros.append(z)
                else:
                    s, z = groups[(perm[col] if actorder else col) // gs]
            w = W1[i]
            c = gptq_codes(w, s, z, bits)
            ws = w / s
            margin_t[col] = np.abs(ws - np.floor(ws) - np.float32(0.5))
            err = (w - s * (c - z)) / Hinv1[i, i]
            codes_t[col] = c
            W1[i:] -= Hinv1[i, i:, None] * err[None, :]          # err (x) Hinv1[i, i:]
            Err1[i] = err
        Wt[i2:] -= Hinv[i1:i2, i2:].T @ Err1
    codes, margin = codes_t.T, margin_t.T
    gsz = K if gs == -1 else gs
    if static_groups and actorder:
        g_idx = (perm // gsz).astype(np.int32)
    else:
        g_idx = (np.arange(K) // gsz).astype(np.int32)
    if actorder:
        invperm = np.argsort(perm)
        codes, margin, g_idx = codes[:, invperm], margin[:, invperm], g_idx[invperm]
    if static_groups and gs != -1:
        scales, zeros = [g[0] for g in groups], [g[1] for g in groups]
    scale, zero = np.stack(scales or [s_row], 1), np.stack(zeros or [z_row], 1)
    Q = scale[:, g_idx] * (codes - zero[:, g_idx])               # the same products as q in the loop
    return GPTQResult(np.ascontiguousarray(codes), scale, zero, g_idx, Q, perm, np.ascontiguousarray(margin))


def to_intgroup(r: GPTQResult, *, bits: int, group_size: int, sym: bool, actorder: bool, static_groups: bool,
                name: str = "weight") -> IntGroupTensor:
    return from_weights(name, r.codes, fp16_scales(r.scale), r.zero, r.g_idx, bits=bits,
                        info=dict(method="gptq", group_size=group_size, sym=sym, act_order=actorder,
                                  static_groups=static_groups))


__all__ = ["Hessian", "GPTQResult", "prepare", "hinv", "fasterquant", "to_intgroup"]
