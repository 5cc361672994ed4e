"""python -m refinfer backends [--mode ideal|ggml] [--json]

Which (op, type) pairs each backend runs with its own kernels. `numpy` is the reference and
defines every op; an accelerated backend either has a kernel (native) or runs the reference
for that pair with a one-time warning (fallback). `shared` ops are computed once per forward
pass by the reference for every backend.
"""

from __future__ import annotations

import json
import sys

HELP = "show which ops and weight types each backend runs natively (the coverage matrix)"


def add_arguments(p):
    p.add_argument("--mode", default="ideal", choices=["ideal", "ggml"], help="numeric mode (default ideal)")
    p.add_argument("--json", action="store_true", help="print one JSON object per (op, type)")


def coverage_matrix(mode="ideal"):
    """{backend: {(op, type): status}} for every backend that imports here."""
    from ..backends import BACKENDS
    from ..backends.numba_backend import SHARED_OPS
    cols, keys = {}, None
    try:
        from ..backends.numba_backend import coverage
        numba_cov = coverage(mode)
    except ImportError:  # numba not installed: every pair falls back
        numba_cov = None
    if numba_cov is not None:
        keys = list(numba_cov)
    for name in BACKENDS:
        if name == "numpy":
            continue
        cols[name] = numba_cov if name == "numba" else None
    if numba_cov is not None:   # the cuda backend's kernels (running them needs numba-cuda and a GPU)
        from ..backends.cuda_backend import coverage as cuda_coverage
        cols["cuda"] = cuda_coverage(mode)
    ref = {k: ("shared" if k[0] in SHARED_OPS else "reference") for k in keys}
    out = {"numpy": ref}
    for name, cov in cols.items():
        out[name] = cov if cov is not None else {k: "fallback" for k in keys}
    return out


def run(args) -> int:
    m = coverage_matrix(args.mode)
    backends = list(m)
    keys = list(m[backends[0]])
    if args.json:
        rows = [{"op": op, "type": t, **{b: m[b][(op, t)] for b in backends}} for op, t in keys]
        json.dump({"mode": args.mode, "rows": rows}, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    w = [8, 14] + [max(10, len(b) + 2) for b in backends]
    print(f"coverage in {args.mode} mode (native: own kernel; fallback: the NumPy reference, warned once)")
    print("".join(h.ljust(n) for h, n in zip(["type", "op", *backends], w)))
    for op, t in sorted(keys, key=lambda k: (k[1], k[0])):
        print("".join(c.ljust(n) for c, n in zip([t, op, *(m[b][(op, t)] for b in backends)], w)))
    return 0
