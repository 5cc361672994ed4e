"""Pre-tokenizers: split text into words before BPE, as llama.cpp's unicode_regex_split does.

llama.cpp keeps, per tokenizer.ggml.pre, a list of regexes applied one after the other: each
regex splits every piece left by the previous one into matches and the gaps between them.
The common GPT-2, Llama-3 and Qwen2 patterns are not run as regexes but by hand-written
scanners (unicode_regex_split_custom_*), and those scanners, not the regexes, define the
result: they are mirrored here line by line. The remaining patterns go through std::regex
(ECMAScript) on a "collapsed" text in which every non-ASCII code point is replaced by one
byte standing for its class; that is reproduced with Python's re, whose backtracking
semantics agree with ECMAScript's for these simple patterns.

Offsets and pieces are counted in code points; a split is a list of piece lengths.
"""

from __future__ import annotations

import re

from ..errors import UnsupportedError
from ._unicode import (LETTER, MARK, NUMBER, PUNCTUATION, SYMBOL, WHITESPACE, CATEGORY_MASK,
                       cpt_flags, ascii_lower)

_OUT = -1  # a position outside the current piece (llama.cpp's OUT_OF_RANGE)

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA3_PATTERN = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_PATTERN = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN35_PATTERN = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NEWLINES_PATTERN = r"[^\n]+|[\n]+"
KIMI_K2_PATTERN = r"\p{Han}+"  # llama.cpp's trigger for its hand-coded Kimi-K2 splitter
AFMOE_DIGITS = r"\p{AFMoE_digits}"  # not a regex: llama.cpp's name for a hand-coded digit grouping
TINY_AYA_DIGITS = r"\d{1,3}(?=(?:\d{3})*\b)"  # run by the same hand-coded grouping

_PUNCT_RUN = r"[\p{P}\$\+<=>\^~\|]+"
_BLOOM = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
_CJK_KANA = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
_ASCII_PUNCT_WORD = "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK_LLM_LETTERS = (
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
    "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
    "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943]+"
)

