"""The evaluation commands (dump, compare, perplexity, kld, bench) check their arguments and
output paths before any work starts: bad input is `error:` + `hint:` and exit 2, never a
traceback; and the values llama-perplexity gives a meaning (--chunks -1) mean the same here."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from refinfer.cli import main

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "formats" / "fixtures"
Q8 = FIXTURES / "tiny-llama-q8_0.gguf"
Q4 = FIXTURES / "tiny-llama-q4_0.gguf"
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
        "it was the season of Darkness, it was the spring of hope, it was the winter of despair. ") * 6
TOKENS = "1,9038,2501,263,931,29892,727"


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean_error(rc, err, *needles):
    """exit 2, an `error:` line naming each needle, a `hint:` line, no traceback."""
    assert rc == 2, err
    lines = err.strip().splitlines()
    error = next((line for line in lines if line.startswith("error: ")), None)
    assert error is not None, err
    for needle in needles:
        assert needle in error, (needle, err)
    assert any(line.startswith("hint: ") and len(line) > 8 for line in lines), err
    assert "Traceback" not in err


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)                                  # 470 tokens with the fixtures' vocabulary
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a model is loaded, a source opened, a dump read or a bench run."""
    import refinfer.bench
    import refinfer.dump
    import refinfer.model
    import refinfer.perplexity

    def forbidden(*a, **kw):
        raise AssertionError("work started before the arguments were checked")

    for mod, name in ((refinfer.model, "load"), (refinfer.perplexity, "parse_source"), (refinfer.dump, "read_dump"),
                      (refinfer.bench, "run_bench"), (refinfer.bench, "run_worker"),
                      (refinfer.bench, "reference_logits")):
        monkeypatch.setattr(mod, name, forbidden)


# ---- kld and perplexity: --ctx and --chunks ------------------------------------------------------

@pytest.mark.parametrize("args,needles", [
    (["--chunks", "0"], ["--chunks 0"]),
    (["-c", "0"], ["-c/--ctx", "got 0"]),                  # was silently 512
    (["-c", "3"], ["-c/--ctx", "at least 4", "got 3"]),
    (["-c", "-8"], ["-c/--ctx", "got -8"]),
    (["-t", "0"], ["-t/--threads", "got 0"]),
    (["-t", "513"], ["-t/--threads", "1..512", "got 513"]),
])
def test_kld_bad_ctx_chunks_threads(args, needles, text, capsys, no_work):
    rc, _, err = run(capsys, "kld", "--base", Q8, "--test", Q4, "-f", text, *args)
    assert_clean_error(rc, err, *needles)


@pytest.mark.parametrize("args,needles", [
    (["--chunks", "0"], ["--chunks 0"]),
    (["-c", "0"], ["-c/--ctx", "got 0"]),
    (["-c", "2"], ["-c/--ctx", "got 2"]),
    (["-t", "-1"], ["-t/--threads"]),
])
def test_perplexity_bad_ctx_chunks_threads(args, needles, text, capsys, no_work):
    rc, out, err = run(capsys, "perplexity", "-m", Q8, "-f", text, *args)
    assert_clean_error(rc, err, *needles)
    assert "PPL" not in out


