"""Tokenizers of Hugging Face checkpoint directories, through the GGUF metadata they convert to.

llama.cpp's convert_hf_to_gguf.py turns tokenizer.json (byte-level BPE) or tokenizer.model
(SentencePiece) into tokenizer.ggml.* keys; a GGUF made from the directory then tokenizes
exactly as the Tokenizer built from those keys. Building the same keys here means an HF
directory and its GGUF conversion give the same ids, by construction.

tokenizer.json: model.vocab, model.merges and added_tokens give tokens, merges and token types
(special added tokens are control tokens, the other added ones user-defined). The
pre-tokenizer is recognized by its structure: a Split on the Llama-3 or Qwen2 regex, Digits
then ByteLevel (SmolLM, StarCoder), or a plain ByteLevel (GPT-2). tokenizer_config.json gives
bos/eos, add_bos_token/add_eos_token and chat_template; a TemplateProcessing post-processor
that starts with the BOS token also means add_bos.

tokenizer.model: read with sentencepiece for pieces, scores and piece types; the
normalizer's add_dummy_prefix (the leading-space rule) is read from the model proto directly.
"""

from __future__ import annotations

import json
import os

from ..errors import FormatError, UnsupportedError
from .vocab import (TYPE_BYTE, TYPE_CONTROL, TYPE_NORMAL, TYPE_UNKNOWN, TYPE_UNUSED, TYPE_USER_DEFINED,
                    Tokenizer)

_LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise FormatError(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}", file=path, offset=e.pos) from None
    except OSError as e:
        raise FormatError(f"cannot read: {e.strerror or e}", file=path) from None


def _token_text(value):
    # tokenizer_config.json writes special tokens as strings or as {"content": ...} objects.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pre_from_pre_tokenizer(pre: dict | None, path: str) -> str:
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    regexes = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    if kinds == ["Split", "ByteLevel"] and regexes == [_LLAMA3_REGEX]:
        return "llama-bpe"
    if kinds == ["Split", "ByteLevel"] and regexes == [_QWEN2_REGEX]:
        return "qwen2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    raise UnsupportedError(f"{path}: pre_tokenizer {json.dumps(pre)[:300]} is not one refinfer recognizes "
                           f"(Llama-3 or Qwen2 Split + ByteLevel, Digits + ByteLevel, or ByteLevel)")


def _looks_special(text: str) -> bool:
    # convert_hf_to_gguf's does_token_look_special, for added tokens not flagged special.
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") \
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))


def _bpe_metadata(directory: str) -> dict:
    path = os.path.join(directory, "tokenizer.json")
    tj = _read_json(path)
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedError(f"{path}: model type {model.get('type')!r}; only byte-level BPE is implemented "
                               f"for tokenizer.json (SentencePiece models need tokenizer.model)")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise FormatError("model.vocab is not an object", file=path)
    added = {t["content"]: t for t in tj.get("added_tokens", []) if isinstance(t, dict) and "content" in t}
    ids = {**vocab, **{text: t["id"] for text, t in added.items()}}
    if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids.values()):
        raise FormatError("token ids must be non-negative integers", file=path)
    n = max(ids.values()) + 1
    if n > 10 * len(ids) + 1000:
        raise FormatError(f"largest token id {n - 1} is far beyond the {len(ids)} tokens listed", file=path)
    tokens = [f"[PAD{i}]" for i in range(n)]  # ids nothing names, as convert_hf_to_gguf fills them
    types = [TYPE_UNUSED] * n
    for text, i in ids.items():
        tokens[i] = text
        if text in added:
            special = added[text].get("special") or _looks_special(text)
            types[i] = TYPE_CONTROL if special else TYPE_USER_DEFINED
        else:
            types[i] = TYPE_NORMAL
    merges = []
    for m in model.get("merges", []):
        if isinstance(m, str):
            merges.append(m)
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
            merges.append(f"{m[0]} {m[1]}")
        else:
            raise FormatError(f"merge {m!r} is neither 'a b' nor ['a', 'b']", file=path)

    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": _pre_from_pre_tokenizer(tj.get("pre_tokenizer"), path),
          "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}
    post = tj.get("post_processor") or {}
    processors = post.get("processors", [post])
    for proc in processors:
        if proc.get("type") == "TemplateProcessing":
            single = proc.get("single") or []
            if single and "SpecialToken" in single[0]:
                md["tokenizer.ggml.add_bos_token"] = True
                md["tokenizer.ggml.bos_token_id"] = ids.get(single[0]["SpecialToken"]["id"])
            if len(single) > 1 and "SpecialToken" in single[-1]:
                md["tokenizer.ggml.add_eos_token"] = True
                md["tokenizer.ggml.eos_token_id"] = ids.get(single[-1]["SpecialToken"]["id"])
    md = {k: v for k, v in md.items() if v is not None}
    return _with_config(md, directory, ids)


