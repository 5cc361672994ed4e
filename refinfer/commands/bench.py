"""python -m refinfer bench [-m MODEL] [--threads 1,2] [--json FILE]

Tokens per second of refinfer's backends and of llama.cpp on the same model and thread
counts, as llama-bench reports them: pp512 (one 512-token prompt) and tg128 (128 tokens decoded
one at a time), with peak memory, model size and the ratio to llama.cpp measured in the same
run. t/CPU-s divides by the process's CPU time instead of wall time: on a busy machine that is
closer to what an idle core would do. llama.cpp comes from llama-cpp-python; without it its rows read "failed".

With --batched: batched serving throughput (refinfer.bench_batched): aggregate greedy decode
tokens/s of --seqs concurrent sequences (-p prompt tokens each, -n decode steps), seeded sampling
at the largest, prefill (--prefill), TTFT with and without a prefix-cache hit on a --system
token system prompt, and KV bytes per sequence, against llama.cpp's multi-sequence batch (one
unified KV cache, flash attention off, extra buffer types off) at the same thread count.

Each engine's logits are checked against a NumPy reference run before its timings count
(refinfer.bench); with --batched every refinfer sequence must also be bitwise its serial run. Exit status: 0 when every row was measured and checked; 1 when a row
failed (an engine that did not run, or whose logits did not match): the table is still
printed and written, with the failures listed after it; 2 for bad input, before any worker
starts.
"""

from __future__ import annotations

import json
import sys

DEFAULT_BACKENDS = "numba,numpy,llama.cpp"
HELP = "throughput (pp512 / tg128 tokens/s) of refinfer's backends vs llama.cpp"


def add_arguments(p):
    p.add_argument("-m", "--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("-t", "--threads", default="1,2",
                   help="comma-separated thread counts, each engine run at each (default 1,2)")
    p.add_argument("--backends", default=DEFAULT_BACKENDS,
                   help="comma-separated engines among numba, numpy, cuda (GPU), llama.cpp "
                        f"(default {DEFAULT_BACKENDS}; with --batched numba,llama.cpp)")
    p.add_argument("-p", "--n-prompt", type=int, default=None,
                   help="prompt tokens of the pp test (default 512; 0 skips); with --batched, of each sequence (default 128)")
    p.add_argument("-n", "--n-gen", type=int, default=None,
                   help="generated tokens of the tg test (default 128; 0 skips); with --batched, decode steps per sequence")
    p.add_argument("-r", "--reps", type=int, default=1,
                   help="run every engine this many times, in turn, and keep its best (default 1)")
    g = p.add_argument_group("batched serving (--batched)")
    g.add_argument("--batched", action="store_true",
                   help="aggregate decode of concurrent sequences, sampling, prefill, TTFT and KV size vs llama.cpp's batch")
    g.add_argument("--seqs", default="1,4,16", help="comma-separated numbers of concurrent sequences (default 1,4,16)")
    g.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill test (default 512; 0 skips)")
    g.add_argument("--system", type=int, default=512,
                   help="tokens of the shared system prompt of the TTFT test (default 512; 0 skips)")
    g.add_argument("--user", type=int, default=32, help="tokens of the user turn after it (default 32)")
    g.add_argument("--kv-block-size", type=int, default=16, help="refinfer's KV block size in positions (default 16)")
    g.add_argument("--no-sampled", action="store_true", help="skip the seeded-sampling run")
    g.add_argument("-ctk", "--cache-type-k", default=None, metavar="TYPE",
                   help="KV cache K type of both engines (refinfer's names; llama.cpp runs f16 for a type it lacks)")
    g.add_argument("-ctv", "--cache-type-v", default=None, metavar="TYPE",
                   help="KV cache V type (llama.cpp turns flash attention on for a quantized V, as it must)")
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
    from ..bench import ENGINES, format_table, run_bench
    from ..errors import RefinferError
    from ..output_files import check_output_path

    threads = _thread_counts(args.threads)
    engines = [e.strip() for e in args.backends.split(",") if e.strip()]
    if args.batched and args.backends == DEFAULT_BACKENDS:
        engines = ["numba", "llama.cpp"]
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        raise RefinferError(f"--backends: unknown engine {', '.join(bad) or '(none)'}",
                            hint=f"choose from {', '.join(ENGINES)}, e.g. --backends numba,llama.cpp")
    if args.reps < 1:
        raise RefinferError(f"--reps must be >= 1, got {args.reps}", hint="-r 3 keeps the best of three runs")
    if args.batched:
        return _run_batched(args, threads, engines)
    args.n_prompt = 512 if args.n_prompt is None else args.n_prompt
    args.n_gen = 128 if args.n_gen is None else args.n_gen
    if args.n_prompt < 0 or args.n_gen < 0 or args.n_prompt + args.n_gen == 0:
        raise RefinferError(f"-p and -n must be >= 0 and not both 0, got -p {args.n_prompt} -n {args.n_gen}",
                            hint="-p 512 -n 128 as llama-bench; -p 0 skips the prompt test, -n 0 the generation test")
    check_output_path(args.json, "--json")
    model = _model_path(args, engines)
    rows = run_bench(model, threads, engines, args.n_prompt, args.n_gen, reps=args.reps, log=_log)
    sys.stdout.write(format_table(rows, model))
    return _finish(args, rows)


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _model_path(args, engines=()):
    import os

    from ..errors import RefinferError
    model = args.model
    if model is None:
        from ..fetch import default_model_path
        model = str(default_model_path())
    if os.path.isdir(model):    # an HF checkpoint (float, GPTQ, AWQ, compressed-tensors): refinfer's rows only
        if "llama.cpp" in engines:
            raise RefinferError(f"-m {model!r} is a directory (an HF checkpoint), and llama.cpp runs GGUF files only",
                                hint="--backends numba (or numba,numpy) for a checkpoint directory; "
                                     "compare against llama.cpp on a GGUF of the same model")
        return model
    if not os.path.isfile(model):
        raise RefinferError(f"-m {model!r} does not exist", hint="bench runs a GGUF file or an HF checkpoint "
                                                                 "directory; leave out -m for the default model")
    return model


