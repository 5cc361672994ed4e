"""LMDeploy's KV cache types and int8-calibrated (refinfer/kv_lmdeploy.py) against scalar NumPy
transcriptions written from the kernels (InternLM/lmdeploy):

  TurboMind   src/turbomind/kernels/attention/quantization.h  warp_stats, ConvertKvCache<T, uint8_t /
              uint4_t> (pack), ConvertKvCache<uint8_t / uint4_t, half>; impl_81616.h __hfma
  PyTorch     lmdeploy/pytorch/kernels/cuda/fill_kv_cache.py _quant_int8 / _quant_int4,
              pagedattention.py ((k - kz) * ks)
  calibrated  v0.2.0 decoder_masked_multihead_attention_template.cuh quant / dequant,
              lite/apis/kv_qparams.py _export_asym

One element at a time, fp16 arithmetic as np.float16 scalar operations where the kernel computes
in half; every byte and every loaded value must be equal. Also the per-element decoders
(refinfer/backends/kvdecode.py) against the NumPy loads, bit for bit.
"""

from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import pytest

from refinfer import kv_cache
from refinfer.backends import kvdecode
from refinfer.errors import RefinferError, ShapeError
from refinfer.kv_lmdeploy import int8_calibrated

h, f32 = np.float16, np.float32
TYPES = ["lmdeploy-int8", "lmdeploy-int4", "lmdeploy-pt-int8", "lmdeploy-pt-int4"]


# ---- transcriptions -----------------------------------------------------------------------------
def cvt_rni_sat_u8(v) -> int:
    """PTX cvt.rni.sat.u8: nearest, ties to even; saturate to 0..255; NaN -> 0."""
    v = float(v)
    if math.isnan(v):
        return 0
    if v >= 255:
        return 255
    if v <= 0:
        return 0
    return int(round(v))        # Python's round: ties to even


def byte_perm(x, y, s):
    """__byte_perm(x, y, s): byte i of the result is byte (s >> 4i) & 7 of the 8 bytes {y, x}."""
    b = [(x >> (8 * i)) & 0xFF for i in range(4)] + [(y >> (8 * i)) & 0xFF for i in range(4)]
    return sum(b[(s >> (4 * i)) & 7] << (8 * i) for i in range(4))


def tm_pack8(q):
    """ConvertKvCache<T, uint4_t>::pack of 8 codes -> 4 bytes."""
    ui = [q[0] | q[1] << 8 | q[2] << 16 | q[3] << 24, q[4] | q[5] << 8 | q[6] << 16 | q[7] << 24]
    ui = [u | (u >> 12) for u in ui]
    uo = byte_perm(ui[0], ui[1], 0x5140)
    return [(uo >> (8 * i)) & 0xFF for i in range(4)]


def tm_unpack8(b):
    """cvt_f16x8_u4: h[0] = (bits 0-3, 16-19), h[1] = (4-7, 20-23) / 16, then the same of i4s >> 8."""
    i4s = b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24
    top = i4s >> 8
    return [i4s & 0xF, (i4s >> 16) & 0xF, (i4s >> 4) & 0xF, (i4s >> 20) & 0xF,
            top & 0xF, (top >> 16) & 0xF, (top >> 4) & 0xF, (top >> 20) & 0xF]


def f16_bytes(v):
    return list(np.array([v], "<f2").view(np.uint8))


def tm_ref(x, bits, exact):
    """One row: (bytes, loaded values). exact: T = half; ideal: every operation in float32."""
    qmax = (1 << bits) - 1
    T = h if exact else f32
    xs = [T(v) for v in x]
    mn, mx = T(np.inf), T(-np.inf)
    for v in xs:                                       # warp_minmax: Min / Max in T
        mn, mx = min(mn, v), max(mx, v)
    inv_q_max = f32(1) / f32(qmax)
    scale = h(f32(f32(mx) - f32(mn)) * inv_q_max)      # param[s][0] = (P)scale
    zero = h(mn)                                       # param[s][1] = (P)stats[0]
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = f32(1) / f32(scale)                      # fdividef(1.f, (float)scale)
        if exact:
            inv = h(inv)                               # inv_scale_ = (T)...
        q = [cvt_rni_sat_u8(T(T(v - T(zero)) * inv)) for v in xs]
    if bits == 4:
        q = [min(c, 15) for c in q]
        codes = [b for g in range(0, len(q), 8) for b in tm_pack8(q[g:g + 8])]
        q = [c for g in range(0, len(codes), 4) for c in tm_unpack8(codes[g:g + 4])]
    else:
        codes = q
    # dequant: fma(q, scale, zero), one rounding (Python floats hold q * scale + zero exactly)
    out = [float(c) * float(scale) + float(zero) for c in q]
    out = [f32(h(v)) if exact else f32(v) for v in out]
    return codes + f16_bytes(scale) + f16_bytes(zero), out


