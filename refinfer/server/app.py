"""The OpenAI-compatible server: FastAPI routes over one refinfer.Engine.

    app = create_app(model, parallel=16)      # or create_app(loader=lambda: refinfer.load(...))
    uvicorn.run(app, host="127.0.0.1", port=8080)

Every request is checked, tokenized and fitted into the context before anything is sent back:
an error is an HTTP 4xx with an OpenAI error object, also for a streaming request. A request's
prompts x n choices become that many Engine requests; choice (prompt i, sample j) is prompt i
with seed (seed + j) mod 2**64, so that n = k equals k separate requests, and its tokens and
logprobs are what Model.generate gives that request alone (the engine's guarantee).

Threads. The engine steps in its own thread (Engine.start); its listener hands each Event to
the event loop with call_soon_threadsafe, so the loop never waits on compute. Tokenizing a
prompt runs in a worker thread, and the numba kernels release the GIL, so /health, new
requests and other streams are answered during a long prefill. Engine.stats() (it waits for
the step in progress) runs in a worker thread as well.

Cancellation. A client that disconnects (a stream closed, a non-streaming request given up)
cancels its choices: the engine frees their KV blocks before its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import pathlib
import secrets
import threading
import time

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import RefinferError
from .metrics import ServerMetrics
from .protocol import (MAX_CHOICES, ApiError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                       LlamaCompletionRequest, TokenizeRequest)

STATIC = pathlib.Path(__file__).parent / "static"
SSE_PING_S = 15.0            # a comment line after this many seconds without an event (a long prefill)
RETRY_AFTER_S = 1


# ---------------------------------------------------------------------------------------------
# State


@dataclasses.dataclass
class ServerConfig:
    parallel: int = 4                 # the engine's max_batch
    max_queue: int = 64               # choices waiting beyond the running batch; more: 503
    api_key: str | None = None
    model_alias: str | None = None
    kv_cache_mib: float | None = None
    kv_cache_tokens: int | None = None
    ctx: int | None = None            # context length served (at most the model's)
    max_tokens_per_step: int = 512
    sse_ping_s: float = SSE_PING_S


class ServerState:
    """The model and engine once loaded (the loading thread sets them), and the counters."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.model = self.engine = None
        self.name = cfg.model_alias
        self.fingerprint = None
        self.load_error: str | None = None
        self.metrics = ServerMetrics()
        self.live = 0                   # choices admitted and not finished
        self.tasks: set = set()         # Run._drain tasks (a strong reference each)
        self.ready = threading.Event()     # the model is loaded and the engine runs
        self.loaded = threading.Event()    # loading ended, well (ready) or not (load_error)

    def install(self, model, warmup=False):
        """Serve model; warmup: generate two tokens first, so that the backend's kernels are
        compiled (or loaded from numba's cache) before /health says ready."""
        from ..engine import Engine
        cfg = self.cfg
        if cfg.ctx is not None:
            n = model.config.max_seq_len
            if cfg.ctx > n:
                raise RefinferError(f"--ctx {cfg.ctx} is larger than the model's context length {n}",
                                    hint=f"give --ctx {n} or less")
            model.config = dataclasses.replace(model.config, max_seq_len=cfg.ctx)
        self.fingerprint = fingerprint(model)
        if warmup:
            model.generate([0], max_tokens=2, temperature=0)
        self.engine = Engine(model, max_batch=cfg.parallel, max_tokens_per_step=cfg.max_tokens_per_step,
                             kv_cache_mib=cfg.kv_cache_mib, kv_cache_tokens=cfg.kv_cache_tokens).start()
        self.name = cfg.model_alias or model_name(model)
        self.model = model
        self.ready.set()

    def need_ready(self):
        if self.model is None:
            if self.load_error:
                raise ApiError(503, f"the model failed to load: {self.load_error}", "unavailable_error", code=503)
            raise ApiError(503, "Loading model", "unavailable_error", code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        return self.model


def model_name(model) -> str:
    return pathlib.Path(str(model.path)).name if model.path is not None else "refinfer-model"


def fingerprint(model) -> str:
    """refinfer-VERSION-MODE-BACKEND-MODELHASH: two servers whose fingerprints are equal must
    give equal answers (the model hash is the sha256 of the weights files, first 12 digits)."""
    h = hashlib.sha256()
    p = pathlib.Path(str(model.path)) if model.path is not None else None
    files = [] if p is None else sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".json", ".model")) \
        if p.is_dir() else [p]
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    extra = "".join(f"-{k}" for k, on in (("exact", getattr(model.backend, "dequant", "deployed") == "exact"),
                                          ("a16", getattr(model.backend, "a16", False))) if on)
    return f"refinfer-{__version__}-{model.mode}-{model.backend.name}{extra}{kv_fingerprint(model)}-{h.hexdigest()[:12]}"


