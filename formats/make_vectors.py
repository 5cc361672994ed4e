"""Write the known-answer vectors formats/vectors/<type>.json from ggml itself.

Every expected value comes from the C library (libggml-base, loaded through tests/oracle.py):
bytes from ggml_quantize_chunk (no imatrix, which calls quantize_row_<type>_ref) or, for the
activation types, quantize_row_q8_1_ref / quantize_row_q8_K_ref; floats from the type's
to_float (dequantize_row_<type>). Two types have no ggml dequantizer and are documented as such:
f32 (the bytes are the floats) and q8_1 (this script computes float32(q) * float32(d)).
refinfer is never consulted: every case with an input stores it, whatever refinfer computes.

    python formats/make_vectors.py            # rewrite formats/vectors/*.json
    python formats/make_vectors.py --check    # exit 1 if a committed file differs

The output is deterministic: fixed seeds, sorted keys, no timestamps.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import pathlib
import sys
import zlib

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from oracle import GGML_TYPE_IDS, Ggml  # noqa: E402

F32 = np.float32

# name: (block size, bytes per block, ggml quantizer, ggml dequantizer)
TYPES = {
    "f32": (1, 4, "memcpy (ggml_quantize_chunk)", "none: the bytes are the float32 values"),
    "f16": (1, 2, "ggml_fp32_to_fp16_row", "ggml_fp16_to_fp32_row (to_float)"),
    "bf16": (1, 2, "ggml_fp32_to_bf16_row_ref", "ggml_bf16_to_fp32_row (to_float)"),
    "q4_0": (32, 18, "quantize_row_q4_0_ref", "dequantize_row_q4_0"),
    "q4_1": (32, 20, "quantize_row_q4_1_ref", "dequantize_row_q4_1"),
    "q5_0": (32, 22, "quantize_row_q5_0_ref", "dequantize_row_q5_0"),
    "q5_1": (32, 24, "quantize_row_q5_1_ref", "dequantize_row_q5_1"),
    "q8_0": (32, 34, "quantize_row_q8_0_ref", "dequantize_row_q8_0"),
    "q8_1": (32, 36, "quantize_row_q8_1_ref", "none in ggml: float32(q) * float32(fp16 d), computed by make_vectors.py"),
    "q2_K": (256, 84, "quantize_row_q2_K_ref", "dequantize_row_q2_K"),
    "q3_K": (256, 110, "quantize_row_q3_K_ref", "dequantize_row_q3_K"),
    "q4_K": (256, 144, "quantize_row_q4_K_ref", "dequantize_row_q4_K"),
    "q5_K": (256, 176, "quantize_row_q5_K_ref", "dequantize_row_q5_K"),
    "q6_K": (256, 210, "quantize_row_q6_K_ref", "dequantize_row_q6_K"),
    "q8_K": (256, 292, "quantize_row_q8_K_ref", "dequantize_row_q8_K"),
}
LEGACY = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q8_1")
FLOATS = ("f32", "f16", "bf16")
KQUANTS = ("q2_K", "q3_K", "q4_K", "q5_K", "q6_K")
DEQUANTIZE_ONLY = "random_bytes_finite_scales"  # the one case without an input (K-quants only)
# byte offsets of the fp16 super-block scales, overwritten with finite values in random blocks
KQUANT_FP16_FIELDS = {"q2_K": (80, 82), "q3_K": (108,), "q4_K": (0, 2), "q5_K": (0, 2), "q6_K": (208,)}


# ---- the oracle: one place that knows which ggml entry point defines each type -----------------

def ggml_quantize(g: Ggml, name: str, x: np.ndarray) -> np.ndarray:
    """float32[n] -> uint8[n // block_size * type_size], from ggml."""
    x = np.ascontiguousarray(x, dtype=np.float32).ravel()
    if name in ("q8_1", "q8_K"):
        return g.quantize_row_ref(x, name)
    return g.quantize(x[None], name)[0]


def ggml_dequantize(g: Ggml, name: str, raw: np.ndarray) -> np.ndarray:
    """uint8[nb * type_size] -> float32[nb * block_size], from ggml (see TYPES for the two
    types ggml cannot dequantize)."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8).ravel()
    if name == "f32":
        return raw.view("<f4").astype(np.float32)
    if name == "q8_1":
        b = raw.reshape(-1, 36)
        d = b[:, 0:2].copy().view("<f2").astype(np.float32)  # [nb, 1]
        return (b[:, 4:].view(np.int8).astype(np.float32) * d).ravel()
    if name == "q8_K":
        fn = g.lib.dequantize_row_q8_K
        fn.restype, fn.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        out = np.zeros(raw.size // 292 * 256, dtype=np.float32)
        fn(raw.ctypes.data, out.ctypes.data, out.size)
        return out
    return g.dequantize(raw, name)


def ggml_version(g: Ggml) -> str:
    L = g.lib
    L.ggml_version.restype = ctypes.c_char_p
    L.ggml_commit.restype = ctypes.c_char_p
    return f"{L.ggml_version().decode()} ({L.ggml_commit().decode()})"


# ---- encoding ---------------------------------------------------------------------------------

def f32_bits_hex(x: np.ndarray) -> list[str]:
    return [f"{int(u):08x}" for u in np.asarray(x, dtype="<f4").view("<u4")]


def readable(x: np.ndarray) -> list[str]:
    return [str(np.float32(v)) for v in np.asarray(x, dtype=np.float32)]


# ---- inputs -----------------------------------------------------------------------------------

def _rng(name: str, case: str) -> np.random.Generator:
    # one seed per (type, case), so adding a case never changes the others; crc32, unlike
    # hash(), is the same in every Python process
    return np.random.default_rng(zlib.crc32(f"{name}/{case}".encode()))


def _blocks(x, bs):  # every input is a whole number of blocks
    x = np.asarray(x, dtype=np.float32).ravel()
    assert x.size % bs == 0, (x.size, bs)
    return x


def legacy_inputs(name: str) -> dict[str, np.ndarray]:
    bs = 32
    zeros = np.zeros(bs, F32)
    if name in ("q4_0", "q5_0"):
        half = 8 if name == "q4_0" else 16
        # max = -half gives d = 1 exactly (x*id = x); max = +half gives d = -1. Every other
        # value is k + 0.5, so x*id + half + 0.5 lands exactly on an integer before trunc.
        ties = np.concatenate([[-half], np.arange(bs - 1) % (2 * half) - half + 0.5])
        tie_cases = np.concatenate([ties, -ties])
    elif name in ("q4_1", "q5_1"):
        top = 15 if name == "q4_1" else 31
        lo = -8 if name == "q4_1" else -16
        # min = lo, max = lo + top gives d = 1 exactly: (x - min) = k + 0.5 exactly
        body = lo + np.arange(bs - 2) % top + 0.5
        tie_cases = np.concatenate([[lo, lo + top], body])
    else:  # q8_0, q8_1: amax = 127 gives d = 1, x*id = x; roundf rounds k + 0.5 away from zero
        body = np.arange(-15, 15) + 0.5
        tie_cases = np.concatenate([[127, -2.5], body])
    rep = np.zeros(bs, F32)
    rep[[3, 10, 20]] = [7, -7, 7]
    rep[[0, 1, 2]] = [1.0, -2.0, 3.5]
    rep2 = rep.copy()
    rep2[[3, 10, 20]] = [-7, 7, -7]
    g = _rng(name, "gaussian")
    unit = g.standard_normal(bs).astype(F32)
    unit /= np.max(np.abs(unit))  # amax 1: the factors below are the blocks' amax
    # d is about amax/8 (q4_0), amax/16 (q5_0), range/15, range/31, amax/127: choose amax so the
    # fp16 d is subnormal (< 2**-14 = 6.1e-5) or beyond 65504
    sub_amax = {"q4_0": 2e-4, "q5_0": 4e-4, "q4_1": 2e-4, "q5_1": 4e-4, "q8_0": 3e-3, "q8_1": 3e-3}[name]
    over_amax = {"q4_0": 1e6, "q5_0": 2e6, "q4_1": 1e6, "q5_1": 2e6, "q8_0": 1e7, "q8_1": 1e7}[name]
    cases = {
        "known_answer_arange": np.arange(bs, dtype=F32) - F32(15.5),
        "all_zero": zeros,
        "negative_zero": np.full(bs, -0.0, F32),
        "mixed_signed_zeros": np.where(np.arange(bs) % 2 == 0, F32(0.0), F32(-0.0)).astype(F32),
        "constant_block": np.full(bs, 0.3, F32),
        "exact_half_ties": tie_cases,
        "repeated_max_positive_first": rep,
        "repeated_max_negative_first": rep2,
        "scale_fp16_subnormal": unit * F32(sub_amax),
        "scale_fp16_overflow_inf": unit * F32(over_amax),
        "huge_1e30": unit * F32(1e30),
        "tiny_1e-30": unit * F32(1e-30),
        "gaussian_seeded": _rng(name, "gaussian4").standard_normal(4 * bs).astype(F32),
        "heavy_tailed_student_t": _rng(name, "heavy").standard_t(1.5, 2 * bs).astype(F32),
    }
    return {k: _blocks(v, bs) for k, v in cases.items()}


def float_inputs(name: str) -> dict[str, np.ndarray]:
    ulp16 = 2.0 ** -10
    cases = {
        "known_values": np.array([0.0, 1.0, -1.0, 0.5, -2.5, 3.140625, 65504.0, 1.0 / 3.0], F32),
        "all_zero": np.zeros(8, F32),
        "negative_zero": np.full(8, -0.0, F32),
        "gaussian_seeded": _rng(name, "gaussian").standard_normal(32).astype(F32),
        "heavy_tailed_student_t": _rng(name, "heavy").standard_t(1.5, 32).astype(F32),
        "huge_1e30": np.array([1e30, -1e30, 3.4028235e38, -3.4028235e38], F32),
        "tiny_1e-30": np.array([1e-30, -1e-30, 1e-40, -1e-45], F32),
    }
    if name == "f16":
        # halfway between two fp16 values: round to the even mantissa
        cases["round_half_even_ties"] = np.array(
            [1 + ulp16 / 2, 1 + 3 * ulp16 / 2, -(1 + ulp16 / 2), 2048 + 1, 2048 + 3,
             2.0 ** -25, 3 * 2.0 ** -25, -(2.0 ** -25)], F32)
        cases["fp16_subnormal"] = np.array([1e-5, -1e-5, 6e-8, 2.0 ** -24, 6.1e-5, 5.9604645e-08], F32)
        cases["fp16_overflow"] = np.array([65504, 65519.996, 65520, -65520, 1e5, 70000], F32)
    elif name == "bf16":
        ulp = 2.0 ** -7
        cases["round_half_even_ties"] = np.array(
            [1 + ulp / 2, 1 + 3 * ulp / 2, -(1 + ulp / 2), 257, 259, 2.0 ** -134, 3 * 2.0 ** -134, -259], F32)
        cases["bf16_overflow"] = np.array([3.3961776e38, 3.4028235e38, -3.4028235e38, 3.3895314e38], F32)
    return cases


def q8_K_inputs() -> dict[str, np.ndarray]:
    bs = 256
    ties = np.zeros(bs, F32)
    ties[0] = -127  # max = -127 gives iscale = -127/max = 1 exactly; nearest_int rounds half to even
    ties[1:61] = np.arange(-30, 30) + 0.5
    rep = np.zeros(bs, F32)
    rep[[5, 40, 200]] = [9, -9, 9]
    rep[:5] = [1, 2, 3, -4, 0.5]
    unit = _rng("q8_K", "gaussian").standard_normal(bs).astype(F32)
    unit /= np.max(np.abs(unit))
    return {
        "known_answer_arange": np.arange(bs, dtype=F32) - F32(127.5),
        "all_zero": np.zeros(bs, F32),
        "negative_zero": np.full(bs, -0.0, F32),
        "exact_half_ties": ties,
        "repeated_max_positive_first": rep,
        "repeated_max_negative_first": -rep,
        "huge_1e30": unit * F32(1e30),
        "tiny_1e-30": unit * F32(1e-30),
        "gaussian_seeded": _rng("q8_K", "gaussian2").standard_normal(2 * bs).astype(F32),
        "heavy_tailed_student_t": _rng("q8_K", "heavy").standard_t(1.5, bs).astype(F32),
    }


def kquant_inputs(name: str) -> dict[str, np.ndarray]:
    bs = TYPES[name][0]
    return {
        "ggml_quantized_gaussian": _rng(name, "gaussian").standard_normal(2 * bs).astype(F32),
        "ggml_quantized_heavy_tailed": _rng(name, "heavy").standard_t(1.5, bs).astype(F32),
        "ggml_quantized_all_zero": np.zeros(bs, F32),
    }


def inputs(name: str) -> dict[str, np.ndarray]:
    """The seeded inputs of name's quantize cases, by case name."""
    if name in KQUANTS:
        return kquant_inputs(name)
    return q8_K_inputs() if name == "q8_K" else float_inputs(name) if name in FLOATS else legacy_inputs(name)


def random_bytes_case(name: str) -> np.ndarray:
    """A dequantize-only case for each K-quant: random bytes with finite fp16 scales of either
    sign (NaN/inf scales are not a format property worth pinning; they just propagate)."""
    ts = TYPES[name][1]
    rng = _rng(name, "bytes")
    raw = rng.integers(0, 256, size=(3, ts), dtype=np.uint8)
    for off in KQUANT_FP16_FIELDS[name]:
        vals = (rng.standard_normal(3) * 0.05).astype(np.float16)
        raw[:, off:off + 2] = vals.view(np.uint8).reshape(3, 2)
    return raw.ravel()


# ---- assembly ---------------------------------------------------------------------------------

def build(g: Ggml, name: str) -> dict:
    bs, ts, qfn, dqfn = TYPES[name]
    cases = []
    if name in KQUANTS:
        cases.append(_case(g, name, DEQUANTIZE_ONLY, None, random_bytes_case(name)))
    for case, x in inputs(name).items():
        cases.append(_case(g, name, case, x, ggml_quantize(g, name, x)))
    return {
        "type": name,
        "ggml_type_id": GGML_TYPE_IDS[name],
        "block_size": bs,
        "type_size": ts,
        "source": f"ggml {ggml_version(g)} {qfn} / {dqfn}",
        "cases": cases,
    }


def _case(g: Ggml, name: str, case: str, x, raw: np.ndarray) -> dict:
    deq = ggml_dequantize(g, name, raw)
    c = {"name": case}
    if x is not None:
        c["input"] = f32_bits_hex(x)
        c["input_readable"] = readable(x)
    c["bytes"] = bytes(raw).hex()
    c["dequantized"] = f32_bits_hex(deq)
    c["dequantized_readable"] = readable(deq)
    return c


def render(doc: dict) -> str:
    # one line per field, lists kept on their line: small files that still diff by case
    head = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items() if k != "cases")
    cases = ",\n".join("  {\n" + ",\n".join(f"   {json.dumps(k)}: {json.dumps(v)}" for k, v in c.items()) + "\n  }"
                        for c in doc["cases"])
    return "{\n" + head + ',\n "cases": [\n' + cases + "\n ]\n}\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    ap.add_argument("--out", type=pathlib.Path, default=HERE / "vectors")
    args = ap.parse_args(argv)
    g = Ggml()
    stale = []
    args.out.mkdir(parents=True, exist_ok=True)
    with np.errstate(over="ignore", invalid="ignore"):
        for name in TYPES:
            text = render(build(g, name))
            path = args.out / f"{name}.json"
            if args.check:
                if not path.exists() or path.read_text() != text:
                    stale.append(path.name)
            else:
                path.write_text(text)
    if stale:
        print("stale vector files:", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
