"""vLLM's fp8 KV caches (refinfer/kv_vllm.py) against torch's float8 conversions (round to
nearest even, the oracle) inside the finite range, and vLLM's __NV_SATFINITE saturation beyond
it, which torch does not do (it gives NaN or inf there)."""

from __future__ import annotations

import numpy as np
import pytest

from ci_skips import oracle_import
from refinfer.backends import kvdecode as kd
from refinfer.kv_cache import BlockPool, get_cache_type
from refinfer.kv_vllm import E4M3, E5M2

FORMATS = {"fp8": (E4M3, "float8_e4m3fn", 448.0, kd.fp8_e4m3_elem), "fp8_e5m2": (E5M2, "float8_e5m2", 57344.0,
                                                                                 kd.fp8_e5m2_elem)}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_codes_equal_torch_inside_the_range_ties_included(name):
    torch = oracle_import("torch")
    fmt, tname, mx, _ = FORMATS[name]
    tdt = getattr(torch, tname)
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(50000) * s for s in (1e-4, 0.05, 1, 40, 400)]).astype(np.float32)
    mids = ((fmt.values[:-1] + fmt.values[1:]) / 2).astype(np.float32)      # exact midpoints: ties to even
    x = np.concatenate([x[np.abs(x) <= mx], mids, -mids, [0.0, -0.0]]).astype(np.float32)
    want = torch.from_numpy(x).to(tdt).view(torch.uint8).numpy()
    np.testing.assert_array_equal(fmt.encode(x), want)
    codes = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(fmt.decode(codes), torch.from_numpy(codes).view(tdt).to(torch.float32).numpy())


def test_saturation_and_nan_as_satfinite():
    assert list(E4M3.encode(np.array([448, 465, 1e9, np.inf, -np.inf, np.nan], np.float32))) == [0x7E] * 4 + [0xFE, 0x7F]
    assert list(E5M2.encode(np.array([57344, 61440, np.inf, -1e30], np.float32))) == [0x7B] * 3 + [0xFB]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_the_cache_type_and_its_decoder(name):
    fmt, _, _, elem = FORMATS[name]
    t = get_cache_type(name)
    assert t.row_bytes(64) == 64 and BlockPool.bytes_per_block(2, 3, 64, 16, t, t) == 2 * 16 * 3 * 128
    rows = np.random.default_rng(2).standard_normal((5, 3, 64)).astype(np.float32) * 3
    raw = np.empty((5, 3, 64), np.uint8)
    t.store(raw, rows)
    got = t.load(raw)
    np.testing.assert_array_equal(got, fmt.decode(fmt.encode(rows)))
    for r in range(5):
        for h in range(3):
            assert [elem(raw[r, h], j, 64) for j in range(64)] == list(got[r, h])
    # half an ulp: 2^-4 (e4m3, 3 mantissa bits) or 2^-3 (e5m2) of |x|, or half the subnormal step
    rel, sub = (2.0 ** -4, 2.0 ** -10) if name == "fp8" else (2.0 ** -3, 2.0 ** -17)
    assert np.all(np.abs(got - rows) <= np.maximum(rel * np.abs(rows), sub))
