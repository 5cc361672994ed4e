"""Shared check for the container fuzz tests: a hostile file may only parse or raise a
FormatError that says where it went wrong (the file, the byte offset, and the tensor when it
names one), and must never make the reader allocate without bound."""

from __future__ import annotations

import os
import tempfile
import tracemalloc

from refinfer.errors import FormatError, RefinferError

MAX_ALLOCATION = 8 * 2**20  # the fuzzed files are a few hundred bytes


def check_names_where(e: RefinferError, path: str):
    """e is a FormatError of the file at path, with a byte offset, stated in its message as
    "file '<path>'[, tensor '<name>'], offset <n>: ..."."""
    msg = str(e)
    assert isinstance(e, FormatError), f"{type(e).__name__} without a file and offset: {msg}"
    assert str(e.file) == path, f"the error names file {e.file!r}, not {path!r}: {msg}"
    assert isinstance(e.offset, int) and e.offset >= 0, f"the error names no byte offset: {msg}"
    where = [f"file {path!r}"] + [f"tensor {e.tensor!r}"] * (e.tensor is not None) + [f"offset {e.offset}"]
    assert msg.startswith(", ".join(where) + ": "), msg


def read_bounded(data: bytes, suffix: str, read_all) -> None:
    """Write data to a temporary file named *suffix and call read_all(path), which opens it and
    reads every tensor; fail on any other exception, on an error that does not say where (see
    check_names_where), or on more than MAX_ALLOCATION bytes of Python/NumPy allocation."""
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "f" + suffix)
        with open(p, "wb") as fh:
            fh.write(data)
        tracemalloc.start()
        try:
            read_all(p)
        except RefinferError as e:
            error = e
        else:
            error = None
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < MAX_ALLOCATION, f"parsing allocated {peak} bytes"
        if error is not None:
            check_names_where(error, p)
