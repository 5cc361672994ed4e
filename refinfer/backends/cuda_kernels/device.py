"""The block decoders of blockdecode.py as CUDA device functions, from the very same Python
source the CPU kernels compile: each helper's py_func is re-bound to a namespace in which its
calls to other helpers resolve to their device versions. A fix in blockdecode.py therefore
reaches both backends, and the two cannot drift apart.

Kernels use it as a module, `from .device import bd` then `bd.value(kind, blk, j)`, exactly as
the CPU kernels use `from .. import blockdecode as bd`.
"""

from __future__ import annotations

import types

from numba import cuda

from .. import blockdecode as _cpu

MAX_THREADS = 256   # threads per block block_max's shared scratch is sized for
SCRATCH = MAX_THREADS + 1   # its float64 scratch (a constant: shared array sizes are compile-time)
# A fixed-order sum over n terms (a matmul row, an rmsnorm row): lane l adds terms l, l + LANES,
# l + 2 LANES, ... in order, then the LANES partial sums are added in lane order. Threads take
# lanes (thread i: lanes i, i + blockDim, ...), so the order, and therefore every bit of the
# result, depends on neither the number of threads nor anything else in the launch.
LANES = 32


def _device_module():
    mod = types.ModuleType(__name__ + ".bd")
    ns = mod.__dict__
    ns.update({k: v for k, v in vars(_cpu).items() if not k.startswith("__")})  # np, math, kinds
    for name, obj in vars(_cpu).items():
        py = getattr(obj, "py_func", None)
        if py is not None and py.__module__ == _cpu.__name__:
            f = types.FunctionType(py.__code__, ns, name, py.__defaults__, py.__closure__)
            ns[name] = cuda.jit(device=True)(f)
    return mod


bd = _device_module()


@cuda.jit(device=True)
def decode_group(kind, blk, buf):
    """Values of the group whose bytes start at blk -> buf[:group_size(kind)]: a K-quant
    super-block (256), a 32-element block, or 32 elements of a float type."""
    if kind >= bd.Q2_K:
        bd.decode_kquant(kind, blk, buf, 0)
    elif kind >= bd.Q4_0:
        bd.decode_legacy(kind, blk, buf, 0)
    else:
        for j in range(32):
            buf[j] = bd.value(kind, blk, j)


def group_size(kind):
    return 256 if kind >= _cpu.Q2_K else 32


@cuda.jit(device=True)
def lanes_total(part, i, stride):
    """part[i], part[i + stride], ..., LANES of them, added in lane order from 0.0: the second
    half of a fixed-order sum (see LANES). Every thread that calls it gets the same bits."""
    total = 0.0
    for lane in range(LANES):
        total += part[lane * stride + i]
    return total


@cuda.jit(device=True)
def block_max(scratch, v):
    """Maximum of v over the threads of the block, returned to every thread. scratch is a shared
    float64[SCRATCH]. A maximum is exact in any order, so this may depend on the thread count."""
    tid, nt = cuda.threadIdx.x, cuda.blockDim.x
    scratch[tid] = v
    cuda.syncthreads()
    if tid == 0:
        m = scratch[0]
        for i in range(1, nt):
            m = max(m, scratch[i])
        scratch[MAX_THREADS] = m
    cuda.syncthreads()
    total = scratch[MAX_THREADS]
    cuda.syncthreads()
    return total
