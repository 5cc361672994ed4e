"""Unigram (SentencePiece "unigram", tokenizer.ggml.model "t5") as llama.cpp's llm_tokenizer_ugm.

Two steps, both on UTF-8 bytes:

1. normalize: SentencePiece's precompiled normalizer. tokenizer.ggml.precompiled_charsmap holds
   a uint32 blob size, then an XOR-compressed compact double array (XCDA, Kanda 2018) whose
   leaves point into a table of NUL-terminated replacement strings. At each position the
   longest user-defined token is kept as is; otherwise the longest prefix found in the XCDA is
   replaced; otherwise one UTF-8 character is copied. Spaces become U+2581, a space is put in
   front of the text (add_space_prefix), and runs of spaces collapse to one when
   remove_extra_whitespaces is set.
2. Viterbi: the best-scoring segmentation into normal, user-defined (score 0) and unused tokens,
   where a character no token covers costs min(normal scores) - 10 as the unknown token;
   consecutive unknown tokens merge into one.
"""

from __future__ import annotations

import struct

import numpy as np

from ..errors import FormatError

_SPACE = "\u2581".encode("utf-8")


class XCDA:
    """View of the XCDA entries: BASE in bits 10-30 (shifted left by 8 when bit 9 is set),
    LCHECK in bits 0-7 (bit 31 marks value nodes), LEAF in bit 8, VALUE in bits 0-30."""

    def __init__(self, entries: list[int]):
        self.entries = entries

    def _node(self, index: int) -> int:
        if index >= len(self.entries):
            raise FormatError(f"precompiled_charsmap: XCDA index {index} is outside its {len(self.entries)} entries")
        return self.entries[index]

    def base(self, index: int) -> int:
        node = self._node(index)
        return (node >> 10) << ((node & (1 << 9)) >> 6)

    def lcheck(self, index: int) -> int:
        return self._node(index) & ((1 << 31) | 0xFF)

    def leaf(self, index: int) -> bool:
        return bool((self._node(index) >> 8) & 1)

    def value(self, index: int) -> int:
        return self._node(index) & ((1 << 31) - 1)


