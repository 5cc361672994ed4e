"""The numba backend's njit: numba.njit with nogil=True.

The kernels touch only arrays, so they can run without the GIL. Then a long prefill in the
engine's thread does not stall other Python threads: the server's event loop keeps answering
(/health, new requests, streamed tokens) while a step computes. numba's omp and tbb threading
layers accept parallel kernels called from several threads at once."""

from __future__ import annotations

import numba


def njit(*args, **kwargs):
    kwargs.setdefault("nogil", True)
    return numba.njit(*args, **kwargs)
