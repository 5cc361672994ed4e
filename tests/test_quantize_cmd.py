"""`refinfer quantize` against llama.cpp's own quantizer (llama_model_quantize, pure mode):
same tensors, same types, same bytes, same metadata, and llama.cpp loads the result."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from models import gguf_to_hf_dir, llama_cpp_logits, llama_quantize, make_tiny_llama_gguf
from refinfer.cli import main as cli_main
from refinfer.gguf_file import GGUFFile, write_gguf
from refinfer.quantize_model import FTYPES, quantize_model

llama_cpp = pytest.importorskip("llama_cpp")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "refinfer", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def assert_same_tensors(a, b):
    # tensors: same order, types, shapes, bytes, and offsets in the data section
    assert list(a.tensors) == list(b.tensors)
    for name, tb in b.tensors.items():
        ta = a.tensors[name]
        assert ta.qtype.name == tb.qtype.name, (name, ta.qtype.name, tb.qtype.name)
        assert ta.ne == tb.ne, name
        xa, xb = a.raw(name), b.raw(name)
        if not np.array_equal(xa, xb):
            row = int(np.argmax((xa != xb).any(axis=-1)))
            pytest.fail(f"{name} ({tb.qtype.name}): row {row} differs from llama.cpp's")
        assert ta.offset - a.data_offset == tb.offset - b.data_offset, name
    assert a.alignment == b.alignment


def assert_same_as_llama_cpp(ours, ref):
    a, b = GGUFFile(ours), GGUFFile(ref)
    assert_same_tensors(a, b)
    # metadata: same keys in the same order, with the same types and values
    assert list(a.metadata) == list(b.metadata)
    for k in b.metadata:
        assert a.metadata_types[k] == b.metadata_types[k], k
        assert a.array_types.get(k) == b.array_types.get(k), k
        assert a.metadata[k] == b.metadata[k], k


@pytest.fixture(scope="module")
def f32_logits(tiny_llama_f32):
    return llama_cpp_logits(tiny_llama_f32)


# q4_0 from f32 and q8_0 from f16 go through the command line in a subprocess; the rest call
# the Python function behind it.
VIA_CLI = {("f32", "q4_0"), ("f16", "q8_0")}


@pytest.mark.parametrize("qtype", list(FTYPES))
@pytest.mark.parametrize("src", ["f32", "f16"])
def test_matches_llama_model_quantize(src, qtype, tiny_llama_f32, tiny_llama_f16, f32_logits, tmp_path):
    model = {"f32": tiny_llama_f32, "f16": tiny_llama_f16}[src]
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    if (src, qtype) in VIA_CLI:
        r = run_cli("quantize", model, ours, "--type", qtype.upper())
        assert r.returncode == 0, r.stderr
        assert f"16 tensors {qtype}, 5 copied" in r.stdout
    else:
        report = quantize_model(model, ours, qtype)
        assert (report.n_quantized, report.n_copied, report.f16_fallback) == (16, 5, [])
    llama_quantize(model, ref, qtype)
    assert_same_as_llama_cpp(ours, ref)
    # and with the same layout (header, key order, padding) the whole files are identical
    assert ours.read_bytes() == ref.read_bytes()

    md = GGUFFile(ours).metadata
    assert md["general.file_type"] == FTYPES[qtype] and md["general.quantization_version"] == 2
    logits = llama_cpp_logits(ours)
    assert np.isfinite(logits).all()
    # the quantized model still computes the f32 model's function, roughly
    nmse = float(((logits - f32_logits) ** 2).sum() / (f32_logits ** 2).sum())
    assert nmse < (0.01 if qtype == "q8_0" else 0.2), nmse


def test_bf16_input_odd_row_length_and_tied_embeddings(vocab_dir, tmp_path):
    # ffn_down has rows of 176 elements, not a multiple of 32: llama.cpp writes it as F16
    # (converted from bf16 through f32); tied embeddings mean no output.weight
    model = make_tiny_llama_gguf(tmp_path / "bf16.gguf", vocab_gguf=vocab_dir / "ggml-vocab-llama-spm.gguf",
                                 dtype="bf16", hidden_dim=176, tie_embeddings=True, seed=5)
    for qtype in ("q4_1", "q5_0"):
        ours, ref = tmp_path / f"ours-{qtype}.gguf", tmp_path / f"ref-{qtype}.gguf"
        report = quantize_model(model, ours, qtype)
        assert report.f16_fallback == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]
        assert_same_as_llama_cpp(ours, llama_quantize(model, ref, qtype))
        types = {t.name: t.qtype.name for t in GGUFFile(ours).tensors.values()}
        assert types["blk.1.ffn_down.weight"] == "f16" and types["token_embd.weight"] == qtype
        assert np.isfinite(llama_cpp_logits(ours)).all()


def test_f16_input_with_odd_rows_copies_them(vocab_dir, tmp_path):
    model = make_tiny_llama_gguf(tmp_path / "f16.gguf", vocab_gguf=vocab_dir / "ggml-vocab-llama-spm.gguf",
                                 dtype="f16", hidden_dim=176, n_layers=1, seed=6)
    ours = tmp_path / "ours.gguf"
    quantize_model(model, ours, "q5_1")
    assert_same_as_llama_cpp(ours, llama_quantize(model, tmp_path / "ref.gguf", "q5_1"))
    name = "blk.0.ffn_down.weight"
    assert GGUFFile(ours).tensors[name].qtype.name == "f16"
    assert np.array_equal(GGUFFile(ours).raw(name), GGUFFile(model).raw(name))


# --- errors: exit code 2, "error:" and a hint, no traceback, no output file ---------------

def check_error(capsys, argv, *fragments):
    rc = cli_main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error:") and "Traceback" not in err, err
    for frag in fragments:
        assert frag in err, err
    return err


def test_error_unsupported_type(tiny_llama_f32, tmp_path, capsys):
    check_error(capsys, ["quantize", str(tiny_llama_f32), str(tmp_path / "o.gguf"), "--type", "iq2_xs"],
                "'iq2_xs'", "hint:", "q4_0, q4_1, q5_0, q5_1, q8_0")
    check_error(capsys, ["quantize", str(tiny_llama_f32), str(tmp_path / "o.gguf"), "--type", "q4"], "'q4'",
                "hint:", "f32, f16, bf16, q4_0")
    assert not (tmp_path / "o.gguf").exists()


def test_float_types_match_llama_model_quantize(tiny_llama_f32, tmp_path):
    # --type f16 is llama-quantize's MOSTLY_F16: 2-D weights converted, norms copied as f32
    report = quantize_model(tiny_llama_f32, tmp_path / "ours.gguf", "f16")
    assert (report.n_quantized, report.n_copied, report.f16_fallback, report.requantized) == (16, 5, [], [])
    assert_same_as_llama_cpp(tmp_path / "ours.gguf", llama_quantize(tiny_llama_f32, tmp_path / "ref.gguf", "f16"))
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()


def test_error_missing_input_and_output_dir(tiny_llama_f32, tmp_path, capsys):
    check_error(capsys, ["quantize", str(tmp_path / "nope.gguf"), str(tmp_path / "o.gguf"), "--type", "q4_0"],
                "nope.gguf", "does not exist")
    check_error(capsys, ["quantize", str(tiny_llama_f32), str(tmp_path / "no" / "o.gguf"), "--type", "q4_0"],
                "does not exist", "hint:")


def test_error_vocab_from_with_a_gguf_input(tiny_llama_f32, tmp_path, capsys):
    check_error(capsys, ["quantize", str(tiny_llama_f32), str(tmp_path / "o.gguf"), "--type", "q4_0",
                         "--vocab-from", str(tiny_llama_f32)], "--vocab-from", "GGUF", "hint:")
    assert not (tmp_path / "o.gguf").exists()


def test_error_output_is_input(tiny_llama_f32, tmp_path, capsys):
    link = tmp_path / "same.gguf"
    os.symlink(tiny_llama_f32, link)
    before = tiny_llama_f32.read_bytes()
    check_error(capsys, ["quantize", str(tiny_llama_f32), str(link), "--type", "q8_0"], "is the input", "hint:")
    assert tiny_llama_f32.read_bytes() == before


def test_already_quantized_input_is_requantized_with_a_note(tiny_llama_f32, tmp_path):
    # dequantized, then quantized again: llama-quantize --allow-requantize writes the same bytes
    q = llama_quantize(tiny_llama_f32, tmp_path / "q4_0.gguf", "q4_0")
    r = run_cli("quantize", q, tmp_path / "again.gguf", "--type", "q8_0")
    assert r.returncode == 0, r.stderr
    assert "16 tensors q8_0 (from q4_0), 5 copied" in r.stdout
    assert r.stderr.startswith("note: the input was already quantized (q4_0)") and "compounds" in r.stderr
    ref = llama_quantize(q, tmp_path / "ref.gguf", "q8_0", allow_requantize=True)
    assert (tmp_path / "again.gguf").read_bytes() == ref.read_bytes()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]


def test_error_not_gguf_and_nonfinite(tmp_path, capsys):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all, just some text" * 4)
    check_error(capsys, ["quantize", str(junk), str(tmp_path / "o.gguf"), "--type", "q4_0"], "junk.gguf", "magic")
    w = np.ones((4, 64), np.float32)
    w[2, 33] = np.nan
    bad = tmp_path / "nan.gguf"
    write_gguf(bad, "llama", {}, {}, [("blk.0.attn_q.weight", w.view(np.uint8), "f32", w.shape)])
    check_error(capsys, ["quantize", str(bad), str(tmp_path / "o.gguf"), "--type", "q4_0"],
                "blk.0.attn_q.weight", "non-finite")
    assert not (tmp_path / "o.gguf").exists()


# --- HF safetensors checkpoint directory as input --------------------------------------------

@pytest.mark.parametrize("dtype,qtype", [("f32", "q4_0"), ("bf16", "q5_1")])
def test_hf_directory_matches_llama_cpp_on_the_converted_gguf(dtype, qtype, vocab_dir, tmp_path):
    spm = vocab_dir / "ggml-vocab-llama-spm.gguf"
    model = make_tiny_llama_gguf(tmp_path / "m.gguf", vocab_gguf=spm, dtype=dtype, seed=7)
    hf = gguf_to_hf_dir(model, tmp_path / "hf")
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    if dtype == "f32":
        r = run_cli("quantize", hf, ours, "--type", qtype, "--vocab-from", spm)
        assert r.returncode == 0, r.stderr
    else:
        quantize_model(hf, ours, qtype, vocab_from=spm)
    llama_quantize(model, ref, qtype)
    a, b = GGUFFile(ours), GGUFFile(ref)
    assert_same_tensors(a, b)
    for k, v in b.metadata.items():
        if k.startswith(("llama.", "tokenizer.")) or k in ("general.file_type", "general.quantization_version"):
            assert a.metadata.get(k) == v and a.metadata_types[k] == b.metadata_types[k], k
    assert np.isfinite(llama_cpp_logits(ours)).all()


def test_hf_directory_needs_a_vocabulary(tiny_llama_f32, vocab_dir, tmp_path, capsys):
    hf = gguf_to_hf_dir(tiny_llama_f32, tmp_path / "hf")
    check_error(capsys, ["quantize", str(hf), str(tmp_path / "o.gguf"), "--type", "q8_0"],
                "tokenizer", "hint:", "--vocab-from")
    gpt2 = str(vocab_dir / "ggml-vocab-gpt-2.gguf")
    check_error(capsys, ["quantize", str(hf), str(tmp_path / "o.gguf"), "--type", "q8_0", "--vocab-from", gpt2],
                "50257 tokens", "vocab_size is 32000")
    assert not (tmp_path / "o.gguf").exists()


def test_non_default_alignment_is_kept_consistent(tiny_llama_f32, tmp_path):
    # llama.cpp copies general.alignment but pads to 32 regardless, so for an input with
    # alignment 64 it writes a file whose offsets it cannot read back; we lay the data out by
    # the declared alignment, with the same tensor bytes as the alignment-32 case
    from gguf import GGUFValueType
    f = GGUFFile(tiny_llama_f32)
    md, types = dict(f.metadata), dict(f.metadata_types)
    md["general.alignment"], types["general.alignment"] = 64, GGUFValueType.UINT32
    a64 = tmp_path / "a64.gguf"
    write_gguf(a64, "llama", md, types, ((n, f.raw(n), t.qtype, t.shape) for n, t in f.tensors.items()),
               array_types=f.array_types)
    quantize_model(a64, tmp_path / "ours.gguf", "q8_0")
    ours = GGUFFile(tmp_path / "ours.gguf")
    assert ours.alignment == 64 and all((t.offset - ours.data_offset) % 64 == 0 for t in ours.tensors.values())
    ref = GGUFFile(llama_quantize(tiny_llama_f32, tmp_path / "ref.gguf", "q8_0"))
    assert list(ours.tensors) == list(ref.tensors)
    assert all(np.array_equal(ours.raw(n), ref.raw(n)) for n in ref.tensors)
    assert np.isfinite(llama_cpp_logits(tmp_path / "ours.gguf")).all()


def test_progress_bar_goes_to_stderr(tiny_llama_f32, tmp_path, capsys):
    quantize_model(tiny_llama_f32, tmp_path / "o.gguf", "q4_0", progress=True)
    out = capsys.readouterr()
    assert "quantize q4_0" in out.err and "21/21" in out.err and out.out == ""
