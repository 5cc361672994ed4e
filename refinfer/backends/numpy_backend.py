"""The reference backend, in NumPy. Two numeric modes:

ideal  the mathematically intended model: weights dequantized exactly, activations in float32
       (or float64 with dtype=np.float64), every reduction in float64 and in a fixed order:
       a matmul element sums its exact products in column order (column_order_matmul), RMSNorm
       and attention sum in index order (in_order_sum). So each row's numbers are a function of
       that row's data alone, never of the batch around it (forward.py: batch invariance).
ggml   llama.cpp's CPU arithmetic (x86 AVX2 + FMA + F16C build; sources in ggml/src/ggml-cpu),
       reproduced operation by operation; the kernels are in ggml_emulation.py:
       - quantized matmuls first quantize the activation rows to the weight's vec_dot type
         (q8_0 for q4_0/q5_0/q8_0, q8_1 for q4_1/q5_1) with the x86 quantizer (id = 127/amax,
         round half to even: quantize_row_q8_0 / _q8_1 in arch/x86/quants.c), then sum exact
         integer lane dots with one FMA per block and lane (ggml_vec_dot_*_q8_* and
         llamafile's tinyBLAS_Q0_AVX share that order), plus m_w * s_x for q4_1/q5_1;
       - F16 weights: activations rounded to F16 (the F16 vec_dot type); tinyBLAS's 8-lane FMA
         order for a batch, ggml_vec_dot_f16's 4x8 lanes for one token;
       - the KV cache is F16 (llama.cpp's default type_k/type_v), and K.Q and V.softmax are
         F16 matmuls with the same two orders, so Q and the softmax probabilities are rounded
         to F16 too; the KV length is padded to llama.cpp's 256 with masked (zero) entries;
       - RMSNorm sums squares in double in index order, then scale = 1/sqrtf(mean + eps) in float
         (ggml_compute_forward_rms_norm_f32); softmax and SwiGLU use ggml's SIMD expf
         (ggml_v_expf) and softmax sums 8-lane groups in double (ggml_vec_soft_max_f32);
       - RoPE angles: theta_i = pos * theta_scale^i built by repeated float multiplication,
         theta_scale = powf(base, -2/n_dims) (ggml_rope_cache_init), glibc's sincosf, and the
         rotation with FMA contraction (rotate_pairs).
       Not covered: K-quant and bf16/f32 weight matmuls keep a float64 sum over exact
       products in column order (within ~1e-7 relative of ggml); llama.cpp's repacked weights (q4_0 with
       AVX2 when loaded with extra buffer types, its default) and flash attention, which
       round differently: ggml mode is the plain CPU path (use_extra_bufts = false).
"""

from __future__ import annotations

import math

import numpy as np

from .. import quant
from ..kv_cache import BlockPool, attn_rotation, get_cache_type
from . import ggml_emulation as ge
from ..quant._common import F32, f32_to_fp16_bits, fp16_to_f32
from ..quant.intgroup import IntGroupTensor
from ..errors import UnsupportedError
from ..weights import QTensor

# vec_dot type of each weight type in llama.cpp's CPU backend (type_traits_cpu[...].vec_dot_type)
VEC_DOT_TYPE = {"q4_0": "q8_0", "q5_0": "q8_0", "q8_0": "q8_0", "q4_1": "q8_1", "q5_1": "q8_1",
                "q2_K": "q8_K", "q3_K": "q8_K", "q4_K": "q8_K", "q5_K": "q8_K", "q6_K": "q8_K",
                "f16": "f16", "bf16": "bf16", "f32": "f32"}


round_f16 = ge.round_f16


