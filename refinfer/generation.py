"""Per-request generation: the code that Model.generate's serial loop and the Engine share.

A request is checked once (check_fields, then Model.prepare_request tokenizes it and fits it
into the context: a Request). A Decoder then turns each logits row that predicts the request's
next token into that token, its logprob and the new text, and says when the request is done.
The serial loop and the engine feed the same Decoder the rows of the same forward pass, so that
a forward that gives a sequence the same logits in a batch as alone gives it the same tokens,
logprobs, text and finish reason.

    row -> token     Sampler(cfg)(row, history, i) with i the index of the generated token
                     (0, 1, 2, ...): its random draw depends on (seed, i) alone (sampling.py),
                     never on the batch, the chunking of the prompt or a preemption
    row -> logprob   float64 log-softmax of the raw float32 row: the model's distribution,
                     before the penalty, top-k/p, min-p and temperature (vLLM's "raw_logprobs");
                     the chosen token's always, the top_logprobs best on request
    finish           "stop"       an end-of-generation token (not part of the output) or a stop
                                  string (the text is cut before it; its tokens stay in token_ids)
                     "length"     max_tokens generated, or the context is full
                     "cancelled"  Engine: the request was cancelled
                     "error"      Engine: the request was refused, or its step failed

Text comes out as pieces that are never taken back: a trailing incomplete UTF-8 sequence waits
for the bytes that complete it (complete_text), and the last len(longest stop string) - 1
characters wait until no stop string can start in them. The pieces of a request join to its
text.

Context (llama.cpp's rule): a prompt that leaves no room for a generated token is an error; a
prompt that fits while prompt + max_tokens does not generates up to the context and finishes
"length".
"""

from __future__ import annotations

import codecs
import operator
from dataclasses import dataclass, field

import numpy as np

from .errors import RefinferError
from .sampling import SamplerConfig, best

FINISH_REASONS = ("stop", "length", "cancelled", "error")
MAX_TOP_LOGPROBS = 20      # the OpenAI API's and vLLM's default max_logprobs
CHAT_ROLES = ("system", "user", "assistant", "tool")

# The keyword names of Model.generate that describe a request, with its defaults: what
# Engine.submit and generate_many's dicts accept.
REQUEST_DEFAULTS = dict(prompt=None, messages=None, max_tokens=128, temperature=0.8, top_k=40, top_p=0.95,
                        min_p=0.05, repeat_penalty=1.0, repeat_last_n=64, seed=None, stop=(), chat=False,
                        add_special=True, top_logprobs=None, prompt_logprobs=False)


# ---------------------------------------------------------------------------------------------
# Results

@dataclass
class TokenLogprob:
    token_id: int
    logprob: float                              # natural log of the model's probability of token_id
    top: list[tuple[int, float]] | None = None  # the top_logprobs most likely (id, logprob), best first, ties by id


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_prompt_tokens: int = 0     # prompt positions taken from the prefix cache (first admission)
    queue_s: float = 0.0              # submission -> first scheduled step
    ttft_s: float | None = None       # submission -> first generated token
    prefill_s: float = 0.0            # first scheduled step -> first generated token
    decode_s: float = 0.0             # first generated token -> finish
    token_times: list[float] = field(default_factory=list)  # seconds after submission of each generated token
    preemptions: int = 0              # times the engine freed this request's blocks to recompute it later


@dataclass
class GenerationResult:
    token_ids: list[int]                       # generated tokens (an end-of-generation token is not one)
    text: str
    finish_reason: str                         # one of FINISH_REASONS
    logprobs: list[TokenLogprob]               # one per generated token
    prompt_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None   # with prompt_logprobs=True: None for position 0
    error: str | None = None                   # finish_reason "error": the message, and its hint
    error_hint: str | None = None
    seed: int | None = None                    # the seed the request drew with (a random one is reported here)
    stats: RequestStats = field(default_factory=RequestStats)
    eog: TokenLogprob | None = None            # finish "stop" at an end-of-generation token: that token and its
                                               # logprob (an OpenAI server reports it; lm-eval scores it)


def error_result(err: RefinferError, stats: RequestStats | None = None) -> GenerationResult:
    return GenerationResult([], "", "error", [], error=str(err), error_hint=getattr(err, "hint", None),
                            stats=stats or RequestStats())


@dataclass
class Event:
    """One step of a request as it streams: its generated token (None when the step generated
    none: an end-of-generation token, max_tokens 0, a cancellation), the text piece it released
    (may be ""), the token's logprob, and the finish reason on the request's last event; on
    a finish at an end-of-generation token, that token and its logprob (eog)."""
    token_id: int | None
    text: str
    logprob: TokenLogprob | None
    finish_reason: str | None = None
    eog: TokenLogprob | None = None