# llama-vocab.cpp, llm_tokenizer_bpe: the regex list of each pre-tokenizer family.
REGEXES = {
    "default": [_PUNCT_RUN, GPT2_PATTERN, r"\p{N}+", "[0-9][0-9][0-9]"],
    "gpt2": [GPT2_PATTERN],
    "llama3": [LLAMA3_PATTERN],
    "qwen2": [QWEN2_PATTERN],
    "qwen35": [QWEN35_PATTERN],
    "starcoder": [r"\p{N}", GPT2_PATTERN],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", GPT2_PATTERN, "[0-9][0-9][0-9]"],
    "deepseek-coder": ["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"],
    "deepseek-llm": ["[\r\n]", _DEEPSEEK_LLM_LETTERS,
                     "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
                     r"\s+$", _CJK, r"\p{N}+"],
    "bloom": [_BLOOM],
    "viking": [_BLOOM, r"\p{N}"],
    "gemma4": [NEWLINES_PATTERN],
    "sarvam": [NEWLINES_PATTERN],
    "laguna": [NEWLINES_PATTERN, QWEN2_PATTERN],
    "jais2": [_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)"
              r"|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}"],
    "deepseek-v3": [r"\p{N}{1,3}", _CJK_KANA, _ASCII_PUNCT_WORD + "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
                    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"],
    "spark2_5": [r"\p{N}{1,3}", _CJK_KANA, _ASCII_PUNCT_WORD + "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
                 "| ?[\\p{P}\\p{S}]+|[\r\n]|\\s+(?!\\S)|\\s+", r"\p{N}"],
    "youtu": ["[\uac00-\ud7a3\u3131-\u318e]+|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b\uff0c\u3001-\u303f"
              "\ufe30-\ufe4f]+|[\u3105-\u312f]+|[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
              r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS + "?"
              r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS + "?"
              r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "tekken": [r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
               r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
               r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "chameleon": ["<sentinel:[0-9]+>", "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", "([\\t\\n]|    |  )", r"\p{N}",
                  r"[\p{P}!-/:-@\[-`{-~]", GPT2_PATTERN],
    "gpt4o": [r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + _CONTRACTIONS + "?"
              r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + _CONTRACTIONS + "?"
              r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "granite-emb-multi": [r"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+" + _CONTRACTIONS + "?"
                          r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*"
                          + _CONTRACTIONS + "?"
                          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "bailingmoe": [r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"],
    "seed-coder": [_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
                   r"|\s+(?!\S)|\s+"],
    "ufakzeka": [r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "minicpm5": [r"\p{N}{1,3}", _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "afmoe": [AFMOE_DIGITS, "[\u4e00-\u9fff\u3400-\u4dbf\u8c48-\ufaff\u3040-\u309f\u30a0-\u30ff\uff65-\uff9f"
              "\u2f00-\u2fdf\u0e40-\u0e7f\u0e80-\u0eff\u1780-\u17ff\u1000-\u109f\uaa60-\uaa7f\ua9e0-\ua9ff"
              "\uac00-\ud7af\u1100-\u11ff]+",
              _ASCII_PUNCT_WORD + r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+"],
    "tiny-aya": [TINY_AYA_DIGITS,
                 r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS + "?"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS + "?"
                 r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "kimi-k2": [KIMI_K2_PATTERN],
    # an empty-match regex: the pieces between its matches (groups of 3 digits from the right)
    "superbpe": [r"\p{N}+", r"(?=(\d{3})+(?!\d))"],
    "exaone-moe": [_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"],
}


def _flags_at(cpts, ini, end):
    def get(pos):
        return cpt_flags(cpts[pos]) if ini <= pos < end else 0
    return get


def _cpt_at(cpts, ini, end):
    def get(pos):
        return cpts[pos] if ini <= pos < end else _OUT
    return get


def _split_custom_gpt2(cpts: list[int], pieces: list[int]) -> list[int]:
    # unicode_regex_split_custom_gpt2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    out = []
    start = 0
    for n in pieces:
        ini, end = start, start + n
        start = end
        flags_at, cpt_at = _flags_at(cpts, ini, end), _cpt_at(cpts, ini, end)
        prev = ini

        def add(new_end):
            nonlocal prev
            if new_end > prev:
                out.append(new_end - prev)
            prev = new_end

        pos = ini
        while pos < end:
            cpt, flags = cpts[pos], flags_at(pos)
            if cpt == 0x27 and pos + 1 < end:  # '
                nxt = cpt_at(pos + 1)
                if nxt in (0x73, 0x74, 0x6D, 0x64):  # s t m d
                    pos += 2
                    add(pos)
                    continue
                if pos + 2 < end:
                    nn = cpt_at(pos + 2)
                    if (nxt, nn) in ((0x72, 0x65), (0x76, 0x65), (0x6C, 0x6C)):  # re ve ll
                        pos += 3
                        add(pos)
                        continue
            # the class of the character after an optional leading space decides the branch
            flags2 = flags_at(pos + 1) if cpt == 0x20 else flags
            if flags2 & LETTER:  # ' ?\p{L}+'
                pos += cpt == 0x20
                while flags_at(pos) & LETTER:
                    pos += 1
                add(pos)
                continue
            if flags2 & NUMBER:  # ' ?\p{N}+'
                pos += cpt == 0x20
                while flags_at(pos) & NUMBER:
                    pos += 1
                add(pos)
                continue
            if flags2 and not flags2 & (WHITESPACE | LETTER | NUMBER):  # ' ?[^\s\p{L}\p{N}]+'
                pos += cpt == 0x20
                while (f := flags_at(pos)) and not f & (WHITESPACE | LETTER | NUMBER):
                    pos += 1
                add(pos)
                continue
            n_ws = 0
            while flags_at(pos + n_ws) & WHITESPACE:
                n_ws += 1
            if n_ws > 1 and cpt_at(pos + n_ws) != _OUT:  # \s+(?!\S): the last space starts the next word
                pos += n_ws - 1
            elif n_ws > 0:  # \s+
                pos += n_ws
            else:  # no match: the character alone
                pos += 1
            add(pos)
    return out


def _split_custom_llama3_family(cpts: list[int], pieces: list[int], digits: int, marks: bool) -> list[int]:
    # unicode_regex_split_custom_llama3 (digits=3), _qwen2 (digits=1) and _qwen35 (digits=1,
    # letter runs take combining marks):
    # (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
    word = LETTER | MARK if marks else LETTER
    out = []
    start = 0
    for n in pieces:
        ini, end = start, start + n
        start = end
        flags_at, cpt_at = _flags_at(cpts, ini, end), _cpt_at(cpts, ini, end)
        prev = ini

        def add(new_end):
            nonlocal prev
            if new_end > prev:
                out.append(new_end - prev)
            prev = new_end

        pos = ini
        while pos < end:
            cpt, flags = cpts[pos], flags_at(pos)
            if cpt == 0x27 and pos + 1 < end:
                nxt = ascii_lower(cpt_at(pos + 1))
                if nxt in (0x73, 0x74, 0x6D, 0x64):
                    pos += 2
                    add(pos)
                    continue
                if pos + 2 < end:
                    nn = ascii_lower(cpt_at(pos + 2))
                    if (nxt, nn) in ((0x72, 0x65), (0x76, 0x65), (0x6C, 0x6C)):
                        pos += 3
                        add(pos)
                        continue
            # [^\r\n\p{L}\p{N}]?\p{L}+ : one optional leading non-letter, then letters
            if not (cpt in (0x0D, 0x0A) or flags & NUMBER):
                if flags & word or flags_at(pos + 1) & word:
                    pos += 1
                    while flags_at(pos) & word:
                        pos += 1
                    add(pos)
                    continue
            if flags & NUMBER:
                first = pos
                while flags_at(pos) & NUMBER:
                    pos += 1
                    if pos - first >= digits:
                        add(pos)
                        first = pos
                add(pos)
                continue
            # ' ?[^\s\p{L}\p{N}]+[\r\n]*'. llama.cpp tests the class of the character after an
            # optional space but requires the current one (not that one) to be defined.
            other = WHITESPACE | LETTER | NUMBER | (MARK if marks else 0)
            flags2 = flags_at(pos + 1) if cpt == 0x20 else flags
            if not (flags2 & other) and flags:
                pos += cpt == 0x20
                while not (flags2 & other) and flags2:
                    pos += 1
                    flags2 = flags_at(pos)
                while cpt_at(pos) in (0x0D, 0x0A):
                    pos += 1
                add(pos)
                continue
            n_ws = 0
            last_newline_end = 0
            while flags_at(pos + n_ws) & WHITESPACE:
                if cpt_at(pos + n_ws) in (0x0D, 0x0A):
                    last_newline_end = pos + n_ws + 1
                n_ws += 1
            if last_newline_end > 0:  # \s*[\r\n]+
                pos = last_newline_end
            elif n_ws > 1 and cpt_at(pos + n_ws) != _OUT:  # \s+(?!\S)
                pos += n_ws - 1
            elif n_ws > 0:  # \s+
                pos += n_ws
            else:
                pos += 1
            add(pos)
    return out


def _is_han(cp: int) -> bool:
    # unicode_cpt_is_han: CJK Unified Ideographs and extensions A-F, compatibility ideographs
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0x2CEB0 <= cp <= 0x2EBEF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _split_custom_kimi_k2(cpts: list[int], pieces: list[int]) -> list[int]:
    # unicode_regex_split_custom_kimi_k2: [\p{Han}]+ | the GPT-4o style letter words (Han
    # excluded) with an optional contraction | \p{N}{1,3} | ?[^\s\p{L}\p{N}]+[\r\n]* |
    # \s*[\r\n]+ | \s+(?!\S) | \s+
    out = []
    start = 0
    for n in pieces:
        ini, end = start, start + n
        start = end
        flags_at, cpt_at = _flags_at(cpts, ini, end), _cpt_at(cpts, ini, end)
        prev = ini

        def add(new_end):
            nonlocal prev
            if new_end > prev:
                out.append(new_end - prev)
            prev = new_end

        def word_letter(p):
            return flags_at(p) & LETTER and not _is_han(cpt_at(p))

        pos = ini
        while pos < end:
            cpt, flags = cpts[pos], flags_at(pos)
            if _is_han(cpt):
                while _is_han(cpt_at(pos)):
                    pos += 1
                add(pos)
                continue
            leading_ok = not (cpt in (0x0D, 0x0A) or flags & (LETTER | NUMBER))
            if word_letter(pos) or (leading_ok and word_letter(pos + 1)):
                pos += leading_ok  # the optional leading character
                while word_letter(pos):
                    pos += 1
                if cpt_at(pos) == 0x27 and pos + 1 < end:  # optional contraction
                    nxt = ascii_lower(cpt_at(pos + 1))
                    if nxt in (0x73, 0x74, 0x6D, 0x64):
                        pos += 2
                    elif pos + 2 < end and (nxt, ascii_lower(cpt_at(pos + 2))) in ((0x72, 0x65), (0x76, 0x65),
                                                                                  (0x6C, 0x6C)):
                        pos += 3
                add(pos)
                continue
            if flags & NUMBER:
                first = pos
                while flags_at(pos) & NUMBER:
                    pos += 1
                    if pos - first >= 3:
                        add(pos)
                        first = pos
                add(pos)
                continue
            flags2 = flags_at(pos + 1) if cpt == 0x20 else flags
            if flags2 and not flags2 & (WHITESPACE | LETTER | NUMBER):
                pos += cpt == 0x20
                while (f := flags_at(pos)) and not f & (WHITESPACE | LETTER | NUMBER):
                    pos += 1
                while cpt_at(pos) in (0x0D, 0x0A):
                    pos += 1
                add(pos)
                continue
            n_ws = 0
            last_newline_end = 0
            while flags_at(pos + n_ws) & WHITESPACE:
                if cpt_at(pos + n_ws) in (0x0D, 0x0A):
                    last_newline_end = pos + n_ws + 1
                n_ws += 1
            if last_newline_end > 0:
                pos = last_newline_end
            elif n_ws > 1 and cpt_at(pos + n_ws) != _OUT:
                pos += n_ws - 1
            elif n_ws > 0:
                pos += n_ws
            else:
                pos += 1
            add(pos)
    return out


def _split_digit_groups(cpts: list[int], pieces: list[int]) -> list[int]:
    # unicode_regex_split_custom_afmoe: a run of \p{N} splits into a leading group of
    # len % 3 digits, then groups of 3. Other characters are not cut: they stay glued to
    # whatever is emitted next (the first digit group), or end the piece.
    out = []
    start = 0
    for n in pieces:
        ini, end = start, start + n
        start = end
        prev = ini
        pos = ini
        while pos < end:
            if not cpt_flags(cpts[pos]) & NUMBER:
                pos += 1
                continue
            first = pos
            while pos < end and cpt_flags(cpts[pos]) & NUMBER:
                pos += 1
            cut = first + (pos - first) % 3
            if cut == first:
                cut += 3
            while cut <= pos:
                out.append(cut - prev)
                prev = cut
                cut += 3
        if prev < end:
            out.append(end - prev)
    return out


def _split_newlines(cpts: list[int], pieces: list[int]) -> list[int]:
    # unicode_regex_split_custom_newlines: [^\n]+|[\n]+
    out = []
    start = 0
    for n in pieces:
        pos, end = start, start + n
        while pos < end:
            run = pos
            nl = cpts[pos] == 0x0A
            while pos < end and (cpts[pos] == 0x0A) == nl:
                pos += 1
            out.append(pos - run)
        start = end
    return out


_CUSTOM = {
    GPT2_PATTERN: _split_custom_gpt2,
    LLAMA3_PATTERN: lambda c, p: _split_custom_llama3_family(c, p, 3, False),
    QWEN2_PATTERN: lambda c, p: _split_custom_llama3_family(c, p, 1, False),
    QWEN35_PATTERN: lambda c, p: _split_custom_llama3_family(c, p, 1, True),
    NEWLINES_PATTERN: _split_newlines,
    AFMOE_DIGITS: _split_digit_groups,
    KIMI_K2_PATTERN: _split_custom_kimi_k2,
    TINY_AYA_DIGITS: _split_digit_groups,
}

# unicode_regex_split: the byte that stands for each class in the collapsed text, and the ASCII
# characters of that class that a collapsed \p{...} must still match.
_COLLAPSED = {
    r"\p{N}": ("\xd1", "0-9"),
    r"\p{L}": ("\xd2", "A-Za-z"),
    # llama.cpp collapses the letter subcategories to "letter" as well
    r"\p{Lu}": ("\xd2", "A-Za-z"), r"\p{Ll}": ("\xd2", "A-Za-z"), r"\p{Lt}": ("\xd2", "A-Za-z"),
    r"\p{Lm}": ("\xd2", "A-Za-z"), r"\p{Lo}": ("\xd2", "A-Za-z"),
    r"\p{P}": ("\xd3", r"!-#%-*,-/:-;?-@\[-\]_\{\}"),
    r"\p{M}": ("\xd4", ""),
    r"\p{S}": ("\xd5", r"\$\+<-\>\^`\|~"),
}
_CLASS_BYTE = {NUMBER: "\xd1", LETTER: "\xd2", PUNCTUATION: "\xd3", MARK: "\xd4", SYMBOL: "\xd5"}


def _collapse_text(cpts: list[int]) -> str:
    out = []
    for cp in cpts:
        if cp < 128:
            out.append(chr(cp))
            continue
        flags = cpt_flags(cp)
        if flags & WHITESPACE:
            out.append("\x0b")  # std::regex's \s knows only ASCII spaces: use vertical tab
        else:
            out.append(_CLASS_BYTE.get(flags & CATEGORY_MASK, "\xd0"))
    return "".join(out)


def _translate(regex: str) -> tuple[str, bool]:
    """llama.cpp's regex -> an equivalent Python pattern; True if it runs on collapsed text."""
    collapsed = any(k in regex for k in _COLLAPSED)
    out = []
    inside = False
    i = 0
    while i < len(regex):
        ch = regex[i]
        if ch == "[" and (i == 0 or regex[i - 1] != "\\"):
            inside = True
        elif ch == "]" and inside and regex[i - 1] != "\\":
            inside = False
        if collapsed and regex.startswith("\\p{", i):
            key = regex[i:regex.index("}", i) + 1]
            if key not in _COLLAPSED:
                raise UnsupportedError(f"pre-tokenizer regex {regex!r}: class {key} is not implemented")
            byte, ascii_set = _COLLAPSED[key]
            body = byte + ascii_set
            out.append(body if inside else "[" + body + "]")
            i += len(key)
            continue
        if ch == "$" and not inside and (i == 0 or regex[i - 1] != "\\"):
            out.append(r"\Z")  # ECMAScript $ (no multiline) is end of input only
        else:
            out.append(ch)
        i += 1
    return "".join(out), collapsed


_compiled: dict[str, tuple[re.Pattern, bool]] = {}


def _split_regex(regex: str, cpts: list[int], pieces: list[int], collapsed_text: str) -> list[int]:
    # unicode_regex_split_stl: every match is a piece, so is every gap between matches.
    if regex not in _compiled:
        pattern, collapsed = _translate(regex)
        # re.ASCII: \s is [ \t\n\v\f\r] as in ECMAScript std::regex under the C locale.
        _compiled[regex] = (re.compile(pattern, re.ASCII), collapsed)
    rx, collapsed = _compiled[regex]
    text = collapsed_text if collapsed else "".join(chr(0x0B if cp > 0x7F and cpt_flags(cp) & WHITESPACE else cp)
                                                    for cp in cpts)
    out = []
    start = 0
    for n in pieces:
        last = 0
        for m in rx.finditer(text, start, start + n):
            s, e = m.start() - start, m.end() - start
            if s > last:
                out.append(s - last)
            out.append(e - s)
            last = e
        if last < n:
            out.append(n - last)
        start += n
    return out


def split(text: str, regexes: list[str]) -> list[str]:
    cpts = [ord(c) for c in text]
    pieces = [len(cpts)] if cpts else []
    collapsed_text = None
    for regex in regexes:
        custom = _CUSTOM.get(regex)
        if custom is not None:
            pieces = custom(cpts, pieces)
            continue
        if collapsed_text is None:
            collapsed_text = _collapse_text(cpts)
        pieces = _split_regex(regex, cpts, pieces, collapsed_text)
    words = []
    pos = 0
    for n in pieces:
        words.append(text[pos:pos + n])
        pos += n
    return words


# llama-vocab.cpp, llama_vocab::impl::load: tokenizer.ggml.pre -> regex family and the flags
# that come with it.
PRE_TYPES = {
    "default": ("default", {}),
    "llama3": ("llama3", {"ignore_merges": True, "add_bos": True}),
    "llama-v3": ("llama3", {"ignore_merges": True, "add_bos": True}),
    "llama-bpe": ("llama3", {"ignore_merges": True, "add_bos": True}),
    "falcon3": ("llama3", {"ignore_merges": True, "add_bos": True}),
    "falcon-h1": ("llama3", {"ignore_merges": True, "add_bos": True}),
    "pixtral": ("llama3", {"ignore_merges": True, "add_bos": True}),
    "midm-2.0": ("llama3", {"ignore_merges": True, "add_bos": True}),
    "lfm2": ("llama3", {"ignore_merges": True, "add_bos": True}),
    "dbrx": ("llama3", {}),
    "smaug-bpe": ("llama3", {}),
    "deepseek-llm": ("deepseek-llm", {"clean_spaces": False}),
    "deepseek-coder": ("deepseek-coder", {"clean_spaces": False}),
    "falcon": ("falcon", {}),
    "mpt": ("gpt2", {}),
    "starcoder": ("starcoder", {}),
    "gpt-2": ("gpt2", {}),
    "phi-2": ("gpt2", {}),
    "jina-es": ("gpt2", {}),
    "jina-de": ("gpt2", {}),
    "gigachat": ("gpt2", {}),
    "jina-v2-es": ("gpt2", {}),
    "jina-v2-de": ("gpt2", {}),
    "a.x-4.0": ("gpt2", {}),
    "mellum": ("gpt2", {}),
    "modern-bert": ("gpt2", {}),
    "jina-v1-en": ("gpt2", {}),  # these three also set add_sep, which tokenizing does not use
    "jina-v2-code": ("gpt2", {}),
    "roberta-bpe": ("gpt2", {}),
    "olmo": ("gpt2", {}),
    "jais": ("gpt2", {}),
    "exaone4": ("gpt2", {}),
    "trillion": ("gpt2", {"clean_spaces": False}),
    "granite-docling": ("gpt2", {"clean_spaces": False}),
    "refact": ("starcoder", {}),
    "command-r": ("starcoder", {"clean_spaces": False}),
    "smollm": ("starcoder", {"clean_spaces": False}),
    "codeshell": ("starcoder", {}),
    "exaone": ("starcoder", {}),
    "minerva-7b": ("starcoder", {}),
    "mellum2": ("starcoder", {}),
    "afmoe": ("afmoe", {"clean_spaces": False}),
    "tiny_aya": ("tiny-aya", {"clean_spaces": False}),
    "superbpe": ("superbpe", {"clean_spaces": False}),
    "kimi-k2": ("kimi-k2", {"clean_spaces": False}),
    "cohere2moe": ("tiny-aya", {"clean_spaces": False}),
    "qwen2": ("qwen2", {"clean_spaces": False}),
    "deepseek-r1-qwen": ("qwen2", {"clean_spaces": False}),
    "stablelm2": ("qwen2", {}),
    "hunyuan": ("qwen2", {"clean_spaces": False}),
    "megrez": ("qwen2", {}),
    "solar-open": ("qwen2", {"clean_spaces": False}),
    "qwen35": ("qwen35", {"clean_spaces": False}),
    "bloom": ("bloom", {}),
    "gpt3-finnish": ("bloom", {}),
    "poro-chat": ("bloom", {"clean_spaces": False}),
    "gemma4": ("gemma4", {"escape_whitespaces": True, "byte_encode": False}),
    "granite-embed-multi-311m": ("gemma4", {"escape_whitespaces": True, "byte_encode": False}),
    "sarvam-moe": ("sarvam", {"escape_whitespaces": True, "byte_encode": False, "clean_spaces": False}),
    "chatglm-bpe": ("llama3", {"no_bos": True}),
    "glm4": ("llama3", {"no_bos": True, "ignore_merges": True}),
    "glm5": ("llama3", {"no_bos": True, "ignore_merges": True}),
    "viking": ("viking", {"clean_spaces": False}),
    "jais-2": ("jais2", {}),
    "deepseek-v3": ("deepseek-v3", {"clean_spaces": False}),
    "hunyuan-dense": ("deepseek-v3", {"clean_spaces": False}),
    "hy_v4": ("deepseek-v3", {"clean_spaces": False}),
    "joyai-llm": ("deepseek-v3", {"clean_spaces": False}),
    "spark2_5": ("spark2_5", {"clean_spaces": False}),
    "youtu": ("youtu", {"clean_spaces": False, "ignore_merges": True}),
    "tekken": ("tekken", {"clean_spaces": False, "ignore_merges": True, "add_bos": True}),
    "chameleon": ("chameleon", {"add_bos": True, "clean_spaces": False}),
    "gpt-4o": ("gpt4o", {"clean_spaces": False}),
    "llama4": ("gpt4o", {"clean_spaces": False}),
    "kanana2": ("gpt4o", {"clean_spaces": False}),
    "talkie": ("gpt4o", {"clean_spaces": False}),
    "minimax-m2": ("gpt4o", {"clean_spaces": False}),
    "granite-embed-multi-97m": ("granite-emb-multi", {"clean_spaces": False, "ignore_merges": True}),
    "bailingmoe": ("bailingmoe", {"clean_spaces": False}),
    "bailingmoe2": ("bailingmoe", {"clean_spaces": False}),
    "llada-moe": ("bailingmoe", {"clean_spaces": False}),
    "seed-coder": ("seed-coder", {"clean_spaces": False}),
    "ufakzeka": ("ufakzeka", {"clean_spaces": False}),
    "grok-2": ("qwen2", {"clean_spaces": False}),
    "laguna": ("laguna", {"clean_spaces": False}),
    "minicpm5": ("minicpm5", {"ignore_merges": True}),
    "exaone-moe": ("exaone-moe", {}),
    "kormo": ("qwen2", {"clean_spaces": False}),
    "f2llmv2": ("qwen2", {"clean_spaces": False}),
    "jina-v5-nano": ("llama3", {"ignore_merges": True, "add_bos": True}),
}


def pre_type(pre: str, key: str = "tokenizer.ggml.pre") -> tuple[str, dict]:
    if pre not in PRE_TYPES:
        raise UnsupportedError(
            f"metadata key {key!r}: pre-tokenizer {pre!r} is not implemented; "
            f"supported: {', '.join(sorted(PRE_TYPES))}")
    return PRE_TYPES[pre]
