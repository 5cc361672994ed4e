"""A bounded soak: for about SOAK_S seconds (and at most MAX_REQUESTS requests) eight clients send
a seeded mix of valid requests (completions and chat, streaming or not), malformed JSON, unknown
fields, oversized prompts, streams they close early and requests they give up on. Afterwards:
no response was a 5xx but 503 (a full queue); every answered request that is checked (CHECKED
of them, a seeded sample) equals Model.generate of it alone, so no response was lost or mixed
up; every admitted sequence is accounted for in /metrics; the server still answers; and every
KV block is back (free or cached), with the engine's own accounting checked."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest

import refinfer
from refinfer.server import create_app
from server_harness import serve_app
from server_refs import SERVER_DEFAULTS, generated_with_eog, ids_of
from test_server_robustness import wait_idle

SOAK_S = 40.0               # then about 15 s to redo CHECKED answers alone
CHECKED = 200
MAX_REQUESTS = 3000
CLIENTS = 8
WORDS = "a quick brown fox jumps over the lazy dog while seven small birds sing".split()


@pytest.fixture(scope="module")
def model(tiny_chat_gguf):
    return refinfer.load(tiny_chat_gguf, backend="numba")


def valid_request(rng, model) -> tuple[str, dict]:
    text = " ".join(rng.choice(WORDS, int(rng.integers(1, 40))))
    body = {"max_tokens": int(rng.integers(1, 24)), "seed": int(rng.integers(0, 2 ** 32)),
            "stream": bool(rng.random() < 0.5), "return_tokens_as_token_ids": True}
    if rng.random() < 0.5:
        body["temperature"] = 0.0
    if rng.random() < 0.6:
        return "/v1/completions", {**body, "prompt": text if rng.random() < 0.5 else model.tokenize(text), "logprobs": 0}
    return "/v1/chat/completions", {**body, "messages": [{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": text}], "logprobs": True}


async def read_response(r: httpx.Response, stream: bool, chat: bool):
    """(ids, logprobs, text, finish_reason, chunk ids) of one choice."""
    ids, lps, text, fin, cids = [], [], [], None, set()
    if stream:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            p = json.loads(line[6:])
            cids.add(p["id"])
            for c in p["choices"]:
                lp = c.get("logprobs")
                if chat:
                    text.append(c["delta"].get("content") or "")
                    entries = (lp or {}).get("content") or []
                    ids += ids_of([t["token"] for t in entries])
                    lps += [t["logprob"] for t in entries]
                else:
                    text.append(c["text"])
                    if lp:
                        ids += ids_of(lp["tokens"])
                        lps += lp["token_logprobs"]
                fin = c.get("finish_reason") or fin
    else:
        p = json.loads(await r.aread())
        cids.add(p["id"])
        (c,) = p["choices"]
        lp = c["logprobs"]
        if chat:
            text.append(c["message"]["content"])
            ids, lps = ids_of([t["token"] for t in lp["content"]]), [t["logprob"] for t in lp["content"]]
        else:
            text.append(c["text"])
            ids, lps = ids_of(lp["tokens"]), lp["token_logprobs"]
        fin = c["finish_reason"]
    return ids, lps, "".join(text), fin, cids


async def soak(url, model, seed):
    log = {"answered": [], "status": {}, "admitted": 0, "sent": 0}
    deadline = time.monotonic() + SOAK_S

    async def client(k):
        crng = np.random.default_rng([seed, k])
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            while time.monotonic() < deadline and log["sent"] < MAX_REQUESTS:
                log["sent"] += 1
                action = crng.choice(["valid"] * 6 + ["bad_json", "unknown_field", "oversized", "disconnect", "give_up"])
                path, body = valid_request(crng, model)
                if action == "bad_json":
                    r = await c.post(path, content=json.dumps(body)[:-3].encode(), headers={"content-type": "application/json"})
                    log["status"][r.status_code] = log["status"].get(r.status_code, 0) + 1
                    assert r.status_code == 400, r.text
                    continue
                if action == "unknown_field":
                    body["temperture"] = 0.5
                if action == "oversized":
                    body = {**body, "prompt": [5] * 600}
                    body.pop("messages", None)
                    body.pop("logprobs", None)
                    path = "/v1/completions"
                if action == "give_up":
                    body["stream"] = False
                    body["max_tokens"] = 200
                    try:
                        r = await c.post(path, json=body, timeout=httpx.Timeout(30, read=float(crng.uniform(0.005, 0.05))))
                    except httpx.ReadTimeout:
                        log["status"]["gave up"] = log["status"].get("gave up", 0) + 1
                        continue
                    log["status"][r.status_code] = log["status"].get(r.status_code, 0) + 1
                    assert r.status_code in (200, 503), r.text
                    log["admitted"] += r.status_code == 200
                    continue
                async with c.stream("POST", path, json=body) as r:
                    log["status"][r.status_code] = log["status"].get(r.status_code, 0) + 1
                    if action in ("unknown_field", "oversized"):
                        assert r.status_code == 400, await r.aread()
                        continue
                    assert r.status_code in (200, 503), await r.aread()
                    if r.status_code == 503:
                        assert r.headers["retry-after"] == "1"
                        continue
                    log["admitted"] += 1
                    if action == "disconnect":
                        if body["stream"]:
                            n = int(crng.integers(0, 4))
                            async for _ in r.aiter_lines():
                                n -= 1
                                if n < 0:
                                    break
                        continue                          # leaving the block closes the connection
                    got = await read_response(r, body["stream"], path.endswith("chat/completions"))
                    log["answered"].append((path, body, got))

    await asyncio.gather(*(client(k) for k in range(CLIENTS)))
    return log


def check_answer(model, path, body, got) -> str | None:
    ids, lps, text, fin, cids = got
    kw = {k: body[k] for k in ("temperature",) if k in body}
    fields = dict(prompt=body["prompt"]) if "prompt" in body else dict(messages=body["messages"])
    want = model.generate(**{**SERVER_DEFAULTS, **kw}, **fields, max_tokens=body["max_tokens"], seed=body["seed"],
                          top_logprobs=0, details=True)
    w_ids, w_lps = generated_with_eog(want) if "prompt" in body else (want.token_ids, [t.logprob for t in want.logprobs])
    if len(cids) != 1:
        return f"{len(cids)} ids in one response"
    if (ids, lps, text, fin) != (w_ids, w_lps, want.text, want.finish_reason):
        return f"{path} {body} differs from generate alone"
    return None


def test_soak_mixed_valid_malformed_oversized_and_abandoned_requests(model):
    app = create_app(model, parallel=4, max_queue=6, sse_ping_s=0.5)
    with serve_app(app) as url:
        log = asyncio.run(soak(url, model, seed=21))
        m = wait_idle(url)
        r = httpx.post(url + "/v1/completions", json={"prompt": "still alive", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
        app.state.refinfer.engine.check_accounting()
        finished = sum(v for k, v in parse_metrics_all(httpx.get(url + "/metrics").text).items()
                       if k.startswith("refinfer_request_success_total"))
    assert not any(isinstance(s, int) and s >= 500 and s != 503 for s in log["status"]), log["status"]   # 503: the queue was full
    assert len(log["answered"]) >= 50, log["status"]
    assert m["refinfer_kv_cache_blocks_free"] + m["refinfer_kv_cache_blocks_cached"] == m["refinfer_kv_cache_blocks_total"]
    # every admitted sequence finished, was cancelled, or (the request given up while it was
    # being checked) never reached the engine; plus the final request
    assert log["admitted"] + 1 <= finished <= log["admitted"] + 1 + log["status"].get("gave up", 0), (log, finished)
    pick = np.random.default_rng(0).permutation(len(log["answered"]))[:CHECKED]     # each reference costs ~80 ms
    bad = [e for e in (check_answer(model, *log["answered"][i]) for i in sorted(pick)) if e]
    assert bad == [], bad[:5]


def parse_metrics_all(text) -> dict:
    """Each sample line (labels kept) -> value."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}