def test_ctx_larger_than_the_text_allows(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text(TEXT[:200])                          # 57 tokens
    rc, _, err = run(capsys, "kld", "--base", Q8, "--test", Q4, "-f", short, "-c", "32", "--no-progress")
    assert_clean_error(rc, err, "-c 32", "57 tokens", "needs at least 64")
    assert "hint: the largest -c for this text is 28" in err
    rc, _, err = run(capsys, "perplexity", "-m", Q8, "-f", short, "-c", "32", "--no-progress")
    assert_clean_error(rc, err, "-c 32", "needs at least 64")
    short.write_text("Hi")
    rc, _, err = run(capsys, "perplexity", "-m", Q8, "-f", short, "-c", "32", "--no-progress")
    assert_clean_error(rc, err, "-c 32", "needs at least 64")
    assert "hint: use a longer text" in err


def test_ctx_larger_than_the_model_context(tmp_path, capsys):
    long = tmp_path / "long.txt"
    long.write_text(TEXT * 2)                             # 940 tokens: room for -c 200 twice
    for cmd in (["kld", "--base", Q8, "--test", Q4], ["perplexity", "-m", Q8]):
        rc, _, err = run(capsys, *cmd, "-f", long, "-c", "200", "--no-progress")
        assert_clean_error(rc, err, "-c 200", "context length", "128 tokens")
        assert "hint: -c 128 or less" in err


def test_odd_ctx_is_accepted_as_in_llama_perplexity(text, tmp_path, capsys):
    """llama-perplexity takes any n_ctx > 0 and scores from n_ctx / 2; so does refinfer."""
    js = tmp_path / "k.json"
    rc, _, err = run(capsys, "kld", "--base", Q8, "--test", Q4, "-f", text, "-c", "33", "--chunks", "2",
                     "--no-progress", "--json", js)
    assert rc == 0, err
    assert json.loads(js.read_text())["tests"][str(Q4)]["n"] == 2 * (33 - 1 - 16)


def check_negative_chunks_mean_all(tmp_path, capsys):
    """--chunks -1 (any negative) scores every chunk, as llama-perplexity does, for perplexity
    and kld: 470 tokens are 7 chunks of 64."""
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    for chunks in ([], ["--chunks", "-1"], ["--chunks", "-5"], ["--chunks", "99"]):
        rc, out, err = run(capsys, "perplexity", "-m", Q8, "-f", text, "-c", "64", "--no-progress", *chunks)
        assert rc == 0, err
        assert re.findall(r"\[(\d+)\]", out.splitlines()[0]) == [str(i) for i in range(1, 8)], (chunks, out)
        assert "7 chunks of 64, 217 scored" in err
        js = tmp_path / "k.json"
        rc, _, err = run(capsys, "kld", "--base", Q8, "--test", Q4, "-f", text, "-c", "64", "--no-progress",
                         "--json", js, *chunks)
        assert rc == 0, err
        assert json.loads(js.read_text())["tests"][str(Q4)]["n"] == 7 * 31, chunks


def test_negative_chunks_mean_all(tmp_path, capsys):
    check_negative_chunks_mean_all(tmp_path, capsys)


def test_kld_base_file_and_ctx_disagree(tmp_path, capsys):
    rc, _, err = run(capsys, "kld", "--base", FIXTURES / "logits-q8_0.safetensors", "--test", Q8, "-c", "64")
    assert_clean_error(rc, err, "logits-q8_0.safetensors", "chunks of 5 tokens", "-c 64")


# ---- dump: token ids checked against the model before anything runs -------------------------------

@pytest.mark.parametrize("tokens,needles", [
    ("1,32000", ["--tokens", "id 32000", "0..31999"]),          # the fixtures' vocabulary has 32000 ids
    ("1,-3", ["--tokens", "id -3", "0..31999"]),
    (",".join(["1"] * 129), ["--tokens", "129 tokens", "context length", "(128)"]),
])
def test_dump_tokens_outside_the_model(tokens, needles, tmp_path, capsys):
    out = tmp_path / "d.safetensors"
    rc, _, err = run(capsys, "dump", "-m", Q8, "--tokens", tokens, "-o", out, "--no-progress")
    assert_clean_error(rc, err, *needles)
    assert not out.exists()


# ---- output paths: checked before any work -------------------------------------------------------

@pytest.mark.parametrize("case", ["missing-dir", "dir-is-a-file", "is-a-dir"])
@pytest.mark.parametrize("command", ["dump -o", "kld --json", "kld --save-base", "bench --json", "compare --json"])
def test_unwritable_output_paths(command, case, tmp_path, text, capsys, no_work):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    bad = {"missing-dir": tmp_path / "no" / "such" / "out.json", "dir-is-a-file": tmp_path / "afile" / "out.json",
           "is-a-dir": tmp_path / "adir"}[case]
    cmd, option = command.split()
    argv = {"dump": ["dump", "-m", Q8, "--tokens", TOKENS],
            "kld": ["kld", "--base", Q8, "--test", Q4, "-f", text],
            "bench": ["bench", "-m", Q8],
            "compare": ["compare", "a.safetensors", "b.safetensors"]}[cmd]
    rc, _, err = run(capsys, *argv, option, bad)
    assert_clean_error(rc, err, option, str(bad))


def test_compare_bad_json_path_is_bad_input_not_a_divergence(tmp_path, capsys):
    dump = tmp_path / "a.safetensors"
    assert main(["dump", "-m", str(Q8), "--tokens", TOKENS, "-o", str(dump), "--no-progress"]) == 0
    capsys.readouterr()
    rc, _, err = run(capsys, "compare", dump, dump, "--json", "/nonexistent/x.json")
    assert_clean_error(rc, err, "--json", "/nonexistent/x.json")


def test_kld_json_and_save_base_on_one_file(tmp_path, text, capsys, no_work):
    same = tmp_path / "x.safetensors"
    rc, _, err = run(capsys, "kld", "--base", Q8, "--test", Q4, "-f", text, "--json", same, "--save-base", same)
    assert_clean_error(rc, err, "--json", "--save-base")


# ---- bench ---------------------------------------------------------------------------------------

def test_bench_missing_model_fails_before_any_worker(tmp_path, capsys, no_work):
    missing = tmp_path / "missing.gguf"
    rc, out, err = run(capsys, "bench", "-m", missing)
    assert_clean_error(rc, err, "-m", str(missing), "does not exist")
    assert out == ""
    rc, _, err = run(capsys, "bench", "-m", tmp_path)
    assert_clean_error(rc, err, "-m", "is a directory")


def test_bench_not_a_gguf_fails_before_any_worker(tmp_path, capsys, monkeypatch):
    import refinfer.bench

    def forbidden(*a, **kw):
        raise AssertionError("a worker started")

    monkeypatch.setattr(refinfer.bench, "run_worker", forbidden)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    rc, _, err = run(capsys, "bench", "-m", junk, "-p", "4", "-n", "2")
    assert_clean_error(rc, err, "junk.gguf")


# ---- compare: bad input is exit 2 ------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("two")
    out = {}
    for name, model in (("q8", Q8), ("q4", Q4)):
        out[name] = d / f"{name}.safetensors"
        assert main(["dump", "-m", str(model), "--tokens", TOKENS, "-o", str(out[name]), "--no-progress", "-t", "1"]) == 0
    return out


def test_dumps_of_different_models_are_bad_input(two_models, capsys):
    rc, out, err = run(capsys, "compare", two_models["q8"], two_models["q4"])
    assert_clean_error(rc, err, str(two_models["q8"]), str(two_models["q4"]), "different models",
                       "tiny-llama-q8_0.gguf", "tiny-llama-q4_0.gguf")
    assert out == ""


@pytest.mark.parametrize("table,needles,hint", [
    ({"defaults": {"nmse": 1e-3}}, ["'defaults'", "top level"], "valid top-level keys: default, tensors"),
    ({"default": {"nmse": 1e-3}, "tensor": {}}, ["'tensor'"], "valid top-level keys: default, tensors"),
    ({"tensors": {"kq-*": {"nmsee": 1e-3}}}, ["tensors['kq-*']", "'nmsee'"], "valid keys of a rule: nmse, max_abs, cos"),
    ({"default": {"nmse": 1e-3, "max-abs": 1}}, ["default", "'max-abs'"], "valid keys of a rule: nmse, max_abs, cos"),
    ({"default": {"cos": True}}, ["cos = True", "not a number"], "limits are numbers"),
])
def test_tolerance_table_refuses_unknown_keys(two_models, tmp_path, capsys, table, needles, hint):
    path = tmp_path / "tol.json"
    path.write_text(json.dumps(table))
    rc, out, err = run(capsys, "compare", two_models["q8"], two_models["q8"], "--tolerance-table", path)
    assert_clean_error(rc, err, str(path), *needles)
    assert f"hint: {hint}" in err and out == ""


def test_compare_summarises_names_and_ends_with_the_verdict(two_models, tmp_path, capsys):
    part = tmp_path / "part.safetensors"
    assert main(["dump", "-m", str(Q8), "--tokens", TOKENS, "-o", str(part), "--no-progress", "--skip", "kq-*",
                 "--skip", "ffn_*", "--skip", "result_norm"]) == 0
    capsys.readouterr()
    rc, out, _ = run(capsys, "compare", two_models["q8"], part)
    lines = out.splitlines()
    assert rc == 0
    assert lines[-2] == ("only in the reference, not compared (11): kq-* (2 tensors), ffn_inp-* (2 tensors), "
                         "ffn_norm-* (2 tensors), ffn_swiglu-* (2 tensors), ffn_out-* (2 tensors), result_norm")
    assert lines[-1].startswith("OK: 20 tensors, nothing systematic")   # 16 activations + cache_k/cache_v of 2 layers
    assert not any("only in" in line for line in lines[:-2])


def test_threads_option_on_dump_and_compare(two_models, tmp_path, capsys):
    rc, _, err = run(capsys, "dump", "-m", Q8, "--tokens", TOKENS, "-o", tmp_path / "x.safetensors", "-t", "0")
    assert_clean_error(rc, err, "-t/--threads")
    rc, _, err = run(capsys, "compare", two_models["q8"], "--llama-cpp", Q8, "-t", "0")
    assert_clean_error(rc, err, "-t/--threads")


def test_kld_floor_needs_a_text_not_a_prompt_base(capsys):
    rc, _, err = run(capsys, "kld", "--base", FIXTURES / "logits-q4_0.safetensors", "--floor", Q4)
    assert_clean_error(rc, err, "--floor", "logits-q4_0.safetensors", "one prompt")
