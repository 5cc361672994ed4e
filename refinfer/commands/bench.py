"""python -m refinfer bench [-m MODEL] [--threads 1,2] [--json FILE]

Tokens per second of refinfer's backends and of llama.cpp on the same model and thread
counts, as llama-bench reports them: pp512 (one 512-token prompt) and tg128 (128 tokens decoded
one at a time), with peak memory, model size and the ratio to llama.cpp measured in the same
run. t/CPU-s divides by the process's CPU time instead of wall time: on a busy machine that is
closer to what an idle core would do. llama.cpp comes from llama-cpp-python; without it its rows read "failed".

Each engine's logits are checked against a NumPy reference run before its timings count
(refinfer.bench). Exit status: 0 when every row was measured and checked; 1 when a row
failed (an engine that did not run, or whose logits did not match): the table is still
printed and written, with the failures listed after it; 2 for bad input, before any worker
starts.
"""

from __future__ import annotations

import json
import sys

HELP = "throughput (pp512 / tg128 tokens/s) of refinfer's backends vs llama.cpp"


def add_arguments(p):
    p.add_argument("-m", "--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("-t", "--threads", default="1,2",
                   help="comma-separated thread counts, each engine run at each (default 1,2)")
    p.add_argument("--backends", default="numba,numpy,llama.cpp",
                   help="comma-separated engines among numba, numpy, cuda (GPU), llama.cpp "
                        "(default numba,numpy,llama.cpp)")
    p.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens of the pp test (default 512; 0 skips)")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens of the tg test (default 128; 0 skips)")
    p.add_argument("-r", "--reps", type=int, default=1,
                   help="run every engine this many times, in turn, and keep its best (default 1)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as a JSON array to FILE")


def _thread_counts(text):
    from .. import threads
    from ..errors import RefinferError
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RefinferError(f"--threads must be comma-separated integers, got {text!r}", hint="e.g. --threads 1,2") from None
    if not vals:
        raise RefinferError(f"--threads names no thread count, got {text!r}", hint="e.g. --threads 1,2")
    for n in vals:
        threads.check(n, "--threads")
    return vals


def run(args) -> int:
    import os

    from ..bench import ENGINES, format_table, run_bench
    from ..errors import RefinferError
    from ..output_files import check_output_path

    threads = _thread_counts(args.threads)
    engines = [e.strip() for e in args.backends.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        raise RefinferError(f"--backends: unknown engine {', '.join(bad) or '(none)'}",
                            hint=f"choose from {', '.join(ENGINES)}, e.g. --backends numba,llama.cpp")
    if args.reps < 1:
        raise RefinferError(f"--reps must be >= 1, got {args.reps}", hint="-r 3 keeps the best of three runs")
    if args.n_prompt < 0 or args.n_gen < 0 or args.n_prompt + args.n_gen == 0:
        raise RefinferError(f"-p and -n must be >= 0 and not both 0, got -p {args.n_prompt} -n {args.n_gen}",
                            hint="-p 512 -n 128 as llama-bench; -p 0 skips the prompt test, -n 0 the generation test")
    check_output_path(args.json, "--json")
    model = args.model
    if model is None:
        from ..fetch import default_model_path
        model = str(default_model_path())
    if not os.path.isfile(model):
        what = "is a directory" if os.path.isdir(model) else "does not exist"
        raise RefinferError(f"-m {model!r} {what}", hint="bench runs a GGUF file; leave out -m for the default model")
    rows = run_bench(model, threads, engines, args.n_prompt, args.n_gen, reps=args.reps,
                     log=lambda msg: print(msg, file=sys.stderr, flush=True))
    sys.stdout.write(format_table(rows, model))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
            f.write("\n")
    return 1 if any(r.get("error") for r in rows) else 0
