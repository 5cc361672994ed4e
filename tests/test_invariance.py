"""Batch invariance of the forward pass, the guarantee of forward.py: in ideal mode, on each
backend, every row of a ragged batch over the shared paged cache is bitwise equal to the same
row of the sequence alone (Model.logits), whatever the batch composition, arrival order, prompt
split, prefix-cache hits, block size and thread count. A negative control shows that the check
fails for a backend whose matmul is a plain float32 BLAS product over the batch."""

from __future__ import annotations

import numpy as np
import pytest

import refinfer
from refinfer.backends.numpy_backend import NumpyBackend

from invariance_workloads import SHAPES, first_difference, run_batched

BACKENDS = ("numpy", "numba")


@pytest.fixture(scope="module", params=BACKENDS)
def model(request, tiny_quantized):
    return refinfer.load(tiny_quantized["q4_1"], backend=request.param)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_ragged_batches_equal_each_sequence_alone(model, shape, block_size):
    rng = np.random.default_rng([block_size, len(shape)])
    work = SHAPES[shape](rng, model.config.vocab_size)
    rows, stats, _ = run_batched(model, work, rng, block_size=block_size)
    assert first_difference(model, work, rows) is None
    if shape == "shared_prefix" and block_size < 16:
        assert stats.prefix_hits > 0, "the shared-prefix workload should hit the prefix cache"


THREADS_CHILD = """
import sys, numpy as np, numba, refinfer
sys.path.insert(0, {tests!r})
from invariance_workloads import SHAPES, first_difference, run_batched
model = refinfer.load({path!r}, backend="numba")
work = SHAPES["mixed"](np.random.default_rng(7), model.config.vocab_size)
numba.set_num_threads(2)
ref = {{i: model.logits(s) for i, s in enumerate(work.sequences)}}
for n in (1, 2, 3):
    numba.set_num_threads(n)
    rows, _, _ = run_batched(model, work, np.random.default_rng(n), block_size=3)
    for (i, p), row in rows.items():
        assert np.array_equal(row.view(np.uint32), ref[i][p].view(np.uint32)), (n, i, p)
    print("threads", n, "ok", len(rows))
"""


def test_thread_counts_1_2_3_change_no_bit(tiny_quantized):
    """Numba's pool size is fixed when it starts: a child with NUMBA_NUM_THREADS=3 runs the mixed
    workload on 1, 2 and 3 threads against references computed on 2."""
    import os
    import pathlib
    import subprocess
    import sys
    from child_process import finished
    code = THREADS_CHILD.format(tests=str(pathlib.Path(__file__).parent), path=str(tiny_quantized["q4_1"]))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "NUMBA_NUM_THREADS": "3"})
    out = finished(p, "thread-count child")
    assert [line.split()[:3] for line in out.splitlines()] == [["threads", str(n), "ok"] for n in (1, 2, 3)]


class _BatchDependentMatmul(NumpyBackend):
    """The negative control: a float32 BLAS product over the whole batch, whose blocking (and so
    each element's summation order) changes with the number of rows."""

    def matmul(self, out, x, w):
        out[...] = x.astype(np.float32) @ self._dequantized(w).T


def test_negative_control_batch_dependent_matmul_is_caught(tiny_quantized):
    model = refinfer.load(tiny_quantized["q4_1"], backend="numpy")
    model.backend = _BatchDependentMatmul()
    rng = np.random.default_rng(3)
    work = SHAPES["mixed"](rng, model.config.vocab_size)
    rows, _, _ = run_batched(model, work, rng, block_size=16)
    assert first_difference(model, work, rows) is not None


CPU_BITS_CHILD = """
import hashlib, sys, numpy as np, refinfer
m = refinfer.load(sys.argv[1], backend=sys.argv[2])
if sys.argv[3] == "blas":       # the negative control: a float32 BLAS matmul
    m.backend.matmul = lambda out, x, w: out.__setitem__(..., x @ m.backend._dequantized(w).T)
ids = [int(t) for t in np.random.default_rng(0).integers(3, m.config.vocab_size, 40)]
print(hashlib.sha256(m.logits(ids).tobytes()).hexdigest())
"""

# NumPy dispatches its loops at run time to the widest SIMD the CPU has (baseline X86_V2, then
# X86_V3 = AVX2 + FMA, X86_V4 = AVX-512), OpenBLAS its kernels to the CPU's core type;
# NPY_DISABLE_CPU_FEATURES and OPENBLAS_CORETYPE make this machine behave as an older CPU. The
# reference's ideal mode uses only elementwise IEEE operations, exp and ordered sums, no BLAS:
# its bits must not depend on either.
EMULATED_CPUS = {"host": {},
                 "haswell": {"NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL", "OPENBLAS_CORETYPE": "Haswell"},
                 "sandybridge": {"NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL",
                                 "OPENBLAS_CORETYPE": "Sandybridge"}}


def _digests_per_cpu(path, backend, matmul):
    import os
    import subprocess
    import sys
    from child_process import finished
    digests = {}
    for cpu, env in EMULATED_CPUS.items():
        p = subprocess.run([sys.executable, "-c", CPU_BITS_CHILD, str(path), backend, matmul],
                           capture_output=True, text=True, timeout=300, env={**os.environ, **env})
        digests[cpu] = finished(p, f"logits as a {cpu} CPU").split()[-1]
    return digests


