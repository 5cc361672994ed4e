"""Injected bugs in the cuda backend's paged KV cache and the checks that must catch them (see
test_mutants.py). Under the simulator the kernels run their Python, on a GPU they are compiled:
a patched kernel part comes in through a fresh kernel cache, so that both see it and the real
kernels are untouched afterwards."""

from __future__ import annotations

import functools
import sys

import numpy as np

from test_mutants import Mutant


def _simulator_speed(check):
    """tests/test_cuda_backend.py's switch interval (its autouse fixture does not reach here)."""
    @functools.wraps(check)
    def run(request):
        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)
        try:
            check(request)
        finally:
            sys.setswitchinterval(old)
    return run


def f16_sign_lost(monkeypatch):
    """The F16 store takes the sign from x < 0: -0.0 and negative NaNs are stored positive."""
    from numba import cuda

    from refinfer.backends.cuda_kernels import kv

    @cuda.jit(device=True)
    def store_f16(rows, b, o, h, d, x):
        bits = kv.f16_bits(x)
        rows[b, o, h, d] = bits if x < 0 else bits & 0x7FFF

    monkeypatch.setitem(kv.STORE, "f16", store_f16)
    monkeypatch.setattr(kv, "store_kv", functools.cache(kv.store_kv.__wrapped__))


def first_table_for_all(monkeypatch):
    """The device copy of the block tables repeats the first segment's table for every segment."""
    from refinfer.backends.cuda_backend import CudaBackend
    original = CudaBackend._device_meta

    def _device_meta(self, meta):
        d = original(self, meta)
        d["tables"] = self.cuda.to_device(np.ascontiguousarray(np.repeat(meta.tables[:1], len(meta.tables), 0)))
        return d
    monkeypatch.setattr(CudaBackend, "_device_meta", _device_meta)


def mask_at_segment_start(monkeypatch):
    """The causal mask of a segment ends at its first token: the device positions of every token
    are its segment's start, so a chunk's later tokens do not see the chunk's earlier ones."""
    from refinfer.backends.cuda_backend import CudaBackend
    original = CudaBackend._device_meta

    def _device_meta(self, meta):
        d = original(self, meta)
        starts = meta.positions[meta.seg_starts[:-1]][meta.seg_of_token]
        d["positions"] = self.cuda.to_device(np.ascontiguousarray(starts, np.int64))
        return d
    monkeypatch.setattr(CudaBackend, "_device_meta", _device_meta)


@_simulator_speed
def check_f16_store(request):
    import test_cuda_backend as t
    t.test_f16_store_rounds_as_the_host()


@_simulator_speed
def check_paged_attention(request):
    import test_cuda_backend as t
    t.test_paged_attention_equals_reference("ideal")


@_simulator_speed
def check_attention_invariance(request):
    import test_cuda_invariance as t
    t.test_attention_of_a_token_alone_equals_it_in_a_ragged_batch()


MUTANTS = [
    Mutant("cuda_f16_store_sign_lost", f16_sign_lost, check_f16_store),
    Mutant("cuda_attention_first_table_for_all", first_table_for_all, check_paged_attention),
    Mutant("cuda_attention_mask_at_segment_start", mask_at_segment_start, check_attention_invariance),
]
