"""The paged KV cache (refinfer/kv_cache.py): storage exactness per cache type, pool sizing,
prefix-cache hits and their cap, LRU eviction, exhaustion, copy-on-write after truncation, and a
stateful property test of random workloads against a contiguous per-sequence model, with
check_accounting() after every operation and a negative control showing that it can fail."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from refinfer.backends.numpy_backend import round_f16
from refinfer.errors import RefinferError, ShapeError, UnsupportedError
from refinfer.kv_cache import BlockManager, BlockPool, get_cache_type

N_KV, HD, LAYERS = 2, 8, 2


def make(n_blocks, block_size, *, k_type="f16", v_type="f32", n_kv=N_KV, hd=HD, n_layers=LAYERS, caching=True):
    pool = BlockPool(n_layers, n_kv, hd, n_blocks, block_size, k_type, v_type)
    return BlockManager(pool, enable_prefix_caching=caching)


def kv_rows(tokens, pos, n_kv=N_KV, hd=HD, n_layers=LAYERS):
    """What a model would compute at pos: a pure function of the token prefix, so KV taken from the
    prefix cache must equal KV computed afresh. -> float32[n_layers, 2 (K, V), n_kv, hd]"""
    seed = hashlib.sha256(np.asarray(tokens[:pos + 1], "<i8").tobytes()).digest()
    rng = np.random.default_rng(int.from_bytes(seed[:8], "little"))
    return (rng.standard_normal((n_layers, 2, n_kv, hd)) * 10).astype(np.float32)


def compute(mgr, seq, start, end, tokens):
    """The forward pass's part: write positions start..end-1 of every layer, then mark them computed."""
    rows = np.stack([kv_rows(tokens, p) for p in range(start, end)]) if end > start else np.zeros((0, LAYERS, 2, N_KV, HD), np.float32)
    for layer in range(LAYERS):
        mgr.write(layer, seq, start, rows[:, layer, 0], rows[:, layer, 1])
    mgr.mark_computed(seq, end)
    return rows


def as_f16(x):
    with np.errstate(over="ignore"):                 # beyond 65504: inf, as the cache stores it
        return x.astype(np.float16).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Cache types and write/gather exactness

TIES_F16 = np.array([1 + 2.0**-11, 1 + 3 * 2.0**-11, 2.0**-25, 3 * 2.0**-25, 65520.0, -65519.0, 2.0**-14 * 1.5, 0.0, -0.0],
                    np.float32)  # halfway cases (to even), smallest subnormal halves, overflow to inf, negative zero


@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize("head_dim", [64, 5, 7])
@pytest.mark.parametrize("cache_type", ["f32", "f16"])
def test_write_gather_exact(block_size, head_dim, cache_type):
    n_kv, n = 3, 41
    mgr = make(2 * n, block_size, k_type=cache_type, v_type=cache_type, n_kv=n_kv, hd=head_dim)
    rng = np.random.default_rng(block_size * 100 + head_dim)
    k = (rng.standard_normal((n, n_kv, head_dim)) * 100).astype(np.float32)
    v = (rng.standard_normal((n, n_kv, head_dim)) * 1e-4).astype(np.float32)
    k.reshape(-1)[:len(TIES_F16)] = TIES_F16
    # two sequences grown in turn, so that neither table is the identity
    for s in ("a", "b"):
        mgr.allocate(s, [1])
    for p in range(1, n):
        for s in ("a", "b"):
            mgr.append_slot(s, p)
    starts = [0, 1, 2, 5, 17, 18, 33, n]          # uneven chunks across block boundaries
    for layer in range(LAYERS):
        for a, b in zip(starts, starts[1:]):
            mgr.write(layer, "a", a, k[a:b], v[a:b])
            mgr.write(layer, "b", a, -k[a:b], v[a:b])
    assert set(mgr.block_table("a")).isdisjoint(mgr.block_table("b"))
    for layer in range(LAYERS):
        ka, va = mgr.gather(layer, "a", n)
        kb, _ = mgr.gather(layer, "b", n)
        assert ka.dtype == np.float32 and ka.shape == (n, n_kv, head_dim)
        if cache_type == "f32":
            assert np.array_equal(ka, k) and np.array_equal(va, v) and np.array_equal(kb, -k)
        else:
            assert np.array_equal(ka, as_f16(k)) and np.array_equal(va, as_f16(v))
            # the value ggml mode's store_kv reads back from llama.cpp's F16 cache
            assert np.array_equal(ka, round_f16(k)) and np.array_equal(kb, round_f16(-k))
        assert np.array_equal(mgr.gather(layer, "a", 7)[0], ka[:7])
    # slot_mapping names the same rows: the pool viewed as [layer, slot, kv_head, row_bytes]
    slots = mgr.slot_mapping("a", 0, n)
    flat = mgr.pool.k[1].reshape(-1, n_kv, mgr.pool.k.shape[-1])
    assert np.array_equal(get_cache_type(cache_type).load(flat[slots]), mgr.gather(1, "a", n)[0])
    if cache_type == "f16":
        assert np.isinf(ka.reshape(-1)[4]) and ka.reshape(-1)[0] == 1.0 and ka.reshape(-1)[3] == 2.0**-23
    mgr.free("a")
    mgr.free("b")
    mgr.check_accounting()


