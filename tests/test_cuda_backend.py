"""The cuda backend against the NumPy reference: the numba backend's registry-driven cases
(tests/test_numba_backend.py: the same weights, activations, ops and tolerance table), run for
every (op, type) the cuda backend claims.

Without a GPU the kernels run in numba's CUDA simulator (conftest.py sets NUMBA_ENABLE_CUDASIM
before numba.cuda is imported): every CUDA thread is a Python thread, so the shapes are tiny,
and odd on purpose: 7 or 13 threads per block, 37 rows, a token tile of 2 with T = 3, so that
every `if k >= n` guard, partial tile and idle thread of a reduction runs. On a machine with a
GPU the same tests run on it, unchanged; the tests marked `gpu` run only there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from ci_skips import oracle_import, oracle_skip  # noqa: E402

oracle_import("numba_cuda")

import child_process  # noqa: E402
from llama_ref import refinfer_greedy  # noqa: E402
from refinfer import quant  # noqa: E402
from refinfer.backends import blockdecode as bd  # noqa: E402
from refinfer.backends import cuda_backend  # noqa: E402
from refinfer.backends import get_backend  # noqa: E402
from refinfer.backends.cuda_backend import CudaBackend, CudaFallbackWarning, coverage, simulated  # noqa: E402
from refinfer.backends.numpy_backend import NumpyBackend, quantize_act_q8  # noqa: E402
from refinfer.errors import UnsupportedError  # noqa: E402
from test_numba_backend import MODES, PROMPTS, TOLERANCES, _acts, _run_op, _weights  # noqa: E402
from test_numba_backend import _check as check_against_table  # noqa: E402

ROWS, COLS = 37, 256          # 256: one K-quant super-block, eight 32-element blocks
THREADS, TILE = 7, 2          # neither divides anything above; T = 3 leaves a partial tile
WEIGHT_TYPES = cuda_backend.WEIGHT_TYPES
# the (op, type) pairs the cuda backend claims, from its own registry: a new kernel is tested here
NATIVE = {mode: sorted(k for k, how in coverage(mode).items() if how == "native") for mode in MODES}

# On a real GPU, NVVM contracts a * b + c into one FMA (numba-cuda has no switch to stop it):
# the last bit of q * d + m style decodes and of the RoPE rotation may differ from the CPU's
# separate roundings. The simulator runs the Python source and keeps the table's bounds.
GPU_TOLERANCES = {
    **{("embed", m): ("rel", 1e-6, "FMA-contracted q * d + m / d * q - m decodes (1 ulp)") for m in MODES},
    ("rope", "ideal"): ("nmse", 1e-13, "FMA-contracted x0 * c - x1 * s"),
}
TABLE = TOLERANCES if simulated() else {**TOLERANCES, **GPU_TOLERANCES}
gpu = pytest.mark.skipif(simulated(), reason="needs a real CUDA GPU (running in the CUDA simulator)")


def _check(op, mode, got, ref):
    check_against_table(op, mode, got, ref, table=TABLE)


@pytest.fixture(autouse=True)
def _fast_simulator_threads():
    """The simulator's scheduler polls its threads in a busy loop that competes for the GIL;
    a short switch interval lets the simulated threads run (about 4x faster here)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(old)


def _be(mode="ideal", **kw):
    return CudaBackend(mode=mode, threads=kw.pop("threads", THREADS), token_tile=kw.pop("token_tile", TILE), **kw)


def test_coverage_lists_every_loader_type_and_op():
    from refinfer.backends.numba_backend import coverage as numba_coverage
    assert coverage() == numba_coverage()   # the same (op, type) pairs, all native
    assert set(WEIGHT_TYPES) == set(bd.KINDS)
    assert all(v == "fallback" for (op, t), v in coverage("ideal", np.float64).items() if op != "rope_cos_sin")


def test_get_backend_knows_cuda():
    assert get_backend("cuda", "ggml").name == "cuda"


