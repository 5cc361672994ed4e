"""Tiny Llama-architecture GGUF models with seeded random weights, for tests.

No model hub is reachable from CI, so tests that need a whole model (loading, quantizing,
comparing logits with llama.cpp) build one here: llama.cpp's tensor names and shapes, its
required `llama.*` hyperparameters, and a real tokenizer copied from one of llama.cpp's vocab
test files. The weights are random but scaled like a trained model's, so activations stay
O(1) through the layers and the logits have a useful spread:

    token_embd  ~ N(0, 1)                 rows are looked up, then RMS-normalized anyway
    output      ~ N(0, 2/sqrt(dim))       logits with std ~2 (tied: token_embd gets this scale)
    2-D weights ~ N(0, 1/sqrt(fan_in))    a matmul then keeps the activation scale
    norms       ~ 1 + N(0, 0.1)           near identity, but not exactly 1
"""

from __future__ import annotations

import functools
import json
import os
import struct

import gguf
import numpy as np

DTYPES = {
    # dtype: (GGML tensor type, general.file_type (llama_ftype))
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}


@functools.lru_cache(maxsize=8)
def tokenizer_fields(vocab_gguf) -> tuple:
    """Every tokenizer.* key of vocab_gguf as (key, value, type, array item type), in file order.

    Types matter: llama.cpp reads token_type as an int32 array and scores as float32; letting
    GGUFWriter guess from Python values would write int64/float64 arrays it rejects. Strings
    are kept as raw bytes, so tokens that are not valid UTF-8 survive. Cached because parsing
    a vocabulary with GGUFReader takes about a second and tests build many models."""
    reader = gguf.GGUFReader(vocab_gguf)
    fields = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype, sub = field.types[0], None
        if vtype == gguf.GGUFValueType.ARRAY:
            if len(field.types) != 2:
                raise ValueError(f"{vocab_gguf}: nested array {key} is not supported")
            sub = field.types[1]
            if sub == gguf.GGUFValueType.STRING:
                val = [bytes(field.parts[i]) for i in field.data]
            else:
                val = [field.parts[i].tolist()[0] for i in field.data]
        elif vtype == gguf.GGUFValueType.STRING:
            val = bytes(field.parts[-1])
        else:
            val = field.parts[-1].tolist()[0]
        fields.append((key, val, vtype, sub))
    if not any(f[0] == "tokenizer.ggml.tokens" for f in fields):
        raise ValueError(f"{vocab_gguf}: no tokenizer.ggml.tokens array")
    return tuple(fields)


# the per-token arrays of a vocabulary, cut together when a model keeps only its first tokens
PER_TOKEN_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")


def copy_tokenizer_fields(writer: gguf.GGUFWriter, vocab_gguf, n_vocab=None) -> int:
    """Copy the tokenizer.* keys of vocab_gguf into writer; returns the vocabulary size.
    n_vocab: keep only the first n_vocab tokens (an SPM vocabulary: its byte tokens and special
    ids come first), for models whose output matrix should be small."""
    size = 0
    for key, val, vtype, sub in tokenizer_fields(os.fspath(vocab_gguf)):
        if n_vocab is not None and key in PER_TOKEN_KEYS:
            val = val[:n_vocab]
        writer.add_key_value(key, val, vtype, sub_type=sub)
        if key == "tokenizer.ggml.tokens":
            size = len(val)
    return size


