"""refinfer.Engine: continuous batching whose every request is what Model.generate gives it
alone (token ids, text, finish reason, logprobs, prompt logprobs, seed), through chunked
prefill, prefix-cache hits, preemption by recompute and concurrent submits; the API (submit,
streaming handles, cancel, generate_many with error results), the statistics, and the block
accounting after every workload."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest

import refinfer
from refinfer.errors import RefinferError

BACKENDS = ("numpy", "numba")


@pytest.fixture(scope="module", params=BACKENDS)
def model(request, tiny_llama_f32):
    return refinfer.load(tiny_llama_f32, backend=request.param)


def alone(model, req, seed=None):
    """Model.generate of req alone (with the seed the engine drew for a request that gave none)."""
    if seed is not None and req.get("seed") is None:
        req = {**req, "seed": seed}
    return model.generate(**req, details=True)


def check_same(got, want, what=""):
    """Every field a request's result has, bit for bit (logprobs are float64 compared with ==)."""
    for name in ("finish_reason", "token_ids", "text", "prompt_token_ids", "seed", "logprobs", "prompt_logprobs"):
        assert getattr(got, name) == getattr(want, name), f"{what}: {name} differs"


def check_idle(engine):
    """After a workload: the accounting holds and every block is free or cached."""
    engine.check_accounting()
    s = engine.stats()
    assert (s.running, s.waiting, s.blocks_used) == (0, 0, 0), s
    assert s.blocks_free + s.blocks_cached == s.blocks_total, s


def ids(rng, n):
    return [int(t) for t in rng.integers(3, 32000, n)]


def mixed_requests(rng, n):
    """Ragged prompts (text and token ids), greedy and seeded sampling, stop strings, top-N."""
    out = []
    for i in range(n):
        req = dict(prompt=ids(rng, int(rng.integers(1, 40))) if i % 2 else "Once upon a time " * int(rng.integers(1, 6)),
                   max_tokens=int(rng.integers(1, 16)))
        if i % 3:
            req.update(temperature=float(rng.choice([0.7, 1.0, 1.5])), top_k=int(rng.choice([0, 40])),
                       top_p=float(rng.choice([1.0, 0.9])), seed=int(rng.integers(0, 2 ** 63)))
        else:
            req.update(temperature=0)
        if i % 4 == 1:
            req.update(top_logprobs=int(rng.integers(0, 4)))
        if i % 5 == 2:
            req.update(prompt_logprobs=True)
        if i % 7 == 3:
            req.update(stop=["e", "zz"], repeat_penalty=1.3)
        out.append(req)
    return out


@pytest.mark.parametrize("budget,block_size", [(512, 16), (5, 16), (3, 4)])
def test_generate_many_equals_each_request_alone(model, budget, block_size):
    rng = np.random.default_rng(budget)
    reqs = mixed_requests(rng, 10)
    engine = refinfer.Engine(model, max_batch=6, max_tokens_per_step=budget, kv_block_size=block_size,
                             kv_cache_tokens=1024)
    results = engine.generate_many(reqs)
    for i, (req, got) in enumerate(zip(reqs, results)):
        check_same(got, alone(model, req, got.seed), f"request {i} {req}")
        assert got.stats.prompt_tokens == len(got.prompt_token_ids)
        assert got.stats.generated_tokens == len(got.token_ids) == len(got.logprobs)
    check_idle(engine)


def test_chunked_prefill_shares_steps_with_a_decode(model):
    engine = refinfer.Engine(model, max_tokens_per_step=4)
    a = engine.submit("Hello", max_tokens=40, temperature=0)
    engine.step()                                        # a's prompt, then a decodes
    engine.step()
    assert len(list(_drain(a))) == 2
    rng = np.random.default_rng(1)
    b = engine.submit(ids(rng, 30), max_tokens=2, temperature=0)
    n_a = []
    for _ in range(8):                                   # b's 30 prompt tokens take 10 steps of 3
        engine.step()
        n_a.append(len(list(_drain(a))))
    assert n_a == [1] * 8, "the decode got one token in every step of the prefill"
    assert not b.done
    r = b.result()
    check_same(r, alone(model, dict(prompt=b.request.prompt_ids, max_tokens=2, temperature=0), r.seed))
    a.cancel()
    check_idle(engine)


