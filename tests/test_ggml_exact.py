"""`ggml` numeric mode is llama.cpp's CPU forward pass bit for bit (x86 AVX2 + FMA build, plain
CPU path: no repacked weights, no flash attention, F16 KV cache).

Two levels: every intermediate tensor of a whole forward pass equals llama.cpp's own (read with
its eval callback) on tiny generated models of each weight type, for a batched prefill and for
one-token decode steps; and each emulated kernel equals the C function it copies, called through
ctypes (ggml's exported CPU kernels, llamafile_sgemm, and the C library's sincosf/fmaf).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import platform

import numpy as np
import pytest

import refinfer
from oracle import GGML_TYPE_IDS, ggml_cpu
from refinfer import quant
from refinfer.backends import ggml_emulation as ge
from refinfer.backends.numpy_backend import NumpyBackend, round_f16
from refinfer.forward import KVCache, forward
from refinfer.weights import QTensor

llama_cpp = pytest.importorskip("llama_cpp")
from llama_ref import assert_taps_match, collect_taps  # noqa: E402
from refinfer.llama_oracle import LlamaCpp, llama_intermediates  # noqa: E402

# the types the generated model is quantized to by llama.cpp (the tiny_quantized fixture)
QTYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "f16"]
PROMPT = [1] + list(range(300, 347))   # 48 tokens: tile edges of every tinyBLAS shape are hit


def check_prefill(path, tokens=PROMPT):
    """Every intermediate tensor (the exact set of names, llama_ref.assert_taps_match) and the
    logits of a batched prefill equal llama.cpp's, bit for bit."""
    ref_logits, ref = llama_intermediates(path, tokens)
    model = refinfer.load(path, mode="ggml", backend="numpy")
    tap, mine = collect_taps()
    got = model.logits(tokens, tap=tap)
    assert_taps_match(mine, ref, f"{path.name} prefill", n_layers=model.config.n_layers)
    np.testing.assert_array_equal(got.view(np.uint32), ref_logits.view(np.uint32))
    return model


@pytest.mark.parametrize("qtype", QTYPES)
def test_prefill_every_intermediate_equals_llama_cpp(tiny_quantized, qtype):
    check_prefill(tiny_quantized[qtype])


@pytest.mark.parametrize("qtype", QTYPES)
def test_decode_every_intermediate_equals_llama_cpp(tiny_quantized, qtype):
    """One token per llama_decode call: batch-1 kernels (ggml_vec_dot_*, ggml_vec_dot_f16). The
    callback keeps the last call's tensors; every step's logits are compared too."""
    path = tiny_quantized[qtype]
    ids = PROMPT[:10]
    with LlamaCpp(path, variant="single_token", n_ctx=len(ids), capture=True) as llm:
        ref_logits = llm.logits(ids)
        ref = dict(llm.captured)
    model = refinfer.load(path, mode="ggml", backend="numpy")
    cache = KVCache(model.config, len(ids))
    rows = []
    for i, tok in enumerate(ids):
        tap, mine = collect_taps()
        rows.append(forward(model.config, model.weights, model.backend, [tok], cache, tap=tap))
    assert_taps_match(mine, ref, f"{qtype} decode step {len(ids) - 1}", n_layers=model.config.n_layers)
    got = np.concatenate(rows)
    np.testing.assert_array_equal(got.view(np.uint32), ref_logits.view(np.uint32))


# ---- kernels against the C functions -----------------------------------------------------------

def _cpu_fn(name, restype, *argtypes):
    fn = getattr(ggml_cpu().lib, name)
    fn.restype, fn.argtypes = restype, list(argtypes)
    return fn


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def _quantized_matmul_inputs(name, seed, rows=40, n=256, T=7):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, n)) * 0.05).astype(np.float32)
    x = rng.standard_normal((T, n)).astype(np.float32)
    x[:, rng.choice(n, 4, replace=False)] *= 30.0          # outlier channels, as in real activations
    raw = ggml_cpu().base.quantize(w, name)
    return x, raw, QTensor("w", raw, quant.get_type(name), w.shape)


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
@pytest.mark.parametrize("seed", [0, 1])
def test_quant_dot_equals_ggml_vec_dot(name, seed):
    """ggml_vec_dot_{q4_0,q5_0,q8_0}_q8_0 / _{q4_1,q5_1}_q8_1 row by row (the batch-1 path),
    activations quantized by the CPU from_float, exactly."""
    x, raw, wt = _quantized_matmul_inputs(name, seed)
    expected = ggml_cpu().matmul(x, raw, name)
    out = np.empty_like(expected)
    NumpyBackend(mode="ggml").matmul(out, x, wt)
    np.testing.assert_array_equal(out, expected)


