"""Pre-tokenizers that no llama.cpp test vocabulary uses, checked against llama.cpp itself.

Each case rewrites GPT-2's vocabulary file with another tokenizer.ggml.pre (llama.cpp keys the
splitting and the flags on the pre type alone, Gemma-4-style ones included). The vocabulary no
longer suits the pre-tokenizer, but llama.cpp splits, merges and sets flags exactly as for the
real model, so the ids must agree token for token.
"""

from __future__ import annotations

import ctypes
import functools

import gguf
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ci_skips import oracle_import
from refinfer.gguf_file import GGUFFile
from refinfer.tokenizer import Tokenizer
from test_tokenizer import EXAMPLES

# One tokenizer.ggml.pre per regex family or flag combination not covered by a vocab file.
PRES = ["chatglm-bpe", "glm4", "viking", "jais-2", "deepseek-v3", "spark2_5", "youtu", "tekken", "chameleon",
        "gpt-4o", "granite-embed-multi-97m", "bailingmoe", "seed-coder", "ufakzeka", "laguna", "minicpm5",
        "exaone-moe", "sarvam-moe", "granite-embed-multi-311m", "bloom", "poro-chat", "dbrx", "stablelm2", "afmoe",
        "tiny_aya", "superbpe", "kimi-k2"]

_TEXT = st.lists(st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=3),
    st.sampled_from([" ,", " .", " ?", " !", " 's", " 't", " 're", " ' ", "'s", "'LL", "'Re", " Hello", "World", "naïve", "ÉCOLE", "é", "e\u0301", "  ", "   ", "\n", "\r\n",
                     " \n\n", "\t", "1", "12", "1234567", "3.5", "...", "!?", "//", "(x)", "<sentinel:12>",
                     "IMGIMGABZ", "中文", "日本語", "ひらがな", "カタカナ", "한국어", "ㄅㄆ", "！", "“", "，",
                     "\u0905\u0902", "\U0001f999", " " * 70, "<|endoftext|>"])),
    max_size=14).map("".join)


@functools.lru_cache(maxsize=1)
def _fields(path: str):
    reader = gguf.GGUFReader(path)
    out = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        if sub == gguf.GGUFValueType.STRING:
            value = [bytes(field.parts[i]) for i in field.data]
        elif sub is not None:
            value = [field.parts[i].tolist()[0] for i in field.data]
        elif vtype == gguf.GGUFValueType.STRING:
            value = bytes(field.parts[-1])
        else:
            value = field.parts[-1].tolist()[0]
        out.append((key, value, vtype, sub))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    return arch, out


def write_variant(out_dir, base, pre: str):
    """base (a vocabulary GGUF) rewritten with tokenizer.ggml.pre = pre, in out_dir."""
    path = out_dir / f"ggml-vocab-gpt2-{pre}.gguf"
    if not path.exists():
        arch, fields = _fields(str(base))
        w = gguf.GGUFWriter(str(path), arch)
        for key, value, vtype, sub in fields:
            if key == "tokenizer.ggml.pre":
                value = pre.encode()
            w.add_key_value(key, value, vtype, sub_type=sub)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


@pytest.fixture(scope="module")
def variants(tmp_path_factory, vocab_dir):
    out_dir = tmp_path_factory.mktemp("pre_variants")
    return lambda pre: write_variant(out_dir, vocab_dir / "ggml-vocab-gpt-2.gguf", pre)


@pytest.fixture(scope="module")
def base_metadata(vocab_dir):
    return GGUFFile(vocab_dir / "ggml-vocab-gpt-2.gguf").metadata


class PreSubject:
    """refinfer's tokenizer and llama.cpp's (vocab_only) for one pre-tokenizer variant."""

    def __init__(self, path, base_metadata, pre: str):
        self.llama_cpp = oracle_import("llama_cpp")
        self.tok = Tokenizer.from_gguf_metadata({**base_metadata, "tokenizer.ggml.pre": pre})
        assert self.tok.pre == pre
        self.llama = self.llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        self.vocab = self.llama_cpp.llama_model_get_vocab(self.llama.model)

    def check(self, text: str, add_special: bool):
        llama_cpp, tok = self.llama_cpp, self.tok
        ids = tok.encode(text, add_special=add_special, parse_special=True)
        assert ids == self.llama.tokenize(text.encode("utf-8"), add_bos=add_special, special=True), \
            f"{tok.pre}: encode {text!r}"
        # detokenize brings in clean_spaces, which differs between pre-tokenizers
        buf = ctypes.create_string_buffer(64 + 64 * len(ids))
        arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
        n = llama_cpp.llama_detokenize(self.vocab, arr, len(ids), buf, len(buf), False, False)
        assert n >= 0
        assert tok.detokenize(ids) == buf.raw[:n], f"{tok.pre}: detokenize {text!r}"

    def check_examples(self):
        for i, text in enumerate(EXAMPLES):
            self.check(text, add_special=bool(i % 2))

    def close(self):
        self.llama.close()


# max_examples: 27 pre-tokenizers x 30 random texts (about 1 ms each) after the examples
_SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("pre", PRES)
def test_pre_tokenizer_matches_llama_cpp(variants, base_metadata, pre):
    subject = PreSubject(variants(pre), base_metadata, pre)
    try:
        llama_cpp, vocab, tok = subject.llama_cpp, subject.vocab, subject.tok
        bos = llama_cpp.llama_vocab_bos(vocab)
        assert (tok.add_bos, tok.bos_id) == (llama_cpp.llama_vocab_get_add_bos(vocab), None if bos < 0 else bos)
        subject.check_examples()

        @_SETTINGS
        @given(text=_TEXT, add_special=st.booleans())
        def check(text, add_special):
            subject.check(text, add_special)
        check()
    finally:
        subject.close()
