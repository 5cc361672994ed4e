"""Tiny HF checkpoints (config.json + model.safetensors) with seeded random weights, for the
transformers oracle tests: transformers' own parameter names, q/k rows in HF's rotate_half
order, float32. Scaled as tests/models.py scales its GGUF models (activations O(1), logits with
std ~2): 2-D weights N(0, 1/sqrt(fan_in)), norms 1 + N(0, 0.1), the output projection (or the
tied embeddings) N(0, 2/sqrt(dim)), qwen2's q/k/v biases N(0, 0.5)."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from models import write_safetensors

# llama3 rope scaling with a short original context, so that at a few hundred positions the
# scaled, the smoothed and the unscaled frequency bands are all in use
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def make_hf_checkpoint(out_dir, *, arch="llama", seed=0, dim=64, hidden_dim=160, n_layers=2, n_heads=4,
                       n_kv_heads=2, head_dim=None, vocab=256, tie=False, rope_theta=10000.0, rope_scaling=None,
                       ctx=512, norm_eps=1e-5):
    """arch "llama" (LlamaForCausalLM) or "qwen2" (Qwen2ForCausalLM: q/k/v biases)."""
    rng = np.random.default_rng(seed)
    hd = head_dim or dim // n_heads
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {}

    def matrix(name, rows, cols, std=None):
        std = 1.0 / np.sqrt(cols) if std is None else std
        arrays[name] = ("F32", (rng.standard_normal((rows, cols)) * std).astype(np.float32))

    def vector(name, n, mean=1.0, std=0.1):
        arrays[name] = ("F32", (mean + std * rng.standard_normal(n)).astype(np.float32))

    out_std = 2.0 / np.sqrt(dim)
    matrix("model.embed_tokens.weight", vocab, dim, std=out_std if tie else 1.0)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        vector(p + "input_layernorm.weight", dim)
        matrix(p + "self_attn.q_proj.weight", n_heads * hd, dim)
        matrix(p + "self_attn.k_proj.weight", n_kv_heads * hd, dim)
        matrix(p + "self_attn.v_proj.weight", n_kv_heads * hd, dim)
        if arch == "qwen2":
            for name, n in (("q_proj", n_heads * hd), ("k_proj", n_kv_heads * hd), ("v_proj", n_kv_heads * hd)):
                vector(p + f"self_attn.{name}.bias", n, mean=0.0, std=0.5)
        matrix(p + "self_attn.o_proj.weight", dim, n_heads * hd)
        vector(p + "post_attention_layernorm.weight", dim)
        matrix(p + "mlp.gate_proj.weight", hidden_dim, dim)
        matrix(p + "mlp.up_proj.weight", hidden_dim, dim)
        matrix(p + "mlp.down_proj.weight", dim, hidden_dim)
    vector("model.norm.weight", dim)
    if not tie:
        matrix("lm_head.weight", vocab, dim, std=out_std)
    write_safetensors(out / "model.safetensors", arrays)
    config = {"architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"], "model_type": arch,
              "hidden_size": dim, "intermediate_size": hidden_dim, "num_hidden_layers": n_layers,
              "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads, "head_dim": hd, "vocab_size": vocab,
              "max_position_embeddings": ctx, "rms_norm_eps": norm_eps, "rope_theta": rope_theta,
              "hidden_act": "silu", "tie_word_embeddings": tie, "torch_dtype": "float32"}
    if rope_scaling is not None:
        config["rope_scaling"] = dict(rope_scaling)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out