def _with_config(md: dict, directory: str, ids: dict) -> dict:
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.exists(path):
        return md
    cfg = _read_json(path)
    for name in ("bos", "eos", "unk", "pad"):
        text = _token_text(cfg.get(f"{name}_token"))
        if text is not None and text in ids:
            key = "unknown" if name == "unk" else "padding" if name == "pad" else name
            md[f"tokenizer.ggml.{key}_token_id"] = ids[text]
    for name in ("add_bos_token", "add_eos_token"):
        if isinstance(cfg.get(name), bool):
            md[f"tokenizer.ggml.{name}"] = cfg[name]
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: llama.cpp's converter keeps the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if isinstance(template, str):
        md["tokenizer.chat_template"] = template
    return md


# ---- tokenizer.model ------------------------------------------------------------------------

def _varint(buf: bytes, pos: int, path: str) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise FormatError("truncated protobuf varint", file=path, offset=pos)
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _proto_fields(buf: bytes, path: str):
    """(field number, wire type, value) of one protobuf message; value is bytes for wire type 2."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos, path)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, path)
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            if pos + size > len(buf):
                raise FormatError("truncated protobuf field", file=path, offset=pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(buf, pos, path)
            if pos + size > len(buf):
                raise FormatError(f"protobuf field {field} of {size} bytes runs past the end", file=path, offset=pos)
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise FormatError(f"protobuf wire type {wire} is not supported", file=path, offset=pos)
        yield field, wire, value


def _add_dummy_prefix(model_bytes: bytes, path: str) -> bool:
    # ModelProto.normalizer_spec (field 3) -> NormalizerSpec.add_dummy_prefix (field 3), default true.
    result = True
    for field, wire, value in _proto_fields(model_bytes, path):
        if field == 3 and wire == 2:
            for f2, w2, v2 in _proto_fields(value, path):
                if f2 == 3 and w2 == 0:
                    result = bool(v2)
    return result


def _spm_metadata(directory: str) -> dict:
    import sentencepiece

    path = os.path.join(directory, "tokenizer.model")
    with open(path, "rb") as f:
        model_bytes = f.read()
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model_bytes)
    except (RuntimeError, OSError) as e:
        raise FormatError(f"sentencepiece cannot load it: {e}", file=path) from None
    tokens, scores, types = [], [], []
    for i in range(sp.GetPieceSize()):
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        types.append(TYPE_UNKNOWN if sp.IsUnknown(i) else TYPE_CONTROL if sp.IsControl(i) else
                     TYPE_UNUSED if sp.IsUnused(i) else TYPE_BYTE if sp.IsByte(i) else TYPE_NORMAL)
    ids = {t: i for i, t in enumerate(tokens)}
    # Added tokens past the SentencePiece vocabulary (tokenizer.json or added_tokens.json).
    extra = {}
    tj_path = os.path.join(directory, "tokenizer.json")
    if os.path.exists(tj_path):
        for t in _read_json(tj_path).get("added_tokens", []):
            if isinstance(t, dict) and isinstance(t.get("id"), int) and t["id"] >= len(tokens):
                extra[t["id"]] = (t.get("content", ""), bool(t.get("special")))
    at_path = os.path.join(directory, "added_tokens.json")
    if os.path.exists(at_path):
        for text, i in _read_json(at_path).items():
            if isinstance(i, int) and i >= len(tokens) and i not in extra:
                extra[i] = (text, True)
    if extra:
        n = max(extra) + 1
        if n > len(tokens) + 100_000:
            raise FormatError(f"added token id {n - 1} is far beyond the vocabulary", file=tj_path)
        for i in range(len(tokens), n):
            text, special = extra.get(i, (f"[PAD{i}]", False))
            tokens.append(text)
            scores.append(-1000.0)
            types.append(TYPE_CONTROL if special else TYPE_USER_DEFINED)
            ids[text] = i
    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
          "tokenizer.ggml.token_type": types,
          "tokenizer.ggml.add_space_prefix": _add_dummy_prefix(model_bytes, path)}
    for name, value in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unknown", sp.unk_id()), ("padding", sp.pad_id())):
        if value >= 0:
            md[f"tokenizer.ggml.{name}_token_id"] = value
    return _with_config(md, directory, ids)


def metadata_from_hf_dir(directory) -> dict:
    """The tokenizer.* GGUF metadata of an HF checkpoint directory's tokenizer."""
    directory = os.fspath(directory)
    if os.path.exists(os.path.join(directory, "tokenizer.model")):
        return _spm_metadata(directory)
    if os.path.exists(os.path.join(directory, "tokenizer.json")):
        return _bpe_metadata(directory)
    raise FormatError("no tokenizer.json or tokenizer.model in the directory", file=directory)


def tokenizer_from_hf_dir(directory) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(metadata_from_hf_dir(directory))
