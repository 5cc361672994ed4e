"""Tokenizer built from GGUF tokenizer.ggml.* metadata, token for token equal to llama.cpp.

Each step names the llama.cpp function it mirrors (src/llama-vocab.cpp): llama_vocab::impl::load
for the defaults and the special-token bookkeeping, tokenizer_st_partition for special tokens in
the text, llm_tokenizer_{spm,bpe,wpm,ugm}_session for the algorithms, token_to_piece and
detokenize for the way back.

Where llama.cpp's result depends on hash-map iteration or an unstable sort, a fixed rule is used
instead and said so: the EOT/EOM/FIM tokens found by their text (first in llama.cpp's list), the order
of special tokens of equal length (lowest id first).
"""

from __future__ import annotations

import heapq
import unicodedata

from ..errors import FormatError, RefinferError, UnsupportedError
from . import pretokenize
from .ugm import Unigram
from ._unicode import (BYTE_TO_UNICODE, CONTROL, MARK, PUNCTUATION, SYMBOL, UNICODE_TO_BYTE, WHITESPACE, cpt_flags,
                       simple_lower)

# GGUF tokenizer.ggml.token_type values (llama_token_type).
TYPE_UNDEFINED, TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED, TYPE_UNUSED, TYPE_BYTE = range(7)

# llama_token_attr bits.
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8

_ATTR_OF_TYPE = {TYPE_UNDEFINED: ATTR_UNDEFINED, TYPE_NORMAL: ATTR_NORMAL, TYPE_UNKNOWN: ATTR_UNKNOWN,
                 TYPE_CONTROL: ATTR_CONTROL, TYPE_USER_DEFINED: ATTR_USER_DEFINED,
                 TYPE_UNUSED: ATTR_UNUSED, TYPE_BYTE: ATTR_BYTE}

SPACE_MARK = "\u2581"  # SentencePiece's visible space

# Token texts llama.cpp recognizes when the metadata names no id (llama_vocab::impl::load).
_EOT_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>")
_EOM_NAMES = ("<|eom_id|>",)
_FIM_NAMES = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>",
                "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>",
                "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>",
                "\u2581<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_EOG_NAMES = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
))

_SPECIAL_ID_KEYS = (
    ("bos", "tokenizer.ggml.bos_token_id"), ("eos", "tokenizer.ggml.eos_token_id"),
    ("eot", "tokenizer.ggml.eot_token_id"), ("eom", "tokenizer.ggml.eom_token_id"),
    ("unk", "tokenizer.ggml.unknown_token_id"), ("sep", "tokenizer.ggml.seperator_token_id"),
    ("pad", "tokenizer.ggml.padding_token_id"), ("mask", "tokenizer.ggml.mask_token_id"),
    ("fim_pre", "tokenizer.ggml.fim_pre_token_id"), ("fim_suf", "tokenizer.ggml.fim_suf_token_id"),
    ("fim_mid", "tokenizer.ggml.fim_mid_token_id"), ("fim_pad", "tokenizer.ggml.fim_pad_token_id"),
    ("fim_rep", "tokenizer.ggml.fim_rep_token_id"), ("fim_sep", "tokenizer.ggml.fim_sep_token_id"),
    ("fim_pre", "tokenizer.ggml.prefix_token_id"), ("fim_suf", "tokenizer.ggml.suffix_token_id"),
    ("fim_mid", "tokenizer.ggml.middle_token_id"),
)

_C_SPACE = " \t\n\v\f\r"  # C isspace() in the C locale


