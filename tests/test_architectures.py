"""Architectures and RoPE variants against llama.cpp, and the HF safetensors path against GGUF.

Each variant is a generated F16 model, a type on which the README claims that `ggml` mode equals
llama.cpp bit for bit: every intermediate tensor and the logits are compared exactly. `ideal`
mode is compared tensor by tensor by NMSE, with the bounds of IDEAL_NMSE."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import refinfer
from llama_ref import assert_taps_match, collect_taps
from models import gguf_to_hf_dir, make_tiny_llama_gguf
from refinfer.errors import FormatError, UnsupportedError

IDS = [1, 450, 1701, 432, 975, 278, 1128, 1919, 263, 310, 1207, 1532, 902] + list(range(300, 340))
N_VOCAB = 2048   # the variants keep the first 2048 tokens: a small output matrix (ggml mode's F16 lanes are slow)

@pytest.fixture(scope="module")
def spm(vocab_dir):
    return vocab_dir / "ggml-vocab-llama-spm.gguf"


VARIANTS = {
    "qwen2": dict(arch="qwen2"),
    "llama3_rope_freqs": dict(rope_freqs=np.linspace(1.0, 8.0, 8)),
    "linear_rope_scaling": dict(rope_linear_factor=4.0),
    "tied_embeddings_gqa4": dict(tie_embeddings=True, n_heads=8, n_kv_heads=2),
}
# ideal mode against llama.cpp, NMSE per tensor kind (every layer) or per tensor: about 10x the
# largest value measured over the four variants (in parentheses; tied_embeddings_gqa4 has the
# largest of each, qwen2 and the RoPE variants 2-5x less). The differences are llama.cpp's
# roundings: F16 activations before F16 weights, F16 Q, softmax probabilities and KV cache.
IDEAL_NMSE = {
    "inp_embd": 0.0,           # (0) F16 rows converted to float32 exactly by both
    "attn_norm-0": 3e-14,      # (3.3e-15) the first RMSNorm: only ggml's float/double mix differs
    "attn_norm": 4e-6,         # (4.3e-7)
    "Qcur": 5e-6,              # (4.6e-7) F16-rounded activations into the F16 matmul
    "Kcur": 5e-6,              # (4.7e-7)
    "Vcur": 4e-6,              # (4.2e-7)
    "kqv_out": 5e-6,           # (4.7e-7) F16 Q, KV cache and probabilities too
    "attn_out": 5e-6,          # (5.2e-7)
    "ffn_inp": 4e-6,           # (4.3e-7)
    "ffn_norm": 5e-6,          # (4.4e-7)
    "ffn_swiglu": 1e-5,        # (1.0e-6)
    "ffn_out": 1.1e-5,         # (1.1e-6)
    "l_out": 6e-6,             # (6.0e-7)
    "result_norm": 7e-6,       # (6.4e-7)
    "result_output": 7e-6,     # (6.9e-7)
}


def variant_model(variant, directory, vocab):
    return make_tiny_llama_gguf(directory / f"{variant}.gguf", vocab_gguf=vocab, seed=3, dtype="f16",
                                n_vocab=N_VOCAB, **VARIANTS[variant])


def check_variant_against_llama_cpp(path, model=None, modes=("ggml", "ideal")):
    """Every intermediate and the logits of one forward pass over IDS against llama.cpp's:
    ggml mode bit for bit, ideal mode within IDEAL_NMSE; returns {mode: {name: NMSE}}. model: a
    loaded ggml-mode Model to use instead of loading path (to test a changed config)."""
    from refinfer.llama_oracle import llama_intermediates
    ref_logits, ref = llama_intermediates(path, IDS)
    errors = {}
    for mode in modes:
        m = model if model is not None and mode == "ggml" else refinfer.load(path, mode=mode, backend="numpy")
        tap, mine = collect_taps()
        logits = m.logits(IDS, tap=tap)
        bounds = None if mode == "ggml" else IDEAL_NMSE
        errors[mode] = assert_taps_match(mine, ref, f"{path.name} {mode}", n_layers=m.config.n_layers,
                                         arch=m.config.arch, nmse_bounds=bounds)
        if mode == "ggml":
            np.testing.assert_array_equal(logits.view(np.uint32), ref_logits.view(np.uint32))
    return errors


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_llama_cpp(variant, spm, tmp_path):
    pytest.importorskip("llama_cpp")
    check_variant_against_llama_cpp(variant_model(variant, tmp_path, spm))


def test_wrong_rope_style_would_be_caught(spm, tmp_path):
    """The comparison above can fail: the same qwen2 weights read as llama (adjacent-pair RoPE)
    disagree with llama.cpp."""
    pytest.importorskip("llama_cpp")
    path = variant_model("qwen2", tmp_path, spm)
    m = refinfer.load(path, mode="ggml", backend="numpy")
    m.config = dataclasses.replace(m.config, rope_neox=False)
    with pytest.raises(AssertionError, match="Qcur-0"):
        check_variant_against_llama_cpp(path, model=m, modes=("ggml",))


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
