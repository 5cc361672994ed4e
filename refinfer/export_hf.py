"""GGUF -> HF checkpoint directory: what llama.cpp's convert_hf_to_gguf.py reads, written from
what it wrote, so that transformers (from_pretrained, offline) and refinfer.load both run the
GGUF's own weights.

    out_dir/config.json              LlamaForCausalLM or Qwen2ForCausalLM, as general.architecture says
    out_dir/model.safetensors        every tensor dequantized (ggml's dequantize_row_*) to float32
                                     (or float16 / bfloat16), under transformers' names
    out_dir/generation_config.json   bos / eos / pad token ids
    out_dir/tokenizer.json           tokenizer.ggml.model gpt2 (byte-level BPE): vocab, merges,
      + tokenizer_config.json        added tokens, the pre-tokenizer tokenizer.ggml.pre names
    out_dir/tokenizer.model          tokenizer.ggml.model llama (SentencePiece): the model proto
      + tokenizer_config.json

The q/k rows: for arch llama the converter permutes each head's q and k rows so that RoPE
rotates adjacent pairs (its `permute`: HF row (half, i) becomes GGUF row (i, half)); HF rotates
halves. The export undoes it with the inverse of refinfer's one permutation,
loader.permute_qk_rows, which refinfer.load applies again when it reads the directory: the
export's q/k rows there are the GGUF's rows, bit for bit. qwen2 is NEOX RoPE in both: no
permutation.

RoPE scaling: linear scaling becomes rope_scaling {"rope_type": "linear"}; a rope_freqs.weight
tensor (Llama 3.1's per-frequency divisors) becomes rope_scaling {"rope_type": "llama3"} with the
parameters that reproduce it exactly (config.llama3_rope_factors), or an error if none do.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import struct
from dataclasses import dataclass, field

import numpy as np

from .config import config_from_gguf, llama3_rope_factors
from .errors import FormatError, RefinferError, UnsupportedError
from .loader import HF_GLOBAL_NAMES, HF_NAMES, check_tensor_set, permute_qk_rows
from .output_files import publish, temp_beside
from .quant._common import f32_to_bf16_bits

DTYPES = {"float32": ("F32", "<f4"), "float16": ("F16", "<f2"), "bfloat16": ("BF16", "<u2")}
ARCH_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
GGUF_TO_HF = {v: k for k, v in HF_NAMES.items()}          # per-layer GGUF suffix -> HF suffix
GGUF_TO_HF_GLOBAL = {v: k for k, v in HF_GLOBAL_NAMES.items()}


@dataclass
class ExportReport:
    out_dir: str
    arch: str
    dtype: str
    n_tensors: int = 0
    bytes_out: int = 0
    tokenizer_files: list = field(default_factory=list)
    source_types: dict = field(default_factory=dict)   # ggml type name -> tensor count


def hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in GGUF_TO_HF_GLOBAL:
        return GGUF_TO_HF_GLOBAL[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in GGUF_TO_HF:
        return f"model.layers.{parts[1]}.{GGUF_TO_HF[parts[2]]}"
    raise UnsupportedError(f"tensor {gguf_name!r} has no transformers Llama/Qwen2 equivalent",
                           hint="export-hf writes llama and qwen2 models: token_embd, blk.N.{attn,ffn}_*, "
                                "output_norm, output (and rope_freqs, as rope_scaling)")


def export_hf(gguf_path, out_dir, *, dtype="float32", progress=False) -> ExportReport:
    """Write the HF directory out_dir (created if missing; the files named above are replaced)
    from the GGUF at gguf_path."""
    from .gguf_file import GGUFFile
    if dtype not in DTYPES:
        raise RefinferError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}",
                            hint="float32 keeps the dequantized weights exactly (the default)")
    src = os.fspath(gguf_path)
    gf = GGUFFile(src)
    meta = gf.metadata
    tied = "output.weight" not in gf.tensors
    cfg = config_from_gguf(meta, src, tied=tied)
    check_tensor_set({n: t.shape for n, t in gf.tensors.items()}, cfg, src)
    if cfg.rope_dim != cfg.head_dim:
        raise UnsupportedError(f"{src}: rope.dimension_count {cfg.rope_dim} != head_dim {cfg.head_dim}",
                               hint="partial RoPE has no LlamaConfig/Qwen2Config equivalent")
    out = pathlib.Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RefinferError(f"output {str(out)!r} exists and is not a directory", hint="give a directory to write the checkpoint into")
    out.mkdir(parents=True, exist_ok=True)

    rope_scaling = _rope_scaling(gf, meta, cfg, src)
    report = ExportReport(str(out), cfg.arch, dtype)
    names = [n for n in gf.tensors if n != "rope_freqs.weight"]
    specs = {}
    for name in names:
        specs[hf_tensor_name(name)] = (name, tuple(gf.tensors[name].shape))
    st_dtype, np_dtype = DTYPES[dtype]

    def tensor(gguf_name):
        ti = gf.tensors[gguf_name]
        report.source_types[ti.qtype.name] = report.source_types.get(ti.qtype.name, 0) + 1
        a = np.ascontiguousarray(gf.dequantize(gguf_name), dtype=np.float32)
        if cfg.arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            n_head = cfg.n_heads if ".attn_q." in gguf_name else cfg.n_kv_heads
            a = a[np.argsort(permute_qk_rows(a.shape[0], n_head))]      # hf_rows = gguf_rows[idx^-1]
        if not np.all(np.isfinite(a)):
            raise FormatError("non-finite weights", file=src, tensor=gguf_name,
                              hint="the model file is damaged; re-download or re-convert it")
        if dtype == "bfloat16":
            return f32_to_bf16_bits(a)
        return a.astype(np_dtype)

    report.bytes_out = _write_safetensors(out / "model.safetensors", {hf: (st_dtype, shape) for hf, (_, shape) in specs.items()},
                                          (tensor(g) for g, _ in specs.values()))
    report.n_tensors = len(specs)

    tok_ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown")}
    config = {
        "architectures": [ARCH_CLASSES[cfg.arch]], "model_type": cfg.arch,
        "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": rope_scaling, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": dtype,
        "bos_token_id": tok_ids["bos"], "eos_token_id": tok_ids["eos"], "pad_token_id": tok_ids["padding"],
    }
    if cfg.arch == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:
        config.update(use_sliding_window=False)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json",
                {k: v for k, v in (("bos_token_id", tok_ids["bos"]), ("eos_token_id", tok_ids["eos"]),
                                   ("pad_token_id", tok_ids["padding"])) if v is not None})
    report.tokenizer_files = write_tokenizer(meta, out, src)
    return report


def _rope_scaling(gf, meta, cfg, src):
    if cfg.rope_freq_scale != 1.0:
        return {"rope_type": "linear", "factor": 1.0 / cfg.rope_freq_scale}
    if "rope_freqs.weight" not in gf.tensors:
        return None
    ff = np.asarray(gf.dequantize("rope_freqs.weight"), np.float32).reshape(-1)
    if ff.shape != (cfg.head_dim // 2,):
        raise FormatError(f"shape {ff.shape}, expected ({cfg.head_dim // 2},) (head_dim / 2)", file=src,
                          tensor="rope_freqs.weight", hint="the file is damaged or not a Llama 3 model")
    factor = float(ff.max())
    # The llama3 parameters of every Llama 3.x release (low 1, high 4, original context 8192)
    # and nearby ones; the rope_freqs must come out bit for bit.
    for old_ctx in (8192, 4096, 2048, 16384, 32768, 65536, 131072, 1024, 512, 256, 128, 64):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0), (1.0, 8.0)):
            scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                       "original_max_position_embeddings": old_ctx}
            if np.array_equal(llama3_rope_factors(scaling, cfg.head_dim, cfg.rope_theta), ff):
                return scaling
    raise UnsupportedError(f"{src}: tensor 'rope_freqs.weight' (max {factor}) matches no llama3 rope_scaling "
                           "(factor = its largest value, low/high_freq_factor 1/4, 1/2, 2/4, 1/8, original "
                           "context 64 .. 131072)",
                           hint="per-frequency RoPE factors other than Llama 3's have no transformers config")


def _write_json(path, obj):
    fd, tmp = temp_beside(path)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    publish(tmp, path)


def _write_safetensors(path, specs: dict, arrays) -> int:
    """specs {name: (dtype, shape)} in file order; arrays yields each tensor's data in that
    order (one at a time: a model larger than memory can be written). Returns the file size."""
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8}      # I32/I64: packed quantized tensors
    head, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (dt, shape) in specs.items():
        n = math.prod(shape) * sizes[dt]
        head[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(head).encode()
    raw += b" " * (-len(raw) % 8)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for (name, (dt, shape)), a in zip(specs.items(), arrays):
                if a.shape != shape or a.dtype.itemsize != sizes[dt]:
                    raise AssertionError(f"{name}: {a.dtype}{a.shape} for {dt}{shape}")
                f.write(np.ascontiguousarray(a).data)
        publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return 8 + len(raw) + offset


# ---- the tokenizer ----------------------------------------------------------------------------

TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED, TYPE_UNUSED, TYPE_BYTE = 1, 2, 3, 4, 5, 6

# tokenizer.ggml.pre -> tokenizer.json pre_tokenizer (the inverse of tokenizer/hf.py's recognition)
def _byte_level(use_regex):
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split(regex):
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def _pre_tokenizer(pre, src):
    from .tokenizer.hf import _LLAMA3_REGEX, _QWEN2_REGEX
    table = {
        "llama-bpe": {"type": "Sequence", "pretokenizers": [_split(_LLAMA3_REGEX), _byte_level(False)]},
        "qwen2": {"type": "Sequence", "pretokenizers": [_split(_QWEN2_REGEX), _byte_level(False)]},
        "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                         _byte_level(True)]},
        "gpt-2": _byte_level(True),
        "default": _byte_level(True),
    }
    if pre not in table:
        raise UnsupportedError(f"{src}: tokenizer.ggml.pre {pre!r} has no tokenizer.json pre-tokenizer here "
                               f"(exported: {', '.join(table)})",
                               hint="the weights and config can still be exported by hand; refinfer reads the GGUF itself")
    return table[pre]


def write_tokenizer(meta: dict, out: pathlib.Path, src: str) -> list:
    """The tokenizer files for meta's tokenizer.ggml.* keys; returns the names written."""
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or not isinstance(tokens, list):
        raise FormatError("no tokenizer.ggml.model / tokenizer.ggml.tokens", file=src,
                          hint="the GGUF carries no tokenizer; export needs one for transformers")
    types = list(meta.get("tokenizer.ggml.token_type") or [TYPE_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise FormatError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens", file=src,
                          hint="the file's tokenizer metadata is damaged")
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    from .tokenizer import Tokenizer
    rules = Tokenizer.from_gguf_metadata(meta)   # llama.cpp's defaults where the keys are absent (add_bos)

    def text(i):
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text(ids["bos"]), "eos_token": text(ids["eos"]), "unk_token": text(ids["unknown"]),
        "pad_token": text(ids["padding"]),
        "add_bos_token": rules.add_bos, "add_eos_token": rules.add_eos,
        "clean_up_tokenization_spaces": False, "model_max_length": int(1e9),
    }
    if meta.get("tokenizer.chat_template"):
        tok_config["chat_template"] = meta["tokenizer.chat_template"]
    tok_config = {k: v for k, v in tok_config.items() if v is not None}
    if model == "gpt2":
        _write_json(out / "tokenizer.json", _bpe_tokenizer_json(meta, tokens, types, tok_config, src))
        written = ["tokenizer.json"]
    elif model == "llama":
        scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        fd, tmp = temp_beside(out / "tokenizer.model")
        with os.fdopen(fd, "wb") as f:
            f.write(spm_model_proto(tokens, scores, types, ids, bool(meta.get("tokenizer.ggml.add_space_prefix", True))))
        publish(tmp, out / "tokenizer.model")
        _write_json(out / "tokenizer.json", _spm_tokenizer_json(meta, tokens, scores, types, tok_config))
        written = ["tokenizer.model", "tokenizer.json"]
    else:
        raise UnsupportedError(f"{src}: tokenizer.ggml.model {model!r}: export-hf writes gpt2 (BPE) and llama "
                               "(SentencePiece) tokenizers", hint="refinfer reads the GGUF's tokenizer itself")
    _write_json(out / "tokenizer_config.json", tok_config)
    return written + ["tokenizer_config.json"]


