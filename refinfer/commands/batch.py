"""python -m refinfer batch REQUESTS.jsonl ...

Offline batched generation through the Engine (continuous batching over the paged KV cache):
one JSON request per line, with Model.generate's keyword names ({"prompt": "...",
"max_tokens": 32, "seed": 1, ...} or {"messages": [...]}), one JSON result per line out, in
the input's order. Every result is what the request alone would give (refinfer.Engine,
batch-invariant in ideal mode).

Order of work: every option is checked and every line parsed before the model loads. A line
that is not a JSON object fails the command (exit 2, naming the line); a request with a bad field
comes back as a result with finish_reason "error" and does not stop the others.
"""

from __future__ import annotations

import json
import sys
import time

from .. import threads
from .kv_args import add_kv_arguments, check_kv, kv_kwargs

HELP = "generate for many requests at once through the continuous-batching engine (JSON lines in, JSON lines out)"


def add_arguments(p):
    p.add_argument("requests", help='JSON-lines file of requests, one object per line ("-": standard input)')
    p.add_argument("-m", "--model", default=None, help="GGUF file or HF safetensors directory (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("-o", "--output", default="-", help="where the JSON-lines results go (default: standard output)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences in a step at most (default 16)")
    p.add_argument("--max-tokens-per-step", type=int, default=512,
                   help="tokens in a step at most: prompt chunks and one per decoding sequence (default 512)")
    p.add_argument("--kv-block-size", type=int, default=16, help="positions per KV-cache block (default 16)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--kv-cache-mib", type=float, default=None, help="KV pool size in MiB (default: the context length)")
    size.add_argument("--kv-cache-tokens", type=int, default=None, help="KV pool size in positions (default: the context length)")
    p.add_argument("--no-prefix-cache", action="store_true", help="do not reuse the KV blocks of shared prompt prefixes")
    p.add_argument("--stats", action="store_true", help="print the engine's statistics to standard error at the end")
    p.add_argument("--backend", default=None, help="compute backend: numba (the default when installed), numpy (the reference) or cuda")
    p.add_argument("--mode", default="ideal", metavar="ideal|ggml",
                   help="numerics: ideal (exact float; batch-invariant) or ggml (llama.cpp's CPU roundings)")
    add_kv_arguments(p)
    threads.add_argument(p)


def read_requests(path) -> list[dict]:
    from ..errors import RefinferError
    name = "standard input" if path == "-" else path
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise RefinferError(f"{name}: cannot read the requests: {e}",
                            hint='give a JSON-lines file, one request per line, e.g. {"prompt": "Hi", "max_tokens": 8}') from None
    reqs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise RefinferError(f"{name}, line {n}: not JSON ({e.msg} at column {e.colno})",
                                hint='each line is one JSON object, e.g. {"prompt": "Hi", "max_tokens": 8}') from None
        if not isinstance(r, dict):
            raise RefinferError(f"{name}, line {n}: a request is a JSON object, got {type(r).__name__}",
                                hint='e.g. {"prompt": "Hi", "max_tokens": 8}')
        reqs.append(r)
    if not reqs:
        raise RefinferError(f"{name}: no requests", hint='write one JSON request per line, e.g. {"prompt": "Hi"}')
    return reqs


def result_json(r) -> dict:
    out = {"token_ids": r.token_ids, "text": r.text, "finish_reason": r.finish_reason, "seed": r.seed,
           "logprobs": [{"token_id": lp.token_id, "logprob": lp.logprob,
                         **({"top": [[i, v] for i, v in lp.top]} if lp.top is not None else {})} for lp in r.logprobs],
           "prompt_tokens": r.stats.prompt_tokens, "cached_prompt_tokens": r.stats.cached_prompt_tokens,
           "ttft_s": r.stats.ttft_s, "preemptions": r.stats.preemptions}
    if r.prompt_logprobs is not None:
        out["prompt_logprobs"] = [None if lp is None else {"token_id": lp.token_id, "logprob": lp.logprob}
                                  for lp in r.prompt_logprobs]
    if r.error is not None:
        out["error"] = r.error + (f" (hint: {r.error_hint})" if r.error_hint else "")
    return out


def check_args(args):
    from ..backends import check_backend_name
    from ..errors import RefinferError
    for option, value in (("--max-batch", args.max_batch), ("--max-tokens-per-step", args.max_tokens_per_step),
                          ("--kv-block-size", args.kv_block_size)):
        if value < 1:
            raise RefinferError(f"{option} must be at least 1, got {value}",
                                hint="e.g. --max-batch 16 --max-tokens-per-step 512 --kv-block-size 16")
    if args.kv_cache_tokens is not None and args.kv_cache_tokens < 1:
        raise RefinferError(f"--kv-cache-tokens must be at least 1, got {args.kv_cache_tokens}",
                            hint="e.g. --kv-cache-tokens 4096")
    if args.kv_cache_mib is not None and not args.kv_cache_mib > 0:
        raise RefinferError(f"--kv-cache-mib must be positive, got {args.kv_cache_mib}", hint="e.g. --kv-cache-mib 256")
    check_backend_name(args.backend, args.mode)
    check_kv(args)
    threads.check(args.threads)


def run(args) -> int:
    from ..engine import Engine
    from ..model import load
    from ..output_files import check_output_path, publish, temp_beside

    check_args(args)
    if args.output != "-":
        check_output_path(args.output, "-o/--output")
    reqs = read_requests(args.requests)
    threads.set_threads(args.threads)
    model = load(args.model, backend=args.backend, mode=args.mode, **kv_kwargs(args))
    engine = Engine(model, max_batch=args.max_batch, max_tokens_per_step=args.max_tokens_per_step,
                    kv_block_size=args.kv_block_size, kv_cache_mib=args.kv_cache_mib,
                    kv_cache_tokens=args.kv_cache_tokens, enable_prefix_caching=not args.no_prefix_cache)
    t0 = time.perf_counter()
    results = engine.generate_many(reqs)
    wall = time.perf_counter() - t0
    lines = "".join(json.dumps(result_json(r)) + "\n" for r in results)
    if args.output == "-":
        sys.stdout.write(lines)
        sys.stdout.flush()
    else:
        fd, tmp = temp_beside(args.output)
        with open(fd, "w", encoding="utf-8") as f:
            f.write(lines)
        publish(tmp, args.output)
    n = sum(len(r.token_ids) for r in results)
    failed = sum(r.finish_reason == "error" for r in results)
    s = engine.stats()
    print(f"[{len(results)} requests ({failed} failed), {n} generated tokens in {wall:.2f} s = {n / wall if wall else 0:.1f} "
          f"tokens/s; {engine.steps} steps, {s.preemptions} preemptions, prefix-cache hits {s.prefix_cache_hits} of "
          f"{s.prefix_cache_queries} prompt tokens; backend {model.backend.name}, mode {args.mode}; KV {s.kv_types}, "
          f"{s.kv_bytes_per_token} bytes/token, {s.kv_pool_bytes / 2**20:.1f} MiB pool = {s.kv_max_seqs_2k} "
          f"sequences of 2048 tokens]", file=sys.stderr)
    if args.stats:
        print(json.dumps(s.__dict__), file=sys.stderr)
    return 1 if failed else 0
