"""One thread count for every pool a command uses: Numba's kernels, the BLAS library behind
NumPy (OpenBLAS in NumPy's wheels) and llama.cpp when it is a source.

- Numba sizes its pool from NUMBA_NUM_THREADS (default: the number of cores) when it is first
  imported; `numba.set_num_threads(n)` then uses n of them, so n cannot exceed that size. Set
  before Numba loads, the variable itself is set to n, so any n works.
- BLAS threads are set at run time through threadpoolctl (OPENBLAS_NUM_THREADS is only read
  when NumPy loads). The ideal-mode prefill tiles and the NumPy reference run on BLAS.

On a machine where other work keeps a core busy, fewer threads are faster: SmolLM2 decoded
56 tok/s on 1 thread and 15.9 on 2 with one of the two cores taken.
"""

from __future__ import annotations

import os
import sys

from .errors import RefinferError


def add_argument(p, default_help="all cores"):
    p.add_argument("-t", "--threads", type=int, default=None, metavar="N",
                   help=f"threads for Numba kernels, BLAS and llama.cpp (default: {default_help}); "
                        "with NUMBA_NUM_THREADS set, at most that many")


# ggml's GGML_MAX_N_THREADS. Numba starts every thread of its pool at once: tens of thousands
# exhaust the process's threads and crash it (a segmentation fault at -t 99999).
MAX_THREADS = 512


def check(n, option="-t/--threads"):
    if n is not None and not 1 <= n <= MAX_THREADS:
        raise RefinferError(f"{option} must be in 1..{MAX_THREADS}, got {n}",
                            hint=f"this machine has {os.cpu_count() or 1} cores; -t 1 for one thread, "
                                 "leave it out for all of them")
    return n


def set_threads(n: int | None) -> int:
    """Size every pool to n threads (None: leave the defaults). Returns the count in force."""
    if n is None:
        return os.cpu_count() or 1
    check(n)
    if "numba" not in sys.modules:
        # a fresh process: libraries loaded from now on start with n threads (numba imports
        # scipy where it is installed, and with it scipy's own OpenBLAS)
        for var in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(n)
    else:
        import numba
        if n > numba.config.NUMBA_NUM_THREADS:
            raise RefinferError(f"-t {n} is more than Numba's pool of {numba.config.NUMBA_NUM_THREADS} threads",
                                hint=f"set NUMBA_NUM_THREADS={n} in the environment, or ask for fewer threads")
        numba.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=n)
    except ImportError:                      # threadpoolctl is a dependency; a broken install only loses this
        pass
    return n


def llama_cpp_threads(n: int | None) -> int:
    """llama.cpp's thread count for a -t value: one thread unless asked, since its spin-waiting
    threads make two threads slower than one on a busy machine (see llama_oracle.LlamaCpp)."""
    return 1 if n is None else n
