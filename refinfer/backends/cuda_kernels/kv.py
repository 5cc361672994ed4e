"""The paged KV cache on the device: store_kv, attention and the pool's byte copies.

The pool has kv_cache.BlockPool's layout and bytes (see kv_cache.py), in GPU memory:

    k, v    uint8[n_layers, n_blocks, block_size, n_kv_heads, row_bytes]

A kernel reads one layer's rows through a typed view of the same bytes (CUDA devices are
little-endian, as the host's CacheType.store writes them), [n_blocks, block_size, n_kv_heads,
head_dim] of
    f32   float32 values: the row's bytes are the floats;
    f16   uint16 IEEE binary16 bits, encoded by f16_bits and decoded by blockdecode's
          fp16_to_f32 (the decoder the f16 weights use);
or as the bytes themselves, uint8[n_blocks, block_size, n_kv_heads, row_bytes], for every other
type with a row decoder: the ggml block types (bf16, q8_0, q4_0, q4_1, q5_0, q5_1: each element
through blockdecode.value on its block, as the weights) and the LMDeploy / calibrated types
(kvdecode's per-element functions; int8-calibrated takes its layer's scale and zp per KV head
from `par`, float32[2, n_kv]). Those rows are quantized on the host by the type's own store
(the bytes the reference writes) and scattered into the pool by scatter_rows.
A cache type is an entry of ROW_DTYPE and LOAD (and STORE for the two written on the device);
the kernels are built per (K type, V type), so each compiled kernel contains its own types'
code only. A position p of a sequence lives at slot table[p // block_size] * block_size +
p % block_size.

Batch invariance of attention: one thread block per (token, head), and every number it
produces is a fixed sequence of float operations over that token's query and the rows of
positions 0..pos of its own sequence: each score is a dot product in head-dim order, the
softmax denominator is summed in position order by one thread, and each output element sums
its positions in position order. The block table only says where a row is: a row decodes to
the same value from any block, so neither the block size nor the other tokens of the step can
change a bit, and neither can the number of threads (the maximum is exact in any order).
"""

from __future__ import annotations

import functools
import math
import types

import numpy as np
from numba import cuda

from .. import blockdecode as _bd_cpu
from .. import kvdecode as _kd_cpu
from ... import quant
from .device import SCRATCH, bd, block_max


def _device_kvdecode():
    """kvdecode's functions as device functions (device.py's scheme: the same source, its calls
    to blockdecode helpers bound to their device versions)."""
    mod = types.ModuleType(__name__ + ".kd")
    ns = mod.__dict__
    ns.update({k: v for k, v in vars(_kd_cpu).items() if not k.startswith("__")})
    for name, obj in vars(_kd_cpu).items():
        py = getattr(obj, "py_func", None)
        if py is None:
            continue
        if py.__module__ == _bd_cpu.__name__:
            ns[name] = getattr(bd, name)
        elif py.__module__ == _kd_cpu.__name__:
            ns[name] = cuda.jit(device=True)(types.FunctionType(py.__code__, ns, name, py.__defaults__, py.__closure__))
    return mod


kd = _device_kvdecode()

GGML_ROWS = ("bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")     # rows of ggml blocks
ROW_DTYPE = {"f32": np.float32, "f16": np.uint16,                  # the typed view of a row's bytes
             **{name: np.uint8 for name in (*GGML_ROWS, *_kd_cpu.KINDS)}}


@cuda.jit(device=True)
def f16_bits(x):
    """float32 -> IEEE binary16 bits: round to nearest even with subnormals, overflow to inf
    (GGML_FP32_TO_FP16, and kv_cache's F16 store), a NaN to the quiet NaN 0x7E00 with its sign."""
    sign = 0x8000 if math.copysign(1.0, x) < 0 else 0
    if x != x:
        return sign | 0x7E00
    v = abs(np.float64(bd.round_f16(x)))        # the nearest binary16 value (inf past 65504)
    if math.isinf(v):
        return sign | 0x7C00
    if v == 0.0:
        return sign
    m, e = math.frexp(v)                        # v = m 2^e, 0.5 <= m < 1
    if e <= -14:                                # below 2^-14: subnormal, v = mant 2^-24
        return sign | int(math.ldexp(v, 24))
    return sign | ((e + 14) << 10) | (int(math.ldexp(m, 11)) - 1024)   # exponent e - 1 + 15, 10 bits of 2m - 1