def test_k_and_v_types_differ_and_layout():
    mgr = make(5, 4, k_type="f16", v_type="f32", n_kv=3, hd=6)
    assert mgr.pool.k.shape == (LAYERS, 5, 4, 3, 12) and mgr.pool.v.shape == (LAYERS, 5, 4, 3, 24)
    assert mgr.pool.k.dtype == np.uint8
    with pytest.raises(UnsupportedError, match="unknown KV cache type 'q9'.*f32, f16"):
        BlockPool(1, 1, 8, 1, k_type="q9")


def test_write_checks_shapes_and_slots():
    mgr = make(4, 4)
    mgr.allocate(0, [1, 2, 3])
    with pytest.raises(ShapeError, match=r"\[T, 2, 8\]"):
        mgr.write(0, 0, 0, np.zeros((3, 2, 7)), np.zeros((3, 2, 7)))
    with pytest.raises(RefinferError, match="positions 1..3 outside its 3 slots"):
        mgr.write(0, 0, 1, np.zeros((3, 2, 8)), np.zeros((3, 2, 8)))


# ---------------------------------------------------------------------------------------------
# Sizing

def test_sizing_from_mib_and_tokens():
    shape = dict(n_layers=2, n_kv_heads=3, head_dim=64, block_size=16, k_type="f16", v_type="f32")
    assert BlockPool.bytes_per_block(**shape) == 2 * 16 * 3 * (64 * 2 + 64 * 4) == 36864
    assert BlockPool.from_mib(1, **shape).n_blocks == (1 << 20) // 36864 == 28
    assert BlockPool.from_mib(0.5, **shape).n_blocks == 14
    assert BlockPool.from_tokens(40, **shape).n_blocks == 2          # floor: 32 of the 40 positions
    assert BlockPool.from_tokens(16, **shape).n_blocks == 1
    with pytest.raises(RefinferError, match=r"--kv-cache-mib 0.01 holds no KV block: one block of 16 positions takes 36864 bytes") as e:
        BlockPool.from_mib(0.01, **shape)
    assert "--kv-cache-mib 0.036 or more" in e.value.hint
    with pytest.raises(RefinferError, match="--kv-cache-tokens 15 holds no KV block: one block of 16 positions") as e:
        BlockPool.from_tokens(15, **shape)
    assert "--kv-cache-tokens 16 /" in e.value.hint
    for bad in (0, -1, float("nan"), "8"):
        with pytest.raises(RefinferError, match="--kv-cache-mib must be a positive number"):
            BlockPool.from_mib(bad, **shape)
    with pytest.raises(RefinferError, match="--kv-block-size must be a positive integer, got 0"):
        BlockPool.from_tokens(64, **{**shape, "block_size": 0})


# ---------------------------------------------------------------------------------------------
# Prefix caching

