"""The server through the official openai client (sync and async): completions, chat, streaming,
logprobs, usage, n and seeds, errors and auth. Every generated token and logprob is compared
with Model.generate(..., details=True) of the same request alone."""

from __future__ import annotations

import pytest

import refinfer
from ci_skips import oracle_import
from server_harness import serve_model
from server_refs import generated_with_eog, ids_of, legacy_top, reference

openai = oracle_import("openai")

TOKEN_IDS = {"return_tokens_as_token_ids": True}


@pytest.fixture(scope="module")
def model(tiny_chat_gguf):
    return refinfer.load(tiny_chat_gguf, backend="numba")


@pytest.fixture(scope="module")
def url(model):
    with serve_model(model, parallel=4) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    yield c
    c.close()


def test_models_lists_the_one_model_with_its_context(client, model):
    (m,) = client.models.list().data
    assert m.id == "tiny-chat-f32.gguf"
    assert m.max_model_len == model.config.max_seq_len == 512


def test_completion_equals_generate_with_logprobs(client, model):
    prompt = "Once upon a time, in a small village,"
    r = client.completions.create(model="tiny-chat-f32.gguf", prompt=prompt, max_tokens=12, seed=11, temperature=0.9,
                                  top_p=0.95, logprobs=3, extra_body={"top_k": 50, **TOKEN_IDS})
    want = reference(model, prompt=prompt, max_tokens=12, seed=11, temperature=0.9, top_p=0.95, top_k=50,
                     top_logprobs=3)
    (c,) = r.choices
    ids, lps = generated_with_eog(want)
    assert ids_of(c.logprobs.tokens) == ids
    assert c.logprobs.token_logprobs == lps
    assert c.logprobs.top_logprobs == [legacy_top(t) for t in want.logprobs] + ([legacy_top(want.eog)] if want.eog else [])
    assert c.text == want.text and c.finish_reason == want.finish_reason
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.system_fingerprint.startswith("refinfer-") and "-ideal-numba-" in r.system_fingerprint
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(want.prompt_token_ids), len(ids))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_echo_gives_the_prompt_logprobs_in_the_legacy_shape(client, model):
    check_echo(client, model)


def check_echo(client, model):
    prompt = "The quick brown fox jumps over the lazy dog"
    r = client.completions.create(model="tiny-chat-f32.gguf", prompt=prompt, max_tokens=1, temperature=0, echo=True,
                                  logprobs=2)
    want = reference(model, prompt=prompt, max_tokens=1, seed=0, temperature=0, top_logprobs=2, prompt_logprobs=True)
    lp = r.choices[0].logprobs
    n = len(want.prompt_token_ids)
    assert r.choices[0].text == prompt + want.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:n] == [t.logprob for t in want.prompt_logprobs[1:]]
    assert lp.token_logprobs[n:] == generated_with_eog(want)[1]
    pieces = [model.tokenizer.token_to_piece(i).decode("utf-8", "replace") for i in want.prompt_token_ids]
    assert lp.tokens[:n] == pieces
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    for top, t in zip(lp.top_logprobs[1:n], want.prompt_logprobs[1:]):
        assert max(top.values()) == max([v for _, v in t.top] + [t.logprob])


def test_batch_of_prompts_with_n_is_ordered_by_prompt_then_sample_with_seeds_seed_plus_j(client, model):
    check_batch_and_n(client, model)


def check_batch_and_n(client, model):
    ids = model.tokenize("A list of token ids")
    r = client.completions.create(model="tiny-chat-f32.gguf", prompt=[ids, ids[:3]], n=2, max_tokens=6, seed=2 ** 64 - 1,
                                  logprobs=0, extra_body=TOKEN_IDS)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        p, j = divmod(c.index, 2)
        seed = (2 ** 64 - 1 + j) % 2 ** 64                     # seed + j, wrapping at 2**64
        want = reference(model, prompt=[ids, ids[:3]][p], max_tokens=6, seed=seed, top_logprobs=0)
        assert c.seed == seed
        assert (ids_of(c.logprobs.tokens), c.logprobs.token_logprobs) == generated_with_eog(want)
    assert r.usage.prompt_tokens == len(ids) + 3               # each prompt counted once, not n times


