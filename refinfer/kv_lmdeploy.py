"""LMDeploy's KV-cache quantizers as cache types, and the old offline calibrated int8.

Sources (InternLM/lmdeploy; paths in the repository):
  TurboMind, quant_policy 8 / 4 (online, per token and per KV head, asymmetric):
    src/turbomind/kernels/attention/kv_cache_utils_v2.cu  ProcessKV_v2: K after bias and RoPE,
        V after bias; warp_stats -> params, ConvertKvCache<T, Tkv> -> codes
    src/turbomind/kernels/attention/quantization.h  warp_minmax / warp_stats / quant / round
        (cvt.rni.sat) / ConvertKvCache (quantize and dequantize) / pack (the int4 nibble order)
    src/turbomind/kernels/attention/impl_81616.h  the sm80 attention dequantizes with __hfma
  PyTorch engine (quant_policy 8 / 4):
    lmdeploy/pytorch/kernels/cuda/fill_kv_cache.py  _quant_int8 / _quant_int4
    lmdeploy/pytorch/kernels/cuda/pagedattention.py  k = ((k - kz) * ks).to(q.dtype)
  Old offline kv_qparams (v0.2.0 .. removed in eb04b4281, 2025-12-11):
    lmdeploy/lite/apis/kv_qparams.py _export_asym (at eb04b4281^): zp = (max+min)/2, scale = (max-min)/255
    src/turbomind/kernels/decoder_masked_multihead_attention/decoder_masked_multihead_attention_template.cuh
        (v0.2.0) quant: int8 = round(max(-128.f, min(127.f, (a - zp) / scale))); dequant a * scale + zp

TurboMind (lmdeploy-int8 / lmdeploy-int4), with T the activation dtype (fp16 here):
    mn, mx = min, max over the row, in T (__hmin / __hmax)
    scale  = T((float(mx) - float(mn)) * fdividef(1, 2^bits - 1))        zero = T(mn)
    inv    = T(fdividef(1, float(scale)))
    q      = cvt.rni.sat.u8(T(T(x - zero) * inv))     round half even, saturate to 0..255, NaN -> 0
             int4: min(q, 15)
    x'     = fma(T(q), scale, zero) in T    (__hfma in impl_81616.h; the SIMT path's q * s + z is
             mul.f16 + add.f16 without .rn, which ptxas contracts under --fmad=true)
  A constant row has scale 0: inv = inf, (x - zero) * inf = 0 * inf = NaN -> code 0, and every
  element loads as zero = mn exactly. A scale below 1/65504 makes inv overflow to inf in fp16:
  every element above mn saturates to the top code and loads as mn + qmax * scale.
  int4 packs 8 codes into one little-endian 32-bit word, nibble k (bits 4k..4k+3) holding
  element ORDER[k] = (0, 2, 4, 6, 1, 3, 5, 7) of the group (pack(): `ui |= ui >> 12` then
  __byte_perm(ui0, ui1, 0x5140)); bytes: q0|q2<<4, q4|q6<<4, q1|q3<<4, q5|q7<<4.
  Ideal mode: the same formula in float32 (x, mn, mx, inv, x - zero and the product float32;
  scale and zero still kept as fp16; the load q * scale + zero rounded once to float32).
  Exact mode (CacheType.exact, used in ggml mode): every half operation rounded to fp16, the
  activations first. fdividef(1, s) under --use_fast_math is an approximate reciprocal; its
  fp16 rounding equals that of the correctly rounded 1/s for every positive fp16 s as long as
  its error is at most one float32 ulp (checked exhaustively in the tests), so 1/s is used.

PyTorch engine (lmdeploy-pt-int8 / lmdeploy-pt-int4):
    s = (mx - mn) / 255 (15)      zeros = -mn / s       (zeros in code units, not values)
    q = uint8(x / s + zeros + 0.5)                     half up, by truncation
    x' = (q - zeros) * s
  int8 computes in the cache dtype (fp16); int4 in float32 (val.to(tl.float32)), its scale and
  zeros rounded to fp16 only when stored, and the byte of dim d is q[d] + 16 * q[d + hd/2]
  (uint8 arithmetic). Both store s and zeros as fp16 and dequantize in fp16.
  A constant row divides by a zero scale (zeros = -mn/0): the kernel stores codes from inf or
  NaN and every element loads as NaN; refinfer reproduces the NaN (codes 0). A uint8 conversion
  of a value outside 0..255 is undefined in the kernel (LLVM fptoui): refinfer saturates.
  Ideal mode: float32 arithmetic (as int4's kernel), s and zeros kept as fp16, the load rounded
  once to float32. Exact mode: int8 in fp16 throughout, int4 float32 on fp16 activations; the
  load in fp16 for both.

int8-calibrated (LMDeploy v0.2.0's offline kv_qparams, asymmetric 8 bit):
    zp = (min + max) / 2     scale = (max - min) / 255      per layer, K and V separately
    q  = round(clamp((x - zp) / scale, -128, 127))         CUDA round(): half away from zero;
                                                            fminf(127, NaN) = 127
    x' = q * scale + zp                                     rounded once to float32 (fma)
  The parameters live in a parameter file (python -m refinfer calibrate-kv), not in the rows.
  Per-head parameters (one zp, scale per layer and KV head) are a refinfer extension: LMDeploy
  wrote one pair per layer (and tensor-parallel shard). v0.2.0 was built with --use_fast_math,
  so its division was approximate; refinfer divides in IEEE float32. Exact mode rounds the
  activations to fp16 first (v0.2.0 quantized half activations), the rest as ideal.

Row layouts (one position of one KV head; refinfer keeps a row's parameters after its codes,
where TurboMind keeps them in a separate region of the block: the bytes per token are equal):
    lmdeploy-int8       codes u8[hd]            | scale f16 | zero f16        hd + 2 + 2
    lmdeploy-int4       codes u4[hd] (ORDER)    | scale f16 | zero f16        hd/2 + 2 + 2
    lmdeploy-pt-int8    codes u8[hd]            | scale f16 | zeros f16       hd + 2 + 2
    lmdeploy-pt-int4    q[d] + 16 q[d + hd/2]   | scale f16 | zeros f16       hd/2 + 2 + 2
    int8-calibrated     codes i8[hd]                                          hd
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np

from .errors import RefinferError, ShapeError
from .kv_cache import CacheType, register_cache_type, register_parametric_type

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # TurboMind int4: nibble k of a 32-bit word holds element ORDER[k]
PARAMS_FORMAT = "refinfer-kv-params"
PARAMS_VERSION = 1
F16, F32, F64 = np.float16, np.float32, np.float64


# ---- shared pieces ------------------------------------------------------------------------------
def _code_bytes(name, hd, bits, multiple):
    if hd % multiple:
        why = ("its nibbles are packed in groups of 8 (TurboMind's pack)" if multiple == 8
               else "it packs dim d with dim d + head_dim/2 into one byte")
        raise ShapeError(f"KV cache type {name}: head_dim {hd} is not a multiple of {multiple}: {why}",
                         hint=f"use lmdeploy-int8, lmdeploy-pt-int8 or f16 for head_dim {hd}")
    return hd * bits // 8


def _put_params(dst, nc, scale, zero):
    """scale, zero float16[...] -> bytes nc .. nc + 3 of each row."""
    dst[..., nc:nc + 4] = np.stack([scale, zero], -1).astype("<f2").view(np.uint8)


def _get_params(src, nc):
    p = np.ascontiguousarray(src[..., nc:nc + 4]).view("<f2")
    return p[..., 0], p[..., 1]                     # float16[...], float16[...]


def _cvt_rni_sat_u8(v):
    """cvt.rni.sat.u8: round half to even, saturate to 0..255, NaN -> 0."""
    with np.errstate(invalid="ignore"):
        q = np.clip(np.rint(v), 0, 255)
    return np.where(np.isnan(v), 0, q).astype(np.uint8)


def _trunc_sat_u8(v):
    """.to(tl.uint8) of the half-up value: truncation; outside 0..255 (undefined there) saturated, NaN -> 0."""
    with np.errstate(invalid="ignore"):
        q = np.clip(np.trunc(v), 0, 255)
    return np.where(np.isnan(v), 0, q).astype(np.uint8)


def _pack_tm_int4(q):
    """uint8[..., hd] codes 0..15 -> uint8[..., hd/2] in TurboMind's order."""
    g = q.reshape(q.shape[:-1] + (-1, 8)).astype(np.uint32)
    word = np.zeros(g.shape[:-1], np.uint32)
    for k, e in enumerate(ORDER):
        word |= g[..., e] << np.uint32(4 * k)
    return word.astype("<u4").view(np.uint8).reshape(q.shape[:-1] + (-1,))


