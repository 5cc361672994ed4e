"""bench/ under pytest. With benchmarks disabled (`--benchmark-disable`, the default in
pyproject.toml, as in CI) every benchmark runs its correctness check once, on small shapes, and
times nothing; `python -m pytest bench --benchmark-enable` runs the full shapes and times them.
The helpers of tests/ (the libggml oracle, ci_skips) are shared."""

from __future__ import annotations

import os
import pathlib
import shutil
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

# As tests/conftest.py: without an NVIDIA driver numba.cuda runs in its simulator. It reads the
# variable once, when first imported.
if not (os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi")):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

# An oracle-backed skip fails the run under CI=true here too (tests/ci_skips.py; its session
# hooks come from tests/conftest.py).
from ci_skips import pytest_collectreport, pytest_runtest_makereport  # noqa: E402,F401
