"""ggml mode on the numba backend against llama.cpp: decode (tg) and prompt (pp) tokens per second
on the same model and thread counts, in the same run.

    python bench/ggml_mode.py [-m MODEL] [-t 1,2] [-n 64] [-p 128] [-r 3]

First the check: the numba backend's ggml-mode logits of a short prompt and one decode step
must equal the NumPy emulation's bit for bit (computed here, in the parent). Each engine then
runs in its own process (thread pools sized before they start), every row the best of -r runs
(a shared machine only ever makes code slower). llama.cpp runs through refinfer.bench's worker
(plain CPU path, llama-cpp-python). Rates are wall clock; t/CPU-s is what one thread does on
an idle core (for 1 thread), which shows through other load on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

CHECK_PROMPT, CHECK_DECODE = 4, 1


def check_logits(model, backend):
    """Logits float32 of the check: a CHECK_PROMPT-token prefill (every position) and
    CHECK_DECODE decode steps, ggml mode."""
    import refinfer
    from refinfer.bench import bench_tokens
    from refinfer.forward import forward
    m = refinfer.load(model, backend=backend, mode="ggml")
    toks = bench_tokens(CHECK_PROMPT + CHECK_DECODE, m.config.vocab_size)
    cache = m.new_cache(len(toks))
    out = [forward(m.config, m.weights, m.backend, toks[:CHECK_PROMPT], cache, all_logits=True)]
    out += [forward(m.config, m.weights, m.backend, [t], cache, all_logits=True) for t in toks[CHECK_PROMPT:]]
    return np.concatenate(out)


def worker(model, threads, n_prompt, n_gen, ref_path):
    import numba
    numba.set_num_threads(threads)
    got = check_logits(model, "numba")
    ref = np.load(ref_path)
    if not np.array_equal(got.view(np.uint32), ref.view(np.uint32)):
        n = int(np.sum(got.view(np.uint32) != ref.view(np.uint32)))
        return {"error": f"numba ggml logits differ from the NumPy emulation's in {n} of {ref.size} values"}
    import refinfer
    from refinfer.bench import bench_tokens
    from refinfer.forward import forward
    m = refinfer.load(model, backend="numba", mode="ggml")
    cfg, w, be = m.config, m.weights, m.backend
    toks = bench_tokens(max(n_prompt, n_gen + 1), cfg.vocab_size)
    res = {}
    if n_gen:
        cache = m.new_cache(n_gen + 1)
        forward(cfg, w, be, toks[:1], cache, all_logits=False)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n_gen):
            forward(cfg, w, be, [toks[1 + i]], cache, all_logits=False)
        res["tg"], res["tg_cpu"] = n_gen / (time.perf_counter() - t0), n_gen / (time.process_time() - c0)
    if n_prompt:
        cache = m.new_cache(n_prompt)
        t0, c0 = time.perf_counter(), time.process_time()
        forward(cfg, w, be, toks[:n_prompt], cache, all_logits=False)
        res["pp"], res["pp_cpu"] = n_prompt / (time.perf_counter() - t0), n_prompt / (time.process_time() - c0)
    return res


def run_numba(model, threads, n_prompt, n_gen, ref_path):
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    p = subprocess.run([sys.executable, __file__, "--worker", model, str(threads), str(n_prompt), str(n_gen), ref_path],
                       env=env, capture_output=True, text=True, timeout=3600)
    line = next((x for x in p.stdout.splitlines() if x.startswith("BENCH ")), None)
    return json.loads(line[6:]) if line else {"error": (p.stderr.strip().splitlines() or ["no output"])[-1]}


def best(runs):
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    return {k: max(r[k] for r in ok) for k in ok[0]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("-t", "--threads", default="1,2")
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("-p", "--n-prompt", type=int, default=128)
    ap.add_argument("-r", "--reps", type=int, default=3)
    args = ap.parse_args(argv)
    from refinfer.bench import run_worker
    from refinfer.fetch import default_model_path
    model = args.model or str(default_model_path())
    with tempfile.TemporaryDirectory() as d:
        ref_path = os.path.join(d, "ref.npy")
        np.save(ref_path, check_logits(model, "numpy"))
        print(f"check: {CHECK_PROMPT}-token prefill + {CHECK_DECODE} decode, numba ggml against the NumPy emulation")
        rows = []
        for threads in [int(t) for t in args.threads.split(",")]:
            nb, lc = [], []
            for _ in range(args.reps):           # alternate, so that both see the same load
                nb.append(run_numba(model, threads, args.n_prompt, args.n_gen, ref_path))
                lc.append(run_worker("llama.cpp", model, threads, args.n_prompt, args.n_gen))
            rows.append((threads, best(nb), best(lc)))
    print("| engine | threads | test | t/s | vs llama.cpp | t/CPU-s |")
    print("|---|---|---|---|---|---|")
    for threads, nb, lc in rows:
        for test, n in (("tg", args.n_gen), ("pp", args.n_prompt)):
            if not n:
                continue
            for name, r in (("numba ggml", nb), ("llama.cpp", lc)):
                if "error" in r:
                    print(f"| {name} | {threads} | {test}{n} | error: {r['error']} | | |")
                    continue
                ratio = r[test] / lc[test] if "error" not in lc else float("nan")
                print(f"| {name} | {threads} | {test}{n} | {r[test]:.1f} | {ratio:.2f}x | {r.get(test + '_cpu') or 0:.1f} |")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        m_, t_, p_, n_, ref_ = sys.argv[2:7]
        print("BENCH " + json.dumps(worker(m_, int(t_), int(p_), int(n_), ref_)), flush=True)
    else:
        sys.exit(main())