def _unpack_tm_int4(b):
    word = np.ascontiguousarray(b).view("<u4")
    q = np.zeros(word.shape + (8,), np.uint8)
    for k, e in enumerate(ORDER):
        q[..., e] = (word >> np.uint32(4 * k)) & 0xF
    return q.reshape(b.shape[:-1] + (-1,))


def _pack_pt_int4(q):
    h = q.shape[-1] // 2
    return ((q[..., :h].astype(np.uint16) + q[..., h:].astype(np.uint16) * 16) & 0xFF).astype(np.uint8)


def _unpack_pt_int4(b):
    return np.concatenate([b & 0xF, b >> 4], axis=-1)


# ---- TurboMind ----------------------------------------------------------------------------------
def _tm_quantize(x, bits, exact):
    """x float32[..., hd] -> (codes uint8[..., hd], scale f16[...], zero f16[...])."""
    qmax = (1 << bits) - 1
    inv_q_max = F32(1) / F32(qmax)                    # fdividef(1.f, float((1 << n_bits) - 1))
    x = np.asarray(x, F32)
    xt = x.astype(F16) if exact else x                # the activations in T
    mn, mx = xt.min(-1), xt.max(-1)
    scale = ((mx.astype(F32) - mn.astype(F32)) * inv_q_max).astype(F16)
    zero = mn.astype(F16)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = F32(1) / scale.astype(F32)
        if exact:
            v = (xt - zero[..., None]) * inv.astype(F16)[..., None]        # two fp16 operations
        else:
            v = (x - zero.astype(F32)[..., None]) * inv[..., None]
    q = _cvt_rni_sat_u8(v)
    return (np.minimum(q, qmax) if bits < 8 else q), scale, zero


