"""A bounded asyncio load generator for OpenAI-compatible servers, as vLLM's `bench serve`,
that also checks every response against its serial reference.

For each concurrency level C, the same list of requests is sent with at most C in flight (an
asyncio.Semaphore), each request streaming. From each stream it records (vLLM's definitions,
vllm/benchmarks/serve.py and lib/endpoint_request_func.py):
    TTFT     time from sending to the first chunk that carries generated text or a token
             (the role-only first chunk of a chat stream does not count)
    ITL      the gaps between consecutive token chunks
    TPOT     (E2E latency - TTFT) / (output tokens - 1), per request with > 1 output token
    E2E      time from sending to the end of the stream
and per level: completed/failed, request/s and output tokens/s over the level's wall time, and
mean/p50/p90/p99 of TTFT, TPOT, ITL and E2E (numpy's linear percentiles, as vLLM).

The serial reference: before the levels, every distinct request is sent alone (concurrency 1).
Each response of a level is compared with the reference response of the same request (same
prompt, seed, temperature, max tokens): by generated token ids where the endpoint gives them,
else by generated text (the report says which). A server whose outputs do not depend on load
has 0 differing responses at every level.

Endpoints (ENDPOINTS):
    completions  POST /v1/completions, logprobs 1 + return_tokens_as_token_ids: token keys
                 "token_id:N" (vLLM's and refinfer's servers) give the ids
    chat         POST /v1/chat/completions, logprobs + return_tokens_as_token_ids likewise
    completion   POST /completion (llama-server's own): every streamed chunk carries `tokens`
Every request has a timeout; every loop is bounded by the number of requests and chunks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from dataclasses import dataclass, field

from .errors import RefinferError

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions", "completion": "/completion"}
DEFAULT_URL = "http://127.0.0.1:8080"
MAX_CHUNKS_PER_TOKEN = 8    # a stream may carry pings and a usage chunk besides its token chunks


@dataclass(frozen=True)
class Request:
    """One benchmark request; `key` names it for the serial reference (the same key = the same request)."""
    key: int
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None


@dataclass(frozen=True)
class Settings:
    endpoint: str = "completions"
    model: str | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    timeout: float = 120.0      # seconds per request, end to end


@dataclass
class Output:
    """What one streamed request gave. Times in seconds."""
    key: int
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    text: str = ""
    token_ids: list[int] | None = None      # None when the endpoint gave no ids
    output_tokens: int = 0
    prompt_tokens: int | None = None


def builtin_prompts(n: int = 64, seed: int = 0, words: tuple[int, int] = (40, 140)) -> list[str]:
    """n English-like prompts of mixed lengths (a seeded draw of `words` words each, about 1.3
    tokens a word in a BPE vocabulary), so a run is the same wherever it is repeated."""
    rng = random.Random(seed)
    starts = ["Write a short story about", "Explain to a child how", "Summarize the following notes on",
              "Describe in detail", "List the steps of", "Continue this text about"]
    vocab = ("the river city light morning garden machine engine train market winter summer music "
             "teacher student window mountain paper bridge story ocean forest signal number ship "
             "kitchen bread stone language clock weather road village letter harbor festival lamp "
             "school farmer honey copper glass cloud storm field orchard tower museum planet "
             "and of with under over near after before while because quietly slowly bright old "
             "new small large early late green blue red warm cold simple careful strange open").split()
    lo, hi = words
    out = []
    for _ in range(n):
        topic = " ".join(rng.choice(vocab) for _ in range(3))
        body = " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi)))
        out.append(f"{rng.choice(starts)} {topic}. {body}.")
    return out


def load_prompts(path: str) -> list[Request]:
    """Requests from a file: JSON lines (.jsonl / .json: each line a string, a list of token ids,
    or an object with "prompt" or "messages") or plain text (one prompt a non-empty line)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RefinferError(f"--prompts {path!r}: cannot read it: {e}",
                            hint="give a UTF-8 text file: one prompt a line, or JSON lines (.jsonl)") from None
    reqs = []
    as_json = path.endswith((".jsonl", ".json"))
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not as_json:
            reqs.append(Request(len(reqs), prompt=line))
            continue
        where = f"--prompts {path!r} line {lineno}"
        hint = ('each line one JSON value: "text", [1, 2, 3], {"prompt": "text"} or '
                '{"messages": [{"role": "user", "content": "text"}]}')
        try:
            v = json.loads(line)
        except json.JSONDecodeError as e:
            raise RefinferError(f"{where}: not JSON ({e.msg} at column {e.colno})", hint=hint) from None
        if isinstance(v, dict):
            if "messages" in v:
                m = v["messages"]
                if not (isinstance(m, list) and m and all(isinstance(x, dict) and isinstance(x.get("content"), str)
                                                          and isinstance(x.get("role"), str) for x in m)):
                    raise RefinferError(f"{where}: \"messages\" must be a non-empty list of "
                                        f"{{\"role\", \"content\"}} objects, got {json.dumps(m)[:80]}", hint=hint)
                reqs.append(Request(len(reqs), messages=m))
                continue
            if "prompt" not in v:
                raise RefinferError(f"{where}: an object needs \"prompt\" or \"messages\", got keys {sorted(v)}", hint=hint)
            v = v["prompt"]
        if isinstance(v, str) and v:
            reqs.append(Request(len(reqs), prompt=v))
        elif isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
            reqs.append(Request(len(reqs), prompt=v))
        else:
            raise RefinferError(f"{where}: a prompt must be a non-empty string or list of token ids, "
                                f"got {json.dumps(v)[:80]}", hint=hint)
    if not reqs:
        raise RefinferError(f"--prompts {path!r}: holds no prompt", hint="one prompt a line; blank lines are skipped")
    return reqs


