"""Batched serving throughput against llama.cpp's multi-sequence batch (refinfer.bench_batched),
and the per-op decode profile (bench/profile_decode.py).

    python -m pytest bench/bench_batched.py --benchmark-enable -s     # SmolLM2, 1/4/16 sequences, 1 thread
    python -m refinfer bench --batched -t 1,2                         # the same from the command line

With benchmarks disabled (`--benchmark-disable`, the default in pyproject.toml, as in CI) the
tiny fixture model runs the quick shapes (refinfer.bench_batched.QUICK: 1 and 3 sequences, 8
prompt tokens, 4 steps, blocks of 4, a 16-token step budget so that prefill is chunked):
every row must be measured and pass its checks (refinfer bitwise against its serial runs,
both engines against the NumPy reference); the rates mean nothing there.
"""

from __future__ import annotations

import pathlib

import pytest

import profile_decode
from refinfer.bench_batched import LLAMA, QUICK, Shape, format_table, run_batched_bench

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "formats" / "fixtures" / "tiny-llama-q4_0.gguf"


def quick(config) -> bool:
    return bool(config.getoption("benchmark_disable") and not config.getoption("benchmark_enable"))


def check_batched_rows(model, shape, engines, threads=(1,)):
    rows = run_batched_bench(model, list(threads), engines, shape)
    table = format_table(rows, str(model), list(threads), shape)
    failed = [r for r in rows if r.get("error")]
    assert not failed, table
    want = {(e, t) for e in engines for t in shape.tests() if not (e == LLAMA and t.startswith("engine"))}
    assert len(rows) == len(want) * len(threads), table
    for r in rows:
        rate = r.get("ttft_ms") if "ttft_ms" in r else r.get("tokens_per_s")
        assert rate and rate > 0, r
        if LLAMA in engines:
            assert r["ratio_vs_llama_cpp"] is not None, r
    return rows, table


def test_batched_bench(request):
    pytest.importorskip("llama_cpp")
    if quick(request.config):
        rows, table = check_batched_rows(FIXTURE, QUICK, ("numba", LLAMA))
        hit = next(r for r in rows if r["backend"] == "numba" and r["test"].endswith("hit"))
        assert hit["cached_tokens"] == QUICK.n_system                     # 32 = 8 blocks of 4
    else:
        from refinfer.fetch import default_model_path
        rows, table = check_batched_rows(default_model_path(), Shape(), ("numba", LLAMA))
    print("\n" + table)


def test_profile_decode(request):
    profile_decode.test_profile_decode(request)