@pytest.mark.parametrize("prompt_len, hit", [(40, 32), (32, 16), (33, 32), (16, 0), (1, 0)])
def test_prefix_hit_capped_at_length_minus_one(prompt_len, hit):
    mgr = make(16, 16)
    prompt = list(range(100, 100 + prompt_len))
    assert mgr.allocate("first", prompt) == 0
    compute(mgr, "first", 0, prompt_len, prompt)
    assert mgr.allocate("second", prompt) == hit
    assert mgr.num_computed_tokens("second") == hit
    s = mgr.stats()
    assert (s.prefix_queries, s.prefix_hits) == (2 * prompt_len, hit)
    # the shared blocks are held by both tables; the rest are the second's own
    assert mgr.block_table("second")[:hit // 16] == mgr.block_table("first")[:hit // 16]
    assert s.used == 2 * mgr.blocks_needed(prompt_len) - hit // 16
    mgr.check_accounting()
    # the cached positions read back as what the first sequence wrote
    rows = compute(mgr, "second", hit, prompt_len, prompt)
    k, v = mgr.gather(1, "second", prompt_len)
    k0, v0 = mgr.gather(1, "first", prompt_len)
    assert np.array_equal(k, k0) and np.array_equal(v, v0)
    assert np.array_equal(v[hit:], rows[:, 1, 1])
    mgr.free("first"), mgr.free("second")
    mgr.check_accounting()
    # after both are freed the blocks stay cached, and a third request still hits
    assert mgr.allocate("third", prompt) == hit
    mgr.free("third")
    mgr.check_accounting()
    assert mgr.stats().used == 0


def test_prompt_logprobs_request_skips_the_cache():
    mgr = make(16, 16)
    prompt = list(range(40))
    mgr.allocate("a", prompt)
    compute(mgr, "a", 0, 40, prompt)
    # a request that needs prompt logprobs computes every position, and the query is not counted
    assert mgr.can_allocate(prompt, use_prefix_cache=False)
    assert mgr.allocate("logprobs", prompt, use_prefix_cache=False) == 0
    assert set(mgr.block_table("a")).isdisjoint(mgr.block_table("logprobs"))
    assert (mgr.stats().prefix_queries, mgr.stats().prefix_hits) == (40, 0)
    compute(mgr, "logprobs", 0, 40, prompt)       # its blocks duplicate known hashes: not registered
    mgr.check_accounting()
    assert len(mgr.cached) == 2
    mgr.free("a"), mgr.free("logprobs")
    assert mgr.stats().cached == 2 and mgr.stats().free == 14
    assert mgr.allocate("b", prompt) == 32


def test_prefix_caching_disabled():
    mgr = make(8, 4, caching=False)
    prompt = list(range(12))
    mgr.allocate("a", prompt)
    compute(mgr, "a", 0, 12, prompt)
    assert mgr.allocate("b", prompt) == 0 and not mgr.cached
    mgr.check_accounting()


def test_hash_is_stable_across_processes():
    """The block key must not depend on PYTHONHASHSEED (Python's hash() of a tuple does)."""
    code = "from refinfer.kv_cache import NONE_HASH, hash_block_tokens as h; print(h(h(NONE_HASH, (1, 2, 3)), [4, 5, 6]).hex())"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outs) == 1 and len(outs.pop().strip()) == 64


# ---------------------------------------------------------------------------------------------
# Eviction, exhaustion, truncation

def test_lru_eviction_order():
    mgr = make(6, 2)
    a, b, c = [1, 2, 3, 4, 5], [7, 8, 9, 10, 11], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]
    for seq, prompt in (("a", a), ("b", b)):
        mgr.allocate(seq, prompt)
        compute(mgr, seq, 0, len(prompt), prompt)
    a_blocks, b_blocks = mgr.block_table("a"), mgr.block_table("b")
    mgr.free("a")
    mgr.free("b")                                   # a freed before b: a's blocks are older
    assert mgr.stats().cached == 4 and mgr.stats().free == 2
    # the unregistered partial blocks go first, then the cached ones least recently freed first,
    # each table tail first
    assert list(mgr.free_queue) == [b_blocks[2], a_blocks[2], a_blocks[1], a_blocks[0], b_blocks[1], b_blocks[0]]
    mgr.allocate("c", c[:6])                        # 3 new blocks: the two empty ones, then a's tail
    mgr.check_accounting()
    assert len(mgr._prefix_hits(a)) == 1 and len(mgr._prefix_hits(b)) == 2
    mgr.free("c")

    mgr = make(6, 2)
    for seq, prompt in (("a", a), ("b", b)):
        mgr.allocate(seq, prompt)
        compute(mgr, seq, 0, len(prompt), prompt)
    mgr.free("a")
    mgr.free("b")
    assert mgr.allocate("hit-a", a) == 4             # a hit takes a's blocks out of the queue,
    mgr.free("hit-a")                                # and freeing puts them back as the most recent
    mgr.allocate("d", [40, 41, 42, 43, 44])          # 3 new blocks: two empty ones, then b's tail
    assert len(mgr._prefix_hits(a)) == 2 and len(mgr._prefix_hits(b)) == 1
    mgr.check_accounting()