def make_tiny_llama_gguf(path, *, vocab_gguf, seed=0, dim=64, hidden_dim=160, n_layers=2,
                         n_heads=4, n_kv_heads=2, ctx=256, dtype="f32", tie_embeddings=False,
                         rope_theta=10000.0, norm_eps=1e-5, arch="llama", rope_freqs=None,
                         rope_linear_factor=None, n_vocab=None):
    """arch "llama" or "qwen2" (adds q/k/v biases; llama.cpp applies NEOX RoPE to it).
    rope_freqs: optional float32[head_dim // 2] Llama-3 style per-frequency theta divisors
    (rope_freqs.weight); rope_linear_factor: optional linear RoPE scaling factor; n_vocab: keep
    only the vocabulary's first n_vocab tokens (a smaller output matrix: faster ggml-mode runs)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if dim % n_heads or n_heads % n_kv_heads:
        raise ValueError(f"dim {dim} must divide into n_heads {n_heads}, and n_heads into n_kv_heads {n_kv_heads}")
    head_dim = dim // n_heads
    kv_dim = n_kv_heads * head_dim
    ggml_type, file_type = DTYPES[dtype]
    rng = np.random.default_rng(seed)

    writer = gguf.GGUFWriter(os.fspath(path), arch)
    writer.add_string("general.name", f"tiny-llama-d{dim}-l{n_layers}-s{seed}")
    writer.add_uint32("general.file_type", int(file_type))
    writer.add_uint32(f"{arch}.context_length", ctx)
    writer.add_uint32(f"{arch}.embedding_length", dim)
    writer.add_uint32(f"{arch}.block_count", n_layers)
    writer.add_uint32(f"{arch}.feed_forward_length", hidden_dim)
    writer.add_uint32(f"{arch}.attention.head_count", n_heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", n_kv_heads)
    writer.add_uint32(f"{arch}.rope.dimension_count", head_dim)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", norm_eps)
    writer.add_float32(f"{arch}.rope.freq_base", rope_theta)
    if rope_linear_factor is not None:
        writer.add_string(f"{arch}.rope.scaling.type", "linear")
        writer.add_float32(f"{arch}.rope.scaling.factor", float(rope_linear_factor))
    n_vocab = copy_tokenizer_fields(writer, vocab_gguf, n_vocab)
    writer.add_uint32(f"{arch}.vocab_size", n_vocab)

    def weight(name, out_features, in_features, std=None):  # HF/numpy order (out, in) = ggml ne [in, out]
        std = 1.0 / np.sqrt(in_features) if std is None else std
        w = (rng.standard_normal((out_features, in_features)) * std).astype(np.float32)
        if ggml_type == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, w)
        elif ggml_type == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, w.astype(np.float16))
        else:  # bf16: round to nearest even on the top 16 bits (random normals have no NaN)
            u = w.view(np.uint32).astype(np.uint64)
            bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
            writer.add_tensor(name, bits, raw_shape=w.shape, raw_dtype=ggml_type)

    def norm(name, n):  # 1-D norms stay float32 in every variant, as llama.cpp's converter writes them
        writer.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    # std 2/sqrt(dim) for the output projection: logits with std ~2 make top tokens distinct.
    # Tied, token_embd is that projection, so it gets the same scale; the small embeddings then
    # no longer dominate the residual stream (else every position predicts its own token).
    out_std = 2.0 / np.sqrt(dim)
    weight("token_embd.weight", n_vocab, dim, std=out_std if tie_embeddings else 1.0)
    for i in range(n_layers):
        norm(f"blk.{i}.attn_norm.weight", dim)
        weight(f"blk.{i}.attn_q.weight", dim, dim)
        weight(f"blk.{i}.attn_k.weight", kv_dim, dim)
        weight(f"blk.{i}.attn_v.weight", kv_dim, dim)
        weight(f"blk.{i}.attn_output.weight", dim, dim)
        if arch == "qwen2":
            for name, n in (("attn_q", dim), ("attn_k", kv_dim), ("attn_v", kv_dim)):
                writer.add_tensor(f"blk.{i}.{name}.bias", (0.5 * rng.standard_normal(n)).astype(np.float32))
        norm(f"blk.{i}.ffn_norm.weight", dim)
        weight(f"blk.{i}.ffn_gate.weight", hidden_dim, dim)
        weight(f"blk.{i}.ffn_up.weight", hidden_dim, dim)
        weight(f"blk.{i}.ffn_down.weight", dim, hidden_dim)
    norm("output_norm.weight", dim)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    if not tie_embeddings:
        weight("output.weight", n_vocab, dim, std=out_std)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def load_llama(path, **kwargs):
    """llama_cpp.Llama on llama.cpp's plain CPU path (refinfer.llama_oracle.open_llama).

    llama.cpp moves q4_0/q4_1/q8_0 (and K-quant) weights into "extra" CPU buffer types when the
    CPU has them: AMX tiles or repacked interleaved blocks. On an AMX-capable Xeon with a native
    llama-cpp-python 0.3.36 build the first decode then dies with a segmentation fault, and those
    kernels round differently from the plain CPU path described in the numerics notes, so the
    oracle is pinned to the plain path."""
    from refinfer.llama_oracle import open_llama
    return open_llama(path, plain=True, **kwargs)


def llama_cpp_logits(path, prompt=b"The quick brown fox jumps over the lazy dog"):
    """llama.cpp's float32[n_tokens, vocab] logits of every position of prompt (BOS first)."""
    llm = load_llama(path, n_ctx=64, verbose=False, logits_all=True)
    toks = llm.tokenize(prompt, add_bos=True)
    llm.eval(toks)
    return np.array(llm.scores[:len(toks)], dtype=np.float32)