def kv_fingerprint(model) -> str:
    """The KV cache's part of the fingerprint: "" for the mode's default cache, else -kvK.V, then
    -fa (flash attention), -norot (llama.cpp's rotation off) and the calibrated parameters' hash."""
    from ..kv_cache import attn_rotation
    be = model.backend
    if be.kv_cache_types is None:
        return ""
    k, v = be.kv_cache_types
    default = ("f16", "f16") if be.mode == "ggml" else ("f32", "f32")
    out = "" if (k.name, v.name) == default else f"-kv{k.name}.{v.name}"
    out += "-fa" if be.flash_attn else ""
    out += "-norot" if not be.kv_rotation and any(attn_rotation(k, v, model.config.head_dim)) else ""
    params = [t.params.data for t in (k, v) if getattr(t, "params", None) is not None]
    if params:
        out += "-" + hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    return out


# ---------------------------------------------------------------------------------------------
# Choices: one Engine request each, their Events gathered on the event loop


@dataclasses.dataclass
class ChoiceSpec:
    index: int
    prompt_index: int
    prompt_ids: list[int]
    prompt_text: str
    fields: dict                       # Model.generate's keyword names (prompt = prompt_ids)


class Run:
    """The choices of one HTTP request in the engine; their Events arrive in self.queue as
    (choice index, Event), in each choice's order."""

    def __init__(self, st: ServerState, specs: list[ChoiceSpec]):
        self.st, self.specs = st, specs
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handles = []
        self.results = [None] * len(specs)
        self.t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        cfg = st.cfg
        if st.live + len(specs) > cfg.parallel + cfg.max_queue:
            st.metrics.rejected += 1
            raise ApiError(503, f"the server is busy: {st.live} sequences are running or queued "
                                f"(--parallel {cfg.parallel} + --max-queue {cfg.max_queue})",
                           "unavailable_error", code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        try:
            for sp in specs:
                def listener(ev, i=sp.index):
                    with contextlib.suppress(RuntimeError):           # the loop is closing
                        loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev))
                self.handles.append(st.engine.submit(listener=listener, **sp.fields))
        except RefinferError as e:
            self.cancel()
            raise ApiError(400, str(e)) from None
        st.live += len(specs)
        self._open = len(specs)

    async def events(self):
        """(index, Event) until every choice has finished."""
        while self._open:
            i, ev = await self.queue.get()
            if ev.finish_reason is not None:
                self._finish(i)
            yield i, ev

    def _finish(self, i):
        h = self.handles[i]
        self.results[i] = r = h.result(timeout=0)
        self._open -= 1
        self.st.live -= 1
        self.st.metrics.finished(r, time.perf_counter() - self.t0)

    def cancel(self):
        """Cancel what is not finished (a disconnect, an error, a refused submit)."""
        for i, h in enumerate(self.handles):
            if self.results[i] is None:
                h.cancel()

    async def wait(self, request: Request):
        """Every choice's result. A disconnect of the client cancels them (answered 499, which
        nobody reads); a choice whose engine step failed is a 500 (never a user's error)."""
        gone = asyncio.ensure_future(wait_disconnect(request))
        try:
            agen = self.events()
            while True:
                nxt = asyncio.ensure_future(agen.__anext__())
                done, _ = await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    raise ApiError(499, "the client closed the request", "client_closed_request", code=499)
                try:
                    nxt.result()
                except StopAsyncIteration:
                    check_finished(self.results)
                    return self.results
        finally:
            gone.cancel()
            self.close()

    def close(self):
        """Cancel the unfinished choices; their last Events (finish "cancelled", sent by the engine
        thread before its next step) are taken by a task, which accounts for them."""
        if self._open:
            self.cancel()
            task = asyncio.get_running_loop().create_task(self._drain())
            self.st.tasks.add(task)
            task.add_done_callback(self.st.tasks.discard)

    async def _drain(self):
        async for _ in self.events():
            pass


async def wait_disconnect(request: Request):
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


# ---------------------------------------------------------------------------------------------
# Formatting tokens


