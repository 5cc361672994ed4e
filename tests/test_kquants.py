"""Bit-exactness of the K-quant block types (q2_K, q3_K, q4_K, q5_K, q6_K, q8_K) against libggml.

Quantize: refinfer bytes == ggml_quantize_chunk without an imatrix (quantize_row_*_ref), or
quantize_row_q8_K_ref for q8_K. Dequantize: refinfer floats == ggml's dequantize_row_*, bit for
bit, a NaN matching any NaN. Hand-built blocks check the documented layouts independently.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from refinfer import quant
from refinfer.errors import NonFiniteError, ShapeError

F32 = np.float32
WEIGHT_TYPES = ["q2_K", "q3_K", "q4_K", "q5_K", "q6_K"]
ALL_TYPES = WEIGHT_TYPES + ["q8_K"]
TYPE_IDS = {"q2_K": 10, "q3_K": 11, "q4_K": 12, "q5_K": 13, "q6_K": 14, "q8_K": 15}
QK_K = 256

HYP = settings(max_examples=150, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- oracle access ----------------------------------------------------------------------------

def ggml_quantize(g, x, name):
    x = np.ascontiguousarray(x, dtype=F32).ravel()
    if name == "q8_K":  # an activation type: ggml_quantize_chunk does not take it
        return g.quantize_row_ref(x, name)
    return g.quantize(x[None], name)[0]


def ggml_dequantize(g, raw, name):
    raw = np.ascontiguousarray(raw, dtype=np.uint8).ravel()
    if name == "q8_K":  # no to_float in ggml's type traits; the row function is exported
        fn = g.lib.dequantize_row_q8_K
        fn.restype, fn.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        out = np.zeros(raw.size // 292 * QK_K, dtype=F32)
        fn(raw.ctypes.data, out.ctypes.data, out.size)
        return out
    return g.dequantize(raw, name)


def assert_quantize_equal(g, x, name):
    x = np.asarray(x, dtype=F32).ravel()
    ours, theirs = quant.quantize(x, name), ggml_quantize(g, x, name)
    if not np.array_equal(ours, theirs):
        ts = quant.get_type(name).type_size
        differ = np.flatnonzero((ours != theirs).reshape(-1, ts).any(axis=1))
        blk = int(differ[0])
        xb = x[blk * QK_K:(blk + 1) * QK_K]
        raise AssertionError(
            f"{name}: {differ.size} of {x.size // QK_K} blocks differ; first is block {blk}: refinfer "
            f"{ours[blk*ts:(blk+1)*ts].tobytes().hex()} ggml {theirs[blk*ts:(blk+1)*ts].tobytes().hex()}; "
            f"input float32 bits {xb.view('<u4').tolist()}")
    return ours


def assert_dequantize_equal(g, raw, name):
    raw = np.ascontiguousarray(raw, dtype=np.uint8).ravel()
    ours = quant.dequantize(raw, name).ravel()
    theirs = ggml_dequantize(g, raw, name)
    nan_o, nan_t = np.isnan(ours), np.isnan(theirs)
    same = (ours.view("<u4") == theirs.view("<u4")) | (nan_o & nan_t)
    if not same.all():
        i = int(np.flatnonzero(~same)[0])
        ts = quant.get_type(name).type_size
        blk = i // QK_K
        raise AssertionError(f"{name}: {int((~same).sum())} floats differ; element {i}: refinfer "
                             f"{ours[i]!r} ggml {theirs[i]!r}; block bytes "
                             f"{raw[blk*ts:(blk+1)*ts].tobytes().hex()}")


# ---- inputs -----------------------------------------------------------------------------------

KINDS = ["normal", "uniform", "student_t", "cauchy", "huge", "tiny", "f32_subnormal", "d_subnormal",
         "d_overflow", "zeros", "signed_zeros", "repeated_max", "constant", "sparse",
         "sub_block_scales", "one_sub_block", "positive", "small_integers"]


def make_blocks(kind: str, n_blocks: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """float32[n_blocks * 256] of one kind; the kinds aim at the branches of the K-quant
    searches: flat and all-zero sub-blocks, ties, fp16 overflow/underflow of d and dmin,
    float32 overflow inside the sums of squares."""
    n = n_blocks * QK_K
    if kind == "normal":
        x = rng.standard_normal(n) * scale
    elif kind == "uniform":
        x = (rng.uniform(-1, 1, n) + rng.choice([0.0, 1.0, -3.0])) * scale
    elif kind == "student_t":
        x = rng.standard_t(rng.choice([1.1, 2.0, 3.0]), n) * scale
    elif kind == "cauchy":
        x = rng.standard_cauchy(n) * scale
    elif kind == "huge":  # up to the top of float32: x*x and max - min overflow
        x = rng.standard_normal(n) * 10.0 ** rng.uniform(19, 38)
    elif kind == "tiny":  # around GROUP_MAX_EPS = 1e-15 and down to the subnormals
        x = rng.standard_normal(n) * 10.0 ** rng.uniform(-45, -12)
    elif kind == "f32_subnormal":
        sign = np.where(rng.integers(0, 2, n) == 1, 0x80000000, 0).astype(np.uint32)
        x = (rng.integers(0, 2**23, n, dtype=np.uint32) | sign).view(F32)
    elif kind == "d_subnormal":  # fp16(d) subnormal or rounding to zero
        x = rng.standard_normal(n) * 10.0 ** rng.uniform(-9, -4)
    elif kind == "d_overflow":  # fp16(d) beyond 65504
        x = rng.standard_normal(n) * 10.0 ** rng.uniform(5, 9)
    elif kind == "zeros":
        x = np.zeros(n)
    elif kind == "signed_zeros":
        x = np.where(rng.integers(0, 2, n) == 1, -0.0, 0.0)
    elif kind == "repeated_max":  # the same |max| several times per sub-block, both signs
        x = rng.uniform(-1, 1, n) * scale
        idx = rng.choice(n, size=n // 8, replace=False)
        x[idx] = 1.5 * scale * np.where(rng.integers(0, 2, idx.size) == 1, 1, -1)
    elif kind == "constant":
        x = np.repeat(rng.standard_normal(n_blocks) * scale, QK_K)
    elif kind == "sparse":
        x = np.where(rng.uniform(size=n) < 0.05, rng.standard_normal(n), 0.0) * scale
    elif kind == "sub_block_scales":  # every 16 weights at their own magnitude
        x = rng.standard_normal(n) * np.repeat(10.0 ** rng.uniform(-12, 6, n // 16), 16)
    elif kind == "one_sub_block":
        x = np.zeros(n)
        j = rng.integers(0, n // 16)
        x[16 * j:16 * j + 16] = rng.standard_normal(16) * scale
    elif kind == "positive":  # min > 0: the make_qkx2_quants min clamp
        x = np.abs(rng.standard_normal(n)) * scale + scale
    else:  # small_integers: many exact ties in x / d
        x = rng.integers(-4, 5, n) * scale
    with np.errstate(over="ignore"):
        return np.clip(np.asarray(x, dtype=np.float64), -3.4e38, 3.4e38).astype(F32)


@st.composite
def structured_blocks(draw, max_blocks=3):
    kind = draw(st.sampled_from(KINDS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = 10.0 ** draw(st.integers(-6, 6))
    return make_blocks(kind, draw(st.integers(1, max_blocks)), rng, scale)


def any_finite_float32_block():
    """One block of arbitrary finite float32 values (subnormals and extremes included)."""
    return hnp.arrays(F32, QK_K, elements=st.floats(width=32, allow_nan=False, allow_infinity=False))


# ---- layout and registry ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_TYPES)
def test_registry_entry_matches_ggml_traits(ggml, name):
    t = quant.get_type(name)
    assert t.name == name and t.type_id == TYPE_IDS[name]
    assert quant.get_type(TYPE_IDS[name]) is t and quant.get_type(name.upper()) is t
    assert t.block_size == QK_K == ggml.traits(name).blck_size
    assert t.type_size == t.layout.itemsize == ggml.traits(name).type_size
    assert t.activation_only == (name == "q8_K")
    assert t.quantize_blocks is not None


def test_type_sizes_are_the_documented_field_sums():
    sizes = {n: quant.get_type(n).type_size for n in ALL_TYPES}
    assert sizes == {"q2_K": 16 + 64 + 2 + 2, "q3_K": 32 + 64 + 12 + 2, "q4_K": 2 + 2 + 12 + 128,
                     "q5_K": 2 + 2 + 12 + 32 + 128, "q6_K": 128 + 64 + 16 + 2, "q8_K": 4 + 256 + 32}


# ---- hand-built blocks: the documented layouts, checked against ggml too ----------------------

def test_q4_K_hand_built_block(ggml):
    d, dmin = 0.5, 0.25  # exact in fp16: 0x3800, 0x3400
    sc = np.array([1, 2, 3, 63, 17, 33, 48, 5])
    m = np.array([0, 7, 63, 1, 32, 16, 9, 62])
    codes = np.random.default_rng(1).integers(0, 16, QK_K)
    raw = np.zeros(144, np.uint8)
    raw[0:2] = np.array([0x3800], "<u2").view(np.uint8)
    raw[2:4] = np.array([0x3400], "<u2").view(np.uint8)
    s = np.zeros(12, np.int64)  # the 6-bit packing spelled out byte by byte
    s[0:4] = sc[0:4] | ((sc[4:8] >> 4) << 6)
    s[4:8] = m[0:4] | ((m[4:8] >> 4) << 6)
    s[8:12] = (sc[4:8] & 15) | ((m[4:8] & 15) << 4)
    raw[4:16] = s
    for g in range(4):
        for l in range(32):
            raw[16 + 32 * g + l] = codes[64 * g + l] | (codes[64 * g + 32 + l] << 4)
    j = np.arange(QK_K) // 32
    want = (F32(d) * sc[j].astype(F32)) * codes.astype(F32) - F32(dmin) * m[j].astype(F32)
    assert np.array_equal(quant.dequantize(raw, "q4_K"), want)
    assert_dequantize_equal(ggml, raw, "q4_K")


def test_q3_K_hand_built_block(ggml):
    d = 0.125  # 0x3000
    sc = np.arange(16) * 4 + 1  # the stored 6-bit values; the decoded scale is sc - 32
    q = np.random.default_rng(2).integers(-4, 4, QK_K)  # signed 3-bit codes
    u = q + 4
    raw = np.zeros(110, np.uint8)
    for e in range(QK_K):
        if u[e] > 3:
            raw[e % 32] |= 1 << (e // 32)  # hmask: high bit set means "no -4"
        h, s, r = e // 128, (e % 128) // 32, e % 32
        raw[32 + 32 * h + r] |= (u[e] & 3) << (2 * s)
    for jj in range(16):
        if jj < 8:
            raw[96 + jj] |= sc[jj] & 15
        else:
            raw[96 + jj - 8] |= (sc[jj] & 15) << 4
        raw[96 + 8 + jj % 4] |= (sc[jj] >> 4) << (2 * (jj // 4))
    raw[108:110] = np.array([0x3000], "<u2").view(np.uint8)
    want = (F32(d) * (sc[np.arange(QK_K) // 16] - 32).astype(F32)) * q.astype(F32)
    assert np.array_equal(quant.dequantize(raw, "q3_K"), want)
    assert_dequantize_equal(ggml, raw, "q3_K")


def test_q6_K_hand_built_block(ggml):
    d = 2.0  # 0x4000
    scales = np.array([-128, 127, 1, -1, 5, 9, -7, 64, 3, 2, 1, 0, -3, -50, 100, 11])
    q = np.random.default_rng(3).integers(-32, 32, QK_K)  # signed 6-bit codes
    u = q + 32
    raw = np.zeros(210, np.uint8)
    for e in range(QK_K):
        h, j, l = e // 128, (e % 128) // 32, e % 32
        raw[64 * h + 32 * (j % 2) + l] |= (u[e] & 15) << (4 * (j // 2))
        raw[128 + 32 * h + l] |= (u[e] >> 4) << (2 * j)
    raw[192:208] = scales.astype(np.int8).view(np.uint8)
    raw[208:210] = np.array([0x4000], "<u2").view(np.uint8)
    want = (F32(d) * scales[np.arange(QK_K) // 16].astype(F32)) * q.astype(F32)
    assert np.array_equal(quant.dequantize(raw, "q6_K"), want)
    assert_dequantize_equal(ggml, raw, "q6_K")


def test_q8_K_layout_and_bsums(ggml):
    x = np.random.default_rng(11).standard_normal(3 * QK_K).astype(F32)
    raw = quant.quantize(x, "q8_K").reshape(3, 292)
    d = raw[:, 0:4].copy().view("<f4")[:, 0]
    qs = raw[:, 4:260].view(np.int8).astype(np.int64)
    bsums = raw[:, 260:292].copy().view("<i2")
    assert np.array_equal(bsums, qs.reshape(3, 16, 16).sum(axis=-1))
    assert np.array_equal(np.abs(qs).max(axis=1), [127, 127, 127])
    assert np.array_equal(quant.dequantize(raw, "q8_K"), d[:, None] * qs.astype(F32))
    assert_quantize_equal(ggml, x, "q8_K")


# ---- quantize: bytes equal ggml's -------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_TYPES)
@HYP
@given(x=structured_blocks())
def test_quantize_structured(ggml, name, x):
    raw = assert_quantize_equal(ggml, x, name)
    assert_dequantize_equal(ggml, raw, name)


@pytest.mark.parametrize("name", ALL_TYPES)
@settings(HYP, max_examples=15)
@given(x=any_finite_float32_block())
def test_quantize_any_finite_float32(ggml, name, x):
    assert_quantize_equal(ggml, x, name)


@pytest.mark.parametrize("name", ALL_TYPES)
def test_quantize_every_kind_seeded(ggml, name):
    rng = np.random.default_rng(2024)
    x = np.concatenate([make_blocks(kind, 24, rng, 10.0 ** rng.integers(-3, 4)) for kind in KINDS])
    assert_quantize_equal(ggml, x, name)


@pytest.mark.parametrize("name", WEIGHT_TYPES)
def test_quantize_sweep_gaussian_and_heavy_tailed(ggml, name, record_property):
    """A few thousand blocks: Gaussian with a random scale per block and Student-t(2)."""
    rng = np.random.default_rng(77)
    n = 2048
    gauss = rng.standard_normal((n, QK_K)) * 10.0 ** rng.uniform(-4, 4, (n, 1))
    heavy = rng.standard_t(2.0, (n, QK_K))
    raw = assert_quantize_equal(ggml, np.concatenate([gauss, heavy]).astype(F32), name)
    assert_dequantize_equal(ggml, raw, name)
    record_property(f"{name}_blocks_byte_equal", 2 * n)


# ---- dequantize: floats equal ggml's ----------------------------------------------------------

def _scale_fields(name):
    """(byte offset, width) of each float field of the block (d, dmin)."""
    layout = quant.get_type(name).layout
    return [(layout.fields[f][1], layout.fields[f][0].itemsize) for f in ("d", "dmin") if f in layout.fields]


@st.composite
def random_block_bytes(draw, name):
    ts = quant.get_type(name).type_size
    nb = draw(st.integers(1, 6))
    raw = np.frombuffer(draw(st.binary(min_size=nb * ts, max_size=nb * ts)), np.uint8).copy()
    if draw(st.booleans()):  # finite scales: the codes and packing decide every value
        blocks = raw.reshape(nb, ts)
        for off, width in _scale_fields(name):
            if width == 2:
                bits = draw(hnp.arrays(np.uint16, nb, elements=st.integers(0, 0xFFFF).filter(
                    lambda b: (b & 0x7C00) != 0x7C00)))
                blocks[:, off:off + 2] = bits.astype("<u2").view(np.uint8).reshape(nb, 2)
            else:
                vals = draw(hnp.arrays(F32, nb, elements=st.floats(width=32, allow_nan=False,
                                                                   allow_infinity=False)))
                blocks[:, off:off + 4] = vals.astype("<f4").view(np.uint8).reshape(nb, 4)
    return raw


@pytest.mark.parametrize("name", ALL_TYPES)
@settings(HYP, max_examples=60)
@given(data=st.data())
def test_dequantize_random_bytes(ggml, name, data):
    assert_dequantize_equal(ggml, data.draw(random_block_bytes(name)), name)


@pytest.mark.parametrize("name", ALL_TYPES)
def test_dequantize_many_random_blocks(ggml, name):
    """4096 blocks of uniform random bytes: inf/NaN d and dmin included (NaN must stay NaN)."""
    ts = quant.get_type(name).type_size
    raw = np.random.default_rng(5).integers(0, 256, 4096 * ts, dtype=np.uint8)
    assert_dequantize_equal(ggml, raw, name)


# ---- API contract -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_TYPES)
def test_shapes_and_errors(name):
    t = quant.get_type(name)
    x = np.random.default_rng(1).standard_normal((2, 3, 2 * QK_K)).astype(F32)
    raw = quant.quantize(x, name)
    assert raw.dtype == np.uint8 and raw.shape == (2, 3, 2 * t.type_size)
    back = quant.dequantize(raw, name)
    assert back.dtype == np.float32 and back.shape == x.shape
    with pytest.raises(ShapeError, match="256"):
        quant.quantize(np.zeros((2, 255), F32), name)
    with pytest.raises(ShapeError, match=str(t.type_size)):
        quant.dequantize(np.zeros((2, t.type_size + 1), np.uint8), name)
    x[1, 2, 300] = np.nan
    with pytest.raises(NonFiniteError, match=r"\(1, 2, 300\)"):
        quant.quantize(x, name)


@pytest.mark.parametrize("name", WEIGHT_TYPES)
def test_round_trip_error_is_small(name):
    """An independent sanity bound: relative RMS error of quantize -> dequantize on Gaussian
    data stays below what each bit width allows (2-bit ~0.3, 6-bit ~0.01)."""
    x = np.random.default_rng(9).standard_normal(64 * QK_K).astype(F32)
    err = quant.dequantize(quant.quantize(x, name), name) - x
    rel = float(np.sqrt(np.mean(err.astype(np.float64) ** 2) / np.mean(x.astype(np.float64) ** 2)))
    bound = {"q2_K": 0.4, "q3_K": 0.2, "q4_K": 0.1, "q5_K": 0.05, "q6_K": 0.025}[name]
    assert rel < bound, f"{name}: relative RMS error {rel:.4f} >= {bound}"
