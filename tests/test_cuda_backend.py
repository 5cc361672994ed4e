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
from refinfer.backends.cuda_backend import (CudaBackend, CudaBlockPool, CudaFallbackWarning, coverage,  # noqa: E402
                                            simulated)
from refinfer.backends.numpy_backend import NumpyBackend, quantize_act_q8  # noqa: E402
from refinfer.errors import UnsupportedError  # noqa: E402
from refinfer.forward import AttnMeta, Segment, attn_meta  # noqa: E402
from refinfer.kv_cache import BlockManager, BlockPool  # noqa: E402
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
    assert coverage().keys() == numba_coverage().keys()    # the same (op, type) pairs
    # every pair native, store_kv too (it writes the pool on the device), but rope_cos_sin
    assert {how for (op, t), how in coverage().items() if op != "rope_cos_sin"} == {"native"}
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
    ref = w.dequantize()[ids]
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
                                     if op not in ("embed", "matmul", "store_kv", "attention")])
def test_activation_ops_equal_reference(op, mode):
    for T in (1, 3):
        ref = _run_op(NumpyBackend(mode=mode), op, T, np.random.default_rng(T))
        got = _run_op(_be(mode), op, T, np.random.default_rng(T))
        _check(op, mode, got, ref)


# ---- the paged KV cache on the device (store_kv, attention, copy_block) -------------------------
# Odd shapes: blocks of 3 positions, 7 threads for head_dim 16, GQA 6 heads over 2.
N_HEADS, N_KV, HD = 6, 2, 16


def _pools(be, k_type, v_type, n_blocks=8, block_size=3, n_layers=2):
    shape = dict(n_layers=n_layers, n_kv_heads=N_KV, head_dim=HD, n_blocks=n_blocks, block_size=block_size,
                 k_type=k_type, v_type=v_type)
    return be.new_kv_pool(**shape), BlockPool(**shape)


def _ragged_step(pool, lengths, computed, rng):
    """A BlockManager over pool with sequences of `lengths` tokens, computed[i] of them already
    computed (their K/V stored by earlier steps), and the step that computes the rest of each:
    -> (manager, [Segment])."""
    mgr = BlockManager(pool, enable_prefix_caching=False)
    batch = []
    for i, (n, done) in enumerate(zip(lengths, computed)):
        tokens = [int(t) for t in rng.integers(3, 100, n)]
        mgr.allocate(i, tokens)
        mgr.mark_computed(i, done)
        batch.append(Segment(i, tokens[done:], done))
    return mgr, batch


def _kv_rows(rng, n, scale=1.0):
    return tuple((rng.standard_normal((n, N_KV, HD)) * scale).astype(np.float32) for _ in range(2))


@pytest.mark.parametrize("k_type,v_type", [("f32", "f32"), ("f16", "f16"), ("f32", "f16")])
def test_store_kv_writes_the_host_pools_bytes(k_type, v_type):
    """store_kv into the device pool leaves exactly the bytes that the reference's store_kv
    leaves in a kv_cache.BlockPool (zeros elsewhere), for a ragged step over two sequences;
    then copy_block copies on the device as BlockPool.copy_block does on the host."""
    rng = np.random.default_rng(11)
    be, ref_be = _be(), NumpyBackend()
    pool, host = _pools(be, k_type, v_type)
    assert isinstance(pool, CudaBlockPool) and pool.k.shape == host.k.shape and pool.v.shape == host.v.shape
    mgr, batch = _ragged_step(pool, [5, 4], [0, 2], rng)
    meta = attn_meta(mgr, batch)
    k, v = _kv_rows(rng, len(meta.slots), scale=3.0)
    be.store_kv(pool, 1, meta, k, v)
    ref_be.store_kv(host, 1, meta, k, v)
    got = pool.to_host()
    np.testing.assert_array_equal(got.k, host.k)
    np.testing.assert_array_equal(got.v, host.v)
    pool.copy_block(1, 5, 2)
    host.copy_block(1, 5, 2)
    got = pool.to_host()
    np.testing.assert_array_equal(got.k, host.k)
    np.testing.assert_array_equal(got.v, host.v)


def _f16_edge_values():
    """float32 values at and around every kind of binary16 rounding: zeros, subnormals, the
    normal boundary, ties (to even, both ways), the largest finite value and the overflow
    threshold 65520, infinities and a NaN; and midpoints around a sample of binary16 values."""
    h = np.arange(0, 0x7C00, 97, dtype=np.uint16)
    lo, hi = h.view(np.float16).astype(np.float32), (h + 1).view(np.float16).astype(np.float32)
    mid = ((lo.astype(np.float64) + hi) / 2).astype(np.float32)         # exact: a tie
    up, down = np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(-np.inf))
    special = np.array([0.0, -0.0, 2.0 ** -24, 2.0 ** -25, 2.0 ** -25 * 1.5, 2.0 ** -26, 2.0 ** -14,
                        2.0 ** -14 - 2.0 ** -25, 65504.0, 65519.996, 65520.0, 1e9, np.inf, -np.inf, np.nan],
                       np.float32)
    v = np.concatenate([lo, mid, up, down, special])
    return np.concatenate([v, -v])


