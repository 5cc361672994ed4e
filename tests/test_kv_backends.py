"""Attention over every KV cache type on every accelerated backend, against the NumPy reference,
generated from the registry (kv_cache.cache_type_names(): a new type is covered here at once).

For each backend (numba; cuda in the CUDA simulator without a GPU, conftest.py) and each type
(K and V of that type, and K f32 with V of that type): random K/V written through the
backend's store_kv into a pool of block size 5 (no power of two), then one ragged step of three
segments (a prefill chunk after a cached prefix, a decode token, a whole prompt) with GQA,
compared with the reference's attention over the same pool bytes. The pool's bytes must be the
reference's store_kv bytes exactly. The row decoders are checked bit for bit against each
type's load, and the numba kernel's batch invariance per type (a row alone, in a ragged batch,
at another block size: the same bits), with a negative control that proves the check can fail.
"""

from __future__ import annotations

import numpy as np
import pytest

numba = pytest.importorskip("numba")

import kv_workloads  # noqa: E402
from ci_skips import oracle_import  # noqa: E402
from refinfer import kv_cache  # noqa: E402
from refinfer.backends import numba_backend  # noqa: E402
from refinfer.backends.numba_backend import NumbaBackend, NumbaFallbackWarning  # noqa: E402
from refinfer.backends.numba_kernels import ops as ok  # noqa: E402
from refinfer.backends.numpy_backend import NumpyBackend  # noqa: E402

TYPES = [n for n in kv_cache.cache_type_names()]       # f64 (the float64 reference's) is not listed
N_HEADS, N_KV = 6, 2                                   # GQA: 3 query heads per KV head
HD = {"numba": 64, "cuda": 32}                         # whole blocks of 32 for the ggml types
BLOCK_SIZE = 5
LENGTHS = [9, 11, 6]                                   # sequences 0, 1, 2
STEP = [(0, 4, 5), (1, 10, 1), (2, 0, 6)]              # (sequence, start, T): chunk, decode, whole prompt
# the simulator runs every thread in Python: 5 tokens x 4 heads (GQA 2) x 7 threads
CUDA_LENGTHS, CUDA_STEP, CUDA_HEADS = [4, 5, 2], [(0, 2, 2), (1, 4, 1), (2, 0, 2)], 4

# backend -> (NMSE bound, max |diff| / max |ref| bound, reason). Both paths evaluate every score,
# the softmax and the V sum in float64 and round once to float32, over the same float32 row
# values (the decoders equal each type's load bit for bit, test_row_decoders_equal_load); they
# differ only in summation order, which float64 hides before the rounding. Measured 0 and 0 for
# every type on both backends (hd 64 / 32, the shapes below); the bounds allow a few 1-ulp
# float32 flips (about 1e-16 NMSE, 2 ulp of the largest output).
TOLERANCES = {
    "numba": (1e-16, 2.4e-7, "float64 scores (8 lanes over d, a fixed tree) and position-order sums, one rounding; "
                             "the reference sums q.k in d order (measured NMSE 0, max-abs 0)"),
    "cuda": (1e-16, 2.4e-7, "float64 scores in d order, position-order sums, one rounding (measured NMSE 0, "
                            "max-abs 0 in the simulator)"),
}


def kv_params(n_kv, hd):
    """int8-calibrated parameters per KV head (the refinfer extension), for one layer, wide
    enough for rows of scale 1 and different per head so that a head mix-up shows."""
    return {"format": "refinfer-kv-params", "version": 1, "granularity": "head", "n_layers": 1,
            "n_kv_heads": n_kv, "head_dim": hd,
            "layers": [{"k_scale": [0.021 + 0.004 * h for h in range(n_kv)], "k_zp": [0.1 - 0.2 * h for h in range(n_kv)],
                        "v_scale": [0.019 + 0.003 * h for h in range(n_kv)], "v_zp": [0.05 * h for h in range(n_kv)]}]}


def cache_types(name, k_name=None, n_kv=N_KV, hd=64):
    """(K type, V type): V of type name, K of k_name (default the same)."""
    params = kv_params(n_kv, hd)
    return (kv_cache.get_cache_type(k_name or name, kv_params=params, which="k"),
            kv_cache.get_cache_type(name, kv_params=params, which="v"))