def _fma_load(q, scale, zero, exact):
    """q * scale + zero, rounded once (float64 holds the exact value: q < 256, fp16 scale and zero)."""
    v = q.astype(F64) * scale.astype(F64)[..., None] + zero.astype(F64)[..., None]
    return v.astype(F16).astype(F32) if exact else v.astype(F32)


def _coded_row_type(name, row_bytes, quantize, dequantize, pack, unpack, doc) -> CacheType:
    """A row of codes (pack / unpack: the codes' bytes) followed by two fp16 parameters (scale,
    zero), the layout both LMDeploy engines' rows share here: quantize(rows) -> (codes, scale,
    zero), dequantize(codes, scale, zero) -> float32 values. The callers pass functions that look
    their helpers up when called, so that a test may patch one."""
    def store(dst, rows):
        q, scale, zero = quantize(rows)
        nc = dst.shape[-1] - 4
        dst[..., :nc] = pack(q)
        _put_params(dst, nc, scale, zero)

    def codes_params(src):
        nc = src.shape[-1] - 4
        return (unpack(np.ascontiguousarray(src[..., :nc])), *_get_params(src, nc))

    def load(src):
        return dequantize(*codes_params(src))

    def parts(src):
        q, scale, zero = codes_params(src)
        return {"codes": q.astype(np.int32), "scale": scale.astype(F32)[..., None], "zero": zero.astype(F32)[..., None]}

    return CacheType(name, row_bytes, store, load, doc, kind="lmdeploy", parts=parts)


def _same(q):
    return q


def _turbomind_type(bits, exact):                     # w = codes * scale + zero
    name = f"lmdeploy-int{bits}"
    nc_of = (lambda hd: _code_bytes(name, hd, 8, 1)) if bits == 8 else (lambda hd: _code_bytes(name, hd, 4, 8))
    how = "fp16 arithmetic emulated (ggml mode)" if exact else "TurboMind's formula in float32"
    doc = (f"LMDeploy TurboMind quant_policy {bits}: per token and head, asymmetric, scale and zero fp16, "
           f"half-even codes{'' if bits == 8 else ' in its nibble order'}; {how}")
    return _coded_row_type(name, lambda hd: nc_of(hd) + 2 + 2, lambda x: _tm_quantize(x, bits, exact),
                           lambda q, scale, zero: _fma_load(q, scale, zero, exact),
                           _same if bits == 8 else lambda q: _pack_tm_int4(q),
                           _same if bits == 8 else lambda b: _unpack_tm_int4(b), doc)


