"""Model.generate as the reference for one request alone (refinfer/generation.py): the details
result, logprobs and prompt logprobs against teacher-forced logits, chat messages, the finish
reasons, stop strings and context limits, and every request field's error."""

from __future__ import annotations

import math

import numpy as np
import pytest

import refinfer
from refinfer.errors import RefinferError
from refinfer.generation import MAX_TOP_LOGPROBS, GenerationResult, log_softmax

BACKENDS = ("numpy", "numba")
PROMPT = "The meaning of life is"
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module", params=BACKENDS)
def model(request, tiny_llama_f32):
    return refinfer.load(tiny_llama_f32, backend=request.param)


def exact_log_softmax(row, i):
    """log p_i by math.fsum over exact float64 terms: independent of log_softmax's summation."""
    z = [float(v) for v in row]
    m = max(z)
    return z[i] - m - math.log(math.fsum(math.exp(v - m) for v in z))


def test_details_result_matches_text_stream_and_teacher_forced_logits(model):
    kw = dict(max_tokens=10, temperature=0.9, seed=5, top_logprobs=3)
    r = model.generate(PROMPT, details=True, **kw)
    assert isinstance(r, GenerationResult) and r.finish_reason == "length" and len(r.token_ids) == 10
    assert r.seed == 5 and r.prompt_token_ids == model.tokenize(PROMPT)
    assert model.generate(PROMPT, **kw) == r.text == model.detokenize(r.token_ids)
    events = list(model.generate(PROMPT, details=True, stream=True, **kw))
    assert [e.token_id for e in events] == r.token_ids and "".join(e.text for e in events) == r.text
    assert [e.logprob for e in events] == r.logprobs and events[-1].finish_reason == "length"
    assert [e.finish_reason for e in events[:-1]] == [None] * 9

    # teacher-forced: Model.logits of prompt + generated gives the same rows bit for bit, so
    # the same logprobs; and those are the float64 log-softmax of the rows
    ids = r.prompt_token_ids
    rows = model.logits(ids + r.token_ids)[len(ids) - 1:-1]
    for row, tok, lp in zip(rows, r.token_ids, r.logprobs):
        assert lp.token_id == tok and lp.logprob == float(log_softmax(row)[tok])
        assert abs(lp.logprob - exact_log_softmax(row, tok)) < 1e-12   # measured: <= 2e-15
        want = np.argsort(-row.astype(np.float64), kind="stable")[:3]
        assert [t for t, _ in lp.top] == [int(t) for t in want]
        assert [v for _, v in lp.top] == [float(log_softmax(row)[t]) for t in want]


def test_greedy_tokens_are_the_argmax_of_teacher_forced_logits(model):
    r = model.generate(PROMPT, max_tokens=12, temperature=0, details=True)
    ids = r.prompt_token_ids
    rows = model.logits(ids + r.token_ids)[len(ids) - 1:-1]
    assert r.token_ids == [int(np.argmax(row)) for row in rows]
    assert all(lp.top is None for lp in r.logprobs)


def test_prompt_logprobs_are_the_teacher_forced_rows(model):
    r = model.generate(PROMPT, max_tokens=3, temperature=0, details=True, prompt_logprobs=True, top_logprobs=2)
    ids = r.prompt_token_ids
    rows = model.logits(ids)
    assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == len(ids)
    for p in range(1, len(ids)):
        e = r.prompt_logprobs[p]
        assert e.token_id == ids[p] and e.logprob == float(log_softmax(rows[p - 1])[ids[p]]) and len(e.top) == 2
    # the generated tokens are unchanged by asking for the prompt's
    assert r.token_ids == model.generate(PROMPT, max_tokens=3, temperature=0, details=True).token_ids


def test_max_tokens_zero_reads_the_prompt_only(model):
    r = model.generate(PROMPT, max_tokens=0, details=True, prompt_logprobs=True)
    assert (r.token_ids, r.text, r.finish_reason, r.logprobs) == ([], "", "length", [])
    assert len(r.prompt_logprobs) == len(r.prompt_token_ids)


def test_messages_go_through_the_chat_template(model, monkeypatch):
    monkeypatch.setattr(model.tokenizer, "chat_template", TEMPLATE)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Tell me"}]
    r = model.generate(messages=messages, max_tokens=5, temperature=0, details=True)
    text = "<s>system: Be brief.\n<s>user: Hello\n<s>assistant: Hi.\n<s>user: Tell me\nassistant:"
    assert r.prompt_token_ids == model.tokenize(text, parse_special=True)
    assert r.token_ids == model.generate(r.prompt_token_ids, max_tokens=5, temperature=0, details=True).token_ids
    # chat=True wraps a prompt as one user turn
    one = model.generate("Hello", chat=True, max_tokens=1, temperature=0, details=True)
    assert one.prompt_token_ids == model.tokenize("<s>user: Hello\nassistant:", parse_special=True)