def check_close(backend, got, ref, what):
    nmse_bound, rel_bound, reason = TOLERANCES[backend]
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    diff = got - ref
    nmse = np.sum(diff ** 2) / np.sum(ref ** 2)
    rel = np.max(np.abs(diff)) / np.max(np.abs(ref))
    assert nmse <= nmse_bound and rel <= rel_bound, \
        f"{backend} {what}: NMSE {nmse:.3g} (bound {nmse_bound}), max-abs/max {rel:.3g} (bound {rel_bound}): {reason}"


def run_step(be, kt, vt, hd, lengths=LENGTHS, step=STEP, n_heads=N_HEADS, seed=0):
    """K/V rows stored through be.store_kv, then be.attention over the step -> (out, q, pool, kv)."""
    rows = kv_workloads.kv_rows(lengths, N_KV, hd, seed=seed)
    pool, kv = kv_workloads.filled_pool(be, rows, BLOCK_SIZE, kt, vt)
    q = kv_workloads.queries(step, n_heads, hd, seed=seed, scale=2.0)
    out = np.full_like(q, np.nan)
    be.attention(out, q, pool, 0, kv_workloads.meta(kv, step))
    return out, q, pool, kv


# ---- numba ----------------------------------------------------------------------------------------
def check_numba_type(name, k_name=None):
    hd = HD["numba"]
    kt, vt = cache_types(name, k_name, hd=hd)
    be = NumbaBackend()
    with _no_fallback():
        got, q, pool, kv = run_step(be, kt, vt, hd)
    ref_pool, _ = kv_workloads.filled_pool(NumpyBackend(), kv_workloads.kv_rows(LENGTHS, N_KV, hd), BLOCK_SIZE, kt, vt)
    np.testing.assert_array_equal(pool.k, ref_pool.k)
    np.testing.assert_array_equal(pool.v, ref_pool.v)
    ref = np.empty_like(got)
    NumpyBackend().attention(ref, q, pool, 0, kv_workloads.meta(kv, STEP))
    check_close("numba", got, ref, f"attention K {kt.name} V {vt.name}")


class _no_fallback:
    """No NumbaFallbackWarning inside: the kernel ran, not the reference."""

    def __enter__(self):
        import warnings
        self._cm = warnings.catch_warnings(record=True)
        self.rec = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        fell_back = [str(r.message) for r in self.rec if issubclass(r.category, NumbaFallbackWarning)]
        assert not fell_back, fell_back


@pytest.mark.parametrize("name", TYPES)
def test_numba_attention_equals_reference(name):
    check_numba_type(name)
    if name != "f32":
        check_numba_type(name, k_name="f32")        # K and V of different types


def test_coverage_lists_attention_per_cache_type():
    for mod in (numba_backend,):
        cov = mod.coverage("ideal")
        assert all(cov[("attention", n)] == "native" for n in TYPES if n != "f32")
        ggml = mod.coverage("ggml")
        assert ggml[("attention", "f16")] == "native" and ggml[("attention", "q8_0")] == "fallback"
        assert all(v == "fallback" for (op, t), v in mod.coverage("ideal", np.float64).items() if op == "attention")


@numba.njit(cache=True)
def _decode_rows(kind, raw, out, par):   # every row of raw uint8[n, n_kv, row_bytes] through ops.decode_row
    bits = out.view(np.uint32)
    for i in range(raw.shape[0]):
        for h in range(raw.shape[1]):
            ok.decode_row(kind, raw[i, h], out[i, h], bits[i, h], par[0, h], par[1, h])


