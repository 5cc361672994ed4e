"""Batch invariance holds for every KV cache type (forward.py's guarantee, ideal mode): a row of
a ragged batch over the paged, quantized cache equals the same row of the sequence alone, bit for
bit, on numpy and numba, and an Engine's requests equal each request alone. A cache type
quantizes each row on its own (per block of a row, or per token and head), so what a position
stores cannot depend on its neighbours. The negative control is a cache type that takes its
scale from the whole batch it is handed (a per-step absmax, as a careless per-tensor fp8 or int8
cache would): the same check fails for it."""

from __future__ import annotations

import numpy as np
import pytest

import refinfer
from invariance_workloads import SHAPES, first_difference, run_batched
from refinfer.kv_cache import CACHE_TYPES, PARAMETRIC_TYPES, CacheType

TYPES = sorted(set(CACHE_TYPES) - {"f64"}) + sorted(PARAMETRIC_TYPES)   # every registered type, from the registry


@pytest.fixture(scope="module")
def hd32_model(tmp_path_factory, vocab_dir):
    """A generated Llama with head_dim 32 (every block type fits), GQA 2, small vocabulary."""
    from models import make_tiny_llama_gguf
    d = tmp_path_factory.mktemp("kv_inv")
    return make_tiny_llama_gguf(d / "hd32.gguf", vocab_gguf=vocab_dir / "ggml-vocab-llama-spm.gguf", dim=64,
                                n_heads=2, n_kv_heads=1, hidden_dim=96, ctx=128, dtype="f32", seed=11, n_vocab=600)


@pytest.fixture(scope="module")
def kv_params(hd32_model):
    """int8-calibrated parameters of the model, per head (calibrate-kv --per-head on token ids)."""
    from refinfer.commands.calibrate_kv import calibrate_tokens
    m = refinfer.load(hd32_model, backend="numpy")
    ids = list(np.random.default_rng(3).integers(3, 600, 96))
    return calibrate_tokens(m, ids, n_chunks=2, n_ctx=48, per_head=True)


def load(path, backend, kv_type, kv_params):
    return refinfer.load(path, backend=backend, cache_type_k=kv_type, cache_type_v=kv_type,
                         kv_params=kv_params if kv_type in PARAMETRIC_TYPES else None)


def check_ragged(model, seed=0):
    rng = np.random.default_rng(seed)
    work = SHAPES["mixed"](rng, model.config.vocab_size, n=(2, 30))
    rows, _, _ = run_batched(model, work, rng, block_size=3, max_tokens_per_step=20)
    return first_difference(model, work, rows)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("kv_type", TYPES)
def test_ragged_batches_equal_each_sequence_alone_for_every_cache_type(hd32_model, kv_params, backend, kv_type):
    model = load(hd32_model, backend, kv_type, kv_params)
    assert check_ragged(model) is None


@pytest.mark.parametrize("kv_type", ["q4_0", "lmdeploy-int4", "int8-calibrated"])
def test_engine_requests_equal_each_request_alone(hd32_model, kv_params, kv_type):
    from test_invariance import ENGINES, _requests, first_result_difference, run_engine
    model = load(hd32_model, "numba", kv_type, kv_params)
    rng = np.random.default_rng(4)
    work = SHAPES["mixed"](rng, model.config.vocab_size, n=(2, 20))
    reqs = _requests(rng, work)
    results, _ = run_engine(model, reqs, work.arrivals, ENGINES["chunked"])
    assert all(r.finish_reason in ("stop", "length") for r in results), [r.error for r in results]
    assert first_result_difference(model, reqs, results) is None


def _batch_scaled_int8():
    """int8 codes with one scale for every row the store is handed: the batch's absmax / 127,
    kept in the row as float32 (so loads are exact), which makes a position's stored value
    depend on the other tokens of its step."""
    def store(dst, rows):
        rows = np.asarray(rows, np.float32)
        scale = np.float32(max(float(np.max(np.abs(rows))), 1e-30) / 127)
        q = np.clip(np.rint(rows / scale), -127, 127).astype(np.int8)
        dst[..., :-4] = q.view(np.uint8)
        dst[..., -4:] = np.full(rows.shape[:-1], scale, "<f4")[..., None].view(np.uint8)

    def load(src):
        src = np.ascontiguousarray(src)
        scale = src[..., -4:].copy().view("<f4")
        return (src[..., :-4].view(np.int8).astype(np.float32) * scale).astype(np.float32)

    return CacheType("test-batch-scaled-int8", lambda hd: hd + 4, store, load, "negative control", kind="test")


def test_negative_control_a_batch_scaled_cache_is_caught(hd32_model, monkeypatch):
    t = _batch_scaled_int8()
    monkeypatch.setitem(CACHE_TYPES, t.name, t)
    model = refinfer.load(hd32_model, backend="numpy", cache_type_k=t.name, cache_type_v=t.name)
    assert check_ragged(model) is not None, "a cache whose scale depends on the batch passed the invariance check"


def test_pool_bytes_per_token_are_each_types_formula(hd32_model, kv_params):
    """The pool's real bytes per position equal n_layers x n_kv_heads x (K row + V row) by each
    type's own layout: ggml blocks (head_dim / 32 blocks of 2 + 16, 2 + 2 + 16, 2 + 4 + 16,
    2 + 2 + 4 + 16, 2 + 32 bytes), LMDeploy rows (codes + fp16 scale and zero), calibrated and fp8 codes."""
    formula = {"f32": 4 * 32, "f16": 2 * 32, "bf16": 2 * 32, "q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24,
               "q8_0": 34, "lmdeploy-int8": 32 + 4, "lmdeploy-int4": 16 + 4, "lmdeploy-pt-int8": 32 + 4,
               "lmdeploy-pt-int4": 16 + 4, "int8-calibrated": 32, "fp8": 32, "fp8_e5m2": 32}
    assert set(formula) == set(TYPES), "a new cache type needs its row size here"
    for t in TYPES:
        m = load(hd32_model, "numpy", t, kv_params)
        kv = m.new_kv(tokens=64)
        want = m.config.n_layers * m.config.n_kv_heads * 2 * formula[t]
        assert kv.pool.bytes_per_token == want, t
        engine = refinfer.Engine(m, kv_cache_mib=1)
        s = engine.stats()
        assert s.kv_bytes_per_token == want and s.kv_types == f"{t}/{t}"
        # the 2048-position sequences that fit: what the block manager really allocates
        n = s.kv_max_seqs_2k
        bm = engine.kv
        for i in range(n):
            assert bm.can_allocate([1] * 2048, use_prefix_cache=False), (t, i, n)
            bm.allocate(("probe", i), [1] * 2048, use_prefix_cache=False)
        assert n > 0 and not bm.can_allocate([1] * 2048, use_prefix_cache=False)