def _get(metadata: dict, key: str, kind, default=None, required=False):
    if key not in metadata:
        if required:
            raise FormatError(f"metadata key {key!r} is missing; a tokenizer needs it")
        return default
    value = metadata[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise FormatError(f"metadata key {key!r} has a value of type {type(value).__name__}, expected {names}")
    return value


def _get_list(metadata: dict, key: str, kind, n_min: int | None = None, required=False):
    values = _get(metadata, key, (list, tuple), required=required)
    if values is None:
        return None
    if n_min is not None and len(values) < n_min:
        raise FormatError(f"metadata key {key!r} has {len(values)} entries, expected at least {n_min} "
                          f"(one per token)")
    for i, v in enumerate(values):
        if not isinstance(v, kind) or isinstance(v, bool):
            raise FormatError(f"metadata key {key!r}: entry {i} is {type(v).__name__} {v!r}, "
                              f"expected {kind if isinstance(kind, tuple) else kind.__name__}")
    return values


class Tokenizer:
    """llama.cpp's tokenizer for tokenizer.ggml.model "llama" (SentencePiece BPE), "gpt2" and
    "gemma4" (BPE), "bert" (WordPiece) and "t5" (Unigram)."""

    def __init__(self, metadata: dict):
        self._load(metadata)

    @classmethod
    def from_gguf_metadata(cls, metadata: dict) -> "Tokenizer":
        return cls(metadata)

    # ---- loading: llama_vocab::impl::load -------------------------------------------------

    def _load(self, md: dict):
        model = _get(md, "tokenizer.ggml.model", str, required=True)
        pre = _get(md, "tokenizer.ggml.pre", str)
        ids = {name: None for name, _ in _SPECIAL_ID_KEYS}
        self.add_bos = False
        self.add_eos = False
        self.add_space_prefix = False
        self.clean_spaces = False
        self.escape_whitespaces = True
        self.byte_encode = True
        self.ignore_merges = False
        self.regexes: list[str] = []
        self.pre_family = None
        if model == "llama":
            self.kind = "spm"
            ids.update(bos=1, eos=2, unk=0)
            self.add_space_prefix = True
            self.add_bos = True
            pre = "default" if pre is None else pre
        elif model == "bert":
            self.kind = "wpm"
            ids.update(bos=101, unk=100, sep=102, pad=0, mask=103)
            self.clean_spaces = True
            self.add_bos = True
            pre = "default" if pre is None else pre
        elif model == "t5":
            self.kind = "ugm"
            ids.update(eos=1, unk=2, pad=0)
            self.add_eos = True
            pre = "default" if pre is None else pre
        elif model in ("gpt2", "gemma4"):
            self.kind = "bpe"
            if model == "gemma4":
                pre = "gemma4"
            else:
                ids.update(bos=11, eos=11)
            if pre is None:
                pre = "default"  # llama.cpp warns that quality is degraded, and uses this
            family, flags = pretokenize.pre_type(pre)
            self.pre_family = family
            self.regexes = pretokenize.REGEXES[family]
            self.escape_whitespaces = False
            self.clean_spaces = True
            for name, value in flags.items():
                if name == "no_bos":
                    ids["bos"] = None  # ChatGLM: no BOS unless the metadata names one
                else:
                    setattr(self, name, value)
        else:
            raise UnsupportedError(
                f"metadata key 'tokenizer.ggml.model' is {model!r}; implemented: 'llama' (SentencePiece BPE), "
                f"'gpt2' (byte-level BPE), 'gemma4', 'bert' (WordPiece), 't5' (Unigram)")
        self.model, self.pre = model, pre
        self.chat_template = _get(md, "tokenizer.chat_template", str)
        self.add_space_prefix = _get(md, "tokenizer.ggml.add_space_prefix", bool, self.add_space_prefix)

        tokens = _get_list(md, "tokenizer.ggml.tokens", str, required=True)
        n = len(tokens)
        if n == 0:
            raise FormatError("metadata key 'tokenizer.ggml.tokens' is an empty list")
        scores = _get_list(md, "tokenizer.ggml.scores", (int, float), n)
        types = _get_list(md, "tokenizer.ggml.token_type", int, n)

        self.tokens: list[str] = []
        self.token_to_id: dict[str, int] = {}
        self.scores: list[float] = []
        self.attrs: list[int] = []
        for i in range(n):
            text = tokens[i] or f"[EMPTY_{i}]"  # llama.cpp renames empty tokens the same way
            self.tokens.append(text)
            self.token_to_id[text] = i  # a duplicated text maps to its last id, as in llama.cpp
            self.scores.append(float(scores[i]) if scores is not None else 0.0)
            self.attrs.append(_ATTR_OF_TYPE.get(types[i], ATTR_UNDEFINED) if types is not None else ATTR_NORMAL)

        self.ranks: dict[tuple[str, str], int] = {}
        if self.kind == "bpe":
            # Kimi-K2 files may come without merges (llama.cpp then merges nothing)
            merges = _get_list(md, "tokenizer.ggml.merges", str, required=pre != "kimi-k2") or []
            for rank, merge in enumerate(merges):
                # llama.cpp splits at the first space after the first byte; emplace keeps the
                # first rank of a repeated pair.
                pos = merge.find(" ", 1)
                pair = (merge[:pos], merge[pos + 1:]) if pos >= 0 else ("", "")
                self.ranks.setdefault(pair, rank)

        # Special ids: a default outside the vocabulary is dropped; a metadata id outside it is
        # ignored (llama.cpp warns and keeps the default).
        for name in ids:
            if ids[name] is not None and ids[name] >= n:
                ids[name] = None
        for name, key in _SPECIAL_ID_KEYS:
            value = _get(md, key, int)
            if value is not None and 0 <= value < n:
                ids[name] = value

        # BertNormalizer options (WordPiece only); strip_accents defaults to lowercase.
        self.lowercase = _get(md, "tokenizer.ggml.normalizer.lowercase", bool, True)
        self.strip_accents = _get(md, "tokenizer.ggml.normalizer.strip_accents", bool, self.lowercase)
        self.add_bos = _get(md, "tokenizer.ggml.add_bos_token", bool, self.add_bos)
        self.add_eos = _get(md, "tokenizer.ggml.add_eos_token", bool, self.add_eos)
        if self.pre_family == "gemma4":
            self.add_bos = True  # llama.cpp overrides a false add_bos_token for Gemma 4

        # Auto-detection by text. llama.cpp walks an unordered_map, so when several texts of a
        # list are present the one it picks depends on hashing; here the first of the list wins
        # (Llama 3, Qwen2 and Phi-3 get llama.cpp's choice; SmolLM2 gets <|im_end|> where
        # llama.cpp happens to pick <|endoftext|>).
        def detect(name, names):
            if ids[name] is not None:
                return
            for text in names:
                if text in self.token_to_id:
                    ids[name] = self.token_to_id[text]
                    self.attrs[ids[name]] |= ATTR_CONTROL
                    return

        detect("eot", _EOT_NAMES)
        detect("eom", _EOM_NAMES)
        for name, names in _FIM_NAMES.items():
            detect(name, names)

        # Control tokens named "...unused..." are unused (llama.cpp: "auto-detect unused tokens").
        for i, text in enumerate(self.tokens):
            if self.attrs[i] & ATTR_CONTROL and "unused" in text:
                self.attrs[i] |= ATTR_UNUSED

        eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids[k] is not None}
        for text, i in self.token_to_id.items():
            if text in _EOG_NAMES:
                eog.add(i)
                self.attrs[i] |= ATTR_CONTROL
        for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):  # gpt-oss
            if text in self.token_to_id:
                self.attrs[self.token_to_id[text]] = ATTR_USER_DEFINED
        eog.update(ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None)
        texts = {self.tokens[i]: i for i in eog}
        if "<|end|>" in texts and (("<|return|>" in texts and "<|call|>" in texts)
                                   or ("<|calls|>" in texts and "<|flush|>" in texts)):
            eog.discard(texts["<|end|>"])  # o200k_harmony / solar-open: <|end|> ends a message only
            self.attrs[texts["<|end|>"]] = ATTR_USER_DEFINED
        if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):
            eog.discard(texts["</s>"])
            self.attrs[texts["</s>"]] = ATTR_NORMAL
        self.eog_ids = frozenset(eog)
        self.special_ids = ids

        # Special tokens are matched longest first (tokenizer_st_partition). llama.cpp's
        # std::sort leaves ties in an unspecified order; ties go by id here.
        special = [i for i in range(n) if self.attrs[i] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)]
        special.sort(key=lambda i: -len(self.tokens[i].encode("utf-8")))
        self._special_order = special

        if self.kind == "ugm":
            charsmap = _get_list(md, "tokenizer.ggml.precompiled_charsmap", int)
            self._ugm = Unigram(self.tokens, self.scores, lambda i: self.attrs[i] & ATTR_NORMAL,
                                lambda i: self.attrs[i] & ATTR_USER_DEFINED, lambda i: self.attrs[i] & ATTR_UNUSED,
                                self.unk_id, bytes(x & 0xFF for x in charsmap) if charsmap else None,
                                self.add_space_prefix,
                                _get(md, "tokenizer.ggml.remove_extra_whitespaces", bool, False))

        self._pieces = [self._piece_uncached(i) for i in range(n)]
        self._max_token_chars = max(len(t) for t in self.tokens)

        # Per-model attributes llama.cpp sets by name after building the piece cache.
        name = _get(md, "general.name", str, "").lower()
        arch = _get(md, "general.architecture", str, "")
        if any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or arch in ("nomic-bert-moe", "jina-bert-v3"):
            self._set_attr("<mask>", ATTR_LSTRIP, True)
        elif "phi-3" in name or "phi3" in name:
            for i in special:
                self.attrs[i] |= ATTR_RSTRIP
            self._set_attr("</s>", ATTR_RSTRIP, True)
            for text in ("<unk>", "<s>", "<|endoftext|>"):
                self._set_attr(text, ATTR_RSTRIP, False)
        elif "modern-bert" in name:
            self._set_attr("[MASK]", ATTR_LSTRIP, True)

    def _set_attr(self, text: str, attr: int, value: bool):
        i = self.token_to_id.get(text)
        if i is not None:
            self.attrs[i] = self.attrs[i] | attr if value else self.attrs[i] & ~attr

    # ---- properties ------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    @property
    def bos_id(self) -> int | None:
        return self.special_ids["bos"]

    @property
    def eos_id(self) -> int | None:
        return self.special_ids["eos"]

    @property
    def eot_id(self) -> int | None:
        return self.special_ids["eot"]

    @property
    def unk_id(self) -> int | None:
        return self.special_ids["unk"]

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eog_ids

    def is_control(self, token_id: int) -> bool:
        return bool(self.attrs[token_id] & ATTR_CONTROL)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **variables) -> str:
        """Render tokenizer.chat_template (see chat.py); encode the result with parse_special=True."""
        from .chat import ChatTemplate
        if self.chat_template is None:
            raise RefinferError("this model has no chat template (metadata key 'tokenizer.chat_template')",
                                hint="prompt it with plain text instead")
        bos = self.tokens[self.bos_id] if self.bos_id is not None else ""
        eos = self.tokens[self.eos_id] if self.eos_id is not None else ""
        return ChatTemplate(self.chat_template, bos, eos).render(messages, add_generation_prompt, **variables)

    def __repr__(self):
        return (f"Tokenizer(model={self.model!r}, pre={self.pre!r}, n_vocab={self.n_vocab}, bos={self.bos_id}, "
                f"eos={self.eos_id}, add_bos={self.add_bos}, add_eos={self.add_eos})")

    # ---- text -> ids: llama_vocab::impl::tokenize --------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise RefinferError(f"encode() takes text as str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RefinferError(f"text has no UTF-8 form: {e.reason} at character {e.start} "
                                f"({text[e.start]!r})") from None
        out: list[int] = []
        fragments = self._partition(text, parse_special) if text else []
        if self.kind == "wpm":
            return self._encode_wpm(text, fragments, add_special)
        if add_special and self.add_bos:
            if self.bos_id is None:
                raise RefinferError("the tokenizer asks for a BOS token but has no bos_token_id")
            out.append(self.bos_id)
        if self.kind == "spm":
            prev_special = True  # a text fragment at the start or after a special token gets the space prefix
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                    continue
                piece = text[frag[0]:frag[0] + frag[1]]
                if self.add_space_prefix and prev_special:
                    piece = " " + piece
                self._spm(piece.replace(" ", SPACE_MARK), out)
                prev_special = False
        else:
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    continue
                piece = text[frag[0]:frag[0] + frag[1]]
                if self.kind == "ugm":
                    self._ugm.tokenize(piece, out)
                    continue
                if self.escape_whitespaces:
                    piece = piece.replace(" ", SPACE_MARK)
                self._bpe(piece, out)
        if add_special and self.add_eos:
            if self.eos_id is None:
                raise RefinferError("the tokenizer asks for an EOS token but has no eos_token_id")
            out.append(self.eos_id)
        return out

    def _encode_wpm(self, text: str, fragments: list, add_special: bool) -> list[int]:
        # WordPiece always frames the text as [CLS] ... [SEP] (BOS and SEP ids) when add_special,
        # whatever add_bos_token says.
        out = []
        if add_special:
            if self.bos_id is None or self.special_ids["sep"] is None:
                raise RefinferError("a WordPiece tokenizer needs bos (CLS) and seperator (SEP) token ids")
            out.append(self.bos_id)
        for frag in fragments:
            if isinstance(frag, int):
                out.append(frag)
            else:
                self._wpm(text[frag[0]:frag[0] + frag[1]], out)
        if add_special:
            out.append(self.special_ids["sep"])
        return out

    def _wpm_words(self, text: str) -> list[str]:
        # llm_tokenizer_wpm_session::preprocess: BERT's basic tokenizer. Split at white space; drop
        # NUL, U+FFFD and control characters (and, with strip_accents, marks after replacing each
        # character by the first code point of its NFD form); punctuation, ASCII symbols and CJK
        # ideographs become one-character words; lowercase.
        words = [""]
        for ch in text:
            cp = ord(ch)
            if self.strip_accents:
                cp = ord(unicodedata.normalize("NFD", ch)[0])
            flags = cpt_flags(cp)
            if flags & WHITESPACE:
                if words[-1]:
                    words.append("")
                continue
            if cp == 0 or cp == 0xFFFD or flags & CONTROL or (self.strip_accents and flags & MARK):
                continue
            c = chr(simple_lower(cp) if self.lowercase else cp)
            if flags & PUNCTUATION or (cp < 0x7F and flags & SYMBOL) or _is_cjk_ideograph(cp):
                if words[-1]:
                    words.append("")
                words[-1] = c
                words.append("")
            else:
                words[-1] += c
        return [w for w in words if w]

    def _wpm(self, text: str, out: list[int]):
        # llm_tokenizer_wpm_session::tokenize: greedy longest match from the left over "▁" + word;
        # a word with any unmatched position becomes the unknown token as a whole.
        for word in self._wpm_words(text):
            word = SPACE_MARK + word
            start = len(out)
            i = 0
            while i < len(word):
                for j in range(min(len(word), i + self._max_token_chars), i, -1):
                    tid = self.token_to_id.get(word[i:j])
                    if tid is not None:
                        out.append(tid)
                        i = j
                        break
                else:
                    del out[start:]
                    break
            if len(out) == start:
                out.append(self.unk_id)

    def _partition(self, text: str, parse_special: bool) -> list:
        # tokenizer_st_partition: fragments are token ids or (offset, length) spans of raw text.
        # Control and unknown tokens are matched only with parse_special; user-defined ones always.
        fragments: list = [(0, len(text))]
        for sid in self._special_order:
            attr = self.attrs[sid]
            if not parse_special and attr & (ATTR_CONTROL | ATTR_UNKNOWN):
                continue
            needle = self.tokens[sid]
            new = []
            for frag in fragments:
                if isinstance(frag, int):
                    new.append(frag)
                    continue
                off, length = frag
                while True:
                    match = text.find(needle, off, off + length)
                    if match < 0:
                        if length > 0:
                            new.append((off, length))
                        break
                    left = match - off
                    if attr & ATTR_LSTRIP:
                        while left > 0 and text[off + left - 1] in _C_SPACE:
                            left -= 1
                    if left > 0:
                        new.append((off, left))
                    new.append(sid)
                    right_off = match + len(needle)
                    right_len = off + length - right_off
                    if attr & ATTR_RSTRIP:
                        while right_len > 0 and text[right_off] in _C_SPACE:
                            right_off += 1
                            right_len -= 1
                    off, length = right_off, right_len
                    if length <= 0:
                        break
            fragments = new
        return fragments

    def _spm(self, text: str, out: list[int]):
        # llm_tokenizer_spm_session::tokenize: start from single characters and repeatedly merge
        # the adjacent pair whose concatenation is the highest-scoring token (ties: leftmost).
        n = len(text)
        if n == 0:
            return
        start = list(range(n))
        size = [1] * n  # characters; 0 once merged into the left neighbour
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap: list = []

        def try_pair(left, right):
            if left == -1 or right == -1:
                return
            tid = self.token_to_id.get(text[start[left]:start[left] + size[left] + size[right]])
            if tid is not None:
                heapq.heappush(heap, (-self.scores[tid], left, right, size[left] + size[right]))

        for i in range(1, n):
            try_pair(i - 1, i)
        while heap:
            _, left, right, total = heapq.heappop(heap)
            if size[left] == 0 or size[right] == 0 or size[left] + size[right] != total:
                continue  # stale: one side changed since the pair was queued
            size[left] += size[right]
            size[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            try_pair(prev[left], left)
            try_pair(left, nxt[left])

        i = 0
        while i != -1:
            piece = text[start[i]:start[i] + size[i]]
            tid = self.token_to_id.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                # resegment(): a symbol that is not a token is a single character (merges only
                # form tokens), emitted as byte-fallback tokens.
                out.extend(self._byte_token(b) for b in piece.encode("utf-8"))
            i = nxt[i]

    def _byte_token(self, byte: int) -> int:
        # llama_vocab::byte_to_token for SPM: <0xXX>, else the byte itself as a token.
        # Where neither exists llama.cpp aborts (token_to_id.at throws); the unknown token is used here.
        tid = self.token_to_id.get(f"<0x{byte:02X}>")
        if tid is None and byte < 0x80:
            tid = self.token_to_id.get(chr(byte))
        if tid is None:
            tid = self.unk_id
        if tid is None:
            raise UnsupportedError(f"byte 0x{byte:02X} has no byte-fallback token <0x{byte:02X}> in the vocabulary "
                                   f"and there is no unknown token")
        return tid

    def _bpe(self, text: str, out: list[int]):
        # llm_tokenizer_bpe_session::tokenize
        for word in pretokenize.split(text, self.regexes):
            if self.byte_encode:
                word = "".join(BYTE_TO_UNICODE[b] for b in word.encode("utf-8"))
            whole = self.token_to_id.get(word)
            if whole is not None and (self.ignore_merges or (self.pre_family == "gemma4" and word.strip("\n") == "")):
                out.append(whole)
                continue
            for piece in self._bpe_merge(word):
                tid = self.token_to_id.get(piece)
                if tid is not None:
                    out.append(tid)
                    continue
                # A symbol that is no token falls back to byte tokens; llama.cpp looks each UTF-8
                # byte of the (byte-encoded) text up as a one-byte string, so only ASCII bytes can
                # be found and the others are dropped.
                for b in piece.encode("utf-8"):
                    if self.byte_encode:
                        tid = self.token_to_id.get(chr(b)) if b < 0x80 else None
                    else:
                        tid = self.token_to_id.get(f"<0x{b:02X}>")
                    if tid is not None:
                        out.append(tid)

    def _bpe_merge(self, word: str) -> list[str]:
        # Merge the adjacent pair of lowest merge rank first (ties: leftmost) until none is left.
        n = len(word)
        start = list(range(n))
        size = [1] * n
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        if n:
            nxt[-1] = -1
        heap: list = []
        ranks = self.ranks

        def add_pair(left, right):
            if left == -1 or right == -1:
                return
            a = word[start[left]:start[left] + size[left]]
            b = word[start[right]:start[right] + size[right]]
            rank = ranks.get((a, b))
            if rank is not None:
                heapq.heappush(heap, (rank, left, right, a + b))

        for i in range(1, n):
            add_pair(i - 1, i)
        while heap:
            _, left, right, joined = heapq.heappop(heap)
            if size[left] == 0 or size[right] == 0:
                continue
            if word[start[left]:start[left] + size[left]] + word[start[right]:start[right] + size[right]] != joined:
                continue  # stale
            size[left] += size[right]
            size[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add_pair(prev[left], left)
            add_pair(left, nxt[left])
        return [word[start[i]:start[i] + size[i]] for i in range(n) if size[i] > 0]

    # ---- ids -> text: token_to_piece, detokenize ---------------------------------------------

    def _piece_uncached(self, tid: int) -> bytes:
        # llama_vocab::impl::token_to_piece with special=true (what llama.cpp caches).
        attr, text = self.attrs[tid], self.tokens[tid]
        if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED):
            return text.encode("utf-8")
        if attr & ATTR_NORMAL:
            if self.kind != "bpe" or self.escape_whitespaces:
                return text.replace(SPACE_MARK, " ").encode("utf-8")
            return _decode_byte_level(text)
        if attr & ATTR_BYTE:
            return bytes([_hex_byte(text)])
        return b""  # undefined or unused tokens render as nothing

    def _check_id(self, tid) -> int:
        if not isinstance(tid, int) or not 0 <= tid < len(self.tokens):
            raise RefinferError(f"token id {tid!r} is outside the vocabulary (0..{len(self.tokens) - 1})")
        return tid

    def token_to_piece(self, token_id: int, special: bool = True, lstrip: int = 0) -> bytes:
        """The bytes of one token; special=False renders control and unknown tokens as nothing.
        lstrip drops up to that many leading spaces (llama_token_to_piece)."""
        self._check_id(token_id)
        if not special and self.attrs[token_id] & (ATTR_UNKNOWN | ATTR_CONTROL):
            return b""
        piece = self._pieces[token_id]
        while lstrip > 0 and piece[:1] == b" ":
            piece = piece[1:]
            lstrip -= 1
        return piece

    def decode_bytes(self, ids, skip_special: bool = False) -> bytes:
        # llama-cpp-python's Llama.detokenize: the pieces joined, and a leading space dropped when
        # the first token is BOS (the space SentencePiece put before the first word).
        out = b"".join(self.token_to_piece(t, special=not skip_special) for t in ids)
        if ids and ids[0] == self.bos_id and out[:1] == b" ":
            out = out[1:]
        return out

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def detokenize(self, ids, remove_special: bool = False, unparse_special: bool = False) -> bytes:
        """llama_detokenize: strips the SentencePiece prefix space and, for most BPE models,
        undoes the tokenizer's spacing around punctuation (clean_up_tokenization_spaces)."""
        ids = list(ids)
        remove_space = self.add_space_prefix
        if remove_special and self.add_bos and ids and ids[0] == self.bos_id:
            remove_space = False
            ids = ids[1:]
        if remove_special and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        parts = []
        for t in ids:
            parts.append(self.token_to_piece(t, special=unparse_special, lstrip=int(remove_space)))
            remove_space = False
        text = bytearray(b"".join(parts))
        if self.clean_spaces:
            text = _clean_spaces(text)
        return bytes(text)


def _is_cjk_ideograph(cp: int) -> bool:
    # BERT's _is_chinese_char ranges; 0x2B920 rather than 0x2B820 as in the HF Rust code.
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B920 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


def _hex_byte(text: str) -> int:
    # token_to_byte: strtol on the two characters after "<0x"; garbage parses as far as it can.
    digits = ""
    for ch in text[3:5]:
        if ch not in "0123456789abcdefABCDEF":
            break
        digits += ch
    return int(digits, 16) if digits else 0


def _decode_byte_level(text: str) -> bytes:
    # llama_decode_text: each character of a byte-level token stands for one byte. A character
    # outside the 256-entry alphabet is rendered as llama.cpp does, "[UNK_BYTE_0x<hex>" + text + "]".
    out = bytearray()
    for ch in text:
        b = UNICODE_TO_BYTE.get(ch)
        if b is not None:
            out.append(b)
        else:
            out += b"[UNK_BYTE_0x" + ch.encode("utf-8").hex().encode() + text.encode("utf-8") + b"]"
    return bytes(out)


def _clean_spaces(t: bytearray) -> bytearray:
    # llama_vocab::impl::detokenize, clean_spaces: three in-place passes over the bytes, kept in
    # llama.cpp's form because each pass reads bytes the previous step may have rewritten.
    total = len(t)
    # " ?", " !", " .", " ," lose their space
    n, total = total, (1 if total else 0)
    for i in range(1, n):
        x = t[i]
        if t[i - 1] == 0x20 and x in b"?!.,":
            total -= 1
        t[total] = x
        total += 1
    # " ' " -> "'"
    n, total = total, (1 if total else 0)
    i = 1
    while i < n:
        x = t[i]
        if x == 0x27 and i + 1 < n and t[i - 1] == 0x20 and t[i + 1] == 0x20:
            total -= 1
            i += 1
            t[i] = 0
        t[total] = x
        total += 1
        i += 1
    # " 's", " 'm", " 're", " 've" lose their space (" 't", " 'd", " 'll" keep it)
    n, total = total, (1 if total else 0)
    for i in range(1, n):
        x = t[i]
        if t[i - 1] == 0x20 and x == 0x27 and i + 1 < n:
            x1 = t[i + 1]
            if x1 in b"sm":
                total -= 1
            elif x1 not in b"td" and i + 2 < n and (x1, t[i + 2]) in ((0x72, 0x65), (0x76, 0x65)):
                total -= 1
        t[total] = x
        total += 1
    return t[:total]