def _drain(handle):
    """The events a handle holds now, without stepping."""
    while True:
        try:
            yield handle._events.get_nowait()
        except queue.Empty:
            return


def test_max_batch_caps_the_running_sequences(model):
    engine = refinfer.Engine(model, max_batch=2)
    hs = [engine.submit(f"Story {i}:", max_tokens=6, temperature=0) for i in range(5)]
    assert engine.stats().waiting == 5
    while engine.step():
        s = engine.stats()
        assert s.running <= 2 and s.running + s.waiting + s.finished == 5, s
    assert all(h.done for h in hs)
    check_idle(engine)


def test_preemption_recomputes_and_changes_nothing(model):
    rng = np.random.default_rng(7)
    reqs = [dict(prompt=ids(rng, int(rng.integers(5, 12))), max_tokens=24, temperature=0.8, seed=i,
                 top_logprobs=1 if i % 2 else None)
            for i in range(6)]
    # 6 sequences of up to 35 positions need 54 blocks of 4; the pool has 16 (one sequence fits)
    engine = refinfer.Engine(model, max_batch=6, max_tokens_per_step=16, kv_block_size=4, kv_cache_tokens=64)
    results = engine.generate_many(reqs)
    s = engine.stats()
    assert s.preemptions > 0
    assert sum(r.stats.preemptions for r in results) == s.preemptions
    for i, (req, got) in enumerate(zip(reqs, results)):
        check_same(got, alone(model, req, got.seed), f"request {i}")
    check_idle(engine)


def test_prefix_cache_hits_and_prompt_logprobs_skip_it(model):
    rng = np.random.default_rng(3)
    system = ids(rng, 40)
    engine = refinfer.Engine(model)
    first = engine.generate_many([dict(prompt=system + [11, 12], max_tokens=4, temperature=0)])[0]
    assert first.stats.cached_prompt_tokens == 0
    reqs = [dict(prompt=system + ids(rng, 5), max_tokens=4, temperature=0),
            dict(prompt=system + [11, 12], max_tokens=4, temperature=0, prompt_logprobs=True, top_logprobs=2),
            dict(prompt=system, max_tokens=3, temperature=0)]
    hit, logprobs, whole = engine.generate_many(reqs)
    assert hit.stats.cached_prompt_tokens == 32          # two full blocks of 16 of the shared 40
    assert whole.stats.cached_prompt_tokens == 32        # a hit is capped at len(prompt) - 1
    assert logprobs.stats.cached_prompt_tokens == 0      # prompt logprobs: every position computed
    assert len(logprobs.prompt_logprobs) == 42 and logprobs.prompt_logprobs[0] is None
    for req, got in zip(reqs, (hit, logprobs, whole)):
        check_same(got, alone(model, req, got.seed))
    s = engine.stats()
    assert s.prefix_cache_hits == 64 and s.prefix_cache_queries == 42 + 45 + 40
    check_idle(engine)


def test_submit_streams_events_that_make_the_result(model):
    engine = refinfer.Engine(model)
    req = dict(prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=9, top_logprobs=2, stop=["zz"])
    h = engine.submit(**req)
    events = list(h)
    r = h.result()
    assert [e.token_id for e in events if e.token_id is not None] == r.token_ids
    assert "".join(e.text for e in events) == r.text
    assert [e.logprob for e in events if e.logprob is not None] == r.logprobs
    assert events[-1].finish_reason == r.finish_reason and all(e.finish_reason is None for e in events[:-1])
    check_same(r, alone(model, req, r.seed))
    assert list(h) == [] and h.result() is r            # a finished handle: no more events, the same result
    check_idle(engine)


