"""The `numba` backend: the reference's ops as compiled, multi-threaded Numba kernels, in the
same two numeric modes (see numpy_backend.py for what `ideal` and `ggml` mean).

Quantized matmuls read the weights repacked once (repack.py): integer codes and float32
scales, R rows side by side; the file's pages are then released.
  ideal   numba_kernels/matmul.py. One batch-invariant kernel for any number of tokens: each
          output element is one fixed chain of FMAs (per sub-block sum_j q_j x_j in order, then
          scaled), the same for a decode token and inside a 512-token prefill, on any thread
          count. batch_invariant=False multiplies prefills (T > 1) with float32 BLAS over
          dequantized tiles instead: not invariant (on SmolLM2 Q4_1 its logits differ from the
          invariant kernel's by NMSE 3.7e-12).
  ggml    numba_kernels/ggml.py: the NumPy emulation's arithmetic bit for bit (ggml_emulation.py:
          llama.cpp's AVX2 lane orders, its FMAs as explicit fused multiply-adds). The
          activations are quantized to the weight's vec_dot type first: q8_0/q8_1 in Numba with
          the x86 rounding, q8_K and bf16 through the reference quantizer.
Attention reads K/V through the block tables of the paged pool: in ideal mode per (token,
head) in float64 with every sum in a fixed order (numba_kernels/ops.py), an f32 cache's rows
as they are and every other cache type with a row decoder (ops.KV_KINDS: f16, bf16, q8_0,
q4_0, q4_1, q5_0, q5_1) straight from its bytes, each row decoded once per (token, KV head)
to the float32 values its type's load gives, then the same arithmetic; in ggml mode over the
F16 cache as llama.cpp's non-flash attention, with the batch kernels' lane order for a
segment of several tokens and the vec_dot order for one (numba_kernels/ggml.py).

Whatever has no kernel here (float64 ideal mode, a matrix whose width is not a whole number
of the kernels' blocks, a KV cache type without a row decoder, a quantized cache or flash
attention in ggml mode) runs the inherited NumPy reference, with one warning per (op, type).
"""

from __future__ import annotations

import warnings

import numpy as np

from .. import kv_cache, quant
from . import blockdecode as bd
from . import ggml_emulation as ge
from .numba_kernels import ggml as gk
from .numba_kernels import intgroup as ik
from .numba_kernels import matmul as mk
from .numba_kernels import ops as ok
from ..quant._common import fp16_to_f32
from .numpy_backend import VEC_DOT_TYPE, NumpyBackend
from .repack import repack
from ..quant.intgroup import IntGroupTensor
from ..weights import QTensor

WEIGHT_TYPES = ("f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0",
                "q2_K", "q3_K", "q4_K", "q5_K", "q6_K")
WEIGHT_OPS = ("embed", "matmul")                                   # ops per weight type
ACT_OPS = ("rmsnorm", "rope", "attention", "swiglu")   # ops on float32 activations
SHARED_OPS = ("rope_cos_sin", "store_kv")   # every backend uses the reference's (once per pass; a row scatter)
TILE_BYTES = 1 << 22             # float32 bytes of a dequantized prefill tile (larger tiles measured no faster)


# 32-element types: (type_size, qs offset, qh offset or -1, code offset, has m) of the block
LEGACY_LAYOUT = {"q4_0": (18, 2, -1, -8, False), "q4_1": (20, 4, -1, 0, True),
                 "q5_0": (22, 6, 2, -16, False), "q5_1": (24, 8, 4, 0, True),
                 "q8_0": (34, 2, -1, 0, False)}


class NumbaFallbackWarning(UserWarning):
    pass


def readonly(a):
    """A read-only view: the loader's memory maps are read-only, and Numba compiles one
    specialization per writability, so every caller passes the same kind."""
    if not a.flags.writeable:
        return a
    v = a.view()
    v.flags.writeable = False
    return v


def coverage(mode="ideal", dtype=np.float32):
    """{(op, type): "native" | "fallback" | "shared"} for this backend in the given mode."""
    native = np.dtype(dtype) == np.float32 or mode == "ggml"
    cov = {}
    for op in WEIGHT_OPS:
        for t in WEIGHT_TYPES:
            cov[(op, t)] = "native" if native else "fallback"
    for op in WEIGHT_OPS:     # integer-group weights (GPTQ, AWQ, compressed-tensors): numba_kernels/intgroup.py
        cov[(op, "intg")] = "native" if np.dtype(dtype) == np.float32 else "fallback"
    for op in ACT_OPS:
        cov[(op, "f32")] = "native" if native else "fallback"
    for op in SHARED_OPS:
        cov[(op, "f32")] = "shared"
    for name in kv_cache.cache_type_names():    # attention over a cache whose K and V are of that type
        if name != "f32":
            ok_ = np.dtype(dtype) == np.float32 and attention_kinds(mode, name, name) is not None
            cov[("attention", name)] = "native" if ok_ else "fallback"
    return cov


