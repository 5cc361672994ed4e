"""llama-bench-like throughput of refinfer's backends and of llama.cpp on the same model.

Each (engine, threads) pair runs in its own Python process, so that thread pools are sized
before they start (OPENBLAS_NUM_THREADS, numba.set_num_threads), the peak resident memory is
that engine's alone, and a crash in one engine cannot take the others down. A worker prints
one JSON line:

    pp  prompt processing: one forward pass over n_prompt tokens from an empty cache
    tg  text generation: n_gen single-token forward passes after one token of context

Every worker also writes the logits it computed (the last prompt position of pp, every step of
tg) to files, and its timings count only if those logits match a reference run in this
process before the workers start: NumPy, ideal mode, the same tokens (tg's steps as one
teacher-forced pass). refinfer's backends run ideal mode too and must match within NMSE
1e-10 (REFINFER_NMSE), the bound tests/test_cuda_backend.py holds the whole-model logits to
(tests/test_numba_backend.py holds numba's to 2e-12 on the tiny models). llama.cpp computes with q8 activations and an F16 KV
cache, so it is held to a loose bound (LLAMA_CPP_LIMITS) that catches a wrong model or a
broken build, not its rounding. A row whose check fails is a failed row, with the numbers.

llama.cpp runs through llama-cpp-python, imported only here inside its worker; the engine
itself never imports it.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ENGINES = ("numba", "numpy", "cuda", "llama.cpp")

# refinfer's backends against the NumPy reference, both in ideal mode: the float32 matmul sums
# in another order (fused kernels against BLAS): numba's SmolLM2 Q4_1 bench logits are at NMSE 4.8e-14 (pp512) and 5.4e-13
# (tg128, one-token decode against the batched reference).
REFINFER_NMSE = 1e-10
# llama.cpp against refinfer's ideal mode: q8 activations and the F16 KV cache put SmolLM2
# Q4_1's bench logits at NMSE 4.3e-4 (pp512) / 2.0e-4 (tg128) and mean KLD 9.0e-3 / 5.0e-3,
# the generated q4_0 model's at NMSE 3e-4 and KLD 6e-4; a wrong model or a broken build gives
# NMSE of order 1. The bounds leave room for other models and quantizations.
LLAMA_CPP_LIMITS = {"nmse": 5e-2, "kld_mean": 1e-1}


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


def _worker_refinfer(model, backend, threads, n_prompt, n_gen, out_dir):
    t_start = time.perf_counter()
    if backend == "numba":
        import numba
        numba.set_num_threads(threads)

    from .forward import forward
    from .model import load
    m = load(model, backend=backend, mode="ideal")
    cfg, w, be = m.config, m.weights, m.backend
    new_cache = lambda cfg, n: m.new_cache(n)  # noqa: E731  (in the backend's memory: cuda's on the GPU)
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
            z = forward(cfg, w, be, toks[:n_prompt], cache, all_logits=False)
        _rates(res, "pp", n_prompt, t)
        np.save(os.path.join(out_dir, "pp.npy"), z[-1])
    if n_gen:
        cache = new_cache(cfg, n_gen + 1)
        forward(cfg, w, be, toks[:1], cache, all_logits=False)
        with open(os.path.join(out_dir, "tg.f32"), "wb", buffering=0) as f, _Timer() as t:
            for i in range(n_gen):
                z = forward(cfg, w, be, [toks[1 + i]], cache, all_logits=False)
                f.write(np.ascontiguousarray(z[-1], dtype=np.float32).data)  # a 4 * vocab byte copy per step
        _rates(res, "tg", n_gen, t)
    return res


def _worker_llama_cpp(model, threads, n_prompt, n_gen, plain, out_dir):
    from .llama_oracle import _llama_cpp, open_llama
    llama_cpp = _llama_cpp()                     # a missing llama-cpp-python fails this row with its hint
    t_start = time.perf_counter()
    llm = open_llama(model, plain=plain, n_ctx=max(n_prompt, n_gen + 1) + 8, n_batch=max(n_prompt, 1),
                     n_ubatch=max(n_prompt, 1), n_threads=threads, n_threads_batch=threads, verbose=False)
    n_vocab = llm.n_vocab()
    toks = bench_tokens(max(n_prompt, n_gen + 1), n_vocab)

    def last_logits():  # the logits of the last token of the last eval (the only row it asks for)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))

    llm.eval(toks[:2])  # warm-up
    llm.reset()
    res = {"startup_s": time.perf_counter() - t_start}
    if n_prompt:
        with _Timer() as t:
            llm.eval(toks[:n_prompt])
        _rates(res, "pp", n_prompt, t)
        np.save(os.path.join(out_dir, "pp.npy"), last_logits().copy())
        llm.reset()
    if n_gen:
        llm.eval(toks[:1])
        with open(os.path.join(out_dir, "tg.f32"), "wb", buffering=0) as f, _Timer() as t:
            for i in range(n_gen):
                llm.eval([toks[1 + i]])
                f.write(last_logits().data)
        _rates(res, "tg", n_gen, t)
    llm.close()
    return res


def worker_main(argv):
    engine, model, threads, n_prompt, n_gen, plain = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4]), argv[5] == "1"
    out_dir = argv[6]
    if engine == "llama.cpp":
        res = _worker_llama_cpp(model, threads, n_prompt, n_gen, plain, out_dir)
    else:
        res = _worker_refinfer(model, engine, threads, n_prompt, n_gen, out_dir)
    res["peak_rss_bytes"] = _peak_rss_bytes()
    print("BENCH " + json.dumps(res), flush=True)
    return 0


def reference_logits(model, n_prompt, n_gen) -> dict:
    """The logits every worker must reproduce, from the NumPy backend in ideal mode: "pp" the
    last position of the n_prompt-token prompt [V]; "tg" the n_gen decode steps [n_gen, V],
    computed as one teacher-forced pass over the same tokens (row 1 + i is what step i sees)."""
    from .forward import forward
    from .model import load
    m = load(model, backend="numpy", mode="ideal")
    toks = bench_tokens(max(n_prompt, n_gen + 1), m.config.vocab_size)
    out = {}
    if n_prompt:
        out["pp"] = forward(m.config, m.weights, m.backend, toks[:n_prompt], m.new_cache(n_prompt), all_logits=False)[-1]
    if n_gen:
        out["tg"] = forward(m.config, m.weights, m.backend, toks[:n_gen + 1], m.new_cache(n_gen + 1))[1:]
    return out


def check_logits(engine, got: dict, ref: dict) -> dict:
    """{test: reason} for each test whose logits do not match the reference (empty: all do)."""
    from .metrics import compare_logits
    bad = {}
    for test, want in ref.items():
        z = got.get(test)
        if z is None or z.size != want.size:
            bad[test] = f"{test} logits missing or of the wrong size ({None if z is None else z.size} floats, " \
                        f"expected {want.size})"
            continue
        z, want = z.reshape(-1, want.shape[-1]), want.reshape(-1, want.shape[-1])
        if not np.all(np.isfinite(z)):
            bad[test] = f"{test} logits are not finite"
            continue
        r = compare_logits(z, want)
        if engine == "llama.cpp":
            over = [f"{k} {r[k]:.3g} > {lim:.3g}" for k, lim in LLAMA_CPP_LIMITS.items() if r[k] > lim]
        else:
            over = [f"nmse {r['nmse']:.3g} > {REFINFER_NMSE:.3g}"] if r["nmse"] > REFINFER_NMSE else []
        if over:
            bad[test] = (f"{test} logits differ from the NumPy reference: {', '.join(over)} "
                         f"(same top token at {100 * r['same_top']:.0f}% of {r['n']} positions)")
    return bad


def _read_logits(out_dir) -> dict:
    got = {}
    if os.path.exists(os.path.join(out_dir, "pp.npy")):
        got["pp"] = np.load(os.path.join(out_dir, "pp.npy"))
    if os.path.exists(os.path.join(out_dir, "tg.f32")):
        got["tg"] = np.fromfile(os.path.join(out_dir, "tg.f32"), dtype=np.float32)
    return got


def run_worker(engine, model, threads, n_prompt, n_gen, *, plain=False, timeout=1800, reference=None):
    """One engine in a fresh process -> its result dict, or {"error": reason}. With reference
    (reference_logits), the worker's logits are checked first: a mismatch is an error."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory(prefix="refinfer-bench-") as out_dir:
        cmd = [sys.executable, "-m", "refinfer.bench", engine, os.fspath(model), str(threads), str(n_prompt),
               str(n_gen), "1" if plain else "0", out_dir]
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s"}
        res = next((json.loads(line[6:]) for line in p.stdout.splitlines() if line.startswith("BENCH ")), None)
        if res is None:
            tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [""]
            why = f"killed by signal {-p.returncode}" if p.returncode < 0 else f"exit code {p.returncode}"
            return {"error": f"{why}: {tail[0][:200]}"}
        if reference is not None:
            res["check_errors"] = check_logits(engine, _read_logits(out_dir), reference)
    return res


