"""AWQ, as AutoAWQ 0.2.9 runs it (quantize/quantizer.py AwqQuantizer: _search_best_scale,
_compute_best_scale, _compute_best_clip; quantize/scale.py apply_scale, apply_clip).

Per decoder layer, with X the inputs each Linear saw in the UNQUANTIZED layer (the next layer's
inputs are that layer's unquantized output, too):

1. Scale search, per group of Linears that share an input (Llama: input_layernorm -> [q, k, v]
   inspected through the attention output; v_proj -> [o_proj] only when their shapes are equal
   (no GQA); post_attention_layernorm -> [gate, up] through the MLP output; up_proj -> [down]):
       w_mean = mean over rows of |W_cat| / (absmax of its group + 1e-6)     # [K]
       x_mean = mean over tokens of |x|                                        # [K], float32 sum
       for r in 0, 0.05, ..., 0.95:
           s = clamp(x_mean^r / (w_mean^(1-r) + 1e-4), 1e-4)     (duo_scaling; else x_mean^r)
           s = s / sqrt(max s * min s);  inf, nan -> 1
           W' = pseudo_quantize(W * s) / s  for each Linear of the group
           loss = mean((block(X; W') - block(X; W))^2)
       keep the first r with the least loss
2. apply_scale: the previous op's output rows (norm weight, or fc rows) / s, the group's
   columns * s, and the group's cached inputs / s (for the clip search).
3. Clip search, each Linear except q/k (names containing q_, k_): per output row and group,
       max_val = absmax * (1 - i/20), i = 0..9; W clamped to +-max_val, pseudo-quantized;
       err = mean over <= 512 tokens (every max(1, n // 512)-th) of (sum_group x w_q - sum_group x w)^2
   keep the first i with the least err (strictly smaller); apply_clip clamps W.
4. _apply_quant: the layer in fp16, pseudo_quantize_tensor -> codes, zeros, fp16 scales.

All searches run in the model's dtype (here float32: refinfer's float weights); step 4 is fp16,
as AutoAWQ's _apply_quant casts the Linear to .half() first.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..quant.intgroup import IntGroupTensor, from_weights
from .rtn import awq_pseudo_quantize, fp16_scales

N_GRID = 20


def weight_mean(weights: list[np.ndarray], group_size: int) -> np.ndarray:
    """w_mean: the per-input-channel mean of |W| relative to its group's absmax. -> float32[K]"""
    W = np.concatenate(weights, axis=0).astype(np.float32)
    shape = W.shape
    g = np.abs(W.reshape(-1, group_size))
    w_scale = (g / (g.max(axis=1, keepdims=True) + np.float32(1e-6))).reshape(shape)
    return w_scale.mean(axis=0, dtype=np.float32)


def input_mean(x: np.ndarray) -> np.ndarray:
    """x_mean = sum_tokens |x| / n in float32. -> float32[K]"""
    flat = np.abs(np.asarray(x, np.float32).reshape(-1, x.shape[-1]))
    return (flat.sum(axis=0, dtype=np.float32) / np.float32(flat.shape[0])).astype(np.float32)


def ratio_scales(x_mean: np.ndarray, w_mean: np.ndarray, ratio: float, duo_scaling: bool = True) -> np.ndarray:
    r = np.float32(ratio)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if duo_scaling:
            s = np.maximum(np.power(x_mean, r) / (np.power(w_mean, np.float32(1 - ratio)) + np.float32(1e-4)),
                           np.float32(1e-4))
        else:
            s = np.maximum(np.power(x_mean, r), np.float32(1e-4))
        s = s / np.sqrt(s.max() * s.min())
    s[~np.isfinite(s)] = 1
    return s.astype(np.float32)


@dataclasses.dataclass
class ScaleSearch:
    ratio: float
    scales: np.ndarray          # float32[K]
    losses: list                # loss per grid point, in grid order


def search_best_scale(x: np.ndarray, weights: list[np.ndarray], block, *, bits: int = 4, group_size: int = 128,
                      zero_point: bool = True, duo_scaling: bool = True) -> ScaleSearch:
    """_search_best_scale + _compute_best_scale. block(ws) -> the inspected module's output with the
    group's weights replaced by ws (float32 arrays); x: the group's input [tokens, K]."""
    w_mean = weight_mean(weights, group_size)
    x_mean = input_mean(x)
    ref = np.asarray(block(weights), np.float32)
    best, best_ratio, best_scales, losses = float("inf"), -1.0, None, []
    for i in range(N_GRID):
        ratio = i / N_GRID
        s = ratio_scales(x_mean, w_mean, ratio, duo_scaling)
        ws = [awq_pseudo_quantize(W * s, bits, group_size, zero_point, np.float32)[0] / s for W in weights]
        out = np.asarray(block(ws), np.float32)
        loss = float(np.square(ref - out, dtype=np.float32).sum(dtype=np.float32)) / ref.size
        losses.append(loss)
        if loss < best:
            best, best_ratio, best_scales = loss, ratio, s
    return ScaleSearch(best_ratio, best_scales, losses)


