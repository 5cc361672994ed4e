"""Bad tokenizer metadata and bad input give refinfer errors that name the key or value."""

from __future__ import annotations

import re

import pytest

from refinfer.errors import FormatError, RefinferError, UnsupportedError
from refinfer.tokenizer import Tokenizer
from refinfer.tokenizer.chat import ChatTemplate, TemplateRaised, render_chat


def _spm_metadata(**overrides):
    tokens = ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "\u2581a", "ab", "\u2581ab"] + [f"<0x{b:02X}>" for b in range(256)]
    md = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -1.0, -2.0, -2.0, -1.5, -1.0, -0.5] + [0.0] * 256,
        "tokenizer.ggml.token_type": [2, 3, 3, 1, 1, 1, 1, 1, 1] + [6] * 256,
    }
    md.update(overrides)
    return md


def test_small_spm_vocabulary():
    tok = Tokenizer.from_gguf_metadata(_spm_metadata())
    # " ab" -> "▁ab": merges by score, highest first: "ab" (-1.0) before "▁a" (-1.5), then "▁ab".
    assert tok.encode("ab") == [1, 8]
    assert tok.encode("ab", add_special=False) == [8]
    # "c" is no token: byte fallback <0x63>; the prefix space stays a token of its own.
    assert tok.encode("c", add_special=False) == [3, 9 + 0x63]
    assert tok.decode([1, 8], skip_special=True) == "ab"  # the space after BOS is dropped
    assert tok.decode([1, 8]) == "<s> ab"  # ... only when it starts the text
    assert tok.decode([3, 9 + 0x63]) == " c"
    assert tok.detokenize([3, 9 + 0x63]) == b"c"  # llama_detokenize drops the prefix space


def test_spm_without_byte_tokens_uses_unknown():
    md = _spm_metadata()
    md = {k: v[:9] if isinstance(v, list) else v for k, v in md.items()}
    tok = Tokenizer.from_gguf_metadata(md)
    assert tok.encode("ac", add_special=False) == [6, 0]
    del md["tokenizer.ggml.token_type"]
    md["tokenizer.ggml.tokens"] = ["x"] + md["tokenizer.ggml.tokens"][1:]  # no "<unk>"; id 0 stays the default unk
    assert Tokenizer.from_gguf_metadata(md).encode("ac", add_special=False) == [6, 0]


@pytest.mark.parametrize("overrides, error, words", [
    ({"tokenizer.ggml.model": None}, FormatError, "'tokenizer.ggml.model' is missing"),
    ({"tokenizer.ggml.model": "rwkv"}, UnsupportedError, "'rwkv'"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "no-such-pre", "tokenizer.ggml.merges": []},
     UnsupportedError, "'no-such-pre'"),
    ({"tokenizer.ggml.model": "gpt2"}, FormatError, "'tokenizer.ggml.merges' is missing"),
    ({"tokenizer.ggml.scores": [0.0]}, FormatError, "1 entries, expected at least 265"),
    ({"tokenizer.ggml.tokens": "abc"}, FormatError, "expected list/tuple"),
    ({"tokenizer.ggml.tokens": []}, FormatError, "empty list"),
    ({"tokenizer.ggml.token_type": [1.5] * 265}, FormatError, "entry 0 is float"),
    ({"tokenizer.ggml.add_bos_token": 1}, FormatError, "expected bool"),
    ({"tokenizer.ggml.model": "t5", "tokenizer.ggml.precompiled_charsmap": [1, 0]}, FormatError, "4-byte header"),
    ({"tokenizer.ggml.model": "t5", "tokenizer.ggml.precompiled_charsmap": [255, 255, 255, 255, 0]}, FormatError,
     "does not fit"),
])
def test_bad_metadata(overrides, error, words):
    md = _spm_metadata(**overrides)
    for key in [k for k, v in overrides.items() if v is None]:
        del md[key]
    with pytest.raises(error, match=re.escape(words)):
        Tokenizer.from_gguf_metadata(md)


def test_bad_input():
    tok = Tokenizer.from_gguf_metadata(_spm_metadata())
    with pytest.raises(RefinferError, match="no UTF-8 form"):
        tok.encode("a\ud800b")
    with pytest.raises(RefinferError, match="outside the vocabulary"):
        tok.decode([0, 10_000])
    with pytest.raises(RefinferError, match="takes text as str"):
        tok.encode(b"ab")
    with pytest.raises(RefinferError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_named_chat_template():
    md = {"tokenizer.chat_template": "A", "tokenizer.chat_template.tool_use": "B{{ tools | length }}"}
    assert ChatTemplate.from_gguf_metadata(md).render([]) == "A"
    assert ChatTemplate.from_gguf_metadata(md, name="tool_use").render([], tools=[1, 2]) == "B2"
    with pytest.raises(RefinferError, match="'tokenizer.chat_template.rag' is missing") as e:
        ChatTemplate.from_gguf_metadata(md, name="rag")
    assert "tool_use" in e.value.hint


def test_chat_template_errors_and_helpers():
    with pytest.raises(FormatError, match="syntax error"):
        ChatTemplate("{% for m in messages %}")
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok"
    with pytest.raises(TemplateRaised, match="user first"):
        render_chat(strict, [{"role": "system", "content": "x"}])
    # Sandboxed: templates cannot reach Python internals.
    with pytest.raises(RefinferError, match="SecurityError"):
        render_chat("{{ messages.__class__.__mro__ }}", [])
    # trim_blocks/lstrip_blocks as in transformers, bos/eos variables, tojson keeps non-ASCII.
    template = "{{ bos_token }}\n  {% for m in messages %}\n{{ m['content'] | tojson }}\n  {% endfor %}{{ eos_token }}"
    assert render_chat(template, [{"role": "user", "content": "h\u00e9"}], bos_token="<s>", eos_token="</s>") == \
        '<s>\n"h\u00e9"\n</s>'
