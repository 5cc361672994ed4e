"""Batch invariance of the cuda backend in ideal mode, under the CUDA simulator (or on a GPU):
  - matmul: each row of a T-token product is bitwise the row computed alone (T = 1), whatever
    the token tile and the threads per block;
  - attention: each token's output is bitwise the same inside a ragged multi-sequence step over
    blocks of 3 positions as in its sequence's own single-step run over blocks of 5;
  - forward: every logits row of a ragged two-sequence schedule equals Model.logits of its
    sequence alone (tests/invariance_workloads.py, as tests/test_invariance.py on the CPU).
Each kernel is also checked against the NumPy reference (the tolerance table). Negative
controls: a float32 split-k matmul whose split depends on T, and a float32 attention summed per
KV block, both fail the same checks.

The simulator runs every CUDA thread in Python: the shapes are small and odd (7 threads per
block, tiles of 2 with T = 5, head_dim 16 under 6 heads over 2 KV heads), 2112 columns so that
each of the 32 lanes of a q4_1 row sums two or three blocks.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from ci_skips import oracle_import

oracle_import("numba_cuda")

import refinfer  # noqa: E402
from numba import cuda  # noqa: E402
from invariance_workloads import Workload, first_difference, run_batched  # noqa: E402
from refinfer.backends.cuda_backend import CudaBackend  # noqa: E402
from refinfer.backends.numpy_backend import NumpyBackend  # noqa: E402
from refinfer.forward import Segment, attn_meta  # noqa: E402
from refinfer.kv_cache import BlockManager  # noqa: E402
from test_cuda_backend import _check, tiny_cuda_models  # noqa: E402,F401  (a fixture)
from test_numba_backend import _acts, _weights  # noqa: E402

THREADS, TILE = 7, 2


@pytest.fixture(autouse=True)
def _fast_simulator_threads():
    old = sys.getswitchinterval()     # see tests/test_cuda_backend.py
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(old)


def _be(**kw):
    return CudaBackend(mode="ideal", threads=kw.pop("threads", THREADS), token_tile=kw.pop("token_tile", TILE), **kw)


# ---- matmul ----------------------------------------------------------------------------------
def check_rows_alone(matmul, w, x, rows_alone):
    """matmul(out, x, w) over all T rows of x, then over each row in rows_alone by itself: the
    bits must agree. Returns the T-row product."""
    batch = np.empty((len(x), w.shape[0]), np.float32)
    matmul(batch, x, w)
    for t in rows_alone:
        alone = np.empty((1, w.shape[0]), np.float32)
        matmul(alone, x[t:t + 1], w)
        d = np.flatnonzero(batch[t].view(np.uint32) != alone[0].view(np.uint32))
        assert len(d) == 0, (f"row {t} of a {len(x)}-token product differs from the row alone in {len(d)} "
                             f"of {w.shape[0]} outputs")
    return batch


MATMUL_CASES = {"q4_1": 2112, "q6_K": 512}     # type -> columns: 66 blocks (lanes of 2 or 3), 2 super-blocks


@pytest.mark.parametrize("name", sorted(MATMUL_CASES))
def test_matmul_row_of_a_batch_equals_the_row_alone(name):
    w = _weights(name, rows=5, cols=MATMUL_CASES[name])
    x = _acts(5, w.shape[1])
    got = check_rows_alone(_be().matmul, w, x, rows_alone=(1, 4))   # second of a tile; the short last tile
    other = np.empty_like(got)
    _be(threads=13, token_tile=3).matmul(other, x, w)
    np.testing.assert_array_equal(other.view(np.uint32), got.view(np.uint32),
                                  err_msg="the threads per block or the tile changed a bit")
    ref = np.empty_like(got)
    NumpyBackend().matmul(ref, x, w)
    _check("matmul", "ideal", got, ref)


@cuda.jit
def split_k_f32(out, x, w):
    """out[t, r] = x[t] . w[r] in float32, the columns split over the block's threads and the
    partial sums added in thread order: a k-split whose width the launcher picks."""
    r, t = cuda.blockIdx.x, cuda.blockIdx.y
    tid, nt = cuda.threadIdx.x, cuda.blockDim.x
    part = cuda.shared.array(64, np.float32)
    acc = np.float32(0)
    for j in range(tid, x.shape[1], nt):
        acc += x[t, j] * w[r, j]
    part[tid] = acc
    cuda.syncthreads()
    if tid == 0:
        s = np.float32(0)
        for i in range(nt):
            s += part[i]
        out[t, r] = s


def test_negative_control_batch_dependent_matmul_is_caught():
    """A float32 matmul that splits k over 8 threads for a decode and 3 for a batch (as GPU
    libraries pick a split-k by shape) fails check_rows_alone."""
    be = _be()
    w = _weights("q4_1", rows=5, cols=256)
    dense = be.cuda.to_device(w.dequantize().astype(np.float32))

    def split_k_matmul(out, x, w):
        T, rows = out.shape
        d_out = be.cuda.device_array(out.shape, np.float32)
        split_k_f32[(rows, T), 8 if T == 1 else 3](d_out, be.cuda.to_device(x), dense)
        out[...] = d_out.copy_to_host()

    with pytest.raises(AssertionError, match="differs from the row alone"):
        check_rows_alone(split_k_matmul, w, _acts(3, 256), rows_alone=(0, 1, 2))


# ---- attention --------------------------------------------------------------------------------
N_HEADS, N_KV, HD = 6, 2, 16
LENGTHS = (7, 3, 9)                                   # three sequences of ragged lengths
SCHEDULE = [[(0, 0, 4), (2, 0, 2)],                   # (sequence, start, tokens) per step
            [(0, 4, 3), (1, 0, 3), (2, 2, 4)],
            [(2, 6, 3)]]


def run_attention(be, block_size, schedule, q, k, v):
    """Store and attend the steps of schedule over a fresh pool of blocks of block_size; q[i],
    k[i], v[i] hold sequence i's rows per position. -> {(sequence, position): out[n_heads, hd]}."""
    pool = be.new_kv_pool(n_layers=1, n_kv_heads=N_KV, head_dim=HD, n_blocks=sum(-(-n // block_size) for n in LENGTHS),
                          block_size=block_size, k_type="f32", v_type="f32")
    mgr = BlockManager(pool, enable_prefix_caching=False)
    tokens = [list(range(3, 3 + n)) for n in LENGTHS]
    outs = {}
    for step in schedule:
        batch = []
        for i, start, n in step:
            if i not in mgr.tables:
                mgr.allocate(i, tokens[i])
            batch.append(Segment(i, tokens[i][start:start + n], start))
        meta = attn_meta(mgr, batch)
        rows = [(s.seq_id, p) for s in batch for p in range(s.start, s.start + len(s.tokens))]
        be.store_kv(pool, 0, meta, np.stack([k[i][p] for i, p in rows]), np.stack([v[i][p] for i, p in rows]))
        out = np.empty((len(rows), N_HEADS, HD), np.float32)
        be.attention(out, np.stack([q[i][p] for i, p in rows]), pool, 0, meta)
        outs.update(zip(rows, out))
        for s in batch:
            mgr.mark_computed(s.seq_id, s.start + len(s.tokens))
    return outs


def check_attention_alone(be, q, k, v):
    """Every token of the ragged SCHEDULE over blocks of 3 against its sequence run alone, in
    one step, over blocks of 5: the bits must agree. Returns the batched outputs."""
    batched = run_attention(be, 3, SCHEDULE, q, k, v)
    for i, n in enumerate(LENGTHS):
        alone = run_attention(be, 5, [[(i, 0, n)]], q, k, v)
        for p in range(n):
            assert np.array_equal(batched[i, p].view(np.uint32), alone[i, p].view(np.uint32)), \
                f"sequence {i} position {p}: attention in the ragged batch differs from the sequence alone"
    return batched


def _qkv(seed=21):
    rng = np.random.default_rng(seed)
    return tuple([(rng.standard_normal((n, H, HD)) * 2).astype(np.float32) for n in LENGTHS]
                 for H in (N_HEADS, N_KV, N_KV))


def test_attention_of_a_token_alone_equals_it_in_a_ragged_batch():
    q, k, v = _qkv()
    got = check_attention_alone(_be(), q, k, v)
    ref = run_attention(NumpyBackend(), 3, SCHEDULE, q, k, v)
    keys = sorted(got)
    _check("attention", "ideal", np.stack([got[key] for key in keys]), np.stack([ref[key] for key in keys]))


class _BlockSplitAttention(CudaBackend):
    """The negative control: float32 attention summed block by block of the KV cache (each
    block's partial sums, then the blocks' in order), so the block size moves the roundings."""

    def attention(self, out, q, pool, layer, meta):
        host = pool.to_host()
        for t in range(len(q)):
            n = int(meta.positions[t]) + 1
            k, v = NumpyBackend.gather_kv(host, layer, meta, int(meta.seg_of_token[t]), n)
            for h in range(q.shape[1]):
                s = (k[:, h // (q.shape[1] // k.shape[1])].astype(np.float64) @ q[t, h]) / math.sqrt(q.shape[2])
                e = np.exp(s - s.max()).astype(np.float32)
                vh = v[:, h // (q.shape[1] // k.shape[1])]
                acc, tot = np.zeros(q.shape[2], np.float32), np.float32(0)
                for b0 in range(0, n, meta.block_size):
                    acc += (e[b0:b0 + meta.block_size, None] * vh[b0:b0 + meta.block_size]).sum(axis=0)
                    tot += e[b0:b0 + meta.block_size].sum()
                out[t, h] = acc / tot


def test_negative_control_block_dependent_attention_is_caught():
    q, k, v = _qkv()
    with pytest.raises(AssertionError, match="differs from the sequence alone"):
        check_attention_alone(_BlockSplitAttention(threads=THREADS), q, k, v)


# ---- the whole forward pass ---------------------------------------------------------------------
def test_forward_rows_of_a_ragged_schedule_equal_each_sequence_alone(tiny_cuda_models):  # noqa: F811
    """Two sequences in ragged steps (chunks of 3 + 1, then 2 + 2) over blocks of 3: each logits
    row bitwise equals Model.logits of its sequence alone (one step over blocks of 16)."""
    model = refinfer.load(tiny_cuda_models["q4_1"], backend="cuda")
    model.backend = _be(threads=3)
    ids = model.tokenize("The quick brown fox jumps")
    work = Workload([ids[:5], ids[1:4]], [0, 0], "cuda ragged")
    rows, _, _ = run_batched(model, work, block_size=3, schedule=[[(0, 0, 3), (1, 0, 1)], [(0, 3, 2), (1, 1, 2)]])
    assert len(rows) == 8
    assert first_difference(model, work, rows) is None
