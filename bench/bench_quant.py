"""Quantize throughput of refinfer.quant.quantize against ggml's reference quantizers.

    python -m pytest bench/bench_quant.py --benchmark-enable

Each case first checks that refinfer's bytes equal libggml's for the whole input, then times
one implementation on the same 16M float32 values (64 MB). Throughput is MB/s of float32
input (extra_info["MB/s"] in the benchmark table and JSON, and printed with -s). Nothing is
asserted about time. With benchmarks disabled (the default, as in CI) the byte check runs on
QUICK_FLOATS values instead.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from oracle import ggml as load_ggml  # noqa: E402

from refinfer import quant  # noqa: E402

N_FLOATS = 1 << 24
QUICK_FLOATS = 1 << 16
TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q8_1", "f16", "bf16"]


@pytest.fixture(scope="module")
def ggml():
    return load_ggml()


def quick(config) -> bool:  # benchmarks off (pytest-benchmark's rule): check on small input, time nothing
    return bool(config.getoption("benchmark_disable") and not config.getoption("benchmark_enable"))


@pytest.fixture(scope="module")
def weights(request):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(QUICK_FLOATS if quick(request.config) else N_FLOATS, dtype=np.float32)
    x *= np.float32(0.02)  # the magnitude of typical LLM weights
    return x


def ggml_quantize(g, x, name):
    if name == "q8_1":
        return g.quantize_row_ref(x, name)
    return g.quantize(x[None], name)[0]


_CHECKED: set[str] = set()


def _check_once(g, x, name):
    if name in _CHECKED:
        return
    ours = quant.quantize(x, name)
    theirs = ggml_quantize(g, x, name)
    assert np.array_equal(ours, theirs), f"{name}: refinfer bytes differ from ggml's"
    _CHECKED.add(name)


@pytest.mark.parametrize("impl", ["refinfer", "ggml"])
@pytest.mark.parametrize("name", TYPES)
def test_quantize_throughput(benchmark, ggml, weights, name, impl):
    _check_once(ggml, weights, name)
    fn = (lambda: quant.quantize(weights, name)) if impl == "refinfer" else (lambda: ggml_quantize(ggml, weights, name))
    benchmark.group = f"quantize {name}"
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=0)
    stats = benchmark.stats
    if stats is not None:  # None under --benchmark-disable
        mbps = weights.nbytes / 1e6 / stats.stats.min
        benchmark.extra_info["MB/s"] = round(mbps, 1)
        print(f"\n{impl:8s} {name:5s} {mbps:8.1f} MB/s of float32 input (best of 3, {weights.size} floats)")
