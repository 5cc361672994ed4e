"""ggml mode with llama.cpp's quantized KV caches is llama.cpp's own computation, bit for bit.

llama.cpp (llama-cpp-python 0.3.36, plain CPU path: no repacked weights) runs with type_k /
type_v set and flash attention on or off, through the low-level wrapper (refinfer.llama_oracle
.LlamaCpp); refinfer loads the same GGUF with cache_type_k / cache_type_v / flash_attn. Paths:
  fa      K and V of the type, flash attention (ggml_compute_forward_flash_attn_ext_f16_one_chunk:
          Q quantized to K's vec_dot type, V through to_float, online softmax with libm's expf)
  mulmat  K of the type, V f16, no flash attention (kq = a quantized mul_mat, then soft_max and
          the F16 V matmul)
Models: generated ones with head_dim 32 (no rotation: llama.cpp rotates only when head_dim % 64
== 0), 64 and 128 (Q/K rotated by a 64- or 128-point Walsh-Hadamard transform, V by a 64-point
one), and SmolLM2-135M (head_dim 64, 9 heads over 3 KV heads).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import numpy as np
import pytest

import refinfer
from ci_skips import oracle_import
from refinfer.backends import ggml_emulation as ge
from refinfer.backends.numpy_backend import NumpyBackend
from refinfer.errors import RefinferError, ShapeError, UnsupportedError
from refinfer.forward import KVCache, forward

KV_TYPES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
PROMPT = [1] + list(range(300, 339))          # 40 tokens


_MODELS: dict = {}


def make_kv_models(tmp_path_factory, vocab_dir) -> dict:
    """Generated Llamas by head_dim: 32 (q4_1 weights), 64 (q8_0 weights, GQA 2), 128 (f16
    weights); made once per session (the mutant checks reuse them)."""
    if not _MODELS:
        oracle_import("llama_cpp")
        from models import llama_quantize, make_tiny_llama_gguf
        d = tmp_path_factory.mktemp("kv_models")
        voc = vocab_dir / "ggml-vocab-llama-spm.gguf"
        for hd, dim, heads, kv, wtype in ((32, 128, 4, 2, "q4_1"), (64, 128, 2, 1, "q8_0"), (128, 256, 2, 2, "f16")):
            f32 = make_tiny_llama_gguf(d / f"hd{hd}-f32.gguf", vocab_gguf=voc, dim=dim, n_heads=heads, n_kv_heads=kv,
                                       ctx=256, dtype="f32", seed=hd, n_vocab=2000)
            _MODELS[hd] = llama_quantize(f32, d / f"hd{hd}-{wtype}.gguf", wtype)
    return _MODELS


@pytest.fixture(scope="module")
def kv_models(tmp_path_factory, vocab_dir):
    return make_kv_models(tmp_path_factory, vocab_dir)


def check_prefill(models, hd, path, kv_type):
    k, v, fa = paths(kv_type)[path]
    p = models[hd]
    assert_bits_equal(refinfer_logits(p, PROMPT, k, v, fa), llama_logits(p, PROMPT, k, v, fa),
                      f"head_dim {hd}, K {k} V {v} flash_attn {fa}")


def llama_logits(path, ids, k, v, fa, n_batch=None, rotation=True):
    from refinfer.llama_oracle import LlamaCpp
    old = os.environ.get("LLAMA_ATTN_ROT_DISABLE")
    os.environ["LLAMA_ATTN_ROT_DISABLE"] = "0" if rotation else "1"     # read when the context is made
    try:
        with LlamaCpp(path, n_ctx=max(64, len(ids)), type_k=k, type_v=v, flash_attn=fa, n_batch=n_batch) as llm:
            return llm.logits(ids)
    finally:
        if old is None:
            del os.environ["LLAMA_ATTN_ROT_DISABLE"]
        else:
            os.environ["LLAMA_ATTN_ROT_DISABLE"] = old


def refinfer_logits(path, ids, k, v, fa, one_token=False, rotation=True):
    m = refinfer.load(path, mode="ggml", backend="numpy", cache_type_k=k, cache_type_v=v, flash_attn=fa,
                      kv_rotation=rotation)
    if not one_token:
        return m.logits(ids)
    cache = KVCache(m.config, len(ids))
    return np.concatenate([forward(m.config, m.weights, m.backend, [t], cache) for t in ids])


def assert_bits_equal(got, ref, what):
    diff = got.view(np.uint32) != ref.view(np.uint32)
    assert not diff.any(), (f"{what}: {int(diff.any(axis=1).sum())} of {len(ref)} rows differ from llama.cpp, "
                            f"max |diff| {float(np.abs(got - ref).max()):.3g}")


def paths(t):
    return {"fa": (t, t, True), "mulmat": (t, "f16", False)}


@pytest.mark.parametrize("hd", [32, 64, 128])
@pytest.mark.parametrize("path", ["fa", "mulmat"])
@pytest.mark.parametrize("kv_type", KV_TYPES)
def test_prefill_logits_equal_llama_cpp(kv_models, hd, path, kv_type):
    check_prefill(kv_models, hd, path, kv_type)


@pytest.mark.parametrize("path", ["fa", "mulmat"])
@pytest.mark.parametrize("kv_type", ["q8_0", "q4_1", "q5_0"])
def test_decode_logits_equal_llama_cpp(kv_models, path, kv_type):
    """One token per llama_decode: the batch-1 kernels (ggml_vec_dot_*_q8_*, the vec_dot F16 V product)."""
    k, v, fa = paths(kv_type)[path]
    p, ids = kv_models[64], PROMPT[:12]
    assert_bits_equal(refinfer_logits(p, ids, k, v, fa, one_token=True), llama_logits(p, ids, k, v, fa, n_batch=1),
                      f"decode, K {k} V {v} flash_attn {fa}")


@pytest.mark.parametrize("k,v", [("q8_0", "q4_0"), ("q5_1", "f16"), ("q4_0", "q8_0")])
def test_mixed_types_equal_llama_cpp(kv_models, k, v):
    p = kv_models[128]
    assert_bits_equal(refinfer_logits(p, PROMPT, k, v, True), llama_logits(p, PROMPT, k, v, True),
                      f"K {k} V {v} flash_attn")


def test_rotation_off_equals_llama_cpp_and_the_rotation_matters(kv_models):
    """kv_rotation=False is LLAMA_ATTN_ROT_DISABLE=1, bit for bit; and the check can fail: the
    rotated cache against the unrotated one differs (the rotation is really applied)."""
    p = kv_models[64]
    off = refinfer_logits(p, PROMPT, "q4_0", "q4_0", True, rotation=False)
    assert_bits_equal(off, llama_logits(p, PROMPT, "q4_0", "q4_0", True, rotation=False), "rotation off")
    on_llama = llama_logits(p, PROMPT, "q4_0", "q4_0", True)
    assert np.any(off != on_llama), "the rotated and unrotated caches gave the same logits: the test cannot tell them apart"


@pytest.mark.parametrize("k,v,fa", [("q8_0", "q8_0", True), ("q4_0", "f16", False)])
def test_smollm2_logits_equal_llama_cpp(smollm2_path, k, v, fa):
    oracle_import("llama_cpp")
    rng = np.random.default_rng(5)
    ids = [1] + [int(t) for t in rng.integers(100, 40000, 15)]
    assert_bits_equal(refinfer_logits(smollm2_path, ids, k, v, fa), llama_logits(smollm2_path, ids, k, v, fa),
                      f"SmolLM2 K {k} V {v} flash_attn {fa}")


# ---- the pieces against their C definitions ---------------------------------------------------

def test_expf_equals_the_c_library():
    check_expf()


def check_expf():
    """ge.expf_libm against the C library's expf (the one the flash-attention kernel calls),
    on the arguments it gets (<= 0) and the special cases (a correctly rounded exp differs from
    it in 10 of these 30,000)."""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    fn = libm.expf
    fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]
    rng = np.random.default_rng(0)
    x = np.concatenate([-rng.random(20000) * 30, -rng.random(5000) * 1e-3, -rng.random(5000) * 110,
                        rng.random(2000) * 90, [0.0, -0.0, -np.inf, np.inf, np.nan, -87.0, -103.9, -104.0, 88.7, 88.8]]
                       ).astype(np.float32)
    ref = np.array([fn(float(t)) for t in x], np.float32)
    got = ge.expf_libm(x)
    same = (got.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(got) & np.isnan(ref))
    assert same.all(), f"{int((~same).sum())} of {len(x)} differ, e.g. x = {x[~same][:3]}"


def check_rotations_equal_llama_cpp(models):
    """Each rotation llama.cpp's graph computes (llama_mul_mat_hadamard: the unnamed node after
    Qcur-N / Kcur-N / Vcur-N (reshaped), and after kqv_out-N (reshaped) the output rotated back)
    equals ggml mode's hadamard of llama.cpp's own input, bit for bit: K and Q in 128-point
    blocks, V and the output in 64-point ones (head_dim 128)."""
    from refinfer.llama_oracle import LlamaCpp
    p = models[128]
    with LlamaCpp(p, n_ctx=64, type_k="q8_0", type_v="q8_0", flash_attn=True, capture=True) as llm:
        llm.logits(PROMPT)
        cap = llm.captured
    names = list(cap)
    be = refinfer.load(p, mode="ggml", backend="numpy", cache_type_k="q8_0", cache_type_v="q8_0",
                       flash_attn=True).backend
    checked = 0
    for i in range(2):
        for src, n in ((f"Qcur-{i} (reshaped)", 128), (f"Kcur-{i} (reshaped)", 128), (f"Vcur-{i} (reshaped)", 64),
                       (f"kqv_out-{i} (reshaped)", 64)):
            rotated = cap[names[names.index(src) + 1]]
            x = np.array(cap[src], np.float32).reshape(-1, 128)
            be.hadamard(x, n)
            np.testing.assert_array_equal(x.view(np.uint32), rotated.reshape(x.shape).view(np.uint32), err_msg=src)
            checked += 1
    assert checked == 8


def test_rotations_equal_llama_cpp(kv_models):
    check_rotations_equal_llama_cpp(kv_models)


@pytest.mark.parametrize("n", [64, 128])
def test_hadamard_is_the_orthonormal_walsh_hadamard_matrix(n):
    """Both modes' hadamard against the Sylvester matrix llama.cpp builds (ggml_gen_hadamard):
    ideal mode to float32 rounding of the exact product, ggml mode within its float32 butterflies."""
    h = np.array([[1.0]])
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    h /= np.sqrt(n)
    x = np.random.default_rng(n).standard_normal((5, 3, 2 * n)).astype(np.float32)
    want = (x.astype(np.float64).reshape(5, 3, 2, n) @ h.T).reshape(x.shape)
    for mode, tol in (("ideal", 1e-7), ("ggml", 1e-6)):      # measured max relative 6e-8 and 3e-7
        y = x.copy()
        NumpyBackend(mode=mode).hadamard(y, n)
        assert np.max(np.abs(y - want)) <= tol * np.max(np.abs(want)), mode
    y = x.copy()
    be = NumpyBackend(mode="ideal")
    be.hadamard(y, n)
    be.hadamard(y, n)                                          # H^2 = I
    np.testing.assert_allclose(y, x, atol=1e-6)


# ---- what ggml mode refuses, with the reason -----------------------------------------------------

def test_refusals_name_the_reason(tiny_llama_f32, kv_models):
    with pytest.raises(UnsupportedError, match="needs flash attention"):
        refinfer.load(kv_models[64], mode="ggml", backend="numpy", cache_type_v="q8_0")
    with pytest.raises(UnsupportedError, match="flash attention for a K cache of q8_0.*not K f16 / V f16"):
        refinfer.load(kv_models[64], mode="ggml", backend="numpy", flash_attn=True)
    with pytest.raises(RefinferError, match="ggml-mode option"):
        refinfer.load(kv_models[64], mode="ideal", backend="numpy", flash_attn=True)
    with pytest.raises(UnsupportedError, match="known: f32, f16, bf16, q8_0"):
        refinfer.load(kv_models[64], backend="numpy", cache_type_k="q6_K")
    with pytest.raises(ShapeError, match="head_dim 16 is not a multiple of its block size 32"):
        refinfer.load(tiny_llama_f32, backend="numpy", cache_type_k="q4_0")   # head_dim 16, as llama.cpp refuses
    with pytest.raises(UnsupportedError, match="not f32"):
        refinfer.load(kv_models[64], mode="ggml", backend="numpy", cache_type_k="f32")