def test_exhausted_pool_reports_and_never_fitting_request_is_an_error():
    mgr = make(4, 4)
    mgr.allocate("a", list(range(16)))
    assert not mgr.can_allocate([1])
    assert not mgr.can_append("a")
    with pytest.raises(RefinferError, match="KV pool exhausted: sequence 'b' needs 1 blocks, 0 are free"):
        mgr.allocate("b", [1])
    with pytest.raises(RefinferError, match="KV pool exhausted: all 4 blocks are in use"):
        mgr.append_slot("a", 5)
    mgr.check_accounting()
    with pytest.raises(RefinferError, match="request needs 17 KV positions = 5 blocks of 4, but the KV pool holds 4 blocks "
                                            r"\(16 positions\)") as e:
        mgr.check_fits(17)
    assert "--kv-cache-mib" in e.value.hint
    mgr.free("a")
    assert not mgr.can_allocate(list(range(17)))
    with pytest.raises(RefinferError, match="needs 17 KV positions"):
        mgr.allocate("c", list(range(17)))
    mgr.check_accounting()


def test_append_slot_crosses_block_boundaries():
    mgr = make(4, 3)
    mgr.allocate("a", [1, 2])
    assert [mgr.append_slot("a", t) for t in (3, 4, 5)] == [2, 3, 4]
    assert len(mgr.block_table("a")) == 2 and mgr.can_append("a", 4) and not mgr.can_append("a", 8)
    mgr.check_accounting()


def test_truncate_rollback_unregisters_stale_block():
    mgr = make(8, 4)
    prompt = list(range(12))
    mgr.allocate("a", prompt)
    compute(mgr, "a", 0, 12, prompt)                 # 3 blocks registered
    mgr.truncate("a", 6)                             # block 1 keeps 2 of its 4 tokens
    assert len(mgr.block_table("a")) == 2 and mgr.num_computed_tokens("a") == 6
    mgr.check_accounting()
    assert mgr.can_allocate(prompt) and len(mgr._prefix_hits(prompt)) == 2   # its KV is still intact
    new = prompt[:6] + [90, 91, 92, 93, 94, 95]
    for t in new[6:]:
        mgr.append_slot("a", t)
    compute(mgr, "a", 6, 12, new)
    mgr.check_accounting()
    # the old prompt now hits only block 0: block 1 holds other tokens and left the map
    assert mgr.allocate("b", prompt) == 4
    assert mgr.allocate("c", new) == 8
    compute(mgr, "b", 4, 12, prompt)
    for seq, toks in (("a", new), ("b", prompt)):
        k, _ = mgr.gather(0, seq, 12)
        assert np.array_equal(k, as_f16(np.stack([kv_rows(toks, p)[0, 0] for p in range(12)])))
    mgr.truncate("a", 0)
    assert mgr.block_table("a") == []
    mgr.check_accounting()


def test_truncate_into_shared_block_copies_on_write():
    mgr = make(10, 4)
    prompt = list(range(20))
    mgr.allocate("a", prompt)
    compute(mgr, "a", 0, 20, prompt)
    assert mgr.allocate("b", prompt) == 16
    compute(mgr, "b", 16, 20, prompt)
    mgr.truncate("b", 10)                            # b keeps 2 positions of a block a holds too
    shared = mgr.block_table("b")[2]
    assert mgr.blocks[shared].ref_cnt == 2
    assert mgr.can_append("b") and mgr.stats().used == 5
    with pytest.raises(AssertionError, match=f"write into block {shared} .ref_cnt 2"):
        mgr.write(0, "b", 8, np.zeros((1, N_KV, HD)), np.zeros((1, N_KV, HD)))
    assert mgr.append_slot("b", 77) == 10
    assert mgr.block_table("b")[2] != shared and mgr.blocks[shared].ref_cnt == 1
    compute(mgr, "b", 10, 11, prompt[:10] + [77])
    mgr.check_accounting()
    for seq, toks in (("a", prompt), ("b", prompt[:10] + [77])):
        for layer in range(LAYERS):
            k, v = mgr.gather(layer, seq, len(toks))
            want = np.stack([kv_rows(toks, p)[layer] for p in range(len(toks))])
            assert np.array_equal(k, as_f16(want[:, 0])) and np.array_equal(v, want[:, 1])


