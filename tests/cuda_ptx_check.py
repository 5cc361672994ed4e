"""Compile every kernel of the cuda backend to PTX, as numba.cuda does for a real GPU, without
needing one: the simulator runs any Python, so only this catches code that CUDA cannot compile
(an unsupported NumPy function, a shared array size that is not a constant).

    NUMBA_ENABLE_CUDASIM=0 python tests/cuda_ptx_check.py [CC, default 8.0]

Prints one line per kernel and exits 1 if any fails; prints "SKIP: ..." and exits 0 only when
the CUDA compiler libraries (NVVM, NVRTC: numba-cuda[cu13], which the test extra installs, or
a CUDA toolkit) cannot be found. Any other error of the probe is raised (exit status 1). Run by
tests/test_cuda_backend.py, which fails on a crash and, under CI=true, on the skip.
"""

from __future__ import annotations

import sys
import types

from numba import cuda
from numba import from_dtype
from numba import types as nt

CC = tuple(int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "8.0").split("."))


def _library_missing(e: Exception) -> bool:
    # cuda.pathfinder's DynamicLibNotFoundError (NVRTC), numba's NvvmSupportError (libNVVM),
    # or an OSError of the loader: the libraries are absent, not broken
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"DynamicLibNotFoundError", "NvvmSupportError", "NvrtcSupportError", "OSError"})


def main():
    try:
        cuda.compile_ptx(lambda a: None, (nt.float32[::1],), cc=CC)
    except Exception as e:
        if not _library_missing(e):
            raise
        print(f"SKIP: no CUDA compiler libraries ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        return 0
    import numba.cuda.dispatcher as dispatcher
    if not cuda.is_available():   # device functions are compiled for the current device's cc
        dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=CC)

    from refinfer.backends import blockdecode as bd
    from refinfer.backends.cuda_kernels import kv
    from refinfer.backends.cuda_kernels import matmul as mk
    from refinfer.backends.cuda_kernels import ops as ok

    u8_1d, u8_2d, u8_3d, i8_2d = nt.uint8[::1], nt.Array(nt.uint8, 2, "A"), nt.uint8[:, :, ::1], nt.int8[:, ::1]
    f32_1d, f32_2d, f32_3d = nt.float32[::1], nt.float32[:, ::1], nt.float32[:, :, ::1]
    f64_3d, i32_1d, i32_2d, i64_1d = nt.float64[:, :, ::1], nt.int32[::1], nt.int32[:, ::1], nt.int64[::1]
    i64, f64, b = nt.int64, nt.float64, nt.boolean
    rows = {name: nt.Array(from_dtype(dt), 4, "C") for name, dt in kv.ROW_DTYPE.items()}  # one layer's typed rows
    kernels = []
    for name, kind in bd.KINDS.items():
        kernels.append((f"dequantize_rows {name}", mk.dequantize_rows(kind), (f32_2d, u8_2d, i64_1d)))
        for tile in (1, 8):
            kernels.append((f"matmul_float {name} tile {tile}", mk.matmul_float(kind, tile), (f32_2d, f32_2d, u8_2d)))
            if kind in bd.LEGACY:
                kernels.append((f"matmul_q8 {name} tile {tile}", mk.matmul_q8(kind, tile), (f32_2d, i8_2d, f32_2d, f32_2d, u8_2d)))
    for k_type in kv.STORE:
        for v_type in kv.STORE:
            kernels.append((f"store_kv {k_type}/{v_type}", kv.store_kv(k_type, v_type),
                            (rows[k_type], rows[v_type], i64_1d, i64, f32_3d, f32_3d)))
    # attention: every pair of the device-stored types, and every other type with K = V (each
    # type's decoder compiles once; a mixed pair is the same two decoders)
    pairs = [(k, v) for k in kv.STORE for v in kv.STORE] + [(t, t) for t in kv.LOAD if t not in kv.STORE]
    for k_type, v_type in pairs:
        kernels.append((f"attention {k_type}/{v_type}", kv.attention(k_type, v_type),
                        (f32_3d, f32_3d, rows[k_type], rows[v_type], i64_1d, i32_1d, i32_2d, i64, f64, f64_3d, b,
                         f32_2d, f32_2d)))
    kernels.append(("scatter_rows", kv.scatter_rows, (rows["q8_0"], i64_1d, i64, u8_3d)))
    kernels += [
        ("quantize_act_q8", mk.quantize_act_q8, (f32_2d, i8_2d, f32_2d, f32_2d)),
        ("rmsnorm", ok.rmsnorm, (f32_2d, f32_2d, f32_1d, f64, b)),
        ("rope", ok.rope, (f32_3d, f32_2d, f32_2d, b)),
        ("swiglu", ok.swiglu, (f32_2d, f32_2d, f32_2d, b)),
        ("copy_block", kv.copy_block, (u8_3d, i64, i64, i64)),
        ("fill_zero", kv.fill_zero, (u8_1d,)),
    ]
    failed = 0
    for name, kernel, sig in kernels:
        try:
            cuda.compile_ptx(kernel.py_func, sig, cc=CC)
            print(f"ok    {name}")
        except Exception as e:
            failed += 1
            print(f"FAIL  {name}: {type(e).__name__}: {str(e)[:2000]}")
    print(f"{len(kernels) - failed} of {len(kernels)} kernels compile for sm_{CC[0]}{CC[1]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