def _finish(args, rows) -> int:
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
            f.write("\n")
    return 1 if any(r.get("error") for r in rows) else 0


# llama.cpp's LLAMA_MAX_SEQ: the most sequences one context holds
MAX_SEQS = 256


def _seq_counts(text):
    from ..errors import RefinferError
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RefinferError(f"--seqs must be comma-separated integers, got {text!r}", hint="e.g. --seqs 1,4,16") from None
    if not vals or any(not 1 <= v <= MAX_SEQS for v in vals):
        raise RefinferError(f"--seqs must name sequence counts in 1..{MAX_SEQS}, got {text!r}",
                            hint=f"e.g. --seqs 1,4,16 ({MAX_SEQS} is llama.cpp's limit of sequences per context)")
    return tuple(dict.fromkeys(vals))


def _run_batched(args, threads, engines) -> int:
    from ..bench_batched import Shape, format_table, run_batched_bench
    from ..errors import RefinferError
    from ..loader import load as load_checkpoint
    from ..output_files import check_output_path

    seqs = _seq_counts(args.seqs)
    n_prompt = 128 if args.n_prompt is None else args.n_prompt
    n_gen = 128 if args.n_gen is None else args.n_gen
    for option, value, lo in (("-p", n_prompt, 1), ("-n", n_gen, 1), ("--prefill", args.prefill, 0),
                              ("--system", args.system, 0), ("--user", args.user, 1), ("--kv-block-size", args.kv_block_size, 1)):
        if value < lo:
            raise RefinferError(f"{option} must be >= {lo} with --batched, got {value}",
                                hint="e.g. --batched -p 128 -n 128 --prefill 512 --system 512 --user 32 --kv-block-size 16"
                                     " (--prefill 0 and --system 0 skip those tests)")
    check_output_path(args.json, "--json")
    model = _model_path(args)
    n_ctx = load_checkpoint(model)[0].max_seq_len
    for option, need in (("-p/-n", n_prompt + n_gen + 1), ("--prefill", args.prefill),
                         ("--system/--user", args.system and args.system + args.user)):
        if need > n_ctx:
            raise RefinferError(f"{option}: a sequence of {need} positions exceeds {model}'s context length {n_ctx}",
                                hint=f"keep -p + -n + 1, --prefill and --system + --user within {n_ctx}")
    from ..kv_cache import get_cache_type
    for option, name in (("--cache-type-k", args.cache_type_k), ("--cache-type-v", args.cache_type_v)):
        if name is not None:
            try:
                get_cache_type(name)
            except RefinferError as e:
                raise type(e)(f"{option}: {e}", hint=e.hint) from None
    shape = Shape(seqs=seqs, n_prompt=n_prompt, n_gen=n_gen, n_prefill=args.prefill, n_system=args.system,
                  n_user=args.user, block_size=args.kv_block_size, sampled=not args.no_sampled,
                  cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v)
    rows = run_batched_bench(model, threads, engines, shape, reps=args.reps, log=_log)
    sys.stdout.write(format_table(rows, model, threads, shape))
    return _finish(args, rows)