def quantize_act_q8(x: np.ndarray):
    """Activation rows float32[T, n] -> (d float32[T, nb], s float32[T, nb], codes float32[T, nb, 32])
    as the x86 quantize_row_q8_0 / quantize_row_q8_1: d = amax/127 stored fp16, codes =
    rint(x * (127/amax)) half to even, s = fp16(d * sum(codes)). d and s are returned as the
    float32 values of their fp16 bit patterns, which is what the dot products read."""
    T, n = x.shape
    xb = x.reshape(T, n // 32, 32).astype(np.float32)
    amax = np.max(np.abs(xb), axis=-1)
    d = amax / F32(127)
    with np.errstate(divide="ignore"):
        idv = np.where(amax != 0, F32(127) / np.where(amax != 0, amax, F32(1)), F32(0)).astype(np.float32)
    codes = np.rint(xb * idv[..., None]).astype(np.float32)
    s = d * codes.sum(axis=-1, dtype=np.float32)
    return round_f16(d), round_f16(s), codes


def in_order_sum(a: np.ndarray, axis: int) -> np.ndarray:
    """Sum along axis strictly in index order: ((a0 + a1) + a2) + ... (np.sum's pairwise order
    depends on the array's length and memory layout; an accumulation does not)."""
    return np.cumsum(a, axis=axis).take(-1, axis=axis)


def column_order_matmul(x: np.ndarray, wt: np.ndarray) -> np.ndarray:
    """x[T, cols] @ wt[cols, rows] -> float64[T, rows], each element summed over the columns in
    order, in float64: float32 x float32 products are exact in float64, so out[t, r] is a
    function of row t of x alone, whatever T is (a BLAS product of T rows is not: its blocking
    and kernels change with the shape). Vectorised across T x rows, one column at a time."""
    T, cols = x.shape
    acc = np.zeros((T, wt.shape[1]))
    tmp = np.empty_like(acc)
    x64 = x.astype(np.float64)
    for c in range(cols):
        np.multiply(x64[:, c, None], wt[c], out=tmp)
        acc += tmp
    return acc


GGML_FA_K_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")   # K types whose flash attention is emulated


def check_ggml_kv(k_name, v_name, flash_attn):
    """ggml mode reproduces these llama.cpp attention paths; anything else is refused with the reason."""
    quantized = GGML_FA_K_TYPES                       # llama.cpp's quantized cache types
    if flash_attn:
        if k_name not in GGML_FA_K_TYPES or v_name not in quantized + ("f16",):
            raise UnsupportedError(
                f"ggml mode emulates llama.cpp's CPU flash attention for a K cache of {', '.join(GGML_FA_K_TYPES)} "
                f"and a V cache of those or f16, not K {k_name} / V {v_name}",
                hint="for an f16 K llama.cpp runs its tiled or split-KV kernels, which ggml mode does not reproduce: "
                     "drop --flash-attn, or use --mode ideal")
        return
    if v_name != "f16":
        raise UnsupportedError(
            f"a {v_name} V cache needs flash attention in llama.cpp (without it V is stored transposed, one "
            f"element per row: llama_init_from_model refuses a quantized V), and ggml mode reproduces llama.cpp",
            hint="add --flash-attn (flash_attn=True), or use --cache-type-v f16, or --mode ideal")
    if k_name not in ("f16",) + quantized:
        raise UnsupportedError(f"ggml mode reproduces llama.cpp's attention over an f16 or "
                               f"{'/'.join(quantized)} K cache, not {k_name}",
                               hint="use --cache-type-k f16 or a quantized type, or --mode ideal")


def quantized_scores(q, k_raw, k_type):
    """kq[h, t, s] = ggml_vec_dot_<K>_q8_<0|1>(K row s of head h's KV head, Q row (t, h) quantized
    to K's vec_dot type by the x86 from_float) for q float32[T, n_heads, hd] and k_raw
    uint8[S, n_kv, row_bytes] (quant_dot's order, which tinyBLAS_Q0_AVX shares)."""
    T, n_heads, hd = q.shape
    S, n_kv, _ = k_raw.shape
    group = n_heads // n_kv
    t = quant.get_type(k_type.name)
    vd = VEC_DOT_TYPE[t.name]
    kq = np.empty((n_heads, T, S), np.float32)
    for kvh in range(n_kv):
        kc, kd, km = q8_decomposition(np.ascontiguousarray(k_raw[:, kvh]), t, S)
        lanes = ge.weight_lanes(kc)                                           # [nb, 8, 4, S]
        qg = np.ascontiguousarray(q[:, kvh * group:(kvh + 1) * group].transpose(1, 0, 2)).reshape(group * T, hd)
        dx, sx, qx = quantize_act_q8(qg)
        r = ge.quant_dot(lanes, kd, qx, dx, *((km, sx) if vd == "q8_1" else ()))   # [group * T, S]
        kq[kvh * group:(kvh + 1) * group] = r.reshape(group, T, S)
    return kq


def q8_decomposition(raw, t, rows):
    """Integer decomposition of q4_0/q4_1/q5_0/q5_1/q8_0 rows as ggml's dot kernels see them:
    w = d * q + m, with q float32[rows, nb, 32] integer codes (q4_0/q5_0 with the offset
    removed, q4_1/q5_1 unsigned), d and m float32[rows, nb] (m = 0 for the types without one)."""
    blocks = np.ascontiguousarray(raw).reshape(-1, t.type_size)
    b = blocks.view(t.layout)[:, 0]
    d = fp16_to_f32(b["d"])
    m = fp16_to_f32(b["m"]) if "m" in t.layout.names else np.zeros_like(d)
    unit = blocks.copy()
    ub = unit.view(t.layout)[:, 0]
    ub["d"] = 0x3C00                           # fp16 1.0 (and m := 0): dequantizing yields the codes
    if "m" in t.layout.names:
        ub["m"] = 0
    q = quant.dequantize(unit, t).reshape(rows, -1, 32).astype(np.float32)
    return q, d.reshape(rows, -1), m.reshape(rows, -1)


class NumpyBackend:
    name = "numpy"
    kv_cache_types = None   # (K, V) CacheType chosen at load (refinfer.load's cache_type_k/_v); None: the mode's default
    flash_attn = False      # ggml mode: llama.cpp's flash-attention kernel (--flash-attn) instead of mul_mat + soft_max
    kv_rotation = True      # llama.cpp's Hadamard rotation of Q/K/V for its quantized cache types (kv_cache.attn_rotation)

    def __init__(self, mode="ideal", dtype=np.float32):
        self.mode = mode
        self.dtype = np.dtype(dtype) if mode == "ideal" else np.dtype(np.float32)
        self.a16 = False   # integer-group weights: fp16 activations in and out (NumpyBackend.intg_matmul)
        self._dense = {}   # id(QTensor) -> dequantized weights (ideal) or integer decomposition (ggml)

    # ---- weights -------------------------------------------------------------------------
    def _dequantized(self, w):  # -> float[rows, cols]: self.dtype (ideal) or float64 (ggml float dots)
        key = ("dense", id(w))
        if key not in self._dense:
            self._dense[key] = w.dequantize().astype(self.dtype if self.mode == "ideal" else np.float64)
        return self._dense[key]

    def _dequantized_t(self, w):  # -> float[cols, rows]: W transposed, self.dtype, for column_order_matmul
        key = ("dense_t", id(w))
        if key not in self._dense:
            self._dense[key] = np.ascontiguousarray(w.dequantize().astype(self.dtype).T)
        return self._dense[key]

    def _q8_parts(self, w, lanes=False):
        """Integer decomposition of a q4_0/q4_1/q5_0/q5_1/q8_0 matrix as ggml's dot kernels
        see it (q8_decomposition). lanes=True gives q in quant_dot's layout [nb, 8, 4, rows]
        instead (what matmul keeps cached)."""
        key = ("lanes" if lanes else "q8", id(w))
        if key not in self._dense:
            q, d, m = q8_decomposition(w.raw, w.qtype, w.shape[0])
            self._dense[key] = (ge.weight_lanes(q) if lanes else q, d, m)
        return self._dense[key]

    # ---- ops (output first) ----------------------------------------------------------------
    def embed(self, out, w, ids):
        """out[T, dim] = W[ids] (ggml_get_rows: dequantize the selected rows)."""
        out[...] = w.dequantize(rows=np.asarray(ids))

    def matmuls(self, outs, x, ws):
        """outs[i][T, rows_i] = x[T, cols] @ W_i.T for matrices that read the same x (q, k, v;
        gate, up): the reference is one matmul each; a backend may run them as one."""
        for out, w in zip(outs, ws):
            self.matmul(out, x, w)

    def intg_matmul(self, out, x, w):
        """out[T, rows] = x[T, cols] @ W(rows, cols).T for integer-group weights: ideal mode
        through intg_dot (here the reference's column-order sum over the dequantized weights,
        which the accelerated backends reproduce bit for bit), ggml mode as F16 weights. With
        a16 (IntGroupTensor's docstring) the input and the output are rounded to fp16."""
        if self.a16:
            x = round_f16(np.asarray(x, np.float32))
        if self.mode == "ggml":
            self.matmul(out, x, self.intg_as_f16(w))
        else:
            self.intg_dot(out, x, w)
        if self.a16:
            out[...] = round_f16(np.asarray(out, np.float32))

    def intg_dot(self, out, x, w):
        out[...] = column_order_matmul(x, self._dequantized_t(w))

    def intg_as_f16(self, w):
        """ggml mode for integer-group weights: llama.cpp runs no GPTQ/AWQ kernel, so the closest
        llama.cpp computation is that of the same weights converted to an F16 GGUF: the deployed
        weights are F16 values (rounding "f16"), and the F16 path is exact for them."""
        key = ("intg_f16", id(w))
        if key not in self._dense:
            if w.rounding != "f16":
                raise UnsupportedError(f"{w.name}: ggml mode runs integer-group weights as F16, but their "
                                       f"rounding is {w.rounding!r}, not fp16 values",
                                       hint="use --mode ideal, or load the checkpoint with the deployed fp16 rounding")
            self._dense[key] = (w, QTensor(w.name, f32_to_fp16_bits(w.dequantize()).view(np.uint8),
                                           quant.get_type("f16"), w.shape))
        return self._dense[key][1]

    def matmul(self, out, x, w):
        """out[T, rows] = x[T, cols] @ W(rows, cols).T"""
        if isinstance(w, IntGroupTensor):
            return self.intg_matmul(out, x, w)
        if self.mode == "ideal":
            out[...] = column_order_matmul(x, self._dequantized_t(w))
            return
        vd = VEC_DOT_TYPE.get(w.qtype.name)
        if vd in ("q8_0", "q8_1"):
            q, d, m = self._q8_parts(w, lanes=True)        # [nb, 8, 4, rows], [rows, nb], [rows, nb]
            dx, sx, qx = quantize_act_q8(x)                # [T, nb], [T, nb], [T, nb, 32]
            out[...] = ge.quant_dot(q, d, qx, dx, *((m, sx) if vd == "q8_1" else ()))
        elif vd == "q8_K":
            # x86 quantize_row_q8_K is quantize_row_q8_K_ref. ggml's K-quant dots sum exact
            # integer sub-block dots times fp32(d_w * d_x); float64 over the dequantized weights
            # differs from that only by the rounding of those scale products (~6e-8 relative).
            # Summed in column order, so that the numba backend can give the same bits.
            xq = quant.dequantize(quant.quantize(x, "q8_K"), "q8_K")
            out[...] = column_order_matmul(xq, self._dequantized_t(w)).astype(np.float32)
        elif vd == "f16":
            out[...] = self._f16_matmul(round_f16(x), self._f16_weights(w))
        else:  # f32, bf16 (bf16 vec_dot type is bf16: round the activations the same way)
            xx = x if vd == "f32" else quant.dequantize(quant.quantize(x, "bf16"), "bf16")
            out[...] = column_order_matmul(xx, self._dequantized_t(w)).astype(np.float32)

    def _f16_weights(self, w):  # -> float32[rows, cols], exact F16 values
        key = ("f16", id(w))
        if key not in self._dense:
            self._dense[key] = w.dequantize().astype(np.float32)
        return self._dense[key]

    @staticmethod
    def _f16_matmul(x16, w16):
        """x16[T, k] @ w16[rows, k].T for F16-valued operands in ggml's order: llamafile's
        tinyBLAS for T > 1 when it accepts the shape (k % 8 == 0, rows % 4 == 0), otherwise
        ggml_vec_dot_f16 row by row."""
        T, k = x16.shape
        rows = w16.shape[0]
        dot = ge.f16_dot_tinyblas if T > 1 and k % 8 == 0 and rows % 4 == 0 else ge.f16_dot_vec
        out = np.empty((T, rows), np.float32)
        step = max(1, (1 << 21) // (8 * T))
        for r0 in range(0, rows, step):
            out[:, r0:r0 + step] = dot(x16[:, None, :], w16[None, r0:r0 + step, :])
        return out

    def rmsnorm(self, out, x, weight, eps):
        """out = x / sqrt(mean(x^2) + eps) * weight, per row."""
        if self.mode == "ideal":
            ms = in_order_sum(np.square(x, dtype=np.float64), axis=-1)[:, None] / x.shape[-1]
            out[...] = (x / np.sqrt(ms + eps)).astype(self.dtype) * weight
        else:
            sq = np.square(x.astype(np.float32))                     # x*x rounded to float, summed in order
            mean = (in_order_sum(sq.astype(np.float64), axis=-1)[:, None] / x.shape[-1]).astype(np.float32)
            scale = F32(1.0) / np.sqrt(mean + F32(eps))
            out[...] = (x * scale) * weight

    def rope_cos_sin(self, positions, cfg, freq_factors):
        """cos, sin float[T, rope_dim // 2] of theta_i = pos * freq_scale * base^(-2i/rope_dim) / ff_i."""
        half = cfg.rope_dim // 2
        pos = np.asarray(positions, dtype=np.float64)[:, None]
        ff = np.ones(half) if freq_factors is None else freq_factors.astype(np.float64)
        if self.mode == "ideal":
            theta = pos * cfg.rope_freq_scale * cfg.rope_theta ** (-2.0 * np.arange(half) / cfg.rope_dim) / ff
            return np.cos(theta).astype(self.dtype), np.sin(theta).astype(self.dtype)
        theta_scale = F32(math.pow(F32(cfg.rope_theta), F32(-2.0) / F32(cfg.rope_dim)))  # powf in float
        theta = np.empty((len(pos), half), dtype=np.float32)
        t = pos[:, 0].astype(np.float32)
        for i in range(half):  # theta *= theta_scale, sequentially, as ggml_rope_cache_init
            theta[:, i] = t
            t = (t * theta_scale).astype(np.float32)
        theta = (F32(cfg.rope_freq_scale) * (theta / ff.astype(np.float32))).astype(np.float32)
        sin, cos = ge.sincosf(theta)                       # rope_yarn: sincosf, mscale 1
        return cos, sin

    def rope(self, x, cos, sin, neox):
        """Rotate x[T, heads, head_dim] in place by the angles of each position (first rope_dim
        dims). neox=False: pairs (2i, 2i+1); neox=True: pairs (i, i + rope_dim/2)."""
        n = cos.shape[-1] * 2
        c, s = cos[:, None, :], sin[:, None, :]
        first, second = (slice(0, n // 2), slice(n // 2, n)) if neox else (slice(0, n, 2), slice(1, n, 2))
        x0, x1 = x[..., first].copy(), x[..., second].copy()
        if self.mode == "ideal":
            x[..., first] = x0 * c - x1 * s
            x[..., second] = x0 * s + x1 * c
        else:
            x[..., first], x[..., second] = ge.rope_rotate(x0, x1, c, s)

    # ---- the paged KV cache (kv_cache.py) -----------------------------------------------------
    def kv_types(self):
        """(K type, V type) of the cache, as CacheTypes: those chosen at load, else exact rows in
        ideal mode (float64 ones for a float64 reference) and llama.cpp's default F16 cache in
        ggml mode."""
        if self.kv_cache_types is not None:
            return self.kv_cache_types
        if self.mode == "ggml":
            names = ("f16", "f16")
        else:
            names = ("f64", "f64") if self.dtype == np.float64 else ("f32", "f32")
        return tuple(get_cache_type(n) for n in names)

    def kv_rotation_sizes(self, pool) -> tuple[int, int]:
        """(n_k, n_v) of the Hadamard rotation this pool's cache types get (kv_cache.attn_rotation), or (0, 0)."""
        if not self.kv_rotation:
            return 0, 0
        return attn_rotation(pool.k_type, pool.v_type, pool.head_dim)

    def hadamard(self, x, n):
        """x[..., hd] = each run of n values multiplied by the orthonormal n x n Walsh-Hadamard
        matrix, in place (llama_mul_mat_hadamard). ggml mode as ggml_compute_forward_fwht:
        x * (1/sqrtf(n)) first, then the butterflies u + v, u - v for len = 1, 2, ..., n/2, each
        rounded to float32. Ideal mode: the same butterflies in float64, rounded once."""
        shape = x.shape
        dt = np.float32 if self.mode == "ggml" else np.float64
        y = x.reshape(-1, shape[-1] // n, n).astype(dt)
        y = y * (F32(1) / np.sqrt(F32(n)) if self.mode == "ggml" else 1.0 / math.sqrt(n))
        length = 1
        while length < n:
            g = y.reshape(y.shape[0], y.shape[1], n // (2 * length), 2, length)
            u, v = g[:, :, :, 0].copy(), g[:, :, :, 1].copy()
            g[:, :, :, 0] = u + v
            g[:, :, :, 1] = u - v
            length *= 2
        x[...] = y.reshape(shape).astype(x.dtype)

    def new_kv_pool(self, **shape):
        return BlockPool(**shape)

    def store_kv(self, pool, layer, meta, k, v):
        """Rows k, v float[N, n_kv, hd] at meta.slots of layer's K and V, as the pool's types
        store them (F16 in ggml mode: what attention reads back is rounded)."""
        for arr, ctype, rows in ((pool.k, pool.k_type, k), (pool.v, pool.v_type, v)):
            flat = arr[layer].reshape(-1, *arr.shape[-2:])           # [n_blocks * block_size, n_kv, row_bytes]
            buf = np.empty((len(rows),) + arr.shape[-2:], np.uint8)
            ctype.for_layer(layer).store(buf, rows)
            flat[meta.slots] = buf

    @staticmethod
    def gather_raw(pool, layer, meta, seg, n_positions):
        """The stored bytes of K and V of positions 0 .. n_positions - 1 of segment seg's sequence,
        through its block table -> (uint8[n, n_kv, k row_bytes], uint8[n, n_kv, v row_bytes])."""
        ids = meta.tables[seg][: -(-n_positions // meta.block_size)]
        k = pool.k[layer][ids].reshape(-1, *pool.k.shape[-2:])[:n_positions]
        v = pool.v[layer][ids].reshape(-1, *pool.v.shape[-2:])[:n_positions]
        return k, v

    @classmethod
    def gather_kv(cls, pool, layer, meta, seg, n_positions):
        """K and V of positions 0 .. n_positions - 1 of segment seg's sequence, through its block
        table -> (float[n, n_kv, hd], float[n, n_kv, hd])."""
        k, v = cls.gather_raw(pool, layer, meta, seg, n_positions)
        return pool.k_type.for_layer(layer).load(k), pool.v_type.for_layer(layer).load(v)

    def attention(self, out, q, pool, layer, meta):
        """Causal GQA attention over the paged cache: q, out [N, n_heads, hd]; token i attends to
        positions 0 .. meta.positions[i] of its segment's sequence.

        ideal  per token and head, in float64 with every sum in a fixed order: a score sums q.k
               over d in order, the softmax denominator and the V sum run over positions in
               order (np.cumsum is a sequential sum). A token's numbers depend on its own query
               and its sequence's K/V only: the tokens of a segment are computed together, each
               with its later positions masked to exact zeros, which add nothing to a sum.
               Every cache type: K and V are what the type's load gives for its stored bytes.
        ggml   llama.cpp's single-sequence batch of each segment's tokens: mul_mat + soft_max +
               mul_mat (_attention_ggml; F16 or quantized K, F16 V), or with flash_attn its CPU
               flash-attention kernel (_attention_ggml_fa; quantized K, any V). Cache types
               llama.cpp does not have (LMDeploy's, calibrated int8, vLLM's fp8) store and load
               with their exact variant and run the ideal attention: their engines' attention
               is not llama.cpp's."""
        k_type, v_type = pool.k_type, pool.v_type
        ggml_kv = self.mode == "ggml" and k_type.kind in ("float", "ggml") and v_type.kind in ("float", "ggml")
        if ggml_kv:
            check_ggml_kv(k_type.name, v_type.name, self.flash_attn)
        for j in range(len(meta.seg_starts) - 1):
            t0, t1 = int(meta.seg_starts[j]), int(meta.seg_starts[j + 1])
            pos = meta.positions[t0:t1]
            S = int(pos.max()) + 1
            mask = np.arange(S)[None, :] > pos[:, None]                  # [T, S] future positions
            if not ggml_kv:
                k, v = self.gather_kv(pool, layer, meta, j, S)
                self._attention_ideal(out[t0:t1], q[t0:t1], k, v, mask)
                continue
            k_raw, v_raw = self.gather_raw(pool, layer, meta, j, S)
            v = pool.v_type.load(v_raw)
            if self.flash_attn:
                out[t0:t1] = self._attention_ggml_fa(q[t0:t1], k_raw, k_type, v, pos, v_type.name == "f16")
            elif k_type.name == "f16":
                self._attention_ggml(out[t0:t1], q[t0:t1], pool.k_type.load(k_raw), v, mask)
            else:
                self._attention_ggml(out[t0:t1], q[t0:t1], None, v, mask, k_raw=k_raw, k_type=k_type)

    def _attention_ideal(self, out, q, k, v, mask):
        T, n_heads, hd = q.shape
        S, n_kv, _ = k.shape
        group = n_heads // n_kv
        kh = np.repeat(k, group, axis=1).transpose(1, 2, 0).astype(np.float64)   # [n_heads, hd, S]
        vh = np.repeat(v, group, axis=1).transpose(1, 0, 2).astype(np.float64)   # [n_heads, S, hd]
        qh = q.transpose(1, 0, 2).astype(np.float64)                             # [n_heads, T, hd]
        scale = 1.0 / math.sqrt(hd)
        step = max(1, (1 << 24) // (n_heads * S * hd))         # query rows at a time: bounds [n_heads, Tc, S, hd]
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            scores = np.zeros((n_heads, t1 - t0, S))
            for d in range(hd):                                  # sum over d in order
                scores += qh[:, t0:t1, d, None] * kh[:, None, d, :]
            scores *= scale
            scores[:, mask[t0:t1]] = -np.inf
            scores -= scores.max(axis=-1, keepdims=True)
            p = np.exp(scores)                                   # masked positions: exactly 0
            tot = in_order_sum(p, axis=-1)                       # [n_heads, Tc]
            o = in_order_sum(p[..., None] * vh[:, None], axis=2)  # [n_heads, Tc, hd], over positions in order
            out[t0:t1] = (o / tot[..., None]).transpose(1, 0, 2).astype(self.dtype)

    @staticmethod
    def _attention_ggml(out, q, k, v, mask, k_raw=None, k_type=None):
        """llama.cpp's non-flash attention (build_attn_mha): kq = mul_mat(k, q), soft_max_ext(kq,
        mask, scale), kqv = mul_mat(v, kq) with the probabilities rounded to F16 and V (F16)
        stored transposed. An F16 K is an F16 x F16 matmul with Q rounded to F16: the tinyBLAS
        order for a batch (when it takes the shape), ggml_vec_dot_f16 for one token. A
        quantized K (k_raw: its blocks, k_type) is a quantized matmul: Q quantized to the
        type's vec_dot type (q8_0 or q8_1, x86 rounding) and ggml_vec_dot_*_q8_* per block
        (quant_dot; tinyBLAS_Q0_AVX sums in the same order). The KV length is padded to a
        multiple of 256 (llama.cpp's n_kv for a context of 256 or more) with masked zero
        entries: they add exact zeros but decide which lane each real position lands in. Query
        rows are taken in chunks only to bound memory."""
        T, n_heads, hd = q.shape
        S, n_kv, _ = v.shape
        group = n_heads // n_kv
        S_pad = -(-S // 256) * 256
        scale = F32(1) / np.sqrt(F32(hd))                                     # kq_scale = 1.0f/sqrtf(n_embd_head)
        v16 = np.zeros((n_kv, hd, S_pad), np.float32)                         # V transposed
        v16[:, :, :S] = v.transpose(1, 2, 0)
        vh = np.repeat(v16, group, axis=0)[:, None]                           # [n_heads, 1, hd, S_pad]
        full_mask = np.full((T, S_pad), -np.inf, np.float32)
        full_mask[:, :S] = np.where(mask, -np.inf, 0).astype(np.float32)
        kqv_dot = ge.f16_dot_tinyblas if T > 1 and hd % 4 == 0 else ge.f16_dot_vec
        if k_raw is None:
            k16 = np.zeros((n_kv, S_pad, hd), np.float32)
            k16[:, :S] = k.transpose(1, 0, 2)
            kh = np.repeat(k16, group, axis=0)[:, None]                       # [n_heads, 1, S_pad, hd]
            q16 = round_f16(q).transpose(1, 0, 2)[:, :, None, :]              # [n_heads, T, 1, hd]
            kq_dot = ge.f16_dot_tinyblas if T > 1 and hd % 8 == 0 else ge.f16_dot_vec

            def scores(t0, t1):                                               # [n_heads, Tc, S_pad]
                return kq_dot(q16[:, t0:t1], kh)
        else:
            kq_all = quantized_scores(q, k_raw, k_type)                       # [n_heads, T, S]

            def scores(t0, t1):
                kq = np.zeros((n_heads, t1 - t0, S_pad), np.float32)          # padded cells: zero blocks, masked
                kq[:, :, :S] = kq_all[:, t0:t1]
                return kq
        step = max(1, (1 << 22) // (8 * n_heads * S_pad))
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            p16 = round_f16(ge.soft_max(scores(t0, t1), scale, full_mask[t0:t1]))
            out[t0:t1] = kqv_dot(p16[:, :, None, :], vh).transpose(1, 0, 2)   # [Tc, n_heads, hd]

    @staticmethod
    def _attention_ggml_fa(q, k_raw, k_type, v, pos, v_f16):
        """llama.cpp's CPU flash attention for a quantized K (ggml_compute_forward_flash_attn_ext_f16
        always takes its one_chunk kernel then: the tiled and split-KV paths need an F32/F16 K):
        per query row, Q quantized to K's vec_dot type, s = kq_vec_dot(k, Q_q) * scale per
        position, V rows through to_float (F16 V: accumulated in F16), and the online softmax of
        ge.flash_attn_one_chunk -> float32[T, n_heads, hd]."""
        T, n_heads, hd = q.shape
        S, n_kv, _ = v.shape
        group = n_heads // n_kv
        scale = F32(1) / np.sqrt(F32(hd))
        kq = quantized_scores(q, k_raw, k_type) * scale                       # [n_heads, T, S]
        out = np.empty((T, n_heads, hd), np.float32)
        n_pos = np.asarray(pos, np.int64) + 1
        for h in range(n_heads):
            vrows = v[None, :, h // group, :]                                 # [1, S, hd]
            out[:, h] = ge.flash_attn_one_chunk(kq[h], vrows, n_pos, v_f16)
        return out

    def swiglu(self, out, gate, up):
        """out = silu(gate) * up, silu(g) = g / (1 + exp(-g))."""
        if self.mode == "ggml":
            out[...] = ge.swiglu(gate, up)
            return
        g = gate.astype(np.float64)
        out[...] = (g / (1.0 + np.exp(-g))).astype(out.dtype) * up
