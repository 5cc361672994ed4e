"""Throughput of the numba backend's matmul kernels, against the NumPy reference.

    python -m pytest bench/bench_kernels.py --benchmark-enable [-k q4_1] [-s]

Every case first checks the numba result against the reference backend in the same mode
(max relative error <= 1e-6, the bound of tests/test_numba_backend.py), then times it.
Shapes are SmolLM2-135M's: an FFN matrix (1536 x 576) for every type, and the q8_0 output
projection (49152 x 576), with 768 columns for the K-quants (whole 256-element super-blocks); T = 1 is a decode step, T = 64 a prefill chunk. Reported in
extra_info (and printed with -s): GB/s of weight bytes read and Gweights/s. Nothing is
asserted about time.
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


def _weights(name, rows, cols):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    raw = quant.quantize(w, name)
    raw.setflags(write=False)
    return QTensor(f"{name}[{rows}x{cols}]", raw, quant.get_type(name), (rows, cols))


@pytest.mark.parametrize("T", [1, 64])
@pytest.mark.parametrize("mode", ["ideal", "ggml"])
@pytest.mark.parametrize("name,rows,cols", CASES, ids=[f"{t}-{r}x{c}" for t, r, c in CASES])
def test_matmul(benchmark, name, rows, cols, mode, T):
    if mode == "ggml" and T > 1 and rows > 4096:
        pytest.skip("the float64 reference takes minutes on this shape")
    w = _weights(name, rows, cols)
    x = np.random.default_rng(1).standard_normal((T, cols)).astype(np.float32)
    be = NumbaBackend(mode=mode)
    out = np.empty((T, rows), np.float32)
    ref = np.empty_like(out)
    NumpyBackend(mode=mode).matmul(ref, x, w)
    be.matmul(out, x, w)                                        # also compiles / warms up
    rel = np.max(np.abs(out - ref)) / np.max(np.abs(ref))
    assert rel <= REL_TOL, f"{name} {mode} T={T}: relative error {rel:.3g} vs the reference"
    benchmark(be.matmul, out, x, w)
    mean = benchmark.stats.stats.mean if benchmark.stats else None
    if mean:
        benchmark.extra_info["GB/s"] = w.nbytes / mean / 1e9
        benchmark.extra_info["Gweights/s"] = rows * cols * T / mean / 1e9  # weight x token products
        print(f"\n{name} {rows}x{cols} {mode} T={T}: {mean * 1e3:.3f} ms, "
              f"{benchmark.extra_info['GB/s']:.2f} GB/s, {benchmark.extra_info['Gweights/s']:.2f} Gweights/s")


COLD_TYPES = ["q4_0", "q4_1", "q5_1", "q8_0", "q4_K", "q6_K", "f16"]


@pytest.mark.parametrize("name", COLD_TYPES)
def test_matvec_cold_weights(benchmark, name):
    """A decode step as the model runs it: one token through many matrices whose weights
    together (at least 100 MB, repacked) exceed what the
    caches keep between tokens, so every weight comes from DRAM. Copies of one 1536 x 1536
    matrix, each repacked on its own; checked against the reference first. GB/s counts the
    repacked bytes the kernels read."""
    rows, cols = 1536, 1536
    w = _weights(name, rows, cols)
    be = NumbaBackend()
    x = np.random.default_rng(1).standard_normal((1, cols)).astype(np.float32)
    out = np.empty((1, rows), np.float32)
    ref = np.empty_like(out)
    NumpyBackend().matmul(ref, x, w)
    be.matmul(out, x, w)
    assert np.max(np.abs(out - ref)) / np.max(np.abs(ref)) <= REL_TOL
    per = be.repacked(w).nbytes
    copies = [QTensor(f"{name}#{i}", w.raw.copy(), w.qtype, w.shape) for i in range(max(2, (100 << 20) // per))]
    for c in copies:
        c.raw.setflags(write=False)
        be.matmul(out, x, c)                                     # repack once, outside the timing

    def step():
        for c in copies:
            be.matmul(out, x, c)

    benchmark(step)
    mean = benchmark.stats.stats.mean if benchmark.stats else None
    if mean:
        benchmark.extra_info["GB/s"] = per * len(copies) / mean / 1e9
        benchmark.extra_info["Gweights/s"] = rows * cols * len(copies) / mean / 1e9
        print(f"\ncold {name} {len(copies)} x {rows}x{cols}: {mean * 1e3:.2f} ms, "
              f"{benchmark.extra_info['GB/s']:.2f} GB/s, {benchmark.extra_info['Gweights/s']:.2f} Gweights/s")
