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
    """{backend: {(op, type): status}}. A backend module reports its own pairs through a
    coverage(mode) function; one that cannot be imported here is "unavailable"."""
    import importlib

    from ..backends import BACKENDS
    from ..backends.numba_backend import SHARED_OPS, coverage as numba_coverage
    keys = list(numba_coverage(mode))   # the full (op, type) list: every op x every loader type
    out = {"numpy": {k: ("shared" if k[0] in SHARED_OPS else "reference") for k in keys}}
    for name in BACKENDS:
        if name == "numpy":
            continue
        try:
            cov = importlib.import_module(f"refinfer.backends.{name}_backend").coverage(mode)
        except (ImportError, AttributeError):
            cov = {}
            status = "unavailable"
        else:
            status = "fallback"
        out[name] = {k: cov.get(k, status) for k in keys}
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
    w = [max(8, max(len(t) for _, t in keys) + 2), 14] + [max(10, len(b) + 2) for b in backends]
    print(f"coverage in {args.mode} mode (native: own kernel; fallback: the NumPy reference, warned once)")
    print("".join(h.ljust(n) for h, n in zip(["type", "op", *backends], w)))
    for op, t in sorted(keys, key=lambda k: (k[1], k[0])):
        print("".join(c.ljust(n) for c, n in zip([t, op, *(m[b][(op, t)] for b in backends)], w)))
    return 0