@cuda.jit(device=True)
def load_f32(rows, b, o, h, d, par):
    return rows[b, o, h, d]


@cuda.jit(device=True)
def load_f16(rows, b, o, h, d, par):
    return bd.fp16_to_f32(rows[b, o, h, d])


def _ggml_loader(name):
    """Element d of a row of ggml blocks: blockdecode.value on block d // block_size."""
    t = quant.get_type(name)
    kind, bs, ts = bd.KINDS[name], t.block_size, t.type_size

    @cuda.jit(device=True)
    def load(rows, b, o, h, d, par):
        g = d // bs
        return bd.value(kind, rows[b, o, h, g * ts:(g + 1) * ts], d - g * bs)
    return load


def _lmdeploy_loader(elem, nibbles):
    """Element d of an LMDeploy row: codes (hd bytes, or hd / 2 for int4), then scale and zero."""
    @cuda.jit(device=True)
    def load(rows, b, o, h, d, par):
        nc = rows.shape[3] - 4
        return elem(rows[b, o, h], d, 2 * nc if nibbles else nc)
    return load


def _fp8_loader(elem):
    """Element d of a vLLM fp8 row: one code per element."""
    @cuda.jit(device=True)
    def load(rows, b, o, h, d, par):
        return elem(rows[b, o, h], d, 0)
    return load


@cuda.jit(device=True)
def load_int8_calibrated(rows, b, o, h, d, par):
    return kd.int8_calibrated_elem(rows[b, o, h], d, par[0, h], par[1, h])


@cuda.jit(device=True)
def store_f32(rows, b, o, h, d, x):
    rows[b, o, h, d] = x


@cuda.jit(device=True)
def store_f16(rows, b, o, h, d, x):
    rows[b, o, h, d] = f16_bits(x)


LOAD = {"f32": load_f32, "f16": load_f16, **{name: _ggml_loader(name) for name in GGML_ROWS},
        "lmdeploy-int8": _lmdeploy_loader(kd.lmdeploy_int8_elem, False),
        "lmdeploy-int4": _lmdeploy_loader(kd.lmdeploy_int4_elem, True),
        "lmdeploy-pt-int8": _lmdeploy_loader(kd.lmdeploy_pt_int8_elem, False),
        "lmdeploy-pt-int4": _lmdeploy_loader(kd.lmdeploy_pt_int4_elem, True),
        "int8-calibrated": load_int8_calibrated,
        "fp8": _fp8_loader(kd.fp8_e4m3_elem), "fp8_e5m2": _fp8_loader(kd.fp8_e5m2_elem)}
STORE = {"f32": store_f32, "f16": store_f16}


@functools.cache
def store_kv(k_type, v_type):
    store_k, store_v = STORE[k_type], STORE[v_type]

    @cuda.jit
    def kernel(k_rows, v_rows, slots, block_size, k, v):
        """k_rows/v_rows (one layer's typed rows) at slots[t] = k[t], v[t] (float32[N, n_kv, hd]),
        each value as its cache type stores it. One thread per (token, head, element)."""
        N, H, D = k.shape
        i = cuda.grid(1)
        if i >= N * H * D:
            return
        t, h, d = i // (H * D), (i // D) % H, i % D
        b, o = slots[t] // block_size, slots[t] % block_size
        store_k(k_rows, b, o, h, d, k[t, h, d])
        store_v(v_rows, b, o, h, d, v[t, h, d])

    return kernel


@cuda.jit
def scatter_rows(rows, slots, block_size, src):
    """rows uint8[n_blocks, block_size, n_kv, row_bytes] at slots[t] = src[t] (uint8[N, n_kv,
    row_bytes], rows the host quantized with the cache type's store). One thread per row."""
    N, H, R = src.shape
    i = cuda.grid(1)
    if i >= N * H:
        return
    t, h = i // H, i % H
    b, o = slots[t] // block_size, slots[t] % block_size
    for r in range(R):
        rows[b, o, h, r] = src[t, h, r]


