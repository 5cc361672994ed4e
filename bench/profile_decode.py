"""Where a decode step's time goes, per backend op, at 1 and 16 sequences, and what vector
instructions Numba compiled the kernels to: the numbers to read a gap with llama.cpp on any host.

    python bench/profile_decode.py [-m MODEL] [--backend numba] [-t 1] [--seqs 1,16] [-p 128] [-n 32]
    python -m pytest bench/profile_decode.py [--benchmark-enable] -s

The backend is wrapped by a timing proxy (TimedBackend): every op call forward() makes (embed,
rmsnorm, matmul, matmuls, rope, store_kv, attention, swiglu, ...) is timed, the backend itself is
not changed. Matmuls are split by weight (attn_q+attn_k+attn_v, attn_output, ffn_gate+ffn_up,
ffn_down, output). Per op: ms per generated token (the step's time / sequences), Gweights/s
(weight elements the step multiplies / its time; a step reads each weight once, however many
sequences it decodes) and the share of the step. "python between ops" is the step's wall time
minus its ops': forward()'s own NumPy work (residual adds, the batch's attention metadata,
logits selection) and the interpreter.

Before timing, each sequence's decode through the proxy is checked bitwise against the same
steps without it (the proxy must not change what it measures).

The instruction set: llvmlite's host CPU name and features (what Numba compiles for unless
NUMBA_CPU_NAME / NUMBA_CPU_FEATURES say otherwise) and, per compiled kernel of
refinfer.backends.numba_kernels and blockdecode, how many zmm (512-bit), ymm (256-bit) and xmm
(128-bit) register operands its assembly has, and its widest.

Under pytest with benchmarks disabled (the default, as in CI) it runs on the tiny fixture model
with 1 and 5 sequences and 2 steps, and checks the table adds up; nothing is timed.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import sys
import time

import numpy as np

OPS = ("embed", "rmsnorm", "matmul", "matmuls", "rope_cos_sin", "rope", "store_kv", "attention", "swiglu")
FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "formats" / "fixtures" / "tiny-llama-q4_0.gguf"


def _role(w) -> str:
    """blk.3.attn_q.weight -> attn_q; output.weight -> output."""
    name = getattr(w, "name", "?")
    parts = name.split(".")
    role = parts[2] if parts[0] == "blk" and len(parts) > 2 else parts[0]
    return "output (tied token_embd)" if role == "token_embd" else role


def _n_weights(w) -> int:
    shape = getattr(w, "shape", None)
    return int(np.prod(shape)) if shape is not None else 0


class TimedBackend:
    """Forwards every attribute to the backend; the ops in OPS are timed into .time[key]
    (seconds), .calls[key] and .weights[key] (weight elements multiplied)."""

    def __init__(self, be):
        self._be = be
        self.time = collections.defaultdict(float)
        self.calls = collections.Counter()
        self.weights = collections.Counter()

    def reset(self):
        self.time.clear()
        self.calls.clear()
        self.weights.clear()

    def __getattr__(self, name):
        attr = getattr(self._be, name)
        if name not in OPS or not callable(attr):
            return attr

        def timed(*args, **kwargs):
            key, n_w = name, 0
            if name == "matmul":
                key, n_w = f"matmul {_role(args[2])}", _n_weights(args[2])
            elif name == "matmuls":
                key = f"matmuls {'+'.join(_role(w) for w in args[2])}"
                n_w = sum(_n_weights(w) for w in args[2])
            t = time.perf_counter()
            out = attr(*args, **kwargs)
            self.time[key] += time.perf_counter() - t
            self.calls[key] += 1
            self.weights[key] += n_w
            return out

        return timed


def decode_steps(m, be, n_seqs, n_prompt, n_steps, block_size=16):
    """Prefill n_seqs prompts (with the plain backend), then n_steps greedy decode steps of one
    token per sequence through be. -> (tokens int64[S, n_steps], step wall times [n_steps])."""
    from refinfer.bench_batched import new_manager, prompts_for, Shape
    from refinfer.forward import Segment, forward
    cfg, w = m.config, m.weights
    prompts = prompts_for(Shape(seqs=(n_seqs,), n_prompt=n_prompt), cfg.vocab_size)
    kv = new_manager(m, n_prompt + n_steps + 1, block_size, n_seqs=n_seqs)
    nxt = []
    for j, p in enumerate(prompts):
        kv.allocate(j, p)
        nxt.append(int(np.argmax(forward(cfg, w, m.backend, [Segment(j, p, 0)], kv)[0][0])))
    toks, walls = np.zeros((n_seqs, n_steps), np.int64), []
    for i in range(n_steps):
        batch = [Segment(j, [nxt[j]], kv.append_slot(j, nxt[j])) for j in range(n_seqs)]
        t = time.perf_counter()
        out = forward(cfg, w, be, batch, kv)
        walls.append(time.perf_counter() - t)
        nxt = [int(np.argmax(z[0])) for z in out]
        toks[:, i] = nxt
    return toks, np.array(walls)


def profile(m, n_seqs, n_prompt, n_steps):
    """-> (rows: op, ms/token, Gweights/s, share; step ms). Checked: the proxy's tokens are
    the plain backend's."""
    proxy = TimedBackend(m.backend)
    decode_steps(m, proxy, n_seqs, min(n_prompt, 4), 1)             # warm-up: compiles or loads the kernels
    want, _ = decode_steps(m, m.backend, n_seqs, n_prompt, n_steps)
    proxy.reset()
    got, walls = decode_steps(m, proxy, n_seqs, n_prompt, n_steps)
    if not np.array_equal(got, want):
        raise AssertionError(f"{n_seqs} sequences: the timed backend decoded other tokens than the backend itself")
    wall = float(walls.sum())
    n_tok = n_seqs * n_steps
    rows = []
    for key in sorted(proxy.time, key=proxy.time.get, reverse=True):
        t = proxy.time[key]
        gw = proxy.weights[key] / t / 1e9 if proxy.weights[key] and t > 0 else None
        rows.append((key, 1e3 * t / n_tok, gw, t / wall))
    glue = wall - sum(proxy.time.values())
    rows.append(("python between ops", 1e3 * glue / n_tok, None, glue / wall))
    return rows, 1e3 * wall / n_steps


