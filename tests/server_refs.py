"""What a server response must equal: Model.generate(..., details=True) of the same request
alone, with the server's defaults (OpenAI's) for the fields the request leaves out."""

from __future__ import annotations

SERVER_DEFAULTS = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0)


def reference(model, *, seed, max_tokens, top_logprobs=None, prompt_logprobs=False, **fields):
    """fields: prompt= or messages=, and any sampling field the request sets."""
    kw = {**SERVER_DEFAULTS, **fields}
    return model.generate(max_tokens=max_tokens, seed=seed, details=True, top_logprobs=top_logprobs,
                          prompt_logprobs=prompt_logprobs, **kw)


def token_key(i: int) -> str:
    return f"token_id:{i}"


def ids_of(keys) -> list[int]:
    """Token ids from return_tokens_as_token_ids keys."""
    out = []
    for k in keys:
        assert k.startswith("token_id:"), k
        out.append(int(k[len("token_id:"):]))
    return out


def generated_with_eog(want):
    """(ids, logprobs) of the generated tokens as the completions API lists them: the
    end-of-generation token that stopped the request is the last one."""
    ids = list(want.token_ids) + ([want.eog.token_id] if want.eog is not None else [])
    lps = [t.logprob for t in want.logprobs] + ([want.eog.logprob] if want.eog is not None else [])
    return ids, lps


def legacy_top(tl) -> dict:
    """The top_logprobs dict a TokenLogprob gives (token_id keys; the chosen token included)."""
    d = {token_key(i): v for i, v in (tl.top or ())}
    d.setdefault(token_key(tl.token_id), tl.logprob)
    return d
