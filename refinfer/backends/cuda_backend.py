"""The `cuda` backend: the reference's ops as numba.cuda kernels, in the same two numeric modes
(see numpy_backend.py for what `ideal` and `ggml` mean), with the numba backend's arithmetic.

GPU memory holds
  the weights   each matrix uploaded once, in its stored block format (uint8[rows, row_bytes]),
                decoded inside the kernels by the block decoders shared with the CPU kernels;
  the KV cache  DeviceKVCache, from new_kv_cache (Model.new_cache asks the backend for it).
Activations live on the host, as forward() allocates them: each op copies its inputs in and its
output back (the logits are the output of the last matmul, copied back once per step).

Matmuls: cuda_kernels/matmul.py (fused dequantize-matvec for one token, token tiles for a
prompt); ggml mode quantizes the activations to q8_0/q8_1 on the device, to q8_K (K-quants),
f16 or bf16 (float weights) on the host with the reference quantizer.

Without a GPU the kernels run in numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1): every
thread in Python, very slowly, for tests. Whatever has no kernel here (float64 ideal mode, a
matrix whose width is not a multiple of the block group) runs the NumPy reference, with one
warning per (op, type).
"""

from __future__ import annotations

import importlib.util
import math
import warnings

import numpy as np

from .. import quant
from ..errors import UnsupportedError
from ..forward import KVCache
from . import blockdecode as bd
from .numpy_backend import VEC_DOT_TYPE, NumpyBackend, round_f16

WEIGHT_TYPES = tuple(bd.KINDS)                                     # every type the loader accepts
WEIGHT_OPS = ("embed", "matmul")
ACT_OPS = ("rmsnorm", "rope", "store_kv", "attention", "swiglu")
SHARED_OPS = ("rope_cos_sin",)      # once per forward pass: every backend uses the reference's
THREADS = 128                       # threads per block (at most device.MAX_THREADS)
SIMULATOR_THREADS = 4               # the simulator runs each thread as a Python thread
TOKEN_TILE = 8                      # tokens per thread block in a prompt matmul


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
    return cov


def _on_device(a) -> bool:
    return not isinstance(a, np.ndarray)


def _blocks(n, threads):  # thread blocks of `threads` covering n elements
    return max(1, -(-n // threads))


class DeviceKVCache:
    """forward.KVCache with k and v in GPU memory. forward() indexes it as the NumPy cache:
    cache.k[i] and cache.k[i, :n] are device views, read and written only by this backend's
    store_kv and attention."""

    def __init__(self, cuda, cfg, max_len: int):
        shape = (cfg.n_layers, max_len, cfg.n_kv_heads, cfg.head_dim)
        self.k = cuda.device_array(shape, np.float32)  # [layer, position, kv_head, head_dim]
        self.v = cuda.device_array(shape, np.float32)  # positions >= pos are never read
        self.max_len = max_len
        self.pos = 0

    def truncate(self, n: int):
        """Forget positions >= n (reuse a shared prompt prefix)."""
        self.pos = min(self.pos, n)


class CudaBackend(NumpyBackend):
    name = "cuda"

    def __init__(self, mode="ideal", dtype=np.float32, threads=None, token_tile=TOKEN_TILE):
        super().__init__(mode=mode, dtype=dtype)
        self.cuda = require_cuda()
        if threads is None:
            threads = SIMULATOR_THREADS if simulated() else THREADS
        from .cuda_kernels import matmul as mk
        from .cuda_kernels import ops as ok
        from .cuda_kernels.device import MAX_THREADS
        if not 1 <= threads <= MAX_THREADS:
            raise UnsupportedError(f"threads per block must be in 1..{MAX_THREADS}, got {threads}")
        self.mk, self.ok = mk, ok
        self.threads, self.tile = int(threads), int(token_tile)
        self._native = self.dtype == np.float32   # the kernels are float32 (ggml mode always is)
        self._warned = set()
        self._weights = {}   # id(QTensor) -> (QTensor, its blocks in GPU memory)

    def new_kv_cache(self, cfg, max_len):
        if not self._native:    # the fallback ops read a NumPy cache
            return KVCache(cfg, max_len, dtype=self.dtype)
        return DeviceKVCache(self.cuda, cfg, max_len)

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
        if not self._kernel_ok("embed", w):
            return super().embed(out, w, ids)
        kind = bd.KINDS[w.qtype.name]
        d_out = self.cuda.device_array(out.shape, np.float32)
        groups = out.shape[1] // (256 if kind in bd.KQUANTS else 32)
        n = len(ids) * groups
        self.mk.dequantize_rows(kind)[_blocks(n, self.threads), self.threads](
            d_out, self.device_weights(w), self.cuda.to_device(np.asarray(ids, dtype=np.int64)))
        out[...] = d_out.copy_to_host()

    def matmul(self, out, x, w):
        """out[T, rows] = x[T, cols] @ W(rows, cols).T"""
        if not self._kernel_ok("matmul", w):
            return super().matmul(out, x, w)
        kind = bd.KINDS[w.qtype.name]
        T, rows = out.shape
        tile = 1 if T == 1 else self.tile
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
        """Threads per output row: no more than the row has groups, rounded up to a warp (32)."""
        groups = w.shape[1] // (256 if w.qtype.name.endswith("_K") else 32)
        return min(self.threads, 32 * _blocks(groups, 32))

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

    def store_kv(self, cache, pos0, x):
        """cache[pos0 : pos0 + T] = x; the cache is a DeviceKVCache layer (or a NumPy array)."""
        if not _on_device(cache):
            return super().store_kv(cache, pos0, x)
        self.ok.store_kv[_blocks(x.size, self.threads), self.threads](cache, int(pos0), self._put(x),
                                                                      self.mode == "ggml")

    def attention(self, out, q, k, v, pos0):
        if not self._act_ok("attention"):
            return super().attention(out, q, k, v, pos0)
        T, n_heads, hd = q.shape
        S = k.shape[0]
        d_k = k if _on_device(k) else self._put(k)
        d_v = v if _on_device(v) else self._put(v)
        ggml = self.mode == "ggml"
        scores = self.cuda.device_array((n_heads, T, S), np.float64)
        self.ok.attention_scores[_blocks(scores.size, self.threads), self.threads](
            scores, self._put(q), d_k, int(pos0), 1.0 / math.sqrt(hd), ggml)
        self.ok.softmax[n_heads * T, self.threads](scores, int(pos0), ggml)
        d_out = self.cuda.device_array(out.shape, np.float32)
        self.ok.attention_values[_blocks(out.size, self.threads), self.threads](d_out, scores, d_v, int(pos0))
        out[...] = d_out.copy_to_host()

    def swiglu(self, out, gate, up):
        if not self._act_ok("swiglu"):
            return super().swiglu(out, gate, up)
        d_out = self.cuda.device_array(out.shape, np.float32)
        self.ok.swiglu[_blocks(out.size, self.threads), self.threads](d_out, self._put(gate), self._put(up),
                                                                      self.mode == "ggml")
        out[...] = d_out.copy_to_host()


__all__ = ["CudaBackend", "DeviceKVCache", "coverage", "require_cuda", "simulated", "WEIGHT_TYPES",
           "CudaFallbackWarning"]