def make_requests(prompts: list[str] | list[Request], n: int) -> list[Request]:
    """n requests cycling through the prompts: request i repeats prompt i % len(prompts)."""
    base = [p if isinstance(p, Request) else Request(i, prompt=p) for i, p in enumerate(prompts)]
    return [base[i % len(base)] for i in range(n)]


def request_body(req: Request, s: Settings) -> dict:
    """The JSON body of one streamed request. The seed is per request (settings seed + key), so
    seeded sampling differs across prompts and repeats exactly for the same request."""
    seed = s.seed + req.key
    if s.endpoint == "completion":                  # llama-server's native endpoint
        if req.messages is not None:
            raise RefinferError("--endpoint completion takes prompts, and the prompt file holds chat messages",
                                hint="use --endpoint chat for {\"messages\": ...} lines")
        return {"prompt": req.prompt, "n_predict": s.max_tokens, "temperature": s.temperature, "seed": seed,
                "stream": True, "return_tokens": True}
    body = {"max_tokens": s.max_tokens, "temperature": s.temperature, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}, "return_tokens_as_token_ids": True}
    if s.model is not None:
        body["model"] = s.model
    if s.endpoint == "chat":
        msgs = req.messages if req.messages is not None else [{"role": "user", "content": _as_text(req.prompt)}]
        body.update(messages=msgs, logprobs=True, top_logprobs=0)
    else:
        if req.messages is not None:
            raise RefinferError("--endpoint completions takes prompts, and the prompt file holds chat messages",
                                hint="use --endpoint chat for {\"messages\": ...} lines")
        body.update(prompt=req.prompt, logprobs=1)
    return body


def _as_text(prompt):
    if isinstance(prompt, str):
        return prompt
    raise RefinferError("--endpoint chat needs text prompts, and a prompt is a list of token ids",
                        hint="use --endpoint completions for token-id prompts")


def _token_id(tok) -> int | None:
    if isinstance(tok, str) and tok.startswith("token_id:"):
        try:
            return int(tok[len("token_id:"):])
        except ValueError:
            return None
    return None


def parse_chunk(endpoint: str, obj: dict) -> tuple[str, list[int] | None, int]:
    """(text, token ids or None when the chunk gives text only, tokens carried) of one stream chunk."""
    if endpoint == "completion":
        toks = obj.get("tokens")
        text = obj.get("content") or ""
        if isinstance(toks, list):
            return text, [int(t) for t in toks], len(toks)
        return text, (None if text else []), int(bool(text))
    choices = obj.get("choices") or []
    if not choices:
        return "", [], 0
    c = choices[0]
    lp = c.get("logprobs") or {}
    if endpoint == "chat":
        text = (c.get("delta") or {}).get("content") or ""
        toks = [e.get("token") for e in (lp.get("content") or [])] if isinstance(lp, dict) else []
    else:
        text = c.get("text") or ""
        toks = (lp.get("tokens") or []) if isinstance(lp, dict) else []
    if not toks and not text:            # the role chunk, the finish chunk: nothing generated
        return "", [], 0
    ids = [_token_id(t) for t in toks]
    if toks and all(i is not None for i in ids):
        return text, ids, len(ids)
    return text, None, len(toks) if toks else 1


