"""The one model loader: GGUF file or HF safetensors directory -> (ModelConfig, Weights, metadata).

Everything that differs between the two sources happens here and only here:
- names: GGUF names are ours; HF names are mapped by HF_NAMES;
- RoPE layout: llama.cpp's converter permutes q/k rows of arch `llama` so that adjacent pairs
  rotate (ggml's "normal" RoPE); HF checkpoints are unpermuted (rotate_half, "neox"). We permute
  HF llama q/k rows the same way (`permute_qk_rows`) so the forward pass has one convention;
- tied embeddings: a missing output.weight means the output projection is token_embd;
- quantized HF checkpoints (config.json quantization_config: GPTQ, AWQ, compressed-tensors):
  their Linear layers become IntGroupTensor (refinfer/w4a16/checkpoint.py), q/k rows permuted
  with take_rows like the float rows.
"""

from __future__ import annotations

import pathlib

import numpy as np

from . import quant
from .config import ModelConfig, config_from_gguf, config_from_hf, llama3_rope_factors
from .errors import FormatError, RefinferError
from .w4a16 import checkpoint as w4a16
from .weights import LayerWeights, QTensor, Weights

LAYER_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
LAYER_VECTORS = ("attn_norm", "ffn_norm")
QKV_BIASES = ("attn_q", "attn_k", "attn_v")

HF_NAMES = {  # HF suffix -> GGUF name (per layer: "blk.{i}." + value)
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
HF_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}


def hf_to_gguf_names(hf_names) -> dict:
    """GGUF name -> HF name for an HF Llama/Qwen2 checkpoint's tensors. Names without a GGUF
    equivalent are kept as they are (check_tensor_set then reports them as unexpected);
    rotary_emb.inv_freq buffers are dropped (recomputed from rope_theta, as llama.cpp does)."""
    out = {}
    for hf in hf_names:
        if hf in HF_GLOBAL_NAMES:
            out[HF_GLOBAL_NAMES[hf]] = hf
        elif hf.startswith("model.layers.") and hf.endswith("rotary_emb.inv_freq"):
            continue
        elif hf.startswith("model.layers."):
            i, _, suffix = hf[len("model.layers."):].partition(".")
            out[f"blk.{i}.{HF_NAMES[suffix]}" if suffix in HF_NAMES else hf] = hf
        else:
            out[hf] = hf
    return out


def expected_shapes(cfg: ModelConfig, *, with_output: bool) -> dict:
    """GGUF tensor name -> numpy shape (rows, cols) the config implies."""
    q_dim = cfg.n_heads * cfg.head_dim
    shapes = {"token_embd.weight": (cfg.vocab_size, cfg.dim), "output_norm.weight": (cfg.dim,)}
    if with_output:
        shapes["output.weight"] = (cfg.vocab_size, cfg.dim)
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        shapes.update({
            p + "attn_norm.weight": (cfg.dim,), p + "ffn_norm.weight": (cfg.dim,),
            p + "attn_q.weight": (q_dim, cfg.dim), p + "attn_k.weight": (cfg.kv_dim, cfg.dim),
            p + "attn_v.weight": (cfg.kv_dim, cfg.dim), p + "attn_output.weight": (cfg.dim, q_dim),
            p + "ffn_gate.weight": (cfg.hidden_dim, cfg.dim), p + "ffn_up.weight": (cfg.hidden_dim, cfg.dim),
            p + "ffn_down.weight": (cfg.dim, cfg.hidden_dim),
        })
        if cfg.qkv_bias:
            shapes.update({p + "attn_q.bias": (q_dim,), p + "attn_k.bias": (cfg.kv_dim,),
                           p + "attn_v.bias": (cfg.kv_dim,)})
    return shapes


def check_tensor_set(found: dict, cfg: ModelConfig, source, *, optional=("rope_freqs.weight",)) -> None:
    """Report every missing, unexpected and mis-shaped tensor at once."""
    want = expected_shapes(cfg, with_output=not cfg.tie_embeddings)
    missing = [n for n in want if n not in found]
    unexpected = [n for n in found if n not in want and n not in optional]
    bad = [f"{n}: shape {tuple(found[n])} in file, {want[n]} expected from the hyperparameters"
           for n in want if n in found and tuple(found[n]) != want[n]]
    lines = []
    if missing:
        lines.append(f"missing tensors ({len(missing)}): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        lines.append(f"unexpected tensors ({len(unexpected)}): " + ", ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else ""))
    lines += bad
    if lines:
        raise FormatError("tensors do not match the model hyperparameters:\n  " + "\n  ".join(lines), file=source,
                          hint="the file is not a complete Llama/Qwen2 model, or its hyperparameters are wrong: "
                               "`python -m refinfer inspect FILE` shows both")


