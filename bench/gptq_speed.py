"""fasterquant per layer: refinfer.methods.gptq against AutoGPTQ 0.7.1's GPTQ.fasterquant, on the
same Hessians, in the same run.

    python bench/gptq_speed.py                    # SmolLM2-135M's Linear shapes, group 128
    python bench/gptq_speed.py --act-order --group-size 32 --repeat 5

Each layer's Hessian comes from random correlated inputs (256 tokens). First the check: given
AutoGPTQ's Hinv and perm, every code, zero and g_idx must equal AutoGPTQ's; then both are timed
with their own Cholesky (best of --repeat). Both libraries use the same number of threads
(torch.get_num_threads(); NumPy's BLAS as configured, see threadpoolctl if installed).
The bar is <= 1.5x AutoGPTQ's time per layer.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import oracles_methods as om  # noqa: E402
from refinfer.methods import gptq  # noqa: E402

# (name, out_features N, in_features K) of one SmolLM2-135M decoder layer
SMOLLM2 = [("q_proj", 576, 576), ("k_proj", 192, 576), ("v_proj", 192, 576), ("o_proj", 576, 576),
           ("gate_proj", 1536, 576), ("up_proj", 1536, 576), ("down_proj", 576, 1536)]


def hessian(K: int, seed: int, tokens: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(0, 1, (K, K)).astype(np.float32) / np.float32(np.sqrt(K)) + np.eye(K, dtype=np.float32)
    x = (rng.normal(0, 1, (tokens, K)).astype(np.float32) @ mix) * np.exp(rng.normal(0, 1, K)).astype(np.float32)
    h = gptq.Hessian(K)
    for seq in np.split(x, 8):
        h.add_batch(seq)
    return h.H


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    import torch
    kw = dict(bits=args.bits, group_size=args.group_size, sym=not args.asym, actorder=args.act_order,
              static_groups=False)
    print(f"fasterquant, {args.bits}-bit, group {args.group_size}, act-order {args.act_order}, "
          f"sym {not args.asym}; torch {torch.__version__} with {torch.get_num_threads()} threads")
    print(f"{'layer':<10} {'N x K':>11} {'AutoGPTQ s':>11} {'refinfer s':>11} {'ratio':>6}  codes")
    worst = 0.0
    warm = hessian(576, seed=99)                       # first LAPACK/BLAS calls pay thread start-up
    gptq.fasterquant(np.ones((8, 576), np.float32), warm, **kw)
    om.autogptq_fasterquant(np.ones((8, 576), np.float32), warm, **kw)
    for i, (name, N, K) in enumerate(SMOLLM2):
        H = hessian(K, seed=i)
        W = (0.02 * np.random.default_rng(100 + i).standard_t(4, (N, K))).astype(np.float32)
        ref = om.autogptq_fasterquant(W, H, **kw)
        r = gptq.fasterquant(W, H, Hinv=ref["Hinv"], perm=ref["perm"], **kw)
        same = (np.array_equal(r.codes, ref["codes"]) and np.array_equal(r.zero, ref["zero"])
                and np.array_equal(r.g_idx, ref["g_idx"]))
        t_ref = best_of(lambda: om.autogptq_fasterquant(W, H, **kw), args.repeat)
        t_own = best_of(lambda: gptq.fasterquant(W, H, **kw), args.repeat)
        worst = max(worst, t_own / t_ref)
        print(f"{name:<10} {N:>5} x {K:<5} {t_ref:>11.3f} {t_own:>11.3f} {t_own / t_ref:>6.2f}  "
              f"{'equal' if same else 'DIFFER'}")
        if not same:
            return 1
    print(f"worst ratio {worst:.2f} (bar 1.5)")
    return 0 if worst <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
