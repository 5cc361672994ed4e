"""Paged-attention inputs for the backend tests: sequences of random K/V rows stored in a
BlockPool through a BlockManager, and the AttnMeta of a step over some of their positions."""

from __future__ import annotations

import numpy as np

from refinfer.forward import AttnMeta
from refinfer.kv_cache import BlockManager


def kv_rows(lengths, n_kv, hd, seed=0, scale=1.0):
    """Per sequence, K and V float32[length, n_kv, hd]: the same values whatever the pool."""
    rng = np.random.default_rng(seed)
    return [((rng.standard_normal((n, n_kv, hd)) * scale).astype(np.float32),
             rng.standard_normal((n, n_kv, hd)).astype(np.float32)) for n in lengths]


def filled_pool(be, rows, block_size, k_type, v_type, spare_blocks=3):
    """A one-layer pool holding every sequence's rows (sequence ids 0, 1, ...), with its blocks
    taken in a scrambled order (a few allocated and freed first), so tables are not ranges."""
    n_kv, hd = rows[0][0].shape[1:]
    need = sum(-(-len(k) // block_size) for k, _ in rows) + spare_blocks
    pool = be.new_kv_pool(n_layers=1, n_kv_heads=n_kv, head_dim=hd, n_blocks=need, block_size=block_size,
                          k_type=k_type, v_type=v_type)
    kv = BlockManager(pool, enable_prefix_caching=False)
    kv.allocate("spare", list(range(spare_blocks * block_size)))
    for i, (k, v) in enumerate(rows):
        kv.allocate(i, list(range(len(k))))
        if i == 0:
            kv.free("spare")
        be.store_kv(pool, 0, meta(kv, [(i, 0, len(k))]), k, v)
    return pool, kv


def meta(kv, steps) -> AttnMeta:
    """AttnMeta of a step: steps is a list of (seq, start, T), positions start .. start + T - 1."""
    positions = np.concatenate([np.arange(s, s + T) for _, s, T in steps]).astype(np.int64)
    slots = np.concatenate([kv.slot_mapping(q, s, T) for q, s, T in steps]).astype(np.int64)
    seg_of_token = np.concatenate([np.full(T, j) for j, (_, _, T) in enumerate(steps)]).astype(np.int32)
    seg_starts = np.concatenate([[0], np.cumsum([T for _, _, T in steps])]).astype(np.int64)
    ids = [kv.block_table(q) for q, _, _ in steps]
    tables = np.full((len(steps), max(map(len, ids))), -1, np.int32)
    for j, b in enumerate(ids):
        tables[j, :len(b)] = b
    return AttnMeta(positions, slots, seg_of_token, seg_starts, tables, kv.block_size)


def queries(steps, n_heads, hd, seed=1, scale=1.0):
    """One query row per (sequence, position), a function of those two alone, stacked in the
    order of the step's tokens: float32[N, n_heads, hd]."""
    out = []
    for q, s, T in steps:
        for p in range(s, s + T):
            rng = np.random.default_rng([seed, q, p])
            out.append((rng.standard_normal((n_heads, hd)) * scale).astype(np.float32))
    return np.stack(out)


def target_rows(be, pool, kv, layouts, targets, n_heads, hd, seed, scale):
    """{(layout, sequence, position): bits} of attention's output rows at the target positions,
    for each layout (a name -> list of steps, each a list of (sequence, start, T)), on layer 0."""
    got = {}
    for layout, batches in layouts.items():
        for steps in batches:
            q = queries(steps, n_heads, hd, seed=seed, scale=scale)
            out = np.empty_like(q)
            be.attention(out, q, pool, 0, meta(kv, steps))
            i = 0
            for seq, start, T in steps:
                for p in range(start, start + T):
                    if (seq, p) in targets:
                        got[layout, seq, p] = out[i].view(np.uint32).copy()
                    i += 1
    return got
