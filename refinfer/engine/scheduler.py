"""Which sequences run in the next step, and how many of their tokens (vLLM v1's and
nano-vllm's scheduler, without phases).

Every step has a budget of max_tokens_per_step tokens and at most max_batch running sequences.
schedule() spends the budget in this order:
  1. running sequences that decode: one token each, first come first served. A decode whose
     next token needs a new block that the pool does not have preempts the last running
     sequence (itself, if it is the last) until the block is there: preemption by recompute, as
     vLLM's _preempt_request. The victim's blocks are freed (its full blocks stay in the prefix
     cache, so its recompute often hits them), it keeps its tokens and goes back to the front of
     the waiting queue;
  2. running sequences in prefill: the next chunk of their prompt, as much as the budget has
     left, so that a long prompt is split over steps and shares each with the decodes (chunked
     prefill);
  3. waiting sequences, in order, while the budget, max_batch and the pool allow, unless this
     step preempted one (the pool is short: admitting would only preempt again). allocate()
     gives a sequence slots for all its tokens at once and the positions the prefix cache
     already holds; its first chunk starts after them.
A sequence that is not given its whole remaining prompt in one step is simply continued in the
next. Sequences leave as soon as they finish or are cancelled (finish()), freeing their blocks.
"""

from __future__ import annotations

import time
from collections import deque

from ..forward import Segment
from ..kv_cache import BlockManager
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, kv: BlockManager, max_batch: int, max_tokens_per_step: int):
        self.kv = kv
        self.max_batch = max_batch
        self.max_tokens_per_step = max_tokens_per_step
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.preemptions = 0

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def schedule(self) -> list[tuple[Sequence, Segment]]:
        budget = self.max_tokens_per_step
        batch: list[tuple[Sequence, Segment]] = []
        scheduled: set[int] = set()
        preempted = False

        def take(seq: Sequence, n: int):
            nonlocal budget
            start = seq.num_computed
            seg = Segment(seq.seq_id, seq.tokens[start:start + n], start, seq.logit_offsets(start, n))
            batch.append((seq, seg))
            scheduled.add(seq.seq_id)
            budget -= n

        for seq in [s for s in self.running if s.is_decoding]:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:      # preempted by a sequence ahead of it
                continue
            while not self.kv.can_append(seq.seq_id):
                victim = next(s for s in reversed(self.running) if s.seq_id not in scheduled)
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.kv.append_slot(seq.seq_id, seq.tokens[-1])
                seq.num_slots += 1
                take(seq, 1)

        for seq in [s for s in self.running if not s.is_decoding and s.seq_id not in scheduled]:
            if budget == 0:
                break
            take(seq, min(len(seq.tokens) - seq.num_computed, budget))

        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if not self.kv.can_allocate(seq.tokens, seq.use_prefix_cache):
                break                                 # first come first served: the head waits for blocks
            self.waiting.popleft()
            seq.num_computed = self.kv.allocate(seq.seq_id, seq.tokens, seq.use_prefix_cache)
            seq.num_slots = len(seq.tokens)
            if seq.first_scheduled is None:
                seq.first_scheduled = time.perf_counter()
                seq.decoder.stats.cached_prompt_tokens = seq.num_computed
            seq.status = Status.RUNNING
            self.running.append(seq)
            take(seq, min(len(seq.tokens) - seq.num_computed, budget))
        return batch

    def preempt(self, seq: Sequence):
        self.running.remove(seq)
        self.kv.free(seq.seq_id)
        seq.num_computed = seq.num_slots = 0
        seq.status = Status.WAITING
        seq.decoder.stats.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence):
        """Take seq out of the queues (finished, cancelled or failed) and free its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.kv.free(seq.seq_id)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
