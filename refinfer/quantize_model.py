"""Quantize a model file to one of the legacy block types, or convert it to f32/f16/bf16, as llama.cpp does.

The output's tensor data is byte-identical to what llama.cpp's `llama_model_quantize` (the
llama-quantize tool) writes with `params.pure = True` and the matching `params.ftype`, i.e.
`llama-quantize --pure IN OUT Q4_0`. What that function does (src/llama-quant.cpp,
llama_model_quantize_impl), and so what this module does:

  * Which tensors are quantized (tensor_allows_quantization): those with at least 2 dims
    (ggml_n_dims: trailing dims of 1 do not count), whose name ends in "weight" and is not a
    norm ("_norm.weight") nor one of a few small special tensors (expert gates, position
    embeddings, ...). token_embd.weight and output.weight ARE quantized. Everything else is
    copied byte for byte, so 1-D norms stay F32.
  * Row lengths (ne[0]) that are not a multiple of the 32-element block cannot be quantized
    (tensor_type_fallback); such a tensor becomes F16 instead ("must use F16 due to unusual
    shape"): an F16 input tensor is then copied, f32/bf16 data converted to F16.
  * F16 and BF16 input is widened to float32 first (ggml_fp16_to_fp32_row,
    ggml_bf16_to_fp32_row: both exact), quantized input dequantized (dequantize_row_*, as
    llama_tensor_dequantize_impl with --allow-requantize), then quantized with the reference quantizers
    (ggml_quantize_chunk -> quantize_row_*_ref, the same function for every row, so how
    llama.cpp splits the work across threads does not change a byte).
  * Metadata: every key of the input, in order, except split.no/split.count/
    split.tensors.count; then general.quantization_version = 2 (GGML_QNT_VERSION) and
    general.file_type = the llama_ftype, both u32, both appended last (gguf_set_val removes a
    key before adding it again, so an existing general.file_type moves to the end).
  * Tensor order: the model loader's weights_map, a std::map ordered by weight_name_comparer:
    first by the layer number that sscanf("blk.%d.") finds (-1 when it finds none, so
    token_embd/output come first), then by name.
  * Alignment: tensor data padded to 32 bytes (GGUF_DEFAULT_ALIGNMENT). llama.cpp uses 32 even
    when the input declares another general.alignment and copies that key unchanged, which
    makes an inconsistent file; we keep the key and lay the data out by it instead.

An HF safetensors checkpoint directory is accepted too: it is read as the f32 GGUF llama.cpp's
converter would write (hf_source), then quantized the same way, so its tensor bytes equal
llama-quantize's output for that converted file. Its tokenizer comes from tokenizer.json or
tokenizer.model beside the weights, or from a GGUF given as vocab_from.

The float targets f32, f16 and bf16 go through the same path (llama-quantize with ftype
ALL_F32, MOSTLY_F16 or MOSTLY_BF16): 2-D weights are converted, norms and other 1-D tensors are
copied. Converting a quantized model to f32 stores its dequantized weights exactly.

Deliberate differences: a quantized input is accepted without an --allow-requantize switch
(QuantizeReport.requantized names its types, and the command says that requantizing compounds
the rounding error); non-finite weights raise NonFiniteError (llama.cpp's loader rejects them
too, with check_tensors).
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from gguf import GGUFValueType

from .errors import FormatError, NonFiniteError, RefinferError, ShapeError, UnsupportedError
from .gguf_file import GGUFFile, write_gguf
from .output_files import check_output_path, publish, temp_beside
from .quant import get_type, quantize

# --type -> llama_ftype (LLAMA_FTYPE_MOSTLY_*, ALL_F32), written as general.file_type.
FTYPES = {"q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q8_0": 7}
FLOAT_FTYPES = {"f32": 0, "f16": 1, "bf16": 32}
# llama-quantize's K-quant presets: a mix of types per tensor (llama_tensor_get_type_impl)
K_FTYPES = {"q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15,
            "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}
ALL_FTYPES = {**FLOAT_FTYPES, **FTYPES, **K_FTYPES}
GGML_QNT_VERSION = 2
FLOAT_TYPES = tuple(FLOAT_FTYPES)

# Name fragments llama.cpp never quantizes (tensor_allows_quantization). Most belong to other
# architectures; they are kept so that a file of any architecture gets llama.cpp's choice.
_NEVER_QUANTIZED_FRAGMENTS = (
    "_norm.weight",
    "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight",  # MoE routers
    "altup", "laurel", "per_layer_model_proj",  # Gemma 3n
    "ssm_conv1d", "shortconv.conv.weight",  # Mamba, LFM2
    "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",  # RWKV
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",  # T5
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
    ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",  # multimodal
)
_NEVER_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")  # BERT
_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")

# Rows per conversion slab: bounds the float32 temporaries of quantize() to tens of MB.
_SLAB_ELEMENTS = 1 << 20


@dataclass
class QuantizeReport:
    qtype: str
    n_quantized: int = 0  # tensors written in qtype (quantized, or converted for a float qtype)
    n_copied: int = 0
    requantized: list = field(default_factory=list)  # quantized types of the input that were dequantized
    f16_fallback: list = field(default_factory=list)  # names whose row length is not a multiple of 32
    types: dict = field(default_factory=dict)  # ggml type written -> number of tensors (quantized or copied)
    imatrix_used: list = field(default_factory=list)  # names quantized with importance weights
    imatrix_missing: list = field(default_factory=list)  # quantized names the imatrix has no entry for
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0


def n_dims(ne) -> int:
    # ggml_n_dims: the highest axis with more than one element, at least 1
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def allows_quantization(name: str, ne) -> bool:
    # llama.cpp: tensor_allows_quantization with quantize_output_tensor = true (the default)
    if n_dims(ne) < 2 or not name.endswith("weight"):
        return False
    if name in _NEVER_QUANTIZED_NAMES:
        return False
    return not any(frag in name for frag in _NEVER_QUANTIZED_FRAGMENTS)


def default_type(qtype: str) -> str:
    """llama_ftype_get_default_type: the ggml type of a preset's ordinary 2-D weights."""
    return qtype[:4].replace("_k", "_K") if qtype in K_FTYPES else qtype


