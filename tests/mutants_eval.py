"""Injected bugs in the evaluation commands (dump, compare, perplexity, kld, bench) and the
checks that must catch them (see test_mutants.py). The check functions are imported when a
check runs, so a missing oracle skips only that check."""

from __future__ import annotations

import dataclasses

import numpy as np

from test_mutants import Mutant


def _output_norm_ignored(monkeypatch):
    # the loader hands the forward pass ones instead of output_norm.weight
    import refinfer.loader as loader
    real = loader._assemble

    def assemble(*a, **kw):
        w = real(*a, **kw)
        return dataclasses.replace(w, output_norm=np.ones_like(w.output_norm))

    monkeypatch.setattr(loader, "_assemble", assemble)


def _check_ideal_dump(request):
    from test_dump_compare import check_ideal_dump_against_llama_cpp
    check_ideal_dump_against_llama_cpp(request.getfixturevalue("tmp_path"), request.getfixturevalue("capsys"))


def _dump_written_in_reverse(monkeypatch):
    import refinfer.dump as dump
    real = dump.write_safetensors
    monkeypatch.setattr(dump, "write_safetensors",
                        lambda path, arrays, meta: real(path, dict(reversed(list(arrays.items()))), meta))


def _check_dump_order(request):
    from test_dump_compare import check_dump_file_order
    check_dump_file_order(request.getfixturevalue("tmp_path"))


def _ggml_quant_dot_one_ulp(monkeypatch):
    # every quantized matmul output of ggml mode one float32 ulp up
    import refinfer.backends.ggml_emulation as ge
    real = ge.quant_dot
    monkeypatch.setattr(ge, "quant_dot", lambda *a: np.nextafter(real(*a), np.float32(np.inf)).astype(np.float32))


def _check_ggml_exact(request):
    from test_kld_perplexity import check_ggml_mode_exact
    check_ggml_mode_exact("q8_0", 1)


def _llama_cpp_worker_fails(monkeypatch):
    import refinfer.bench as bench
    real = bench.run_worker
    monkeypatch.setattr(bench, "run_worker", lambda engine, *a, **kw: {"error": "exit code 1: ImportError: llama_cpp"}
                        if engine == "llama.cpp" else real(engine, *a, **kw))


def _check_bench(request):
    from test_bench_cmd import check_bench_rows_and_json
    check_bench_rows_and_json(request.getfixturevalue("tmp_path"), request.getfixturevalue("capsys"))


def _bench_checks_nothing(monkeypatch):
    import refinfer.bench as bench
    monkeypatch.setattr(bench, "check_logits", lambda engine, got, ref: {})


def _check_bench_reference(request):
    from test_bench_cmd import check_logits_off_the_reference_fail
    check_logits_off_the_reference_fail(request.getfixturevalue("tmp_path"), request.getfixturevalue("capsys"),
                                        request.getfixturevalue("monkeypatch"))


def _negative_chunks_drop_the_last(monkeypatch):
    # the old reading of --chunks -1: a Python slice, which drops the last chunk
    import refinfer.perplexity as ppl
    monkeypatch.setattr(ppl, "select_chunks", lambda chunks, n=None: chunks if n is None else chunks[:n])


def _check_chunks(request):
    from test_cli_eval_cmds import check_negative_chunks_mean_all
    check_negative_chunks_mean_all(request.getfixturevalue("tmp_path"), request.getfixturevalue("capsys"))


MUTANTS = [
    Mutant("eval_output_norm_ignored", _output_norm_ignored, _check_ideal_dump),
    Mutant("eval_dump_written_in_reverse", _dump_written_in_reverse, _check_dump_order),
    Mutant("eval_ggml_quant_dot_one_ulp", _ggml_quant_dot_one_ulp, _check_ggml_exact),
    Mutant("eval_bench_llama_cpp_worker_fails", _llama_cpp_worker_fails, _check_bench),
    Mutant("eval_bench_checks_nothing", _bench_checks_nothing, _check_bench_reference),
    Mutant("eval_negative_chunks_drop_the_last", _negative_chunks_drop_the_last, _check_chunks),
]