class Pieces:
    """Each token's own text and bytes, as the logprobs objects show them."""

    def __init__(self, tok, as_ids: bool):
        self.tok, self.as_ids = tok, as_ids

    def bytes(self, i: int) -> bytes:
        return self.tok.token_to_piece(i)

    def text(self, i: int) -> str:
        return self.tok.token_to_piece(i).decode("utf-8", "replace")

    def key(self, i: int) -> str:
        """The token as logprobs name it: its text, or token_id:N (vLLM's return_tokens_as_token_ids)."""
        return f"token_id:{i}" if self.as_ids else self.text(i)


def legacy_logprobs(pieces: Pieces, entries, offset: int) -> dict:
    """The completions API's logprobs {tokens, token_logprobs, top_logprobs, text_offset} of
    entries [(token_id, logprob or None, [(id, logprob)] or None)]; the chosen token is in its
    top_logprobs dict even when it is not among the best (vLLM: up to logprobs + 1 entries)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tid, lp, top in entries:
        out["tokens"].append(pieces.key(tid))
        out["token_logprobs"].append(lp)
        if lp is None:
            out["top_logprobs"].append(None)
        else:
            d = {}
            for i, v in top or ():
                d.setdefault(pieces.key(i), v)
            d.setdefault(pieces.key(tid), lp)
            out["top_logprobs"].append(d)
        out["text_offset"].append(offset)
        offset += len(pieces.text(tid))
    return out


def chat_logprob(pieces: Pieces, tl) -> dict:
    def one(i, v):
        return {"token": pieces.key(i), "logprob": v, "bytes": list(pieces.bytes(i))}
    return {**one(tl.token_id, tl.logprob), "top_logprobs": [one(i, v) for i, v in (tl.top or ())]}


def entries_of(logprobs) -> list:
    return [(t.token_id, t.logprob, t.top) for t in logprobs]


def completion_entries(r) -> list:
    """The generated tokens as the completions API lists them: the end-of-generation token that
    stopped the request last (lm-eval scores the one generated token, whatever it is)."""
    ent = entries_of(r.logprobs)
    if r.eog is not None:
        ent.append((r.eog.token_id, r.eog.logprob, r.eog.top))
    return ent


def choice_seed(seed: int, j: int) -> int:
    """Sample j of a prompt draws with seed + j (mod 2**64): n = k is k requests."""
    return (seed + j) % 2 ** 64


def usage(specs, results, n) -> dict:
    prompt = sum(len(s.prompt_ids) for s in specs if s.index % n == 0)
    cached = sum(r.stats.cached_prompt_tokens for s, r in zip(specs, results) if s.index % n == 0 and r is not None)
    completion = sum(len(r.token_ids) + (r.eog is not None) for r in results if r is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def check_finished(results):
    """A choice whose engine step failed is a server error (never a user's)."""
    for r in results:
        if r.finish_reason == "error":
            raise ApiError(500, f"generation failed: {r.error}", "server_error", code=500)


def sse(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def stream_error(r) -> str:
    """The event of a choice whose engine step failed, in the middle of a stream (vLLM's and
    llama-server's shape: the stream goes on with the other choices, then [DONE])."""
    return sse({"error": {"message": f"generation failed: {r.error}", "type": "server_error", "param": None,
                          "code": 500}})


# ---------------------------------------------------------------------------------------------
# The app


def create_app(model=None, *, loader=None, parallel=4, max_queue=64, api_key=None, model_alias=None,
               kv_cache_mib=None, kv_cache_tokens=None, ctx=None, max_tokens_per_step=512, sse_ping_s=SSE_PING_S):
    """The server's ASGI app over `model` (a loaded refinfer Model), or over the model that
    `loader()` returns, loaded in a thread after the server starts (/health answers 503 until
    then). The engine thread starts with the app and stops with it."""
    if (model is None) == (loader is None):
        raise RefinferError("create_app needs exactly one of model and loader", hint="create_app(refinfer.load(path))")
    cfg = ServerConfig(parallel, max_queue, api_key, model_alias, kv_cache_mib, kv_cache_tokens, ctx,
                       max_tokens_per_step, sse_ping_s)
    st = ServerState(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if model is not None:
            st.install(model)
            st.loaded.set()
        else:
            def load():
                try:
                    st.install(loader(), warmup=True)
                except RefinferError as e:
                    st.load_error = f"{e}" + (f" ({e.hint})" if getattr(e, "hint", None) else "")
                except Exception as e:  # noqa: BLE001  (reported by /health and every request)
                    st.load_error = f"{type(e).__name__}: {e}"
                finally:
                    st.loaded.set()
            threading.Thread(target=load, name="refinfer-load", daemon=True).start()
        yield
        if st.engine is not None:
            st.engine.stop()

    app = FastAPIOffline(title="refinfer", version=__version__, lifespan=lifespan,
                         description="An OpenAI-compatible server over refinfer's batch-invariant engine: every "
                                     "response equals the same request run alone (Model.generate).")
    app.state.refinfer = st
    install_error_handlers(app)

    def auth(request: Request):
        if cfg.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not secrets.compare_digest(got.encode(), f"Bearer {cfg.api_key}".encode()):
            raise ApiError(401, "Incorrect API key provided" if got else
                           "Missing API key: send the header 'Authorization: Bearer KEY'",
                           "authentication_error", code="invalid_api_key")

    def check_model_field(name):
        if name is not None and name not in (st.name, model_name(st.model)):
            raise ApiError(404, f"The model `{name}` does not exist (this server serves `{st.name}`)",
                           "not_found_error", "model", code="model_not_found")

    def base(kind: str) -> dict:
        return {"id": f"{kind}-{secrets.token_hex(12)}", "created": int(time.time()), "model": st.name,
                "system_fingerprint": st.fingerprint}

    # -- building the choices ---------------------------------------------------------------------

    async def prepare(prompts, fields, n, max_tokens, seed, what="prompt"):
        """ChoiceSpecs for prompts x n: tokenized (a worker thread), fitted into the context (400
        when prompt + max_tokens does not fit), seeds seed + j."""
        m = st.model
        if len(prompts) * n > MAX_CHOICES:
            raise ApiError(400, f"{len(prompts)} prompts x n {n} = {len(prompts) * n} choices; at most {MAX_CHOICES}",
                           param="n")

        def tokenize():
            out = []
            for p in prompts:
                if isinstance(p, dict):                    # chat: {"messages": [...]}
                    ids = m.prompt_ids(messages=p["messages"])
                    text = m.detokenize(ids)
                elif isinstance(p, str):
                    ids, text = m.prompt_ids(prompt=p), p
                else:
                    ids = m.prompt_ids(prompt=list(p))
                    text = m.detokenize(ids)
                out.append((ids, text))
            return out

        try:
            toks = await asyncio.to_thread(tokenize)
        except RefinferError as e:
            raise ApiError(400, str(e) + (f" ({e.hint})" if getattr(e, "hint", None) else ""), param=what) from None
        n_ctx = m.config.max_seq_len
        base_seed = secrets.randbits(32) if seed in (None, -1) else seed
        specs = []
        for pi, (ids, text) in enumerate(toks):
            room = n_ctx - len(ids)
            want = room if max_tokens is None else max_tokens
            if want > room or room < 1:
                raise ApiError(400, f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                                    f"{len(ids) + max(want, 1)} tokens ({len(ids)} in the prompt, {max(want, 1)} for the "
                                    "completion). Please reduce the prompt or the completion length.",
                               param="max_tokens" if room >= 1 else what, code="context_length_exceeded",
                               n_prompt_tokens=len(ids), n_ctx=n_ctx)
            for j in range(n):
                specs.append(ChoiceSpec(len(specs), pi, ids, text,
                                        {**fields, "prompt": ids, "max_tokens": want,
                                         "seed": choice_seed(base_seed, j)}))
        return specs

    # -- routes ----------------------------------------------------------------------------------

    @app.get("/health", tags=["server"])
    async def health():
        st.need_ready()
        return {"status": "ok"}

    app.add_api_route("/v1/health", health, methods=["GET"], include_in_schema=False)

    @app.get("/v1/models", tags=["openai"], dependencies=[Depends(auth)])
    async def models():
        m = st.need_ready()
        return {"object": "list", "data": [{
            "id": st.name, "object": "model", "created": int(time.time()), "owned_by": "refinfer",
            "max_model_len": m.config.max_seq_len,
            "meta": {"n_vocab": m.config.vocab_size, "n_ctx_train": m.config.max_seq_len, "mode": m.mode,
                     "backend": m.backend.name, "system_fingerprint": st.fingerprint}}]}

    @app.post("/v1/completions", tags=["openai"], dependencies=[Depends(auth)])
    async def completions(body: CompletionRequest, request: Request):
        m = st.need_ready()
        check_model_field(body.model)
        k = body.logprobs
        fields = {**body.sampling(), "top_logprobs": k, "prompt_logprobs": body.echo and k is not None}
        specs = await prepare(body.prompts(), fields, body.n, body.max_tokens, body.seed)
        pieces = Pieces(m.tokenizer, body.return_tokens_as_token_ids)
        head = {**base("cmpl"), "object": "text_completion"}

        def prompt_part(sp, prompt_lps):
            """echo: the prompt's text, and with logprobs its tokens' (the first has none)."""
            if not body.echo:
                return "", None
            if k is None:
                return sp.prompt_text, None
            ent = [(t, None, None) if lp is None else (t, lp.logprob, lp.top) for t, lp in zip(sp.prompt_ids, prompt_lps)]
            return sp.prompt_text, legacy_logprobs(pieces, ent, 0)

        run = Run(st, specs)
        if not body.stream:
            results = await run.wait(request)
            choices = []
            for sp, r in zip(specs, results):
                ptext, plp = prompt_part(sp, r.prompt_logprobs or [])
                lp = None
                if k is not None:
                    g = legacy_logprobs(pieces, completion_entries(r), len(ptext))
                    lp = g if plp is None else {key: plp[key] + g[key] for key in g}
                choices.append({"index": sp.index, "text": ptext + r.text, "logprobs": lp,
                                "finish_reason": r.finish_reason, "seed": r.seed})
            return {**head, "choices": choices, "usage": usage(specs, results, body.n)}

        include_usage = body.stream_options is not None and body.stream_options.include_usage

        async def stream():
            try:
                offsets = {}
                async for i, ev in run.events():
                    sp, chunks = specs[i], []
                    if i not in offsets:                   # the choice's first event
                        ptext, plp = prompt_part(sp, run.handles[i].prompt_logprobs or [])
                        offsets[i] = len(ptext)
                        if body.echo:
                            chunks.append((ptext, plp))
                    ent = [] if ev.token_id is None else [(ev.token_id, ev.logprob.logprob, ev.logprob.top)]
                    if ev.eog is not None:
                        ent.append((ev.eog.token_id, ev.eog.logprob, ev.eog.top))
                    if ev.finish_reason == "error":
                        yield stream_error(run.results[i])
                        continue
                    if ev.text or ent:
                        lp = legacy_logprobs(pieces, ent, offsets[i]) if k is not None else None
                        offsets[i] += len(ev.text)
                        chunks.append((ev.text, lp))
                    for n_, (text, lp) in enumerate(chunks):
                        last = ev.finish_reason is not None and n_ == len(chunks) - 1
                        fin = {"finish_reason": ev.finish_reason, "seed": sp.fields["seed"]} if last else \
                            {"finish_reason": None}
                        yield sse({**head, "choices": [{"index": i, "text": text, "logprobs": lp, **fin}], "usage": None})
                    if ev.finish_reason is not None and not chunks:
                        yield sse({**head, "choices": [{"index": i, "text": "", "logprobs": None,
                                                        "finish_reason": ev.finish_reason, "seed": sp.fields["seed"]}],
                                   "usage": None})
                if include_usage:
                    yield sse({**head, "choices": [], "usage": usage(specs, run.results, body.n)})
                yield "[DONE]"
            finally:
                run.close()

        return EventSourceResponse(stream(), sep="\n", ping=cfg.sse_ping_s)

    @app.post("/v1/chat/completions", tags=["openai"], dependencies=[Depends(auth)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        m = st.need_ready()
        check_model_field(body.model)
        messages = [msg.for_template() for msg in body.messages]
        top = (body.top_logprobs or 0) if body.logprobs else None
        fields = {**body.sampling(), "top_logprobs": top}
        specs = await prepare([{"messages": messages}], fields, body.n, body.max_new, body.seed, what="messages")
        pieces = Pieces(m.tokenizer, body.return_tokens_as_token_ids)
        head = {**base("chatcmpl"), "object": "chat.completion"}

        run = Run(st, specs)
        if not body.stream:
            results = await run.wait(request)
            choices = [{"index": sp.index, "message": {"role": "assistant", "content": r.text},
                        "logprobs": {"content": [chat_logprob(pieces, t) for t in r.logprobs]} if body.logprobs else None,
                        "finish_reason": r.finish_reason, "seed": r.seed}
                       for sp, r in zip(specs, results)]
            return {**head, "choices": choices, "usage": usage(specs, results, body.n)}

        head["object"] = "chat.completion.chunk"
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        continuous = body.stream_options is not None and body.stream_options.continuous_usage_stats

        async def stream():
            try:
                started = set()
                for sp in specs:                              # the role first, before any prefill is done
                    started.add(sp.index)
                    yield sse({**head, "choices": [{"index": sp.index, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}], "usage": None})
                async for i, ev in run.events():
                    if ev.finish_reason == "error":
                        yield stream_error(run.results[i])
                        continue
                    use = usage(specs, run.results, body.n) if continuous else None
                    if ev.token_id is not None or ev.text:
                        lp = None
                        if body.logprobs:
                            lp = {"content": [] if ev.token_id is None else [chat_logprob(pieces, ev.logprob)]}
                        yield sse({**head, "choices": [{"index": i, "delta": {"content": ev.text}, "logprobs": lp,
                                                        "finish_reason": None}], "usage": use})
                    if ev.finish_reason is not None:
                        yield sse({**head, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                                        "finish_reason": ev.finish_reason, "seed": specs[i].fields["seed"]}],
                                   "usage": use})
                if include_usage:
                    yield sse({**head, "choices": [], "usage": usage(specs, run.results, body.n)})
                yield "[DONE]"
            finally:
                run.close()

        return EventSourceResponse(stream(), sep="\n", ping=cfg.sse_ping_s)

    @app.post("/completion", tags=["llama.cpp"], dependencies=[Depends(auth)])
    async def llama_completion(body: LlamaCompletionRequest, request: Request):
        """llama-server's native endpoint (n_predict, n_probs, stop_type), with llama-server's
        sampling defaults."""
        m = st.need_ready()
        fields = dict(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, min_p=body.min_p,
                      repeat_penalty=body.repeat_penalty, repeat_last_n=body.repeat_last_n, stop=body.stop,
                      top_logprobs=body.n_probs or None)
        specs = await prepare([body.prompt], fields, 1, None if body.n_predict < 0 else body.n_predict, body.seed)
        sp = specs[0]
        pieces = Pieces(m.tokenizer, False)

        def probs(tl):
            return {"id": tl.token_id, "token": pieces.text(tl.token_id), "logprob": tl.logprob,
                    "bytes": list(pieces.bytes(tl.token_id)),
                    "top_logprobs": [{"id": i, "token": pieces.text(i), "logprob": v, "bytes": list(pieces.bytes(i))}
                                     for i, v in (tl.top or ())]}

        def final(r):
            stop_type = "limit" if r.finish_reason == "length" else "eos" if r.eog is not None else "word"
            word = next((s for s in body.stop if s in m.detokenize(r.token_ids)), "") if stop_type == "word" else ""
            out = {"content": r.text, "id_slot": 0, "stop": True, "model": st.name, "tokens_predicted": len(r.token_ids),
                   "tokens_evaluated": len(sp.prompt_ids), "tokens_cached": r.stats.cached_prompt_tokens,
                   "truncated": False, "stop_type": stop_type, "stopping_word": word, "seed": r.seed,
                   "tokens": list(r.token_ids) if body.return_tokens else [],
                   "timings": {"prompt_n": len(sp.prompt_ids) - r.stats.cached_prompt_tokens,
                               "prompt_ms": r.stats.prefill_s * 1e3, "predicted_n": len(r.token_ids),
                               "predicted_ms": r.stats.decode_s * 1e3}}
            if body.n_probs:
                out["completion_probabilities"] = [probs(t) for t in r.logprobs]
            return out

        run = Run(st, specs)
        if not body.stream:
            results = await run.wait(request)
            return final(results[0])

        async def stream():
            try:
                async for _, ev in run.events():
                    if ev.finish_reason is not None:
                        r = run.results[0]
                        if r.finish_reason == "error":
                            yield stream_error(r)
                            return
                        if ev.text:
                            yield sse({"content": ev.text, "stop": False, "id_slot": 0})
                        yield sse(final(r) | {"content": ""})
                    else:
                        chunk = {"content": ev.text, "stop": False, "id_slot": 0}
                        if body.return_tokens:
                            chunk["tokens"] = [ev.token_id]
                        if body.n_probs:
                            chunk["completion_probabilities"] = [probs(ev.logprob)]
                        yield sse(chunk)
            finally:
                run.close()

        return EventSourceResponse(stream(), sep="\n", ping=cfg.sse_ping_s)

    @app.post("/tokenize", tags=["tokenizer"], dependencies=[Depends(auth)])
    async def tokenize(body: TokenizeRequest):
        m = st.need_ready()
        check_model_field(body.model)
        tok = m.tokenizer
        try:
            if body.messages is not None:
                text = m.apply_chat_template([x.for_template() for x in body.messages],
                                             add_generation_prompt=body.add_generation_prompt)
            else:
                text = body.prompt
            ids = await asyncio.to_thread(tok.encode, text, body.add_special_tokens, True)
        except RefinferError as e:
            raise ApiError(400, str(e), param="messages" if body.messages is not None else "prompt") from None
        out = {"count": len(ids), "max_model_len": m.config.max_seq_len, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = [Pieces(tok, False).text(i) for i in ids]
        return out

    @app.post("/detokenize", tags=["tokenizer"], dependencies=[Depends(auth)])
    async def detokenize(body: DetokenizeRequest):
        m = st.need_ready()
        check_model_field(body.model)
        n = m.config.vocab_size
        for i, t in enumerate(body.tokens):
            if not 0 <= t < min(n, m.tokenizer.n_vocab):
                raise ApiError(400, f"tokens[{i}] is {t}, outside the vocabulary [0, {min(n, m.tokenizer.n_vocab)})",
                               param="tokens")
        return {"prompt": m.detokenize(body.tokens)}

    @app.get("/tokenizer_info", tags=["tokenizer"], dependencies=[Depends(auth)])
    async def tokenizer_info():
        """vLLM's /tokenizer_info: what lm-eval's remote tokenizer reads (bos/eos/pad tokens and
        the chat template)."""
        m = st.need_ready()
        tok = m.tokenizer
        name = (lambda i: None if i is None else tok.tokens[i])
        return {"tokenizer_class": f"refinfer.{tok.model}", "bos_token": name(tok.bos_id), "eos_token": name(tok.eos_id),
                "pad_token": name(getattr(tok, "pad_id", None)), "add_bos_token": bool(tok.add_bos),
                "add_eos_token": bool(tok.add_eos), "chat_template": tok.chat_template,
                "model_max_length": m.config.max_seq_len, "vocab_size": tok.n_vocab}

    @app.get("/metrics", tags=["server"])
    async def metrics():
        st.need_ready()
        stats = await asyncio.to_thread(st.engine.stats)
        return PlainTextResponse(st.metrics.render(stats, st.name, st.live),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    if (STATIC / "index.html").exists():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

        @app.get("/", include_in_schema=False)
        async def index():
            return FileResponse(STATIC / "index.html")

    return app


# ---------------------------------------------------------------------------------------------
# Errors: every one an OpenAI error object; never a 500 for what a user sent


def _status_type(status: int) -> str:
    return {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
            422: "invalid_request_error", 501: "not_supported_error", 503: "unavailable_error"}.get(status, "server_error")


def validation_message(err: dict) -> tuple[str, str | None]:
    """One pydantic error as (message, param)."""
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    kind, msg = err.get("type", ""), err.get("msg", "invalid value")
    if kind == "json_invalid":
        return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', msg)}", None
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {'.'.join(loc)}", ".".join(loc)
    if kind == "missing" and not loc:
        return "the request body is empty: send a JSON object", None
    if kind == "missing":
        return f"'{'.'.join(loc)}' is a required property", ".".join(loc)
    msg = msg.removeprefix("Value error, ")
    if not loc:
        if kind in ("model_attributes_type", "dict_type"):
            return "the request body must be a JSON object", None
        return msg, None
    # a union type lists every member; keep the field's path up to the first member name
    path = ".".join(x for x in loc if not any(c in x for c in "[]'\""))
    return f"'{path}': {msg} (got {err.get('input')!r:.80})", path


def install_error_handlers(app):
    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, e: RequestValidationError):
        errs = e.errors()
        msg, param = validation_message(errs[0]) if errs else ("invalid request", None)
        return JSONResponse(ApiError(400, msg, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        body = {"error": {"message": msg, "type": _status_type(e.status_code), "param": None, "code": e.status_code}}
        return JSONResponse(body, status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        body = {"error": {"message": f"internal error: {type(e).__name__}: {e}", "type": "server_error",
                          "param": None, "code": 500}}
        return JSONResponse(body, status_code=500)