class Scripted:
    """A sampler that returns the given ids in order (patched in as refinfer.model.Sampler)."""
    script: list = []

    def __init__(self, cfg):
        self.ids = iter(type(self).script)

    def __call__(self, logits, history, i):
        return next(self.ids)


def test_end_of_generation_token_stops_and_is_not_output(model, monkeypatch):
    monkeypatch.setattr("refinfer.model.Sampler", Scripted)
    a = model.tokenize("A", add_special=False)[0]
    Scripted.script = [a, a, model.tokenizer.eos_id, a]
    r = model.generate("Hi", max_tokens=10, details=True)
    assert r.token_ids == [a, a] and r.finish_reason == "stop" and len(r.logprobs) == 2
    assert r.text == model.detokenize([a, a])


def test_stop_strings_cut_the_text_and_no_piece_is_taken_back(model):
    full = model.generate(PROMPT, max_tokens=24, temperature=0, details=True)
    assert len(full.text) > 12
    for cut in (1, 5, len(full.text) // 2):
        for length in (1, 3):
            stop = full.text[cut:cut + length]
            first = full.text.index(stop)
            r = model.generate(PROMPT, max_tokens=24, temperature=0, details=True, stop=["zzzzzz", stop])
            assert r.finish_reason == "stop" and r.text == full.text[:first]
            assert r.token_ids == full.token_ids[:len(r.token_ids)]
            assert r.text in model.detokenize(r.token_ids)        # its tokens stay, the text is cut
            pieces = list(model.generate(PROMPT, max_tokens=24, temperature=0, stream=True, stop=["zzzzzz", stop]))
            assert "".join(pieces) == r.text and all(stop not in p for p in pieces)


def test_a_prompt_near_the_context_generates_up_to_it(model):
    n_ctx = model.config.max_seq_len
    ids = [int(t) for t in np.random.default_rng(0).integers(3, 1000, n_ctx - 3)]
    r = model.generate(ids, max_tokens=10, temperature=0, details=True)
    assert len(r.token_ids) == 3 and r.finish_reason == "length"
    with pytest.raises(RefinferError, match=f"the prompt is {n_ctx} tokens long and the context length is {n_ctx}"):
        model.generate(ids + [5, 6, 7], max_tokens=1)


@pytest.mark.parametrize("fields,fragment", [
    (dict(), "exactly one of 'prompt' and 'messages', got neither"),
    (dict(prompt="hi", messages=[{"role": "user", "content": "x"}]), "got both"),
    (dict(prompt="hi", stream_options=1), "unknown request field 'stream_options'"),
    (dict(prompt=[1, "a"]), "'prompt[1]' must be an integer token id"),
    (dict(prompt=[1, 10 ** 7]), "prompt token 1 is id 10000000, outside the vocabulary"),
    (dict(prompt=""), "the prompt is empty"),
    (dict(messages=[]), "'messages' must be a non-empty list"),
    (dict(messages=[{"role": "robot", "content": "x"}]), "'messages[0]' must be a dict with 'role'"),
    (dict(prompt="hi", max_tokens=-1), "max_tokens must be an integer >= 0, got -1"),
    (dict(prompt="hi", max_tokens=2.5), "max_tokens must be an integer >= 0, got 2.5"),
    (dict(prompt="hi", temperature=-1), "temperature (--temp) must be a number >= 0"),
    (dict(prompt="hi", top_p=0), "top_p (--top-p) must be in (0, 1]"),
    (dict(prompt="hi", seed=2 ** 64), "seed (--seed) must be an integer >= 0 and < 2**64"),
    (dict(prompt="hi", stop=[1]), "'stop' must be a string or a list of strings"),
    (dict(prompt="hi", top_logprobs=MAX_TOP_LOGPROBS + 1), f"'top_logprobs' must be None or an integer in 0..{MAX_TOP_LOGPROBS}"),
    (dict(prompt="hi", top_logprobs=True), "'top_logprobs' must be None or an integer"),
    (dict(prompt="hi", prompt_logprobs="yes"), "'prompt_logprobs' must be true or false"),
])
def test_bad_request_fields_are_named(model, fields, fragment):
    with pytest.raises(RefinferError) as e:
        model.prepare_request(**fields)
    assert fragment in str(e.value) and e.value.hint
    if "stream_options" not in fields:                # Model.generate names the same field
        with pytest.raises(RefinferError, match=None) as e2:
            model.generate(**{"prompt": None, **fields})
        assert fragment in str(e2.value)


def test_a_random_seed_is_reported_and_repeats(model):
    r = model.generate(PROMPT, max_tokens=8, temperature=1.5, details=True)
    assert 0 <= r.seed < 2 ** 32
    assert model.generate(PROMPT, max_tokens=8, temperature=1.5, seed=r.seed, details=True).token_ids == r.token_ids