# ---------------------------------------------------------------------------------------------
# Requests

@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int              # already fitted into the context
    sampler: SamplerConfig       # checked, seed resolved
    stop: list[str]
    top_logprobs: int | None
    prompt_logprobs: bool

    @property
    def seed(self) -> int:
        return self.sampler.seed

    @property
    def positions(self) -> int:
        """KV positions the request writes at most: the prompt and every generated token but the
        last, which is never fed back."""
        return len(self.prompt_ids) + max(self.max_tokens - 1, 0)


def _bad(name, value, expected, hint):
    raise RefinferError(f"request field {name!r} must be {expected}, got {value!r}", hint=hint)


def _flag(fields, name):
    if not isinstance(fields[name], (bool, np.bool_)):
        _bad(name, fields[name], "true or false", f"pass {name}=True or {name}=False")
    return bool(fields[name])


def check_fields(fields: dict) -> dict:
    """The fields of one request (Model.generate's keyword names), every one checked that can be
    without the model, with REQUEST_DEFAULTS for the missing ones. The sampling numbers are
    SamplerConfig's to check (Model.prepare_request); RefinferError names the field."""
    if not isinstance(fields, dict):
        raise RefinferError(f"a request is a dict of Model.generate's keyword arguments, got {type(fields).__name__}",
                            hint='e.g. {"prompt": "Once upon a time", "max_tokens": 32}')
    unknown = [k for k in fields if k not in REQUEST_DEFAULTS]
    if unknown:
        raise RefinferError(f"unknown request field {unknown[0]!r}",
                            hint=f"a request's fields are {', '.join(REQUEST_DEFAULTS)}")
    f = {**REQUEST_DEFAULTS, **fields}

    if (f["prompt"] is None) == (f["messages"] is None):
        raise RefinferError("a request needs exactly one of 'prompt' and 'messages'"
                            + (", got both" if f["prompt"] is not None else ", got neither"),
                            hint='give prompt="text" (or a list of token ids), or messages=[{"role": "user", "content": "..."}]')
    p = f["prompt"]
    if p is not None and not isinstance(p, str):
        if isinstance(p, (bytes, dict)) or not hasattr(p, "__len__"):
            _bad("prompt", p, "a string or a list of token ids", 'give the prompt as text, or as model.tokenize("...")')
        for i, t in enumerate(p):
            try:
                ok = not isinstance(t, (bool, np.bool_)) and operator.index(t) is not None
            except TypeError:
                ok = False
            if not ok:
                _bad(f"prompt[{i}]", t, "an integer token id", "token ids come from the model's tokenizer (Model.tokenize)")
    m = f["messages"]
    if m is not None:
        if isinstance(m, (str, dict)) or not isinstance(m, (list, tuple)) or not m:
            _bad("messages", m, "a non-empty list of {'role': ..., 'content': ...} dicts",
                 'e.g. messages=[{"role": "user", "content": "Hello"}]')
        for i, msg in enumerate(m):
            if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) or msg.get("role") not in CHAT_ROLES:
                _bad(f"messages[{i}]", msg, f"a dict with 'role' one of {', '.join(CHAT_ROLES)} and 'content' a string",
                     'e.g. {"role": "user", "content": "Hello"}')

    stop = f["stop"]
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        _bad("stop", stop, "a string or a list of strings", 'e.g. stop=["\\n\\n", "User:"]')
    f["stop"] = [s for s in stop if s]

    n = f["top_logprobs"]
    if n is not None and (isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer))
                          or not 0 <= n <= MAX_TOP_LOGPROBS):
        _bad("top_logprobs", n, f"None or an integer in 0..{MAX_TOP_LOGPROBS}",
             f"top_logprobs=N returns the N most likely tokens at each step (at most {MAX_TOP_LOGPROBS})")
    f["top_logprobs"] = None if n is None else int(n)
    for name in ("chat", "add_special", "prompt_logprobs"):
        f[name] = _flag(f, name)
    return f


# ---------------------------------------------------------------------------------------------
# Decoding

def complete_text(data: bytes) -> str:
    """The text of data up to a trailing incomplete UTF-8 sequence, which is left out: the
    bytes of a character that the next tokens would complete (or that max_tokens cut off).
    Invalid bytes elsewhere still decode to U+FFFD, as in a plain decode with errors="replace"."""
    return codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=False)


def log_normalizer(z: np.ndarray) -> float:
    """log(sum(exp(z))) of a float64 row, the max subtracted first: log_softmax(z) = z - this."""
    m = z.max()
    return m + np.log(np.sum(np.exp(z - m)))