@functools.cache
def attention(k_type, v_type):
    load_k, load_v = LOAD[k_type], LOAD[v_type]

    @cuda.jit
    def kernel(out, q, k_rows, v_rows, positions, seg_of_token, tables, block_size, scale, scores, ggml, k_par, v_par):
        """Causal GQA attention over the paged cache. out, q float32[N, n_heads, hd]; token t
        attends to positions 0..positions[t] of its sequence, whose block table is
        tables[seg_of_token[t]]; scores float64[N, n_heads, >= max(positions) + 1] is scratch;
        k_par, v_par float32[2, n_kv]: a calibrated type's (scale, zp) per KV head (unused otherwise).
        One thread block per (token, head): grid N * n_heads.
        ideal (the reference's order): scores q.k * scale in float64, e = exp(s - max), out =
        (sum of e * v) / (sum of e) in float64, rounded once. ggml (llama.cpp's F16 cache, build_attn_mha): Q rounded
        to F16, the dot rounded to float then scaled in float; exp in float, sum in double,
        p = F16(exp * float(1 / sum)) (the F16 V matmul's operand)."""
        N, n_heads, hd = q.shape
        group = n_heads // k_rows.shape[2]
        t, h = cuda.blockIdx.x // n_heads, cuda.blockIdx.x % n_heads
        kv = h // group
        tid, nt = cuda.threadIdx.x, cuda.blockDim.x
        n = positions[t] + 1
        table = tables[seg_of_token[t]]
        scratch = cuda.shared.array(SCRATCH, np.float64)
        mx = -math.inf
        for s in range(tid, n, nt):               # scores: one position per thread at a time
            b, o = table[s // block_size], s % block_size
            acc = 0.0
            for d in range(hd):
                qd = bd.round_f16(q[t, h, d]) if ggml else q[t, h, d]
                acc += np.float64(qd) * np.float64(load_k(k_rows, b, o, kv, d, k_par))
            sc = np.float64(np.float32(acc) * np.float32(scale)) if ggml else acc * scale
            scores[t, h, s] = sc
            mx = max(mx, sc)
        mx = block_max(scratch, mx)               # syncs: every score is written
        for s in range(tid, n, nt):
            if ggml:
                e = np.float64(np.float32(math.exp(np.float32(np.float32(scores[t, h, s]) - np.float32(mx)))))
            else:
                e = math.exp(scores[t, h, s] - mx)
            scores[t, h, s] = e
        cuda.syncthreads()
        if tid == 0:                              # the denominator, in position order
            tot = 0.0
            for s in range(n):
                tot += scores[t, h, s]
            scratch[0] = tot
        cuda.syncthreads()
        tot = scratch[0]
        inv = np.float32(1.0 / tot)
        for d in range(tid, hd, nt):              # each output element over positions in order
            acc = 0.0
            for s in range(n):
                b, o = table[s // block_size], s % block_size
                if ggml:
                    p = np.float64(bd.round_f16(np.float32(scores[t, h, s]) * inv))
                else:
                    p = scores[t, h, s]
                acc += p * np.float64(load_v(v_rows, b, o, kv, d, v_par))
            out[t, h, d] = acc if ggml else acc / tot

    return kernel


@cuda.jit
def copy_block(pool, src, dst, n_bytes):
    """pool uint8[n_layers, n_blocks, block_bytes]: the first n_bytes of block src -> block dst,
    in every layer. A grid-stride loop over (layer, byte)."""
    n_layers = pool.shape[0]
    for i in range(cuda.grid(1), n_layers * n_bytes, cuda.gridsize(1)):
        layer, j = i // n_bytes, i % n_bytes
        pool[layer, dst, j] = pool[layer, src, j]


@cuda.jit
def fill_zero(a):
    """a uint8[n] = 0: a grid-stride loop."""
    for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
        a[i] = 0