# tensor_type_fallback: a 256-block type for a row length it does not divide
_FALLBACK = {"q2_K": "q4_0", "q3_K": "q4_0", "q4_K": "q5_0", "q5_K": "q5_1", "q6_K": "q8_0"}


def type_fallback(ne, new_type: str) -> str:
    if ne[0] % get_type(new_type).block_size == 0:
        return new_type
    new_type = _FALLBACK.get(new_type, new_type)  # a 32-block type has nothing smaller
    if ne[0] % get_type(new_type).block_size:
        return "f16"  # "must use F16 due to unusual shape"
    return new_type


def target_type(name: str, ne, qtype: str) -> str | None:
    """The ggml type llama.cpp's pure mode gives tensor `name` of shape ne (ggml order)."""
    if not allows_quantization(name, ne):
        return None  # copied unchanged
    new = default_type(qtype)
    return new if new in FLOAT_TYPES else type_fallback(ne, new)


def tensor_category(name: str) -> str:
    """llama.cpp's tensor_get_category, in its order of tests."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for fragment, category in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"),
                               ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                               ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                               ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if fragment in name:
            return category  # attn_qkv and attn_kv_b count as attn_v (category_is_attn_v)
    return "other"


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    # the first and last eighth of the layers, and every third one between
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def mixture_types(src: SourceModel, qtype: str, names, *, has_imatrix: bool) -> dict:
    """name -> ggml type (None: copied) that llama-quantize (not --pure) chooses for preset qtype:
    llama_tensor_get_type and llama_tensor_get_type_impl of src/llama-quant.cpp, for the dense
    (non-MoE, non-Falcon) models refinfer runs. The counters i_attention_wv and i_ffn_down
    advance over the tensors in llama.cpp's order (names), as its preliminary loop does."""
    a, md = src.arch, src.metadata
    if int(md.get(f"{a}.expert_count", 0) or 0) > 1 or a == "falcon":
        raise UnsupportedError(f"{src.path!r}: the {qtype.upper()} type rules for arch {a!r} with "
                               f"{md.get(f'{a}.expert_count', 0)} experts are not implemented",
                               hint="use --pure (every 2-D weight in the preset's default type)")
    n_head = int(md.get(f"{a}.attention.head_count", 1))
    n_head_kv = int(md.get(f"{a}.attention.head_count_kv", n_head))
    n_gqa = n_head // n_head_kv if n_head_kv else 0
    n_layer = int(md.get(f"{a}.block_count", 0))
    # model.type == LLM_TYPE_70B (src/models/*.cpp): attn_v gets q5_K instead of q3_K/q4_K
    is_70b = ((a == "llama" and n_layer == 80 and n_head != n_head_kv)
              or (a in ("qwen2", "deci", "olmo") and n_layer == 80) or (a == "jais2" and n_layer == 68))
    categories = {n: tensor_category(n) for n in names}
    tied = "output" not in categories.values()
    n_attention_wv = sum(c == "attn_v" for c in categories.values())
    i_attention_wv = i_ffn_down = 0
    base = default_type(qtype)
    out = {}
    for name in names:
        ne = src.tensors[name].ne
        if not allows_quantization(name, ne):
            out[name] = None
            continue
        cat, new = categories[name], base
        if cat == "output" or (tied and cat == "token_embd"):
            if ne[0] % get_type(new).block_size:
                new = "q8_0"
            elif new != "q8_0":
                new = "q6_K"
        elif cat == "attn_v":
            if qtype == "q2_k":
                new = "q4_K" if n_gqa >= 4 else "q3_K"
            elif qtype == "q3_k_m":
                new = "q5_K" if i_attention_wv < 2 else "q4_K"
            elif qtype == "q3_k_l":
                new = "q5_K"
            elif qtype in ("q4_k_m", "q5_k_m") and use_more_bits(i_attention_wv, n_attention_wv):
                new = "q6_K"
            elif qtype == "q4_k_s" and i_attention_wv < 4:
                new = "q5_K"
            if is_70b and new in ("q3_K", "q4_K"):
                new = "q5_K"
            i_attention_wv += 1
        elif cat == "ffn_down":
            i = i_ffn_down  # the layer index, for a dense model
            if qtype == "q2_k":
                new = "q3_K"
            elif qtype == "q3_k_m":
                new = "q5_K" if i < n_layer // 16 else "q4_K"
            elif qtype == "q3_k_l":
                new = "q5_K"
            elif qtype == "q4_k_m":
                if use_more_bits(i, n_layer):
                    new = "q6_K"
            elif qtype == "q5_k_m" and use_more_bits(i, n_layer):
                new = "q6_K"
            elif qtype == "q4_k_s" and i < n_layer // 8:
                new = "q5_K"
            elif qtype in ("q4_0", "q5_0") and has_imatrix and i < n_layer // 8:
                new = "q4_1" if qtype == "q4_0" else "q5_1"  # "guard against craziness"
            i_ffn_down += 1
        elif cat == "attn_output":
            new = {"q2_k": "q3_K", "q3_k_m": "q4_K", "q3_k_l": "q5_K"}.get(qtype, new)
        out[name] = type_fallback(ne, new)
    return out


