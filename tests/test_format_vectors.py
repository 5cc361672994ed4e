"""The published format specs and known-answer vectors (formats/) against refinfer and ggml.

Each vector file was written by formats/make_vectors.py from libggml. Here refinfer must
reproduce it bit for bit, and libggml must still reproduce it too, so a vector that went stale
against the C library is caught instead of silently becoming "whatever refinfer does".
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re

import numpy as np
import pytest

from refinfer import quant

FORMATS = pathlib.Path(__file__).resolve().parents[1] / "formats"
VECTOR_FILES = sorted((FORMATS / "vectors").glob("*.json"))


def _load_make_vectors():
    spec = importlib.util.spec_from_file_location("make_vectors", FORMATS / "make_vectors.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mv = _load_make_vectors()


def _doc(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())


def _f32(words: list[str]) -> np.ndarray:
    return np.array([int(w, 16) for w in words], dtype="<u4").view("<f4")


def _raw(case: dict) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(case["bytes"]), dtype=np.uint8)


def assert_same_floats(got: np.ndarray, want: np.ndarray, what: str):
    """Bit-identical, except that any NaN matches any NaN (0 * inf gives the platform's
    default NaN, whose sign bit differs between x86 and ARM)."""
    got = np.asarray(got, dtype=np.float32).ravel()
    want = np.asarray(want, dtype=np.float32).ravel()
    assert got.shape == want.shape, f"{what}: {got.shape} floats, expected {want.shape}"
    gb, wb = got.view("<u4"), want.view("<u4")
    nan_g, nan_w = np.isnan(got), np.isnan(want)
    bad = np.flatnonzero((gb != wb) & ~(nan_g & nan_w))
    assert bad.size == 0, (f"{what}: {bad.size} floats differ, first at element {bad[0]}: "
                           f"got {got[bad[0]]!r} ({gb[bad[0]]:08x}), expected {want[bad[0]]!r} ({wb[bad[0]]:08x})")


def _registered(name: str):
    assert name in quant.TYPES, f"refinfer has no {name} block type registered"
    return quant.get_type(name)


def test_every_type_has_a_vector_file():
    assert {p.stem for p in VECTOR_FILES} == set(mv.TYPES)


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.stem)
def test_vector_file_header(path):
    doc = _doc(path)
    name = doc["type"]
    assert name == path.stem
    assert (doc["block_size"], doc["type_size"]) == mv.TYPES[name][:2]
    assert doc["source"].startswith("ggml ")
    assert doc["cases"], "no cases"
    for case in doc["cases"]:
        n_blocks, rest = divmod(len(case["bytes"]) // 2, doc["type_size"])
        assert rest == 0 and n_blocks > 0, case["name"]
        assert len(case["dequantized"]) == n_blocks * doc["block_size"] == len(case["dequantized_readable"])
        if "input" in case:
            assert len(case["input"]) == n_blocks * doc["block_size"] == len(case["input_readable"])
            # the readable list is a faithful rendering of the exact bit patterns
            assert_same_floats(np.array(case["input_readable"], dtype=np.float32), _f32(case["input"]),
                               f"{name}/{case['name']} input_readable")


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.stem)
def test_refinfer_dequantize_matches_vectors(path):
    doc = _doc(path)
    t = _registered(doc["type"])
    assert (t.block_size, t.type_size, t.type_id) == (doc["block_size"], doc["type_size"], doc["ggml_type_id"])
    with np.errstate(invalid="ignore", over="ignore"):
        for case in doc["cases"]:
            got = quant.dequantize(_raw(case), t.name)
            assert_same_floats(got, _f32(case["dequantized"]), f"{t.name}/{case['name']} dequantize")


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.stem)
def test_every_quantize_case_stores_its_input(path):
    # The inputs are make_vectors.py's seeded ones, stored whatever refinfer computes: only the
    # K-quants' random-bytes case is dequantize-only.
    doc = _doc(path)
    name = doc["type"]
    with_input = {c["name"]: _f32(c["input"]) for c in doc["cases"] if "input" in c}
    without = [c["name"] for c in doc["cases"] if "input" not in c]
    assert without == ([mv.DEQUANTIZE_ONLY] if name in mv.KQUANTS else []), f"{name}: cases without an input"
    want = mv.inputs(name)
    assert list(with_input) == list(want), f"{name}: cases with an input"
    for case, x in want.items():
        assert_same_floats(with_input[case], x, f"{name}/{case} input")


def check_quantize_vectors(path):
    """refinfer's quantize of every stored input gives the stored bytes (ggml's)."""
    doc = _doc(path)
    t = _registered(doc["type"])
    cases = [c for c in doc["cases"] if "input" in c]
    assert t.quantize_blocks is not None and cases, t.name
    for case in cases:
        got = quant.quantize(_f32(case["input"]), t.name).tobytes().hex()
        assert got == case["bytes"], f"{t.name}/{case['name']}: quantize gave {got}, expected {case['bytes']}"


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.stem)
def test_refinfer_quantize_matches_vectors(path):
    check_quantize_vectors(path)


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.stem)
def test_ggml_still_reproduces_vectors(path, ggml):
    doc = _doc(path)
    name = doc["type"]
    with np.errstate(invalid="ignore", over="ignore"):
        for case in doc["cases"]:
            if "input" in case:
                got = bytes(mv.ggml_quantize(ggml, name, _f32(case["input"]))).hex()
                assert got == case["bytes"], f"{name}/{case['name']}: ggml now quantizes to {got}"
            assert_same_floats(mv.ggml_dequantize(ggml, name, _raw(case)), _f32(case["dequantized"]),
                               f"{name}/{case['name']} ggml dequantize")


def test_q4_0_known_answer():
    # independent of every program: arange(32) - 15.5 has max = -15.5 (first largest |x|), so
    # d = -15.5 / -8 = 1.9375; codes trunc(x/d + 8.5) clamp at 15 for +15.5
    case = next(c for c in _doc(FORMATS / "vectors" / "q4_0.json")["cases"] if c["name"] == "known_answer_arange")
    raw = _raw(case)
    assert raw[:2].view("<f2")[0] == np.float16(1.9375)
    lo, hi = raw[2:] & 0x0F, raw[2:] >> 4
    assert lo.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8]
    assert hi.tolist() == [8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15, 15]


# ---- the Markdown specs -----------------------------------------------------------------------

def _spec_numbers(name: str) -> dict[str, int]:
    text = (FORMATS / f"{name}.md").read_text()
    found = {}
    for key, pattern in (("type_id", r"^\| ggml type id \| (\d+) \|"),
                         ("block_size", r"^\| block size \| (\d+) (?:weight|value)s? \|"),
                         ("type_size", r"^\| type size \| (\d+) bytes? \|")):
        m = re.search(pattern, text, re.M)
        assert m, f"formats/{name}.md has no '{key}' row"
        found[key] = int(m.group(1))
    return found


def test_every_registered_type_has_spec_and_vectors():
    missing = [f"{n}: {what}" for n in quant.TYPES
               for what, p in (("spec", FORMATS / f"{n}.md"), ("vectors", FORMATS / "vectors" / f"{n}.json"))
               if not p.exists()]
    assert not missing, f"types without a spec or vector file: {missing}"


@pytest.mark.parametrize("name", list(mv.TYPES))
def test_spec_matches_vector_header(name):
    doc = _doc(FORMATS / "vectors" / f"{name}.json")
    assert _spec_numbers(name) == {"type_id": doc["ggml_type_id"], "block_size": doc["block_size"],
                                   "type_size": doc["type_size"]}


@pytest.mark.parametrize("name", list(quant.TYPES))
def test_spec_matches_registry(name):
    t = quant.TYPES[name]
    assert _spec_numbers(name) == {"type_id": t.type_id, "block_size": t.block_size, "type_size": t.type_size}


def test_spec_matches_ggml_traits(ggml):
    for name in mv.TYPES:
        tr = ggml.traits(name)
        nums = _spec_numbers(name)
        assert (tr.blck_size, tr.type_size) == (nums["block_size"], nums["type_size"]), name


def test_readme_indexes_every_spec():
    readme = (FORMATS / "README.md").read_text()
    for name in mv.TYPES:
        assert f"({name}.md)" in readme, f"formats/README.md does not link {name}.md"


# ---- the spec text, transcribed literally, against the vectors ---------------------------------
# Scalar loops over the element formulas written in formats/<type>.md (one float32 operation at a
# time), so a wrong index or operation order in a spec fails here rather than in another engine.

def _h(raw, off):  # fp16 field -> float32
    return np.float32(raw[off:off + 2].view("<f2")[0])


def _spec_q2_K(b):
    d, dmin = _h(b, 80), _h(b, 82)
    y = np.empty(256, np.float32)
    for e in range(256):
        h, r = divmod(e, 128)
        k, l = divmod(r, 32)
        q = (int(b[16 + 32 * h + l]) >> (2 * k)) & 3
        sc = int(b[e // 16])
        dl, ml = d * np.float32(sc & 0xF), dmin * np.float32(sc >> 4)
        y[e] = dl * np.float32(q) - ml
    return y


def _spec_q3_K(b):
    d = _h(b, 108)
    hmask, qs, sc12 = b[0:32], b[32:96], b[96:108]
    y = np.empty(256, np.float32)
    for e in range(256):
        h, r = divmod(e, 128)
        k, l = divmod(r, 32)
        lo = (int(qs[32 * h + l]) >> (2 * k)) & 3
        hb = (int(hmask[e % 32]) >> (e // 32)) & 1
        q = lo - (0 if hb else 4)
        s = e // 16
        low4 = int(sc12[s]) & 0xF if s < 8 else int(sc12[s - 8]) >> 4
        high2 = (int(sc12[8 + s % 4]) >> (2 * (s // 4))) & 3
        dl = d * np.float32((low4 | high2 << 4) - 32)
        y[e] = dl * np.float32(q)
    return y


def _scale_min_k4(j, s):
    if j < 4:
        return int(s[j]) & 63, int(s[j + 4]) & 63
    return ((int(s[j + 4]) & 0xF) | (int(s[j - 4]) >> 6) << 4,
            (int(s[j + 4]) >> 4) | (int(s[j]) >> 6) << 4)


def _spec_q45_K(b, five):
    d, dmin = _h(b, 0), _h(b, 2)
    sc12 = b[4:16]
    qh, qs = (b[16:48], b[48:176]) if five else (None, b[16:144])
    y = np.empty(256, np.float32)
    for e in range(256):
        j, c, l = e // 32, e // 64, e % 32
        byte = int(qs[32 * c + l])
        q = byte & 0xF if j % 2 == 0 else byte >> 4
        if five:
            q += 16 * ((int(qh[l]) >> j) & 1)
        sc, m = _scale_min_k4(j, sc12)
        y[e] = (d * np.float32(sc)) * np.float32(q) - dmin * np.float32(m)
    return y


def _spec_q6_K(b):
    d = _h(b, 208)
    ql, qh, scales = b[0:128], b[128:192], b[192:208].view(np.int8)
    y = np.empty(256, np.float32)
    for e in range(256):
        h, r = divmod(e, 128)
        k, l = divmod(r, 32)
        byte = int(ql[64 * h + l + 32 * (k % 2)])
        low4 = byte & 0xF if k < 2 else byte >> 4
        hi2 = (int(qh[32 * h + l]) >> (2 * k)) & 3
        y[e] = (d * np.float32(scales[e // 16])) * np.float32((low4 | hi2 << 4) - 32)
    return y


def _spec_q8_K(b):
    d = b[0:4].view("<f4")[0]
    return d * b[4:260].view(np.int8).astype(np.float32)


def _spec_legacy(b, name):
    d = _h(b, 0)
    m = _h(b, 2) if name in ("q4_1", "q5_1") else None
    if name in ("q8_0", "q8_1"):
        return np.array([np.float32(q) * d for q in b[-32:].view(np.int8)], np.float32)
    qs = b[-16:]
    hbits = int.from_bytes(bytes(b[-20:-16]), "little") if name in ("q5_0", "q5_1") else 0
    y = np.empty(32, np.float32)
    for i in range(32):
        q = (int(qs[i % 16]) & 0xF) if i < 16 else int(qs[i % 16]) >> 4
        q |= ((hbits >> i) & 1) << 4
        offset = {"q4_0": 8, "q5_0": 16}.get(name, 0)
        y[i] = np.float32(q - offset) * d if m is None else np.float32(q) * d + m
    return y


SPEC_DEQUANT = {n: (lambda b, n=n: _spec_legacy(b, n)) for n in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q8_1")}
SPEC_DEQUANT |= {"q2_K": _spec_q2_K, "q3_K": _spec_q3_K, "q4_K": lambda b: _spec_q45_K(b, False),
                "q5_K": lambda b: _spec_q45_K(b, True), "q6_K": _spec_q6_K, "q8_K": _spec_q8_K}


@pytest.mark.parametrize("name", list(SPEC_DEQUANT))
def test_spec_dequantize_formulas_reproduce_vectors(name):
    doc = _doc(FORMATS / "vectors" / f"{name}.json")
    ts = doc["type_size"]
    with np.errstate(invalid="ignore", over="ignore"):
        cases = [(c, np.concatenate([SPEC_DEQUANT[name](blk) for blk in _raw(c).reshape(-1, ts)]))
                 for c in doc["cases"]]
    for case, got in cases:
        assert_same_floats(got, _f32(case["dequantized"]), f"{name}/{case['name']} spec formula")


@pytest.mark.parametrize("name", ["q8_K"])
def test_spec_bsums(name):
    for case in _doc(FORMATS / "vectors" / f"{name}.json")["cases"]:
        for blk in _raw(case).reshape(-1, 292):
            qs = blk[4:260].view(np.int8).astype(np.int32)
            assert blk[260:292].view("<i2").tolist() == qs.reshape(16, 16).sum(axis=1).tolist()
