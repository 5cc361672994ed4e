"""Random workloads for the batch-invariance tests, in three shapes (SGLang's test_deterministic
modes), and a step driver that runs them through forward() over one shared paged cache.

    single         one request, alone in every step, its prompt split into random chunks
    mixed          a needle request among fillers of ragged lengths, arriving at a random step
    shared_prefix  requests that share a long prefix (prefix-cache hits) and then diverge

A workload is a list of token sequences plus arrival steps. run_batched() admits each sequence
when it arrives, gives it every slot up front (allocate: prefix hits skip leading blocks), then
every step feeds a random chunk of each running sequence's remaining tokens, within a token
budget, and keeps the logits of every position it computes. Each row must equal, bit for bit,
the row of that position in Model.logits(sequence) (teacher forcing, the sequence alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refinfer.forward import Segment, forward
from refinfer.kv_cache import BlockManager


@dataclass
class Workload:
    sequences: list          # list[list[int]]
    arrivals: list           # step at which each sequence arrives
    name: str


def _tokens(rng, n, vocab):
    return [int(t) for t in rng.integers(3, vocab, n)]     # ids 0..2 are special in the test vocabularies


def single(rng, vocab, n=(5, 40)) -> Workload:
    return Workload([_tokens(rng, int(rng.integers(*n)), vocab)], [0], "single")


def mixed(rng, vocab, n_fillers=4, n=(2, 40)) -> Workload:
    seqs = [_tokens(rng, int(rng.integers(*n)), vocab) for _ in range(n_fillers + 1)]
    arrivals = [int(rng.integers(0, 4)) for _ in seqs]
    return Workload(seqs, arrivals, "mixed")


def shared_prefix(rng, vocab, n_requests=4, prefix=(17, 40), tail=(1, 12)) -> Workload:
    p = _tokens(rng, int(rng.integers(*prefix)), vocab)
    seqs = [p[: int(rng.integers(len(p) // 2, len(p) + 1))] + _tokens(rng, int(rng.integers(*tail)), vocab)
            for _ in range(n_requests)]
    arrivals = sorted(int(rng.integers(0, 6)) for _ in seqs)
    return Workload(seqs, arrivals, "shared_prefix")


SHAPES = {"single": single, "mixed": mixed, "shared_prefix": shared_prefix}


def run_batched(model, work: Workload, rng=None, *, block_size=16, max_tokens_per_step=24, prefix_caching=True,
                schedule=None):
    """-> ({(sequence index, position): float32[vocab] logits row}, BlockManager stats, schedule).
    Steps are drawn with rng, or replayed from schedule (a list of steps, each a list of
    (sequence, start, n_tokens); a sequence is admitted at its first segment; no prefix caching
    then, since a hit would move the starts). Every sequence ends computed and freed; the cache's
    accounting is checked."""
    cfg, be = model.config, model.backend
    total = sum(-(-len(s) // block_size) for s in work.sequences)
    k_type, v_type = be.kv_types()
    pool = be.new_kv_pool(n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                          n_blocks=total + 2, block_size=block_size, k_type=k_type, v_type=v_type)
    kv = BlockManager(pool, enable_prefix_caching=prefix_caching and schedule is None)
    done: dict = {}
    taken = []
    running: list[int] = []
    waiting = list(range(len(work.sequences)))
    step = 0
    while (waiting or running) if schedule is None else step < len(schedule):
        batch = []
        if schedule is None:
            for i in [i for i in waiting if work.arrivals[i] <= step]:
                kv.allocate(i, work.sequences[i])        # slots for every position; leading blocks may be hits
                running.append(i)
                waiting.remove(i)
            budget = max_tokens_per_step
            for i in rng.permutation(running):
                i = int(i)
                start = kv.num_computed_tokens(i)
                left = len(work.sequences[i]) - start
                if budget == 0:
                    break
                n = int(rng.integers(1, min(left, budget) + 1))
                batch.append(Segment(i, work.sequences[i][start:start + n], start, "all"))
                budget -= n
        else:
            for i, start, n in schedule[step]:
                if i not in kv.tables:
                    kv.allocate(i, work.sequences[i])
                    running.append(i)
                batch.append(Segment(i, work.sequences[i][start:start + n], start, "all"))
        if batch:
            taken.append([(s.seq_id, s.start, len(s.tokens)) for s in batch])
            for seg, rows in zip(batch, forward(cfg, model.weights, be, batch, kv)):
                for j, row in enumerate(rows):
                    done[seg.seq_id, seg.start + j] = row
            for seg in batch:
                if kv.num_computed_tokens(seg.seq_id) == len(work.sequences[seg.seq_id]):
                    running.remove(seg.seq_id)
                    kv.free(seg.seq_id)
        step += 1
    kv.check_accounting()
    return done, kv.stats(), taken


def first_difference(model, work: Workload, rows: dict):
    """None when every computed row equals Model.logits of its sequence alone, else a message."""
    for i, seq in enumerate(work.sequences):
        ref = model.logits(seq)
        for p in range(len(seq)):
            if (i, p) in rows and not np.array_equal(rows[i, p].view(np.uint32), ref[p].view(np.uint32)):
                d = np.flatnonzero(rows[i, p] != ref[p])
                return (f"{work.name}: sequence {i} position {p}: {len(d)} of {ref.shape[1]} logits differ from the "
                        f"sequence alone (first at {d[0] if len(d) else '?'})")
    return None