def trunc_u8(v):
    v = float(v)
    if math.isnan(v):
        return 0
    return int(min(max(math.trunc(v) if math.isfinite(v) else (255 if v > 0 else 0), 0), 255))


def pt_ref(x, bits, exact):
    qmax = (1 << bits) - 1
    T = h if (exact and bits == 8) else f32            # _quant_int8: the cache dtype; _quant_int4: .to(float32)
    xs = [T(h(v)) if exact else T(v) for v in x]
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        mn, mx = min(xs), max(xs)                      # tl.min / tl.max
        s = T(T(mx - mn) / T(qmax))
        z = T(-mn / s)
        q = [trunc_u8(T(T(T(v / s) + z) + T(0.5))) for v in xs]
        s16, z16 = h(s), h(z)                          # stored in the fp16 scales_zeros tensor
        if bits == 4:
            half = len(q) // 2
            codes = [(q[d] + q[d + half] * 16) & 0xFF for d in range(half)]
            q = [c & 0xF for c in codes] + [c >> 4 for c in codes]
        else:
            codes = q
        if exact:                                      # ((k - kz) * ks) in fp16
            out = [f32(h(h(h(c) - z16) * s16)) for c in q]
        else:
            out = [f32((float(c) - float(z16)) * float(s16)) for c in q]
    return codes + f16_bytes(s16) + f16_bytes(z16), out


def calibrated_ref(x, scale, zp, exact):
    codes, out = [], []
    for v in x:
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            a = f32(h(v)) if exact else f32(v)
            t = f32(f32(a - f32(zp)) / f32(scale))
        t = f32(127) if math.isnan(t) else min(f32(127), t)   # fminf(127.f, NaN) = 127
        t = max(f32(-128), t)
        c = int(Decimal(float(t)).quantize(Decimal(1), rounding=ROUND_HALF_UP))  # round(): half away from zero
        codes.append(c & 0xFF)
        out.append(f32(float(c) * float(f32(scale)) + float(f32(zp))))
    return codes, out


REFS = {"lmdeploy-int8": lambda x, e: tm_ref(x, 8, e), "lmdeploy-int4": lambda x, e: tm_ref(x, 4, e),
        "lmdeploy-pt-int8": lambda x, e: pt_ref(x, 8, e), "lmdeploy-pt-int4": lambda x, e: pt_ref(x, 4, e)}


# ---- rows ---------------------------------------------------------------------------------------
def make_rows(hd=32):
    """[n, hd] rows: normal, outliers, constant, tiny and huge ranges, fp16 extremes, ties."""
    rng = np.random.default_rng(15)
    rows = [rng.standard_normal(hd) * s for s in (0.01, 1.0, 3.0, 40.0)]
    out = rng.standard_normal(hd)
    out[3] = 80.0
    rows += [out, np.full(hd, 0.75), np.zeros(hd), np.full(hd, -3.0)]
    rows += [1.0 + rng.standard_normal(hd) * 1e-4,            # fp16 exact: scale < 1/65504, inv overflows
             100.0 + rng.standard_normal(hd) * 1e-2,          # large offset, small range
             rng.uniform(-60000, 60000, hd),                  # near the fp16 limits
             np.linspace(0, 255, hd), np.linspace(-1, 1, hd), # ties at every code
             rng.standard_normal(hd) * 1e-6,                  # subnormal fp16 range
             np.r_[0, 255, np.arange(hd - 2) + 0.5],          # int8 scale 1: every code a tie
             np.r_[0, 15, np.arange(hd - 2) % 15 + 0.5]]      # int4 scale 1: ties
    return np.array(rows, dtype=np.float32)


