"""A thread-safe cuda.shared.array for numba's CUDA simulator.

The simulator runs a block's threads as Python threads and finds a block's shared array by the
source line that asks for it: `get(line)`, and if nothing is there, allocate and store. Two
threads that reach the line together can both find nothing and each get a private array; a
thread then reads lanes nobody wrote (one CI run failed this way, rmsnorm's sum of squares read
uninitialised memory and math.sqrt raised "math domain error"). The same lookup under a lock
gives every thread of the block one array, as on a GPU.
"""

from __future__ import annotations

import sys
import threading
import traceback

import numpy as np

_LOCK = threading.Lock()


def install() -> None:
    from numba.cuda.simulator import kernelapi
    types, numpy_support = kernelapi.types, kernelapi.numpy_support

    original = kernelapi.FakeCUDAShared.array
    if getattr(original, "thread_safe", False):
        return

    def array(self, shape, dtype, alignment=None):
        if alignment is not None or shape == 0:
            return original(self, shape, dtype, alignment)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        # the kernel's line: this function is called from the kernel's frame directly
        caller = traceback.extract_stack(sys._getframe())[-2][0:2]
        with _LOCK:
            res = self._allocations.get(caller)
            if res is None:
                res = np.empty(shape, dtype)
                self._allocations[caller] = res
        return res

    array.thread_safe = True
    kernelapi.FakeCUDAShared.array = array