def format_profile(rows, n_seqs, step_ms) -> str:
    lines = [f"decode, {n_seqs} sequence(s): {step_ms:.2f} ms per step, {n_seqs * 1e3 / step_ms:.1f} tokens/s aggregate",
             f"| {'op':<36} | ms/token | Gweights/s | share  |", f"|{'-' * 38}|----------|------------|--------|"]
    for key, ms, gw, share in rows:
        lines.append(f"| {key:<36} | {ms:8.3f} | {'' if gw is None else f'{gw:10.2f}':>10} | {100 * share:5.1f}% |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# What Numba compiled for

def _dispatchers():
    import importlib
    import pkgutil

    import numba
    import refinfer.backends.numba_kernels as pkg
    mods = [importlib.import_module(f"{pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]
    mods.append(importlib.import_module("refinfer.backends.blockdecode"))
    seen = {}
    for mod in mods:
        for name, obj in vars(mod).items():
            if isinstance(obj, numba.core.registry.CPUDispatcher) and obj.signatures and id(obj) not in seen:
                seen[id(obj)] = (f"{mod.__name__.rsplit('.', 1)[-1]}.{name}", obj)
    return sorted(seen.values())


def _asm(disp) -> str:
    """The kernel's assembly: the same function compiled again, without Numba's cache (a kernel
    loaded from the cache keeps no assembly), for the signatures it was compiled for."""
    import numba
    opts = {k: v for k, v in disp.targetoptions.items() if k not in ("cache", "nopython", "boundscheck")}
    fresh = numba.njit(**opts)(disp.py_func)
    for sig in disp.signatures:
        fresh.compile(sig)
    return "".join(fresh.inspect_asm(sig) for sig in fresh.signatures)


def isa_report(with_asm=True) -> str:
    import llvmlite.binding as ll
    import numba
    cpu = numba.config.CPU_NAME or ll.get_host_cpu_name()     # numba.core.codegen's choice
    feats = numba.config.CPU_FEATURES or ll.get_host_cpu_features().flatten()
    wanted = ("avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512bf16", "avx2", "fma", "f16c", "avxvnni", "amx-int8")
    on = [f for f in wanted if f"+{f}" in feats.split(",")]
    lines = [f"numba {numba.__version__}, llvmlite {ll.llvm_version_info}: compiles for cpu {cpu!r} "
             f"(host {ll.get_host_cpu_name()!r}; NUMBA_CPU_NAME {numba.config.CPU_NAME!r}, "
             f"NUMBA_CPU_FEATURES {numba.config.CPU_FEATURES!r}), opt level {numba.config.OPT}",
             f"features: {', '.join(on) or 'none of ' + ', '.join(wanted)}",
             f"threading layer: {_threading_layer()}, threads {numba.get_num_threads()}"]
    if with_asm:
        lines += [f"| {'kernel':<40} | zmm    | ymm    | xmm    | widest  |", f"|{'-' * 42}|--------|--------|--------|---------|"]
        for name, disp in _dispatchers():
            asm = _asm(disp)
            n = {r: len(re.findall(rf"%{r}\d+", asm)) for r in ("zmm", "ymm", "xmm")}
            widest = next((f"{b} bit" for r, b in (("zmm", 512), ("ymm", 256), ("xmm", 128)) if n[r]), "scalar")
            lines.append(f"| {name:<40} | {n['zmm']:6d} | {n['ymm']:6d} | {n['xmm']:6d} | {widest:<7} |")
    return "\n".join(lines)


def _threading_layer():
    import numba
    try:
        return numba.threading_layer()
    except ValueError:                     # no parallel kernel has run yet
        return "not started"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--backend", default="numba", help="numba (default), numpy or cuda")
    ap.add_argument("-t", "--threads", type=int, default=1, help="threads (default 1)")
    ap.add_argument("--seqs", default="1,16", help="sequence counts (default 1,16)")
    ap.add_argument("-p", "--n-prompt", type=int, default=128, help="prompt tokens per sequence (default 128)")
    ap.add_argument("-n", "--n-steps", type=int, default=32, help="timed decode steps (default 32)")
    ap.add_argument("--no-asm", action="store_true", help="skip the per-kernel register count (recompiles cached kernels)")
    args = ap.parse_args(argv)
    from refinfer import threads
    threads.set_threads(args.threads)
    from refinfer.model import load
    m = load(args.model, backend=args.backend, mode="ideal")
    print(f"model {m.path}, backend {args.backend}, ideal mode, threads {args.threads}, prompt {args.n_prompt}")
    for s in (int(v) for v in args.seqs.split(",")):
        rows, step_ms = profile(m, s, args.n_prompt, args.n_steps)
        print(format_profile(rows, s, step_ms) + "\n")
    if args.backend == "numba":
        print(isa_report(with_asm=not args.no_asm))
    return 0


def test_profile_decode(request):
    from refinfer.model import load
    quick = request.config.getoption("benchmark_disable") and not request.config.getoption("benchmark_enable")
    m = load(FIXTURE if quick else None, backend="numba", mode="ideal")
    for s in (1, 5) if quick else (1, 16):
        rows, step_ms = profile(m, s, 8 if quick else 128, 2 if quick else 32)
        assert abs(sum(share for *_, share in rows) - 1) < 1e-9
        assert any(k.startswith("matmul") and gw for k, _, gw, _ in rows)
        print("\n" + format_profile(rows, s, step_ms))
    report = isa_report(with_asm=not quick)
    assert "compiles for cpu" in report
    print(report)


if __name__ == "__main__":
    sys.exit(main())