class NumbaBackend(NumpyBackend):
    name = "numba"

    def __init__(self, mode="ideal", dtype=np.float32, batch_invariant=True):
        super().__init__(mode=mode, dtype=dtype)
        # False: ideal-mode prefills (T > 1) through float32 BLAS, faster but not batch-invariant
        self.batch_invariant = bool(batch_invariant)
        self._native = self.dtype == np.float32   # the kernels are float32 (ggml mode always is)
        self._warned = set()
        self._scales = {}   # id(QTensor) -> (QTensor, d, m): the fp16 block scales as float32
        self._repacked = {}  # id(QTensor) -> (QTensor, Repacked): ideal mode's weight layout
        self._stacked = {}   # ids of matrices run together -> (their QTensors, the stacked QTensor)

    def repacked(self, w):
        """w in the ideal-mode kernels' layout (repack.py), made on first use; the QTensor is
        kept with it so that its id cannot be reused."""
        hit = self._repacked.get(id(w))
        if hit is None:
            hit = self._repacked[id(w)] = (w, repack(w))
            w.release_pages()
        return hit[1]

    def legacy_scales(self, w):  # -> (d float32[rows, nb], m float32[rows, nb])
        """The block scales of a 32-element-type matrix, decoded once (a quarter byte per
        weight); the QTensor is kept with them so that its id cannot be reused."""
        w = getattr(w, "qtensor", w)
        hit = self._scales.get(id(w))
        if hit is None:
            ts, _, _, _, has_m = LEGACY_LAYOUT[w.qtype.name]
            blocks = np.asarray(w.raw).reshape(w.shape[0], -1, ts)
            d = fp16_to_f32(np.ascontiguousarray(blocks[:, :, 0:2]).view("<u2")[..., 0])
            m = (fp16_to_f32(np.ascontiguousarray(blocks[:, :, 2:4]).view("<u2")[..., 0]) if has_m
                 else np.zeros_like(d))
            hit = self._scales[id(w)] = (w, d, m)
        return hit[1], hit[2]

    # ---- fallbacks -------------------------------------------------------------------------
    def _fallback(self, op, tname, why):
        if (op, tname) not in self._warned:
            self._warned.add((op, tname))
            warnings.warn(f"numba backend: {op} on {tname} runs the NumPy reference ({why})",
                          NumbaFallbackWarning, stacklevel=3)

    def _kernel_ok(self, op, w):
        tname = w.qtype.name
        if not self._native:
            self._fallback(op, tname, f"dtype {self.dtype}")
            return False
        if tname not in bd.KINDS:
            self._fallback(op, tname, "no kernel for this type")
            return False
        if w.shape[1] % mk_group(tname):
            self._fallback(op, tname, f"{w.shape[1]} columns is not a multiple of {mk_group(tname)}")
            return False
        return True

    # ---- ops ----------------------------------------------------------------------------------
    def embed(self, out, w, ids):
        """out[T, dim] = W[ids] (ggml_get_rows)."""
        if isinstance(w, IntGroupTensor) and self._native:
            buf = np.empty(out.shape, np.float32)
            codes, table, g_idx = self.intg_tables(w)
            ik.dequantize_rows_table(buf, np.asarray(ids, dtype=np.int64), codes, table, g_idx)
            out[...] = buf
            return
        if isinstance(w, IntGroupTensor) or not self._kernel_ok("embed", w):
            return super().embed(out, w, ids)
        buf = np.empty(out.shape, np.float32)
        mk.dequantize_rows(buf, readonly(w.raw), np.asarray(ids, dtype=np.int64), bd.KINDS[w.qtype.name])
        out[...] = buf

    def matmul(self, out, x, w):
        """out[T, rows] = x[T, cols] @ W(rows, cols).T"""
        if isinstance(w, IntGroupTensor):
            return self.intg_matmul(out, x, w)       # the reference's a16 / ggml handling, then intg_dot
        if not self._kernel_ok("matmul", w):
            return super().matmul(out, x, w)
        x = np.ascontiguousarray(x, dtype=np.float32)
        kind = bd.KINDS[w.qtype.name]
        res = out if out.flags.c_contiguous and out.dtype == np.float32 else np.empty(out.shape, np.float32)
        if self.mode == "ideal":
            self._matmul_ideal(res, x, w, kind)          # reads the repacked copy, not raw
        else:
            self._matmul_ggml(res, x, _ReadOnly(w), kind)
        if res is not out:
            out[...] = res

    def intg_tables(self, w):
        """(codes, table, g_idx) of an integer-group matrix in numba_kernels/intgroup.py's layout,
        made once: the codes one per byte and each (row, group)'s 2^bits weight values."""
        hit = self._repacked.get(id(w))
        if hit is None:
            codes, table, g_idx = w.kernel_tables()
            hit = self._repacked[id(w)] = (w, (*ik.repack(codes, table), readonly(g_idx)))
        return hit[1]

    def intg_dot(self, out, x, w):
        if not self._native:
            self._fallback("matmul", "intg", f"dtype {self.dtype}")
            return super().intg_dot(out, x, w)
        res = out if out.flags.c_contiguous and out.dtype == np.float32 else np.empty(out.shape, np.float32)
        ik.matmul_table(res, np.ascontiguousarray(x, dtype=np.float32), *self.intg_tables(w))
        if res is not out:
            out[...] = res

    def matmuls(self, outs, x, ws):
        """The matrices stacked into one and repacked once (q, k, v become one 960-row matrix
        in SmolLM2): fewer, larger kernels. Each output row is computed as it would be alone;
        matrices of different types or widths, and F16 ones in ggml mode (the emulation picks
        an F16 matmul's lane order by its row count), run one by one."""
        if (len({w.qtype.name for w in ws}) > 1 or ws[0].qtype.name == "intg"
                or (self.mode == "ggml" and ws[0].qtype.name == "f16")
                or len({w.shape[1] for w in ws}) > 1 or not self._kernel_ok("matmul", ws[0])):
            return super().matmuls(outs, x, ws)
        key = tuple(id(w) for w in ws)
        hit = self._stacked.get(key)
        if hit is None:
            stacked = QTensor("+".join(w.name for w in ws), np.concatenate([np.asarray(w.raw) for w in ws]),
                              ws[0].qtype, (sum(w.shape[0] for w in ws), ws[0].shape[1]))
            self.repacked(stacked)
            stacked.raw = np.empty((0, stacked.raw.shape[1]), np.uint8)  # only the repacked copy is read from now on
            for w in ws:
                w.release_pages()
            hit = self._stacked[key] = (ws, stacked)
        stacked = hit[1]
        res = np.empty((x.shape[0], stacked.shape[0]), np.float32)
        self.matmul(res, x, stacked)
        r0 = 0
        for out, w in zip(outs, ws):
            out[...] = res[:, r0: r0 + w.shape[0]]
            r0 += w.shape[0]

    def _matmul_ideal(self, out, x, w, kind):
        p = self.repacked(w)
        if x.shape[0] > 1 and not self.batch_invariant:
            return self._matmul_blas(out, x, w, p)
        if p.layout == "float":   # 32 columns a "sub-block", no scales: one chain over all columns
            G, cols, R = p.codes.shape
            none = np.broadcast_to(np.zeros(R, np.float32), (G, cols // 32, R))
            mk.matmul_repacked(out, x, np.zeros((x.shape[0], cols // 32), np.float32),
                               p.codes.reshape(G, cols // 32, 32, R), 1, none, none, 0, False, False)
            return
        nb = p.codes.shape[1]
        xs = mk.block_sums(x, p.block) if p.has_m else np.zeros((x.shape[0], nb), np.float32)
        mk.matmul_repacked(out, x, xs, p.codes, 2 if p.layout == "nibbles" else 1, p.d, p.m, p.off, p.has_m, True)

    @staticmethod
    def _matmul_blas(out, x, w, p):
        """batch_invariant=False, T > 1: tiles of rows dequantized to float32 with the
        reference's roundings, then a float32 BLAS product (its blocking, and so its bits,
        change with T)."""
        rows, cols = w.shape
        R = p.group
        G = p.codes.shape[0]
        step = max(1, TILE_BYTES // (4 * cols * R))          # groups per tile
        tile = np.empty((min(step, G) * R, cols), np.float32)
        for g0 in range(0, G, step):
            r0, r1 = g0 * R, min(rows, (g0 + step) * R)
            t = tile[: r1 - r0]
            if p.layout == "nibbles":
                mk.tile_nibbles(t, g0, p.codes, p.d, p.m, p.off, p.has_m)
            elif p.layout == "int8":
                mk.tile_int8(t, g0, p.codes, p.d, p.m, p.has_m)
            else:
                t[...] = p.codes[g0: g0 + step].transpose(0, 2, 1).reshape(-1, cols)[: r1 - r0]
            out[:, r0:r1] = x @ t.T

    def _matmul_ggml(self, out, x, w, kind):
        """The emulation's matmul (NumpyBackend.matmul in ggml mode), kernel by vec_dot type."""
        vd = VEC_DOT_TYPE[w.qtype.name]
        if vd == "f16":     # activations rounded to F16; tinyBLAS for a batch when it takes the shape
            rows, k = w.shape
            w16 = np.asarray(w.raw).view("<u2").reshape(rows, k)
            gk.matmul_f16(out, gk.round_rows_f16(x), w16, x.shape[0] > 1 and k % 8 == 0 and rows % 4 == 0)
            return
        p = self.repacked(getattr(w, "qtensor", w))
        if vd in ("q8_0", "q8_1"):
            xq, xd, xs = self.quantize_act_q8(x)
            gk.matmul_q8(out, xq.astype(np.float32), xd, xs, p.codes, p.d, p.m, p.off, vd == "q8_1")
            return
        if vd == "q8_K":   # quantize_row_q8_K is the reference quantizer on x86
            xx = quant.dequantize(quant.quantize(x, "q8_K"), "q8_K")
        elif vd == "bf16":
            xx = quant.dequantize(quant.quantize(x, "bf16"), "bf16")
        else:
            xx = x
        xx = np.ascontiguousarray(xx, dtype=np.float32)
        if p.layout == "float":
            gk.matmul_col64_float(out, xx, p.codes)
        else:
            gk.matmul_col64(out, xx, p.codes, p.d, p.m, p.off, p.has_m, p.layout == "nibbles")

    @staticmethod
    def quantize_act_q8(x):  # float32[T, cols] -> (int8[T, cols], float32[T, nb], float32[T, nb])
        T, cols = x.shape
        xq = np.empty((T, cols), np.int8)
        xd = np.empty((T, cols // 32), np.float32)
        xs = np.empty((T, cols // 32), np.float32)
        mk.quantize_act_q8(x, xq, xd, xs)
        return xq, xd, xs

    def rmsnorm(self, out, x, weight, eps):
        if not self._native:
            self._fallback("rmsnorm", "f32", f"dtype {self.dtype}")
            return super().rmsnorm(out, x, weight, eps)
        weight = np.ascontiguousarray(weight, dtype=np.float32)
        if self.mode == "ggml":
            gk.rmsnorm(out, np.ascontiguousarray(x, dtype=np.float32), weight, float(eps))
        else:
            ok.rmsnorm(out, x, weight, float(eps), False)

    def rope(self, x, cos, sin, neox):
        if not self._native:
            self._fallback("rope", "f32", f"dtype {self.dtype}")
            return super().rope(x, cos, sin, neox)
        kernel = gk.rope if self.mode == "ggml" else ok.rope
        kernel(x, np.ascontiguousarray(cos, dtype=np.float32), np.ascontiguousarray(sin, dtype=np.float32), bool(neox))

    # store_kv and new_kv_pool are the reference's: a vectorized scatter of rows through the
    # pool's cache type, exact for every type.

    def attention(self, out, q, pool, layer, meta):
        """Causal GQA attention over the paged cache (numba_kernels/ops.py). ideal mode: an f32
        pool reads its float32 rows directly (ok.attention), any other type with a kind in
        ok.KV_KINDS has each row's bytes decoded once by the block decoders (ok.attention_rows,
        the same float64 arithmetic); ggml mode: f16 pools (its default cache type). Other types
        run the reference."""
        types = f"{pool.k_type.name}/{pool.v_type.name}"
        if not self._native:
            self._fallback("attention", types, f"dtype {self.dtype}")
            return super().attention(out, q, pool, layer, meta)
        kinds = attention_kinds(self.mode, pool.k_type.name, pool.v_type.name, self.flash_attn)
        k_ct, v_ct = pool.k_type.for_layer(layer), pool.v_type.for_layer(layer)
        par = (row_params(k_ct, pool.n_kv_heads), row_params(v_ct, pool.n_kv_heads)) if kinds != "typed" else ()
        if kinds is None or any(p is None for p in par):
            self._fallback("attention", types, f"no {self.mode}-mode kernel for a {types} cache")
            return super().attention(out, q, pool, layer, meta)
        n_kv, hd = pool.n_kv_heads, pool.head_dim
        res = out if out.flags.c_contiguous and out.dtype == np.float32 else np.empty(out.shape, np.float32)
        tail = (meta.position_slots, np.asarray(meta.positions, np.int64), np.asarray(meta.seg_of_token, np.int64))
        qc = np.ascontiguousarray(q, dtype=np.float32)
        if kinds != "typed":            # rows of bytes: [n_blocks * block_size, n_kv, row_bytes]
            kb = pool.k[layer].reshape(-1, n_kv, pool.k.shape[-1])
            vb = pool.v[layer].reshape(-1, n_kv, pool.v.shape[-1])
            ok.attention_rows(res, qc, kb, vb, *tail, *kinds, *par)
        else:
            view = np.float32 if self.mode == "ideal" else np.uint16
            kf = pool.k[layer].view(view).reshape(-1, n_kv, hd)   # [n_blocks * block_size, n_kv, hd]
            vf = pool.v[layer].view(view).reshape(-1, n_kv, hd)
            if self.mode == "ideal":
                ok.attention(res, qc, kf, vf, *tail)
            else:      # a segment of several tokens runs llama.cpp's batch kernels, one token its vec_dot
                batched = np.diff(np.asarray(meta.seg_starts, np.int64)) > 1
                gk.attention(res, qc, kf, vf, *tail, batched, np.float32(1) / np.sqrt(np.float32(hd)))
        if res is not out:
            out[...] = res

    def swiglu(self, out, gate, up):
        if not self._native:
            self._fallback("swiglu", "f32", f"dtype {self.dtype}")
            return super().swiglu(out, gate, up)
        if self.mode == "ideal":
            ok.swiglu(out, gate, up, False)
            return
        n = gate.shape[1]
        nv = n - n % 8
        if nv < n:   # ggml_vec_swiglu_f32's scalar tail: the reference's (libm expf)
            tail = ge.swiglu(gate[:, nv:], up[:, nv:])
        gk.swiglu(out, np.ascontiguousarray(gate, dtype=np.float32), np.ascontiguousarray(up, dtype=np.float32), nv)
        if nv < n:
            out[:, nv:] = tail


class _ReadOnly:
    """The QTensor fields the kernels read, with raw as a read-only view."""

    def __init__(self, w):
        self.qtensor, self.raw, self.qtype, self.shape = w, readonly(w.raw), w.qtype, w.shape


def attention_kinds(mode, k_name, v_name, flash_attn=False):
    """How attention runs on a (K, V) cache-type pair: "typed" (the f32 ideal / f16 ggml kernels
    over the rows' values; ggml's is llama.cpp's non-flash attention), (k_kind, v_kind) for
    ok.attention_rows (ideal mode, both types with a row decoder), or None (the reference)."""
    default = "f32" if mode == "ideal" else "f16"
    if k_name == v_name == default and not (mode == "ggml" and flash_attn):
        return "typed"
    if mode == "ideal" and k_name in ok.KV_KINDS and v_name in ok.KV_KINDS:
        return ok.KV_KINDS[k_name], ok.KV_KINDS[v_name]
    return None


def row_params(ct, n_kv):
    """A layer's cache type -> float32[2, n_kv]: the (scale, zp) per KV head of a calibrated type,
    zeros for types whose rows carry their own parameters; None for the exact (ggml-mode) variant
    of an LMDeploy type, whose load rounds to fp16 (the row decoders give the ideal load)."""
    if ct.kind == "calibrated":
        return np.array([ct.scale, ct.zp], np.float32).reshape(2, n_kv)
    if kv_cache.CACHE_TYPES.get(ct.name) is not ct:
        return None
    return np.zeros((2, n_kv), np.float32)


def mk_group(tname):
    """Columns must be whole groups of the kernels (a K-quant super-block, else 32)."""
    return 256 if tname.endswith("_K") else 32


__all__ = ["NumbaBackend", "coverage", "WEIGHT_TYPES", "NumbaFallbackWarning"]
