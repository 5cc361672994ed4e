"""export-hf: a GGUF as an HF checkpoint directory. transformers loads it offline and computes
the GGUF's logits (refinfer ideal mode on the GGUF, whose weights the export holds dequantized);
refinfer.load of the directory gives the GGUF's logits bit for bit; the tokenizer files give
the GGUF tokenizer's ids."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ci_skips import oracle_import
from models import make_tiny_llama_gguf

import refinfer
from refinfer.cli import main
from refinfer.config import llama3_rope_factors
from refinfer.export_hf import export_hf
from refinfer.metrics import nmse
from refinfer.quantize_model import quantize_model

oracle_import("torch")
transformers = oracle_import("transformers")
from refinfer.hf_oracle import capture_transformers  # noqa: E402

TEXT = "Hello world! The 2 quick brown foxes jumped 12345 times over ünïcödé dogs.\n  Done."

# transformers' logits against refinfer ideal (NumPy) on the GGUF: float32 rounding in different
# summation orders, measured on the first 12 tokens of TEXT: spm-llama 1.3e-13,
# spm-llama-q4_1 1.5e-13, llama3-tied 1.7e-13, qwen2-tied 2.1e-13; the limit is ~10x the largest.
# (SentencePiece vocabularies for the llama models, qwen2's byte-level BPE for qwen2; SmolLM2's
# BPE with the smollm pre-tokenizer is the test after.)
GENERATED_LIMIT = 2e-12
GENERATED = {
    "spm-llama": dict(vocab="ggml-vocab-llama-spm.gguf"),
    "spm-llama-q4_1": dict(vocab="ggml-vocab-llama-spm.gguf", quantize="q4_1"),
    "llama3-tied": dict(vocab="ggml-vocab-llama-spm.gguf", tie_embeddings=True,
                        rope_freqs=llama3_rope_factors({"factor": 8.0, "original_max_position_embeddings": 64},
                                                       16, 10000.0)),
    "qwen2-tied": dict(vocab="ggml-vocab-qwen2.gguf", arch="qwen2", tie_embeddings=True),
}


def make_gguf(tmp_path, vocab_dir, name):
    kw = dict(GENERATED[name])
    vocab, q = kw.pop("vocab"), kw.pop("quantize", None)
    path = make_tiny_llama_gguf(tmp_path / f"{name}.gguf", vocab_gguf=vocab_dir / vocab, dim=64, n_layers=2, **kw)
    if q:
        quantize_model(path, tmp_path / f"{name}.{q}.gguf", q)
        path = tmp_path / f"{name}.{q}.gguf"
    return path


def check_export(gguf, out_dir, tokens=None, *, logits_limit, backend="numpy", bits_tokens=None):
    """Export gguf to out_dir; returns (NMSE of transformers' logits against refinfer's on the
    GGUF, the token ids). Asserts the tokenizers agree and refinfer reads the directory back to
    the GGUF's logits bit for bit (on bits_tokens, NumPy backend)."""
    export_hf(gguf, out_dir)
    model = refinfer.load(gguf, backend=backend, mode="ideal")
    tok = transformers.AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    ids = model.tokenize(TEXT)
    assert tok(TEXT)["input_ids"] == ids
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    tokens = ids if tokens is None else tokens
    hf_logits, _ = capture_transformers(out_dir, tokens, skip=("*",))
    logits = model.logits(tokens)
    err = nmse(hf_logits, logits)
    assert err <= logits_limit, err
    if bits_tokens is None:
        bits_tokens, ref = tokens, logits
    else:
        ref = refinfer.load(gguf, backend="numpy").logits(bits_tokens)
    back = refinfer.load(out_dir, backend="numpy", mode="ideal")
    assert np.array_equal(back.logits(bits_tokens), ref)
    assert back.tokenize(TEXT) == ids
    return err, ids


@pytest.mark.parametrize("name", list(GENERATED))
def test_generated_model_round_trip(tmp_path, vocab_dir, name):
    gguf = make_gguf(tmp_path, vocab_dir, name)
    # the first 12 tokens: the NumPy reference's output matmul over qwen2's 151k vocabulary is slow
    check_export(gguf, tmp_path / "hf", logits_limit=GENERATED_LIMIT, tokens=refinfer.load(gguf).tokenize(TEXT)[:12])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    spec = GENERATED[name]
    assert config["architectures"] == ["Qwen2ForCausalLM" if spec.get("arch") == "qwen2" else "LlamaForCausalLM"]
    assert config["tie_word_embeddings"] == bool(spec.get("tie_embeddings"))
    assert (config["rope_scaling"] or {}).get("rope_type") == ("llama3" if "rope_freqs" in spec else None)
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == config["eos_token_id"]


def test_qk_permutation_is_what_makes_transformers_agree(tmp_path, vocab_dir, monkeypatch):
    """Negative control: an export without the inverse q/k permutation loads, but transformers'
    logits are then far from the GGUF's (measured NMSE ~0.3)."""
    import refinfer.export_hf as ex
    gguf = make_gguf(tmp_path, vocab_dir, "spm-llama")
    monkeypatch.setattr(ex, "permute_qk_rows", lambda n, heads: np.argsort(np.arange(n)))
    export_hf(gguf, tmp_path / "hf")
    ids = refinfer.load(gguf, backend="numpy").tokenize(TEXT)
    hf_logits, _ = capture_transformers(tmp_path / "hf", ids, skip=("*",))
    assert nmse(hf_logits, refinfer.load(gguf, backend="numpy").logits(ids)) > 1e-3


# SmolLM2-135M Q4_1 (the default model): transformers on the float32 export against refinfer
# ideal on the GGUF (numba backend, itself within NMSE ~4e-12 of the NumPy reference): measured
# 4.1e-12 (NumPy backend: 1.8e-12). Limit 10x.
SMOLLM2_LIMIT = 4e-11


@pytest.mark.slow
def test_smollm2_round_trip(tmp_path, smollm2_path):
    err, ids = check_export(smollm2_path, tmp_path / "hf", logits_limit=SMOLLM2_LIMIT, backend="numba",
                            bits_tokens=[1, 504, 2365, 6354])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["rope_theta"]) == (9, 3, 100000.0)


def test_cli_export_and_bad_input(tmp_path, vocab_dir, capsys):
    gguf = make_gguf(tmp_path, vocab_dir, "spm-llama")
    assert main(["export-hf", str(gguf), str(tmp_path / "out"), "--dtype", "float16"]) == 0
    assert "wrote" in capsys.readouterr().out
    from refinfer.safetensors_file import SafetensorsCheckpoint
    assert {t.dtype for t in SafetensorsCheckpoint(tmp_path / "out").tensors.values()} == {"F16"}

    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"nope" * 10)
    for argv, message in (([str(not_gguf), str(tmp_path / "o2")], "GGUF"),
                          ([str(gguf), str(tmp_path / "o3"), "--dtype", "int8"], "--dtype 'int8'"),
                          ([str(gguf), str(not_gguf)], "is not a directory")):
        assert main(["export-hf", *argv]) == 2
        err = capsys.readouterr().err
        assert "error: " in err and message in err and "hint: " in err, err
