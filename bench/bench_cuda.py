"""GPU throughput of the cuda backend.

    python bench/bench_cuda.py [-m MODEL] [--rows 4096 --cols 4096] [--json FILE]

1. copy bandwidth: a device-to-device copy of a 1 GiB buffer, (read + written bytes) / time:
   the roofline of a memory-bound kernel on this GPU;
2. for every weight type and both numeric modes, the matmul kernel on one token (the fused
   dequantize-matvec; the backend runs the same kernel for a prompt) on a rows x cols matrix:
   first checked against the NumPy reference, then timed; achieved GB/s = weight bytes /
   kernel time, and its share of (1);
3. pp512 / tg128 tokens/s of the whole model (default SmolLM2-135M-Instruct Q4_1), as
   `python -m refinfer bench --backends cuda` measures them (KV cache in GPU memory).

Needs a CUDA GPU. Under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1) only --smoke makes sense:
tiny shapes, one repetition, no model, to check that the script itself runs.

Under pytest (bench/ is in testpaths) test_smoke runs step 2 on tiny shapes, every check
included, under the simulator when there is no GPU; test_gpu_timing runs the full script and
needs a real GPU and `--benchmark-enable`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from refinfer import quant  # noqa: E402
from refinfer.backends import blockdecode as bd  # noqa: E402
from refinfer.backends import get_backend  # noqa: E402
from refinfer.backends.cuda_backend import WEIGHT_TYPES  # noqa: E402
from refinfer.backends.numpy_backend import VEC_DOT_TYPE, NumpyBackend  # noqa: E402
from refinfer.weights import QTensor  # noqa: E402

BASE_ROWS = 16       # distinct rows quantized on the host; the matrix repeats them
REL_BOUND = 1e-6     # tests/test_numba_backend.py TOLERANCES["matmul", *]


def timed(cuda, fn, reps):  # -> seconds per call, after one warm-up call
    fn()
    cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def copy_bandwidth(cuda, nbytes, reps):  # -> GB/s, bytes read plus bytes written
    src = cuda.device_array(nbytes, np.uint8)
    dst = cuda.device_array(nbytes, np.uint8)
    return 2 * nbytes / timed(cuda, lambda: dst.copy_to_device(src), reps) / 1e9


def matrix(name, rows, cols, seed=0):
    """A rows x cols QTensor whose rows repeat BASE_ROWS quantized random rows (the host-side
    quantizers are slow on big matrices; the kernels read every byte regardless)."""
    rng = np.random.default_rng(seed)
    base = quant.quantize((rng.standard_normal((BASE_ROWS, cols)) * 0.05).astype(np.float32), name)
    raw = np.ascontiguousarray(np.tile(base, (-(-rows // BASE_ROWS), 1))[:rows])
    return QTensor(name, raw, quant.get_type(name), (rows, cols)), QTensor(name, base, quant.get_type(name),
                                                                           (BASE_ROWS, cols))


def check(got, ref, what):
    err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    if not err <= REL_BOUND:      # also catches NaN: a kernel that left its output unwritten
        raise AssertionError(f"{what} differs from the NumPy reference (rel {err:.3g} > {REL_BOUND})")
    return err


def launcher(be, w, x, mode):
    """The timed launch: the one-token matmul kernel alone, on device-resident weights and
    activations. Returns (launch, d_out), d_out the device output it writes."""
    cuda, name, rows = be.cuda, w.qtype.name, w.shape[0]
    kind = bd.KINDS[name]
    d_w = be.device_weights(w)
    d_out = cuda.device_array((1, rows), np.float32)
    grid, threads = (rows, 1), be.matmul_threads(w)
    if mode == "ggml" and VEC_DOT_TYPE[name] in ("q8_0", "q8_1"):
        xq, xd, xs = be.quantize_act_q8(cuda.to_device(x))
        kernel = be.mk.matmul_q8(kind, be.tile)   # the backend's one kernel for every T
        return (lambda: kernel[grid, threads](d_out, xq, xd, xs, d_w)), d_out
    d_x = cuda.to_device(be.vec_dot_activations(x, VEC_DOT_TYPE[name]) if mode == "ggml" else x)
    kernel = be.mk.matmul_float(kind, be.tile)
    return (lambda: kernel[grid, threads](d_out, d_x, d_w)), d_out


def bench_type(name, mode, rows, cols, reps):
    """The backend's matmul and then the timed launch itself are checked against the NumPy
    reference before the timing, and the timed launch's output once more after it."""
    be = get_backend("cuda", mode)
    cuda = be.cuda
    w, base = matrix(name, rows, cols)
    x = np.random.default_rng(1).standard_normal((1, cols)).astype(np.float32)
    ref = np.empty((1, BASE_ROWS), np.float32)
    NumpyBackend(mode=mode).matmul(ref, x, base)
    ref = np.tile(ref, (1, -(-rows // BASE_ROWS)))[:, :rows]
    got = np.full((1, rows), np.nan, np.float32)
    be.matmul(got, x, w)
    err = check(got, ref, f"{name}/{mode}: the cuda backend's matmul")

    launch, d_out = launcher(be, w, x, mode)
    d_out.copy_to_device(np.full((1, rows), np.nan, np.float32))
    launch()
    cuda.synchronize()
    check(d_out.copy_to_host(), ref, f"{name}/{mode}: the timed kernel")
    t = timed(cuda, launch, reps)
    check(d_out.copy_to_host(), ref, f"{name}/{mode}: the timed kernel, after the timing")
    return {"type": name, "mode": mode, "rows": rows, "cols": cols, "weight_bytes": w.nbytes,
            "kernel_us": t * 1e6, "GB/s": w.nbytes / t / 1e9, "rel_err": err}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default=None, help="GGUF model for pp512/tg128 (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096, help="a multiple of 256 (K-quant super-blocks)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--types", default=",".join(WEIGHT_TYPES), help="comma-separated weight types (default all)")
    p.add_argument("--no-model", action="store_true", help="skip the whole-model pp512/tg128 run")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one repetition, no model (simulator check)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON to FILE")
    args = p.parse_args(argv)
    if args.smoke:
        args.rows, args.cols, args.reps, args.no_model = 5, 256, 1, True
    if args.cols % 256:
        raise SystemExit(f"--cols must be a multiple of 256, got {args.cols}")

    be = get_backend("cuda")          # a clear error without numba-cuda or a GPU
    from refinfer.backends.cuda_backend import simulated
    dev = "CUDA simulator" if simulated() else be.cuda.get_current_device().name
    dev = dev.decode() if isinstance(dev, bytes) else dev
    copy_gbs = copy_bandwidth(be.cuda, (1 << 20) if args.smoke else (1 << 30), args.reps)
    print(f"device: {dev}; measured device-to-device copy bandwidth {copy_gbs:.1f} GB/s (read + write)")

    rows = []
    print(f"{'type':6} {'mode':6} {'kernel us':>10} {'GB/s':>8} {'of copy':>8}   ({args.rows} x {args.cols}, one token)")
    for name in [t.strip() for t in args.types.split(",") if t.strip()]:
        for mode in ("ideal", "ggml"):
            r = bench_type(name, mode, args.rows, args.cols, args.reps)
            r["roofline_fraction"] = r["GB/s"] / copy_gbs
            rows.append(r)
            print(f"{name:6} {mode:6} {r['kernel_us']:10.1f} {r['GB/s']:8.1f} {100 * r['roofline_fraction']:7.1f}%")

    result = {"device": dev, "copy_GB/s": copy_gbs, "matvec": rows}
    if not args.no_model:
        from refinfer.bench import format_table, run_bench
        model = args.model
        if model is None:
            from refinfer.fetch import default_model_path
            model = str(default_model_path())
        table = run_bench(model, [1], ["cuda"], 512, 128, log=lambda m: print(m, file=sys.stderr, flush=True))
        sys.stdout.write(format_table(table, model))
        result["model"] = table
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return 0


# ---- under pytest -------------------------------------------------------------------------

SMOKE_TYPES = ("f16", "q4_1", "q4_K")   # one float, one q8-activation and one K-quant kernel


def test_smoke():
    """Every check of step 2 on tiny shapes (5 x 256; all types on a GPU, SMOKE_TYPES in the
    simulator, whose Python threads are slow), one timed repetition."""
    from ci_skips import oracle_skip       # tests/ci_skips.py: fails the run under CI=true
    from refinfer.backends.cuda_backend import simulated
    from refinfer.errors import RefinferError
    try:
        get_backend("cuda")
    except RefinferError as e:
        oracle_skip(f"no cuda backend (numba-cuda is in the test extra): {e}")
    for name in SMOKE_TYPES if simulated() else WEIGHT_TYPES:
        for mode in ("ideal", "ggml"):
            bench_type(name, mode, 5, 256, 1)


def test_gpu_timing(request, tmp_path):
    import pytest
    from refinfer.backends.cuda_backend import simulated
    c = request.config
    if simulated() or (c.getoption("benchmark_disable") and not c.getoption("benchmark_enable")):
        pytest.skip("times kernels: needs a real GPU and --benchmark-enable (test_smoke runs the checks)")
    out = tmp_path / "cuda.json"
    assert main(["--no-model", "--json", str(out)]) == 0
    assert len(json.loads(out.read_text())["matvec"]) == 2 * len(WEIGHT_TYPES)


if __name__ == "__main__":
    from refinfer.errors import RefinferError
    try:
        sys.exit(main())
    except RefinferError as e:
        print(f"error: {e}" + (f"\nhint: {e.hint}" if e.hint else ""), file=sys.stderr)
        sys.exit(2)
    except AssertionError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
