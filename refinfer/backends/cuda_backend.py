"""The `cuda` backend: the reference's ops as numba.cuda kernels, in the same two numeric modes
(see numpy_backend.py for what `ideal` and `ggml` mean), with the numba backend's arithmetic.

GPU memory holds
  the weights   each matrix uploaded once, in its stored block format (uint8[rows, row_bytes]),
                decoded inside the kernels by the block decoders shared with the CPU kernels;
  the KV pool   CudaBlockPool, from new_kv_pool: kv_cache.BlockPool's blocks and bytes, in GPU
                memory; store_kv and attention read and write it through the block tables
                (cuda_kernels/kv.py), and BlockManager's copy-on-write copies blocks there.
                f32 and f16 rows are encoded on the device; the quantized cache types (q8_0,
                q4_0, ..., lmdeploy-int8, int8-calibrated) are quantized on the host by their
                store and their bytes uploaded, and attention decodes them on the device.
Activations live on the host, as forward() allocates them: each op copies its inputs in and its
output back (the logits are the output of the last matmul, copied back once per step).

Matmuls: cuda_kernels/matmul.py, one kernel for a decode and a prompt (token tiles, each decoded
weight group serving a tile of tokens); ggml mode quantizes the activations to q8_0/q8_1 on the
device, to q8_K (K-quants), f16 or bf16 (float weights) on the host with the reference quantizer.

Batch invariance (ideal mode): every output element is the same float operations whatever the
batch: a matmul or rmsnorm row sums in the fixed lane order of cuda_kernels/device.LANES (the
same for T = 1 and T = 512, and for any number of threads per block), attention is per (token,
head) in position order (kv.py), rope and swiglu are elementwise.

Without a GPU the kernels run in numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1): every
thread in Python, very slowly, for tests. Whatever has no kernel here (float64 ideal mode, a
matrix whose width is not a multiple of the block group, a KV cache type outside DEVICE_KV_TYPES
or, in ggml mode, other than f32/f16, a KV pool in host memory) runs the NumPy reference, with
one warning per (op, type).
"""

from __future__ import annotations

import importlib.util
import math
import warnings

import numpy as np

from .. import quant
from ..errors import UnsupportedError
from .. import kv_cache
from ..kv_cache import BlockPool, get_cache_type
from . import blockdecode as bd
from .numpy_backend import VEC_DOT_TYPE, NumpyBackend, round_f16
from ..quant.intgroup import IntGroupTensor

WEIGHT_TYPES = tuple(bd.KINDS)                                     # every type the loader accepts
WEIGHT_OPS = ("embed", "matmul")
ACT_OPS = ("rmsnorm", "rope", "store_kv", "attention", "swiglu")
SHARED_OPS = ("rope_cos_sin",)      # once per forward pass: every backend uses the reference's
THREADS = 128                       # threads per block (at most device.MAX_THREADS)
SIMULATOR_THREADS = 4               # the simulator runs each thread as a Python thread
TOKEN_TILE = 8                      # tokens per thread block of a matmul
# cache types with device kernels (cuda_kernels/kv.py): f32 and f16 stored on the device, the
# others quantized on the host by their store and uploaded; ggml mode runs f32 / f16 only
DEVICE_KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1",
                   "lmdeploy-int8", "lmdeploy-int4", "lmdeploy-pt-int8", "lmdeploy-pt-int4", "int8-calibrated",
                   "fp8", "fp8_e5m2")
DEVICE_STORED_KV_TYPES = ("f32", "f16")
GGML_KV_TYPES = ("f32", "f16")      # ggml mode's kernel is llama.cpp's F16-cache attention


class CudaFallbackWarning(UserWarning):
    pass


def simulated() -> bool:
    """True when numba.cuda runs kernels in its simulator (NUMBA_ENABLE_CUDASIM=1)."""
    from numba import config
    return bool(config.ENABLE_CUDASIM)


