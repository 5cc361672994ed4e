"""Batch invariance of the numba backend's ideal-mode kernels, op by op: a matmul row and an
attention row are bitwise the same computed alone, inside any batch, through any block size
and on any thread count. Negative controls show that the checks fail for kernels that depend
on the batch: the float32 BLAS prefill (batch_invariant=False) and ggml mode's attention on the
NumPy reference (llama.cpp's tinyBLAS order for several tokens, its vec_dot for one).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

numba = pytest.importorskip("numba")

import kv_workloads  # noqa: E402
from test_numba_backend import NATIVE, _acts, _weights  # noqa: E402
from refinfer.backends.numba_backend import NumbaBackend  # noqa: E402
from refinfer.backends.numpy_backend import NumpyBackend  # noqa: E402

MATMUL_TYPES = [t for op, t in NATIVE["ideal"] if op == "matmul"]
ROWS, COLS = 45, 512      # two row groups, the second padded
T_MAX = 40
SPLITS = [(5, 1), (5, 2), (4, 7), (3, 33), (0, 40)]   # (first row, T): row 5 inside each of them


def matmul_rows(be, name):
    """{(T, row): bits} of row 5 of x computed in products of T rows starting at various rows."""
    w = _weights(name, rows=ROWS, cols=COLS)
    x = _acts(T_MAX, COLS, seed=2)
    got = {}
    for r0, T in SPLITS:
        out = np.empty((T, ROWS), np.float32)
        be.matmul(out, np.ascontiguousarray(x[r0: r0 + T]), w)
        got[T] = out[5 - r0].view(np.uint32).copy()
    return got


def check_matmul_rows(be, name):
    got = matmul_rows(be, name)
    for T, bits in got.items():
        np.testing.assert_array_equal(bits, got[1], err_msg=f"{name}: row 5 in a product of {T} rows differs from alone")


@pytest.mark.parametrize("name", MATMUL_TYPES)
def test_matmul_row_is_the_same_alone_and_in_any_batch(name):
    check_matmul_rows(NumbaBackend(), name)


@pytest.mark.parametrize("name", ["q4_1", "q8_0", "f16"])
def test_negative_control_blas_prefill_is_caught(name):
    """The non-invariant option multiplies several tokens with float32 BLAS: the check sees it."""
    with pytest.raises(AssertionError, match="differs from alone"):
        check_matmul_rows(NumbaBackend(batch_invariant=False), name)


# ---- attention -------------------------------------------------------------------------------------
N_HEADS, N_KV, HD = 6, 3, 20          # head_dim 20: the 8-lane steps leave a remainder of 4
LENGTHS = [41, 17, 5, 30]             # sequences 0 .. 3
TARGETS = [(0, 40), (0, 37), (2, 4), (3, 29)]   # (sequence, position) rows compared
STEPS = {                             # the same rows alone and inside ragged batches
    "alone": [[(q, p, 1)] for q, p in TARGETS],
    "mixed": [[(0, 36, 5), (1, 16, 1), (2, 0, 5), (3, 29, 1)]],
    "prefills": [[(3, 20, 10), (0, 37, 4), (1, 0, 17), (2, 4, 1)]],
}


def attention_rows(be, block_size):
    """{(layout, sequence, position): bits} of the target rows, on a pool of that block size."""
    rows = kv_workloads.kv_rows(LENGTHS, N_KV, HD, seed=4, scale=3.0)
    pool, kv = kv_workloads.filled_pool(be, rows, block_size, *be.kv_types())
    return kv_workloads.target_rows(be, pool, kv, STEPS, TARGETS, N_HEADS, HD, seed=4, scale=3.0)


def check_attention_rows(be, block_sizes=(1, 3, 16)):
    alone = {(q, p): bits for (layout, q, p), bits in attention_rows(be, 16).items() if layout == "alone"}
    for bs in block_sizes:
        for (layout, q, p), bits in attention_rows(be, bs).items():
            np.testing.assert_array_equal(bits, alone[q, p], err_msg=f"sequence {q} position {p}: {layout} batch "
                                                                     f"with block size {bs} differs from alone")


def test_attention_row_is_the_same_alone_in_any_batch_and_block_size():
    check_attention_rows(NumbaBackend())


def test_negative_control_ggml_reference_attention_is_caught():
    """ggml mode promises llama.cpp's numbers for a batch, not invariance: the NumPy reference
    runs a segment of several tokens in tinyBLAS's order and one token in vec_dot's."""
    with pytest.raises(AssertionError, match="differs from alone"):
        check_attention_rows(NumpyBackend(mode="ggml"), block_sizes=(16,))


def digest_all():
    """One digest of every checked row: matmuls of the default model's type and f16, attention."""
    h = hashlib.sha256()
    be = NumbaBackend()
    for name in ("q4_1", "q6_K", "f16"):
        for T, bits in sorted(matmul_rows(be, name).items()):
            h.update(bits.tobytes())
    for key, bits in sorted(attention_rows(be, 3).items()):
        h.update(bits.tobytes())
    return h.hexdigest()


THREADS_CHILD = """
import sys, numba
sys.path.insert(0, {tests!r})
from test_numba_invariance import digest_all
for n in (1, 2, 3):
    numba.set_num_threads(n)
    print(n, digest_all())
"""


def test_thread_counts_1_2_3_change_no_bit():
    """Numba's pool size is fixed when it starts: a child with NUMBA_NUM_THREADS=3 computes the
    rows on 1, 2 and 3 threads; they equal each other and this process's."""
    from child_process import finished
    code = THREADS_CHILD.format(tests=str(pathlib.Path(__file__).parent))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "NUMBA_NUM_THREADS": "3"})
    lines = finished(p, "thread-count child").split()
    assert lines[0::2] == ["1", "2", "3"]
    assert set(lines[1::2]) == {digest_all()}