def _typed_rows(ct, n, hd, seed):
    """n rows stored by ct (scale 1 with outliers, a constant row, zeros) -> bytes uint8[n, N_KV, row_bytes]."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, N_KV, hd)).astype(np.float32)
    x[0, 0, 3] = 25.0
    x[1] = 0.0
    x[2, 1] = 0.75
    raw = np.empty((n, N_KV, ct.row_bytes(hd)), np.uint8)
    with np.errstate(all="ignore"):
        ct.store(raw, x)
    return raw


@pytest.mark.parametrize("name", TYPES)
def test_row_decoders_equal_load(name):
    """ops.decode_row and the cuda kernel's loaders read the same float32 values, bit for bit, as
    the type's load (stored rows and arbitrary bytes: subnormal, inf and NaN scales)."""
    hd = HD["numba"]
    kt, _ = cache_types(name, hd=hd)
    ct = kt.for_layer(0)
    par = numba_backend.row_params(ct, N_KV)
    rng = np.random.default_rng(7)
    for raw in (_typed_rows(ct, 6, hd, 7), rng.integers(0, 256, (4, N_KV, ct.row_bytes(hd)), dtype=np.uint8)):
        out = np.empty((len(raw), N_KV, hd), np.float32)
        _decode_rows(ok.KV_KINDS[name], raw, out, par)
        with np.errstate(all="ignore"):
            ref = ct.load(raw).astype(np.float32)
        nan = np.isnan(ref)
        np.testing.assert_array_equal(np.isnan(out), nan)
        np.testing.assert_array_equal(out[~nan].view(np.uint32), ref[~nan].view(np.uint32))


def test_f32_through_the_row_decoder_is_the_fast_path():
    """attention_rows over an f32 pool's bytes gives ok.attention's bits: one arithmetic."""
    hd = 64
    rows = kv_workloads.kv_rows(LENGTHS, N_KV, hd, seed=3, scale=3.0)
    pool, kv = kv_workloads.filled_pool(NumbaBackend(), rows, BLOCK_SIZE, "f32", "f32")
    meta = kv_workloads.meta(kv, STEP)
    q = kv_workloads.queries(STEP, N_HEADS, hd, seed=3, scale=3.0)
    tail = (meta.position_slots, meta.positions, meta.seg_of_token.astype(np.int64))
    kb, vb = pool.k[0].reshape(-1, N_KV, 4 * hd), pool.v[0].reshape(-1, N_KV, 4 * hd)
    fast, rows_out = np.empty_like(q), np.empty_like(q)
    ok.attention(fast, q, kb.view(np.float32), vb.view(np.float32), *tail)
    zero = np.zeros((2, N_KV), np.float32)
    ok.attention_rows(rows_out, q, kb, vb, *tail, ok.KV_KINDS["f32"], ok.KV_KINDS["f32"], zero, zero)
    np.testing.assert_array_equal(rows_out.view(np.uint32), fast.view(np.uint32))


def test_exact_variant_of_an_lmdeploy_type_runs_the_reference():
    """The fp16-arithmetic (ggml-mode) variant of an LMDeploy type loads differently from the
    ideal one the row decoders give: the numba backend sends it to the reference, warned."""
    import warnings
    exact = kv_cache.get_cache_type("lmdeploy-int8").exact
    be = NumbaBackend()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got, q, pool, kv = run_step(be, exact, exact, 64)
    assert any(issubclass(r.category, NumbaFallbackWarning) for r in rec)
    ref = np.empty_like(got)
    NumpyBackend().attention(ref, q, pool, 0, kv_workloads.meta(kv, STEP))
    np.testing.assert_array_equal(got, ref)


# ---- batch invariance per type (numba) ---------------------------------------------------------------
INV_LENGTHS = [23, 9, 14]
INV_TARGETS = [(0, 22), (0, 19), (1, 8), (2, 13)]     # (sequence, position) rows compared
INV_STEPS = {
    "alone": [[(s, p, 1)] for s, p in INV_TARGETS],
    "mixed": [[(2, 13, 1), (0, 18, 5), (1, 0, 9)]],
    "prefills": [[(1, 8, 1), (0, 0, 23), (2, 10, 4)]],
}


def invariance_rows(be, kt, vt, block_size, hd=32):
    """{(layout, sequence, position): bits} of the target rows on a pool of that block size."""
    rows = kv_workloads.kv_rows(INV_LENGTHS, N_KV, hd, seed=8, scale=2.0)
    pool, kv = kv_workloads.filled_pool(be, rows, block_size, kt, vt)
    return kv_workloads.target_rows(be, pool, kv, INV_STEPS, INV_TARGETS, N_HEADS, hd, seed=8, scale=2.0)