_LAYER = re.compile(r"blk\.\s*([+-]?\d+)")


def llama_tensor_order(names) -> list:
    """Names sorted as llama.cpp's weights_map (weight_name_comparer): layer, then name."""
    def key(name):
        m = _LAYER.match(name)
        return (int(m.group(1)) if m else -1, name.encode("utf-8"))
    return sorted(names, key=key)


def check_qtype(qtype: str, choices=ALL_FTYPES, option="--type") -> str:
    key = str(qtype).strip().lower()
    if key in choices:
        return key
    if key.startswith(("iq", "tq")) or key in ("q2_k_s", "mxfp4_moe"):
        hint = f"the IQ/TQ types and Q2_K_S need codebooks refinfer does not have; choose one of {', '.join(choices)}"
    else:
        hint = f"choose one of {', '.join(choices)}"
    raise UnsupportedError(f"{option}: unsupported type {qtype!r}", hint=hint)


@dataclass
class SourceTensor:
    """One input tensor, whatever the container: what to copy and how to read float32 rows."""
    name: str  # GGUF name
    shape: tuple  # NumPy order
    stored: str  # ggml type name written when the tensor is copied (any type refinfer reads)
    nbytes: int  # bytes in the input
    raw: object  # () -> uint8[n_rows, row_bytes] in the stored type
    rows: object  # (a, b) -> float32[b - a, ne[0]], rows a..b

    @property
    def ne(self) -> tuple:
        return tuple(reversed(self.shape))


