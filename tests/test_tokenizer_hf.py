"""HF directory tokenizers: tokenizer.json (byte-level BPE) and tokenizer.model (SentencePiece).

No model hub is reachable from CI, so the directories are built here. tokenizer.json files are
written from llama.cpp vocab files in the layout transformers saves (SmolLM-style Digits +
ByteLevel pre-tokenizer; Llama-3-style Split regex with a BOS-adding post-processor) and must
tokenize like llama.cpp on the GGUF they came from. tokenizer.model is trained with
sentencepiece and must segment like sentencepiece itself.
"""

from __future__ import annotations

import json
import pathlib

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ci_skips import oracle_import
from refinfer.errors import FormatError, UnsupportedError
from refinfer.gguf_file import GGUFFile
from refinfer.tokenizer.hf import _LLAMA3_REGEX, metadata_from_hf_dir, tokenizer_from_hf_dir
from refinfer.tokenizer.vocab import TYPE_CONTROL, TYPE_USER_DEFINED

_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])

_TEXT = st.lists(st.one_of(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=3),
                           st.sampled_from(["'s", "'LL", " the", "  ", "\n\n", "123456", "\u00e9t\u00e9", "\U0001f999",
                                            "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"])),
                 max_size=16).map("".join)


def _write_tokenizer_json(directory: pathlib.Path, gguf_path, pre_tokenizer, post_processor=None, config=None):
    md = GGUFFile(gguf_path).metadata
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty not in (TYPE_CONTROL, TYPE_USER_DEFINED)}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": ty == TYPE_CONTROL}
             for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (TYPE_CONTROL, TYPE_USER_DEFINED)]
    merges = [m.split(" ", 1) for m in md["tokenizer.ggml.merges"]]  # the newer [a, b] form
    tj = {"version": "1.0", "added_tokens": added, "normalizer": None, "pre_tokenizer": pre_tokenizer,
          "post_processor": post_processor, "decoder": {"type": "ByteLevel"},
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "fuse_unk": False, "byte_fallback": False,
                    "vocab": vocab, "merges": merges}}
    directory.mkdir(exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return md


@pytest.fixture(scope="module")
def smollm_dir(tmp_path_factory, smollm2_path):
    d = tmp_path_factory.mktemp("smollm_hf")
    md = GGUFFile(smollm2_path).metadata
    pre = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
              "chat_template": md["tokenizer.chat_template"]}
    _write_tokenizer_json(d, smollm2_path, pre, config=config)
    return d


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory, vocab_dir):
    d = tmp_path_factory.mktemp("llama3_hf")
    pre = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    post = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [], "special_tokens": {}}]}
    _write_tokenizer_json(d, vocab_dir / "ggml-vocab-llama-bpe.gguf", pre, post,
                          config={"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
    return d


def _oracle(path):
    llama_cpp = oracle_import("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def test_smollm_tokenizer_json(smollm_dir, smollm2_path):
    tok = tokenizer_from_hf_dir(smollm_dir)
    assert (tok.model, tok.pre, tok.bos_id, tok.eos_id, tok.add_bos) == ("gpt2", "smollm", 1, 2, False)
    llama = _oracle(smollm2_path)
    try:
        @_SETTINGS
        @given(text=_TEXT, parse_special=st.booleans())
        def check(text, parse_special):
            assert tok.encode(text, parse_special=parse_special) == \
                llama.tokenize(text.encode("utf-8"), add_bos=True, special=parse_special)
        check()
    finally:
        llama.close()
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True).endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_llama3_tokenizer_json(llama3_dir, vocab_dir):
    tok = tokenizer_from_hf_dir(llama3_dir)
    assert (tok.pre, tok.add_bos, tok.tokens[tok.bos_id]) == ("llama-bpe", True, "<|begin_of_text|>")
    llama = _oracle(vocab_dir / "ggml-vocab-llama-bpe.gguf")
    try:
        @_SETTINGS
        @given(text=_TEXT, add_special=st.booleans(), parse_special=st.booleans())
        def check(text, add_special, parse_special):
            assert tok.encode(text, add_special=add_special, parse_special=parse_special) == \
                llama.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)
        check()
    finally:
        llama.close()


def test_unrecognized_tokenizer_json(tmp_path, vocab_dir):
    _write_tokenizer_json(tmp_path, vocab_dir / "ggml-vocab-gpt-2.gguf", {"type": "Whitespace"})
    with pytest.raises(UnsupportedError, match="pre_tokenizer"):
        tokenizer_from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(FormatError, match="invalid JSON"):
        tokenizer_from_hf_dir(tmp_path)
    with pytest.raises(FormatError, match="no tokenizer.json or tokenizer.model"):
        metadata_from_hf_dir(tmp_path / "missing")


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    sentencepiece = oracle_import("sentencepiece")
    d = tmp_path_factory.mktemp("spm_hf")
    corpus = d / "corpus.txt"
    lines = ["The quick brown fox jumps over the lazy dog 12345.", "Hello world, how are you today?",
             "llamas and alpacas eat grass in the Andes", "tokenizers split text into pieces"]
    corpus.write_text("\n".join(lines * 40), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "tokenizer"), vocab_size=420, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
        unk_id=0, bos_id=1, eos_id=2)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "add_bos_token": True}), encoding="utf-8")
    return d


def test_sentencepiece_model(spm_dir):
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    tok = tokenizer_from_hf_dir(spm_dir)
    assert (tok.model, tok.n_vocab, tok.bos_id, tok.eos_id, tok.add_bos, tok.add_space_prefix) == \
        ("llama", sp.vocab_size(), 1, 2, True, True)

    @_SETTINGS
    @given(text=st.lists(st.one_of(st.sampled_from(["the", "quick", "llama", "Hello", " ", "  ", ",", ".", "12"]),
                                   st.text(alphabet="abcdefghijklmnopqrstuvwxyz ,.!\u00e9\u4e2d", max_size=6)),
                         min_size=1, max_size=10).map("".join))
    def check(text):
        assert tok.encode(text) == [1] + sp.encode(text)
        assert tok.decode(tok.encode(text), skip_special=True) == text
    check()