def check_invariance(be, name):
    kt, vt = cache_types(name, hd=32)
    alone = {(s, p): bits for (layout, s, p), bits in invariance_rows(be, kt, vt, 16).items() if layout == "alone"}
    for bs in (3, 16):
        for (layout, s, p), bits in invariance_rows(be, kt, vt, bs).items():
            np.testing.assert_array_equal(bits, alone[s, p], err_msg=f"{name}: sequence {s} position {p}: {layout} "
                                                                     f"batch with block size {bs} differs from alone")


@pytest.mark.parametrize("name", TYPES)
def test_numba_attention_is_batch_invariant(name):
    with _no_fallback():
        check_invariance(NumbaBackend(), name)


def float32_batch_attention(be, out, q, pool, layer, meta):
    """Scores q K^T and the V product as float32 matrix products over the loaded rows."""
    group = q.shape[1] // pool.n_kv_heads
    for j in range(len(meta.seg_starts) - 1):
        t0, t1 = int(meta.seg_starts[j]), int(meta.seg_starts[j + 1])
        pos = meta.positions[t0:t1]
        k, v = be.gather_kv(pool, layer, meta, j, int(pos.max()) + 1)
        kh, vh = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)      # [S, n_heads, hd]
        s = np.einsum("thd,shd->hts", q[t0:t1], kh) / np.float32(np.sqrt(q.shape[2]))
        s[:, np.arange(len(k))[None, :] > pos[:, None]] = -np.inf
        p = np.exp(s - s.max(-1, keepdims=True))
        out[t0:t1] = (np.einsum("hts,shd->thd", p, vh) / p.sum(-1).T[..., None]).astype(np.float32)


class Float32Prefill(NumbaBackend):
    """A deliberately batch-dependent variant: a step of several tokens takes a float32 BLAS path
    (float32_batch_attention), a single token the invariant kernel, as a 'fast prefill' shortcut
    would."""

    def attention(self, out, q, pool, layer, meta):
        if len(q) == 1:
            return super().attention(out, q, pool, layer, meta)
        float32_batch_attention(self, out, q, pool, layer, meta)


def test_negative_control_batch_dependent_attention_is_caught():
    with pytest.raises(AssertionError, match="differs from alone"):
        check_invariance(Float32Prefill(), "q8_0")


# ---- cuda (the simulator without a GPU) ---------------------------------------------------------------
@pytest.mark.parametrize("name", TYPES)
def test_cuda_attention_equals_reference(name):
    """The device pool holds the reference's bytes (quantized on the host by the type's store,
    or encoded on the device for f32 / f16) and attention decodes them on the device; 7 threads
    per block, so that no loop over head_dim or positions divides evenly."""
    oracle_import("numba_cuda")
    import sys
    from refinfer.backends.cuda_backend import CudaBackend, CudaBlockPool
    hd = HD["cuda"]
    kt, vt = cache_types(name, hd=hd)
    be = CudaBackend(threads=7)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)          # the simulator's threads poll for the GIL (see test_cuda_backend.py)
    try:
        got, q, pool, kv = run_step(be, kt, vt, hd, CUDA_LENGTHS, CUDA_STEP, CUDA_HEADS)
    finally:
        sys.setswitchinterval(old)
    assert isinstance(pool, CudaBlockPool)
    host = pool.to_host()
    ref_pool, _ = kv_workloads.filled_pool(NumpyBackend(), kv_workloads.kv_rows(CUDA_LENGTHS, N_KV, hd), BLOCK_SIZE,
                                           kt, vt)
    np.testing.assert_array_equal(host.k, ref_pool.k)
    np.testing.assert_array_equal(host.v, ref_pool.v)
    ref = np.empty_like(got)
    NumpyBackend().attention(ref, q, host, 0, kv_workloads.meta(kv, CUDA_STEP))
    check_close("cuda", got, ref, f"attention K {kt.name} V {vt.name}")


def test_cuda_coverage_lists_attention_per_cache_type():
    oracle_import("numba_cuda")
    from refinfer.backends import cuda_backend
    cov = cuda_backend.coverage("ideal")
    assert all(cov[("attention", n)] == "native" for n in TYPES if n != "f32")
    assert cuda_backend.coverage("ggml")[("attention", "q8_0")] == "fallback"
    assert set(cuda_backend.DEVICE_KV_TYPES) == set(TYPES)
