"""llama-bench-like throughput of refinfer's backends and of llama.cpp on the same model.

Each (engine, threads) pair runs in its own Python process, so that thread pools are sized
before they start (OPENBLAS_NUM_THREADS, numba.set_num_threads), the peak resident memory is
that engine's alone, and a crash in one engine cannot take the others down. A worker prints
one JSON line:

    pp  prompt processing: one forward pass over n_prompt tokens from an empty cache
    tg  text generation: n_gen single-token forward passes after one token of context

llama.cpp runs through llama-cpp-python, imported only here inside its worker; the engine
itself never imports it.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

ENGINES = ("numba", "numpy", "cuda", "llama.cpp")


def bench_tokens(n, vocab_size):
    """A fixed, varied token sequence (no special tokens at the low ids)."""
    lo = min(100, vocab_size // 4)
    return [lo + (i * 7919) % (vocab_size - lo) for i in range(n)]


class _Timer:
    """Wall-clock and process CPU time of a block: on a shared machine the CPU time shows what
    one thread would do on an idle core (for one thread; with more it sums their work)."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def _rates(res, test, n, t):
    res[test] = n / t.wall
    res[test + "_cpu"] = n / t.cpu if t.cpu > 0 else None


def _peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _worker_refinfer(model, backend, threads, n_prompt, n_gen):
    t_start = time.perf_counter()
    if backend == "numba":
        import numba
        numba.set_num_threads(threads)
    import numpy as np

    from .forward import KVCache, forward
    from .model import load
    m = load(model, backend=backend)
    cfg, w, be = m.config, m.weights, m.backend
    new_cache = getattr(be, "new_kv_cache", lambda cfg, n: KVCache(cfg, n, dtype=be.dtype))  # cuda: in GPU memory
    toks = bench_tokens(max(n_prompt, n_gen + 1), cfg.vocab_size)
    # warm-up (compiles or loads the cached kernels): a 2-token prompt and one decode step
    cache = new_cache(cfg, 8)
    forward(cfg, w, be, toks[:2], cache, all_logits=False)
    forward(cfg, w, be, toks[2:3], cache, all_logits=False)
    startup = time.perf_counter() - t_start
    res = {"startup_s": startup}
    if n_prompt:
        cache = new_cache(cfg, n_prompt)
        with _Timer() as t:
            forward(cfg, w, be, toks[:n_prompt], cache, all_logits=False)
        _rates(res, "pp", n_prompt, t)
    if n_gen:
        cache = new_cache(cfg, n_gen + 1)
        z = forward(cfg, w, be, toks[:1], cache, all_logits=False)
        with _Timer() as t:
            for i in range(n_gen):
                z = forward(cfg, w, be, [toks[1 + i]], cache, all_logits=False)
        _rates(res, "tg", n_gen, t)
        res["checksum"] = float(np.sum(z))
    return res


def _worker_llama_cpp(model, threads, n_prompt, n_gen, plain):
    from .llama_oracle import open_llama
    t_start = time.perf_counter()
    llm = open_llama(model, plain=plain, n_ctx=max(n_prompt, n_gen + 1) + 8, n_batch=max(n_prompt, 1),
                     n_ubatch=max(n_prompt, 1), n_threads=threads, n_threads_batch=threads, verbose=False)
    toks = bench_tokens(max(n_prompt, n_gen + 1), llm.n_vocab())
    llm.eval(toks[:2])  # warm-up
    llm.reset()
    res = {"startup_s": time.perf_counter() - t_start}
    if n_prompt:
        with _Timer() as t:
            llm.eval(toks[:n_prompt])
        _rates(res, "pp", n_prompt, t)
        llm.reset()
    if n_gen:
        llm.eval(toks[:1])
        with _Timer() as t:
            for i in range(n_gen):
                llm.eval([toks[1 + i]])
        _rates(res, "tg", n_gen, t)
    llm.close()
    return res


def worker_main(argv):
    engine, model, threads, n_prompt, n_gen, plain = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4]), argv[5] == "1"
    if engine == "llama.cpp":
        res = _worker_llama_cpp(model, threads, n_prompt, n_gen, plain)
    else:
        res = _worker_refinfer(model, engine, threads, n_prompt, n_gen)
    res["peak_rss_bytes"] = _peak_rss_bytes()
    print("BENCH " + json.dumps(res), flush=True)
    return 0


