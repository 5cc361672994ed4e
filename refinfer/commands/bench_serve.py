"""python -m refinfer bench-serve [URL] [--concurrency 1,4,16] [--requests N] [--prompts FILE]
    [--max-tokens N] [--seed S] [--temperature T] [--endpoint completions|chat|completion]
    [--model NAME] [--timeout S] [--json OUT]

Load on a running OpenAI-compatible server (refinfer's, vLLM's, llama-server's), as vLLM's
`bench serve`: request/s, output tokens/s, TTFT, TPOT, ITL and E2E latency at mean/p50/p90/p99
per concurrency level (refinfer.bench_serve). Every distinct request is first sent alone (the
serial reference); each level then reports how many responses differ from it, by token ids
(completions and chat with `return_tokens_as_token_ids`, llama-server's /completion) or by text
where the server gives no ids.

The serial reference runs first on the same server, so a server with a prefix cache answers
every later level's prompts from it: TTFT then measures cached prefills. For cold-cache TTFT
restart the server between levels (bench/serve_vs_llama_server.py does, per level).

Exit status: 0 when every request completed, 1 when some failed or none could be compared
(the table is still printed), 2 for bad input or a URL where no server answers.
"""

from __future__ import annotations

import json
import sys
import urllib.parse

HELP = "load generator for an OpenAI-compatible server: TTFT/TPOT/ITL, tokens/s, and outputs vs their serial reference"


def add_arguments(p):
    from ..bench_serve import DEFAULT_URL, ENDPOINTS
    p.add_argument("url", nargs="?", default=DEFAULT_URL, metavar="URL",
                   help=f"the server's base URL (default {DEFAULT_URL})")
    p.add_argument("--concurrency", default="1,4,16",
                   help="comma-separated numbers of requests in flight, one level each (default 1,4,16)")
    p.add_argument("--requests", type=int, default=32, metavar="N", help="requests per level (default 32)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="prompts: JSON lines (.jsonl: strings, token-id lists, {\"prompt\"} or {\"messages\"}) "
                        "or plain text, one a line (default: a built-in seeded set of mixed lengths)")
    p.add_argument("--max-tokens", type=int, default=128, metavar="N", help="tokens generated per request (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in prompts and of each request (seed + its index)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--endpoint", default="completions", choices=sorted(ENDPOINTS),
                   help="completions (/v1/completions, default), chat (/v1/chat/completions) or "
                        "completion (llama-server's /completion)")
    p.add_argument("--model", default=None, help="the model name sent (default: the first of the server's /v1/models)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="seconds each request may take, end to end (default 120)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON to OUT")


def concurrency_levels(text: str) -> list[int]:
    from ..errors import RefinferError
    hint = "e.g. --concurrency 1,4,16: positive integers, comma-separated"
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RefinferError(f"--concurrency must be comma-separated integers, got {text!r}", hint=hint) from None
    if not vals:
        raise RefinferError(f"--concurrency names no level, got {text!r}", hint=hint)
    bad = [v for v in vals if not 1 <= v <= 1024]
    if bad:
        raise RefinferError(f"--concurrency levels must be 1..1024, got {bad[0]}", hint=hint)
    return vals


def check_url(url: str) -> str:
    from ..errors import RefinferError
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise RefinferError(f"URL must be http://HOST[:PORT], got {url!r}",
                            hint="e.g. http://127.0.0.1:8080 (the base URL, without /v1)")
    try:
        u.port
    except ValueError:
        raise RefinferError(f"URL {url!r}: the port is not a number 0..65535",
                            hint="e.g. http://127.0.0.1:8080") from None
    path = u.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    return urllib.parse.urlunsplit((u.scheme, u.netloc, path, "", ""))


def run(args) -> int:
    from .. import bench_serve as bs
    from ..errors import RefinferError
    from ..output_files import check_output_path

    levels = concurrency_levels(args.concurrency)
    url = check_url(args.url)
    if not 1 <= args.requests <= 100_000:
        raise RefinferError(f"--requests must be 1..100000, got {args.requests}", hint="e.g. --requests 32")
    if not 1 <= args.max_tokens <= 1_000_000:
        raise RefinferError(f"--max-tokens must be >= 1, got {args.max_tokens}", hint="e.g. --max-tokens 128")
    if not 0.0 <= args.temperature <= 100.0:
        raise RefinferError(f"--temperature must be >= 0, got {args.temperature}",
                            hint="0 is greedy; a seeded temperature > 0 is also compared with its serial reference")
    if not 0 < args.timeout <= 86_400:
        raise RefinferError(f"--timeout must be > 0 seconds, got {args.timeout}", hint="e.g. --timeout 120")
    check_output_path(args.json, "--json")
    if args.prompts is not None:
        prompts = bs.load_prompts(args.prompts)
    else:
        prompts = bs.builtin_prompts(min(args.requests, 64), seed=args.seed)
    requests = bs.make_requests(prompts, args.requests)
    settings = bs.Settings(endpoint=args.endpoint, model=args.model, max_tokens=args.max_tokens,
                           temperature=args.temperature, seed=args.seed, timeout=args.timeout)
    report = bs.bench(url, requests, settings, levels, log=lambda m: print(m, file=sys.stderr, flush=True))
    sys.stdout.write(bs.format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(bs.public(report), f, indent=1)
            f.write("\n")
    levels_rep = report["levels"] + [report.get("reference") or {}]
    failed = any(lv.get("failed") for lv in levels_rep)
    return 1 if failed or any(lv.get("compared") == 0 for lv in report["levels"]) else 0
