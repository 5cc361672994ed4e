"""Architectures and RoPE variants against llama.cpp, and the HF safetensors path against GGUF.

Generated f32 models, so the only differences from llama.cpp are its roundings: with `ggml`
numerics (F16 KV cache, F16 Q for K.Q) the logits must agree to NMSE <= 1e-6."""

from __future__ import annotations

import numpy as np
import pytest

import refinfer
from llama_ref import llama_logits
from models import gguf_to_hf_dir, make_tiny_llama_gguf
from refinfer.errors import FormatError, UnsupportedError
from refinfer.metrics import compare_logits

IDS = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203, 29889] + list(range(300, 340))


@pytest.fixture(scope="module")
def spm(vocab_dir):
    return vocab_dir / "ggml-vocab-llama-spm.gguf"


VARIANTS = {
    "qwen2": dict(arch="qwen2"),
    "llama3_rope_freqs": dict(rope_freqs=np.linspace(1.0, 8.0, 8)),
    "linear_rope_scaling": dict(rope_linear_factor=4.0),
    "tied_embeddings_gqa4": dict(tie_embeddings=True, n_heads=8, n_kv_heads=2),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_llama_cpp(variant, spm, tmp_path):
    path = make_tiny_llama_gguf(tmp_path / f"{variant}.gguf", vocab_gguf=spm, seed=3, **VARIANTS[variant])
    ref = llama_logits(path, IDS)
    for mode, bound in (("ggml", 1e-6), ("ideal", 1e-4)):
        r = compare_logits(refinfer.load(path, mode=mode).logits(IDS), ref)
        assert r["nmse"] <= bound and r["same_top"] == 1.0, (variant, mode, r)


def test_wrong_rope_style_would_be_caught(spm, tmp_path):
    """The comparison above can fail: the same qwen2 weights read as llama (adjacent-pair RoPE,
    no biases) disagree with llama.cpp by far more than rounding."""
    path = make_tiny_llama_gguf(tmp_path / "q.gguf", vocab_gguf=spm, seed=3, arch="qwen2")
    m = refinfer.load(path, mode="ggml")
    ref = llama_logits(path, IDS)
    import dataclasses
    m.config = dataclasses.replace(m.config, rope_neox=False)
    assert compare_logits(m.logits(IDS), ref)["nmse"] > 1e-4


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_hf_safetensors_directory_equals_its_gguf(dtype, spm, tmp_path):
    """An HF checkpoint (unpermuted q/k, HF names) and the GGUF llama.cpp's converter makes of it
    give identical logits: the q/k permutation and name mapping are right."""
    gguf_path = make_tiny_llama_gguf(tmp_path / "m.gguf", vocab_gguf=spm, seed=5, dtype=dtype)
    hf = gguf_to_hf_dir(gguf_path, tmp_path / "hf")
    a = refinfer.load(gguf_path).logits(IDS)
    b = refinfer.load(hf).logits(IDS)
    np.testing.assert_array_equal(a, b)


def test_missing_and_misshaped_tensors_reported_together(spm, tmp_path):
    from refinfer.gguf_file import GGUFFile, write_gguf
    src = GGUFFile(make_tiny_llama_gguf(tmp_path / "m.gguf", vocab_gguf=spm))
    tensors = []
    for name, t in src.tensors.items():
        if name in ("blk.1.ffn_up.weight", "blk.0.attn_norm.weight"):
            continue  # missing
        data = src.dequantize(name)
        if name == "blk.0.attn_k.weight":
            data = data[:16]  # wrong shape
        tensors.append((name, data, "f32", data.shape))
    tensors.append(("blk.0.extra.weight", np.zeros(64, np.float32), "f32", (64,)))
    bad = tmp_path / "bad.gguf"
    write_gguf(bad, "llama", src.metadata, src.metadata_types, tensors, array_types=src.array_types)
    with pytest.raises(FormatError) as e:
        refinfer.load(bad)
    msg = str(e.value)
    for frag in ("blk.1.ffn_up.weight", "blk.0.attn_norm.weight", "blk.0.extra.weight",
                 "blk.0.attn_k.weight: shape (16, 64) in file, (32, 64) expected", str(bad)):
        assert frag in msg, (frag, msg)


def test_unsupported_architecture_is_named(spm, tmp_path):
    from refinfer.gguf_file import GGUFFile, write_gguf
    src = GGUFFile(make_tiny_llama_gguf(tmp_path / "m.gguf", vocab_gguf=spm))
    md = {("gpt2." + k[len("llama."):] if k.startswith("llama.") else k): v for k, v in src.metadata.items()}
    types = {("gpt2." + k[len("llama."):] if k.startswith("llama.") else k): v for k, v in src.metadata_types.items()}
    arr = {("gpt2." + k[len("llama."):] if k.startswith("llama.") else k): v for k, v in src.array_types.items()}
    md["general.architecture"] = "gpt2"
    out = tmp_path / "gpt2.gguf"
    write_gguf(out, "gpt2", md, types, [(n, src.raw(n), t.qtype, t.shape) for n, t in src.tensors.items()], array_types=arr)
    with pytest.raises(UnsupportedError, match="unsupported architecture 'gpt2'"):
        refinfer.load(out)


def test_context_overflow_is_a_clear_error(spm, tmp_path):
    path = make_tiny_llama_gguf(tmp_path / "m.gguf", vocab_gguf=spm, ctx=32)
    m = refinfer.load(path)
    with pytest.raises(refinfer.errors.RefinferError, match="context"):
        m.logits(list(range(1, 40)))
