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
    from refinfer.backends.cuda_kernels import matmul as mk
    from refinfer.backends.cuda_kernels import ops as ok

    u8_2d, i8_2d = nt.Array(nt.uint8, 2, "A"), nt.int8[:, ::1]
    f32_1d, f32_2d, f32_3d, f32_3d_view = nt.float32[::1], nt.float32[:, ::1], nt.float32[:, :, ::1], nt.Array(nt.float32, 3, "A")
    f64_3d, i64, f64, b = nt.float64[:, :, ::1], nt.int64, nt.float64, nt.boolean
    kernels = []
    for name, kind in bd.KINDS.items():
        kernels.append((f"dequantize_rows {name}", mk.dequantize_rows(kind), (f32_2d, u8_2d, nt.int64[::1])))
        for tile in (1, 8):
            kernels.append((f"matmul_float {name} tile {tile}", mk.matmul_float(kind, tile), (f32_2d, f32_2d, u8_2d)))
            if kind in bd.LEGACY:
                kernels.append((f"matmul_q8 {name} tile {tile}", mk.matmul_q8(kind, tile), (f32_2d, i8_2d, f32_2d, f32_2d, u8_2d)))
    kernels += [
        ("quantize_act_q8", mk.quantize_act_q8, (f32_2d, i8_2d, f32_2d, f32_2d)),
        ("rmsnorm", ok.rmsnorm, (f32_2d, f32_2d, f32_1d, f64, b)),
        ("rope", ok.rope, (f32_3d, f32_2d, f32_2d, b)),
        ("store_kv", ok.store_kv, (f32_3d_view, i64, f32_3d, b)),
        ("attention_scores", ok.attention_scores, (f64_3d, f32_3d, f32_3d_view, i64, f64, b)),
        ("softmax", ok.softmax, (f64_3d, i64, b)),
        ("attention_values", ok.attention_values, (f32_3d, f64_3d, f32_3d_view, i64)),
        ("swiglu", ok.swiglu, (f32_2d, f32_2d, f32_2d, b)),
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
