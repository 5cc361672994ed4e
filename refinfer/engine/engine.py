"""refinfer.Engine: continuous batching over one paged KV cache (nano-vllm's LLMEngine).

    engine = refinfer.Engine(model, max_batch=16)
    h = engine.submit("Once upon a time", max_tokens=32, temperature=0.8, seed=1)
    for ev in h:                                   # Events: token id, text piece, logprob
        print(ev.text, end="")
    h.result()                                     # the GenerationResult
    engine.generate_many([{"prompt": "Hi"}, {"messages": [...], "max_tokens": 8}])

Threads. submit() and cancel() may be called from any thread: they check the request in the
caller's thread and put a message in the engine's inbox. One thread at a time steps (step()
holds a lock): the engine's own thread after start(), or without one, whichever thread waits on
a handle or runs generate_many. Only the stepping thread touches the scheduler and the
BlockManager.

A step: take the inbox (new requests join the waiting queue; cancelled ones leave at once and
free their blocks), schedule (scheduler.py), run one forward over the step's segments, give each
sequence the logits rows it asked for (its Decoder collects prompt logprobs from the first ones
and samples the next token from the last), and finish the sequences that are done.

What a request gets is what Model.generate of that request alone gets: the same Decoder sees
the same rows (the forward is batch-invariant in ideal mode, whatever the batch, the chunking,
a prefix hit or a preemption), and token i's draw depends on (seed, i) alone.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..errors import RefinferError
from ..forward import forward
from ..generation import Decoder, Event, GenerationResult, check_fields, error_result
from ..kv_cache import DEFAULT_BLOCK_SIZE
from ..sampling import Sampler
from .scheduler import Scheduler
from .sequence import Sequence

DEFAULT_MAX_TOKENS_PER_STEP = 512     # llama.cpp's default n_ubatch


@dataclass
class EngineStats:
    running: int                # sequences in the running batch
    waiting: int                # submitted, not running (new, or preempted to be recomputed)
    preemptions: int            # sequences whose blocks were freed to be recomputed, since the start
    steps: int                  # forward steps run
    finished: int               # requests finished, cancelled or failed
    blocks_total: int
    blocks_used: int            # held by a sequence's block table
    blocks_cached: int          # unreferenced, kept for prefix-cache hits (evictable)
    blocks_free: int            # unreferenced and empty
    prefix_cache_queries: int   # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int      # of those, tokens found (whole blocks)
    kv_types: str = ""          # "K/V" cache types
    kv_bytes_per_token: int = 0  # pool bytes of one position, every layer, K and V (the types' real sizes)
    kv_pool_bytes: int = 0
    kv_max_seqs_2k: int = 0     # sequences of 2048 positions the pool holds at once


def _positive_int(name, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise RefinferError(f"{name} must be a positive integer, got {value!r}",
                            hint=f"e.g. Engine(model, max_batch=16, max_tokens_per_step={DEFAULT_MAX_TOKENS_PER_STEP})")
    return int(value)


class RequestHandle:
    """A submitted request: iterate it for its Events, result() for its GenerationResult,
    cancel() to stop it. Any thread may use it."""

    def __init__(self, engine: Engine, seq: Sequence, listener=None):
        self._engine = engine
        self._listener = listener                # called in the stepping thread with each Event
        self.request_id = seq.seq_id
        self.request = seq.request               # the checked request: prompt_ids, max_tokens, seed, ...
        self._decoder = seq.decoder
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._done = threading.Event()
        self._result: GenerationResult | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def prompt_logprobs(self):
        """With prompt_logprobs=True: the prompt's TokenLogprobs (None for position 0), complete
        once the request's first Event has come (its prompt is computed before its first token)."""
        return self._decoder.prompt_logprobs

    def __iter__(self):
        """The request's Events as they come; the last one has its finish_reason."""
        while True:
            ev = self._next_event()
            if ev is None:                           # iterated again after the end
                return
            yield ev
            if ev.finish_reason is not None:
                return

    def _next_event(self) -> Event | None:
        while True:
            try:
                return self._events.get_nowait()
            except queue.Empty:
                if self._done.is_set():
                    return None
            if self._engine.is_running():
                try:
                    return self._events.get(timeout=0.1)
                except queue.Empty:
                    continue
            self._engine._step_for(self)

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Block until the request is finished (stepping the engine in this thread when no engine
        thread runs); TimeoutError after timeout seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.is_set():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
            if self._engine.is_running():
                self._done.wait(0.1)
            else:
                self._engine._step_for(self)
        return self._result

    def cancel(self):
        """Stop the request: it finishes "cancelled" with what it generated so far, and its
        blocks are freed (now, or by the engine thread before its next step)."""
        self._engine._cancel(self.request_id)

    def _put(self, ev: Event):
        self._events.put(ev)
        if self._listener is not None:
            self._listener(ev)

    def _finish(self, ev: Event, result: GenerationResult):
        """The last event, after the result is set: a listener that sees it may call result()."""
        self._result = result
        self._events.put(ev)
        self._done.set()
        if self._listener is not None:
            self._listener(ev)