async def send(client, req: Request, s: Settings) -> Output:
    """Stream one request; never raises: a failure is an Output with ok False and the error."""
    out = Output(req.key)
    try:
        await asyncio.wait_for(_send(client, req, s, out), timeout=s.timeout)
    except asyncio.TimeoutError:
        out.ok, out.error = False, f"no complete answer within --timeout {s.timeout:g} s"
    except RefinferError:
        raise
    except Exception as e:      # the connection, the server or its JSON: the request failed
        out.ok, out.error = False, f"{type(e).__name__}: {e}"
    return out


async def _send(client, req: Request, s: Settings, out: Output) -> None:
    body = request_body(req, s)
    ids: list[int] | None = []
    chunks_max = MAX_CHUNKS_PER_TOKEN * (s.max_tokens + 4)
    t0 = time.perf_counter()
    last = None
    async with client.stream("POST", ENDPOINTS[s.endpoint], json=body) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode("utf-8", "replace")
            out.error = f"HTTP {resp.status_code}: {_error_message(text)}"
            return
        n_lines = 0
        async for line in resp.aiter_lines():
            n_lines += 1
            if n_lines > 2 * chunks_max:
                out.error = f"the stream went on past {2 * chunks_max} lines for max_tokens {s.max_tokens}"
                return
            if not line or line.startswith(":"):     # event separators and comment pings
                continue
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if isinstance(obj, dict) and obj.get("error"):
                out.error = f"error in the stream: {_error_message(json.dumps(obj))}"
                return
            text, chunk_ids, n = parse_chunk(s.endpoint, obj)
            now = time.perf_counter()
            if n > 0:
                if last is None:
                    out.ttft = now - t0
                else:
                    out.itl.append(now - last)
                last = now
                out.output_tokens += n
            out.text += text
            if ids is not None:
                ids = None if chunk_ids is None else ids + chunk_ids
            usage = obj.get("usage")
            if isinstance(usage, dict):
                out.prompt_tokens = usage.get("prompt_tokens", out.prompt_tokens)
            if s.endpoint == "completion":
                if obj.get("tokens_evaluated") is not None:
                    out.prompt_tokens = obj["tokens_evaluated"]
                if obj.get("stop"):
                    break
    out.latency = time.perf_counter() - t0
    if last is None:
        out.error = "the stream ended without a generated token"
        return
    out.token_ids = ids
    out.ok = True


def _error_message(text: str) -> str:
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))[:300]
        if err:
            return str(err)[:300]
    except (ValueError, AttributeError):
        pass
    return text.strip()[:300]


def _stats(values: list[float], scale: float = 1000.0) -> dict:
    import numpy as np
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values, dtype=np.float64) * scale
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99))}


def same_output(a: Output, b: Output) -> bool:
    if a.token_ids is not None and b.token_ids is not None:
        return a.token_ids == b.token_ids
    return a.text == b.text


def summarize(outputs: list[Output], duration: float, concurrency: int, reference: dict[int, Output] | None) -> dict:
    """One level's report (times in ms). `differ` counts completed responses whose output is not
    their serial reference's; `compared` those that had a completed reference to compare with."""
    done = [o for o in outputs if o.ok]
    tpots = [(o.latency - o.ttft) / (o.output_tokens - 1) for o in done if o.output_tokens > 1]
    total_out = sum(o.output_tokens for o in done)
    rep = {
        "concurrency": concurrency, "requests": len(outputs), "completed": len(done),
        "failed": len(outputs) - len(done), "duration_s": duration,
        "request_throughput": len(done) / duration if duration > 0 else 0.0,
        "output_throughput": total_out / duration if duration > 0 else 0.0,
        "total_output_tokens": total_out,
        "mean_prompt_tokens": (sum(o.prompt_tokens for o in done if o.prompt_tokens is not None)
                               / max(1, sum(o.prompt_tokens is not None for o in done))) if done else None,
        "ttft_ms": _stats([o.ttft for o in done]), "tpot_ms": _stats(tpots),
        "itl_ms": _stats([g for o in done for g in o.itl]), "e2el_ms": _stats([o.latency for o in done]),
        "errors": sorted({o.error for o in outputs if not o.ok})[:5],
    }
    if reference is not None:
        pairs = [(o, reference[o.key]) for o in done if o.key in reference and reference[o.key].ok]
        rep["compared"] = len(pairs)
        rep["differ"] = sum(not same_output(o, r) for o, r in pairs)
        by_ids = all(o.token_ids is not None and r.token_ids is not None for o, r in pairs)
        rep["compared_by"] = "token ids" if by_ids else "text"
        rep["differ_keys"] = sorted({o.key for o, r in pairs if not same_output(o, r)})
    return rep