def permute_qk_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that turns an HF (rotate_half) q or k projection into llama.cpp's layout:
    within each head, GGUF rows (2i, 2i+1) are HF rows (i, i + head_dim/2). Returns idx with
    gguf_rows = hf_rows[idx]."""
    head_dim = n_rows // n_head
    idx = np.arange(n_rows).reshape(n_head, 2, head_dim // 2)  # [head, half, i]
    return idx.transpose(0, 2, 1).reshape(n_rows)                # [head, i, half]


def _assemble(cfg: ModelConfig, get_matrix, get_vector, has, source) -> Weights:
    layers = []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        kw = {m: get_matrix(p + m + ".weight") for m in LAYER_MATRICES}
        kw.update({v: get_vector(p + v + ".weight") for v in LAYER_VECTORS})
        if cfg.qkv_bias:
            kw.update({b + "_bias": get_vector(p + b + ".bias") for b in QKV_BIASES})
        layers.append(LayerWeights(**kw))
    embd = get_matrix("token_embd.weight")
    return Weights(token_embd=embd, layers=layers, output_norm=get_vector("output_norm.weight"),
                   output=embd if cfg.tie_embeddings else get_matrix("output.weight"),
                   rope_freqs=get_vector("rope_freqs.weight") if has("rope_freqs.weight") else None)


def load_gguf(path):
    from .gguf_file import GGUFFile
    gf = GGUFFile(path)
    meta = gf.metadata
    tied = "output.weight" not in gf.tensors
    cfg = config_from_gguf(meta, str(path), tied=tied)
    check_tensor_set({n: t.shape for n, t in gf.tensors.items()}, cfg, str(path))

    def get_matrix(name):
        t = gf.tensors[name]
        return QTensor(name, gf.raw(name), t.qtype, tuple(t.shape))

    def get_vector(name):
        return np.ascontiguousarray(gf.dequantize(name), dtype=np.float32).reshape(-1)

    return cfg, _assemble(cfg, get_matrix, get_vector, gf.tensors.__contains__, str(path)), meta


def load_safetensors(path):
    from .safetensors_file import SafetensorsCheckpoint
    ck = SafetensorsCheckpoint(path)
    if ck.config is None:
        raise FormatError("no config.json beside the safetensors weights", file=str(path),
                          hint="an HF checkpoint directory has config.json, model*.safetensors and a tokenizer")
    # Quantized Linears (GPTQ, AWQ, compressed-tensors) stand in for their `.weight` with the
    # shape their packed tensors declare; embeddings, norms and unquantized layers stay float.
    spec = w4a16.read_spec(ck.config, path)
    hf_shapes = {n: tuple(info.shape) for n, info in ck.tensors.items()}
    quantized = {}  # HF weight name -> module prefix
    if spec is not None:
        for prefix, shape in w4a16.quantized_linears(ck, spec).items():
            for suffix in w4a16.COMPONENTS[spec.method]:
                hf_shapes.pop(f"{prefix}.{suffix}", None)
            hf_shapes[prefix + ".weight"] = shape
            quantized[prefix + ".weight"] = prefix
    gguf_names = hf_to_gguf_names(hf_shapes)
    tied = "output.weight" not in gguf_names
    cfg = config_from_hf(ck.config, str(path), tied=tied if tied else None)
    check_tensor_set({g: hf_shapes[h] for g, h in gguf_names.items()}, cfg, str(path))
    stored_type = {"F32": "f32", "F16": "f16", "BF16": "bf16"}

    def qk_rows(name, n_rows):
        """The q/k row permutation for this matrix, or None."""
        if cfg.arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            return permute_qk_rows(n_rows, cfg.n_heads if ".attn_q." in name else cfg.n_kv_heads)
        return None

    def get_matrix(name):
        hf = gguf_names[name]
        if hf in quantized:
            t = w4a16.load_linear(ck, quantized[hf], spec, name=name, shape=hf_shapes[hf])
            idx = qk_rows(name, t.shape[0])
            return t if idx is None else t.take_rows(idx)
        info = ck.tensors[hf]
        if info.dtype not in stored_type:
            raise FormatError(f"dtype {info.dtype}, expected F32, F16 or BF16 for a float weight", file=str(path),
                              tensor=hf, hint="a quantized checkpoint needs its quantization_config in config.json")
        raw = np.ascontiguousarray(ck.raw(hf)).view(np.uint8).reshape(info.shape[0], -1)
        idx = qk_rows(name, raw.shape[0])
        if idx is not None:
            raw = raw[idx]
        return QTensor(name, raw, quant.get_type(stored_type[info.dtype]), tuple(info.shape))

    def get_vector(name):
        return np.ascontiguousarray(ck.get(gguf_names[name]), dtype=np.float32).reshape(-1)

    weights = _assemble(cfg, get_matrix, get_vector, lambda n: False, str(path))
    scaling = ck.config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        weights.rope_freqs = llama3_rope_factors(scaling, cfg.head_dim, cfg.rope_theta)
    meta = {"hf_config": ck.config, "path": str(path)}
    if spec is not None:
        meta["quantization"] = spec
    return cfg, weights, meta


def load(path):
    """(ModelConfig, Weights, metadata dict) from a .gguf file or an HF safetensors directory/file."""
    p = pathlib.Path(path)
    if not p.exists():
        raise RefinferError(f"model file not found: {str(path)!r}", hint="pass a .gguf file or an HF checkpoint directory")
    if p.is_dir() or p.suffix == ".safetensors":
        return load_safetensors(p)
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise FormatError(f"not a GGUF file: magic {magic!r}, expected b'GGUF'", file=str(path), offset=0,
                          hint="pass a .gguf model file, or an HF checkpoint directory (config.json and *.safetensors)")
    return load_gguf(p)
