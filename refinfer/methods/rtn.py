"""Round-to-nearest, group-wise, in the three producers' conventions.

W is one Linear's weight, float32[N, K] (rows = out_features). A group is gs consecutive input
columns of one row (gs = -1: the whole row). codes are unsigned 0..maxq, maxq = 2^bits - 1, and
the dequantized weight is s * (q - z). torch.round is round-half-even, as np.rint.

GPTQ (AutoGPTQ 0.7.1 quantization/quantizer.py Quantizer.find_params(x, weight=True), quantize):
    xmin = min(min x, 0), xmax = max(max x, 0)          # the range always includes 0
    sym:  xmax = max(|xmin|, xmax); xmin = -xmax if xmin < 0
    xmin = -1, xmax = +1 where both are 0
    s = (xmax - xmin) / maxq ; z = (maxq + 1) / 2 (sym) | round(-xmin / s) (asym)
    q = clamp(round(x / s) + z, 0, maxq)
  sym: absmax/s = maxq/2 (7.5 at 4 bits) rounds to 8 -> q = 16 -> clamps to 15, so the positive
  extreme saturates at 7 s.

AWQ (AutoAWQ 0.2.9 quantize/quantizer.py AwqQuantizer.pseudo_quantize_tensor):
    zero_point=True:  s = clamp(max - min, 1e-5) / maxq ; z = clamp(-round(min / s), 0, maxq)
                      (max, min of the group itself: 0 is NOT forced into the range)
    zero_point=False: s = clamp(absmax, 1e-5) / (2^(bits-1) - 1) ; q = clamp(round(x/s), -2^(bits-1),
                      2^(bits-1)-1), stored here as q + 2^(bits-1) with z = 2^(bits-1)
    q = clamp(round(x / s) + z, 0, maxq)
  AutoAWQ's _apply_quant casts the layer to fp16 first, so at export all of this is fp16
  arithmetic (dtype=np.float16 here: NumPy's float16 ops, like torch's on CPU, compute in float32
  and round each result to fp16).

compressed-tensors 0.20 (quantization/utils/helpers.py calculate_qparams; lifecycle/forward.py
_quantize), signed codes in [qmin, qmax] = [-2^(bits-1), 2^(bits-1) - 1]:
    min = min(min x, 0), max = max(max x, 0)
    sym:  s = max(|min|, |max|) / ((qmax - qmin) / 2) ; zp = 0        (int4: absmax / 7.5)
    asym: s = (max - min) / (qmax - qmin) ; zp = round(clamp(qmin - min / s, qmin, qmax))
    s = eps(dtype) where s == 0
    q = round(clamp(x / s + zp, qmin, qmax))            # clamp BEFORE round
  stored unsigned: code = q + 2^(bits-1), zero = zp + 2^(bits-1).

Scales as stored: AutoGPTQ's QuantLinear.pack keeps `scales.to(linear.weight.dtype)` (fp16 for
an fp16 model) and re-derives every code as `round((W + z*s) / s_fp16)` without a clamp
(nn_modules/qlinear/qlinear_cuda_old.py QuantLinear.pack); AutoAWQ's WQLinear_GEMM.from_linear
does the same with `scales.half()` (modules/linear/gemm.py). With |q - z| <= maxq <= 255 and
|s/s_fp16 - 1| <= 2^-11 the re-derived code is the code chosen here (the error is below 1/8 of a
step), so the IntGroupTensor holds these codes with the fp16 scales (tests/test_methods_rtn.py
checks the re-derivation).
"""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError
from ..quant._common import f32_to_fp16_bits, fp16_to_f32
from ..quant.intgroup import IntGroupTensor, from_weights