def test_without_a_seed_the_server_reports_the_one_it_drew(client, model):
    r = client.completions.create(model="tiny-chat-f32.gguf", prompt="Tell me", max_tokens=8, logprobs=0,
                                  extra_body=TOKEN_IDS)
    c = r.choices[0]
    assert 0 <= c.seed < 2 ** 32
    want = reference(model, prompt="Tell me", max_tokens=8, seed=c.seed, top_logprobs=0)
    assert ids_of(c.logprobs.tokens) == generated_with_eog(want)[0]


def test_completion_stream_equals_the_whole_answer(client, model):
    chunks = list(client.completions.create(model="tiny-chat-f32.gguf", prompt="Streaming text", max_tokens=10, seed=4,
                                            stream=True, logprobs=1, stream_options={"include_usage": True},
                                            extra_body=TOKEN_IDS))
    want = reference(model, prompt="Streaming text", max_tokens=10, seed=4, top_logprobs=1)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    body, last = [c for c in chunks if c.choices], chunks[-1]
    assert "".join(c.choices[0].text for c in body) == want.text
    assert [k for c in body if c.choices[0].logprobs for k in ids_of(c.choices[0].logprobs.tokens)] == \
        generated_with_eog(want)[0]
    assert [c.choices[0].finish_reason for c in body][-1] == want.finish_reason
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert last.choices == [] and last.usage.completion_tokens == len(generated_with_eog(want)[0])


def test_a_request_that_ends_at_an_end_of_generation_token_lists_it_last(tiny_chat_eog_gguf):
    check_eog_listed(refinfer.load(tiny_chat_eog_gguf, backend="numba"))


def check_eog_listed(model):
    """The completions API lists the end-of-generation token that stopped a request (its text is
    not output): lm-eval drops the last entry as the generated token."""
    with serve_model(model, parallel=1) as u:
        c = openai.OpenAI(base_url=u + "/v1", api_key="none", max_retries=0)
        r = c.completions.create(model="tiny-chat-eog-f32.gguf", prompt="Hello", max_tokens=5, temperature=0,
                                 logprobs=1, echo=True, extra_body=TOKEN_IDS)
    want = reference(model, prompt="Hello", max_tokens=5, seed=0, temperature=0, top_logprobs=1, prompt_logprobs=True)
    assert want.token_ids == [] and want.eog is not None and want.finish_reason == "stop"
    lp = r.choices[0].logprobs
    assert ids_of(lp.tokens) == want.prompt_token_ids + [want.eog.token_id]
    assert lp.token_logprobs[-1] == want.eog.logprob and lp.top_logprobs[-1] == legacy_top(want.eog)
    assert r.choices[0].text == "Hello" and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 1


def chat_messages():
    return [{"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one?"}]


def test_chat_equals_generate_and_max_completion_tokens_wins(client, model):
    r = client.chat.completions.create(model="tiny-chat-f32.gguf", messages=chat_messages(), max_tokens=50,
                                       max_completion_tokens=7, seed=9, logprobs=True, top_logprobs=2,
                                       extra_body={"min_p": 0.01, **TOKEN_IDS})
    want = reference(model, messages=chat_messages(), max_tokens=7, seed=9, min_p=0.01, top_logprobs=2)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content == want.text
    assert ids_of([t.token for t in c.logprobs.content]) == want.token_ids
    assert [t.logprob for t in c.logprobs.content] == [t.logprob for t in want.logprobs]
    assert [[(x.token, x.logprob) for x in t.top_logprobs] for t in c.logprobs.content] == \
        [[(f"token_id:{i}", v) for i, v in t.top] for t in want.logprobs]
    assert c.finish_reason == want.finish_reason
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)


