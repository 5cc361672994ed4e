"""Throughput of the numba backend's kernels, against the NumPy reference.

    python -m pytest bench/bench_kernels.py --benchmark-enable [-k q4_1] [-s]

Every case first checks the numba result against the reference backend in the same mode
(max relative error <= 1e-6, the bound of tests/test_numba_backend.py), then times it.
Shapes are SmolLM2-135M's: an FFN matrix (1536 x 576) for every type, and the q8_0 output
projection (49152 x 576), with 768 columns for the K-quants (whole 256-element
super-blocks); T = 1 is a decode step, T = 64 a prefill chunk. Reported in extra_info (and
printed with -s): GB/s of weight bytes read and Gweights/s. The activation ops (attention,
rmsnorm, rope, swiglu) run on SmolLM2's shapes for a decode step at position 511 and a
512-token prefill, checked first with the NMSE bounds of tests/test_numba_backend.py, and
report tokens/s. Nothing is asserted about time.

With benchmarks disabled (`--benchmark-disable`, the default in pyproject.toml, as in CI) the
same checks run once each on small shapes (QUICK_CASES and friends), so CI runs every check in
seconds; `--benchmark-enable` selects the full shapes above and times them.
"""

from __future__ import annotations

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from refinfer import quant  # noqa: E402
from refinfer.backends.numba_backend import WEIGHT_TYPES, NumbaBackend  # noqa: E402
from refinfer.backends.numpy_backend import NumpyBackend  # noqa: E402
from refinfer.weights import QTensor  # noqa: E402

REL_TOL = 1e-6
CASES = ([(t, 1536, 768 if t.endswith("_K") else 576) for t in WEIGHT_TYPES]   # K-quants: whole super-blocks
         + [("q8_0", 49152, 576)])
QUICK_CASES = [(t, 80, 512) for t in WEIGHT_TYPES]     # 80 rows: a partial group of repacked rows


def quick(config) -> bool:  # benchmarks off (pytest-benchmark's rule): check on small shapes, time nothing
    return bool(config.getoption("benchmark_disable") and not config.getoption("benchmark_enable"))


def pytest_generate_tests(metafunc):
    q = quick(metafunc.config)
    if metafunc.definition.name == "test_matmul":
        cases = QUICK_CASES if q else CASES
        metafunc.parametrize("name,rows,cols", cases, ids=[f"{t}-{r}x{c}" for t, r, c in cases])
    elif metafunc.definition.name == "test_matvec_cold_weights":
        metafunc.parametrize("name,rows,cols,total", [(t, 96, 512, 0) if q else (t, 1536, 1536, 100 << 20)
                                                      for t in COLD_TYPES], ids=COLD_TYPES)
    elif metafunc.definition.name == "test_activation_op":
        cases = QUICK_ACT_CASES if q else ACT_CASES
        metafunc.parametrize("op,T,S", cases, ids=[f"{op}-T{T}" for op, T, _ in cases])


def _weights(name, rows, cols):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    raw = quant.quantize(w, name)
    raw.setflags(write=False)
    return QTensor(f"{name}[{rows}x{cols}]", raw, quant.get_type(name), (rows, cols))


def check_matmul(name, rows, cols, mode, T):  # -> (backend, out, x, w), checked against the reference
    w = _weights(name, rows, cols)
    x = np.random.default_rng(1).standard_normal((T, cols)).astype(np.float32)
    be = NumbaBackend(mode=mode)
    out = np.full((T, rows), np.nan, np.float32)
    ref = np.empty_like(out)
    NumpyBackend(mode=mode).matmul(ref, x, w)
    be.matmul(out, x, w)                                        # also compiles / warms up
    rel = np.max(np.abs(out - ref)) / np.max(np.abs(ref))
    assert rel <= REL_TOL, f"{name} {mode} T={T}: relative error {rel:.3g} vs the reference"
    return be, out, x, w


@pytest.mark.parametrize("T", [1, 64])
@pytest.mark.parametrize("mode", ["ideal", "ggml"])
def test_matmul(benchmark, name, rows, cols, mode, T):
    if mode == "ggml" and T > 1 and rows > 4096:
        pytest.skip("the float64 reference takes minutes on this shape")
    be, out, x, w = check_matmul(name, rows, cols, mode, T)
    benchmark(be.matmul, out, x, w)
    mean = benchmark.stats.stats.mean if benchmark.stats else None
    if mean:
        benchmark.extra_info["GB/s"] = w.nbytes / mean / 1e9
        benchmark.extra_info["Gweights/s"] = rows * cols * T / mean / 1e9  # weight x token products
        print(f"\n{name} {rows}x{cols} {mode} T={T}: {mean * 1e3:.3f} ms, "
              f"{benchmark.extra_info['GB/s']:.2f} GB/s, {benchmark.extra_info['Gweights/s']:.2f} Gweights/s")


COLD_TYPES = ["q4_0", "q4_1", "q5_1", "q8_0", "q4_K", "q6_K", "f16"]


def copy_of(w, i):  # a QTensor of its own (own bytes, own repacked copy) with w's weights
    c = QTensor(f"{w.name}#{i}", w.raw.copy(), w.qtype, w.shape)
    c.raw.setflags(write=False)
    return c


