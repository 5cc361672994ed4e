"""The forward pass of a Llama-family transformer, written once for every backend and mode.

    x = embed(tokens)
    for each layer:
        x = x + attention(rmsnorm(x) ; RoPE on q, k ; KV cache)
        x = x + ffn_down(silu(ffn_gate(rmsnorm(x))) * ffn_up(rmsnorm(x)))
    logits = output(rmsnorm(x))

One step runs a ragged batch: segments of new tokens of several sequences, stacked into one
[N, dim] activation (N = the segments' tokens together). Everything but attention works row by
row; attention reads each token's own sequence from the paged KV cache (kv_cache.py) through its
block table. K and V of the step are stored before attention reads them, so a position computed
in this step and one computed steps ago (or by another request, a prefix-cache hit) are read
through the same store and load. A single sequence is a batch of one segment.

Batch invariance: in ideal mode every backend computes each row with arithmetic that depends on
that row alone (backends/__init__.py says what each op guarantees), so a sequence's numbers do
not depend on its neighbours, on how its prompt was split into steps, on prefix hits, block
size or thread count.

`tap(name, array)` receives every intermediate under llama.cpp's eval-callback names
(inp_embd, attn_norm-N, Qcur-N, ..., result_output) for dumps and first-divergence search; the
arrays are the stacked rows of the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Hashable

import numpy as np

from .config import ModelConfig
from .errors import RefinferError
from .kv_cache import DEFAULT_BLOCK_SIZE, BlockManager
from .weights import Weights

LOGITS_CHOICES = ("none", "last", "all")


@dataclass
class Segment:
    seq_id: Hashable        # the sequence's key in the BlockManager
    tokens: list            # new tokens of this step, T >= 1
    start: int              # position of tokens[0] = the sequence's computed length
    logits: object = "last"  # "none" | "last" | "all" | offsets in 0 .. T-1 whose logits return

    def logit_rows(self) -> list[int]:
        T = len(self.tokens)
        if isinstance(self.logits, str):
            if self.logits not in LOGITS_CHOICES:
                raise RefinferError(f"segment of sequence {self.seq_id!r}: logits={self.logits!r}",
                                    hint=f"logits is one of {', '.join(LOGITS_CHOICES)} or a list of offsets")
            return {"none": [], "last": [T - 1], "all": list(range(T))}[self.logits]
        rows = [int(i) for i in self.logits]
        if any(not 0 <= i < T for i in rows):
            raise RefinferError(f"segment of sequence {self.seq_id!r}: logit offsets {rows} outside 0..{T - 1}",
                                hint="offsets count from the segment's first token")
        return rows


@dataclass
class AttnMeta:
    """Where each token of a step reads and writes the paged KV cache (vLLM's attention metadata)."""
    positions: np.ndarray     # int64[N] absolute position of each token
    slots: np.ndarray         # int64[N] pool slot (block_id * block_size + offset) of its K and V
    seg_of_token: np.ndarray  # int32[N] segment of each token
    seg_starts: np.ndarray    # int64[n_seg + 1] offsets of the segments in the stacked batch
    tables: np.ndarray        # int32[n_seg, max_blocks] block tables, padded with -1
    block_size: int

    @cached_property
    def position_slots(self) -> np.ndarray:   # int64[n_seg, S]: the pool row of each position of each segment
        """The block tables expanded to one row index per position (block * block_size + offset),
        up to the step's largest position; entries past a segment's own table are never read.
        Made once a step, for every layer."""
        bs = self.block_size
        S = int(np.max(self.positions)) + 1
        tables = np.asarray(self.tables, np.int64)[:, : -(-S // bs)]
        return np.ascontiguousarray((tables[:, :, None] * bs + np.arange(bs)).reshape(len(tables), -1)[:, :S])


class KVCache:
    """One sequence's paged cache: what Model.logits, Model.generate and the benchmarks use for
    a single sequence. forward(tokens, cache) appends tokens at cache.pos. The pool is made on
    the first forward, by that backend (be.new_kv_pool: its memory, its cache types)."""
    SEQ = 0

    def __init__(self, cfg: ModelConfig, max_len: int, be=None, block_size: int = DEFAULT_BLOCK_SIZE):
        self.cfg, self.max_len, self.block_size = cfg, int(max_len), block_size
        self.kv: BlockManager | None = None
        if be is not None:
            self.bind(be)

    def bind(self, be) -> BlockManager:
        if self.kv is None:
            cfg = self.cfg
            k_type, v_type = be.kv_types()
            pool = be.new_kv_pool(n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                                  n_blocks=max(1, -(-self.max_len // self.block_size)),
                                  block_size=self.block_size, k_type=k_type, v_type=v_type)
            self.kv = BlockManager(pool, enable_prefix_caching=False)
        return self.kv

    @property
    def pos(self) -> int:           # positions filled so far
        t = self.kv.tables.get(self.SEQ) if self.kv is not None else None
        return 0 if t is None else t.num_computed

    def add(self, tokens) -> Segment:
        """Slots for tokens after the cached positions; the segment that computes them."""
        start = self.pos
        if self.SEQ not in self.kv.tables:
            self.kv.allocate(self.SEQ, tokens)
        else:
            for t in tokens:
                self.kv.append_slot(self.SEQ, t)
        return Segment(self.SEQ, list(tokens), start)

    def truncate(self, n: int):
        """Forget positions >= n."""
        if self.kv is not None and self.SEQ in self.kv.tables:
            self.kv.truncate(self.SEQ, min(self.pos, n))


def _no_tap(name, value):
    pass


def attn_meta(kv: BlockManager, batch: list[Segment]) -> AttnMeta:
    lengths = [len(s.tokens) for s in batch]
    seg_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    positions = np.concatenate([np.arange(s.start, s.start + len(s.tokens)) for s in batch]).astype(np.int64)
    slots = np.concatenate([kv.step_slots(s.seq_id, s.start, s.tokens) for s in batch]).astype(np.int64)
    seg_of_token = np.repeat(np.arange(len(batch), dtype=np.int32), lengths)
    width = max(kv.blocks_needed(s.start + len(s.tokens)) for s in batch)
    tables = np.full((len(batch), width), -1, np.int32)
    for i, s in enumerate(batch):
        ids = kv.block_table(s.seq_id)[:kv.blocks_needed(s.start + len(s.tokens))]
        tables[i, :len(ids)] = ids
    return AttnMeta(positions, slots, seg_of_token, seg_starts, tables, kv.block_size)


def check_batch(cfg: ModelConfig, batch: list[Segment]) -> np.ndarray:
    """The stacked token ids of a step, after checking the segments' shapes and ids."""
    if not batch:
        raise RefinferError("forward needs at least one segment", hint="a step runs one or more sequences")
    seen = set()
    for s in batch:
        if s.seq_id in seen:
            raise RefinferError(f"sequence {s.seq_id!r} has two segments in one step",
                                hint="give each sequence's new tokens as one segment")
        seen.add(s.seq_id)
        if len(s.tokens) == 0:
            raise RefinferError(f"segment of sequence {s.seq_id!r} has no tokens", hint="forward needs at least one token")
        if s.start + len(s.tokens) > cfg.max_seq_len:
            raise RefinferError(f"context overflow: sequence {s.seq_id!r} at {s.start} cached + {len(s.tokens)} new "
                                f"tokens > context length {cfg.max_seq_len}", hint="use a shorter prompt")
    tokens = np.concatenate([np.asarray(s.tokens, dtype=np.int64).reshape(-1) for s in batch])
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        bad = int(tokens.max() if tokens.max() >= cfg.vocab_size else tokens.min())
        raise RefinferError(f"token id out of range [0, {cfg.vocab_size}): {bad}",
                            hint="token ids come from this model's tokenizer (Model.tokenize)")
    return tokens


def forward(cfg: ModelConfig, w: Weights, be, batch, kv, *, all_logits=True, tap=_no_tap):
    """One step over batch (a list of Segments) with kv a BlockManager; returns, per segment,
    float32[rows, vocab] for the rows its `logits` selects (None for "none").

    forward(cfg, w, be, tokens, cache: KVCache, all_logits=...) runs one sequence: tokens at
    positions cache.pos .. and float32[T, vocab] (or [1, vocab], the last) back."""
    if isinstance(kv, KVCache):
        return _forward_one(cfg, w, be, batch, kv, all_logits, tap)
    return _step(cfg, w, be, batch, kv, check_batch(cfg, batch), tap)


def _step(cfg, w, be, batch, kv, tokens, tap):
    """forward() of a batch whose stacked token ids, tokens, check_batch has checked."""
    rows = [s.logit_rows() for s in batch]
    meta = attn_meta(kv, batch)
    pool = kv.pool
    N = len(tokens)
    dt = be.dtype
    hd, n_heads, n_kv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads

    x = np.empty((N, cfg.dim), dtype=dt)                                   # residual stream
    h = np.empty((N, cfg.dim), dtype=dt)                                   # normed input of a block
    q = np.empty((N, n_heads * hd), dtype=dt)
    k = np.empty((N, n_kv * hd), dtype=dt)
    v = np.empty((N, n_kv * hd), dtype=dt)
    att = np.empty((N, n_heads, hd), dtype=dt)
    o = np.empty((N, cfg.dim), dtype=dt)
    gate = np.empty((N, cfg.hidden_dim), dtype=dt)
    up = np.empty((N, cfg.hidden_dim), dtype=dt)

    be.embed(x, w.token_embd, tokens)
    tap("inp_embd", x)
    cos, sin = be.rope_cos_sin(meta.positions, cfg, w.rope_freqs)
    rot_k, rot_v = be.kv_rotation_sizes(pool)      # llama.cpp's Hadamard rotation for its quantized caches, or 0

    for i, L in enumerate(w.layers):
        be.rmsnorm(h, x, L.attn_norm, cfg.norm_eps)
        tap(f"attn_norm-{i}", h)
        be.matmuls((q, k, v), h, (L.attn_q, L.attn_k, L.attn_v))
        if cfg.qkv_bias:
            q += L.attn_q_bias
            k += L.attn_k_bias
            v += L.attn_v_bias
        q3, k3, v3 = q.reshape(N, n_heads, hd), k.reshape(N, n_kv, hd), v.reshape(N, n_kv, hd)
        be.rope(q3, cos, sin, cfg.rope_neox)
        be.rope(k3, cos, sin, cfg.rope_neox)
        tap(f"Qcur-{i}", q3)
        tap(f"Kcur-{i}", k3)
        tap(f"Vcur-{i}", v3)
        if rot_k:
            be.hadamard(q3, rot_k)
            be.hadamard(k3, rot_k)
        if rot_v:
            be.hadamard(v3, rot_v)
        be.store_kv(pool, i, meta, k3, v3)
        be.attention(att, q3, pool, i, meta)
        tap(f"kqv_out-{i}", att)               # llama.cpp's kqv_out: before V's rotation is undone
        if rot_v:
            be.hadamard(att, rot_v)
        be.matmul(o, att.reshape(N, n_heads * hd), L.attn_output)
        tap(f"attn_out-{i}", o)
        x += o
        tap(f"ffn_inp-{i}", x)

        be.rmsnorm(h, x, L.ffn_norm, cfg.norm_eps)
        tap(f"ffn_norm-{i}", h)
        be.matmuls((gate, up), h, (L.ffn_gate, L.ffn_up))
        be.swiglu(gate, gate, up)
        tap(f"ffn_swiglu-{i}", gate)
        be.matmul(o, gate, L.ffn_down)
        tap(f"ffn_out-{i}", o)
        x += o
        tap(f"l_out-{i}", x)

    for s in batch:
        kv.mark_computed(s.seq_id, s.start + len(s.tokens))
    sel = np.concatenate([meta.seg_starts[j] + np.asarray(r, np.int64) for j, r in enumerate(rows)]).astype(np.int64)
    if len(sel) == 0:
        return [None] * len(batch)
    if len(sel) < N or np.any(sel != np.arange(N)):
        x, h = x[sel], h[: len(sel)]
    be.rmsnorm(h, x, w.output_norm, cfg.norm_eps)
    tap("result_norm", h)
    logits = np.empty((len(h), cfg.vocab_size), dtype=dt)
    be.matmul(logits, h, w.output)
    tap("result_output", logits)
    logits = logits.astype(np.float32, copy=False)
    out, r0 = [], 0
    for s, r in zip(batch, rows):
        out.append(None if s.logits == "none" else logits[r0: r0 + len(r)])
        r0 += len(r)
    return out


def _forward_one(cfg, w, be, tokens, cache: KVCache, all_logits, tap):
    tokens = [int(t) for t in np.asarray(tokens, dtype=np.int64).reshape(-1)]
    if not tokens:
        raise RefinferError("forward needs at least one token", hint="give at least one token id")
    if cache.pos + len(tokens) > cache.max_len:
        raise RefinferError(f"context overflow: {cache.pos} cached + {len(tokens)} new tokens > context length "
                            f"{cache.max_len}", hint="use a larger --ctx or a shorter prompt")
    ids = check_batch(cfg, [Segment(KVCache.SEQ, tokens, cache.pos)])   # bad ids fail before any slot is taken
    cache.bind(be)
    seg = cache.add(tokens)
    seg.logits = "all" if all_logits else "last"
    return _step(cfg, w, be, [seg], cache.kv, ids, tap)[0]