def test_chat_stream_shape_role_first_finish_last_usage_after(client, model):
    stream = client.chat.completions.create(model="tiny-chat-f32.gguf", messages=chat_messages()[:2], max_tokens=6,
                                            seed=3, stream=True, logprobs=True, stream_options={"include_usage": True})
    chunks = list(stream)
    want = reference(model, messages=chat_messages()[:2], max_tokens=6, seed=3, top_logprobs=0)
    first, body, finish, usage = chunks[0], chunks[1:-2], chunks[-2], chunks[-1]
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    assert "".join(c.choices[0].delta.content for c in body) == want.text
    assert [t.logprob for c in body for t in c.choices[0].logprobs.content] == [t.logprob for t in want.logprobs]
    assert finish.choices[0].finish_reason == want.finish_reason and finish.choices[0].delta.content is None
    assert usage.choices == [] and usage.usage.completion_tokens == len(want.token_ids) + (want.eog is not None)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_string_is_cut_from_the_text(client, model):
    base = reference(model, prompt="Counting:", max_tokens=10, seed=1)
    stop = base.text[3:6]
    assert stop, base.text
    r = client.completions.create(model="tiny-chat-f32.gguf", prompt="Counting:", max_tokens=10, seed=1, stop=[stop])
    want = reference(model, prompt="Counting:", max_tokens=10, seed=1, stop=[stop])
    assert r.choices[0].text == want.text == base.text[:base.text.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_async_client_gets_the_same_answers(url, model):
    import asyncio

    async def go():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60) as ac:
            return await asyncio.gather(*(ac.completions.create(model="tiny-chat-f32.gguf", prompt=f"Item {i}:",
                                                                 max_tokens=5, seed=i) for i in range(6)))
    for i, r in enumerate(asyncio.run(go())):
        assert r.choices[0].text == reference(model, prompt=f"Item {i}:", max_tokens=5, seed=i).text


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, param, words", [
    (dict(prompt="x", max_tokens=600), "max_tokens", "maximum context length is 512"),
    (dict(prompt="x", temperature=-1), "temperature", "greater than or equal to 0"),
    (dict(prompt="x", logprobs=21), "logprobs", "less than or equal to 20"),
    (dict(prompt="x", extra_body={"top_kk": 3}), "top_kk", "Unrecognized request argument"),
    (dict(prompt="x", n=0), "n", "greater than or equal to 1"),
    (dict(prompt=[[1, 2], [3, 10 ** 6]]), "prompt", "outside the vocabulary"),
    (dict(prompt="x", stream_options={"include_usage": True}), None, "only allowed with stream"),
    (dict(prompt="x", frequency_penalty=0.5), "frequency_penalty", "not supported"),
])
def test_bad_completion_requests_are_400_with_the_field(client, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-chat-f32.gguf", **{"max_tokens": 4, **kwargs})
    err = e.value.body
    assert words in err["message"], err
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_prompt_beyond_the_context_reports_its_length_and_the_context(client, model):
    ids = model.tokenize("word " * 600)[:520]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-chat-f32.gguf", prompt=ids, max_tokens=1)
    assert (e.value.body["n_prompt_tokens"], e.value.body["n_ctx"], e.value.body["code"]) == \
        (520, 512, "context_length_exceeded")


def test_bad_chat_requests(client):
    for kwargs, words in [(dict(messages=[]), "at least 1"),
                          (dict(messages=[{"role": "robot", "content": "hi"}]), "role must be one of"),
                          (dict(messages=[{"role": "user", "content": "hi"}], top_logprobs=3), "needs logprobs"),
                          (dict(messages=[{"role": "user", "content": "hi"}], max_completion_tokens=0),
                           "greater than or equal to 1")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny-chat-f32.gguf", **kwargs)
        assert words in e.value.body["message"], (kwargs, e.value.body)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-9", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_api_key_is_required_when_set(model):
    with serve_model(model, parallel=1, api_key="sk-right") as u:
        bad = openai.OpenAI(base_url=u + "/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.completions.create(model="tiny-chat-f32.gguf", prompt="x", max_tokens=1)
        assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=u + "/v1", api_key="sk-right", max_retries=0)
        assert good.completions.create(model="tiny-chat-f32.gguf", prompt="x", max_tokens=1).choices
        import httpx
        assert httpx.get(u + "/health").status_code == 200          # health needs no key