def store_load(ct, x):
    n, hd = x.shape
    dst = np.zeros((n, 1, ct.row_bytes(hd)), np.uint8)        # KV-head axis second to last
    ct.store(dst, x[:, None, :])
    return dst[:, 0], ct.load(dst)[:, 0]


def equal_f32(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return bool(np.array_equal(np.isnan(a), np.isnan(b)) and np.array_equal(a[~np.isnan(a)], b[~np.isnan(b)]))


def check_type_against_kernel(name, exact, hd=32):
    ct = kv_cache.get_cache_type(name)
    ct = ct.in_mode("ggml") if exact else ct
    x = make_rows(hd)
    got_bytes, got = store_load(ct, x)
    for i, row in enumerate(x):
        want_bytes, want = REFS[name](row, exact)
        assert list(got_bytes[i]) == want_bytes, f"{name} exact={exact} row {i}: bytes differ"
        assert equal_f32(got[i], want), f"{name} exact={exact} row {i}: loaded values differ"
        # the load alone, on the transcription's bytes
        assert equal_f32(ct.load(np.array(want_bytes, np.uint8)[None, None])[0, 0], want)


@pytest.mark.parametrize("exact", [False, True], ids=["ideal", "exact"])
@pytest.mark.parametrize("name", TYPES)
def test_type_against_kernel(name, exact):
    check_type_against_kernel(name, exact)


def test_exact_is_the_ggml_mode_variant():
    for name in TYPES:
        ct = kv_cache.CACHE_TYPES[name]
        assert ct.kind == "lmdeploy" and ct.exact is not None and ct.in_mode("ggml") is ct.exact
        assert ct.in_mode("ideal") is ct


def test_constant_rows():
    """TurboMind: scale 0, inv inf, NaN codes -> 0, every element loads as the row's value.
    The PyTorch engine divides by the zero scale: every element loads as NaN."""
    x = np.full((2, 16), -0.4375, np.float32)
    x[1] = 0.0
    for name in ("lmdeploy-int8", "lmdeploy-int4"):
        for ct in (kv_cache.CACHE_TYPES[name], kv_cache.CACHE_TYPES[name].exact):
            b, y = store_load(ct, x)
            assert not b[:, :-4].any() and np.array_equal(y, x)
    for name in ("lmdeploy-pt-int8", "lmdeploy-pt-int4"):
        _, y = store_load(kv_cache.CACHE_TYPES[name], x)
        assert np.isnan(y).all()


def test_nibble_order_and_layout():
    """Codes 0..15 with scale 1, zero 0: the bytes spell TurboMind's nibble order and the PyTorch
    engine's pairing of dim d with d + hd/2, then scale (fp16 1.0 = 0x3c00) and zero."""
    x = np.arange(16, dtype=np.float32)[None]
    b, y = store_load(kv_cache.CACHE_TYPES["lmdeploy-int4"], x)
    assert list(b[0]) == [0x20, 0x64, 0x31, 0x75, 0xA8, 0xEC, 0xB9, 0xFD, 0x00, 0x3C, 0x00, 0x00]
    assert np.array_equal(y, x)
    b, y = store_load(kv_cache.CACHE_TYPES["lmdeploy-pt-int4"], x)
    assert list(b[0]) == [d + 16 * (d + 8) for d in range(8)] + [0x00, 0x3C, 0x00, 0x80]   # zeros = -0.0
    assert np.array_equal(y, x)
    x8 = np.arange(0, 256, 17, dtype=np.float32)[None]                # scale (255 - 0) / 255 = 1
    b, y = store_load(kv_cache.CACHE_TYPES["lmdeploy-int8"], x8)
    assert list(b[0][:16]) == list(range(0, 256, 17)) and list(b[0][16:]) == [0x00, 0x3C, 0x00, 0x00]


def test_row_bytes_and_bad_head_dim():
    for hd in (8, 16, 64, 128, 256):
        assert kv_cache.CACHE_TYPES["lmdeploy-int8"].row_bytes(hd) == hd + 2 + 2
        assert kv_cache.CACHE_TYPES["lmdeploy-pt-int8"].row_bytes(hd) == hd + 2 + 2
        assert kv_cache.CACHE_TYPES["lmdeploy-int4"].row_bytes(hd) == hd // 2 + 2 + 2
        assert kv_cache.CACHE_TYPES["lmdeploy-pt-int4"].row_bytes(hd) == hd // 2 + 2 + 2
    assert kv_cache.CACHE_TYPES["lmdeploy-pt-int4"].row_bytes(12) == 6 + 4
    assert kv_cache.BlockPool.bytes_per_block(2, 3, 64, 16, "lmdeploy-int4", "lmdeploy-int8") == 2 * 16 * 3 * (36 + 68)
    for name, hd in (("lmdeploy-int4", 12), ("lmdeploy-int4", 4), ("lmdeploy-pt-int4", 7)):
        with pytest.raises(ShapeError, match=f"head_dim {hd}") as e:
            kv_cache.CACHE_TYPES[name].row_bytes(hd)
        assert "lmdeploy-int8" in e.value.hint
    pool = kv_cache.BlockPool(2, 2, 64, 4, 16, k_type="lmdeploy-int4", v_type="lmdeploy-pt-int8")
    assert pool.k.shape[-1] == 36 and pool.v.shape[-1] == 68


def test_fdividef_reciprocal_rounds_the_same():
    """T(fdividef(1, s)): for every positive finite fp16 scale, the fp16 of 1/s does not change when
    the float32 reciprocal is off by one ulp (the approximate reciprocal's error bound), so
    refinfer's correctly rounded 1/s gives TurboMind's fp16 inverse. (Off by two ulps: 28 scales differ.)"""
    s = np.arange(1, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)
    r = np.float32(1) / s
    with np.errstate(over="ignore"):
        want = (1.0 / s.astype(np.float64)).astype(np.float16)
        for k in (-1, 1):
            assert np.array_equal((r.view(np.int32) + k).view(np.float32).astype(np.float16), want)
        assert (r.view(np.int32) - 2).view(np.float32).astype(np.float16).tolist() != want.tolist()


def test_round_trip_bounded():
    """Within a row's range, ideal TurboMind and PyTorch-engine int8 / int4 lose at most half a step
    (plus what rounding scale and zero to fp16 moves the grid: 255 |scale16 - scale| + |zero16 - min|)."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((200, 64)) * rng.uniform(0.1, 10, (200, 1))).astype(np.float32)
    for name, qmax in (("lmdeploy-int8", 255), ("lmdeploy-int4", 15), ("lmdeploy-pt-int8", 255), ("lmdeploy-pt-int4", 15)):
        b, y = store_load(kv_cache.CACHE_TYPES[name], x)
        mn, mx = x.min(1), x.max(1)
        scale = (mx - mn) / qmax
        s16 = b[:, -4:-2].copy().view("<f2")[:, 0].astype(np.float64)
        if "pt" in name:
            z16 = b[:, -2:].copy().view("<f2")[:, 0].astype(np.float64)
            grid = qmax * np.abs(s16 - scale) + np.abs(z16 * s16 + mn)       # zeros = -min / s
        else:
            grid = qmax * np.abs(s16 - scale) + np.abs(b[:, -2:].copy().view("<f2")[:, 0] - mn)
        err = np.abs(y - x).max(1)
        assert (err <= s16 / 2 + grid + 1e-6 * np.abs(x).max(1)).all(), name


# ---- int8-calibrated ------------------------------------------------------------------------------
def params_dict(n_layers=2, n_kv=2, hd=16, per_head=False, seed=0):
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(n_layers):
        L = {}
        for w in "kv":
            mn = -rng.uniform(0.5, 4, n_kv if per_head else 1).astype(np.float32)
            mx = rng.uniform(0.5, 4, n_kv if per_head else 1).astype(np.float32)
            sc, zp = (mx - mn) / np.float32(255), (mx + mn) / np.float32(2)
            conv = (lambda a: [float(v) for v in a]) if per_head else (lambda a: float(a[0]))
            L.update({f"{w}_min": conv(mn), f"{w}_max": conv(mx), f"{w}_scale": conv(sc), f"{w}_zp": conv(zp)})
        layers.append(L)
    return {"format": "refinfer-kv-params", "version": 1, "granularity": "head" if per_head else "layer",
            "n_layers": n_layers, "n_kv_heads": n_kv, "head_dim": hd, "layers": layers}


@pytest.mark.parametrize("exact", [False, True], ids=["ideal", "exact"])
@pytest.mark.parametrize("per_head", [False, True], ids=["layer", "head"])
def test_calibrated_against_kernel(per_head, exact):
    d = params_dict(per_head=per_head)
    d["layers"][0]["k_scale"], d["layers"][0]["k_zp"] = ([0.5, 0.5], [0.0, 0.0]) if per_head else (0.5, 0.0)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((5, 2, 16)) * 3).astype(np.float32)      # beyond the range: clamped
    x[0, 0, :4] = [0.0, 1e-30, -1e30, 1e30]
    x[1] = (np.arange(16) - 8) * 0.5 + 0.25                          # layer 0 K: (x - 0) / 0.5 = ties
    for which in "kv":
        ct = kv_cache.get_cache_type("int8-calibrated", d, which)
        ct = ct.in_mode("ggml") if exact else ct
        assert ct.kind == "calibrated" and ct.row_bytes(16) == 16
        for layer in range(2):
            bt = ct.for_layer(layer)
            dst = np.zeros((5, 2, 16), np.uint8)
            bt.store(dst, x)
            y = bt.load(dst)
            L = d["layers"][layer]
            for t in range(5):
                for head in range(2):
                    pick = (lambda v: v[head]) if per_head else (lambda v: v)
                    codes, want = calibrated_ref(x[t, head], pick(L[f"{which}_scale"]), pick(L[f"{which}_zp"]), exact)
                    assert list(dst[t, head]) == codes
                    assert equal_f32(y[t, head], want)
            assert bt.scale == tuple(float(np.float32(s)) for s in np.broadcast_to(L[f"{which}_scale"], (2,)))


def test_calibrated_round_trip_bounded():
    d = params_dict(per_head=True)
    ct = int8_calibrated(d, "k").for_layer(1)
    L = d["layers"][1]
    mn, mx, sc = (np.array(L[k], np.float32)[:, None] for k in ("k_min", "k_max", "k_scale"))
    rng = np.random.default_rng(2)
    x = (mn + (mx - mn) * rng.uniform(0, 1, (300, 2, 16))).astype(np.float32)
    dst = np.zeros(x.shape, np.uint8)
    ct.store(dst, x)
    # measured max err / (scale / 2): 1.0000; the bound leaves float32 rounding room
    assert (np.abs(ct.load(dst) - x) <= sc / 2 * (1 + 1e-4)).all()


def test_calibrated_bad_params(tmp_path):
    with pytest.raises(RefinferError, match="needs calibrated parameters") as e:
        kv_cache.get_cache_type("int8-calibrated")
    assert "calibrate-kv" in e.value.hint and "--kv-params" in e.value.hint
    with pytest.raises(RefinferError, match="missing.json"):
        kv_cache.get_cache_type("int8-calibrated", tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RefinferError, match="bad.json.*not JSON"):
        kv_cache.get_cache_type("int8-calibrated", bad)
    cases = [("format", "other", "'format'"), ("version", 7, "'version'"), ("granularity", "tensor", "'granularity'"),
             ("n_layers", 3, "'layers' holds 2"), ("head_dim", 0, "'head_dim'")]
    for key, value, msg in cases:
        d = params_dict()
        d[key] = value
        with pytest.raises(RefinferError, match=msg):
            int8_calibrated(d)
    d = params_dict(per_head=True)
    d["layers"][1]["v_zp"] = [1.0]
    with pytest.raises(RefinferError, match=r"layers\[1\]\.v_zp.*2 finite numbers"):
        int8_calibrated(d)
    d = params_dict()
    d["layers"][0]["k_scale"] = -1.0
    with pytest.raises(RefinferError, match=r"layers\[0\]\.k_scale.*negative"):
        int8_calibrated(d)
    d = params_dict()
    d["layers"][0]["k_scale"] = float("nan")
    with pytest.raises(RefinferError, match="finite"):
        int8_calibrated(d)
    ct = int8_calibrated(params_dict())
    with pytest.raises(RefinferError, match="has 2 layers.*layer 2"):
        ct.for_layer(2)
    with pytest.raises(ShapeError, match="head_dim 32.*16"):
        ct.row_bytes(32)
    with pytest.raises(RefinferError, match="n_kv_heads"):
        ct.for_layer(0).store(np.zeros((1, 3, 16), np.uint8), np.zeros((1, 3, 16), np.float32))
    with pytest.raises(RefinferError, match="through a layer") as e:
        ct.load(np.zeros((1, 2, 16), np.uint8))
    assert "for_layer" in e.value.hint


def test_calibrated_through_the_block_manager():
    """BlockManager.write / gather go through k_type.for_layer(layer): each layer its own parameters."""
    d = params_dict(n_layers=2, n_kv=2, hd=16, per_head=True)
    kt, vt = int8_calibrated(d, "k"), int8_calibrated(d, "v")
    mgr = kv_cache.BlockManager(kv_cache.BlockPool(2, 2, 16, 4, 4, k_type=kt, v_type=vt))
    assert mgr.pool.k.shape[-1] == 16
    mgr.allocate("a", list(range(6)))
    rng = np.random.default_rng(4)
    k, v = (rng.standard_normal((2, 6, 2, 16)).astype(np.float32) for _ in range(2))
    for layer in range(2):
        mgr.write(layer, "a", 0, k[layer], v[layer])
    for layer in range(2):
        gk, gv = mgr.gather(layer, "a", 6)
        L = d["layers"][layer]
        for t in range(6):
            for head in range(2):
                assert equal_f32(gk[t, head], calibrated_ref(k[layer, t, head], L["k_scale"][head], L["k_zp"][head], False)[1])
                assert equal_f32(gv[t, head], calibrated_ref(v[layer, t, head], L["v_scale"][head], L["v_zp"][head], False)[1])


# ---- per-element decoders -------------------------------------------------------------------------
DECODERS = {"lmdeploy-int8": (kvdecode.lmdeploy_int8_elem, kvdecode.lmdeploy_int8_exact_elem),
            "lmdeploy-int4": (kvdecode.lmdeploy_int4_elem, kvdecode.lmdeploy_int4_exact_elem),
            "lmdeploy-pt-int8": (kvdecode.lmdeploy_pt_int8_elem, kvdecode.lmdeploy_pt_int8_exact_elem),
            "lmdeploy-pt-int4": (kvdecode.lmdeploy_pt_int4_elem, kvdecode.lmdeploy_pt_int4_exact_elem)}


def check_decoders(name, hd=32):
    ideal, exact = DECODERS[name]
    for ct, elem in ((kv_cache.CACHE_TYPES[name], ideal), (kv_cache.CACHE_TYPES[name].exact, exact)):
        x = make_rows(hd)
        b, y = store_load(ct, x)
        got = np.array([[elem(row, j, hd) for j in range(hd)] for row in b], np.float32)
        assert equal_f32(got, y) and np.array_equal(got.view(np.uint32)[~np.isnan(got)], y.view(np.uint32)[~np.isnan(y)])
        if elem is ideal:
            disp = np.array([[kvdecode.lmdeploy_elem(kvdecode.KINDS[name], row, j, hd) for j in range(hd)] for row in b])
            assert equal_f32(disp, y)


@pytest.mark.parametrize("name", TYPES)
def test_decoders(name):
    check_decoders(name)


def test_calibrated_decoder():
    d = params_dict(per_head=True)
    bt = int8_calibrated(d, "v").for_layer(0)
    x = (np.random.default_rng(5).standard_normal((7, 2, 16)) * 3).astype(np.float32)
    dst = np.zeros((7, 2, 16), np.uint8)
    bt.store(dst, x)
    y = bt.load(dst)
    for t in range(7):
        for head in range(2):
            got = [kvdecode.int8_calibrated_elem(dst[t, head], j, np.float32(bt.scale[head]), np.float32(bt.zp[head]))
                   for j in range(16)]
            assert np.array_equal(np.array(got, np.float32).view(np.uint32), y[t, head].view(np.uint32))
