"""`python -m refinfer bench` and `python -m refinfer backends` on a tiny model: every engine
runs, its logits are checked against the NumPy reference before its timings count, and a
failed engine or check makes the command exit 1."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from refinfer.cli import main

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "formats" / "fixtures"
MODEL = FIXTURES / "tiny-llama-q4_0.gguf"
ENGINES = ("numba", "numpy", "llama.cpp")


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "refinfer", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def check_bench_rows_and_json(tmp_path, capsys):
    """Every engine, llama.cpp included, is measured and passes its check: exit 0, a rate in
    every row. A failed worker (llama.cpp missing or crashing) fails this check."""
    pytest.importorskip("llama_cpp")
    out = tmp_path / "bench.json"
    rc = main(["bench", "-m", str(MODEL), "-p", "8", "-n", "4", "-t", "1", "--json", str(out)])
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stdout + stderr
    rows = json.loads(out.read_text())
    assert sorted((r["backend"].split(" ")[0], r["test"]) for r in rows) == sorted(
        (e, t) for e in ENGINES for t in ("pp8", "tg4"))
    for r in rows:
        assert "error" not in r, r
        assert r["threads"] == 1 and r["tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0, r
    for r in rows:
        if r["backend"].startswith("llama.cpp"):
            assert r["ratio_vs_llama_cpp"] == 1.0
    assert "FAILED" not in stdout and "tg4" in stdout


def test_bench_rows_and_json(tmp_path, capsys):
    check_bench_rows_and_json(tmp_path, capsys)


def test_a_failed_engine_exits_1_and_is_listed_last(tmp_path, capsys, monkeypatch):
    import refinfer.bench as bench
    real = bench.run_worker

    def llama_cpp_crashes(engine, *a, **kw):
        return {"error": "exit code 1: no llama_cpp"} if engine == "llama.cpp" else real(engine, *a, **kw)

    monkeypatch.setattr(bench, "run_worker", llama_cpp_crashes)
    out = tmp_path / "bench.json"
    rc = main(["bench", "-m", str(MODEL), "-p", "8", "-n", "4", "-t", "1", "--backends", "numpy,llama.cpp",
               "--json", str(out)])
    stdout, _ = capsys.readouterr()
    assert rc == 1
    rows = json.loads(out.read_text())            # the table is still written
    assert [r["tokens_per_s"] is None for r in rows] == [False, False, True, True]
    assert stdout.rstrip().splitlines()[-2:] == ["FAILED: llama.cpp threads=1 pp8: exit code 1: no llama_cpp",
                                                 "FAILED: llama.cpp threads=1 tg4: exit code 1: no llama_cpp"]


def check_logits_off_the_reference_fail(tmp_path, capsys, monkeypatch):
    """The worker's logits must match the NumPy reference before its timing counts: against a
    reference whose tg logits are nudged by 1e-4 relative (NMSE 1e-8, far above refinfer's
    1e-10 and far below llama.cpp's loose bound), numba's tg row fails with the numbers,
    its pp row and llama.cpp's rows pass."""
    pytest.importorskip("llama_cpp")
    import refinfer.bench as bench
    real = bench.reference_logits

    def nudged(*a):
        ref = real(*a)
        ref["tg"] = ref["tg"] * np.float32(1 + 1e-4)
        return ref

    monkeypatch.setattr(bench, "reference_logits", nudged)
    rc = main(["bench", "-m", str(MODEL), "-p", "8", "-n", "4", "-t", "1", "--backends", "numba,llama.cpp",
               "--json", str(tmp_path / "b.json")])
    stdout, _ = capsys.readouterr()
    assert rc == 1
    rows = {(r["backend"], r["test"]): r for r in json.loads((tmp_path / "b.json").read_text())}
    assert rows["numba", "tg4"]["tokens_per_s"] is None
    assert "tg logits differ from the NumPy reference: nmse 1e-08 > 1e-10" in rows["numba", "tg4"]["error"]
    assert rows["numba", "pp8"]["tokens_per_s"] > 0 and rows["llama.cpp", "tg4"]["tokens_per_s"] > 0
    assert stdout.rstrip().splitlines()[-1].startswith("FAILED: numba threads=1 tg4: tg logits differ")


def test_logits_that_differ_from_the_reference_fail_the_row(tmp_path, capsys, monkeypatch):
    check_logits_off_the_reference_fail(tmp_path, capsys, monkeypatch)


def test_check_logits_bounds():
    from refinfer.bench import check_logits
    rng = np.random.default_rng(0)
    ref = {"pp": rng.standard_normal(1000).astype(np.float32),
           "tg": rng.standard_normal((4, 1000)).astype(np.float32)}
    assert check_logits("numba", {k: v.copy() for k, v in ref.items()}, ref) == {}
    wrong = {"pp": ref["pp"], "tg": rng.standard_normal((4, 1000)).astype(np.float32)}
    assert set(check_logits("llama.cpp", wrong, ref)) == {"tg"}       # another model: NMSE ~2
    assert "missing" in check_logits("numpy", {"pp": ref["pp"]}, ref)["tg"]
    nan = {"pp": np.full(1000, np.nan, np.float32), "tg": ref["tg"]}
    assert "not finite" in check_logits("numpy", nan, ref)["pp"]


@pytest.mark.parametrize("args,option", [(["--threads", "0"], "--threads"), (["-t", "a"], "--threads"),
                                         (["-t", "1,600"], "--threads"), (["-t", ","], "--threads"),
                                         (["--backends", "tpu"], "--backends"), (["-p", "0", "-n", "0"], "-p"),
                                         (["-r", "0"], "--reps")])
def test_bench_rejects_bad_arguments(args, option, capsys):
    rc = main(["bench", "-m", str(MODEL), *args])
    _, err = capsys.readouterr()
    assert rc == 2 and err.startswith(f"error: {option}") and "\nhint: " in err and "Traceback" not in err, err


def test_backends_command_lists_the_matrix():
    p = _cli("backends", "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)["rows"]
    q41 = next(r for r in rows if r["op"] == "matmul" and r["type"] == "q4_1")
    assert q41["numpy"] == "reference" and q41["numba"] == "native"
    text = _cli("backends").stdout
    assert "q6_K" in text and "attention" in text