def check_matvec_cold_weights(name, rows, cols, total, step_benchmark=None):
    """A decode step as the model runs it: one token through many matrices whose weights
    together (`total` bytes repacked, at least 100 MB when timed) exceed what the caches keep
    between tokens, so every weight comes from DRAM. Copies of one rows x cols matrix, each
    repacked on its own and each checked against the reference before the timing, and the
    last product checked again after it. GB/s counts the repacked bytes the kernels read."""
    w = _weights(name, rows, cols)
    be = NumbaBackend()
    x = np.random.default_rng(1).standard_normal((1, cols)).astype(np.float32)
    out = np.empty((1, rows), np.float32)
    ref = np.empty_like(out)
    NumpyBackend().matmul(ref, x, w)
    per = be.repacked(w).nbytes
    copies = [copy_of(w, i) for i in range(max(2, total // per))]

    def check(what):
        rel = np.max(np.abs(out - ref)) / np.max(np.abs(ref))
        assert rel <= REL_TOL, f"cold {name}: {what}: relative error {rel:.3g} vs the reference"

    for c in copies:
        out[...] = np.nan
        be.matmul(out, x, c)                                     # repack once, outside the timing
        check(c.name)

    def step():
        for c in copies:
            be.matmul(out, x, c)

    if step_benchmark is not None:
        step_benchmark(step)
    out[...] = np.nan
    step()
    check("after the timing")
    return w, per, copies


def test_matvec_cold_weights(benchmark, name, rows, cols, total):
    _, per, copies = check_matvec_cold_weights(name, rows, cols, total, benchmark)
    mean = benchmark.stats.stats.mean if benchmark.stats else None
    if mean:
        benchmark.extra_info["GB/s"] = per * len(copies) / mean / 1e9
        benchmark.extra_info["Gweights/s"] = rows * cols * len(copies) / mean / 1e9
        print(f"\ncold {name} {len(copies)} x {rows}x{cols}: {mean * 1e3:.2f} ms, "
              f"{benchmark.extra_info['GB/s']:.2f} GB/s, {benchmark.extra_info['Gweights/s']:.2f} Gweights/s")


# SmolLM2-135M: dim 576, 9 heads, 3 KV heads, head_dim 64, hidden 1536; S: the KV length
ACT_CASES = [(op, T, 512) for op in ("attention", "rmsnorm", "rope", "swiglu") for T in (1, 512)]
QUICK_ACT_CASES = [(op, T, 48) for op in ("attention", "rmsnorm", "rope", "swiglu") for T in (1, 13)]
NMSE = {"attention": 1e-14, "rmsnorm": 1e-14, "rope": 0.0, "swiglu": 1e-14}


def _act_args(op, T, S, rng):
    if op == "attention":         # one sequence of S positions in a paged f32 pool, its last T new
        from refinfer.forward import AttnMeta
        from refinfer.kv_cache import BlockManager, BlockPool
        kv = BlockManager(BlockPool(n_layers=1, n_kv_heads=3, head_dim=64, n_blocks=-(-S // 16), block_size=16))
        kv.allocate(0, list(range(S)))

        def meta(start, n):
            return AttnMeta(np.arange(start, start + n), kv.slot_mapping(0, start, n), np.zeros(n, np.int32),
                            np.array([0, n]), np.array([kv.block_table(0)], np.int32), 16)
        k, v = (rng.standard_normal((S, 3, 64)).astype(np.float32) for _ in range(2))
        NumpyBackend().store_kv(kv.pool, 0, meta(0, S), k, v)
        q = rng.standard_normal((T, 9, 64)).astype(np.float32)
        return np.empty_like(q), (q, kv.pool, 0, meta(S - T, T))
    if op == "rmsnorm":
        x = rng.standard_normal((T, 576)).astype(np.float32)
        return np.empty_like(x), (x, np.ones(576, np.float32), 1e-5)
    if op == "rope":
        x = rng.standard_normal((T, 9, 64)).astype(np.float32)
        ang = np.outer(np.arange(T), 10000.0 ** (-np.arange(32) / 32)).astype(np.float32)
        return x, (x, np.cos(ang), np.sin(ang), False)                # in place
    g = rng.standard_normal((T, 1536)).astype(np.float32) * 3
    return np.empty_like(g), (g, rng.standard_normal((T, 1536)).astype(np.float32))


def test_activation_op(benchmark, op, T, S):
    be, ref_be = NumbaBackend(), NumpyBackend()
    out_ref, args_ref = _act_args(op, T, S, np.random.default_rng(2))
    out, args = _act_args(op, T, S, np.random.default_rng(2))
    if op == "rope":
        getattr(ref_be, op)(*args_ref)
        getattr(be, op)(*args)
    else:
        getattr(ref_be, op)(out_ref, *args_ref)
        getattr(be, op)(out, *args)
    diff = out.astype(np.float64) - out_ref
    nmse = np.sum(diff ** 2) / np.sum(out_ref.astype(np.float64) ** 2)
    assert nmse <= NMSE[op], f"{op} T={T}: NMSE {nmse:.3g} vs the reference"
    if op == "rope":
        benchmark(be.rope, *args)
    else:
        benchmark(getattr(be, op), out, *args)
    mean = benchmark.stats.stats.mean if benchmark.stats else None
    if mean:
        benchmark.extra_info["tokens/s"] = T / mean
        print(f"\n{op} T={T}: {mean * 1e3:.3f} ms, {T / mean:.0f} tokens/s (one layer)")
