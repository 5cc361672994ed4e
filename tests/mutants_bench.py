"""Wrong kernels and wrong timed work that the checks in bench/ must catch (they run in CI on
small shapes, see bench/conftest.py)."""

from __future__ import annotations

import pathlib
import sys

import numpy as np

from test_mutants import Mutant

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))

import bench_cuda  # noqa: E402
import bench_kernels  # noqa: E402

from refinfer.backends.numba_backend import NumbaBackend  # noqa: E402
from refinfer.weights import QTensor  # noqa: E402

_MATMUL_IDEAL = NumbaBackend._matmul_ideal
_COPY_OF = bench_kernels.copy_of
_LAUNCHER = bench_cuda.launcher


def _drops_partial_group(self, out, x, w, kind):  # a kernel that skips the rows after the last full group of 64
    _MATMUL_IDEAL(self, out, x, w, kind)
    out[:, out.shape[1] // 64 * 64:] = 0.0


def _corrupted_copy(w, i):  # the timed copies are not the matrix that was checked
    c = _COPY_OF(w, i)
    raw = np.roll(np.asarray(c.raw), 1, axis=0) if i else c.raw
    raw.setflags(write=False)
    return QTensor(c.name, raw, c.qtype, c.shape)


def _half_launch(be, w, x, mode):  # the timed launch covers half the rows: less work, faster
    half = QTensor(w.name, np.ascontiguousarray(w.raw[: w.shape[0] // 2]), w.qtype, (w.shape[0] // 2, w.shape[1]))
    launch, d_half = _LAUNCHER(be, half, x, mode)
    d_out = be.cuda.device_array((1, w.shape[0]), np.float32)

    def run():
        launch()
        d_out[:, : half.shape[0]] = d_half

    return run, d_out


MUTANTS = [
    Mutant("bench_numba_matmul_drops_partial_row_group",
           lambda mp: mp.setattr(NumbaBackend, "_matmul_ideal", _drops_partial_group),
           lambda request: bench_kernels.check_matmul("q4_0", 80, 512, "ideal", 1)),
    Mutant("bench_cold_weights_copies_differ",
           lambda mp: mp.setattr(bench_kernels, "copy_of", _corrupted_copy),
           lambda request: bench_kernels.check_matvec_cold_weights("q4_0", 96, 512, 0)),
    Mutant("bench_cuda_timed_launch_does_half_the_rows",
           lambda mp: mp.setattr(bench_cuda, "launcher", _half_launch),
           lambda request: bench_cuda.bench_type("q4_1", "ideal", 6, 256, 1)),
]
