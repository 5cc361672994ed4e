"""The generated test models are real Llama GGUFs: llama.cpp loads them, reads the
hyperparameters we wrote, and computes finite, non-degenerate logits."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from models import load_llama, make_tiny_llama_gguf

llama_cpp = pytest.importorskip("llama_cpp")

PROMPT = b"Hello world, this is a test"


def llama_logits(path, prompt=PROMPT):
    llm = load_llama(path, n_ctx=64, verbose=False, logits_all=True)
    toks = llm.tokenize(prompt, add_bos=True)
    llm.eval(toks)
    return llm, np.array(llm.scores[:len(toks)], dtype=np.float32)  # [n_tokens, n_vocab]


def check_logits(logits):
    assert np.isfinite(logits).all()
    spread = logits.std(axis=-1)
    assert (spread > 0.5).all() and (spread < 20).all(), spread
    # the next-token predictions vary with position: the model is not a constant function
    assert len(set(np.argmax(logits, axis=-1).tolist())) > 1


@pytest.fixture(scope="module")
def spm(vocab_dir):
    return vocab_dir / "ggml-vocab-llama-spm.gguf"


def test_f32_loads_and_reports_hyperparameters(tiny_llama_f32):
    llm, logits = llama_logits(tiny_llama_f32)
    assert llm.n_vocab() == 32000 and llm.n_embd() == 64
    assert llama_cpp.llama_model_n_ctx_train(llm.model) == 256
    md = llm.metadata
    assert md["general.architecture"] == "llama"
    assert md["llama.block_count"] == "2" and md["llama.feed_forward_length"] == "160"
    assert md["llama.attention.head_count"] == "4" and md["llama.attention.head_count_kv"] == "2"
    assert md["tokenizer.ggml.model"] == "llama"
    # llama.cpp's own SPM tokenizer works on the copied vocabulary
    assert llm.tokenize(b"Hello world", add_bos=True) == [1, 15043, 3186]
    check_logits(logits)


def test_f16_and_bf16_are_roundings_of_the_same_weights(tiny_llama_f32, tiny_llama_f16, spm, tmp_path):
    bf16 = make_tiny_llama_gguf(tmp_path / "bf16.gguf", vocab_gguf=spm, dtype="bf16")
    _, ref = llama_logits(tiny_llama_f32)
    for path, types in ((tiny_llama_f16, {"F16", "F32"}), (bf16, {"BF16", "F32"})):
        r = gguf.GGUFReader(path)
        assert {t.tensor_type.name for t in r.tensors} == types
        assert all(t.tensor_type.name == "F32" for t in r.tensors if len(t.shape) == 1)
        _, logits = llama_logits(path)
        check_logits(logits)
        # same seed, same draws: only the weight rounding (and f16 matmuls) differ
        nmse = float(((logits - ref) ** 2).sum() / (ref ** 2).sum())
        assert nmse < 1e-3, (path.name, nmse)
        assert (np.argmax(logits, -1) == np.argmax(ref, -1)).mean() >= 0.75


def test_tensor_names_shapes_and_layout(tiny_llama_f32):
    r = gguf.GGUFReader(tiny_llama_f32)
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in r.tensors}  # ggml ne order
    expect = {"token_embd.weight": (64, 32000), "output_norm.weight": (64,), "output.weight": (64, 32000)}
    for i in range(2):
        expect |= {f"blk.{i}.attn_norm.weight": (64,), f"blk.{i}.attn_q.weight": (64, 64),
                   f"blk.{i}.attn_k.weight": (64, 32), f"blk.{i}.attn_v.weight": (64, 32),
                   f"blk.{i}.attn_output.weight": (64, 64), f"blk.{i}.ffn_norm.weight": (64,),
                   f"blk.{i}.ffn_gate.weight": (64, 160), f"blk.{i}.ffn_up.weight": (64, 160),
                   f"blk.{i}.ffn_down.weight": (160, 64)}
    assert shapes == expect
    assert r.fields["tokenizer.ggml.scores"].types[-1] == gguf.GGUFValueType.FLOAT32
    assert r.fields["tokenizer.ggml.token_type"].types[-1] == gguf.GGUFValueType.INT32
    # weights scaled N(0, 1/sqrt(fan_in)), norms near 1
    data = {t.name: t.data for t in r.tensors}
    assert 0.1 < float(np.std(data["blk.0.attn_q.weight"])) < 0.15  # 1/sqrt(64) = 0.125
    norm = data["blk.0.attn_norm.weight"]
    assert abs(float(np.mean(norm)) - 1) < 0.05 and float(np.std(norm)) > 0.05


def test_seeded_and_deterministic(spm, tmp_path, tiny_llama_f32):
    again = make_tiny_llama_gguf(tmp_path / "again.gguf", vocab_gguf=spm)
    assert again.read_bytes() == tiny_llama_f32.read_bytes()
    other = make_tiny_llama_gguf(tmp_path / "other.gguf", vocab_gguf=spm, seed=1)
    assert other.read_bytes() != tiny_llama_f32.read_bytes()


def test_tied_embeddings_bpe_vocab_and_odd_shapes(vocab_dir, tmp_path):
    # GPT-2 BPE vocabulary (merges array of strings), no output.weight, ffn row length 176
    # (not a multiple of 32), GQA with a single kv head, another rope theta
    path = make_tiny_llama_gguf(tmp_path / "tied.gguf", vocab_gguf=vocab_dir / "ggml-vocab-gpt-2.gguf",
                                tie_embeddings=True, hidden_dim=176, n_layers=3, n_heads=4,
                                n_kv_heads=1, rope_theta=500000.0, seed=3)
    r = gguf.GGUFReader(path)
    assert "output.weight" not in {t.name for t in r.tensors}
    assert r.fields["tokenizer.ggml.merges"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]
    llm, logits = llama_logits(path)
    assert llm.n_vocab() == 50257
    assert float(llm.metadata["llama.rope.freq_base"]) == 500000.0
    check_logits(logits)