@dataclasses.dataclass
class ClipSearch:
    max_val: np.ndarray         # float32[N, G]   the chosen clip per row and group
    step: np.ndarray            # int[N, G]       its shrink step i (max_val = absmax * (1 - i/20))
    errors: np.ndarray          # float32[10, N, G]


def compute_best_clip(W: np.ndarray, x: np.ndarray, *, bits: int = 4, group_size: int = 128, zero_point: bool = True,
                      n_grid: int = 20, max_shrink: float = 0.5, n_sample_token: int = 512,
                      row_batch: int = 64) -> ClipSearch:
    """_compute_best_clip(w, input_feat). Rows are independent, so they run in batches of row_batch
    (AutoAWQ: 256 or 64, for memory)."""
    W = np.asarray(W, np.float32)
    N, K = W.shape
    gs = K if group_size <= 0 else group_size
    feat = np.asarray(x, np.float32).reshape(-1, K)
    feat = feat[::max(1, feat.shape[0] // n_sample_token)]
    f = feat.reshape(1, feat.shape[0], K // gs, gs)                     # [1, T, G, gs]
    steps = int(max_shrink * n_grid)
    max_all = np.empty((N, K // gs), np.float32)
    step_all = np.empty((N, K // gs), np.int64)
    err_all = np.empty((steps, N, K // gs), np.float32)
    for b0 in range(0, N, row_batch):
        w = W[b0:b0 + row_batch].reshape(-1, 1, K // gs, gs)           # [n, 1, G, gs]
        org_max = np.abs(w).max(axis=-1, keepdims=True)               # [n, 1, G, 1]
        best_max = org_max.copy()
        min_err = np.full(org_max.shape, 1e9, np.float32)
        org_out = (f * w).sum(axis=-1)                                # [n, T, G]
        for i_s in range(steps):
            max_val = org_max * np.float32(1 - i_s / n_grid)
            cur = np.minimum(np.maximum(w, -max_val), max_val)
            q = awq_pseudo_quantize(cur.reshape(-1, K), bits, group_size, zero_point, np.float32)[0]
            cur_out = (f * q.reshape(w.shape)).sum(axis=-1)
            err = np.square(cur_out - org_out).mean(axis=1).reshape(min_err.shape)
            err_all[i_s, b0:b0 + row_batch] = err[:, 0, :, 0]
            better = err < min_err
            min_err[better] = err[better]
            best_max[better] = max_val[better]
        max_all[b0:b0 + row_batch] = best_max[:, 0, :, 0]
    step_all[:] = np.argmin(err_all, axis=0)
    return ClipSearch(max_all, step_all, err_all)


def apply_clip(W: np.ndarray, max_val: np.ndarray) -> np.ndarray:
    """apply_clip: W clamped to +-max_val per (row, group)."""
    N, K = W.shape
    G = max_val.shape[1]
    m = max_val[:, :, None]
    return np.minimum(np.maximum(W.reshape(N, G, -1), -m), m).reshape(N, K)


def quantize_weight(W: np.ndarray, *, bits: int = 4, group_size: int = 128, zero_point: bool = True,
                    name: str = "weight") -> IntGroupTensor:
    """_apply_quant: the (scaled, clipped) weight in fp16, pseudo_quantize_tensor in fp16."""
    w16 = np.asarray(W, np.float32).astype(np.float16)
    _, scales, zeros, codes = awq_pseudo_quantize(w16, bits, group_size, zero_point, np.float16)
    if zeros is None:
        zeros = np.full(scales.shape, 2 ** (bits - 1))
    return from_weights(name, codes, fp16_scales(scales.astype(np.float32)), zeros, bits=bits,
                        group_size=group_size,
                        info=dict(method="awq", group_size=group_size, sym=not zero_point, act_order=False))


__all__ = ["weight_mean", "input_mean", "ratio_scales", "search_best_scale", "compute_best_clip", "apply_clip",
           "quantize_weight", "ScaleSearch", "ClipSearch"]