def log_softmax(row) -> np.ndarray:
    """float64[vocab] log-probabilities of a raw logits row."""
    z = np.asarray(row, dtype=np.float64)
    return z - log_normalizer(z)


def token_logprob(row, token_id: int, top_n: int | None) -> TokenLogprob:
    """The chosen token's logprob (the vocabulary-sized log_softmax only when top_n asks for
    alternatives; the same value either way: z[token] minus the same normalizer)."""
    z = np.asarray(row, dtype=np.float64)
    c = log_normalizer(z)
    top = None
    if top_n:
        lp = z - c
        top = [(int(i), float(lp[i])) for i in best(lp, min(top_n, len(lp)))]
    elif top_n == 0:
        top = []
    return TokenLogprob(int(token_id), float(z[token_id] - c), top)


class Decoder:
    """One request's generation: feed it, in order, the logits row that predicts each next token
    (step); it keeps the history the sampler penalizes, the tokens, logprobs and text."""

    def __init__(self, request: Request, tokenizer, sampler):
        self.request, self.tok, self.sample = request, tokenizer, sampler
        self.history = list(request.prompt_ids)          # what the repetition penalty sees
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs = [None] if request.prompt_logprobs else None
        self.hold = max((len(s) for s in request.stop), default=1) - 1   # a stop string may start in the last `hold` chars
        self.text = ""
        self.emitted = 0                                 # characters of text already released
        self.finish_reason: str | None = None
        self.eog: TokenLogprob | None = None
        self.error: RefinferError | None = None
        self.stats = RequestStats(prompt_tokens=len(request.prompt_ids))

    @property
    def prompt_rows_done(self) -> int:
        """Prompt positions whose predicting row has been given (all, without prompt logprobs)."""
        if self.prompt_logprobs is None:
            return len(self.request.prompt_ids)
        return len(self.prompt_logprobs)

    def add_prompt_rows(self, position: int, rows):
        """rows[j] predicts prompt token position + j (positions 1 .. len(prompt) - 1, in order)."""
        if position != len(self.prompt_logprobs) or position + len(rows) > len(self.request.prompt_ids):
            raise AssertionError(f"prompt rows for positions {position}.. after {len(self.prompt_logprobs)} of "
                                 f"{len(self.request.prompt_ids)}")
        for j, row in enumerate(rows):
            tok = self.request.prompt_ids[position + j]
            self.prompt_logprobs.append(token_logprob(row, tok, self.request.top_logprobs))

    def step(self, row) -> Event:
        """row predicts generated token i = len(token_ids): sample it and see whether it ends the request."""
        if self.finish_reason is not None:
            raise AssertionError(f"step after finish ({self.finish_reason})")
        req = self.request
        i = len(self.token_ids)
        if i >= req.max_tokens:                          # max_tokens 0: the prompt alone
            return self._finish("length")
        tok = self.sample(row, self.history, i)          # its draw depends on (seed, i) only
        if self.tok.is_eog(tok):
            self.eog = token_logprob(row, tok, req.top_logprobs)
            ev = self._finish("stop")
            ev.eog = self.eog
            return ev
        lp = token_logprob(row, tok, req.top_logprobs)
        self.history.append(tok)
        self.token_ids.append(tok)
        self.logprobs.append(lp)
        text = complete_text(self.tok.decode_bytes(self.token_ids))
        cut = min((text.find(s) for s in req.stop if s in text), default=-1)
        if cut >= 0:
            self.text = text[:cut]
            return self._finish("stop", tok, lp)
        self.text = text
        if len(self.token_ids) == req.max_tokens:
            return self._finish("length", tok, lp)
        piece = ""
        safe = len(text) - self.hold
        if safe > self.emitted:
            piece, self.emitted = text[self.emitted:safe], safe
        return Event(tok, piece, lp)

    def _finish(self, reason, tok=None, lp=None) -> Event:
        self.finish_reason = reason
        piece, self.emitted = self.text[self.emitted:], max(self.emitted, len(self.text))
        return Event(tok, piece, lp, reason)

    def cancel(self) -> Event:
        return self._finish("cancelled")

    def fail(self, err: RefinferError) -> Event:
        self.error = err
        return self._finish("error")

    def result(self) -> GenerationResult:
        self.stats.generated_tokens = len(self.token_ids)
        err = self.error
        return GenerationResult(list(self.token_ids), self.text, self.finish_reason, list(self.logprobs),
                                list(self.request.prompt_ids),
                                None if self.prompt_logprobs is None else list(self.prompt_logprobs),
                                error=None if err is None else str(err), error_hint=getattr(err, "hint", None),
                                seed=self.request.seed, stats=self.stats, eog=self.eog)
