"""One request's state in the engine (nano-vllm's Sequence).

    tokens          the prompt, then every generated token: the last generated token is the one
                    fed next (its KV is computed by the next step that schedules the sequence)
    num_computed    positions whose K/V are in the pool (the BlockManager's count after a step)
    num_slots       positions with a slot in the sequence's block table; 0 while waiting

A running sequence is either in prefill (num_computed < num_slots == len(tokens): the rest of its
prompt, or after a preemption its whole history, is computed in chunks) or decoding
(num_computed == num_slots == len(tokens) - 1: its last token needs a slot, then a step).
A preempted sequence keeps its tokens and its Decoder (generated tokens, text, logprobs): only
its KV is dropped and recomputed, and the logits of the recomputed positions that its Decoder
has already used are not asked for again.
"""

from __future__ import annotations

import enum

from ..generation import Decoder


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, seq_id: int, decoder: Decoder, arrival: float):
        self.seq_id = seq_id
        self.decoder = decoder
        self.request = decoder.request
        self.status = Status.WAITING
        self.tokens = list(self.request.prompt_ids)
        self.num_prompt_tokens = len(self.tokens)
        self.num_computed = 0
        self.num_slots = 0
        self.arrival = arrival                   # time.perf_counter() at submit
        self.first_scheduled: float | None = None
        self.first_token: float | None = None

    @property
    def use_prefix_cache(self) -> bool:
        """A request that still needs prompt logprobs computes every prompt position (vLLM's rule:
        a hit would skip the logits it asked for)."""
        return self.decoder.prompt_rows_done == self.num_prompt_tokens

    @property
    def is_decoding(self) -> bool:
        return self.num_computed == len(self.tokens) - 1 == self.num_slots

    def logit_offsets(self, start: int, n: int) -> list[int]:
        """Offsets in a step of positions start .. start + n - 1 whose logits the Decoder needs:
        the prompt positions whose prompt logprob is missing (row p predicts token p + 1), and
        the last position once it is the sequence's last token (it predicts the next one)."""
        first = self.decoder.prompt_rows_done - 1                 # row predicting the first missing prompt token
        last = self.num_prompt_tokens - 2
        offsets = list(range(max(start, first) - start, min(start + n - 1, last) - start + 1))
        if start + n == len(self.tokens):
            offsets.append(n - 1)
        return offsets