@dataclass
class SourceModel:
    path: str
    arch: str
    metadata: dict  # output metadata before quantization_version/file_type, in order
    types: dict  # key -> GGUFValueType
    array_types: dict  # key -> element GGUFValueType, for arrays
    tensors: dict  # name -> SourceTensor


def _widen(stored: str, raw_rows: np.ndarray, n_cols: int) -> np.ndarray:
    # f16/bf16 -> float32 is exact (ggml_fp16_to_fp32_row / ggml_bf16_to_fp32_row); a quantized
    # type gives dequantize_row_*'s floats
    t = get_type(stored)
    if stored == "f32":
        return np.ascontiguousarray(raw_rows).view("<f4").reshape(-1, n_cols)
    return t.dequantize_blocks(np.ascontiguousarray(raw_rows).reshape(-1, t.type_size)).reshape(-1, n_cols)


def gguf_source(path: str) -> SourceModel:
    f = GGUFFile(path)
    drop = set(_SPLIT_KEYS) | {"general.quantization_version", "general.file_type"}
    metadata = {k: v for k, v in f.metadata.items() if k not in drop}
    tensors = {}
    for name, ti in f.tensors.items():
        tensors[name] = SourceTensor(
            name, ti.shape, ti.qtype.name, ti.nbytes,
            raw=lambda name=name: f.raw(name),
            rows=lambda a, b, name=name, ti=ti: _widen(ti.qtype.name, f.raw(name)[a:b], ti.ne[0]))
    return SourceModel(path, f.metadata.get("general.architecture", "llama"), metadata,
                       {k: f.metadata_types[k] for k in metadata},
                       {k: f.array_types[k] for k in metadata if k in f.array_types}, tensors)