# ---- PyTorch engine -----------------------------------------------------------------------------
def _pt_quantize(x, bits, exact):
    qmax = (1 << bits) - 1
    x = np.asarray(x, F32)
    fp16_math = exact and bits == 8                   # _quant_int8 works in the cache dtype, _quant_int4 in float32
    xt = x.astype(F16) if fp16_math else (x.astype(F16).astype(F32) if exact else x)
    T = F16 if fp16_math else F32
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        mn, mx = xt.min(-1), xt.max(-1)
        s = (mx - mn) / T(qmax)
        zeros = -mn / s
        v = xt / s[..., None] + zeros[..., None] + T(0.5)
    return _trunc_sat_u8(v), s.astype(F16), zeros.astype(F16)


def _pt_load(q, s, zeros, exact):
    with np.errstate(over="ignore", invalid="ignore"):
        if exact:                                    # (k - kz) * ks with fp16 kz, ks: fp16 arithmetic
            return ((q.astype(F16) - zeros[..., None]) * s[..., None]).astype(F32)
        # float64 holds (q - zeros) * s exactly: one rounding to float32
        return ((q.astype(F64) - zeros.astype(F64)[..., None]) * s.astype(F64)[..., None]).astype(F32)


def _pytorch_type(bits, exact):                       # w = (codes - zero) * scale, zero in code units
    name = f"lmdeploy-pt-int{bits}"
    how = "fp16 arithmetic emulated (ggml mode)" if exact else "float32 arithmetic"
    doc = (f"LMDeploy PyTorch engine quant_policy {bits}: per token and head, zeros = -min/scale in code units, "
           f"half-up codes (x/s + zeros + 0.5, truncated); {how}")
    return _coded_row_type(
        name, lambda hd: (_code_bytes(name, hd, 8, 1) if bits == 8 else _code_bytes(name, hd, 4, 2)) + 2 + 2,
        lambda x: _pt_quantize(x, bits, exact), lambda q, s, zeros: _pt_load(q, s, zeros, exact),
        _same if bits == 8 else lambda q: _pack_pt_int4(q), _same if bits == 8 else lambda b: _unpack_pt_int4(b), doc)


def _quiet(f):
    """inf and NaN are part of these formulas (a zero scale, an fp16 overflow): no warnings."""
    def quiet(*a):
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            return f(*a)
    return quiet


def _with_exact(make, bits):
    ideal, exact = make(bits, False), make(bits, True)
    exact = CacheType(exact.name, exact.row_bytes, _quiet(exact.store), _quiet(exact.load), exact.doc, kind="lmdeploy",
                      parts=exact.parts)
    return CacheType(ideal.name, ideal.row_bytes, _quiet(ideal.store), _quiet(ideal.load), ideal.doc,
                     kind="lmdeploy", exact=exact, parts=ideal.parts)


LMDEPLOY_INT8 = _with_exact(_turbomind_type, 8)
LMDEPLOY_INT4 = _with_exact(_turbomind_type, 4)
LMDEPLOY_PT_INT8 = _with_exact(_pytorch_type, 8)
LMDEPLOY_PT_INT4 = _with_exact(_pytorch_type, 4)


# ---- int8-calibrated ----------------------------------------------------------------------------
def calibrated_quantize(x, scale, zp, exact=False):
    """x float32[..., n_kv, hd], scale / zp float32[n_kv] (or scalars) -> int8 codes (v0.2.0's quant)."""
    x = np.asarray(x, F32)
    scale, zp = np.asarray(scale, F32)[..., None], np.asarray(zp, F32)[..., None]
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        if exact:
            x = x.astype(F16).astype(F32)
        v = (x - zp) / scale
    v = np.where(np.isnan(v), F32(127), np.clip(v, -128, 127))     # fminf(127, NaN) = 127
    a = np.abs(v)
    r = np.floor(a)
    r = r + (a - r >= 0.5)                          # round(): half away from zero (a - floor(a) is exact)
    return np.copysign(r, v).astype(np.int8)


def calibrated_dequantize(q, scale, zp):
    """int8 codes -> float32: q * scale + zp rounded once (through float64)."""
    scale, zp = np.asarray(scale, F32)[..., None], np.asarray(zp, F32)[..., None]
    return (q.astype(F64) * scale.astype(F64) + zp.astype(F64)).astype(F32)