def require_cuda():
    """numba.cuda, or a RefinferError that says what is missing and how to get it."""
    if importlib.util.find_spec("numba_cuda") is None:
        raise UnsupportedError("backend 'cuda' needs the numba-cuda package, which is not installed",
                               hint='pip install "refinfer[cuda]"   (or: pip install numba-cuda)')
    from numba import cuda
    if simulated():
        return cuda
    if not cuda.is_available():
        raise UnsupportedError("backend 'cuda' found no usable CUDA GPU: numba.cuda.is_available() is False "
                               "(no NVIDIA GPU or driver visible to this process)",
                               hint="use --backend numba to run on the CPU; to run the CUDA kernels without a GPU "
                                    "(in numba's simulator, very slowly, for tests) set NUMBA_ENABLE_CUDASIM=1")
    try:    # the kernels are compiled on first use: find the compiler libraries now
        cuda.compile_ptx(_probe, "void(int32)", cc=(7, 5))
    except Exception as e:  # the library loaders raise various types
        raise UnsupportedError(f"backend 'cuda' found a GPU but cannot compile kernels: the CUDA compiler "
                               f"libraries (NVVM, NVRTC) did not load ({type(e).__name__}: "
                               f"{str(e).strip().splitlines()[0][:300]})",
                               hint='pip install "numba-cuda[cu13]" (or [cu12] for a CUDA 12 driver), '
                                    "or install a CUDA toolkit and set CUDA_HOME") from None
    return cuda


def _probe(i):
    pass


def coverage(mode="ideal", dtype=np.float32):
    """{(op, type): "native" | "fallback" | "shared"} for this backend in the given mode."""
    native = np.dtype(dtype) == np.float32 or mode == "ggml"
    cov = {(op, t): "native" if native else "fallback" for op in WEIGHT_OPS for t in WEIGHT_TYPES}
    cov.update({(op, "f32"): "native" if native else "fallback" for op in ACT_OPS})
    cov.update({(op, "f32"): "shared" for op in SHARED_OPS})
    # integer-group weights (GPTQ, AWQ, compressed-tensors): cuda_kernels/matmul.matmul_table
    cov.update({(op, "intg"): "native" if np.dtype(dtype) == np.float32 else "fallback" for op in WEIGHT_OPS})
    for name in kv_cache.cache_type_names():     # attention over a cache whose K and V are of that type
        if name != "f32":
            ok = np.dtype(dtype) == np.float32 and name in (DEVICE_KV_TYPES if mode == "ideal" else GGML_KV_TYPES)
            cov[("attention", name)] = "native" if ok else "fallback"
    return cov