def _tokenizer_metadata(path, vocab_from):
    """tokenizer.* keys with their GGUF value types: copied from the GGUF vocab_from, or
    converted from the checkpoint's tokenizer.json / tokenizer.model with the types llama.cpp's
    converter writes (token ids UINT32, flags BOOL, scores FLOAT32, token types INT32)."""
    if vocab_from is not None:
        vocab = GGUFFile(vocab_from)
        keys = [k for k in vocab.metadata if k.startswith("tokenizer.")]
        return ({k: vocab.metadata[k] for k in keys}, {k: vocab.metadata_types[k] for k in keys},
                {k: vocab.array_types[k] for k in keys if k in vocab.array_types})
    from .tokenizer import metadata_from_hf_dir
    directory = path if os.path.isdir(path) else os.path.dirname(os.fspath(path))
    if not any(os.path.exists(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer.model")):
        raise FormatError("no tokenizer.json or tokenizer.model beside the checkpoint", file=directory,
                          hint="pass --vocab-from FILE.gguf, a GGUF with the same vocabulary, to copy tokenizer.* from it")
    md = metadata_from_hf_dir(directory)
    scalar = {bool: GGUFValueType.BOOL, int: GGUFValueType.UINT32, float: GGUFValueType.FLOAT32,
              str: GGUFValueType.STRING}
    element = {str: GGUFValueType.STRING, int: GGUFValueType.INT32, float: GGUFValueType.FLOAT32}
    types, arrays = {}, {}
    for k, v in md.items():
        if isinstance(v, list):
            types[k] = GGUFValueType.ARRAY
            arrays[k] = element[type(v[0]) if v else str]
        else:
            types[k] = scalar[type(v)]
    return md, types, arrays


def hf_source(path: str, vocab_from=None) -> SourceModel:
    """An HF safetensors Llama/Qwen2 checkpoint (directory, .safetensors file or index) as the f32 GGUF llama.cpp's converter
    would make of it: GGUF tensor names, q/k rows permuted for arch llama (loader.permute_qk_rows,
    the one place that convention lives), 1-D tensors as f32, hyperparameters from config.json.
    The tokenizer comes from the checkpoint's tokenizer.json / tokenizer.model, or is copied from
    the GGUF `vocab_from` when given."""
    from .config import config_from_hf, llama3_rope_factors
    from .loader import check_tensor_set, hf_to_gguf_names, permute_qk_rows
    from .safetensors_file import SafetensorsCheckpoint

    ck = SafetensorsCheckpoint(path)
    if ck.config is None:
        raise FormatError("no config.json beside the safetensors weights", file=path,
                          hint="an HF checkpoint directory has config.json, model*.safetensors and a tokenizer")
    names = hf_to_gguf_names(ck.tensors)  # GGUF name -> HF name
    tied = "output.weight" not in names
    cfg = config_from_hf(ck.config, path, tied=tied if tied else None)
    check_tensor_set({g: tuple(ck.tensors[h].shape) for g, h in names.items()}, cfg, path)

    tok_meta, tok_types, tok_arrays = _tokenizer_metadata(path, vocab_from)
    n_tokens = len(tok_meta.get("tokenizer.ggml.tokens", []))
    if n_tokens != cfg.vocab_size:
        raise FormatError(f"the tokenizer has {n_tokens} tokens, but config.json's vocab_size is "
                          f"{cfg.vocab_size}", file=os.fspath(vocab_from or path),
                          hint="--vocab-from must be a GGUF of the same vocabulary as the checkpoint")

    a = cfg.arch
    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    meta = [("general.name", os.path.basename(os.path.normpath(path)), GGUFValueType.STRING),
            (f"{a}.block_count", cfg.n_layers, u32), (f"{a}.context_length", cfg.max_seq_len, u32),
            (f"{a}.embedding_length", cfg.dim, u32), (f"{a}.feed_forward_length", cfg.hidden_dim, u32),
            (f"{a}.attention.head_count", cfg.n_heads, u32),
            (f"{a}.attention.head_count_kv", cfg.n_kv_heads, u32),
            (f"{a}.rope.freq_base", cfg.rope_theta, f32),
            (f"{a}.attention.layer_norm_rms_epsilon", cfg.norm_eps, f32)]
    if cfg.head_dim != cfg.dim // cfg.n_heads:
        meta += [(f"{a}.attention.key_length", cfg.head_dim, u32), (f"{a}.attention.value_length", cfg.head_dim, u32)]
    if cfg.rope_freq_scale != 1.0:
        meta += [(f"{a}.rope.scaling.type", "linear", GGUFValueType.STRING),
                 (f"{a}.rope.scaling.factor", 1.0 / cfg.rope_freq_scale, f32)]
    meta += [(f"{a}.vocab_size", cfg.vocab_size, u32), (f"{a}.rope.dimension_count", cfg.rope_dim, u32)]
    metadata = {k: v for k, v, _ in meta}
    types = {k: t for k, _, t in meta}
    metadata.update(tok_meta)
    types.update(tok_types)
    array_types = dict(tok_arrays)

    stored_type = {"F32": "f32", "F16": "f16", "BF16": "bf16"}
    tensors = {}
    for name, hf in names.items():
        info = ck.tensors[hf]
        if info.dtype not in stored_type:
            raise UnsupportedError(f"{path!r}: tensor {hf!r} is {info.dtype}; quantize reads F32, F16 and BF16",
                                   hint="convert the checkpoint's weights to float32, float16 or bfloat16 first")
        shape = tuple(info.shape)
        order = None  # q/k of arch llama: gguf_rows = hf_rows[order]
        if cfg.arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            order = permute_qk_rows(shape[0], cfg.n_heads if ".attn_q." in name else cfg.n_kv_heads)

        def raw_rows(a, b, hf=hf, shape=shape, order=order):  # uint8[b - a, row_bytes], GGUF row order
            m = ck.raw(hf).reshape(-1, shape[-1])  # [n_rows, n_cols], stored dtype
            m = m[a:b] if order is None else m[order[a:b]]
            return np.ascontiguousarray(m).view(np.uint8)

        n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        dt = stored_type[info.dtype]
        rows = (lambda a, b, raw_rows=raw_rows, dt=dt, n=shape[-1]: _widen(dt, raw_rows(a, b), n))
        if len(shape) == 1:  # norms and biases: f32 in the GGUF, as the converter writes them
            tensors[name] = SourceTensor(name, shape, "f32", info.nbytes,
                                         raw=lambda rows=rows: rows(0, 1).view(np.uint8), rows=rows)
        else:
            tensors[name] = SourceTensor(name, shape, dt, info.nbytes,
                                         raw=lambda raw_rows=raw_rows, n=n_rows: raw_rows(0, n), rows=rows)
    scaling = ck.config.get("rope_scaling") or {}
    if cfg.arch == "llama" and scaling.get("rope_type", scaling.get("type")) == "llama3":
        freqs = llama3_rope_factors(scaling, cfg.head_dim, cfg.rope_theta)  # [head_dim / 2]
        tensors["rope_freqs.weight"] = SourceTensor(
            "rope_freqs.weight", freqs.shape, "f32", freqs.nbytes,
            raw=lambda freqs=freqs: freqs.view(np.uint8).reshape(1, -1),
            rows=lambda a, b, freqs=freqs: freqs.reshape(1, -1)[a:b])
    return SourceModel(path, cfg.arch, metadata, types, array_types, tensors)


def _importance(src: SourceModel, st: SourceTensor, imatrix: dict, report: QuantizeReport):
    """The imatrix entry llama_model_quantize_impl uses for st, or None: a missing entry means
    quantizing without one; an entry of the wrong size is an error, except for token_embd
    (never a matmul input, so llama-imatrix has no entry of its row length)."""
    qw = imatrix.get(st.name)
    if qw is None:
        report.imatrix_missing.append(st.name)
        return None
    qw = np.asarray(qw, dtype=np.float32).reshape(-1)
    expected = st.ne[0] * (st.ne[2] if len(st.ne) > 2 else 1)
    if qw.shape[0] != expected:
        if st.name in ("token_embd.weight", "per_layer_token_embd.weight"):
            report.imatrix_missing.append(st.name)
            return None
        raise FormatError(f"imatrix entry {st.name!r} has {qw.shape[0]} values, but the tensor's rows "
                          f"have {expected}", file=src.path,
                          hint="the importance matrix was computed for a different model; compute it "
                               "for this one with `python -m refinfer imatrix`")
    if not np.isfinite(qw).all():
        raise FormatError(f"imatrix entry {st.name!r} contains non-finite values", file=src.path,
                          hint="llama.cpp rejects such an imatrix too; recompute it")
    report.imatrix_used.append(st.name)
    return qw


def _convert(src: SourceModel, st: SourceTensor, new_type: str, qw=None) -> np.ndarray:
    from .quant.weighted import quantize_rows
    t = get_type(new_type)
    n_rows = int(np.prod(st.ne[1:])) if len(st.ne) > 1 else 1
    out = np.empty((n_rows, st.ne[0] // t.block_size * t.type_size), np.uint8)  # [n_rows, row_bytes]
    step = max(1, _SLAB_ELEMENTS // st.ne[0])
    for a in range(0, n_rows, step):
        b = min(n_rows, a + step)
        try:
            out[a:b] = quantize(st.rows(a, b), t) if qw is None else quantize_rows(st.rows(a, b), t, qw)
        except (NonFiniteError, ShapeError) as e:
            raise type(e)(f"{src.path!r}, tensor {st.name!r}, rows {a}..{b}: {e}",
                          hint=e.hint if e.hint != e.default_hint else
                          "the input tensor cannot be stored in this type; "
                          "`python -m refinfer inspect IN` shows its shape and type") from None
    return out


def check_paths(in_path, out_path):
    """Checks IN and OUT before any work."""
    if not os.path.exists(in_path):
        raise RefinferError(f"input {in_path!r} does not exist",
                            hint="give the path of a GGUF model or an HF checkpoint directory")
    same = os.path.samefile(in_path, out_path) if os.path.exists(out_path) else \
        os.path.realpath(in_path) == os.path.realpath(out_path)
    if same:
        raise RefinferError(f"output {out_path!r} is the input",
                            hint="write the quantized model to a new file; the input is read while the output is written")
    check_output_path(out_path, "OUT")


def quantize_model(in_path, out_path, qtype: str, *, vocab_from=None, progress: bool = False,
                   pure=None, imatrix=None) -> QuantizeReport:
    """IN (a GGUF file, or an HF safetensors checkpoint directory) -> OUT with the 2-D weights
    in qtype: a quantized type or preset, or f32/f16/bf16 (then it is a conversion).

    pure: every 2-D weight in the preset's default type (llama-quantize --pure), or llama.cpp's
    per-tensor rules (False). None: pure for the single types (q4_0 .. q8_0, f32/f16/bf16, as
    this command always did), the rules for the K-quant presets (Q2_K .. Q6_K), as
    llama-quantize does by default. imatrix: a path (refinfer.imatrix.read_imatrix) or a dict
    name -> float32 importance weights; K-quants and q4_0/q4_1/q5_0/q5_1 then use ggml's
    weighted quantizers."""
    qtype = check_qtype(qtype)
    if pure is None:
        pure = qtype not in K_FTYPES
    if imatrix is not None and not isinstance(imatrix, dict):
        from .imatrix import read_imatrix
        imatrix = read_imatrix(imatrix).importance()
    in_path, out_path = os.fspath(in_path), os.fspath(out_path)
    check_paths(in_path, out_path)

    start = time.perf_counter()
    is_hf = os.path.isdir(in_path) or in_path.endswith((".safetensors", ".safetensors.index.json"))
    if vocab_from is not None and not is_hf:
        raise RefinferError(f"--vocab-from {vocab_from}: the input {in_path!r} is a GGUF file, which keeps its own "
                            "tokenizer", hint="leave out --vocab-from; it is for an HF checkpoint directory IN")
    src = hf_source(in_path, vocab_from) if is_hf else gguf_source(in_path)
    report = QuantizeReport(qtype)
    metadata, types = dict(src.metadata), dict(src.types)
    metadata["general.quantization_version"] = GGML_QNT_VERSION
    types["general.quantization_version"] = GGUFValueType.UINT32
    metadata["general.file_type"] = ALL_FTYPES[qtype]
    types["general.file_type"] = GGUFValueType.UINT32
    names = llama_tensor_order(src.tensors)
    if pure or qtype in FLOAT_TYPES:
        chosen = {name: target_type(name, src.tensors[name].ne, qtype) for name in names}
    else:
        chosen = mixture_types(src, qtype, names, has_imatrix=bool(imatrix))
    base = default_type(qtype)

    def tensors():
        from tqdm import tqdm
        for name in tqdm(names, desc=f"quantize {qtype}", unit="tensor", disable=not progress, file=sys.stderr):
            st = src.tensors[name]
            new = chosen[name]
            report.bytes_in += st.nbytes
            if new is not None and new != st.stored and st.stored not in FLOAT_TYPES \
                    and st.stored not in report.requantized:
                report.requantized.append(st.stored)
            if new is None or new == st.stored:
                report.n_copied += 1
                data, t = st.raw(), st.stored
            else:
                if new == "f16" and base != "f16":  # a row length no block of the type divides
                    report.f16_fallback.append(name)
                else:
                    report.n_quantized += 1
                qw = _importance(src, st, imatrix, report) if imatrix and new not in FLOAT_TYPES else None
                data, t = _convert(src, st, new, qw), new
            report.types[t] = report.types.get(t, 0) + 1
            report.bytes_out += data.nbytes
            yield name, data, t, st.shape

    # Written next to the target and renamed at the end: an interrupted run leaves no half file.
    fd, tmp = temp_beside(out_path, prefix=".quantize-", suffix=".gguf.part")
    os.close(fd)
    try:
        write_gguf(tmp, src.arch, metadata, types, tensors(), array_types=src.array_types)
        publish(tmp, out_path)
    except BaseException:
        os.unlink(tmp)
        raise
    report.seconds = time.perf_counter() - start
    return report

