"""Tokenizer parity with llama.cpp.

Three independent references: llama.cpp's own test vectors (models/ggml-vocab-*.gguf.inp/.out,
the expected ids of tests/test-tokenizer-0, which tokenizes without BOS and without parsing
special tokens), llama.cpp itself through llama-cpp-python on hypothesis-generated text, and a
ChatML conversation written out by hand for the SmolLM2 chat template.
"""

from __future__ import annotations

import ctypes
import pathlib

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ci_skips import oracle_import
from refinfer.gguf_file import GGUFFile
from refinfer.tokenizer import Tokenizer
from refinfer.tokenizer.chat import ChatTemplate

# Every vocabulary shipped with llama.cpp's tokenizer tests (in the pinned llama-cpp-python
# sdist): each must load in refinfer and in llama.cpp; a failure to load is a failure.
VOCABS = ["aquila", "baichuan", "bert-bge", "command-r", "deepseek-coder", "deepseek-llm", "falcon",
          "gemma-4", "gpt-2", "gpt-neox", "llama-bpe", "llama-spm", "mpt", "nomic-bert-moe", "phi-3",
          "qwen2", "qwen35", "refact", "starcoder"]

# the vocabularies for which llama.cpp ships no .inp/.out test vectors; every other one has them
NO_VECTORS = {"aquila", "baichuan", "gpt-neox", "nomic-bert-moe"}

SEPARATOR = "\n__ggml_vocab_test__\n"

# Texts run on every vocabulary before the random ones: where llama_detokenize's clean-up of
# spaces before punctuation and contractions (clean_spaces: " ," -> ",", " 's" -> "'s", " 't"
# kept) shows, and the digit, CJK and emoji splits, which differ between pre-tokenizers.
EXAMPLES = [" ,", " .", " ?", " !", " 's", " 'm", " 're", " 've", " 't", " 'd", " 'll", " ' ", "Hello , world .",
            "It 's 3 o 'clock , isn 't it ? Yes !", "a , b . c ! d ? e ' f", "1234567890", "3.14159 , 2 . 1e-3",
            " 12 345 6789", "\u4e2d\u6587 , \u65e5\u672c\u8a9e \u3002", "\ud55c\uad6d\uc5b4 !",
            "\U0001f999 .", "\U0001f468\u200d\U0001f469 , ok", "\u2764\ufe0f !"]


