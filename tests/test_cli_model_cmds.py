"""The commands that load a model or write one, run as a user would: bad options fail with
`error:` and `hint:` lines, exit 2 and nothing on stdout; seeds reproduce; `-n` never cuts a
character in half; `inspect` lists tensors refinfer cannot compute; `-t` sizes the thread
pools; ggml mode on numba says that it is not exact; `convert` writes the float model that
llama.cpp writes."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import refinfer
from models import llama_cpp_logits, llama_quantize
from refinfer.cli import main as cli_main
from refinfer.gguf_file import GGUFFile

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "formats" / "fixtures"
TINY_Q4_1 = FIXTURES / "tiny-llama-q4_1.gguf"   # context 128, SentencePiece vocabulary with byte tokens
# <0xNN> byte-fallback tokens of llama.cpp's SPM vocabulary: id = 3 + byte
BYTE = {b: 3 + b for b in range(256)}
TOK_A = 29909  # "A"


def cli(capsys, argv):
    rc = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def check_fails(capsys, argv, *fragments):
    """Exit 2, nothing on stdout, one `error:` line naming the fragments, a `hint:` line."""
    rc, out, err = cli(capsys, argv)
    assert rc == 2, (out, err)
    assert out == "", f"stdout before the error: {out!r}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, err
    for frag in fragments:
        assert frag in err, (frag, err)
    assert any(line.startswith("hint: ") and len(line) > 12 for line in lines), err
    return err


# --- generate: every option checked before anything is written --------------------------------

@pytest.mark.parametrize("args,fragments", [
    (["-n", "-3"], ["-n/--n-predict", "-3"]),
    (["--temp", "-1"], ["--temp", "-1"]),
    (["--top-p", "0"], ["--top-p", "0"]),
    (["--seed", "-5"], ["--seed", "-5"]),
    (["--backend", "nonsense"], ["backend", "'nonsense'"]),
    (["--mode", "fast"], ["mode", "'fast'"]),
    (["-t", "0"], ["-t/--threads", "0"]),
    (["-t", "99999"], ["-t/--threads", "1..512", "99999"]),   # was a segmentation fault in Numba's pool
    (["--repeat-last-n", "-2"], ["--repeat-last-n", "-2"]),
    (["-m", "/nonexistent/model.gguf"], ["/nonexistent/model.gguf"]),
])
def test_generate_rejects_bad_options_before_output(capsys, args, fragments):
    argv = ["generate", "Once upon a time"] + (args if "-m" in args else ["-m", TINY_Q4_1, *args])
    check_fails(capsys, argv, *fragments)


def test_generate_passes_the_sampling_options_to_the_sampler(monkeypatch, capsys):
    import refinfer.model
    seen = []

    class Recorder(refinfer.model.Sampler):
        def __init__(self, cfg):
            seen.append(cfg)
            super().__init__(cfg)

    monkeypatch.setattr(refinfer.model, "Sampler", Recorder)
    rc, _, err = cli(capsys, ["generate", "Once", "-m", TINY_Q4_1, "-n", "2", "--temp", "0.5", "--top-k", "7",
                              "--top-p", "0.9", "--min-p", "0.1", "--repeat-penalty", "1.3", "--repeat-last-n", "5",
                              "--seed", "11", "--backend", "numpy"])
    assert rc == 0, err
    c = seen[-1]
    assert (c.temperature, c.top_k, c.top_p, c.min_p, c.repeat_penalty, c.repeat_last_n, c.seed) == \
        (0.5, 7, 0.9, 0.1, 1.3, 5, 11)


def test_generate_rejects_an_empty_prompt(capsys):
    check_fails(capsys, ["generate", "", "-m", TINY_Q4_1], "prompt is empty")


def check_prompt_too_long(capsys):
    prompt = "word " * 200   # 201 tokens with BOS; the fixture's context is 128
    n = len(refinfer.load(TINY_Q4_1, backend="numpy").tokenize(prompt))
    err = check_fails(capsys, ["generate", prompt, "-m", TINY_Q4_1, "--backend", "numpy", "-n", "4"],
                      f"{n} tokens", "context length is 128")
    assert "at most 127 tokens" in err


def test_generate_rejects_a_prompt_longer_than_the_context_before_echoing_it(capsys):
    check_prompt_too_long(capsys)


def test_truncated_gguf_hint_gives_the_sizes(capsys, tmp_path):
    data = TINY_Q4_1.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:len(data) - 5000])   # inside the tensor data
    err = check_fails(capsys, ["generate", "hi", "-m", cut], str(cut), "past the end of the file")
    assert f"needs {len(data)} bytes, the file has {len(data) - 5000}" in err
    assert "re-download or re-convert" in err


# --- seeds ---------------------------------------------------------------------------------------

SEED_LINE = re.compile(r"seed (\d+)\]")


def check_random_seed_is_reported(capsys):
    base = ["generate", "Once upon a time", "-m", TINY_Q4_1, "--backend", "numpy", "-n", "12", "--temp", "1.5"]
    rc, out1, err1 = cli(capsys, base + ["--seed", "-1"])
    assert rc == 0, err1
    rc, out2, err2 = cli(capsys, base)     # -1 is the default
    assert rc == 0, err2
    s1, s2 = int(SEED_LINE.search(err1).group(1)), int(SEED_LINE.search(err2).group(1))
    assert s1 != s2                        # 1 in 2^32 to fail by chance
    rc, again, err = cli(capsys, base + ["--seed", s1])
    assert rc == 0 and again == out1 and f"seed {s1}]" in err
    # the Python API: seed -1 picks a seed, reported in stats, that repeats the text
    model = refinfer.load(TINY_Q4_1, backend="numpy")
    stats = {}
    text = model.generate("Once upon a time", max_tokens=12, temperature=1.5, seed=-1, stats=stats)
    assert isinstance(stats["seed"], int) and 0 <= stats["seed"] < 2**32
    assert model.generate("Once upon a time", max_tokens=12, temperature=1.5, seed=stats["seed"]) == text


def test_seed_minus_one_is_random_and_reported(capsys):
    check_random_seed_is_reported(capsys)


# --- -n never cuts a character in half -----------------------------------------------------------

class ScriptedSampler:
    """Returns the given token ids in order, so that the text ends where a test wants it to."""
    script: list = []

    def __init__(self, cfg):
        self.ids = iter(type(self).script)

    def __call__(self, logits, history, i):
        return next(self.ids)


EMOJI = [BYTE[b] for b in "😀".encode()]   # F0 9F 98 80: four byte tokens


def check_utf8_cut(monkeypatch, capsys):
    model = refinfer.load(TINY_Q4_1, backend="numpy")
    monkeypatch.setattr("refinfer.model.Sampler", ScriptedSampler)
    ScriptedSampler.script = [TOK_A, *EMOJI, TOK_A]
    for n, want in [(1, "A"), (2, "A"), (3, "A"), (4, "A"), (5, "A😀"), (6, "A😀A")]:
        assert model.generate("Hi", max_tokens=n) == want, n
        pieces = list(model.generate("Hi", max_tokens=n, stream=True))
        assert "".join(pieces) == want and all("\ufffd" not in p for p in pieces), (n, pieces)
    # a byte that can start no character is not cut: it decodes to U+FFFD as it should
    ScriptedSampler.script = [TOK_A, BYTE[0xFF], TOK_A, BYTE[0xF0], TOK_A, BYTE[0xF0]]
    assert model.generate("Hi", max_tokens=6) == "A\ufffdA\ufffdA"
    # and the command line prints no broken character either
    ScriptedSampler.script = [TOK_A, *EMOJI[:3]]
    rc, out, err = cli(capsys, ["generate", "Hi", "-m", TINY_Q4_1, "--backend", "numpy", "-n", "4"])
    assert rc == 0 and out == "HiA\n", (out, err)


def test_n_predict_never_emits_an_incomplete_utf8_sequence(monkeypatch, capsys):
    check_utf8_cut(monkeypatch, capsys)


# --- inspect: tensors of a type refinfer cannot compute -----------------------------------------

def iq2_xxs_model(path):
    """The fixture model with one extra 2 x 256 IQ2_XXS tensor (ggml type 16, 66 bytes per 256)."""
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType.IQ2_XXS]
    f = GGUFFile(TINY_Q4_1)
    tensors = [(n, f.raw(n), t.qtype, t.shape) for n, t in f.tensors.items()]
    raw = np.random.default_rng(0).integers(0, 256, (2, 256 // block * size), dtype=np.uint8)
    import gguf
    w = gguf.GGUFWriter(os.fspath(path), "llama")
    for k, v in f.metadata.items():
        if k != "general.architecture":
            w.add_key_value(k, v, f.metadata_types[k], sub_type=f.array_types.get(k))
    for n, data, t, shape in tensors:
        w.add_tensor(n, np.asarray(data).reshape(*shape[:-1], -1), raw_dtype=GGMLQuantizationType(t.type_id))
    w.add_tensor("blk.0.iq_test.weight", raw, raw_dtype=GGMLQuantizationType.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, 2 * 256, raw.nbytes, 8 * size / block


def check_inspect_unsupported(tmp_path, capsys):
    path, n_params, n_bytes, bpw = iq2_xxs_model(tmp_path / "iq.gguf")
    rc, out, err = cli(capsys, ["inspect", path])
    assert rc == 0, err
    row = next(line for line in out.splitlines() if line.strip().startswith("blk.0.iq_test.weight"))
    assert row.split()[1:] == ["iq2_xxs", "2", "x", "256", f"{n_bytes:,}", "unsupported"], row
    assert sum("unsupported" in line for line in out.splitlines() if line.startswith("  blk.")) == 1
    assert "llama.context_length" in out and "[32000 x str]" in out     # the metadata is all there
    by_type = next(line for line in out.splitlines() if line.strip().startswith("iq2_xxs ") and "bits/weight" in line)
    assert f"{n_params:>15,} params" in by_type and f"{bpw:.2f} bits/weight" in by_type
    rc, out, err = cli(capsys, ["inspect", path, "--json"])
    r = json.loads(out)
    t = {x["name"]: x for x in r["tensors"]}
    assert t["blk.0.iq_test.weight"]["supported"] is False and t["blk.0.iq_test.weight"]["nbytes"] == n_bytes
    assert all(x["supported"] for n, x in t.items() if n != "blk.0.iq_test.weight")
    assert r["totals"]["unsupported_types"] == ["iq2_xxs"]
    # computing with it is refused, naming the tensor and its type
    check_fails(capsys, ["generate", "hi", "-m", path], "'blk.0.iq_test.weight'", "IQ2_XXS")


def test_inspect_shows_a_model_with_an_unsupported_type(tmp_path, capsys):
    check_inspect_unsupported(tmp_path, capsys)


# --- -t/--threads --------------------------------------------------------------------------------

def test_threads_option_sizes_numba_and_blas_before_the_model_loads():
    # a fresh process: -t 1 must reach Numba before it starts its pool, and BLAS
    code = ("import sys; from refinfer.cli import main; "
            "rc = main(['generate', 'Hi', '-m', sys.argv[1], '-n', '2', '-t', '1', '--backend', 'numba']); "
            "import numba, threadpoolctl; "
            "print('NUMBA', numba.config.NUMBA_NUM_THREADS, numba.get_num_threads()); "
            "print('BLAS', sorted({p['num_threads'] for p in threadpoolctl.threadpool_info()})); sys.exit(rc)")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_NUM_THREADS"}
    r = subprocess.run([sys.executable, "-c", code, str(TINY_Q4_1)], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    assert "NUMBA 1 1" in r.stdout and "BLAS [1]" in r.stdout, r.stdout
    assert "threads 1;" in r.stderr


def check_threads_in_process(monkeypatch, capsys):
    """-t 1 is in force (Numba and BLAS) when the model loads."""
    import numba
    import threadpoolctl

    import refinfer.model        # `import refinfer` alone does not load it
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: a thread count of 1 cannot be told from the default")
    seen = {}
    real_load = refinfer.model.load

    def load(*a, **kw):   # records the pools' sizes at the moment the command loads the model
        seen["numba"] = numba.get_num_threads()
        seen["blas"] = {p["num_threads"] for p in threadpoolctl.threadpool_info()}
        return real_load(*a, **kw)

    monkeypatch.setattr("refinfer.model.load", load)
    before = numba.get_num_threads()
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    try:
        with threadpoolctl.threadpool_limits(limits=None):   # restores the BLAS pools on exit
            rc, out, err = cli(capsys, ["generate", "Hi", "-m", TINY_Q4_1, "-n", "1", "-t", "1", "--backend", "numpy"])
    finally:
        numba.set_num_threads(before)
    assert rc == 0, err
    assert seen == {"numba": 1, "blas": {1}}, seen


def test_threads_option_is_in_force_when_the_model_loads(monkeypatch, capsys):
    check_threads_in_process(monkeypatch, capsys)


# --- ggml mode on numba is exact: no warning, the reference's tokens ------------------------------

def check_ggml_numba_is_exact(capsys):
    args = ["generate", "Hi", "-m", TINY_Q4_1, "-n", "4", "--temp", "0", "--mode", "ggml"]
    rc, out_numba, err = cli(capsys, args + ["--backend", "numba"])
    assert rc == 0 and "warning:" not in err, err
    rc, out_numpy, err = cli(capsys, args + ["--backend", "numpy"])
    assert rc == 0 and "warning:" not in err, err
    assert out_numba == out_numpy


def test_ggml_mode_on_numba_is_exact(capsys):
    check_ggml_numba_is_exact(capsys)


# --- convert -------------------------------------------------------------------------------------

def refinfer_logits(path, mode="ideal"):
    model = refinfer.load(path, backend="numpy", mode=mode)
    return model.logits(model.tokenize("The quick brown fox jumps over the lazy dog"))


def check_convert_f32_is_exact(tmp_path, capsys):
    out = tmp_path / "f32.gguf"
    rc, o, err = cli(capsys, ["convert", TINY_Q4_1, out, "--type", "f32"])
    assert rc == 0, err
    assert "15 tensors dequantized to f32 (from q4_1), 5 copied" in o, o
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask   # as any new file, not mkstemp's 0600
    f, src = GGUFFile(out), GGUFFile(TINY_Q4_1)
    assert f.metadata["general.file_type"] == 0
    assert {k: v for k, v in f.metadata.items() if k != "general.file_type"} == \
        {k: v for k, v in src.metadata.items() if k != "general.file_type"}
    for name, t in f.tensors.items():
        assert t.qtype.name == "f32", name
        assert np.array_equal(f.dequantize(name), src.dequantize(name)), name
    # the dequantized weights are exact, so refinfer computes the same bits from either file
    assert np.array_equal(refinfer_logits(out), refinfer_logits(TINY_Q4_1))


def test_convert_to_f32_keeps_the_dequantized_weights_exactly(tmp_path, capsys):
    check_convert_f32_is_exact(tmp_path, capsys)


llama_cpp_required = pytest.mark.skipif(not __import__("importlib").util.find_spec("llama_cpp"),
                                        reason="llama-cpp-python is not installed")


def nmse(a, b):
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


@llama_cpp_required
def test_convert_to_f16_is_llama_cpps_file_and_quantizes_back(tmp_path, capsys):
    check_convert_f16(tmp_path, capsys)


def check_convert_f16(tmp_path, capsys):
    f16 = tmp_path / "f16.gguf"
    rc, o, err = cli(capsys, ["convert", TINY_Q4_1, f16, "--type", "f16"])
    assert rc == 0, err
    assert "15 tensors dequantized to f16 (from q4_1), 5 copied;" in o, o
    ref = llama_quantize(TINY_Q4_1, tmp_path / "ref-f16.gguf", "f16", allow_requantize=True)
    assert f16.read_bytes() == ref.read_bytes()
    f = GGUFFile(f16)
    assert f.metadata["general.file_type"] == 1
    assert {n: t.qtype.name for n, t in f.tensors.items() if len(t.shape) == 1} == \
        {n: "f32" for n, t in f.tensors.items() if len(t.shape) == 1}
    # llama.cpp runs it; rounding the q4_1 weights to f16 costs little
    ours = refinfer_logits(TINY_Q4_1)
    err_f16 = nmse(llama_cpp_logits(f16), ours)
    assert err_f16 < 1e-5, err_f16   # measured 8.8e-7 (f16 weights, llama.cpp's q8 activations and f16 KV)
    f32 = tmp_path / "f32.gguf"
    assert cli(capsys, ["convert", TINY_Q4_1, f32, "--type", "f32"])[0] == 0
    ref = llama_quantize(TINY_Q4_1, tmp_path / "ref-f32.gguf", "f32", allow_requantize=True)
    assert f32.read_bytes() == ref.read_bytes()
    err_f32 = nmse(llama_cpp_logits(f32), ours)
    assert err_f32 < 2e-6, err_f32   # measured 1.8e-7: llama.cpp's own roundings on exact weights
    # quantize takes the f16 conversion back to q4_0, as llama.cpp does
    q4 = tmp_path / "q4_0.gguf"
    rc, o, err = cli(capsys, ["quantize", f16, q4, "--type", "q4_0"])
    assert rc == 0 and "15 tensors q4_0, 5 copied" in o and "note:" not in err, (o, err)
    assert q4.read_bytes() == llama_quantize(f16, tmp_path / "ref-q4_0.gguf", "q4_0").read_bytes()


@llama_cpp_required
def test_quantize_requantizes_a_quantized_model_and_says_what_it_costs(tmp_path, capsys):
    out = tmp_path / "q8_0.gguf"
    rc, o, err = cli(capsys, ["quantize", TINY_Q4_1, out, "--type", "q8_0"])
    assert rc == 0, err
    assert "15 tensors q8_0 (from q4_1)" in o
    assert "already quantized (q4_1)" in err and "compounds the rounding error" in err
    ref = llama_quantize(TINY_Q4_1, tmp_path / "ref.gguf", "q8_0", allow_requantize=True)
    assert out.read_bytes() == ref.read_bytes()


def test_convert_bf16_and_errors(tmp_path, capsys):
    out = tmp_path / "bf16.gguf"
    rc, o, err = cli(capsys, ["convert", TINY_Q4_1, out, "--type", "BF16"])
    assert rc == 0, err
    f = GGUFFile(out)
    assert f.metadata["general.file_type"] == 32
    assert {t.qtype.name for t in f.tensors.values() if len(t.shape) == 2} == {"bf16"}
    check_fails(capsys, ["convert", TINY_Q4_1, tmp_path / "o.gguf", "--type", "f8"], "'f8'", "f32, f16, bf16")
    err = check_fails(capsys, ["convert", TINY_Q4_1, tmp_path / "o.gguf", "--type", "q4_0"], "'q4_0'")
    assert "refinfer quantize" in err
    check_fails(capsys, ["convert", tmp_path / "missing.gguf", tmp_path / "o.gguf", "--type", "f16"],
                "missing.gguf", "does not exist")
    check_fails(capsys, ["convert", TINY_Q4_1, tmp_path / "no" / "o.gguf", "--type", "f16"],
                str(tmp_path / "no"), "does not exist")
    check_fails(capsys, ["convert", TINY_Q4_1, out / "o.gguf", "--type", "f16"], "is a file, not a directory")
    assert not (tmp_path / "o.gguf").exists()


def test_convert_refuses_a_model_with_an_unsupported_type(tmp_path, capsys):
    path, *_ = iq2_xxs_model(tmp_path / "iq.gguf")
    check_fails(capsys, ["convert", path, tmp_path / "o.gguf", "--type", "f16"], "'blk.0.iq_test.weight'", "IQ2_XXS")
    assert not (tmp_path / "o.gguf").exists()
