"""The server's guarantee under load: 32 concurrent requests through the async openai client
(completions and chat, text and token-id prompts, system prompts and several turns, greedy and
seeded sampling, n = 2, streaming or not, shared prefixes, prefill chunked into small steps, a
KV pool small enough to preempt) each get exactly what Model.generate gives the same request
alone: token ids, logprobs (float64 ==), text and finish reason; no stream mixes with another.
The negative control serves a backend whose matmul depends on the batch and must be caught."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import refinfer
from ci_skips import oracle_import
from refinfer.backends.numpy_backend import NumpyBackend
from server_harness import serve_model
from server_refs import generated_with_eog, ids_of, reference

openai = oracle_import("openai")

N_REQUESTS = 32
SERVE = dict(parallel=8, max_tokens_per_step=24, kv_cache_tokens=256)   # chunked prefills, preemption
WORDS = "the cat sat on a mat and then it ran far away into deep green woods".split()
SYSTEM = "You are a helpful assistant who answers in one short sentence."


def workload(rng, model) -> list[dict]:
    """Request descriptions: kind, the API fields, and what generate needs to redo it alone."""
    shared = " ".join(rng.choice(WORDS, 40))
    out = []
    for i in range(N_REQUESTS):
        sampling = {}
        if rng.random() < 0.7:
            sampling = dict(temperature=float(rng.choice([0.7, 1.0, 1.3])), top_p=float(rng.choice([1.0, 0.9])))
            if rng.random() < 0.5:
                sampling["top_k"] = int(rng.choice([5, 40]))
        else:
            sampling = dict(temperature=0.0)
        r = dict(max_tokens=int(rng.integers(1, 20)), seed=int(rng.integers(0, 2 ** 63)), stream=bool(rng.random() < 0.5),
                 sampling=sampling, n=int(rng.choice([1, 1, 1, 2])))
        if i % 3 == 2:
            turns = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.7 else []
            for t in range(int(rng.integers(1, 4))):
                turns.append({"role": "user", "content": " ".join(rng.choice(WORDS, int(rng.integers(2, 12))))})
                if t:
                    turns.insert(-1, {"role": "assistant", "content": " ".join(rng.choice(WORDS, 5))})
            r.update(kind="chat", messages=turns, top_logprobs=int(rng.choice([0, 2])))
        else:
            text = (shared + " " if rng.random() < 0.4 else "") + " ".join(rng.choice(WORDS, int(rng.integers(1, 60))))
            prompt = text if rng.random() < 0.6 else model.tokenize(text)
            r.update(kind="completion", prompt=prompt, logprobs=int(rng.choice([0, 1, 3])))
        out.append(r)
    return out


async def send(ac, r):
    """One request; returns {choice index: (ids, logprobs, text, finish_reason)} and its ids."""
    extra = {"return_tokens_as_token_ids": True}
    if "top_k" in r["sampling"]:
        extra["top_k"] = r["sampling"]["top_k"]
    common = dict(model="tiny-chat-f32.gguf", max_tokens=r["max_tokens"], seed=r["seed"], n=r["n"], stream=r["stream"],
                  temperature=r["sampling"]["temperature"], top_p=r["sampling"].get("top_p", 1.0), extra_body=extra)
    choices, stream_ids = {}, set()
    if r["kind"] == "completion":
        resp = await ac.completions.create(prompt=r["prompt"], logprobs=r["logprobs"], **common)
        parts = [resp] if not r["stream"] else [c async for c in resp]
        for p in parts:
            stream_ids.add(p.id)
            for c in p.choices:
                ids, lps, text, fin = choices.setdefault(c.index, ([], [], [], [None]))
                if c.logprobs:
                    ids += ids_of(c.logprobs.tokens)
                    lps += c.logprobs.token_logprobs
                text.append(c.text)
                fin[0] = c.finish_reason or fin[0]
    else:
        resp = await ac.chat.completions.create(messages=r["messages"], logprobs=True, top_logprobs=r["top_logprobs"],
                                                **common)
        parts = [resp] if not r["stream"] else [c async for c in resp]
        for p in parts:
            stream_ids.add(p.id)
            for c in p.choices:
                ids, lps, text, fin = choices.setdefault(c.index, ([], [], [], [None]))
                if c.logprobs and c.logprobs.content:
                    ids += ids_of([t.token for t in c.logprobs.content])
                    lps += [t.logprob for t in c.logprobs.content]
                text.append((c.message.content if not r["stream"] else c.delta.content) or "")
                fin[0] = c.finish_reason or fin[0]
    return {i: (ids, lps, "".join(text), fin[0]) for i, (ids, lps, text, fin) in choices.items()}, stream_ids


async def send_all(url, reqs):
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300) as ac:
        return await asyncio.gather(*(send(ac, r) for r in reqs))


def differences(model, reqs, answers) -> list[str]:
    """Each choice against generate alone; also: one id per response, distinct across responses."""
    bad, all_ids = [], []
    for k, (r, (choices, sids)) in enumerate(zip(reqs, answers)):
        all_ids += list(sids)
        if len(sids) != 1:
            bad.append(f"request {k}: {len(sids)} ids in one response")
        if sorted(choices) != list(range(r["n"])):
            bad.append(f"request {k}: choices {sorted(choices)}")
        for j in range(r["n"]):
            seed = (r["seed"] + j) % 2 ** 64
            kw = dict(prompt=r["prompt"], top_logprobs=r["logprobs"]) if r["kind"] == "completion" else \
                dict(messages=r["messages"], top_logprobs=r["top_logprobs"])
            want = reference(model, seed=seed, max_tokens=r["max_tokens"], **r["sampling"], **kw)
            ids, lps = generated_with_eog(want) if r["kind"] == "completion" else \
                (want.token_ids, [t.logprob for t in want.logprobs])
            got = choices.get(j)
            if got is None or (got[0], got[1], got[2], got[3]) != (ids, lps, want.text, want.finish_reason):
                bad.append(f"request {k} ({r['kind']}, stream={r['stream']}) choice {j} differs from generate alone")
    if len(set(all_ids)) != len(all_ids):
        bad.append("two responses share an id")
    return bad


def run_workload(model, seed) -> tuple[list[str], dict]:
    rng = np.random.default_rng(seed)
    reqs = workload(rng, model)
    with serve_model(model, **SERVE) as url:
        answers = asyncio.run(send_all(url, reqs))
        import httpx
        metrics = httpx.get(url + "/metrics", timeout=30).text
    return differences(model, reqs, answers), parse_metrics(metrics)


def parse_metrics(text) -> dict:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0] if "_bucket" not in name else name] = float(value)
    return out


@pytest.fixture(scope="module")
def model(tiny_chat_gguf):
    return refinfer.load(tiny_chat_gguf, backend="numba")


def test_32_concurrent_requests_each_equal_generate_alone(model):
    bad, m = run_workload(model, seed=14)
    assert bad == [], bad
    assert m["refinfer_num_preemptions_total"] > 0, "the small KV pool should make the engine preempt"
    assert m["refinfer_prefix_cache_hits_total"] > 0, "shared prefixes should hit the prefix cache"
    assert m["refinfer_kv_cache_blocks_used"] == 0 and m["refinfer_num_requests_running"] == 0


class BatchDependentMatmul(NumpyBackend):
    """The negative control: a float32 BLAS product over the whole step, whose blocking (and so
    each element's summation order) changes with the number of rows in the step."""

    def matmul(self, out, x, w):
        out[...] = x.astype(np.float32) @ self._dequantized(w).T


def test_negative_control_a_batch_dependent_backend_is_caught(tiny_chat_gguf):
    model = refinfer.load(tiny_chat_gguf, backend="numpy")
    model.backend = BatchDependentMatmul()
    bad, _ = run_workload(model, seed=14)
    assert bad, "a batch-dependent matmul must make some response differ from generate alone"