# ---- exact: decoding --------------------------------------------------------------------------
@pytest.mark.parametrize("name", [t for op, t in NATIVE["ideal"] if op == "embed"])
def test_dequantize_is_exact(name):
    w = _weights(name, cols=COLS)
    ids = np.array([5, 0, ROWS - 1, 5])
    out = np.empty((len(ids), COLS), np.float32)
    _be(threads=13).embed(out, w, ids)
    ref = quant.dequantize(w.raw, name)[ids]
    if TABLE[("embed", "ideal")][0] == "exact":
        out, ref = out.view(np.uint32), ref.view(np.uint32)   # bit for bit, -0.0 included
    _check("embed", "ideal", out, ref)


@pytest.mark.parametrize("name", [t for t in WEIGHT_TYPES if t != "f32"])
def test_dequantize_random_bytes(name):
    """Arbitrary bytes (subnormal, inf and NaN scales included) decode as the reference does."""
    t = quant.get_type(name)
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (3, t.type_size * (1 if t.block_size > 1 else 256)), dtype=np.uint8)
    cols = 256 if t.block_size == 1 else t.block_size
    w = _qtensor(raw, name, (3, cols))
    with np.errstate(all="ignore"):
        ref = quant.dequantize(raw, name)
    out = np.empty_like(ref)
    _be(threads=13).embed(out, w, np.arange(3))
    if simulated() or name not in ("q4_1", "q5_1", "q2_K", "q4_K", "q5_K"):
        np.testing.assert_array_equal(out, ref)  # NaN == NaN here
    else:  # FMA-contracted decodes on a real GPU (see GPU_TOLERANCES)
        finite = np.abs(ref[np.isfinite(ref)])
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6 * (finite.max() if finite.size else 0))


def _qtensor(raw, name, shape):
    from refinfer.weights import QTensor
    return QTensor("w", raw, quant.get_type(name), shape)


# ---- exact: ggml-mode activation quantizer ------------------------------------------------------
@pytest.mark.parametrize("T", [1, 3])
def test_activation_q8_quantizer_is_exact(T):
    x = _acts(T, COLS, seed=T)
    x[0, :32] = 0.0                    # an all-zero block: d = 0, codes 0
    be = _be()
    xq, xd, xs = (a.copy_to_host() for a in be.quantize_act_q8(be.cuda.to_device(x)))
    dx, sx, qx = quantize_act_q8(x)
    np.testing.assert_array_equal(xq.reshape(T, -1, 32).astype(np.float32), qx)
    np.testing.assert_array_equal(xd.view(np.uint32), dx.view(np.uint32))
    np.testing.assert_array_equal(xs.view(np.uint32), sx.view(np.uint32))


# ---- matmul and per-token ops against the reference ----------------------------------------------
@pytest.mark.parametrize("mode,name", [(mode, t) for mode in MODES for op, t in NATIVE[mode] if op == "matmul"])
def test_matmul_equals_reference(name, mode):
    w = _weights(name, cols=COLS)
    be = _be(mode)
    for T in (1, 3):
        x = _acts(T, COLS, seed=T)
        ref = np.empty((T, ROWS), np.float32)
        got = np.empty_like(ref)
        NumpyBackend(mode=mode).matmul(ref, x, w)
        be.matmul(got, x, w)
        _check("matmul", mode, got, ref)


@pytest.mark.parametrize("mode,op", [(mode, op) for mode in MODES for op, t in NATIVE[mode]
                                     if op not in ("embed", "matmul")])
def test_activation_ops_equal_reference(op, mode):
    for T in (1, 3):
        ref = _run_op(NumpyBackend(mode=mode), op, T, np.random.default_rng(T))
        got = _run_op(_be(mode), op, T, np.random.default_rng(T))
        _check(op, mode, got, ref)


class _Cfg:
    n_layers, n_kv_heads, head_dim = 2, 2, 16