def _groups(W: np.ndarray, group_size: int) -> tuple[np.ndarray, int]:
    """W[N, K] as [N, G, gs]; K must be a multiple of gs."""
    N, K = W.shape
    gs = K if group_size in (-1, None) else int(group_size)
    if K % gs:
        raise ShapeError(f"in_features {K} is not a multiple of the group size {gs}",
                         hint="choose a --group-size that divides every Linear's in_features, or -1 (one group per row)")
    return W.reshape(N, K // gs, gs), gs


def fp16_scales(s: np.ndarray) -> np.ndarray:
    """The scales as a checkpoint stores them: fp16 values, held as float32."""
    return fp16_to_f32(f32_to_fp16_bits(np.asarray(s, np.float32)))


# -- GPTQ's convention --------------------------------------------------------------------------

def gptq_find_params(x: np.ndarray, bits: int, sym: bool) -> tuple[np.ndarray, np.ndarray]:
    """Quantizer.find_params(x, weight=True) with perchannel=True: one (scale, zero) per row of
    x[N, n], float32[N] each (zero is an integer-valued float, as in AutoGPTQ)."""
    x = np.asarray(x, np.float32)
    maxq = np.float32(2 ** bits - 1)
    zero0 = np.zeros(x.shape[0], np.float32)
    xmin = np.minimum(x.min(axis=1), zero0)
    xmax = np.maximum(x.max(axis=1), zero0)
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
    both0 = (xmin == 0) & (xmax == 0)
    xmin = np.where(both0, np.float32(-1), xmin)
    xmax = np.where(both0, np.float32(1), xmax)
    scale = ((xmax - xmin) / maxq).astype(np.float32)
    if sym:
        zero = np.full_like(scale, (maxq + 1) / 2)
    else:
        zero = np.rint(-xmin / scale).astype(np.float32)
    return scale, zero


def gptq_codes(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """quantize()'s integer step: clamp(round(x / s) + z, 0, maxq), x[N, ...], s/z[N, 1...]."""
    return np.minimum(np.maximum(np.rint(x / scale) + zero, 0), 2 ** bits - 1)     # np.clip: 4x slower


def gptq_rtn(W: np.ndarray, bits: int = 4, group_size: int = 128, sym: bool = True, name: str = "weight"
             ) -> IntGroupTensor:
    """RTN with find_params per group of W (what GPTQ's fasterquant does with an identity Hessian
    and no error feedback)."""
    Wg, gs = _groups(np.asarray(W, np.float32), group_size)
    N, G, _ = Wg.shape
    s, z = gptq_find_params(Wg.reshape(N * G, gs), bits, sym)
    codes = gptq_codes(Wg, s.reshape(N, G, 1), z.reshape(N, G, 1), bits).reshape(N, G * gs)
    return from_weights(name, codes, fp16_scales(s.reshape(N, G)), z.reshape(N, G), bits=bits, group_size=gs,
                        info=dict(method="rtn", convention="gptq", group_size=group_size, sym=sym, act_order=False))


# -- AWQ's convention ---------------------------------------------------------------------------

def awq_pseudo_quantize(w: np.ndarray, bits: int = 4, group_size: int = 128, zero_point: bool = True,
                        dtype=np.float16):
    """AwqQuantizer.pseudo_quantize_tensor(w) computed in dtype (fp16 as at export, float32 in the
    search when the model is float32). -> (w_q [N, K], scales [N, G], zeros [N, G] or None,
    codes uint8 [N, K] unsigned)."""
    w = np.asarray(w, dtype)
    N, K = w.shape
    wg, gs = _groups(w, group_size)
    wg = wg.reshape(-1, gs)
    one = dtype(1)
    if zero_point:
        max_int, min_int = dtype(2 ** bits - 1), dtype(0)
        max_val = wg.max(axis=1, keepdims=True)
        min_val = wg.min(axis=1, keepdims=True)
        scales = np.maximum(max_val - min_val, dtype(1e-5)) / max_int
        zeros = np.clip(-np.rint(min_val / scales), min_int, max_int)
        q = np.clip(np.rint(wg / scales) + zeros, min_int, max_int)
        wq = (q - zeros) * scales
        codes = q
        zeros_out = zeros.reshape(N, -1)
    else:
        max_int, min_int = dtype(2 ** (bits - 1) - 1), dtype(-(2 ** (bits - 1)))
        max_val = np.maximum(np.abs(wg).max(axis=1, keepdims=True), dtype(1e-5))
        scales = max_val / max_int
        q = np.clip(np.rint(wg / scales), min_int, max_int)
        wq = q * scales
        codes = q + dtype(2 ** (bits - 1)) * one
        zeros_out = None
    return (wq.reshape(N, K).astype(dtype), scales.reshape(N, -1).astype(dtype), zeros_out,
            codes.reshape(N, K).astype(np.uint8))


def awq_rtn(W: np.ndarray, bits: int = 4, group_size: int = 128, zero_point: bool = True, dtype=np.float16,
            name: str = "weight") -> IntGroupTensor:
    _, scales, zeros, codes = awq_pseudo_quantize(W, bits, group_size, zero_point, dtype)
    if zeros is None:
        zeros = np.full(scales.shape, 2 ** (bits - 1))
    gs = W.shape[1] if group_size in (-1, None) else group_size
    return from_weights(name, codes, fp16_scales(scales.astype(np.float32)), zeros, bits=bits, group_size=gs,
                        info=dict(method="rtn", convention="awq", group_size=group_size, sym=not zero_point,
                                  act_order=False))


# -- compressed-tensors' convention -------------------------------------------------------------

def ct_qparams(min_vals: np.ndarray, max_vals: np.ndarray, bits: int, sym: bool, dtype=np.float32):
    """calculate_qparams(min_vals, max_vals, args) for int `bits`: (scales in dtype, signed zero
    points as int8-valued integers)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    min_vals = np.minimum(np.asarray(min_vals, dtype), dtype(0))
    max_vals = np.maximum(np.asarray(max_vals, dtype), dtype(0))
    bit_range = dtype(qmax - qmin)
    if sym:
        scales = np.maximum(np.abs(min_vals), np.abs(max_vals)) / (bit_range / dtype(2))
        zp = np.zeros(scales.shape, dtype)
    else:
        scales = (max_vals - min_vals) / bit_range
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.clip(dtype(qmin) - min_vals / scales, qmin, qmax)
    scales = np.where(scales == 0, np.finfo(dtype).eps, scales).astype(dtype)
    zp = np.rint(np.clip(np.nan_to_num(zp, nan=0.0), -128, 127))      # to zp_dtype int8
    return scales, zp.astype(np.int32)


def ct_codes(x: np.ndarray, scales: np.ndarray, zp: np.ndarray, bits: int, dtype=np.float32) -> np.ndarray:
    """compressed-tensors _quantize: signed q = round(clamp(x / s + zp, qmin, qmax))."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scaled = np.asarray(x, dtype) / scales + zp.astype(dtype)
    return np.rint(np.clip(scaled, qmin, qmax)).astype(np.int32)


def ct_rtn(W: np.ndarray, bits: int = 4, group_size: int = 128, sym: bool = True, dtype=np.float32,
           name: str = "weight") -> IntGroupTensor:
    """The static min-max observer's qparams per group (strategy "group"; group_size -1 is the
    "channel" strategy), then _quantize."""
    Wg, gs = _groups(np.asarray(W, dtype), group_size)
    N, G, _ = Wg.shape
    s, zp = ct_qparams(Wg.min(axis=2), Wg.max(axis=2), bits, sym, dtype)   # [N, G]
    q = ct_codes(Wg, s[:, :, None], zp[:, :, None], bits, dtype).reshape(N, G * gs)
    half = 2 ** (bits - 1)
    rounding = {np.float32: "f32", np.float16: "f16"}.get(np.dtype(dtype).type, "f32")
    return from_weights(name, q + half, s.astype(np.float32), zp + half, bits=bits, group_size=gs, rounding=rounding,
                        info=dict(method="rtn", convention="compressed-tensors", group_size=group_size, sym=sym,
                                  act_order=False))