def test_can_append_counts_the_copy_on_write_block():
    mgr = make(4, 4)
    prompt = list(range(12))
    mgr.allocate("a", prompt)
    compute(mgr, "a", 0, 12, prompt)
    assert mgr.allocate("b", prompt[:8] + [99]) == 8
    mgr.truncate("b", 6)                             # b's last block is a's block 1, shared, 2 of 4 used
    mgr.allocate("c", [5])                           # takes the last free block
    assert mgr.stats().free + mgr.stats().cached == 0
    assert not mgr.can_append("b")                   # no block boundary, but the copy needs a block
    mgr.free("c")
    assert mgr.can_append("b") and mgr.append_slot("b", 42) == 6
    mgr.check_accounting()


# ---------------------------------------------------------------------------------------------
# Negative control: check_accounting() catches each kind of broken bookkeeping

def _busy_manager():
    mgr = make(8, 4)
    prompt = list(range(10))
    mgr.allocate("a", prompt)
    compute(mgr, "a", 0, 10, prompt)
    mgr.allocate("b", prompt)
    mgr.check_accounting()
    return mgr


def _drop_ref(mgr):
    mgr.blocks[mgr.block_table("a")[0]].ref_cnt -= 1


def _leak_free_block(mgr):
    mgr.free_queue.popitem(last=False)


def _corrupt_cached_tokens(mgr):
    b = mgr.blocks[mgr.block_table("a")[1]]
    b.token_ids = (0,) + b.token_ids[1:]


def _forget_hash_entry(mgr):
    mgr.cached.popitem()


def _share_unregistered_block(mgr):
    """b's own partial block swapped for a's, with ref counts and queue kept consistent."""
    own, theirs = mgr.tables["b"].block_ids[-1], mgr.tables["a"].block_ids[-1]
    mgr.tables["b"].block_ids[-1] = theirs
    mgr.blocks[theirs].ref_cnt += 1
    mgr.blocks[own].ref_cnt -= 1
    mgr.free_queue[own] = None


@pytest.mark.parametrize("breaker, message", [(_drop_ref, "2: block .* has ref_cnt 1, 2 tables"),
                                              (_leak_free_block, "1: queue"),
                                              (_corrupt_cached_tokens, "3: block .*'s hash"),
                                              (_forget_hash_entry, "3: block .* registered, not in the map"),
                                              (_share_unregistered_block, "5: block .* shared but not registered")])
def test_check_accounting_catches_broken_invariants(breaker, message):
    mgr = _busy_manager()
    breaker(mgr)
    with pytest.raises(AssertionError, match=message):
        mgr.check_accounting()


# ---------------------------------------------------------------------------------------------
# Property test: random workloads against a contiguous per-sequence model

BASE = [int(t) for t in np.random.default_rng(0).integers(0, 4, 40)]   # shared prefixes, small vocabulary