def test_finish_reasons_stop_and_length(model):
    full = alone(model, dict(prompt="The cat", max_tokens=20, temperature=0))
    stop = full.text[6:8]
    engine = refinfer.Engine(model)
    reqs = [dict(prompt="The cat", max_tokens=20, temperature=0, stop=[stop]),
            dict(prompt="The cat", max_tokens=20, temperature=0),
            dict(prompt="The cat", max_tokens=0, prompt_logprobs=True)]
    r_stop, r_len, r_zero = engine.generate_many(reqs)
    assert r_stop.finish_reason == "stop" and r_stop.text == full.text[:full.text.index(stop)]
    assert r_len.finish_reason == "length" and r_len.token_ids == full.token_ids
    assert (r_zero.finish_reason, r_zero.token_ids) == ("length", []) and len(r_zero.prompt_logprobs) == 3
    for req, got in zip(reqs, (r_stop, r_len, r_zero)):
        check_same(got, alone(model, req, got.seed))
    check_idle(engine)


def test_context_overflow_generates_up_to_the_context(model):
    n_ctx = model.config.max_seq_len
    rng = np.random.default_rng(5)
    near = dict(prompt=ids(rng, n_ctx - 2), max_tokens=50, temperature=0)
    engine = refinfer.Engine(model, max_tokens_per_step=100)
    r, too_long, ok = engine.generate_many([near, dict(prompt=ids(rng, n_ctx), max_tokens=1), dict(prompt="Hi", max_tokens=3)])
    assert r.finish_reason == "length" and len(r.token_ids) == 2
    check_same(r, alone(model, near, r.seed))
    assert too_long.finish_reason == "error" and f"the prompt is {n_ctx} tokens long" in too_long.error
    assert ok.finish_reason == "length" and len(ok.token_ids) == 3
    check_idle(engine)


def test_bad_requests_come_back_as_errors_and_lose_nothing(model):
    good = [dict(prompt="Hello", max_tokens=5, temperature=0), dict(prompt="World", max_tokens=4, temperature=0.5, seed=1)]
    reqs = [good[0], dict(prompt="x", max_tokens=-1), dict(prompt="x", temprature=1.0), "not a dict",
            dict(prompt=[1, 99999999]), dict(messages=[{"role": "user"}]), good[1]]
    results = refinfer.Engine(model).generate_many(reqs)
    assert [r.finish_reason == "error" for r in results] == [False, True, True, True, True, True, False]
    for r, fragment in zip(results[1:6], ["max_tokens must be an integer >= 0, got -1", "unknown request field 'temprature'",
                                          "a request is a dict", "outside the vocabulary", "'messages[0]' must be"]):
        assert fragment in r.error and r.error_hint and r.token_ids == [] and r.text == ""
    check_same(results[0], alone(model, good[0], results[0].seed))
    check_same(results[6], alone(model, good[1], results[6].seed))


def test_a_request_that_can_never_fit_the_pool_is_rejected_with_the_numbers(model):
    engine = refinfer.Engine(model, kv_cache_tokens=32)
    with pytest.raises(RefinferError) as e:
        engine.submit(list(range(10, 30)), max_tokens=20)
    assert "request needs 39 KV positions = 3 blocks of 16, but the KV pool holds 2 blocks (32 positions)" in str(e.value)
    assert "--kv-cache-tokens" in e.value.hint
    r = engine.generate_many([dict(prompt=list(range(10, 30)), max_tokens=20), dict(prompt=[5, 6], max_tokens=3)])
    assert r[0].finish_reason == "error" and "3 blocks of 16" in r[0].error and r[1].finish_reason == "length"
    check_idle(engine)


def test_cancel_frees_the_blocks_at_any_moment(model):
    engine = refinfer.Engine(model, max_tokens_per_step=8, enable_prefix_caching=False)   # no hits: steps are counted
    rng = np.random.default_rng(11)
    prompt = ids(rng, 30)
    want = alone(model, dict(prompt=prompt, max_tokens=40, temperature=0))
    waiting = engine.submit(prompt, max_tokens=40, temperature=0)
    waiting.cancel()                                      # before any step
    r = waiting.result()
    assert (r.finish_reason, r.token_ids) == ("cancelled", [])
    for n_steps in (1, 3, 6, 9):                          # in prefill (30 tokens = 4 steps of 8), then decoding
        h = engine.submit(prompt, max_tokens=40, temperature=0)
        other = engine.submit("Hi", max_tokens=30, temperature=0)
        for _ in range(n_steps):
            engine.step()
        assert engine.stats().blocks_used > 0
        h.cancel()
        other.cancel()
        assert engine.stats().blocks_used == 0, f"after {n_steps} steps"
        r = h.result()
        assert r.finish_reason == "cancelled" and r.token_ids == want.token_ids[:len(r.token_ids)]
        assert len(r.token_ids) == max(0, n_steps - 3)
        engine.check_accounting()
    # in a running engine thread
    with refinfer.Engine(model) as running:
        h = running.submit(prompt, max_tokens=200, temperature=0)
        for ev in h:
            if ev.token_id is not None:
                h.cancel()
                break
        assert h.result(timeout=60).finish_reason == "cancelled"
        h.cancel()                                        # a second cancel does nothing
        deadline = time.monotonic() + 30
        while running.stats().finished < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        check_idle(running)
    check_idle(engine)


