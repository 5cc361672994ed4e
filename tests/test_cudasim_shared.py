"""The simulator's shared arrays are one per block (tests/cudasim_shared.py), checked with the
race forced open: a lookup that misses waits 20 ms before it answers, so every thread of the
block finds the slot empty before the first one fills it."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from numba import cuda

pytestmark = pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1",
                                reason="a real GPU has real shared memory")


class _SlowMiss(dict):
    stored = 0

    def __setitem__(self, key, value):
        _SlowMiss.stored += 1
        super().__setitem__(key, value)

    def get(self, key, default=None):
        found = super().get(key, default)
        if key not in self:
            time.sleep(0.02)
        return found


@cuda.jit
def _kernel(out):
    a = cuda.shared.array(1, np.float64)
    if cuda.threadIdx.x == 0:
        a[0] = 1.0
    cuda.syncthreads()
    out[cuda.threadIdx.x] = a[0]


def _launch(monkeypatch, array):
    from numba.cuda.simulator import kernelapi

    init = kernelapi.FakeCUDAShared.__init__

    def slow_init(self, *args):
        init(self, *args)
        self._allocations = _SlowMiss()

    monkeypatch.setattr(kernelapi.FakeCUDAShared, "__init__", slow_init)
    monkeypatch.setattr(kernelapi.FakeCUDAShared, "array", array)
    _SlowMiss.stored = 0
    out = np.zeros(4)
    _kernel[1, 4](out)
    return out, _SlowMiss.stored


def test_threads_of_a_block_share_one_array(monkeypatch):
    from numba.cuda.simulator import kernelapi
    assert getattr(kernelapi.FakeCUDAShared.array, "thread_safe", False)
    out, arrays = _launch(monkeypatch, kernelapi.FakeCUDAShared.array)
    assert arrays == 1 and (out == 1).all()


def test_negative_control_the_unlocked_lookup_gives_private_arrays(monkeypatch):
    from numba.cuda.simulator import kernelapi
    original = kernelapi.FakeCUDAShared.array.__closure__
    unlocked = next(c.cell_contents for c in original if callable(c.cell_contents)
                    and c.cell_contents.__name__ == "array")
    _, arrays = _launch(monkeypatch, unlocked)
    assert arrays > 1