class Workload(RuleBasedStateMachine):
    """Allocate prompts with shared prefixes, compute them in chunks, append (with preemption when
    the pool is full), truncate and free. The test's model of each sequence is a contiguous list of
    the rows its positions hold: those written for it, and for prefix hits the rows written for the
    same tokens by whoever computed them first (kv_rows is a pure function of the prefix)."""

    @initialize(block_size=st.sampled_from([1, 3, 4, 16]), n_blocks=st.integers(2, 30))
    def setup(self, block_size, n_blocks):
        self.mgr = make(n_blocks, block_size, n_kv=1, hd=3)
        self.model: dict[int, list] = {}             # seq -> rows of its computed positions
        self.next_id = 0

    def rows(self, seq, start, end):
        toks = self.mgr.tables[seq].token_ids
        return [kv_rows(toks, p, n_kv=1, hd=3) for p in range(start, end)]

    @rule(prefix=st.sampled_from([0, 3, 8, 12, 13, 24, 40]) | st.integers(0, 40),
          suffix=st.lists(st.integers(0, 3), max_size=6), logprobs=st.booleans())
    def new_sequence(self, prefix, suffix, logprobs):
        prompt = BASE[:prefix] + suffix
        if not prompt:
            return
        if self.mgr.blocks_needed(len(prompt)) > len(self.mgr.blocks):
            with pytest.raises(RefinferError, match="can never|needs .* KV positions"):
                self.mgr.allocate(self.next_id, prompt)
            return
        if not self.mgr.can_allocate(prompt, use_prefix_cache=not logprobs):
            with pytest.raises(RefinferError, match="KV pool exhausted"):
                self.mgr.allocate(self.next_id, prompt, use_prefix_cache=not logprobs)
            return
        seq, self.next_id = self.next_id, self.next_id + 1
        hits_before = self.mgr.prefix_hits
        n_cached = self.mgr.allocate(seq, prompt, use_prefix_cache=not logprobs)
        assert n_cached % self.mgr.block_size == 0 and n_cached <= len(prompt) - 1
        assert self.mgr.prefix_hits - hits_before == n_cached
        if logprobs:
            assert n_cached == 0
        self.model[seq] = self.rows(seq, 0, n_cached)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), chunk=st.integers(1, 7) | st.just(40))
    def compute_chunk(self, data, chunk):
        seq = data.draw(st.sampled_from(sorted(self.model)))
        start = self.mgr.num_computed_tokens(seq)
        end = min(start + chunk, len(self.mgr.tables[seq].token_ids))
        rows = self.rows(seq, start, end)
        for layer in range(LAYERS):
            if rows:
                self.mgr.write(layer, seq, start, np.stack([r[layer, 0] for r in rows]), np.stack([r[layer, 1] for r in rows]))
        self.mgr.mark_computed(seq, end)
        self.model[seq] += rows

    @precondition(lambda self: self.model)
    @rule(data=st.data(), tokens=st.lists(st.integers(0, 3), min_size=1, max_size=4))
    def append(self, data, tokens):
        self._append(data.draw(st.sampled_from(sorted(self.model))), tokens)

    def _append(self, seq, tokens):
        if not self.mgr.can_append(seq, len(tokens)):
            self.mgr.free(seq)                       # preempt: its blocks go back, it is recomputed later
            del self.model[seq]
            return
        for t in tokens:
            assert self.mgr.append_slot(seq, t) == len(self.mgr.tables[seq].token_ids) - 1

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def truncate(self, data):
        seq = data.draw(st.sampled_from(sorted(self.model)))
        n = data.draw(st.integers(0, len(self.mgr.tables[seq].token_ids)))
        self.mgr.truncate(seq, n)
        del self.model[seq][n:]

    @precondition(lambda self: any(self.mgr.num_cached_tokens(s) for s in self.model))
    @rule(data=st.data(), tokens=st.lists(st.integers(0, 3), min_size=1, max_size=3))
    def rollback_into_prefix_hit(self, data, tokens):
        """Truncate into blocks that came from the prefix cache, then write there again: the
        shared block must be copied, a registered one of its own unregistered."""
        seq = data.draw(st.sampled_from([s for s in sorted(self.model) if self.mgr.num_cached_tokens(s)]))
        n = data.draw(st.integers(1, self.mgr.num_cached_tokens(seq)))
        self.mgr.truncate(seq, n)
        del self.model[seq][n:]
        self._append(seq, tokens)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.model)))
        self.mgr.free(seq)
        del self.model[seq]

    @invariant()
    def accounting_and_contents(self):
        self.mgr.check_accounting()
        s = self.mgr.stats()
        assert s.used + s.cached + s.free == s.n_blocks
        for seq, rows in self.model.items():
            assert self.mgr.num_computed_tokens(seq) == len(rows)
            for layer in range(LAYERS):
                k, v = self.mgr.gather(layer, seq, len(rows))
                want = np.stack([r[layer] for r in rows]) if rows else np.zeros((0, 2, 1, 3), np.float32)
                assert np.array_equal(k, as_f16(want[:, 0])) and np.array_equal(v, want[:, 1])

    def teardown(self):
        for seq in list(self.model):
            self.mgr.free(seq)
        self.mgr.check_accounting()
        s = self.mgr.stats()
        assert s.used == 0 and s.cached + s.free == s.n_blocks   # nothing leaked


Workload.TestCase.settings = settings(max_examples=200, stateful_step_count=50, deadline=None, derandomize=True,
                                      suppress_health_check=[HealthCheck.too_slow])
test_random_workloads = Workload.TestCase
