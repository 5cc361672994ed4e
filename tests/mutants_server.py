"""Bugs in the server that its tests must catch (tests/test_mutants.py)."""

from __future__ import annotations

import contextlib

from test_mutants import Mutant

import refinfer.server.app as app


@contextlib.contextmanager
def tiny_client(request):
    import openai

    import refinfer
    from server_harness import serve_model
    model = refinfer.load(request.getfixturevalue("tiny_chat_gguf"), backend="numba")
    with serve_model(model, parallel=4) as u:
        c = openai.OpenAI(base_url=u + "/v1", api_key="none", max_retries=0, timeout=60)
        yield c, model
        c.close()


def check_batch_and_n(request):
    from test_server_openai import check_batch_and_n as check
    with tiny_client(request) as (c, model):
        check(c, model)


def check_echo(request):
    from test_server_openai import check_echo as check
    with tiny_client(request) as (c, model):
        check(c, model)


def check_eog(request):
    import refinfer
    from test_server_openai import check_eog_listed
    check_eog_listed(refinfer.load(request.getfixturevalue("tiny_chat_eog_gguf"), backend="numba"))


def _usage_n_times(monkeypatch):
    real = app.usage
    monkeypatch.setattr(app, "usage", lambda specs, results, n: real(specs, results, 1))


def _offsets_off_by_one(monkeypatch):
    real = app.legacy_logprobs
    monkeypatch.setattr(app, "legacy_logprobs", lambda pieces, entries, offset: real(pieces, entries, offset + 1))


MUTANTS = [
    Mutant("server_n_samples_share_one_seed", lambda mp: mp.setattr(app, "choice_seed", lambda seed, j: seed),
           check_batch_and_n),
    Mutant("server_prompt_tokens_counted_n_times", _usage_n_times, check_batch_and_n),
    Mutant("server_text_offset_off_by_one", _offsets_off_by_one, check_echo),
    Mutant("server_drops_the_end_of_generation_token",
           lambda mp: mp.setattr(app, "completion_entries", lambda r: app.entries_of(r.logprobs)), check_eog),
]