def _best(a, b):
    """Keep the faster of two runs per test (best of N, as timings on a shared machine only
    ever get slower than the code is)."""
    for r in (a, b):                # a failed check is never outweighed by a run that passed
        if r.get("check_errors"):
            return r
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
    cpu_tokens_per_s, peak_rss_bytes, model_bytes, startup_s (and error for a failed engine or
    a failed check: then tokens_per_s is None). With reps > 1 the engines run in turn reps
    times and each keeps its best result."""
    model_bytes = (sum(f.stat().st_size for f in pathlib.Path(model).rglob("*") if f.is_file())
                   if os.path.isdir(model) else os.path.getsize(model))
    if log:
        log("reference logits (numpy, ideal mode) ...")
    reference = reference_logits(model, n_prompt, n_gen)
    rows = []
    for threads in threads_list:
        results = {}
        for rep in range(reps):
            for engine in engines:
                name = results.get(engine, (engine, None))[0]
                res = run_worker(engine, model, threads, n_prompt, n_gen, plain=name != engine, reference=reference)
                if engine == "llama.cpp" and "error" in res and name == engine:
                    # builds whose AMX/repacked CPU kernels crash: retry on the plain CPU path
                    retry = run_worker(engine, model, threads, n_prompt, n_gen, plain=True, reference=reference)
                    if "error" not in retry:   # a crash, not a failed check: check_errors stay
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
                error = res.get("error") or res.get("check_errors", {}).get(test)
                tps = None if error else res.get(test)
                base_ok = not (base.get("error") or base.get("check_errors", {}).get(test))
                ratio = tps / base[test] if tps is not None and base_ok and base.get(test) else None
                row = {"backend": name, "threads": threads, "test": f"{test}{n}", "tokens_per_s": tps,
                       "ratio_vs_llama_cpp": ratio, "cpu_tokens_per_s": res.get(test + "_cpu"),
                       "peak_rss_bytes": res.get("peak_rss_bytes"),
                       "model_bytes": model_bytes, "startup_s": res.get("startup_s")}
                if error:
                    row["error"] = error
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
    errors = [f"FAILED: {r['backend']} threads={r['threads']} {r['test']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(out + errors) + "\n"


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