def _params_error(where, message, hint=None):
    return RefinferError(f"KV parameters {where}: {message}",
                         hint=hint or "make the file with python -m refinfer calibrate-kv -m MODEL -o PARAMS.json")


class KVParams:
    """A calibrate-kv parameter file: per layer (and, as a refinfer extension, per KV head)
    min / max of K and V and LMDeploy's (scale, zp) for each."""

    def __init__(self, data: dict, source: str = "<dict>"):
        self.source = source
        self.data = data
        self._validate()
        self._bound = {}

    @classmethod
    def read(cls, kv_params) -> KVParams:
        if isinstance(kv_params, KVParams):
            return kv_params
        if isinstance(kv_params, dict):
            return cls(kv_params)
        path = os.fspath(kv_params)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise _params_error(f"file {path!r}", e.strerror or str(e)) from None
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _params_error(f"file {path!r}", f"not JSON ({e})",
                                hint="the file is damaged; make it again with python -m refinfer calibrate-kv") from None
        return cls(data, f"file {path!r}")

    def _validate(self):
        d, w = self.data, self.source
        if not isinstance(d, dict) or d.get("format") != PARAMS_FORMAT:
            found = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise _params_error(w, f"key 'format' is {found!r}, expected {PARAMS_FORMAT!r}")
        if d.get("version") != PARAMS_VERSION:
            raise _params_error(w, f"key 'version' is {d.get('version')!r}, this refinfer reads {PARAMS_VERSION}")
        if d.get("granularity") not in ("layer", "head"):
            raise _params_error(w, f"key 'granularity' is {d.get('granularity')!r}, expected 'layer' or 'head'")
        for key in ("n_layers", "n_kv_heads", "head_dim"):
            v = d.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _params_error(w, f"key {key!r} is {v!r}, expected a positive integer")
        layers = d.get("layers")
        if not isinstance(layers, list) or len(layers) != d["n_layers"]:
            n = len(layers) if isinstance(layers, list) else layers
            raise _params_error(w, f"key 'layers' holds {n!r} entries, 'n_layers' says {d['n_layers']}")
        n = d["n_kv_heads"] if d["granularity"] == "head" else None
        for i, L in enumerate(layers):
            if not isinstance(L, dict):
                raise _params_error(w, f"layers[{i}] is {type(L).__name__}, expected an object")
            for key in ("k_scale", "k_zp", "v_scale", "v_zp"):
                v = L.get(key)
                vals = v if n is not None and isinstance(v, list) else [v]
                if (n is not None and (not isinstance(v, list) or len(v) != n)) or not all(
                        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in vals):
                    want = f"a list of {n} finite numbers (one per KV head)" if n else "a finite number"
                    raise _params_error(w, f"layers[{i}].{key} is {v!r}, expected {want}")
                if key.endswith("scale") and min(vals) < 0:
                    raise _params_error(w, f"layers[{i}].{key} is {v!r}: a scale cannot be negative")

    @property
    def n_layers(self) -> int:
        return self.data["n_layers"]

    def scale_zp(self, layer: int, which: str):
        """(scale, zp) float32[n_kv_heads] (per layer: one value repeated) of layer's K or V."""
        if not 0 <= layer < self.n_layers:
            raise _params_error(self.source, f"has {self.n_layers} layers, the model asks for layer {layer}",
                                hint="the parameters were calibrated on another model: run calibrate-kv on this one")
        L, H = self.data["layers"][layer], self.data["n_kv_heads"]
        return (np.broadcast_to(np.asarray(L[f"{which}_scale"], F32), (H,)).copy(),
                np.broadcast_to(np.asarray(L[f"{which}_zp"], F32), (H,)).copy())

    def check_model(self, n_layers: int, n_kv_heads: int, head_dim: int):
        """The model these parameters are used with must have their shape."""
        for key, have in (("n_layers", n_layers), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
            if self.data[key] != have:
                raise _params_error(self.source, f"key {key!r} is {self.data[key]}, the model has {have}",
                                    hint="the parameters were calibrated on another model: run calibrate-kv on this one")


@dataclass(frozen=True)
class CalibratedLayerType(CacheType):
    """int8-calibrated bound to one layer: scale, zp float32[n_kv_heads] broadcast over the rows."""
    scale: tuple = ()
    zp: tuple = ()


@dataclass(frozen=True)
class CalibratedType(CacheType):
    """int8-calibrated before a layer is chosen: for_layer(layer) binds that layer's parameters."""
    params: KVParams | None = None
    which: str = "k"
    exact_arith: bool = False

    def for_layer(self, layer: int) -> CacheType:
        key = (self.which, layer, self.exact_arith)
        if key not in self.params._bound:
            scale, zp = self.params.scale_zp(layer, self.which)
            exact, name = self.exact_arith, f"{self.name}[layer {layer} {self.which.upper()}]"

            def store(dst, rows):
                self._check_heads(rows.shape[-2])
                dst[...] = calibrated_quantize(rows, scale, zp, exact).view(np.uint8)

            def load(src):
                self._check_heads(src.shape[-2])
                return calibrated_dequantize(np.ascontiguousarray(src).view(np.int8), scale, zp)

            def parts(src):                           # w = codes * scale + zp, per layer (and head)
                codes = np.ascontiguousarray(src).view(np.int8).astype(np.int32)
                shape = codes.shape[:-1] + (1,)
                return {"codes": codes,
                        "scale": np.broadcast_to(np.asarray(scale, F32)[:, None], shape).copy(),
                        "zero": np.broadcast_to(np.asarray(zp, F32)[:, None], shape).copy()}

            self.params._bound[key] = CalibratedLayerType(
                name, self.row_bytes, store, load, self.doc, kind="calibrated", parts=parts,
                scale=tuple(float(s) for s in scale), zp=tuple(float(z) for z in zp))
        return self.params._bound[key]

    def _check_heads(self, n_kv):
        if n_kv != self.params.data["n_kv_heads"]:
            raise _params_error(self.params.source, f"key 'n_kv_heads' is {self.params.data['n_kv_heads']}, "
                                f"the rows have {n_kv} KV heads",
                                hint="the parameters were calibrated on another model: run calibrate-kv on this one")


def _unbound(*_):
    raise RefinferError("int8-calibrated stores and loads through a layer's parameters",
                        hint="use cache_type.for_layer(layer) (BlockManager.write / gather do)")


CALIBRATED_DOC = ("LMDeploy v0.2.0's offline kv_qparams int8: per layer zp = (min+max)/2, scale = (max-min)/255, "
                  "half-away codes; per-head parameters are a refinfer extension (calibrate-kv --per-head)")


def int8_calibrated(kv_params, which="k") -> CalibratedType:
    """The int8-calibrated type of K (which="k") or V from a parameter file (path, dict or KVParams)."""
    if which not in ("k", "v"):
        raise RefinferError(f"which={which!r}", hint="'k' or 'v'")
    params = KVParams.read(kv_params)
    hd_file = params.data["head_dim"]

    def row_bytes(hd):
        if hd != hd_file:
            raise ShapeError(f"KV cache type int8-calibrated: head_dim {hd}, but the parameters "
                             f"({params.source}) were calibrated for head_dim {hd_file}",
                             hint="run python -m refinfer calibrate-kv on this model")
        return hd

    def make(exact_arith, exact):
        return CalibratedType("int8-calibrated", row_bytes, _unbound, _unbound, CALIBRATED_DOC, kind="calibrated",
                              exact=exact, params=params, which=which, exact_arith=exact_arith)

    return make(False, make(True, None))


# ---- parameter files ----------------------------------------------------------------------------
def model_identity(path) -> dict:
    """The model a parameter file was made from: its path, size and sha256 (a directory: its files')."""
    path = os.fspath(path)
    h, size = hashlib.sha256(), 0
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)
    for p in files:
        if os.path.isdir(path):
            h.update(os.path.relpath(p, path).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
                size += len(chunk)
    return {"path": path, "size": size, "sha256": h.hexdigest()}


def asym_params(mn, mx):
    """_export_asym: scale = (max - min) / 255, zp = (max + min) / 2, in float32 (as torch on fp32 stats)."""
    mn, mx = np.asarray(mn, F32), np.asarray(mx, F32)
    return (mx - mn) / F32(255), (mx + mn) / F32(2)


register_cache_type(LMDEPLOY_INT8)
register_cache_type(LMDEPLOY_INT4)
register_cache_type(LMDEPLOY_PT_INT8)
register_cache_type(LMDEPLOY_PT_INT4)
register_parametric_type("int8-calibrated", int8_calibrated, CALIBRATED_DOC)