def write_safetensors(path, arrays):
    """A minimal independent safetensors writer: u64 header length, JSON header, C-order data.
    Values are (safetensors dtype, array)."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, a) in arrays.items():
        b = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def gguf_to_hf_dir(model, out_dir):
    """The HF checkpoint that llama.cpp's converter would turn into `model`: HF names, q/k rows
    un-permuted (within each head HF row (half, i) is GGUF row (i, half): HF rotates halves,
    ggml adjacent pairs), bf16 2-D weights of a bf16 GGUF kept as bf16 bits."""
    from refinfer.gguf_file import GGUFFile
    f = GGUFFile(model)
    md = f.metadata
    n_heads, n_kv = md["llama.attention.head_count"], md["llama.attention.head_count_kv"]
    hf_names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
    per_layer = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
    arrays = {}
    for name, ti in f.tensors.items():
        if name.startswith("blk."):
            _, i, kind, _ = name.split(".")
            hf = f"model.layers.{i}.{per_layer[kind]}.weight"
        else:
            hf = hf_names[name]
        dtype = {"f32": ("F32", "<f4"), "f16": ("F16", "<f2"), "bf16": ("BF16", "<u2")}[ti.qtype.name]
        a = np.asarray(f.raw(name)).view(dtype[1]).reshape(ti.shape)
        if ".attn_q." in name or ".attn_k." in name:
            heads = n_heads if ".attn_q." in name else n_kv
            rows, cols = a.shape
            a = a.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
        arrays[hf] = (dtype[0], a)
    out_dir.mkdir()
    write_safetensors(out_dir / "model.safetensors", arrays)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": md["llama.embedding_length"], "intermediate_size": md["llama.feed_forward_length"],
              "num_hidden_layers": md["llama.block_count"], "num_attention_heads": n_heads,
              "num_key_value_heads": n_kv, "vocab_size": md["llama.vocab_size"],
              "max_position_embeddings": md["llama.context_length"],
              "rms_norm_eps": md["llama.attention.layer_norm_rms_epsilon"],
              "rope_theta": md["llama.rope.freq_base"], "tie_word_embeddings": "output.weight" not in f.tensors}
    (out_dir / "config.json").write_text(json.dumps(config))
    return out_dir


# llama.cpp's LLAMA_FTYPE_* for each type the generated models are quantized to
LLAMA_FTYPES = {"q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q8_0": 7, "f32": 0, "f16": 1, "bf16": 32}


def llama_quantize(src, dst, qtype, *, allow_requantize=False):
    """llama.cpp's llama_model_quantize with pure set (every 2-D tensor to qtype) -> dst;
    allow_requantize as llama-quantize --allow-requantize (a quantized src is dequantized first)."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[qtype]
    params.pure = True
    params.allow_requantize = allow_requantize
    rc = llama_cpp.llama_model_quantize(os.fspath(src).encode(), os.fspath(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc} for {qtype}")
    return dst
