"""LLM.int8() (Dettmers et al. 2022) as bitsandbytes 0.50.2 computes it: the weight state of
`Linear8bitLt(has_fp16_weights=False)` and its inference matmul, step by step.

Weight (bitsandbytes `Int8Params._quantize` -> functional.int8_vectorwise_quant(W.to(fp16))):

    W16      = fp16(W)                                   float[N, K]
    SCB[n]   = max_k |W16[n, k]|                          float32[N], one absmax per output row
    CB[n, k] = rint(W16[n, k] * (127 / SCB[n]))           int8[N, K], row-major (weight_format 0)

Forward (autograd/_functions.py MatMul8bitLt.forward; backends/default/ops.py, the CPU path):

    A        = fp16(x)                                    float[T, K]
    outlier  = |A| >= fp16(threshold)                     (threshold > 0 only)
    cols     = the columns with an outlier in ANY row of the call
    SCA[t]   = max_k |A[t, k]| over the non-outlier elements            float32[T]
    CA[t, k] = rint(A[t, k] * (127 / SCA[t]))  half to even, outliers as 0;
               127 / SCA is torch's `127.0 / tensor` = reciprocal(SCA) * 127: two float32
               roundings (a true 127 / SCA misrounds some ties)
    CA[:, cols] = 0 when T > 1
    acc      = CA @ CB.T                                  int32, exact
    y        = fp16((acc * (SCA[t] * SCB[n])) * C (+ bias))  C = 6.200124e-05 (CPU), in float32
    y        = fp16(y + A[:, cols] @ fp16(CB[:, cols] * SCB / 127).T)   the outlier part, through
               the int8 weight dequantized (int8_vectorwise_dequant: CB * SCB * 7.874015718698502e-3)

C is 1/127^2 = 6.2000124e-05 with two digits transposed; bitsandbytes' CUDA kernel uses
6.200012e-05 (csrc/kernels.cu kdequant_mm_int32_fp16, MM_DEQUANT_CONST): a systematic relative
gap of 1.8e-5 between the two devices. `dequant="cuda"` takes the CUDA constant (there is no
CPU oracle for it: tests/test_llm_int8.py checks it against a transcription of the kernel's
formula).

Which rows share outlier columns: bitsandbytes takes them over every row of the call, so a
token's output depends on the other tokens of the batch. int8_matmul is that rule (the
oracle's); int8_matmul_segments takes them per sequence segment, so that a single-sequence call
equals bitsandbytes and each sequence is independent of its neighbours in a batch.

Exactness (tests/test_llm_int8.py, against bitsandbytes 0.50.2 on CPU): the weight state, the
activation quantizer and every call without outlier columns are bit-identical. With outlier
columns the outlier addmm is torch's CPU fp16 addmm, whose summation order depends on the host
(on CPUs with AVX-512 FP16 torch hands it to oneDNN; with oneDNN off it takes ATen's own
kernels, another order) and is not reproduced: a float32 sum in column order onto the int8 part
is within one fp16 step of it (two with hundreds of outlier columns), usually equal.

Pitfalls reproduced from the library, not fixed: the bitsandbytes default threshold is 0.0
(no decomposition) where transformers' BitsAndBytesConfig passes 6.0; in training mode
bitsandbytes on CPU skips all of this (MatMul8bitFp); the CPU int32 product is exact only where
torch._int_mm is used (AVX-512), elsewhere it is an fp32 matmul, inexact past 2^24.
"""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError, UnsupportedError
from ..quant.intgroup import round_to

F32 = np.float32
DEQUANT_CONST = {"cpu": F32(6.200124e-05), "cuda": F32(6.200012e-05)}
INV_127 = F32(7.874015718698502e-3)
DEFAULT_THRESHOLD = 6.0          # transformers' llm_int8_threshold (bitsandbytes' own default: 0.0)


def round_f16(x) -> np.ndarray:
    """float32 values rounded to fp16 (nearest even), as float32: the project's fp16 rounding."""
    return round_to(np.asarray(x, F32), "f16")