def test_reference_bits_do_not_depend_on_the_cpu(tiny_quantized):
    digests = _digests_per_cpu(tiny_quantized["q4_1"], "numpy", "reference")
    assert len(set(digests.values())) == 1, digests


def test_negative_control_blas_bits_depend_on_the_cpu(tiny_quantized):
    """The same check sees a float32 BLAS matmul change with OpenBLAS's core type."""
    digests = _digests_per_cpu(tiny_quantized["q4_1"], "numpy", "blas")
    assert len(set(digests.values())) > 1, digests


# ---- the engine: every request's tokens and logprobs equal Model.generate of it alone --------

def _requests(rng, work):
    """One request per workload sequence: its tokens as the prompt, greedy or seeded sampling,
    top logprobs on some."""
    reqs = []
    for seq in work.sequences:
        sampled = rng.random() < 0.5
        reqs.append({"prompt": list(seq), "max_tokens": int(rng.integers(1, 9)), "seed": int(rng.integers(0, 2 ** 32)),
                     "temperature": 0.9 if sampled else 0.0, "top_k": 0 if sampled else 40,
                     "top_logprobs": 3 if rng.random() < 0.5 else None})
    return reqs


def run_engine(model, reqs, arrivals, engine_kw):
    """Submit each request at its arrival step (an engine step each time round) -> results, stats."""
    engine = refinfer.Engine(model, **engine_kw)
    handles, step = [None] * len(reqs), 0
    while any(h is None or not h.done for h in handles):
        for i, r in enumerate(reqs):
            if handles[i] is None and arrivals[i] <= step:
                handles[i] = engine.submit(**r)
        engine.step()
        step += 1
        assert step < 10_000, "the engine made no progress"
    engine.check_accounting()
    return [h.result() for h in handles], engine.stats()


def first_result_difference(model, reqs, results):
    for i, (r, got) in enumerate(zip(reqs, results)):
        alone = model.generate(**r, details=True)
        for what in ("token_ids", "finish_reason", "text", "logprobs"):
            if getattr(got, what) != getattr(alone, what):
                return f"request {i}: {what} differs from the request alone"
    return None


ENGINES = {   # (max_batch, max_tokens_per_step, kv_block_size, kv_cache_tokens)
    "wide": dict(max_batch=8, max_tokens_per_step=64, kv_block_size=16),
    "chunked": dict(max_batch=3, max_tokens_per_step=7, kv_block_size=3),
    "one_per_step": dict(max_batch=1, max_tokens_per_step=5, kv_block_size=1),
    "tight_pool": dict(max_batch=6, max_tokens_per_step=16, kv_block_size=4, kv_cache_tokens=32),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_engine_requests_equal_each_request_alone(model, shape, engine):
    rng = np.random.default_rng([len(shape), len(engine)])
    work = SHAPES[shape](rng, model.config.vocab_size)
    reqs = _requests(rng, work)
    if engine == "tight_pool":     # every request fits the 32-position pool alone, not all at once
        for r in reqs:
            r["prompt"], r["max_tokens"] = r["prompt"][:20], 8
    order = rng.permutation(len(reqs))                           # arrival order is random too
    reqs, arrivals = [reqs[i] for i in order], [work.arrivals[i] for i in order]
    results, stats = run_engine(model, reqs, arrivals, ENGINES[engine])
    assert all(r.finish_reason in ("stop", "length") for r in results), [r.error for r in results]
    assert first_result_difference(model, reqs, results) is None
    if engine == "tight_pool" and shape != "single":
        assert stats.preemptions > 0, "the tight pool should preempt"


def test_negative_control_engine_with_batch_dependent_matmul_is_caught(tiny_quantized):
    model = refinfer.load(tiny_quantized["q4_1"], backend="numpy")
    model.backend = _BatchDependentMatmul()
    rng = np.random.default_rng(5)
    work = SHAPES["mixed"](rng, model.config.vocab_size)
    reqs = _requests(rng, work)
    results, _ = run_engine(model, reqs, work.arrivals, ENGINES["wide"])
    assert first_result_difference(model, reqs, results) is not None


def test_numba_bits_do_not_depend_on_the_compile_target(tiny_quantized, tmp_path):
    """Numba compiles for the host CPU (AVX-512 here): the kernels compiled for Haswell (AVX2 +
    FMA, 256-bit vectors) give the same logits bits, since no kernel reassociates a sum. A
    fresh cache directory, so that the child compiles for its target."""
    import os
    import subprocess
    import sys
    from child_process import finished
    digests = {}
    for target, env in {"host": {}, "haswell": {"NUMBA_CPU_NAME": "haswell",
                                                "NUMBA_CACHE_DIR": str(tmp_path / "cache")}}.items():
        p = subprocess.run([sys.executable, "-c", CPU_BITS_CHILD, str(tiny_quantized["q4_1"]), "numba", "kernels"],
                           capture_output=True, text=True, timeout=600, env={**os.environ, **env})
        digests[target] = finished(p, f"numba logits compiled for {target}").split()[-1]
    assert digests["host"] == digests["haswell"], digests