def _blocks(n, threads):  # thread blocks of `threads` covering n elements
    return max(1, -(-n // threads))


def _grid_stride_blocks(n, threads):  # a grid-stride kernel: enough blocks, not one per element
    return min(_blocks(n, threads), 1 if simulated() else 4096)


def device_kv_type(ct, mode="ideal") -> bool:
    """A cache type the device pool holds: a name in DEVICE_KV_TYPES (GGML_KV_TYPES in ggml mode),
    and the registered type itself, not an LMDeploy type's exact (fp16-arithmetic) variant, whose
    load the device decoders do not give."""
    if ct.name not in (DEVICE_KV_TYPES if mode == "ideal" else GGML_KV_TYPES):
        return False
    return ct.kind == "calibrated" or kv_cache.CACHE_TYPES.get(ct.name) is ct


class CudaBlockPool(BlockPool):
    """kv_cache.BlockPool with k and v in GPU memory: the same shapes, bytes and copy_block.
    k and v are numba device arrays uint8[n_layers, n_blocks, block_size, n_kv_heads, row_bytes],
    read and written only by the cuda backend's store_kv and attention (and copy_block)."""

    def __init__(self, *args, **kw):
        self.cuda = require_cuda()
        super().__init__(*args, **kw)

    def check_types(self):
        for t in (self.k_type, self.v_type):
            if not device_kv_type(t):
                raise UnsupportedError(f"KV cache type {t.name!r} has no cuda kernels (the device pool holds "
                                       f"{', '.join(DEVICE_KV_TYPES)})",
                                       hint="CudaBackend.new_kv_pool gives a host pool for it, which the "
                                            "NumPy reference's store_kv and attention run on")

    def zeros(self, shape):  # -> device uint8[shape], zeroed on the device (no host copy)
        a = self.cuda.device_array(shape, np.uint8)
        flat = a.reshape(a.size)
        threads = SIMULATOR_THREADS if simulated() else THREADS
        from .cuda_kernels import kv
        kv.fill_zero[_grid_stride_blocks(a.size, threads), threads](flat)
        return a

    def copy_block(self, src: int, dst: int, n_positions: int):
        """The first n_positions of block src, every layer, K and V, into block dst (on the device)."""
        from .cuda_kernels import kv
        threads = SIMULATOR_THREADS if simulated() else THREADS
        for a in (self.k, self.v):
            per_position = a.shape[3] * a.shape[4]
            flat = a.reshape(self.n_layers, self.n_blocks, self.block_size * per_position)
            n = self.n_layers * n_positions * per_position
            if n:
                kv.copy_block[_grid_stride_blocks(n, threads), threads](flat, int(src), int(dst),
                                                                        n_positions * per_position)

    def to_host(self) -> BlockPool:
        """A kv_cache.BlockPool with a copy of this pool's bytes (for tests and inspection)."""
        host = BlockPool(self.n_layers, self.n_kv_heads, self.head_dim, self.n_blocks, self.block_size,
                         self.k_type, self.v_type)
        host.k[...] = self.k.copy_to_host()
        host.v[...] = self.v.copy_to_host()
        return host


class CudaBackend(NumpyBackend):
    name = "cuda"

    def __init__(self, mode="ideal", dtype=np.float32, threads=None, token_tile=TOKEN_TILE):
        super().__init__(mode=mode, dtype=dtype)
        self.cuda = require_cuda()
        if threads is None:
            threads = SIMULATOR_THREADS if simulated() else THREADS
        from .cuda_kernels import kv as kk
        from .cuda_kernels import matmul as mk
        from .cuda_kernels import ops as ok
        from .cuda_kernels.device import MAX_THREADS
        if not 1 <= threads <= MAX_THREADS:
            raise UnsupportedError(f"threads per block must be in 1..{MAX_THREADS}, got {threads}")
        self.mk, self.ok, self.kk = mk, ok, kk
        self.threads, self.tile = int(threads), int(token_tile)
        self._native = self.dtype == np.float32   # the kernels are float32 (ggml mode always is)
        self._warned = set()
        self._weights = {}   # id(QTensor) -> (QTensor, its blocks in GPU memory)
        self._meta = None    # (AttnMeta, its arrays in GPU memory): a step's meta serves every layer

    def new_kv_pool(self, **shape) -> BlockPool:
        """The KV pool in GPU memory (CudaBlockPool); a host kv_cache.BlockPool where the kernels
        do not apply (float64, or a cache type without device kernels), for the reference ops."""
        k_ct, v_ct = (get_cache_type(shape.get(f, "f32")) for f in ("k_type", "v_type"))
        types = f"{k_ct.name}/{v_ct.name}"
        if not self._native:
            self._fallback("new_kv_pool", types, f"dtype {self.dtype}: a host pool")
        elif not (device_kv_type(k_ct, self.mode) and device_kv_type(v_ct, self.mode)):
            self._fallback("new_kv_pool", types, f"no device kernels for this cache type in {self.mode} mode: a host pool")
        elif self.mode == "ggml" and self.flash_attn:
            self._fallback("new_kv_pool", types, "no device kernel for llama.cpp's flash attention: a host pool")
        else:
            return CudaBlockPool(**shape)
        return BlockPool(**shape)

    def device_weights(self, w):  # -> device uint8[rows, row_bytes], uploaded on first use
        """The QTensor is kept with its device copy so that its id cannot be reused."""
        hit = self._weights.get(id(w))
        if hit is None:
            raw = np.ascontiguousarray(w.raw).reshape(w.shape[0], -1)
            hit = self._weights[id(w)] = (w, self.cuda.to_device(raw))
        return hit[1]

    # ---- fallbacks -------------------------------------------------------------------------
    def _fallback(self, op, tname, why):
        if (op, tname) not in self._warned:
            self._warned.add((op, tname))
            warnings.warn(f"cuda backend: {op} on {tname} runs the NumPy reference ({why})",
                          CudaFallbackWarning, stacklevel=3)

    def _kernel_ok(self, op, w):
        tname = w.qtype.name
        group = 256 if tname.endswith("_K") else 32
        if not self._native:
            self._fallback(op, tname, f"dtype {self.dtype}")
        elif tname not in bd.KINDS:
            self._fallback(op, tname, "no kernel for this type")
        elif w.shape[1] % group:
            self._fallback(op, tname, f"{w.shape[1]} columns is not a multiple of {group}")
        else:
            return True
        return False

    def _act_ok(self, op):
        if not self._native:
            self._fallback(op, "f32", f"dtype {self.dtype}")
        return self._native

    def _put(self, a):  # host float32 array -> device
        return self.cuda.to_device(np.ascontiguousarray(a, dtype=np.float32))

    # ---- weight ops ------------------------------------------------------------------------------
    def embed(self, out, w, ids):
        """out[T, dim] = W[ids] (ggml_get_rows)."""
        if isinstance(w, IntGroupTensor) and self._native:
            d_out = self.cuda.device_array(out.shape, np.float32)
            self.mk.dequantize_rows_table[_blocks(out.size, self.threads), self.threads](
                d_out, self.cuda.to_device(np.asarray(ids, dtype=np.int64)), *self.intg_tables(w))
            out[...] = d_out.copy_to_host()
            return
        if isinstance(w, IntGroupTensor) or not self._kernel_ok("embed", w):
            return super().embed(out, w, ids)
        kind = bd.KINDS[w.qtype.name]
        d_out = self.cuda.device_array(out.shape, np.float32)
        groups = out.shape[1] // (256 if kind in bd.KQUANTS else 32)
        n = len(ids) * groups
        self.mk.dequantize_rows(kind)[_blocks(n, self.threads), self.threads](
            d_out, self.device_weights(w), self.cuda.to_device(np.asarray(ids, dtype=np.int64)))
        out[...] = d_out.copy_to_host()

    def intg_tables(self, w):
        """Device (codes, table, g_idx) of an integer-group matrix (IntGroupTensor.kernel_tables),
        uploaded once."""
        hit = self._weights.get(id(w))
        if hit is None:
            parts = w.kernel_tables()
            hit = self._weights[id(w)] = (w, tuple(self.cuda.to_device(np.ascontiguousarray(a)) for a in parts))
        return hit[1]

    def intg_dot(self, out, x, w):
        if not self._native:
            self._fallback("matmul", "intg", f"dtype {self.dtype}")
            return super().intg_dot(out, x, w)
        T, N = out.shape
        d_out = self.cuda.device_array((T, N), np.float32)
        self.mk.matmul_table[_blocks(T * N, self.threads), self.threads](d_out, self._put(x), *self.intg_tables(w))
        out[...] = d_out.copy_to_host()

    def matmul(self, out, x, w):
        """out[T, rows] = x[T, cols] @ W(rows, cols).T"""
        if isinstance(w, IntGroupTensor):
            return self.intg_matmul(out, x, w)      # the reference's a16 / ggml handling, then intg_dot
        if not self._kernel_ok("matmul", w):
            return super().matmul(out, x, w)
        kind = bd.KINDS[w.qtype.name]
        T, rows = out.shape
        tile = self.tile            # one kernel for every T: the same sums for a decode and a prompt
        grid, threads = (rows, _blocks(T, tile)), self.matmul_threads(w)
        d_out = self.cuda.device_array((T, rows), np.float32)
        vd = VEC_DOT_TYPE[w.qtype.name]
        if self.mode == "ggml" and vd in ("q8_0", "q8_1"):
            xq, xd, xs = self.quantize_act_q8(self._put(x))
            self.mk.matmul_q8(kind, tile)[grid, threads](d_out, xq, xd, xs, self.device_weights(w))
        else:
            if self.mode == "ggml":      # the activations as ggml's vec_dot type sees them
                x = self.vec_dot_activations(x, vd)
            self.mk.matmul_float(kind, tile)[grid, threads](d_out, self._put(x), self.device_weights(w))
        out[...] = d_out.copy_to_host()

    def matmul_threads(self, w):
        """Threads per output row: no more than its lanes (LANES) or its groups, at least 1."""
        groups = w.shape[1] // (256 if w.qtype.name.endswith("_K") else 32)
        return max(1, min(self.threads, self.mk.LANES, groups))

    @staticmethod
    def vec_dot_activations(x, vd):
        if vd == "q8_K":   # x86 quantize_row_q8_K is the reference quantizer
            return quant.dequantize(quant.quantize(np.ascontiguousarray(x, np.float32), "q8_K"), "q8_K")
        if vd == "f16":
            return round_f16(np.asarray(x, np.float32))
        if vd == "bf16":
            return quant.dequantize(quant.quantize(np.ascontiguousarray(x, np.float32), "bf16"), "bf16")
        return x

    def quantize_act_q8(self, d_x):  # device float32[T, cols] -> device (int8[T, cols], float32[T, nb] x 2)
        T, cols = d_x.shape
        xq = self.cuda.device_array((T, cols), np.int8)
        xd = self.cuda.device_array((T, cols // 32), np.float32)
        xs = self.cuda.device_array((T, cols // 32), np.float32)
        self.mk.quantize_act_q8[_blocks(T * (cols // 32), self.threads), self.threads](d_x, xq, xd, xs)
        return xq, xd, xs

    # ---- per-token ops ----------------------------------------------------------------------------
    def rmsnorm(self, out, x, weight, eps):
        if not self._act_ok("rmsnorm"):
            return super().rmsnorm(out, x, weight, eps)
        d_out = self.cuda.device_array(out.shape, np.float32)
        self.ok.rmsnorm[out.shape[0], self.threads](d_out, self._put(x), self._put(weight), float(eps),
                                                    self.mode == "ggml")
        out[...] = d_out.copy_to_host()

    def rope(self, x, cos, sin, neox):
        if not self._act_ok("rope"):
            return super().rope(x, cos, sin, neox)
        T, H, _ = x.shape
        d_x = self._put(x)
        self.ok.rope[_blocks(T * H * cos.shape[1], self.threads), self.threads](
            d_x, self._put(cos), self._put(sin), bool(neox))
        x[...] = d_x.copy_to_host()

    def _on_device_pool(self, op, pool):
        if not isinstance(pool, CudaBlockPool):
            self._fallback(op, pool.k_type.name, "the KV pool is in host memory")
            return False
        if not self._native:
            raise UnsupportedError(f"{op}: a KV pool in GPU memory, but dtype {self.dtype} has no cuda kernels "
                                   "(they are float32)",
                                   hint="make the pool with this backend's new_kv_pool, which gives a host pool "
                                        "for float64")
        return True

    def _device_meta(self, meta):  # -> the step's AttnMeta arrays on the device, uploaded once a step
        if self._meta is None or self._meta[0] is not meta:
            put = self.cuda.to_device
            self._meta = (meta, {
                "slots": put(np.ascontiguousarray(meta.slots, np.int64)),
                "positions": put(np.ascontiguousarray(meta.positions, np.int64)),
                "seg_of_token": put(np.ascontiguousarray(meta.seg_of_token, np.int32)),
                "tables": put(np.ascontiguousarray(meta.tables, np.int32)),
                "scores": {},   # n_heads -> float64[N, n_heads, max position + 1], attention's scratch
            })
        return self._meta[1]

    def _rows(self, a, cache_type):  # a layer's uint8[n_blocks, block_size, n_kv, row_bytes] -> typed rows
        return a.view(self.kk.ROW_DTYPE[cache_type.name])

    def store_kv(self, pool, layer, meta, k, v):
        """Rows k, v float32[N, n_kv, hd] at the slots meta.slots of layer `layer` of the pool, as
        its cache types store them (f16: GGML_FP32_TO_FP16 bits)."""
        if not self._on_device_pool("store_kv", pool):
            return super().store_kv(pool, layer, meta, k, v)
        N, H, D = k.shape
        d = self._device_meta(meta)
        if pool.k_type.name not in DEVICE_STORED_KV_TYPES or pool.v_type.name not in DEVICE_STORED_KV_TYPES:
            return self._store_kv_host_quantized(pool, layer, d, k, v)
        kernel = self.kk.store_kv(pool.k_type.name, pool.v_type.name)
        kernel[_blocks(N * H * D, self.threads), self.threads](
            self._rows(pool.k[layer], pool.k_type), self._rows(pool.v[layer], pool.v_type), d["slots"],
            pool.block_size, self._put(k), self._put(v))

    def _store_kv_host_quantized(self, pool, layer, d, k, v):
        """The rows quantized on the host by each cache type's store (the reference's bytes),
        uploaded, and scattered into the pool at the step's slots."""
        for arr, ct, rows in ((pool.k, pool.k_type, k), (pool.v, pool.v_type, v)):
            buf = np.empty((len(rows), pool.n_kv_heads, arr.shape[4]), np.uint8)
            ct.for_layer(layer).store(buf, rows)
            n = len(rows) * pool.n_kv_heads
            self.kk.scatter_rows[_blocks(n, self.threads), self.threads](arr[layer], d["slots"], pool.block_size,
                                                                        self.cuda.to_device(buf))

    def _row_params(self, pool, layer):  # -> device (k_par, v_par) float32[2, n_kv]: calibrated scales
        from .numba_backend import row_params
        return tuple(self.cuda.to_device(row_params(ct.for_layer(layer), pool.n_kv_heads))
                     for ct in (pool.k_type, pool.v_type))

    def attention(self, out, q, pool, layer, meta):
        """Causal GQA attention of q float32[N, n_heads, hd] over each token's own sequence in the
        pool (positions 0..meta.positions[i] through its block table) -> out[N, n_heads, hd]."""
        N, n_heads, hd = q.shape
        if not self._on_device_pool("attention", pool):
            return super().attention(out, q, pool, layer, meta)
        if self.mode == "ggml" and self.flash_attn:
            raise UnsupportedError("attention: a KV pool in GPU memory, but flash attention (ggml mode) has no cuda kernel",
                                   hint="make the pool with this backend's new_kv_pool after setting flash_attn "
                                        "(refinfer.load does): it gives a host pool for the reference")
        d = self._device_meta(meta)
        if n_heads not in d["scores"]:
            S = int(np.max(meta.positions)) + 1
            d["scores"][n_heads] = self.cuda.device_array((N, n_heads, S), np.float64)
        d_out = self.cuda.device_array(out.shape, np.float32)
        kernel = self.kk.attention(pool.k_type.name, pool.v_type.name)
        kernel[N * n_heads, self.threads](
            d_out, self._put(q), self._rows(pool.k[layer], pool.k_type), self._rows(pool.v[layer], pool.v_type),
            d["positions"], d["seg_of_token"], d["tables"], pool.block_size, 1.0 / math.sqrt(hd),
            d["scores"][n_heads], self.mode == "ggml", *self._row_params(pool, layer))
        out[...] = d_out.copy_to_host()

    def swiglu(self, out, gate, up):
        if not self._act_ok("swiglu"):
            return super().swiglu(out, gate, up)
        d_out = self.cuda.device_array(out.shape, np.float32)
        self.ok.swiglu[_blocks(out.size, self.threads), self.threads](d_out, self._put(gate), self._put(up),
                                                                      self.mode == "ggml")
        out[...] = d_out.copy_to_host()


__all__ = ["CudaBackend", "CudaBlockPool", "coverage", "require_cuda", "simulated", "WEIGHT_TYPES",
           "CudaFallbackWarning"]