class Engine:
    def __init__(self, model, max_batch=16, max_tokens_per_step=DEFAULT_MAX_TOKENS_PER_STEP, kv_cache_mib=None,
                 kv_cache_tokens=None, kv_block_size=DEFAULT_BLOCK_SIZE, enable_prefix_caching=True):
        """model: a refinfer Model. The KV pool is kv_cache_mib MiB or kv_cache_tokens positions
        (default: the model's context length) in blocks of kv_block_size positions."""
        self.model = model
        max_batch = _positive_int("max_batch", max_batch)
        max_tokens_per_step = _positive_int("max_tokens_per_step", max_tokens_per_step)
        self.kv = model.new_kv(tokens=kv_cache_tokens, mib=kv_cache_mib, block_size=kv_block_size,
                               enable_prefix_caching=bool(enable_prefix_caching))
        self.scheduler = Scheduler(self.kv, max_batch, max_tokens_per_step)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()   # ("submit", seq, handle) | ("cancel", id)
        self._step_lock = threading.Lock()                      # one stepping thread at a time
        self._wake = threading.Event()                          # the engine thread sleeps on it when idle
        self._ids = itertools.count()
        self._live: dict[int, tuple[Sequence, RequestHandle]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = self.finished = 0

    # -- any thread -------------------------------------------------------------------------------

    def submit(self, prompt=None, *, listener=None, **fields) -> RequestHandle:
        """Queue one request: prompt (text or token ids) or messages=[...], and Model.generate's
        other keyword names (max_tokens, temperature, top_k, top_p, min_p, repeat_penalty,
        repeat_last_n, seed, stop, chat, add_special, top_logprobs, prompt_logprobs). A bad
        request, or one that can never fit the KV pool, raises RefinferError here.
        listener(event), if given, is called with each Event in the stepping thread, as it is
        queued for the handle's iterator (the server hands it to its event loop); it must be quick."""
        if prompt is not None:
            fields["prompt"] = prompt
        return self._submit(fields, listener)

    def _submit(self, fields, listener=None) -> RequestHandle:
        req = self.model.prepare_request(**check_fields(fields))
        self.kv.check_fits(req.positions)             # reads the pool's size only
        seq = Sequence(next(self._ids), Decoder(req, self.model._need_tokenizer(), Sampler(req.sampler)),
                       time.perf_counter())
        handle = RequestHandle(self, seq, listener)
        self._inbox.put(("submit", seq, handle))
        self._wake.set()
        return handle

    def _cancel(self, request_id: int):
        self._inbox.put(("cancel", request_id))
        self._wake.set()
        if not self.is_running():                     # nobody steps: free the blocks now
            with self._step_lock:
                self._take_inbox()

    def generate_many(self, requests) -> list[GenerationResult]:
        """Run a list of requests (dicts of Model.generate's keyword names) together; results in
        order. A bad request comes back as a result with finish_reason "error" and .error set."""
        handles = []
        for r in requests:
            try:
                handles.append(self._submit(r))
            except RefinferError as e:
                handles.append(error_result(e))
        return [h.result() if isinstance(h, RequestHandle) else h for h in handles]

    def stats(self) -> EngineStats:
        with self._step_lock:
            self._take_inbox()
            kv = self.kv.stats()
            pool = self.kv.pool
            return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), self.scheduler.preemptions,
                               self.steps, self.finished, kv.n_blocks, kv.used, kv.cached, kv.free,
                               kv.prefix_queries, kv.prefix_hits, f"{pool.k_type.name}/{pool.v_type.name}",
                               pool.bytes_per_token, pool.k.nbytes + pool.v.nbytes, self.kv.max_sequences(2048))

    def check_accounting(self):
        """BlockManager.check_accounting, with the engine's own view: the tables are exactly the
        running sequences'."""
        with self._step_lock:
            self.kv.check_accounting()
            running = {s.seq_id for s in self.scheduler.running}
            if set(self.kv.tables) != running:
                raise AssertionError(f"block tables {sorted(self.kv.tables)} != running sequences {sorted(running)}")

    # -- the engine thread ------------------------------------------------------------------------

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Engine:
        """Step in a background thread until stop()."""
        if not self.is_running():
            self._stopping = False
            self._thread = threading.Thread(target=self.run_forever, name="refinfer-engine", daemon=True)
            self._thread.start()
        return self

    def run_forever(self):
        while not self._stopping:
            self._wake.clear()
            try:
                busy = self.step()
            except Exception as e:                    # a bug in a step must not strand the waiting callers
                self._fail_all(e)
                busy = False
            if not busy:
                self._wake.wait()

    def stop(self):
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- the stepping thread ----------------------------------------------------------------------

    def _step_for(self, handle: RequestHandle):
        """A step in a caller's thread that waits on handle. An idle step means that no request is
        live, so handle's must have finished in an earlier step."""
        if not self.step() and not handle.done:
            raise AssertionError(f"the engine is idle but request {handle.request_id} is not finished")

    def step(self) -> bool:
        """One step; False when nothing was left to run."""
        with self._step_lock:
            self._take_inbox()
            batch = self.scheduler.schedule()
            if not batch:
                return False
            m = self.model
            try:
                outs = forward(m.config, m.weights, m.backend, [seg for _, seg in batch], self.kv)
            except Exception as e:                    # a failed step fails its sequences, not the engine
                err = e if isinstance(e, RefinferError) else RefinferError(
                    f"engine step failed: {type(e).__name__}: {e}", hint="this is a bug in refinfer; please report it")
                for seq, _ in batch:
                    self._end(seq, seq.decoder.fail(err))
                return True
            self.steps += 1
            now = time.perf_counter()
            for (seq, seg), rows in zip(batch, outs):
                self._advance(seq, seg, rows, now)
            return True

    def _advance(self, seq: Sequence, seg, rows, now: float):
        seq.num_computed = seg.start + len(seg.tokens)
        dec, st = seq.decoder, seq.decoder.stats
        n_prompt_rows = sum(seg.start + o <= seq.num_prompt_tokens - 2 for o in seg.logits)
        if n_prompt_rows:
            dec.add_prompt_rows(seg.start + seg.logits[0] + 1, rows[:n_prompt_rows])
        if seq.num_computed < len(seq.tokens):        # a prefill chunk that is not the last
            return
        ev = dec.step(rows[-1])
        if seq.first_token is None:
            seq.first_token = now
            st.queue_s = seq.first_scheduled - seq.arrival
            st.ttft_s = now - seq.arrival
            st.prefill_s = now - seq.first_scheduled
        if ev.token_id is not None:
            st.token_times.append(now - seq.arrival)
        if ev.finish_reason is not None:
            self._end(seq, ev)
            return
        seq.tokens.append(ev.token_id)
        self._live[seq.seq_id][1]._put(ev)

    def _end(self, seq: Sequence, ev: Event):
        """seq is finished (ev is its last event): it leaves the batch and frees its blocks."""
        self.scheduler.finish(seq)
        _, handle = self._live.pop(seq.seq_id)
        st, now = seq.decoder.stats, time.perf_counter()
        if seq.first_scheduled is None:
            st.queue_s = now - seq.arrival
        if seq.first_token is not None:
            st.decode_s = now - seq.first_token
        self.finished += 1
        handle._finish(ev, seq.decoder.result())

    def _take_inbox(self):
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "submit":
                _, seq, handle = msg
                self._live[seq.seq_id] = (seq, handle)
                self.scheduler.add(seq)
            elif msg[1] in self._live:                # a cancel; one for a finished request does nothing
                seq, _ = self._live[msg[1]]
                self._end(seq, seq.decoder.cancel())

    def _fail_all(self, e: Exception):
        err = RefinferError(f"engine step failed: {type(e).__name__}: {e}", hint="this is a bug in refinfer; please report it")
        with self._step_lock:
            for seq, _ in list(self._live.values()):
                self._end(seq, seq.decoder.fail(err))
