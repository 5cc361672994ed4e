"""Bit-exactness of the legacy block types (q4_0, q4_1, q5_0, q5_1, q8_0, q8_1) and f16/bf16
against libggml, plus the public API contract of refinfer.quant.

Quantize: refinfer.quant.quantize bytes == ggml_quantize_chunk (quantize_row_*_ref) bytes, or
quantize_row_q8_1_ref for q8_1. Dequantize: refinfer.quant.dequantize floats == the type's
ggml to_float (dequantize_row_*), bit for bit, NaN matching NaN.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from refinfer import quant
from refinfer.errors import NonFiniteError, ShapeError, UnsupportedError

F32 = np.float32
LEGACY = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q8_1"]
QUANTIZED = LEGACY + ["f16", "bf16"]
# ggml has a to_float for these; f32 has none (identity) and q8_1 none (activation type)
DEQUANTIZED = ["f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]

HYP = settings(max_examples=100, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def ggml_quantize(g, x, name):
    x = np.ascontiguousarray(x, dtype=np.float32).ravel()
    if name == "q8_1":
        return g.quantize_row_ref(x, name)
    return g.quantize(x[None], name)[0]


def ours_quantize(x, name):
    return quant.quantize(np.asarray(x, dtype=np.float32).ravel(), name)


def first_mismatch(a: np.ndarray, b: np.ndarray, ts: int) -> str:
    bad = np.flatnonzero(a != b)
    blk = bad[0] // ts
    return (f"{bad.size} bytes differ; first in block {blk}: refinfer {a[blk*ts:(blk+1)*ts].tobytes().hex()} "
            f"ggml {b[blk*ts:(blk+1)*ts].tobytes().hex()}")


def assert_quantize_equal(g, x, name):
    x = np.asarray(x, dtype=np.float32).ravel()
    ours, theirs = ours_quantize(x, name), ggml_quantize(g, x, name)
    if not np.array_equal(ours, theirs):
        t = quant.get_type(name)
        blk = np.flatnonzero(ours != theirs)[0] // t.type_size
        xb = x[blk * t.block_size:(blk + 1) * t.block_size]
        raise AssertionError(f"{name}: {first_mismatch(ours, theirs, t.type_size)}; input block "
                             f"{xb.view('<u4').tolist()} (float32 bits) = {xb.tolist()}")
    return ours


def assert_dequantize_equal(g, raw, name):
    raw = np.ascontiguousarray(raw, dtype=np.uint8).ravel()
    with np.errstate(invalid="ignore", over="ignore"):
        ours = quant.dequantize(raw, name).ravel()
    theirs = g.dequantize(raw, name)
    same = (ours.view("<u4") == theirs.view("<u4")) | (np.isnan(ours) & np.isnan(theirs))
    if not same.all():
        i = int(np.flatnonzero(~same)[0])
        t = quant.get_type(name)
        blk = i // t.block_size
        raise AssertionError(f"{name}: element {i} refinfer {ours[i]!r} ggml {theirs[i]!r}; block bytes "
                             f"{raw[blk*t.type_size:(blk+1)*t.type_size].tobytes().hex()}")


# ---- strategies -------------------------------------------------------------------------------

KINDS = ["normal", "uniform", "student_t", "cauchy", "huge", "tiny", "f32_subnormal", "d_subnormal",
         "d_overflow", "zeros", "negative_zeros", "signed_zeros", "repeated_max", "constant", "sparse"]


@st.composite
def structured_blocks(draw, bs: int, max_blocks: int = 4):
    """float32[n*bs] built by NumPy from a drawn kind, seed and scale."""
    kind = draw(st.sampled_from(KINDS))
    n = draw(st.integers(1, max_blocks)) * bs
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = F32(10.0 ** draw(st.integers(-6, 6)))
    if kind == "normal":
        x = rng.standard_normal(n) * scale
    elif kind == "uniform":
        x = rng.uniform(-1, 1, n) * scale + F32(draw(st.sampled_from([0.0, 1.0, -3.0]))) * scale
    elif kind == "student_t":
        x = rng.standard_t(draw(st.sampled_from([1.1, 2.0, 3.0])), n) * scale
    elif kind == "cauchy":
        x = rng.standard_cauchy(n) * scale
    elif kind == "huge":  # up to 1e38: block ranges near the top of float32
        x = np.clip(rng.standard_normal(n), -3.3, 3.3) * F32(10.0 ** draw(st.integers(30, 38)))
    elif kind == "tiny":  # down to the float32 subnormals
        x = rng.standard_normal(n) * F32(10.0 ** draw(st.integers(-45, -30)))
    elif kind == "f32_subnormal":
        sign = np.where(rng.integers(0, 2, n) == 1, 0x80000000, 0).astype(np.uint32)
        x = (rng.integers(0, 2**23, n, dtype=np.uint32) | sign).view(np.float32)
    elif kind == "d_subnormal":  # fp16(d) subnormal (below 2**-14) or rounding to zero
        x = rng.standard_normal(n) * F32(10.0 ** draw(st.integers(-9, -4)))
    elif kind == "d_overflow":  # fp16(d) beyond 65504
        x = rng.standard_normal(n) * F32(10.0 ** draw(st.integers(5, 9)))
    elif kind == "zeros":
        x = np.zeros(n)
    elif kind == "negative_zeros":
        x = np.full(n, -0.0)
    elif kind == "signed_zeros":
        x = np.where(rng.integers(0, 2, n) == 1, -0.0, 0.0)
    elif kind == "repeated_max":  # the same |max| several times with both signs
        x = rng.uniform(-1, 1, n) * scale
        m = F32(1.5) * scale
        idx = rng.choice(n, size=min(n, 4), replace=False)
        x[idx] = m * np.where(rng.integers(0, 2, idx.size) == 1, 1, -1)
    elif kind == "constant":
        x = np.full(n, rng.standard_normal() * scale)
    else:  # sparse
        x = np.where(rng.uniform(size=n) < 0.1, rng.standard_normal(n), 0.0) * scale
    return np.asarray(x, dtype=np.float32)


def raw_float32_blocks(bs: int, max_blocks: int = 3):
    """Any finite float32 values, including subnormals and the extremes; shrinks well."""
    return st.integers(1, max_blocks).flatmap(lambda k: hnp.arrays(
        np.float32, k * bs, elements=st.floats(width=32, allow_nan=False, allow_infinity=False)))


@st.composite
def exact_ties(draw, name: str):
    """A block whose scaled values x/d land exactly on k + 0.5 (before the +8.5/+16.5/+0.5
    offset or roundf), built with a power-of-two scale so every step is exact in float32."""
    e = draw(st.integers(-20, 20))
    s = F32(2.0 ** e)
    ks = np.array(draw(st.lists(st.integers(-40, 40), min_size=31, max_size=31)))
    if name in ("q4_0", "q5_0"):
        half = 8 if name == "q4_0" else 16
        sign = draw(st.sampled_from([1, -1]))
        body = np.clip(ks, -half, half - 1) + 0.5  # |body| < half: max stays first
        x = np.concatenate([[-sign * half], body * sign]) * s  # d = sign * s exactly
    elif name in ("q4_1", "q5_1"):
        top = 15 if name == "q4_1" else 31
        lo = draw(st.integers(-40, 40))
        body = lo + np.clip(ks, 0, top - 1) + 0.5
        x = np.concatenate([[lo], body]) * s
        x[draw(st.integers(1, 31))] = (lo + top) * s  # max = min + top*s: d = s exactly
    else:  # q8_0 / q8_1: amax = 127*s gives d = s
        sign = draw(st.sampled_from([1, -1]))
        x = np.concatenate([[sign * 127], np.clip(ks, -127, 126) + 0.5]) * s
    perm = np.random.default_rng(draw(st.integers(0, 2**16))).permutation(32)
    return np.asarray(x, dtype=np.float32)[perm]


def _bs(name):
    return quant.get_type(name).block_size


# ---- quantize: bytes equal ggml's -------------------------------------------------------------

@pytest.mark.parametrize("name", QUANTIZED)
@HYP
@given(data=st.data())
def test_quantize_structured(ggml, name, data):
    assert_quantize_equal(ggml, data.draw(structured_blocks(max(_bs(name), 32))), name)


@pytest.mark.parametrize("name", QUANTIZED)
@HYP
@given(data=st.data())
def test_quantize_any_finite_float32(ggml, name, data):
    assert_quantize_equal(ggml, data.draw(raw_float32_blocks(max(_bs(name), 8))), name)


@pytest.mark.parametrize("name", LEGACY)
@HYP
@given(data=st.data())
def test_quantize_exact_half_ties(ggml, name, data):
    x = data.draw(exact_ties(name))
    raw = assert_quantize_equal(ggml, x, name)
    # the construction really produced ties: the stored scale is the power of two chosen
    d = raw[:2].view("<f2")[0]
    assume(np.isfinite(d) and d != 0)
    assert abs(float(d)) == 2.0 ** np.round(np.log2(abs(float(d))))


@pytest.mark.parametrize("name", LEGACY)
def test_quantize_special_blocks(ggml, name):
    bs = 32
    rng = np.random.default_rng(7)
    cases = [np.zeros(bs), np.full(bs, -0.0), np.full(bs, 3.25), np.full(bs, -1e-3),
             np.arange(bs) - 15.5, -(np.arange(bs) - 15.5)]
    for sign in (1, -1):  # repeated max of both signs, either one first
        x = rng.uniform(-1, 1, bs)
        x[[2, 9, 30]] = [sign * 4.0, -sign * 4.0, sign * 4.0]
        cases.append(x)
    for mag in (1e38, 3.4e38, 1e-38, 1e-40, 1e-45, 6e-5 * 8, 65504 * 8, 65520 * 127):
        cases.append(rng.uniform(-1, 1, bs) * mag)
    for x in cases:
        assert_quantize_equal(ggml, np.asarray(x, dtype=np.float32), name)


# ---- dequantize: floats equal ggml's ----------------------------------------------------------

@pytest.mark.parametrize("name", DEQUANTIZED)
@HYP
@given(data=st.data())
def test_dequantize_random_bytes(ggml, name, data):
    ts = quant.get_type(name).type_size
    raw = data.draw(st.binary(min_size=ts, max_size=8 * ts))
    raw = np.frombuffer(raw[: len(raw) // ts * ts], dtype=np.uint8)
    assert_dequantize_equal(ggml, raw, name)


@pytest.mark.parametrize("name", [n for n in DEQUANTIZED if n in QUANTIZED])
@HYP
@given(data=st.data())
def test_dequantize_quantized(ggml, name, data):
    x = data.draw(structured_blocks(max(_bs(name), 32)))
    assert_dequantize_equal(ggml, ggml_quantize(ggml, x, name), name)


def test_dequantize_every_fp16_and_bf16_pattern(ggml):
    every = np.arange(2**16, dtype="<u2").view(np.uint8)
    for name in ("f16", "bf16"):
        assert_dequantize_equal(ggml, every, name)


def test_q8_1_has_no_ggml_dequantize_and_ours_is_q_times_d(ggml):
    assert not ggml.traits("q8_1").to_float
    x = np.random.default_rng(3).standard_normal(4 * 32).astype(F32)
    raw = ggml_quantize(ggml, x, "q8_1").reshape(4, 36)
    d = raw[:, :2].copy().view("<f2").astype(F32)
    want = raw[:, 4:].view(np.int8).astype(F32) * d
    assert np.array_equal(quant.dequantize(raw.ravel(), "q8_1").view("<u4"), want.ravel().view("<u4"))


# ---- large seeded sweep -----------------------------------------------------------------------

SWEEP_BLOCKS = 200_000
SWEEP_COUNTS: dict[str, int] = {}


def sweep_input(name: str, n_blocks: int) -> np.ndarray:
    """float32[n_blocks * bs]: Gaussian blocks with a random scale per block (1e-8..1e8), a
    share of heavy-tailed and tie-prone (multiples of 1/4) blocks."""
    bs = max(_bs(name), 1)
    rng = np.random.default_rng(20240601)
    x = rng.standard_normal((n_blocks, bs))
    x *= 10.0 ** rng.uniform(-8, 8, (n_blocks, 1))
    heavy = rng.uniform(size=n_blocks) < 0.2
    x[heavy] = rng.standard_cauchy((int(heavy.sum()), bs))
    grid = rng.uniform(size=n_blocks) < 0.1
    x[grid] = np.round(rng.standard_normal((int(grid.sum()), bs)) * 16) / 4
    return x.astype(np.float32).ravel()


@pytest.mark.slow
@pytest.mark.parametrize("name", QUANTIZED)
def test_sweep_quantize_and_dequantize(ggml, name, record_property):
    t = quant.get_type(name)
    n_blocks = SWEEP_BLOCKS if t.block_size > 1 else SWEEP_BLOCKS * 32
    x = sweep_input(name, n_blocks)
    raw = assert_quantize_equal(ggml, x, name)
    if name in DEQUANTIZED:
        assert_dequantize_equal(ggml, raw, name)
        noise = np.random.default_rng(5).integers(0, 256, n_blocks * t.type_size, dtype=np.uint8)
        assert_dequantize_equal(ggml, noise, name)
    SWEEP_COUNTS[name] = n_blocks
    record_property(f"{name}_blocks_compared", n_blocks)
    print(f"\n{name}: {n_blocks} blocks quantized and compared with ggml"
          + (f", plus {n_blocks} quantized and {n_blocks} random blocks dequantized" if name in DEQUANTIZED else ""))


# ---- API contract -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", QUANTIZED)
def test_shapes(name):
    t = quant.get_type(name)
    bs = t.block_size
    x = np.random.default_rng(1).standard_normal((3, 2, 4 * bs)).astype(F32)
    raw = quant.quantize(x, name)
    assert raw.dtype == np.uint8 and raw.shape == (3, 2, 4 * t.type_size)
    back = quant.dequantize(raw, name)
    assert back.dtype == np.float32 and back.shape == x.shape
    assert quant.quantize(x[0, 0], name).shape == (4 * t.type_size,)
    assert quant.quantize(np.zeros((0, bs), F32), name).shape == (0, t.type_size)


@pytest.mark.parametrize("name", QUANTIZED)
def test_type_by_name_and_id(name):
    t = quant.get_type(name)
    assert t.name == name
    assert quant.get_type(t.type_id) is t
    assert quant.get_type(np.int64(t.type_id)) is t
    assert quant.get_type(name.upper()) is t
    x = np.random.default_rng(2).standard_normal(2 * max(t.block_size, 32)).astype(F32)
    assert np.array_equal(quant.quantize(x, t.type_id), quant.quantize(x, name))


@pytest.mark.parametrize("bad", ["q9_9", "q4_2", "", 99, 4])
def test_unknown_type_lists_supported(bad):
    with pytest.raises(UnsupportedError) as e:
        quant.get_type(bad)
    msg = str(e.value)
    assert "q4_0" in msg and "q8_0" in msg and "f16" in msg


@pytest.mark.parametrize("name", LEGACY)
def test_last_axis_not_multiple_of_block(name):
    with pytest.raises(ShapeError, match="32"):
        quant.quantize(np.zeros((2, 33), F32), name)
    ts = quant.get_type(name).type_size
    with pytest.raises(ShapeError, match=str(ts)):
        quant.dequantize(np.zeros((2, ts + 1), np.uint8), name)


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_names_index(name, bad):
    x = np.zeros((2, 3, 64), F32)
    x[1, 2, 37] = bad
    with pytest.raises(NonFiniteError) as e:
        quant.quantize(x, name)
    assert "(1, 2, 37)" in str(e.value)