def _bpe_tokenizer_json(meta, tokens, types, tok_config, src) -> dict:
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise FormatError("tokenizer.ggml.model is gpt2 but tokenizer.ggml.merges is missing", file=src,
                          hint="the file's tokenizer metadata is damaged")
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise FormatError(f"merge {m!r} is not 'a b'", file=src, hint="the file's tokenizer metadata is damaged")
        pairs.append([a, b])
    post = _bos_template(meta, tokens, tok_config["add_bos_token"]) or {
        "type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": _added_tokens(tokens, types),
        "normalizer": None,
        "pre_tokenizer": _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"), src),
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": pairs},
    }


def _bos_template(meta, tokens, add_bos):
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if not (add_bos and isinstance(bos, int) and 0 <= bos < len(tokens)):
        return None
    b = tokens[bos]
    return {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b: {"id": b, "ids": [bos], "tokens": [b]}}}


def _added_tokens(tokens, types):
    return [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": types[i] == TYPE_CONTROL}
            for i, t in enumerate(tokens) if types[i] in (TYPE_CONTROL, TYPE_USER_DEFINED)]


def _spm_tokenizer_json(meta, tokens, scores, types, tok_config) -> dict:
    """A SentencePiece BPE vocabulary as transformers' LlamaConverter writes it (legacy mode):
    pieces as a byte-fallback BPE whose merges are every split of a piece into two pieces,
    ordered by the merged piece's score (transformers' generate_merges); spaces become U+2581 and
    one is prepended when add_space_prefix. For transformers: refinfer itself reads
    tokenizer.model."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for merged, i in vocab.items():
        local = [(merged[:k], merged[k:]) for k in range(1, len(merged)) if merged[:k] in vocab and merged[k:] in vocab]
        merges += sorted(local, key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    # by the merged piece's score, highest first (generate_merges with vocab_scores): SentencePiece
    # BPE merges the best-scoring pair first, and a piece's id does not always follow its score
    # (Llama's "\u2581\u2581", id 259, scores -1e9: ordered by id it would merge before "\u2581x")
    score = dict(zip(tokens, scores))
    merges = [list(m) for m in sorted(merges, key=lambda lr: (score[lr[0] + lr[1]], len(lr[0]), len(lr[1])),
                                      reverse=True)]
    steps = ([{"type": "Prepend", "prepend": "\u2581"}] if meta.get("tokenizer.ggml.add_space_prefix", True) else [])
    steps.append({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"})
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    decoder = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
               {"type": "Fuse"}]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        decoder.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": _added_tokens(tokens, types),
        "normalizer": {"type": "Sequence", "normalizers": steps}, "pre_tokenizer": None,
        "post_processor": _bos_template(meta, tokens, tok_config["add_bos_token"]),
        "decoder": {"type": "Sequence", "decoders": decoder},
        "model": {"type": "BPE", "dropout": None, "unk_token": tokens[unk] if isinstance(unk, int) else None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "ignore_merges": False, "vocab": vocab, "merges": merges},
    }


# SentencePiece's ModelProto (sentencepiece_model.proto), the fields a BPE model needs:
#   1 pieces (repeated SentencePiece: 1 piece string, 2 score float, 3 type enum)
#   2 trainer_spec (3 model_type: 2 = BPE; 4 vocab_size; 35 byte_fallback; 40..43 unk/bos/eos/pad id)
#   3 normalizer_spec (1 name; 3 add_dummy_prefix; 4 remove_extra_whitespaces; 5 escape_whitespaces)
# The piece type enum is GGUF's token_type (NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6).

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1                      # negative int32 fields are 10-byte two's complement
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    return _varint(num << 3 | wire) + payload


def _bytes_field(num, data: bytes) -> bytes:
    return _field(num, 2, _varint(len(data)) + data)


def spm_model_proto(tokens, scores, types, ids: dict, add_dummy_prefix: bool) -> bytes:
    out = bytearray()
    for t, s, ty in zip(tokens, scores, types):
        piece = _bytes_field(1, t.encode("utf-8")) + _field(2, 5, struct.pack("<f", float(s))) + _field(3, 0, _varint(int(ty)))
        out += _bytes_field(1, piece)
    trainer = _field(3, 0, _varint(2)) + _field(4, 0, _varint(len(tokens)))
    trainer += _field(35, 0, _varint(int(TYPE_BYTE in types)))
    for num, key in ((40, "unknown"), (41, "bos"), (42, "eos"), (43, "padding")):
        v = ids.get(key)
        trainer += _field(num, 0, _varint(v if isinstance(v, int) else -1))
    out += _bytes_field(2, trainer)
    norm = (_bytes_field(1, b"identity") + _field(3, 0, _varint(int(add_dummy_prefix))) + _field(4, 0, _varint(0))
            + _field(5, 0, _varint(1)))
    out += _bytes_field(3, norm)
    return bytes(out)