class Unigram:
    def __init__(self, tokens: list[str], scores: list[float], is_normal, is_user_defined, is_unused,
                 unk_id, charsmap: bytes | None, add_space_prefix: bool, remove_extra_whitespaces: bool):
        self.unk_id = unk_id
        self.add_space_prefix = add_space_prefix
        self.merge_spaces = remove_extra_whitespaces
        self.xcda = None
        self.replacements = b""
        if charsmap:
            if len(charsmap) < 4:
                raise FormatError("metadata key 'tokenizer.ggml.precompiled_charsmap' is shorter than its 4-byte header")
            (blob,) = struct.unpack_from("<I", charsmap, 0)
            if blob + 4 >= len(charsmap):
                raise FormatError(f"metadata key 'tokenizer.ggml.precompiled_charsmap': XCDA blob of {blob} bytes "
                                  f"does not fit in {len(charsmap) - 4} bytes")
            self.xcda = XCDA(list(np.frombuffer(charsmap, "<u4", count=blob // 4, offset=4).tolist()))
            self.replacements = charsmap[4 + blob:]

        # Token matcher: text bytes -> (id, score); a later id with the same text wins, as the
        # trie's insert overwrites.
        self.matcher: dict[bytes, tuple[int, float]] = {}
        self.user_defined: set[bytes] = set()
        normal_scores = []
        for i, text in enumerate(tokens):
            b = text.encode("utf-8")
            if is_normal(i):
                normal_scores.append(scores[i])
            if is_normal(i) or is_user_defined(i) or is_unused(i):
                # user-defined tokens score 0 so that they win over the (negative) log-probabilities
                self.matcher[b] = (i, 0.0 if is_user_defined(i) else float(np.float32(scores[i])))
            if is_user_defined(i):
                self.user_defined.add(b)
        self.max_len = max((len(b) for b in self.matcher), default=0)
        self.max_user_len = max((len(b) for b in self.user_defined), default=0)
        # float arithmetic: min_score - 10.0f, as in llm_tokenizer_ugm
        min_score = np.float32(min(normal_scores)) if normal_scores else np.float32(np.finfo(np.float32).max)
        self.unknown_score = float(min_score - np.float32(10.0))

    def _normalize_prefix(self, data: bytes, pos: int) -> tuple[bytes, int]:
        for n in range(min(self.max_user_len, len(data) - pos), 0, -1):
            if data[pos:pos + n] in self.user_defined:
                return data[pos:pos + n], n
        longest, offset = 0, 0
        if self.xcda is not None:
            node = self.xcda.base(0)
            for p in range(pos, len(data)):
                c = data[p]
                if c == 0:
                    break
                node ^= c
                if self.xcda.lcheck(node) != c:
                    break
                is_leaf = self.xcda.leaf(node)
                node ^= self.xcda.base(node)
                if is_leaf:
                    longest = p - pos + 1
                    offset = self.xcda.value(node)
        if longest:
            if offset >= len(self.replacements):
                raise FormatError(f"precompiled_charsmap: replacement offset {offset} is outside the "
                                  f"{len(self.replacements)}-byte table")
            end = self.replacements.find(b"\0", offset)
            if end < 0:
                raise FormatError(f"precompiled_charsmap: replacement at {offset} is not NUL-terminated")
            return self.replacements[offset:end], longest
        n = _utf8_len(data, pos)
        if n == 0:
            return "\ufffd".encode("utf-8"), 1
        return data[pos:pos + n], n

    def normalize(self, text: str) -> bytes:
        data = text.encode("utf-8")
        out = bytearray()
        space_prepended = False
        in_word = False
        pos = 0
        while pos < len(data):
            piece, consumed = self._normalize_prefix(data, pos)
            for c in piece:
                if c != 0x20:
                    if not in_word:
                        in_word = True
                        if (self.add_space_prefix and not space_prepended) or self.merge_spaces:
                            out += _SPACE
                            space_prepended = True
                    out.append(c)
                else:
                    in_word = False
                    if not self.merge_spaces:
                        out += _SPACE
            pos += consumed
        return bytes(out)

    def tokenize(self, text: str, out: list[int]):
        data = self.normalize(text)
        n = len(data)
        if n == 0:
            return
        # best[i] = (token id, start offset, score) of the best segmentation of data[:i]
        best = [(self.unk_id, 0, -np.finfo(np.float64).max)] * (n + 1)
        best[0] = (self.unk_id, 0, 0.0)
        pos = 0
        while pos < n:
            char_len = min(_lead_len(data[pos]), n - pos)
            score0 = best[pos][2]
            single_char = False
            for length in range(1, min(self.max_len, n - pos) + 1):
                hit = self.matcher.get(data[pos:pos + length])
                if hit is None:
                    continue
                if length == char_len:
                    single_char = True
                challenger = score0 + hit[1]
                if challenger > best[pos + length][2]:
                    best[pos + length] = (hit[0], pos, challenger)
            if not single_char:
                challenger = score0 + self.unknown_score
                if challenger > best[pos + char_len][2]:
                    best[pos + char_len] = (self.unk_id, pos, challenger)
            pos += char_len
        ids = []
        prev_unknown = False
        entry = best[n]
        while True:
            unknown = entry[0] == self.unk_id
            if not (prev_unknown and unknown):
                ids.append(entry[0])
            if entry[1] == 0:
                break
            prev_unknown = unknown
            entry = best[entry[1]]
        out.extend(reversed(ids))


def _lead_len(b: int) -> int:
    # unicode_len_utf8: the sequence length a lead byte announces (continuation bytes count as 1)
    return (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4)[b >> 4]


def _utf8_len(data: bytes, pos: int) -> int:
    # Length of the valid UTF-8 character at pos as unicode_cpt_from_utf8 accepts it, 0 if invalid.
    b = data[pos]
    if b < 0x80:
        return 1
    if b & 0x40 == 0:
        return 0
    n = 2 if b & 0x20 == 0 else 3 if b & 0x10 == 0 else 4 if b & 0x08 == 0 else 0
    if n == 0 or pos + n > len(data) or any(data[pos + k] & 0xC0 != 0x80 for k in range(1, n)):
        return 0
    return n