async def run_level(url: str, requests: list[Request], s: Settings, concurrency: int) -> tuple[list[Output], float]:
    """All requests with at most `concurrency` in flight; (outputs in request order, wall seconds)."""
    import httpx
    sem = asyncio.Semaphore(concurrency)
    timeout = httpx.Timeout(s.timeout, connect=min(10.0, s.timeout))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, trust_env=False) as client:
        async def one(r):
            async with sem:
                return await send(client, r, s)
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(one(r) for r in requests))
        return list(outs), time.perf_counter() - t0


def check_server(url: str, s: Settings) -> Settings:
    """Fail early and clearly when nothing answers at url; fill in the model name from /v1/models
    when none was given (vLLM requires one)."""
    import httpx
    try:
        r = httpx.get(url.rstrip("/") + "/v1/models", timeout=min(10.0, s.timeout), trust_env=False)
    except httpx.HTTPError as e:
        raise RefinferError(f"{url}: no server answers ({type(e).__name__}: {e})",
                            hint="start one first, e.g. `python -m refinfer serve --port 8080`, and check the "
                                 "URL's host and port") from None
    if r.status_code == 401:
        raise RefinferError(f"{url}/v1/models: 401 unauthorized", hint="the server was started with an API key; "
                                                                      "bench-serve sends none: benchmark a server without --api-key")
    if s.model is None and s.endpoint != "completion" and r.status_code == 200:
        try:
            data = r.json()["data"]
            if data:
                s = dataclasses.replace(s, model=data[0]["id"])
        except (ValueError, KeyError, TypeError, IndexError):
            pass
    return s


def serial_reference(url: str, requests: list[Request], s: Settings) -> dict[int, Output]:
    """Every distinct request alone, in turn: the outputs each later response must equal."""
    distinct = list({r.key: r for r in requests}.values())
    outs, _ = asyncio.run(run_level(url, distinct, s, 1))
    return {o.key: o for o in outs}


def bench(url: str, requests: list[Request], s: Settings, levels: list[int], *,
          reference: dict[int, Output] | None = None, log=None) -> dict:
    """The report: {"url", "settings", "reference": summary of the serial pass (when run here),
    "levels": [summary per concurrency]}. Pass a `reference` from an earlier run to compare this
    server's outputs with another run's (e.g. the same server restarted with other slots)."""
    s = check_server(url, s)
    rep = {"url": url, "settings": dataclasses.asdict(s), "levels": []}
    if reference is None:
        if log:
            log(f"serial reference: {len({r.key for r in requests})} distinct requests, one at a time")
        t0 = time.perf_counter()
        reference = serial_reference(url, requests, s)
        rep["reference"] = summarize(list(reference.values()), time.perf_counter() - t0, 1, None)
    rep["_reference_outputs"] = reference
    for c in levels:
        if log:
            log(f"concurrency {c}: {len(requests)} requests")
        outs, dt = asyncio.run(run_level(url, requests, s, c))
        rep["levels"].append(summarize(outs, dt, c, reference))
    return rep


def public(report: dict) -> dict:
    """The report without the raw reference outputs (for JSON)."""
    return {k: v for k, v in report.items() if not k.startswith("_")}


def _f(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def format_report(report: dict) -> str:
    s = report["settings"]
    lines = [f"bench-serve {report['url']}  endpoint {s['endpoint']}  max_tokens {s['max_tokens']}  "
             f"temperature {s['temperature']:g}  seed {s['seed']}", ""]
    ref = report.get("reference")
    if ref is not None:
        lines.append(f"serial reference: {ref['completed']} of {ref['requests']} distinct requests completed "
                     f"in {ref['duration_s']:.1f} s")
        lines.append("")
    head = ("| conc | completed | failed | req/s | out tok/s | TTFT mean/p50/p90/p99 ms | TPOT mean/p50/p90/p99 ms "
            "| ITL mean/p50/p90/p99 ms | E2E p50 ms | differ from serial |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for lv in report["levels"]:
        def q(k):
            d = lv[k]
            return "/".join(_f(d[x]) for x in ("mean", "p50", "p90", "p99"))
        diff = f"{lv['differ']} of {lv['compared']} ({lv['compared_by']})" if "differ" in lv else "-"
        lines.append(f"| {lv['concurrency']} | {lv['completed']} | {lv['failed']} | {lv['request_throughput']:.2f} "
                     f"| {lv['output_throughput']:.1f} | {q('ttft_ms')} | {q('tpot_ms')} | {q('itl_ms')} "
                     f"| {_f(lv['e2el_ms']['p50'])} | {diff} |")
    errs = sorted({e for lv in report["levels"] for e in lv["errors"]} | set((ref or {}).get("errors", [])))
    if errs:
        lines += ["", "errors:"] + [f"  {e}" for e in errs]
    return "\n".join(lines) + "\n"