class Subject:
    """A vocabulary file, refinfer's tokenizer for it and llama.cpp's (vocab_only)."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        assert path.exists(), f"{path.name} is missing from {path.parent}"
        self.tok = Tokenizer.from_gguf_metadata(GGUFFile(path).metadata)
        llama_cpp = oracle_import("llama_cpp")
        self.llama = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)

    def close(self):
        # Explicitly: at interpreter exit llama-cpp-python's finalizers fail noisily.
        self.llama.close()


# Module-scoped and parametrized: pytest runs every test of one vocabulary before building the
# next, so only one pair of (large) tokenizers is alive at a time.
@pytest.fixture(scope="module", params=VOCABS)
def subject(request, vocab_dir):
    s = Subject(vocab_dir / f"ggml-vocab-{request.param}.gguf")
    yield s
    s.close()


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    s = Subject(pathlib.Path(smollm2_path))
    yield s
    s.close()


def _read_vectors(inp: pathlib.Path, out: pathlib.Path) -> list[tuple[str, list[int]]]:
    # test-tokenizer-0's read_tests: inputs split at the separator (a trailing one ends the list),
    # one line of space-separated ids per input.
    raw = inp.read_bytes().decode("utf-8")
    cases, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(SEPARATOR, pos)
        if nxt < 0:
            cases.append(raw[pos:])
            break
        cases.append(raw[pos:nxt])
        pos = nxt + len(SEPARATOR)
    lines = out.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    assert len(cases) == len(lines), f"{inp.name}: {len(cases)} inputs but {len(lines)} expected outputs"
    return [(text, [int(t) for t in line.split()]) for text, line in zip(cases, lines)]


def test_llama_cpp_vectors(subject):
    path, tok = subject.path, subject.tok
    inp, out = path.with_name(path.name + ".inp"), path.with_name(path.name + ".out")
    if path.name.removeprefix("ggml-vocab-").removesuffix(".gguf") in NO_VECTORS:
        assert not inp.exists(), f"llama.cpp now ships test vectors for {path.name}: remove it from NO_VECTORS"
        pytest.skip(f"llama.cpp ships no test vectors for {path.name}")
    assert inp.exists() and out.exists(), f"no test vectors {inp.name} / {out.name}"
    vectors = _read_vectors(inp, out)
    failures = [(text, ids, tok.encode(text, add_special=False)) for text, ids in vectors
                if tok.encode(text, add_special=False) != ids]
    assert not failures, (f"{len(failures)}/{len(vectors)} vectors differ, first: text {failures[0][0]!r} "
                          f"expected {failures[0][1]} got {failures[0][2]}")


# ---- hypothesis against llama.cpp ---------------------------------------------------------------

_FRAGMENTS = [" ,", " .", " ?", " !", " 's", " 'm", " 're", " 've", " 't", " ' ", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'RE", "'Ve", " ", "  ", "   ", "\t",
              "\n", "\n\n", " \n", "\r\n", "\u00a0", "\u3000", "\u2003", "12", "123", "1234567", "3.14",
              " Hello", "world", "Üb", "na\u00efve", "e\u0301", "\u0416\u0438", "\u4e2d\u6587", "\ud55c\uad6d",
              "\u0e01\u0e32", "\u0905\u0902", "\U0001f999", "\U0001f468\u200d\U0001f469", "\u2764\ufe0f",
              "...", "!?", " (", ")", "<", ">", "|", "`", "$", "~", "^", "=", "_", "\\", "/", "#", "@",
              # classes that llama.cpp's tables decide: letters and digits new in Unicode 15 (unassigned
              # in older unicodedata), unassigned, private use, other numbers, marks, odd spaces
              "\U00011f04", "\U0001e4d0", "\U0001e4f0", "\U00031350", "\u0378", "\ue000", "\u00b2", "\u2160",
              "\u0300", "\u200d", "\u0085", "\u2028", "\u180e", "\u00ad", "\u212a", "\u0130"]


def _texts(tok: Tokenizer):
    specials = [tok.tokens[i] for i in tok._special_order[:64]]
    parts = [st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=4),
             st.sampled_from(_FRAGMENTS),
             st.sampled_from("abcxyzABCXYZ0123456789 \n")]
    if specials:
        parts.append(st.sampled_from(specials))
    return st.lists(st.one_of(*parts), max_size=24).map("".join)


def _oracle_pieces(llama, ids, special: bool) -> bytes:
    import llama_cpp
    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    buf = ctypes.create_string_buffer(1024)
    out = []
    for t in ids:
        n = llama_cpp.llama_token_to_piece(vocab, t, buf, 1024, 0, special)
        out.append(buf.raw[:n])
    return b"".join(out)


def _oracle_detokenize(llama, ids, remove_special: bool, unparse_special: bool) -> bytes:
    import llama_cpp
    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    size = 64 + 64 * len(ids)
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, remove_special, unparse_special)
    assert n >= 0
    return buf.raw[:n]


def check_text(subject: Subject, text: str, add_special: bool, parse_special: bool, skip_special: bool,
               remove_special: bool, unparse: bool):
    """encode, decode and detokenize of text, each against llama.cpp."""
    tok, llama = subject.tok, subject.llama
    expected = llama.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)
    ids = tok.encode(text, add_special=add_special, parse_special=parse_special)
    assert ids == expected, f"{subject.path.name}: encode {text!r}"

    # decode: llama-cpp-python's Llama.detokenize (pieces joined, one leading space dropped after
    # BOS). Its 32-byte piece buffer truncates long pieces, so the same rule is applied to pieces
    # read with a large buffer when a piece is longer than that.
    want = _oracle_pieces(llama, ids, not skip_special)
    if ids and ids[0] == llama.token_bos() and want[:1] == b" ":
        want = want[1:]
    if all(len(tok.token_to_piece(t)) <= 32 for t in ids):
        assert llama.detokenize(ids, special=not skip_special) == want
    assert tok.decode_bytes(ids, skip_special=skip_special) == want, f"{subject.path.name}: decode {text!r}"

    # llama_detokenize itself: prefix-space removal and the clean-up of spaces around punctuation.
    assert tok.detokenize(ids, remove_special, unparse) == _oracle_detokenize(llama, ids, remove_special, unparse), \
        f"{subject.path.name}: detokenize {text!r} (remove_special={remove_special}, unparse={unparse})"


def check_examples(subject: Subject):
    # every flag once on and once off, and both settings of llama_detokenize's remove_special
    for text in EXAMPLES:
        check_text(subject, text, False, False, False, False, False)
        check_text(subject, text, True, True, True, True, True)


def _check_against_llama(subject: Subject, data):
    text = data.draw(_texts(subject.tok), label="text")
    flags = [data.draw(st.booleans(), label=label)
             for label in ("add_special", "parse_special", "skip_special", "remove_special", "unparse")]
    check_text(subject, text, *flags)


_HYPOTHESIS = settings(max_examples=25, deadline=None, derandomize=True,
                       suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def test_examples_match_llama_cpp(subject):
    check_examples(subject)


def test_smollm2_examples_match_llama_cpp(smollm2):
    check_examples(smollm2)


@_HYPOTHESIS
@given(data=st.data())
def test_matches_llama_cpp(subject, data):
    _check_against_llama(subject, data)


@_HYPOTHESIS
@given(data=st.data())
def test_smollm2_matches_llama_cpp(smollm2, data):
    _check_against_llama(smollm2, data)


def test_special_tokens_match_llama_cpp(subject):
    import llama_cpp
    tok = subject.tok
    vocab = llama_cpp.llama_model_get_vocab(subject.llama.model)
    assert tok.n_vocab == llama_cpp.llama_vocab_n_tokens(vocab)
    assert (tok.bos_id, tok.eos_id) == tuple(None if i < 0 else i for i in (llama_cpp.llama_vocab_bos(vocab),
                                                                          llama_cpp.llama_vocab_eos(vocab)))
    assert (tok.add_bos, tok.add_eos) == (llama_cpp.llama_vocab_get_add_bos(vocab),
                                          llama_cpp.llama_vocab_get_add_eos(vocab))
    assert tok.eog_ids == {i for i in range(tok.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    found_by_text = {"eot": llama_cpp.llama_vocab_eot, "fim_pre": llama_cpp.llama_vocab_fim_pre,
                     "fim_suf": llama_cpp.llama_vocab_fim_suf, "fim_mid": llama_cpp.llama_vocab_fim_mid,
                     "fim_pad": llama_cpp.llama_vocab_fim_pad, "fim_rep": llama_cpp.llama_vocab_fim_rep,
                     "fim_sep": llama_cpp.llama_vocab_fim_sep}
    for name, get in found_by_text.items():
        assert tok.special_ids[name] == (None if get(vocab) < 0 else get(vocab)), name
    assert all(tok.is_control(i) == bool(llama_cpp.llama_vocab_is_control(vocab, i)) for i in range(tok.n_vocab))


def test_pieces_match_llama_cpp(subject):
    # token_to_piece: every token that is not a plain one (byte, control, user-defined, unused,
    # unknown) and every 7th of the others.
    from refinfer.tokenizer.vocab import ATTR_NORMAL
    tok, llama = subject.tok, subject.llama
    ids = [i for i in range(tok.n_vocab) if tok.attrs[i] != ATTR_NORMAL or i % 7 == 0]
    for special in (True, False):
        assert [tok.token_to_piece(i, special=special) for i in ids] == \
            [_oracle_pieces(llama, [i], special) for i in ids]


def test_smollm2_properties(smollm2):
    tok = smollm2.tok
    assert (tok.model, tok.pre) == ("gpt2", "smollm")
    assert tok.tokens[tok.eos_id] == "<|im_end|>"
    # Found by text: llama.cpp's pick among <|endoftext|> and <|im_end|> follows its hash-map order
    # (it reports <|endoftext|>); refinfer takes the first of llama.cpp's list.
    assert tok.tokens[tok.eot_id] == "<|im_end|>"
    assert tok.is_eog(tok.token_to_id["<|im_end|>"]) and tok.is_eog(tok.token_to_id["<|endoftext|>"])
    assert not tok.add_bos
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>", parse_special=True)
    assert ids[0] == tok.token_to_id["<|im_start|>"] and ids[-1] == tok.token_to_id["<|im_end|>"]
    assert tok.decode(ids) == "<|im_start|>user\nHi<|im_end|>"
    assert tok.decode(ids, skip_special=True) == "user\nHi"


# ---- chat template ------------------------------------------------------------------------------

def test_smollm2_chat_template(smollm2):
    metadata = GGUFFile(smollm2.path).metadata
    tok = smollm2.tok
    template = ChatTemplate.from_gguf_metadata(metadata, tok)
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    assert template.render(conversation, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Without a system message the template inserts SmolLM's default one.
    assert template.render([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
    )
    rendered = template.render(conversation, add_generation_prompt=True)
    ids = tok.encode(rendered, add_special=True, parse_special=True)
    assert ids == smollm2.llama.tokenize(rendered.encode("utf-8"), add_bos=True, special=True)
    assert ids.count(tok.token_to_id["<|im_start|>"]) == 5