def _row_codes(A: np.ndarray, absmax: np.ndarray) -> np.ndarray:
    """rint(A * (127.0 / absmax)) as torch computes it: reciprocal, times 127, times A, each a
    float32 rounding; an all-zero row (absmax 0) gives codes 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = (F32(1.0) / absmax.astype(F32)).astype(F32) * F32(127.0)
        q = np.rint((A.astype(F32) * factor[:, None]).astype(F32))
    return np.where(np.isfinite(q), q, 0).astype(np.int8)


def quantize_weight(W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W float[N, K] -> (CB int8[N, K], SCB float32[N]): Int8Params._quantize."""
    W = np.asarray(W)
    if W.ndim != 2:
        raise ShapeError(f"LLM.int8() quantizes a 2-D weight [out_features, in_features], got shape {W.shape}")
    W16 = round_f16(W)
    SCB = np.abs(W16).max(axis=1).astype(F32) if W.shape[1] else np.zeros(W.shape[0], F32)
    return _row_codes(W16, SCB), SCB


def dequantize_weight(CB: np.ndarray, SCB: np.ndarray) -> np.ndarray:
    """int8_vectorwise_dequant: CB * SCB[n] * 7.874015718698502e-3, float32[N, K]."""
    return (CB.astype(F32) * SCB.astype(F32)[:, None]).astype(F32) * INV_127


def quantize_activations(A16: np.ndarray, threshold: float):
    """int8_vectorwise_quant(A, threshold) for fp16-valued A float32[T, K]
    -> (CA int8[T, K], SCA float32[T], outlier_cols int64[c])."""
    A = np.asarray(A16, F32)
    cols = np.zeros(0, np.int64)
    outliers = None
    if threshold > 0.0:
        outliers = np.abs(A) >= round_f16(threshold)
        cols = np.flatnonzero(outliers.any(axis=0)).astype(np.int64)
        A = np.where(outliers, F32(0), A)
    SCA = np.abs(A).max(axis=1).astype(F32) if A.shape[1] else np.zeros(A.shape[0], F32)
    CA = _row_codes(A, SCA)
    if A.shape[0] > 1 and len(cols):
        CA[:, cols] = 0
    return CA, SCA, cols


def int8_matmul(x: np.ndarray, CB: np.ndarray, SCB: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                bias: np.ndarray | None = None, dequant: str = "cpu") -> np.ndarray:
    """One bitsandbytes call: x float[T, K] -> y float32[T, N] holding fp16 values, every row of x
    sharing the outlier columns (outlier_scope "call")."""
    if dequant not in DEQUANT_CONST:
        raise UnsupportedError(f"LLM.int8() dequantization constant {dequant!r}: choose cpu or cuda")
    x = np.atleast_2d(np.asarray(x, F32))
    N, K = CB.shape
    if x.shape[1] != K or SCB.shape != (N,):
        raise ShapeError(f"LLM.int8() matmul: x {x.shape}, CB {CB.shape}, SCB {SCB.shape} do not agree")
    A = round_f16(x)
    CA, SCA, cols = quantize_activations(A, threshold)
    acc = CA.astype(np.int64) @ CB.astype(np.int64).T                  # int32 in bitsandbytes; exact
    y = (acc.astype(F32) * (SCA[:, None] * SCB[None, :]).astype(F32)).astype(F32) * DEQUANT_CONST[dequant]
    if bias is not None:
        y = (y + np.asarray(bias, F32)[None, :]).astype(F32)
    y = round_f16(y)
    if len(cols):
        # fp16 addmm on CPU: float32 products of fp16 values (exact), summed in float32 onto C, one
        # rounding to fp16 at the end
        subB = round_f16(dequantize_weight(CB[:, cols], SCB))           # [N, c]
        sub = A[:, cols]
        acc_o = y.astype(F32)
        for j in range(len(cols)):
            acc_o = (acc_o + (sub[:, j:j + 1] * subB[None, :, j][0]).astype(F32)).astype(F32)
        y = round_f16(acc_o)
    return y


def int8_matmul_segments(x: np.ndarray, CB: np.ndarray, SCB: np.ndarray, seg_starts,
                         threshold: float = DEFAULT_THRESHOLD, bias=None, dequant: str = "cpu") -> np.ndarray:
    """The engine's rule: each segment [seg_starts[i], seg_starts[i+1]) of the stacked rows is its
    own bitsandbytes call, so its outlier columns come from its own rows."""
    out = np.empty((x.shape[0], CB.shape[0]), F32)
    s = [int(v) for v in seg_starts]
    for a, b in zip(s[:-1], s[1:]):
        if b > a:
            out[a:b] = int8_matmul(x[a:b], CB, SCB, threshold, bias, dequant)
    return out
