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


# ---------------------------------------------------------------------------------------------
# bench --batched (refinfer.bench_batched): quick shapes on the tiny model

BATCHED = ["bench", "--batched", "-m", str(MODEL), "-t", "1", "--seqs", "1,3", "-p", "8", "-n", "4", "--prefill", "24",
           "--system", "32", "--user", "5", "--kv-block-size", "4"]


def test_bench_batched_rows_settings_and_json(tmp_path, capsys):
    """Every test of both engines is measured and checked: exit 0, a rate and a ratio in every
    row, the settings stated above the table."""
    pytest.importorskip("llama_cpp")
    out = tmp_path / "b.json"
    rc = main([*BATCHED, "--backends", "numpy,llama.cpp", "--json", str(out)])
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stdout + stderr
    rows = json.loads(out.read_text())
    tests = ["p8+tg4 x1", "p8+tg4 x3", "p8+tg4 x3 sampled", "pp24", "ttft sys32+5 miss", "ttft sys32+5 hit"]
    assert sorted((r["backend"], r["test"]) for r in rows) == sorted(
        [(e, t) for e in ("numpy", "llama.cpp") for t in tests] + [("numpy", "p8+tg4 x1 engine"), ("numpy", "p8+tg4 x3 engine")])
    for r in rows:
        assert "error" not in r and r["ratio_vs_llama_cpp"] > 0, r
        assert (r["ttft_ms"] if "ttft_ms" in r else r["tokens_per_s"]) > 0, r
    by = {(r["backend"], r["test"]): r for r in rows}
    assert by["numpy", "ttft sys32+5 hit"]["cached_tokens"] == 32 and by["numpy", "ttft sys32+5 miss"]["cached_tokens"] == 0
    # 8 + 4 positions in blocks of 4 (f32 K and V: 2 layers x 1 KV head x 16 x 4 bytes x 2 per position)
    assert by["numpy", "p8+tg4 x3"]["kv_bytes_per_seq"] == 3 * 4 * 2 * 16 * 4 * 2
    assert by["numpy", "p8+tg4 x3"]["kv_contiguous_bytes_per_seq"] == 128 * 2 * 16 * 4 * 2
    settings = stdout.splitlines()[0]
    for s in ("tiny-llama-q4_0.gguf (q4_0", "threads 1", "flash attention off", "unified KV (f16/f16)",
              "extra buffer types off", "paged KV blocks of 4 (f32/f32, 256 bytes/token)"):
        assert s in settings, settings


def check_batched_worker_catches_a_batch_dependent_step(monkeypatch):
    """A batched step whose last logits of sequence 1 are one ulp off, or an engine that returns
    another token, fails that row alone, naming the sequence."""
    import refinfer.bench_batched as bb
    real, real_engine = bb.batched_generate, bb.engine_generate

    def off_by_one_ulp(m, kv, prompts, *a):
        r = real(m, kv, prompts, *a)
        if len(prompts) == 3:
            r["last"][1, 7] = np.nextafter(r["last"][1, 7], np.float32(np.inf))
        return r

    def other_token(m, prompts, *a, **kw):
        results, rate = real_engine(m, prompts, *a, **kw)
        if len(prompts) == 3:
            results[2].token_ids[1] += 1
        return results, rate

    monkeypatch.setattr(bb, "batched_generate", off_by_one_ulp)
    monkeypatch.setattr(bb, "engine_generate", other_token)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        tests = bb.worker_refinfer(str(MODEL), "numpy", 1, bb.QUICK, d)["tests"]
    assert tests["tg x3"]["error"] == "sequence 1's last-step logits differ from the serial run's at (7,)"
    assert tests["tg x3 sampled"]["error"] == tests["tg x3"]["error"]
    assert tests["engine x3"]["error"].startswith("sequence 2's token 1 is ")
    assert [t for t, v in tests.items() if v["error"]] == ["tg x3", "tg x3 sampled", "engine x3"]


