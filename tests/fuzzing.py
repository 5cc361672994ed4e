"""Shared check for the container fuzz tests: a hostile file may only parse or raise
RefinferError, and must never make the reader allocate without bound."""

from __future__ import annotations

import os
import tempfile
import tracemalloc

from refinfer.errors import RefinferError

MAX_ALLOCATION = 8 * 2**20  # the fuzzed files are a few hundred bytes


def read_bounded(data: bytes, suffix: str, read_all) -> None:
    """Write data to a temporary file named *suffix and call read_all(path), which opens it and
    reads every tensor; fail on any other exception or on more than MAX_ALLOCATION bytes of
    Python/NumPy allocation."""
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "f" + suffix)
        with open(p, "wb") as fh:
            fh.write(data)
        tracemalloc.start()
        try:
            read_all(p)
        except RefinferError:
            pass
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < MAX_ALLOCATION, f"parsing allocated {peak} bytes"