def test_f16_store_rounds_as_the_host():
    """The device's float32 -> binary16 encoder (kv.f16_bits) against NumPy's, bit for bit."""
    be = _be()
    vals = _f16_edge_values()
    n = -(-len(vals) // (N_KV * HD))
    rows = np.zeros(n * N_KV * HD, np.float32)
    rows[:len(vals)] = vals
    rows = rows.reshape(n, N_KV, HD)
    pool, host = _pools(be, "f16", "f16", n_blocks=-(-n // 3))
    meta = AttnMeta(np.arange(n), np.arange(n), np.zeros(n, np.int32), np.array([0, n]),
                    np.arange(pool.n_blocks, dtype=np.int32)[None], 3)
    be.store_kv(pool, 0, meta, rows, -rows)
    NumpyBackend().store_kv(host, 0, meta, rows, -rows)
    got = pool.to_host()
    np.testing.assert_array_equal(got.k, host.k)
    np.testing.assert_array_equal(got.v, host.v)


@pytest.mark.parametrize("mode", MODES)
def test_paged_attention_equals_reference(mode):
    """A ragged step (a chunk after a cached prefix, a decode, a whole prompt) over the device
    pool against the reference over a host pool with the same bytes; the reference's KV types
    for the mode (f32 ideal, f16 ggml)."""
    rng = np.random.default_rng(12)
    be, ref_be = _be(mode), NumpyBackend(mode=mode)
    pool, host = _pools(be, *ref_be.kv_types(), n_blocks=10)
    mgr, batch = _ragged_step(pool, [7, 5, 4], [4, 4, 0], rng)
    meta = attn_meta(mgr, batch)
    cached = AttnMeta(np.arange(8), np.concatenate([mgr.slot_mapping(0, 0, 4), mgr.slot_mapping(1, 0, 4)]),
                      np.repeat(np.arange(2, dtype=np.int32), 4), np.array([0, 4, 8]), meta.tables[:2], 3)
    for m in (cached, meta):           # the cached prefixes first, as earlier steps stored them
        k, v = _kv_rows(rng, len(m.slots))
        for b, p in ((be, pool), (ref_be, host)):
            b.store_kv(p, 1, m, k, v)
    q = (rng.standard_normal((len(meta.slots), N_HEADS, HD)) * 2).astype(np.float32)
    got, ref = np.empty_like(q), np.empty_like(q)
    be.attention(got, q, pool, 1, meta)
    ref_be.attention(ref, q, host, 1, meta)
    _check("attention", mode, got, ref)


def test_host_pool_runs_the_reference():
    """A kv_cache.BlockPool (host memory) given to the cuda backend, and the host pool it makes
    for float64: the reference's store_kv and attention, one warning per op."""
    rng = np.random.default_rng(13)
    for dtype in (np.float32, np.float64):
        be, ref_be = _be(dtype=dtype), NumpyBackend(dtype=dtype)
        k_type, v_type = ref_be.kv_types()
        pool = (be.new_kv_pool if dtype == np.float64 else BlockPool)(
            n_layers=1, n_kv_heads=N_KV, head_dim=HD, n_blocks=4, block_size=3, k_type=k_type, v_type=v_type)
        assert type(pool) is BlockPool
        host = BlockPool(1, N_KV, HD, 4, 3, k_type, v_type)
        mgr, batch = _ragged_step(pool, [5], [0], rng)
        meta = attn_meta(mgr, batch)
        k, v = (a.astype(dtype) for a in _kv_rows(rng, 5))
        q = rng.standard_normal((5, N_HEADS, HD)).astype(dtype)
        got, ref = np.empty_like(q), np.empty_like(q)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            for _ in range(2):
                be.store_kv(pool, 0, meta, k, v)
                be.attention(got, q, pool, 0, meta)
        assert len([r for r in rec if issubclass(r.category, CudaFallbackWarning)]) == 2
        ref_be.store_kv(host, 0, meta, k, v)
        ref_be.attention(ref, q, host, 0, meta)
        np.testing.assert_array_equal(pool.k, host.k)
        np.testing.assert_array_equal(got, ref)


def test_device_pool_errors():
    """A device pool handed to a float64 backend, and a device pool of a type without kernels:
    clear errors naming what is wrong, with a hint."""
    rng = np.random.default_rng(14)
    pool = _be().new_kv_pool(n_layers=1, n_kv_heads=N_KV, head_dim=HD, n_blocks=2, block_size=3)
    mgr, batch = _ragged_step(pool, [4], [0], rng)
    k, v = _kv_rows(rng, 4)
    with pytest.raises(UnsupportedError, match="a KV pool in GPU memory, but dtype float64") as e:
        _be(dtype=np.float64).store_kv(pool, 0, attn_meta(mgr, batch), k, v)
    assert "new_kv_pool" in e.value.hint
    with pytest.raises(UnsupportedError, match="KV cache type 'f64' has no cuda kernels") as e:
        CudaBlockPool(n_layers=1, n_kv_heads=N_KV, head_dim=HD, n_blocks=2, k_type="f64", v_type="f64")
    assert "host pool" in e.value.hint


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
    assert isinstance(gpu_model.new_cache(4).bind(gpu_model.backend).pool, CudaBlockPool)
    ids = ref.tokenize(PROMPTS[0])[:4]
    want, z_ref = refinfer_greedy(ref, ids, 4, prompt_logits=True)
    got, z = refinfer_greedy(gpu_model, ids, 4, prompt_logits=True)
    assert got == want
    nmse = float(np.sum((z.astype(np.float64) - z_ref) ** 2) / np.sum(z_ref.astype(np.float64) ** 2))
    assert nmse <= WHOLE_MODEL_NMSE[mode], f"{mode}: logits NMSE {nmse:.3g}"


# The simulator runs the kernels' Python: ideal mode sums in float64 in another order than the
# reference and rounds once (measured 0: the same bits on this model), ggml mode's F16 attention
# and q8_1 dots add in float64 where the reference emulates ggml's lanes (measured 1.5e-14). On a
# GPU, FMA contraction and libdevice's exp move last bits: the bound bench.py also uses.
WHOLE_MODEL_NMSE = {"ideal": 1e-15, "ggml": 2e-13} if simulated() else {"ideal": 1e-10, "ggml": 1e-10}


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
