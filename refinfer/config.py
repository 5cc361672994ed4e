"""Model hyperparameters: one frozen dataclass, filled from GGUF metadata or an HF config.json."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .errors import FormatError, UnsupportedError

SUPPORTED_ARCHS = ("llama", "qwen2")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str = "llama"             # "llama" (Llama 2/3, Mistral, TinyLlama, SmolLM) or "qwen2"
    dim: int = 576                  # residual stream width (embedding_length)
    hidden_dim: int = 1536          # SwiGLU inner width (feed_forward_length)
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3             # grouped-query attention: n_heads // n_kv_heads queries share a K/V head
    head_dim: int = 64
    vocab_size: int = 49152
    max_seq_len: int = 8192         # context_length the model was trained for
    norm_eps: float = 1e-5          # RMSNorm epsilon
    rope_theta: float = 10000.0     # RoPE base frequency
    rope_dim: int = 64              # rotated dims per head (== head_dim for these archs)
    rope_neox: bool = False         # False: rotate adjacent pairs (2i, 2i+1), ggml's "normal" mode used
                                    # with llama.cpp's q/k-permuted weights; True: rotate (i, i + d/2)
    rope_freq_scale: float = 1.0    # linear RoPE scaling: positions are multiplied by this
    qkv_bias: bool = False          # qwen2 has biases on q, k and v
    tie_embeddings: bool = False    # output projection reuses token_embd

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def check(self, source) -> "ModelConfig":
        problems = []
        for f in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "max_seq_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                problems.append(f"{f} = {v!r} (expected a positive integer)")
        if not problems and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads = {self.n_heads} is not a multiple of n_kv_heads = {self.n_kv_heads}")
        if not problems and (self.rope_dim > self.head_dim or self.rope_dim % 2):
            problems.append(f"rope dimension {self.rope_dim} must be even and <= head_dim {self.head_dim}")
        if not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            problems.append(f"norm_eps = {self.norm_eps!r}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            problems.append(f"rope_theta = {self.rope_theta!r}")
        if problems:
            raise FormatError("inconsistent model hyperparameters: " + "; ".join(problems), file=source,
                              hint="the file's metadata is damaged or was written by a broken converter: re-convert the model")
        return self


def _need(meta, key, source):
    if key not in meta:
        raise FormatError(f"missing metadata key {key!r}", file=source,
                          hint="the file lacks a hyperparameter llama.cpp also requires")
    return meta[key]


def config_from_gguf(meta: dict, source=None, *, tied: bool = False) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedError(f"{source}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}",
                               hint="refinfer runs Llama-family models (llama, mistral, qwen2); `python -m refinfer inspect FILE` shows what the file holds")
    a = arch
    dim = int(_need(meta, f"{a}.embedding_length", source))
    n_heads = int(_need(meta, f"{a}.attention.head_count", source))
    n_kv = meta.get(f"{a}.attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):
        raise UnsupportedError(f"{source}: per-layer head_count_kv is not supported",
                               hint="models whose layers have different numbers of KV heads (e.g. OpenELM) are not implemented")
    head_dim = int(meta.get(f"{a}.attention.key_length", dim // n_heads if n_heads else 0))
    vocab = meta.get(f"{a}.vocab_size")
    if vocab is None:
        vocab = len(meta.get("tokenizer.ggml.tokens", []))
    scaling = meta.get(f"{a}.rope.scaling.type", "none")
    freq_scale = 1.0
    if scaling == "linear":
        freq_scale = 1.0 / float(meta.get(f"{a}.rope.scaling.factor", 1.0))
    elif scaling not in ("none", None):
        raise UnsupportedError(f"{source}: RoPE scaling {scaling!r} is not supported (linear and llama3 rope_freqs are)",
                               hint="YaRN and other context-extension schemes are not implemented")
    return ModelConfig(
        arch=arch, dim=dim,
        hidden_dim=int(_need(meta, f"{a}.feed_forward_length", source)),
        n_layers=int(_need(meta, f"{a}.block_count", source)),
        n_heads=n_heads, n_kv_heads=int(n_kv), head_dim=head_dim, vocab_size=int(vocab),
        max_seq_len=int(meta.get(f"{a}.context_length", 2048)),
        norm_eps=float(_need(meta, f"{a}.attention.layer_norm_rms_epsilon", source)),
        rope_theta=float(meta.get(f"{a}.rope.freq_base", 10000.0)),
        rope_dim=int(meta.get(f"{a}.rope.dimension_count", head_dim)),
        rope_neox=(arch == "qwen2"), rope_freq_scale=freq_scale,
        qkv_bias=(arch == "qwen2"), tie_embeddings=tied,
    ).check(source)


def config_from_hf(cfg: dict, source=None, *, tied: bool | None = None) -> ModelConfig:
    archs = cfg.get("architectures") or []
    mt = cfg.get("model_type")
    if mt in ("llama", "mistral") or any(x in ("LlamaForCausalLM", "MistralForCausalLM") for x in archs):
        arch = "llama"
    elif mt == "qwen2" or "Qwen2ForCausalLM" in archs:
        arch = "qwen2"
    else:
        raise UnsupportedError(f"{source}: unsupported architecture {mt or archs!r}; supported: llama, mistral, qwen2",
                               hint="refinfer runs Llama-family models (llama, mistral, qwen2); `python -m refinfer inspect DIR` shows what the file holds")
    try:
        dim = int(cfg["hidden_size"])
        n_heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or dim // n_heads)
        scaling = cfg.get("rope_scaling") or {}
        kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
        freq_scale = 1.0
        if kind == "linear":
            freq_scale = 1.0 / float(scaling["factor"])
        elif kind not in ("default", "llama3"):
            raise UnsupportedError(f"{source}: rope_scaling {kind!r} is not supported (linear, llama3 are)",
                                       hint="YaRN and other context-extension schemes are not implemented")
        return ModelConfig(
            arch=arch, dim=dim, hidden_dim=int(cfg["intermediate_size"]),
            n_layers=int(cfg["num_hidden_layers"]), n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads), head_dim=head_dim,
            vocab_size=int(cfg["vocab_size"]), max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_dim=head_dim, rope_neox=(arch == "qwen2"), rope_freq_scale=freq_scale,
            qkv_bias=(arch == "qwen2"),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)) if tied is None else tied,
        ).check(source)
    except KeyError as e:
        raise FormatError(f"config.json lacks {e.args[0]!r}", file=source,
                          hint="a transformers LlamaConfig/Qwen2Config has this key: the config.json is incomplete") from None


def llama3_rope_factors(scaling: dict, head_dim: int, theta: float) -> np.ndarray:
    """Per-frequency divisors of RoPE theta for Llama 3.1+ "llama3" scaling (what llama.cpp's
    converter stores as rope_freqs.weight): low frequencies are slowed by `factor`, high ones
    kept, the band between interpolated smoothly."""
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    smooth = (old_ctx / wavelen - low) / (high - low)
    out = np.where(wavelen < high_wavelen, 1.0,
                   np.where(wavelen > low_wavelen, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return out.astype(np.float32)