def test_concurrent_submits_from_threads(model):
    rng = np.random.default_rng(13)
    reqs = mixed_requests(rng, 16)
    results, errors = [None] * len(reqs), []
    with refinfer.Engine(model, max_batch=5, max_tokens_per_step=24, kv_cache_tokens=256) as engine:
        def client(k):
            try:
                for i in range(k, len(reqs), 4):
                    h = engine.submit(**reqs[i])
                    results[i] = h.result(timeout=120) if i % 3 else _stream(h)
            except Exception as e:                        # re-raised in the test's thread below
                errors.append(e)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        assert time.monotonic() - t0 < 180 and not any(t.is_alive() for t in threads)
        assert not errors, errors
        assert engine.stats().finished == len(reqs)
    for i, (req, got) in enumerate(zip(reqs, results)):
        check_same(got, alone(model, req, got.seed), f"request {i}")
    check_idle(engine)


def _stream(handle):
    list(handle)
    return handle.result(timeout=120)


def test_stats_per_request_and_engine_wide(model):
    engine = refinfer.Engine(model, max_batch=2, kv_cache_tokens=128)
    hs = [engine.submit(f"Number {i} is", max_tokens=5, temperature=0) for i in range(3)]
    s = engine.stats()
    assert (s.waiting, s.running, s.blocks_total, s.blocks_free) == (3, 0, 8, 8)
    engine.step()
    s = engine.stats()
    assert (s.waiting, s.running, s.steps) == (1, 2, 1) and s.blocks_used == 2
    for h in hs:
        st = h.result().stats
        assert st.prompt_tokens == len(h.request.prompt_ids) and st.generated_tokens == 5
        assert 0 <= st.queue_s <= st.ttft_s and st.prefill_s >= 0 and st.decode_s >= 0
        assert len(st.token_times) == 5 and st.token_times == sorted(st.token_times)
        assert st.token_times[0] == st.ttft_s
    assert hs[2].result().stats.queue_s > hs[0].result().stats.queue_s   # it waited for a slot
    s = engine.stats()
    assert s.finished == 3 and s.preemptions == 0
    check_idle(engine)


@pytest.mark.parametrize("kw,fragment", [
    (dict(max_batch=0), "max_batch must be a positive integer, got 0"),
    (dict(max_tokens_per_step=1.5), "max_tokens_per_step must be a positive integer, got 1.5"),
    (dict(kv_cache_tokens=64, kv_cache_mib=1), "give exactly one of --kv-cache-mib (1) and --kv-cache-tokens (64)"),
    (dict(kv_block_size=0), "kv_block_size (--kv-block-size) must be a positive integer, got 0"),
    (dict(kv_cache_tokens=8), "--kv-cache-tokens 8 holds no KV block"),
    (dict(kv_cache_mib=0.001), "--kv-cache-mib 0.001 holds no KV block"),
    (dict(kv_cache_mib=-1), "--kv-cache-mib must be a positive number, got -1"),
])
def test_bad_engine_options_are_named(model, kw, fragment):
    with pytest.raises(RefinferError) as e:
        refinfer.Engine(model, **kw)
    assert fragment in str(e.value) and e.value.hint


def test_kv_cache_mib_sizes_the_pool(model):
    cfg = model.config
    per_block = 2 * cfg.n_layers * 16 * cfg.n_kv_heads * cfg.head_dim * 4    # K and V rows of f32
    engine = refinfer.Engine(model, kv_cache_mib=10 * per_block / 2 ** 20)
    assert engine.stats().blocks_total == 10
