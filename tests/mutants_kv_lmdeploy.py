"""Injected bugs in the LMDeploy and calibrated KV cache types and calibrate-kv, each caught by
the check its ordinary test runs (tests/test_kv_lmdeploy.py, tests/test_calibrate_kv.py)."""

from __future__ import annotations

import numpy as np

from test_mutants import Mutant

from refinfer import kv_lmdeploy


def _kernel(name, exact):
    def check(request):
        from test_kv_lmdeploy import check_type_against_kernel
        check_type_against_kernel(name, exact)
    return check


def _calibrated(exact):
    def check(request):
        from test_kv_lmdeploy import test_calibrated_against_kernel
        for per_head in (False, True):
            test_calibrated_against_kernel(per_head, exact)
    return check


def _half_up(v):
    with np.errstate(invalid="ignore"):
        q = np.clip(np.floor(v + 0.5), 0, 255)
    return np.where(np.isnan(v), 0, q).astype(np.uint8)


def _rint_u8(v):
    with np.errstate(invalid="ignore"):
        q = np.clip(np.rint(v), 0, 255)
    return np.where(np.isnan(v), 0, q).astype(np.uint8)


def _unfused_fma(q, scale, zero, exact):         # q * scale rounded before + zero
    prod = (q.astype(np.float64) * scale.astype(np.float64)[..., None])
    prod = prod.astype(np.float16) if exact else prod.astype(np.float32)
    v = prod.astype(np.float64) + zero.astype(np.float64)[..., None]
    return v.astype(np.float16).astype(np.float32) if exact else v.astype(np.float32)


def _calibrated_half_even(x, scale, zp, exact=False):
    x = np.asarray(x, np.float32)
    if exact:
        x = x.astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = (x - np.asarray(zp, np.float32)[..., None]) / np.asarray(scale, np.float32)[..., None]
    v = np.where(np.isnan(v), np.float32(127), np.clip(v, -128, 127))
    return np.rint(v).astype(np.int8)


def _asym_256(mn, mx):
    mn, mx = np.asarray(mn, np.float32), np.asarray(mx, np.float32)
    return (mx - mn) / np.float32(256), (mx + mn) / np.float32(2)


def _minmax_check(request):
    from hf_models import make_hf_checkpoint
    from test_calibrate_kv import N_KV, N_LAYERS, check_minmax_matches_transformers
    model_dir = make_hf_checkpoint(request.getfixturevalue("tmp_path") / "llama", n_layers=N_LAYERS,
                                   n_kv_heads=N_KV, seed=7)
    check_minmax_matches_transformers(model_dir, True)


def _observer_skips_first_token(monkeypatch):
    from refinfer.commands import calibrate_kv
    orig = calibrate_kv.KVObserver.__call__
    monkeypatch.setattr(calibrate_kv.KVObserver, "__call__", lambda self, name, value: orig(self, name, value[1:]))


MUTANTS = [
    Mutant("kv_lmdeploy_int4_plain_nibble_order", lambda mp: mp.setattr(kv_lmdeploy, "ORDER", tuple(range(8))),
           _kernel("lmdeploy-int4", False)),
    Mutant("kv_lmdeploy_turbomind_rounds_half_up", lambda mp: mp.setattr(kv_lmdeploy, "_cvt_rni_sat_u8", _half_up),
           _kernel("lmdeploy-int8", False)),
    Mutant("kv_lmdeploy_exact_load_not_fused", lambda mp: mp.setattr(kv_lmdeploy, "_fma_load", _unfused_fma),
           _kernel("lmdeploy-int8", True)),
    Mutant("kv_lmdeploy_pt_rounds_half_even", lambda mp: mp.setattr(kv_lmdeploy, "_trunc_sat_u8", _rint_u8),
           _kernel("lmdeploy-pt-int8", False)),
    Mutant("kv_lmdeploy_pt_int4_pairs_adjacent_dims",
           lambda mp: mp.setattr(kv_lmdeploy, "_pack_pt_int4",
                                 lambda q: ((q[..., 0::2].astype(np.uint16) + q[..., 1::2] * 16) & 0xFF).astype(np.uint8)),
           _kernel("lmdeploy-pt-int4", False)),
    Mutant("kv_calibrated_rounds_half_even", lambda mp: mp.setattr(kv_lmdeploy, "calibrated_quantize", _calibrated_half_even),
           _calibrated(False)),
    Mutant("kv_calibrate_scale_over_256", lambda mp: mp.setattr(kv_lmdeploy, "asym_params", _asym_256), _minmax_check),
    Mutant("kv_calibrate_observer_skips_a_token", _observer_skips_first_token, _minmax_check),
]