@pytest.mark.parametrize("mode", MODES)
def test_kv_cache_on_device(mode):
    """store_kv into a DeviceKVCache, then attention over its device views (as forward() does),
    for a prompt of 3 and one more token, against the reference over a NumPy cache."""
    rng = np.random.default_rng(5)
    be, ref_be = _be(mode), NumpyBackend(mode=mode)
    cache = be.new_kv_cache(_Cfg, 8)
    ref_k = np.zeros((8, 2, 16), np.float32)
    ref_v = np.zeros_like(ref_k)
    for pos0, T in ((0, 3), (3, 1)):
        k, v = (rng.standard_normal((T, 2, 16)).astype(np.float32) for _ in range(2))
        q = rng.standard_normal((T, 6, 16)).astype(np.float32)
        be.store_kv(cache.k[1], pos0, k)
        be.store_kv(cache.v[1], pos0, v)
        ref_be.store_kv(ref_k, pos0, k)
        ref_be.store_kv(ref_v, pos0, v)
        _check("store_kv", mode, cache.k[1].copy_to_host()[: pos0 + T], ref_k[: pos0 + T])
        got, ref = np.empty_like(q), np.empty_like(q)
        be.attention(got, q, cache.k[1, : pos0 + T], cache.v[1, : pos0 + T], pos0)
        ref_be.attention(ref, q, ref_k[: pos0 + T], ref_v[: pos0 + T], pos0)
        _check("attention", mode, got, ref)


def test_fallback_warns_once_per_op_and_type():
    be = _be("ideal", dtype=np.float64)
    w = _weights("q4_0", cols=COLS)
    x = _acts(2, COLS).astype(np.float64)
    out = np.empty((2, ROWS))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            be.matmul(out, x, w)
    msgs = [r for r in rec if issubclass(r.category, CudaFallbackWarning)]
    assert len(msgs) == 1 and "matmul on q4_0" in str(msgs[0].message)
    ref = np.empty_like(out)
    NumpyBackend(mode="ideal", dtype=np.float64).matmul(ref, x, w)
    np.testing.assert_array_equal(out, ref)


# ---- clear errors --------------------------------------------------------------------------------
def test_error_without_numba_cuda(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "numba_cuda" else real(n, *a))
    with pytest.raises(UnsupportedError, match="needs the numba-cuda package") as e:
        get_backend("cuda")
    assert "pip install" in e.value.hint


@pytest.mark.skipif(not simulated(), reason="a GPU is present")
def test_error_without_gpu_outside_the_simulator():
    code = ("from refinfer.backends import get_backend\n"
            "try:\n    get_backend('cuda')\n"
            "except Exception as e:\n    print(type(e).__name__, e, '|', e.hint)\n")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    out = child_process.finished(p, "get_backend('cuda') without a GPU")
    assert out.startswith("UnsupportedError backend 'cuda' found no usable CUDA GPU"), out
    assert "--backend numba" in out and "NUMBA_ENABLE_CUDASIM=1" in out


# Where the test extra installed the compiler libraries, the child hides them: the loader raises
# what cuda.pathfinder raises when libnvrtc is not found.
_HIDE_COMPILER = ("import cuda.pathfinder as pf\n"
                  "def _missing(*a, **k):\n"
                  "    raise pf.DynamicLibNotFoundError('Failure finding \"libnvrtc.so.13\": hidden by the test')\n"
                  "cuda.compile_ptx = _missing\n")


@pytest.mark.skipif(not simulated(), reason="a GPU is present")
def test_error_without_the_cuda_compiler_libraries():
    """A GPU (pretended here) but no NVVM/NVRTC: said at get_backend, not at the first kernel."""
    def run(hide: str):
        code = ("from numba import cuda\ncuda.is_available = lambda: True\n" + hide +
                "from refinfer.backends import get_backend\n"
                "try:\n    get_backend('cuda')\n    print('COMPILES')\n"
                "except Exception as e:\n    print(type(e).__name__, e, '|', e.hint)\n")
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        return child_process.finished(p, "get_backend('cuda') with a pretended GPU")
    out = run("")
    if out.strip() == "COMPILES":
        out = run(_HIDE_COMPILER)
    assert out.startswith("UnsupportedError backend 'cuda' found a GPU but cannot compile kernels"), out
    assert 'pip install "numba-cuda[cu13]"' in out


# ---- whole model -----------------------------------------------------------------------------------
N_VOCAB = 300   # llama-spm's specials and 256 byte tokens, then its first pieces: a small output matmul


