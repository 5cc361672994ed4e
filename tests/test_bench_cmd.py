"""Smoke test of `python -m refinfer bench` and `python -m refinfer backends` on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "refinfer", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_bench_rows_and_json(tiny_llama_f32, tmp_path):
    out = tmp_path / "bench.json"
    p = _cli("bench", "-m", tiny_llama_f32, "-p", 8, "-n", 4, "--threads", 1, "--json", out)
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())
    assert {(r["backend"].split(" ")[0], r["test"]) for r in rows} >= {
        ("numba", "pp8"), ("numba", "tg4"), ("numpy", "pp8"), ("numpy", "tg4"), ("llama.cpp", "pp8"), ("llama.cpp", "tg4")}
    for r in rows:
        assert {"backend", "threads", "test", "tokens_per_s", "ratio_vs_llama_cpp"} <= set(r)
        assert r["threads"] == 1
        if r["backend"] in ("numba", "numpy"):
            assert r["tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0
    llama = [r for r in rows if r["backend"].startswith("llama.cpp")]
    if all(r["tokens_per_s"] for r in llama):  # llama.cpp ran: its own ratio is 1
        assert all(abs(r["ratio_vs_llama_cpp"] - 1) < 1e-12 for r in llama)
    assert "backend" in p.stdout and "tg4" in p.stdout


@pytest.mark.parametrize("args,msg", [(["--threads", "0"], "--threads"), (["--threads", "a"], "--threads"),
                                      (["--backends", "tpu"], "unknown engine"), (["-p", "0", "-n", "0"], "not both 0")])
def test_bench_rejects_bad_arguments(tiny_llama_f32, args, msg):
    p = _cli("bench", "-m", tiny_llama_f32, *args)
    assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr


def test_backends_command_lists_the_matrix():
    p = _cli("backends", "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)["rows"]
    q41 = next(r for r in rows if r["op"] == "matmul" and r["type"] == "q4_1")
    assert q41["numpy"] == "reference" and q41["numba"] == "native"
    text = _cli("backends").stdout
    assert "q6_K" in text and "attention" in text
