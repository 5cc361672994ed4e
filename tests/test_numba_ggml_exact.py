"""ggml mode on the numba backend gives the NumPy emulation's bits (the emulation is llama.cpp's
CPU arithmetic, tests/test_ggml_exact.py): every op and weight type on small odd shapes, then
whole models (the fixtures' tiny Llamas, SmolLM2) through a prefill and decode steps.

Equality is of the float32 bit patterns (a -0.0 against a +0.0 fails too). The negative
controls show that these checks see a one-ulp change: RoPE without its FMA contraction, and
one matmul output moved by one ulp.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

numba = pytest.importorskip("numba")

import kv_workloads  # noqa: E402
from test_numba_backend import _acts, _weights  # noqa: E402
from refinfer.backends import ggml_emulation as ge  # noqa: E402
from refinfer.backends.numba_backend import WEIGHT_TYPES, NumbaBackend  # noqa: E402
from refinfer.backends.numba_kernels import ggml as gk  # noqa: E402
from refinfer.backends.numpy_backend import NumpyBackend  # noqa: E402


FIXTURES_DIR = pathlib.Path(__file__).resolve().parent.parent / "formats" / "fixtures"


def assert_bits(got, ref, what):
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    assert got.shape == ref.shape, what
    diff = got.view(np.uint32) != ref.view(np.uint32)
    assert not diff.any(), (f"{what}: {diff.sum()} of {diff.size} values differ in their bits, e.g. "
                            f"{got[diff][:3]} against {ref[diff][:3]}")


def cols_for(name):
    return 768 if name.endswith("_K") else 544     # 3 K-quant super-blocks; 17 blocks of 32 (17 * 32 % 8 == 0)


# ---- matmul: every weight type ------------------------------------------------------------------
def check_matmul(name, rows):
    w = _weights(name, rows=rows, cols=cols_for(name))
    for T in (1, 2, 5):      # one token, a batch under DECODE_ONCE, one above it
        x = _acts(T, w.shape[1], seed=T)
        ref, got = np.empty((T, rows), np.float32), np.empty((T, rows), np.float32)
        NumpyBackend(mode="ggml").matmul(ref, x, w)
        NumbaBackend(mode="ggml").matmul(got, x, w)
        assert_bits(got, ref, f"{name} matmul, T={T}, {rows} rows")


@pytest.mark.parametrize("name", WEIGHT_TYPES)
def test_matmul_bits(name):
    # 37 rows: no thread count divides it; 40 (f16): rows % 4 == 0 lets a batch take tinyBLAS's order
    check_matmul(name, 40 if name == "f16" else 37)


def test_stacked_matmuls_bits():
    """q, k, v run as one stacked matrix in ggml mode too; each row as the reference computes it."""
    ws = [_weights("q4_1", rows=r, seed=r) for r in (37, 13, 29)]
    be = NumbaBackend(mode="ggml")
    for T in (1, 6):
        x = _acts(T, 512, seed=T)
        got = [np.empty((T, w.shape[0]), np.float32) for w in ws]
        ref = [np.empty_like(g) for g in got]
        be.matmuls(got, x, ws)
        NumpyBackend(mode="ggml").matmuls(ref, x, ws)
        for g, r in zip(got, ref):
            assert_bits(g, r, f"stacked q4_1, T={T}")
    assert len(be._stacked) == 1


def test_a_row_alone_and_in_a_batch_bits():
    """The quantized matmul's rows do not depend on the other tokens (a decode row equals the
    same row inside a 9-token product), as in the emulation."""
    w = _weights("q5_1", rows=37, cols=512)
    x = _acts(9, 512, seed=4)
    be = NumbaBackend(mode="ggml")
    full, one = np.empty((9, 37), np.float32), np.empty((1, 37), np.float32)
    be.matmul(full, x, w)
    be.matmul(one, x[4:5], w)
    assert_bits(one[0], full[4], "row 4 alone and in the batch")


# ---- per-token ops ------------------------------------------------------------------------------
class _Cfg:
    rope_dim, rope_theta, rope_freq_scale = 18, 10000.0, 1.0


def run_op(be, op, T, rng):
    if op == "rmsnorm":
        x = rng.standard_normal((T, 97)).astype(np.float32) * 3
        out = np.empty_like(x)
        be.rmsnorm(out, x, (1 + 0.1 * rng.standard_normal(97)).astype(np.float32), 1e-5)
        return out
    if op == "rope":
        x = rng.standard_normal((T, 5, 18)).astype(np.float32)
        cos, sin = NumpyBackend(mode="ggml").rope_cos_sin(np.arange(3, 3 + T) * 37, _Cfg, None)
        for neox in (False, True):
            be.rope(x, cos, sin, neox)
        return x
    if op == "swiglu":              # 164 columns: the 8-lane part and a 4-column scalar tail
        g = rng.standard_normal((T, 164)).astype(np.float32) * 6
        g[0, :4] = (-120, 95, -0.0, 1e-30)    # exp underflow and overflow in ggml_v_expf's branches
        u = rng.standard_normal((T, 164)).astype(np.float32)
        out = np.empty_like(g)
        be.swiglu(out, g, u)
        return out
    raise AssertionError(op)


@pytest.mark.parametrize("op", ["rmsnorm", "rope", "swiglu"])
def test_activation_op_bits(op):
    check_activation_op(op)


def check_activation_op(op):
    for T in (1, 2, 7):
        ref = run_op(NumpyBackend(mode="ggml"), op, T, np.random.default_rng(T))
        got = run_op(NumbaBackend(mode="ggml"), op, T, np.random.default_rng(T))
        assert_bits(got, ref, f"{op}, T={T}")


@numba.njit
def _expf_all(x, out):
    for i in range(x.shape[0]):
        out[i] = gk.expf_v(x[i])


def test_expf_bits():
    """ggml_v_expf lane by lane, on its whole range: both branches past |n| > 126 and 192,
    infinities and signed zeros."""
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.uniform(-100, 100, 20000), rng.uniform(-200, 200, 2000), rng.standard_normal(2000),
                        [0.0, -0.0, np.inf, -np.inf, 88.7, 88.8, -87.4, -103.9, -104.0, 1e-38]]).astype(np.float32)
    got = np.empty_like(x)
    _expf_all(x, got)
    with np.errstate(all="ignore"):
        ref = ge.expf_v(x)
    assert_bits(got, ref, "expf_v")


@pytest.mark.parametrize("hd,n_heads,n_kv,block", [(16, 6, 2, 4), (18, 6, 3, 3), (64, 4, 1, 16)])
def test_attention_bits(hd, n_heads, n_kv, block):
    """Two sequences in one step: a prefill segment (the batch kernels' lane order) beside a
    decode token (vec_dot's order); head_dim 18 leaves the 8- and 32-lane steps a remainder;
    scores spread wide enough that exp underflows at some positions."""
    check_attention(hd, n_heads, n_kv, block)


def check_attention(hd, n_heads, n_kv, block):
    rows = kv_workloads.kv_rows([5 + 33, 11], n_kv, hd, seed=hd, scale=6.0)
    steps = [(0, 5, 33), (1, 10, 1)]
    q = kv_workloads.queries(steps, n_heads, hd, seed=hd, scale=6.0)
    got = []
    for be in (NumpyBackend(mode="ggml"), NumbaBackend(mode="ggml")):
        pool, kv = kv_workloads.filled_pool(be, rows, block, *be.kv_types())
        got.append(np.empty_like(q))
        be.attention(got[-1], q, pool, 0, kv_workloads.meta(kv, steps))
    assert_bits(got[1], got[0], f"attention hd={hd}")


# ---- whole models -------------------------------------------------------------------------------
def model_logits(path, backend, prompt_len, n_decode):
    import refinfer
    from refinfer.bench import bench_tokens
    from refinfer.forward import forward
    m = refinfer.load(str(path), backend=backend, mode="ggml")
    toks = bench_tokens(prompt_len + n_decode, m.config.vocab_size)
    cache = m.new_cache(prompt_len + n_decode)
    out = [forward(m.config, m.weights, m.backend, toks[:prompt_len], cache, all_logits=True)]
    for t in toks[prompt_len:]:
        out.append(forward(m.config, m.weights, m.backend, [t], cache, all_logits=True))
    return out


def check_model_bits(path, prompt_len, n_decode):
    ref = model_logits(path, "numpy", prompt_len, n_decode)
    got = model_logits(path, "numba", prompt_len, n_decode)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert_bits(g, r, f"{path.name}: {'prefill' if i == 0 else f'decode step {i}'} logits")


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "f16"])
def test_tiny_model_logits_bits(name):
    check_model_bits(FIXTURES_DIR / f"tiny-llama-{name}.gguf", 11, 2)


def test_smollm2_logits_bits(smollm2_path):
    check_model_bits(smollm2_path, 5, 1)


# ---- negative controls: the checks see one ulp --------------------------------------------------
def rope_without_fma(monkeypatch):
    """RoPE as plain multiplies and adds (the ideal kernel): one rounding more per element."""
    from refinfer.backends.numba_kernels import ops
    monkeypatch.setattr(gk, "rope", ops.rope)


def matmul_one_ulp_off(monkeypatch):
    """The q8 matmul with its first output moved by one ulp."""
    kernel = gk.matmul_q8

    def nudged(out, *args):
        kernel(out, *args)
        out[0, 0] = np.nextafter(out[0, 0], np.float32(np.inf))
    monkeypatch.setattr(gk, "matmul_q8", nudged)


def test_negative_control_rope_without_fma(monkeypatch):
    rope_without_fma(monkeypatch)
    with pytest.raises(AssertionError, match="rope"):
        check_activation_op("rope")


def test_negative_control_one_ulp_matmul(monkeypatch):
    matmul_one_ulp_off(monkeypatch)
    with pytest.raises(AssertionError, match="differ in their bits"):
        check_matmul("q4_1", 37)
    with pytest.raises(AssertionError, match="differ in their bits"):
        check_model_bits(FIXTURES_DIR / "tiny-llama-q4_1.gguf", 3, 0)