def run_worker(engine, model, threads, n_prompt, n_gen, *, plain=False, timeout=1800):
    """One engine in a fresh process -> its result dict, or {"error": reason}."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "refinfer.bench", engine, os.fspath(model), str(threads), str(n_prompt),
           str(n_gen), "1" if plain else "0"]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in p.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [""]
    why = f"killed by signal {-p.returncode}" if p.returncode < 0 else f"exit code {p.returncode}"
    return {"error": f"{why}: {tail[0][:200]}"}


def _best(a, b):
    """Keep the faster of two runs per test (best of N, as timings on a shared machine only
    ever get slower than the code is)."""
    if "error" in a:
        return b
    if "error" in b:
        return a
    out = dict(a)
    for k, v in b.items():
        if k in ("pp", "tg", "pp_cpu", "tg_cpu") and v is not None and (out.get(k) is None or v > out[k]):
            out[k] = v
    return out


def run_bench(model, threads_list, engines=ENGINES, n_prompt=512, n_gen=128, reps=1, log=None):
    """-> list of row dicts: backend, threads, test, tokens_per_s, ratio_vs_llama_cpp, plus
    cpu_tokens_per_s, peak_rss_bytes, model_bytes, startup_s (and error for a failed engine).
    With reps > 1 the engines run in turn reps times and each keeps its best result."""
    model_bytes = os.path.getsize(model)
    rows = []
    for threads in threads_list:
        results = {}
        for rep in range(reps):
            for engine in engines:
                name = results.get(engine, (engine, None))[0]
                res = run_worker(engine, model, threads, n_prompt, n_gen, plain=name != engine)
                if engine == "llama.cpp" and "error" in res and name == engine:
                    # builds whose AMX/repacked CPU kernels crash: retry on the plain CPU path
                    retry = run_worker(engine, model, threads, n_prompt, n_gen, plain=True)
                    if "error" not in retry:
                        res, name = retry, "llama.cpp (plain CPU)"
                prev = results.get(engine, (name, None))[1]
                results[engine] = (name, res if prev is None else _best(prev, res))
                if log:
                    log(f"{name} threads={threads} run {rep + 1}/{reps}: {res}")
        base = results.get("llama.cpp", (None, {}))[1]
        for engine in engines:
            name, res = results[engine]
            for test, n in (("pp", n_prompt), ("tg", n_gen)):
                if not n:
                    continue
                tps = res.get(test)
                ratio = tps / base[test] if tps is not None and base.get(test) else None
                row = {"backend": name, "threads": threads, "test": f"{test}{n}", "tokens_per_s": tps,
                       "ratio_vs_llama_cpp": ratio, "cpu_tokens_per_s": res.get(test + "_cpu"),
                       "peak_rss_bytes": res.get("peak_rss_bytes"),
                       "model_bytes": model_bytes, "startup_s": res.get("startup_s")}
                if "error" in res:
                    row["error"] = res["error"]
                rows.append(row)
    return rows


def format_table(rows, model):
    head = ["model", "size", "backend", "threads", "test", "t/s", "vs llama.cpp", "t/CPU-s", "peak mem", "startup"]
    lines = []
    for r in rows:
        tps = "failed" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.2f}"
        ratio = "" if r["ratio_vs_llama_cpp"] is None else f"{r['ratio_vs_llama_cpp']:.2f}x"
        mem = "" if r["peak_rss_bytes"] is None else f"{r['peak_rss_bytes'] / 2**20:.0f} MiB"
        start = "" if r["startup_s"] is None else f"{r['startup_s']:.1f} s"
        cpu = "" if r.get("cpu_tokens_per_s") is None else f"{r['cpu_tokens_per_s']:.2f}"
        lines.append([os.path.basename(model), f"{r['model_bytes'] / 2**20:.1f} MiB", r["backend"], str(r["threads"]),
                      r["test"], tps, ratio, cpu, mem, start])
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt(x) for x in lines]
    errors = [f"{r['backend']} threads={r['threads']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(out + sorted(set(errors))) + "\n"


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