class _ComputeParams(ctypes.Structure):  # struct ggml_compute_params (ggml-cpu-impl.h)
    _fields_ = [("ith", ctypes.c_int), ("nth", ctypes.c_int), ("wsize", ctypes.c_size_t),
                ("wdata", ctypes.c_void_p), ("threadpool", ctypes.c_void_p), ("use_ref", ctypes.c_bool)]


@pytest.mark.parametrize("name", ["q4_0", "q5_0", "q8_0"])
@pytest.mark.parametrize("T", [2, 3, 5, 7])
def test_quant_dot_equals_llamafile_sgemm(name, T):
    """llamafile_sgemm's tinyBLAS_Q0_AVX (the batched path for q4_0/q5_0/q8_0 weights) on
    q8_0 activations, for batch sizes that pick different tile kernels, exactly."""
    x, raw, wt = _quantized_matmul_inputs(name, 3, T=T)
    cpu = ggml_cpu()
    q8 = cpu.base.traits("q8_0")
    n = x.shape[1]
    xq = np.zeros((T, n // 32 * q8.type_size), np.uint8)
    from_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(
        cpu.lib.ggml_get_type_traits_cpu(GGML_TYPE_IDS["q8_0"]).contents.from_float)
    for t in range(T):
        from_float(x[t].ctypes.data, xq[t].ctypes.data, n)
    rows = raw.shape[0]
    expected = np.zeros((T, rows), np.float32)
    sgemm = _cpu_fn("llamafile_sgemm", ctypes.c_bool, ctypes.POINTER(_ComputeParams), *[ctypes.c_int64] * 3,
                    ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                    ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int)
    params = _ComputeParams(0, 1, 0, None, None, False)
    ok = sgemm(ctypes.byref(params), rows, T, n // 32, _ptr(raw), n // 32, _ptr(xq), n // 32, _ptr(expected), rows,
               GGML_TYPE_IDS[name], GGML_TYPE_IDS["q8_0"], GGML_TYPE_IDS["f32"])
    assert ok, "llamafile_sgemm declined"
    out = np.empty_like(expected)
    NumpyBackend(mode="ggml").matmul(out, x, wt)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("n", [16, 64, 80, 256, 333])
def test_f16_dot_vec_equals_ggml_vec_dot_f16(n):
    """ggml_vec_dot_f16: 4x8 FMA lanes over steps of 32, the leftovers in double."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((6, n)).astype(np.float16)
    y = (rng.standard_normal(n) * 3).astype(np.float16)
    dot = _cpu_fn("ggml_vec_dot_f16", None, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t,
                  ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    s = ctypes.c_float()
    expected = []
    for row in x:
        dot(n, ctypes.byref(s), 0, _ptr(row), 0, _ptr(y), 0, 1)
        expected.append(s.value)
    got = ge.f16_dot_vec(x.astype(np.float32), y.astype(np.float32)[None, :])
    np.testing.assert_array_equal(got, np.array(expected, np.float32))


def _expf_inputs(n=4096):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(n) * 20).astype(np.float32)
    x[:16] = [-np.inf, -200, -150, -104, -103.9, -88, -87.3, -20, 0, 1e-8, -1e-8, 10, 80, 88.7, 89, 100]
    return x


def test_soft_max_equals_ggml_vec_soft_max_f32():
    """ggml_vec_soft_max_f32: y = ggml_v_expf(x - max) per 8-lane group and the group sums
    added in double; then the row scaled by float(1/sum) as ggml_compute_forward_soft_max_f32."""
    fn = _cpu_fn("ggml_vec_soft_max_f32", ctypes.c_double, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float)
    rng = np.random.default_rng(0)
    for n, spread in [(256, 1.0), (256, 30.0), (512, 5.0)]:
        x = (rng.standard_normal(n) * spread).astype(np.float32)
        x[rng.choice(n, n // 3, replace=False)] = -np.inf          # masked positions
        y = np.zeros(n, np.float32)
        total = fn(n, _ptr(y), _ptr(x), float(x.max()))
        expected = y * np.float32(1.0 / total)
        got = ge.soft_max(x[None, :], 1.0, np.zeros((1, n), np.float32))[0]
        np.testing.assert_array_equal(got, expected)
    # the exponentials alone, over their whole range (underflow, -inf, overflow)
    x = _expf_inputs()
    y = np.zeros_like(x)
    fn(x.size, _ptr(y), _ptr(x), 0.0)
    np.testing.assert_array_equal(ge.expf_v(x), y)


def test_silu_and_swiglu_equal_ggml_vec_silu_and_swiglu():
    x = _expf_inputs()
    x[0] = -50.0                                                   # silu(-inf) is NaN in both; keep finite
    g = np.random.default_rng(1).standard_normal(x.size).astype(np.float32)
    y = np.zeros_like(x)
    _cpu_fn("ggml_vec_silu_f32", None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(x.size, _ptr(y), _ptr(x))
    np.testing.assert_array_equal(ge.silu_v(x), y)
    _cpu_fn("ggml_vec_swiglu_f32", None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)(
        x.size, _ptr(y), _ptr(x), _ptr(g))
    np.testing.assert_array_equal(ge.swiglu(x, g), y)


def _glibc_libm():
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the C library is not glibc")
    return ctypes.CDLL(ctypes.util.find_library("m"))


def test_sincosf_equals_glibc_sincosf():
    """RoPE's sincosf: every cache angle of positions 0..4095 for rope dims 64/128 and bases
    1e4/5e5 (built as ggml_rope_cache_init does), plus random angles up to 1e5 and negative."""
    libm = _glibc_libm()
    libm.sincosf.restype = None
    libm.sincosf.argtypes = [ctypes.c_float, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_float)]
    F32 = np.float32
    angles = []
    for n_dims, base in [(64, 1e4), (128, 5e5)]:
        scale = F32(math.pow(F32(base), F32(-2.0) / F32(n_dims)))
        t = np.arange(4096, dtype=np.float32)
        for _ in range(n_dims // 2):
            angles.append(t)
            t = t * scale
    rng = np.random.default_rng(2)
    angles += [rng.uniform(-1e5, 1e5, 4000).astype(np.float32), rng.uniform(-130, 130, 4000).astype(np.float32)]
    y = np.unique(np.concatenate(angles))[::7]                    # ~30k distinct angles
    s, c = ctypes.c_float(), ctypes.c_float()
    expected = np.empty((2, y.size), np.float32)
    for i, v in enumerate(y):
        libm.sincosf(v, ctypes.byref(s), ctypes.byref(c))
        expected[0, i], expected[1, i] = s.value, c.value
    sin, cos = ge.sincosf(y)
    np.testing.assert_array_equal(sin, expected[0])
    np.testing.assert_array_equal(cos, expected[1])


def test_fma_f32_equals_fmaf():
    libm = _glibc_libm()
    libm.fmaf.restype = ctypes.c_float
    libm.fmaf.argtypes = [ctypes.c_float] * 3
    rng = np.random.default_rng(3)
    n = 20000
    a = (rng.standard_normal(n) * np.exp2(rng.integers(-20, 20, n))).astype(np.float32)
    b = rng.integers(-65000, 65000, n).astype(np.float32)
    c = (rng.standard_normal(n) * np.exp2(rng.integers(-30, 30, n))).astype(np.float32)
    # a*b + c = 1 + 2^-23 + 2^-24 - 2^-54: a float64 sum rounds it onto the float32 midpoint,
    # and rounding that to even would go up; the fused result goes down
    a[0], b[0], c[0] = 1 - 2.0 ** -15, 2.0 ** -24 * (1 + 2.0 ** -15), 1 + 2.0 ** -23
    expected = np.array([libm.fmaf(*v) for v in zip(a.tolist(), b.tolist(), c.tolist())], np.float32)
    assert expected[0] == np.float32(1 + 2.0 ** -23)
    np.testing.assert_array_equal(ge.fma_f32(a, b, c), expected)


def test_f16_matmul_orders_differ_and_round_f16_is_f16():
    """The two F16 orders are distinct computations (so the tests above pin down which one each
    path uses), and round_f16 returns exact binary16 values."""
    rng = np.random.default_rng(4)
    x = round_f16(rng.standard_normal((64, 256)).astype(np.float32) * 10)
    w = round_f16(rng.standard_normal((1, 256)).astype(np.float32))
    assert np.array_equal(x, x.astype(np.float16).astype(np.float32))
    assert not np.array_equal(ge.f16_dot_tinyblas(x, w), ge.f16_dot_vec(x, w))


SMOLLM2_TEXT = ("The quick brown fox jumps over the lazy dog. Numerical reference implementations are read "
                "more often than they are run, so every line must be easy to check against the specification. ")


def test_smollm2_prefill_and_decode_equal_llama_cpp(smollm2_path):
    """The real model (Q4_1 and Q8_0 weights, tied Q8_0 output, GQA 9/3 heads, 30 layers):
    every intermediate and the logits of a 64-token prefill, then one-token decode steps, bit
    for bit."""
    with LlamaCpp(smollm2_path, n_ctx=64) as llm:
        ids = llm.tokenize(SMOLLM2_TEXT * 2)[:64]
    assert len(ids) == 64
    model = check_prefill(smollm2_path, ids)
    steps = ids[:4]
    with LlamaCpp(smollm2_path, variant="single_token", n_ctx=len(steps)) as llm:
        ref_steps = llm.logits(steps)
    cache = KVCache(model.config, len(steps))
    got_steps = np.concatenate([forward(model.config, model.weights, model.backend, [t], cache) for t in steps])
    np.testing.assert_array_equal(got_steps.view(np.uint32), ref_steps.view(np.uint32))