def test_batched_worker_catches_a_batch_dependent_step(monkeypatch):
    check_batched_worker_catches_a_batch_dependent_step(monkeypatch)


def test_bench_batched_logits_off_the_reference_fail(tmp_path, capsys, monkeypatch):
    """Against a NumPy reference nudged by 1e-4 relative, refinfer's rows fail (NMSE 1e-8 >
    1e-10) and llama.cpp's pass (its bound is loose): exit 1, the failures listed."""
    pytest.importorskip("llama_cpp")
    import refinfer.bench_batched as bb
    real = bb.numpy_reference

    def nudged(*a):
        ref = real(*a)
        seq0 = ref["seq0"]

        def nudged_seq0(toks):
            rows, n = seq0(toks)
            return rows * np.float32(1 + 1e-4), n

        ref["seq0"] = nudged_seq0
        ref["pp"] = ref["pp"] * np.float32(1 + 1e-4)
        return ref

    monkeypatch.setattr(bb, "numpy_reference", nudged)
    rc = main([*BATCHED, "--backends", "numpy,llama.cpp", "--system", "0", "--no-sampled", "--json", str(tmp_path / "b.json")])
    stdout, _ = capsys.readouterr()
    assert rc == 1
    rows = {(r["backend"], r["test"]): r for r in json.loads((tmp_path / "b.json").read_text())}
    for test in ("p8+tg4 x1", "p8+tg4 x3", "p8+tg4 x3 engine", "pp24"):
        assert rows["numpy", test]["tokens_per_s"] is None and "nmse 1e-08 > 1e-10" in rows["numpy", test]["error"]
    assert all("error" not in r for (e, _), r in rows.items() if e == "llama.cpp")
    assert stdout.rstrip().splitlines()[-1].startswith("FAILED: numpy threads=1 pp24: pp logits differ")


@pytest.mark.parametrize("args,option", [(["--seqs", "0"], "--seqs"), (["--seqs", "a"], "--seqs"),
                                         (["--seqs", "1,300"], "--seqs"), (["--seqs", ","], "--seqs"),
                                         (["-p", "0"], "-p"), (["-n", "0"], "-n"), (["--prefill", "-1"], "--prefill"),
                                         (["--user", "0"], "--user"), (["--kv-block-size", "0"], "--kv-block-size"),
                                         (["-p", "124"], "-p/-n"), (["--prefill", "129"], "--prefill"),
                                         (["--system", "124"], "--system/--user"), (["-t", "0"], "--threads"),
                                         (["--backends", "tpu"], "--backends"), (["-r", "0"], "--reps")])
def test_bench_batched_rejects_bad_arguments(args, option, capsys):
    rc = main([*BATCHED, *args])
    _, err = capsys.readouterr()
    assert rc == 2 and err.startswith(f"error: {option}") and "\nhint: " in err and "Traceback" not in err, err


def test_bench_runs_a_gptq_checkpoint_directory(tiny_llama_f32, tmp_path, capsys):
    """A W4A16 checkpoint directory benches on refinfer's backends (its logits checked against the
    NumPy reference first, as every row); llama.cpp, which reads GGUF only, is refused by name."""
    from refinfer.methods import pipeline
    ck = tmp_path / "gptq"
    pipeline.quantize_model(str(tiny_llama_f32), ck, pipeline.Options(method="rtn", group_size=32), progress=False)
    out = tmp_path / "bench.json"
    rc = main(["bench", "-m", str(ck), "--backends", "numba", "-p", "8", "-n", "4", "-t", "1", "--json", str(out)])
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stdout + stderr
    assert {r["test"] for r in json.loads(out.read_text())} == {"pp8", "tg4"}
    rc = main(["bench", "-m", str(ck), "-t", "1"])
    assert rc == 2 and "llama.cpp runs GGUF files only" in capsys.readouterr().err