@pytest.fixture(scope="module")
def tiny_cuda_models(vocab_dir, tmp_path_factory):
    """A generated 1-layer model (dim 32) over a truncated SPM vocabulary, quantized to q4_1 by
    llama.cpp (a type with a block minimum, and the q8_1 activation path in ggml mode)."""
    import gguf
    from models import make_tiny_llama_gguf, tokenizer_fields
    d = tmp_path_factory.mktemp("tiny_cuda")
    vocab = d / "vocab.gguf"
    writer = gguf.GGUFWriter(os.fspath(vocab), "llama")
    for key, val, vtype, sub in tokenizer_fields(os.fspath(vocab_dir / "ggml-vocab-llama-spm.gguf")):
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            val = val[:N_VOCAB]
        writer.add_key_value(key, val, vtype, sub_type=sub)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    f32 = make_tiny_llama_gguf(d / "tiny-f32.gguf", vocab_gguf=vocab, dim=32, hidden_dim=64, n_layers=1,
                               n_heads=4, n_kv_heads=2, ctx=64)
    out = {}
    llama_cpp = oracle_import("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure = 3, True          # Q4_1
    dst = d / "tiny-q4_1.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(dst).encode(), params) == 0
    out["q4_1"] = dst
    return out


@pytest.mark.parametrize("mode", MODES)
def test_whole_model_same_greedy_tokens_and_logits(tiny_cuda_models, mode):
    import refinfer
    ref = refinfer.load(tiny_cuda_models["q4_1"], backend="numpy", mode=mode)
    gpu_model = refinfer.load(tiny_cuda_models["q4_1"], backend="cuda", mode=mode)
    gpu_model.backend = _be(mode, threads=3, token_tile=3)   # fewer simulated threads; T = 4 splits 3 + 1
    assert isinstance(gpu_model.new_cache(4), cuda_backend.DeviceKVCache)
    ids = ref.tokenize(PROMPTS[0])[:4]
    want, z_ref = refinfer_greedy(ref, ids, 4, prompt_logits=True)
    got, z = refinfer_greedy(gpu_model, ids, 4, prompt_logits=True)
    assert got == want
    nmse = float(np.sum((z.astype(np.float64) - z_ref) ** 2) / np.sum(z_ref.astype(np.float64) ** 2))
    assert nmse <= 1e-10, f"{mode}: logits NMSE {nmse:.3g}"


def test_generate_command(tiny_cuda_models):
    """python -m refinfer generate --backend cuda prints what the numpy backend prints (the
    command's main() in a fresh process, after the simulator speed-up of the fixture above)."""
    def generate(backend):
        argv = ["generate", "-m", os.fspath(tiny_cuda_models["q4_1"]), "-n", "3", "--temp", "0",
                "--backend", backend, "Hi"]
        code = f"import sys; sys.setswitchinterval(1e-4); from refinfer.cli import main; sys.exit(main({argv!r}))"
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        return p.stdout, p.stderr
    out, err = generate("cuda")
    assert "backend cuda" in err
    assert out == generate("numpy")[0]


# ---- compiled for a real GPU -----------------------------------------------------------------------
def test_kernels_compile_for_a_real_gpu():
    """The simulator runs any Python; tests/cuda_ptx_check.py compiles every kernel to PTX as
    numba.cuda does for a GPU. The compiler libraries come with the test extra
    (numba-cuda[cu13]); without them this skips, which fails the run under CI=true."""
    script = os.path.join(os.path.dirname(__file__), "cuda_ptx_check.py")
    p = subprocess.run([sys.executable, script], env=dict(os.environ, NUMBA_ENABLE_CUDASIM="0"),
                       capture_output=True, text=True, timeout=900)
    out = child_process.finished(p, "tests/cuda_ptx_check.py")   # exit 1: a kernel failed to compile
    if out.startswith("SKIP: "):
        oracle_skip(out.strip())
    assert "kernels compile for sm_" in out.splitlines()[-1], out[-4000:]


# ---- real GPU only ---------------------------------------------------------------------------------
@pytest.mark.gpu
@gpu
def test_real_gpu_runs_the_kernels_compiled():
    from numba import cuda
    assert cuda.is_available() and not simulated()
    w = _weights("q4_K", rows=4096, cols=4096)
    x = _acts(1, 4096)
    ref, got = np.empty((1, 4096), np.float32), np.empty((1, 4096), np.float32)
    NumpyBackend().matmul(ref, x, w)
    CudaBackend().matmul(got, x, w)
    _check("matmul", "ideal", got, ref)
