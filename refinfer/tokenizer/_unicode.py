"""Code point classes as llama.cpp's unicode.cpp sees them, and the GPT-2 byte-to-unicode map.

llama.cpp classifies code points with its own table (unicode-data.cpp), generated from the
Unicode Character Database by general category: N* -> number, L* -> letter, Z* -> separator,
M* -> mark, P* -> punctuation, S* -> symbol, Cc/Cf/Co/Cs -> control, Cn (unassigned) ->
"undefined". White space is the fixed White_Space property list, not a category.

Its table is UCD 15.1; Python 3.11's unicodedata is UCD 14.0. The code points assigned in
Unicode 15.0 and 15.1 are listed below so that a letter added in 15.0 is a letter here too
(an unassigned code point is not a letter, and the pre-tokenizers split it differently).
"""

from __future__ import annotations

import unicodedata

UNDEFINED = 0x0001
NUMBER = 0x0002       # \p{N}
LETTER = 0x0004       # \p{L}
SEPARATOR = 0x0008    # \p{Z}
MARK = 0x0010         # \p{M}
PUNCTUATION = 0x0020  # \p{P}
SYMBOL = 0x0040       # \p{S}
CONTROL = 0x0080      # \p{C}
WHITESPACE = 0x0100   # \s (White_Space property)
CATEGORY_MASK = 0x00FF

_BY_CATEGORY = {"C": CONTROL, "L": LETTER, "M": MARK, "N": NUMBER, "P": PUNCTUATION,
                "S": SYMBOL, "Z": SEPARATOR}

# PropList.txt White_Space.
WHITESPACE_CODEPOINTS = frozenset([*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
                                   0x2028, 0x2029, 0x202F, 0x205F, 0x3000])

# Code points assigned in Unicode 15.0 and 15.1 (DerivedAge.txt), with their category class:
# (first, last, flag).
_UCD_15_ADDITIONS = (
    (0x00CF3, 0x00CF3, MARK), (0x00ECE, 0x00ECE, MARK), (0x02FFC, 0x02FFF, SYMBOL),
    (0x031EF, 0x031EF, SYMBOL), (0x10EFD, 0x10EFF, MARK), (0x1123F, 0x11240, LETTER),
    (0x11241, 0x11241, MARK), (0x11B00, 0x11B09, PUNCTUATION), (0x11F00, 0x11F01, MARK),
    (0x11F02, 0x11F02, LETTER), (0x11F03, 0x11F03, MARK), (0x11F04, 0x11F10, LETTER),
    (0x11F12, 0x11F33, LETTER), (0x11F34, 0x11F3A, MARK), (0x11F3E, 0x11F42, MARK),
    (0x11F43, 0x11F4F, PUNCTUATION), (0x11F50, 0x11F59, NUMBER), (0x1342F, 0x1342F, LETTER),
    (0x13439, 0x1343F, CONTROL), (0x13440, 0x13440, MARK), (0x13441, 0x13446, LETTER),
    (0x13447, 0x13455, MARK), (0x1B132, 0x1B132, LETTER), (0x1B155, 0x1B155, LETTER),
    (0x1D2C0, 0x1D2D3, NUMBER), (0x1DF25, 0x1DF2A, LETTER), (0x1E030, 0x1E06D, LETTER),
    (0x1E08F, 0x1E08F, MARK), (0x1E4D0, 0x1E4EB, LETTER), (0x1E4EC, 0x1E4EF, MARK),
    (0x1E4F0, 0x1E4F9, NUMBER), (0x1F6DC, 0x1F6DC, SYMBOL), (0x1F774, 0x1F776, SYMBOL),
    (0x1F77B, 0x1F77F, SYMBOL), (0x1F7D9, 0x1F7D9, SYMBOL), (0x1FA75, 0x1FA77, SYMBOL),
    (0x1FA87, 0x1FA88, SYMBOL), (0x1FAAD, 0x1FAAF, SYMBOL), (0x1FABB, 0x1FABD, SYMBOL),
    (0x1FABF, 0x1FABF, SYMBOL), (0x1FACE, 0x1FACF, SYMBOL), (0x1FADA, 0x1FADB, SYMBOL),
    (0x1FAE8, 0x1FAE8, SYMBOL), (0x1FAF7, 0x1FAF8, SYMBOL), (0x2B739, 0x2B739, LETTER),
    (0x2EBF0, 0x2EE5D, LETTER), (0x31350, 0x323AF, LETTER),
)

_cache: dict[int, int] = {}


def _compute_flags(cp: int) -> int:
    cat = unicodedata.category(chr(cp))
    if cat == "Cn":
        flags = UNDEFINED
        for first, last, flag in _UCD_15_ADDITIONS:
            if first <= cp <= last:
                flags = flag
                break
    else:
        flags = _BY_CATEGORY[cat[0]]
    if cp in WHITESPACE_CODEPOINTS:
        flags |= WHITESPACE
    return flags


def cpt_flags(cp: int) -> int:
    f = _cache.get(cp)
    if f is None:
        f = _cache[cp] = _compute_flags(cp)
    return f


def ascii_lower(cp: int) -> int:
    # unicode_tolower applies the simple lowercase mapping, and the contraction rules compare
    # the result with s t m d r e v l. Only the ASCII capitals lowercase to those letters
    # (U+212A KELVIN SIGN goes to 'k' and U+0130 to 'i', which no rule uses).
    return cp + 32 if 0x41 <= cp <= 0x5A else cp


def simple_lower(cp: int) -> int:
    # UnicodeData's simple lowercase mapping (unicode_tolower). str.lower() applies the full
    # mapping, which differs only for U+0130, whose full lowercase is "i" + U+0307.
    if cp == 0x130:
        return 0x69
    low = chr(cp).lower()
    return ord(low) if len(low) == 1 else cp


def _bytes_to_unicode() -> list[str]:
    # GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other 68
    # bytes (controls, space, 0x7F-0xA0, 0xAD) map in order to U+0100, U+0101, ...
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = [""] * 256
    n = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_UNICODE: list[str] = _bytes_to_unicode()
UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in enumerate(BYTE_TO_UNICODE)}
