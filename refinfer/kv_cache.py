"""Paged KV cache: a pool of fixed-size blocks, a block table per sequence, prefix caching.

Terms (vLLM's and nano-vllm's names):
  row          one position of one KV head: head_dim values, stored as the cache type's bytes.
  block        block_size consecutive positions of one sequence, in every layer, K and V.
  block table  a sequence's block ids in order: position p lives in block table[p // block_size]
               at offset p % block_size.
  slot         block_id * block_size + offset: a position's index in the pool viewed as
               [n_layers, n_blocks * block_size, n_kv_heads, row_bytes] (vLLM's slot_mapping).

Pool layout (BlockPool.k and BlockPool.v, one array each so that K and V can differ in type):

    uint8[n_layers, n_blocks, block_size, n_kv_heads, row_bytes]    row_bytes = type.row_bytes(head_dim)

Position-major inside a block, as vLLM's [num_blocks, block_size, num_kv_heads, head_size]:
one token's K for all heads is one contiguous write, and a block of one layer is one
contiguous run of block_size * n_kv_heads * row_bytes bytes, so a paged-attention kernel reads
a block table's blocks as whole rows. Layer is the outer axis so that one layer's pool is a
plain view (pool.k[layer]). A row is the unit of a cache type, so types with codes plus scales
fit: q8_0 would take head_dim // 32 * (2 + 32) bytes a row, an LMDeploy-style int8 type
head_dim + 2 + 2 (codes, an f16 scale and zero point per head and position).

Prefix caching (vLLM v1's scheme):
  - A full block's hash is sha256(parent hash || its block_size tokens as little-endian int64),
    the first block's parent being NONE_HASH; the chain makes equal hashes mean equal prefixes.
    sha256 over a fixed encoding, not Python's hash(), which is salted per process.
  - A block is registered under its hash by mark_computed, once its KV has been written in every
    layer, never at allocation: a hash entry is a promise that the KV is there, and a block
    allocated for a prompt chunk that is not yet computed holds garbage.
  - allocate() reuses the longest chain of registered blocks, capped at len(prompt) - 1
    positions: the last prompt token is always computed, so that its logits exist. A request
    that needs prompt logprobs passes use_prefix_cache=False: its positions are all computed.
  - A hash maps to one block; a block computed again under a known hash (a request that skipped
    the cache) stays unregistered and is reused as a plain block.
  - A registered block is never written. Before a sequence writes into a partial block again
    (after truncate), append_slot copies it if other tables hold it (copy-on-write) and
    otherwise unregisters it, so no hash outlives the tokens it names.

Block states. Every block is exactly one of
    used     ref_cnt > 0: held by ref_cnt block tables (ref_cnt > 1 only through prefix hits)
    cached   ref_cnt == 0 and registered: kept for future hits until evicted
    free     ref_cnt == 0 and not registered: holds nothing worth keeping
Cached and free blocks wait in one queue (vLLM's FreeKVCacheBlockQueue) and new blocks come from
its front. A freed cached block joins the back, so cached blocks are evicted least recently freed
first; a table is freed tail first, so a sequence's last blocks, the least shared, go first. A
freed block that is not registered joins the front: reusing it evicts nothing. A hit on a cached
block takes it out of the queue.

Invariants (check_accounting() asserts every one):
  1. The queue holds each block with ref_cnt == 0 once, and no other block.
  2. A block's ref_cnt is the number of entries in the block tables that name it.
  3. The hash map and the registered blocks agree one to one; every registered block is full,
     and its hash is that of its parent hash and its tokens.
  4. A table has one block per block_size positions; its chain hashes are those of its tokens;
     every registered block in it holds, at the positions the table uses, the table's tokens.
  5. ref_cnt > 1 only for registered blocks.
  So when every sequence has been freed, every block is free or cached: none has leaked.

Use from an engine and the forward pass (one step of a ragged batch):
    mgr = BlockManager(BlockPool.from_mib(mib, n_layers=..., n_kv_heads=..., head_dim=...,
                                          k_type="f16", v_type="f16"))
    mgr.check_fits(len(prompt) + max_tokens)       # at submit: a request that can never fit
    if mgr.can_allocate(prompt): n_cached = mgr.allocate(seq, prompt)   # compute from n_cached
    if not mgr.can_append(seq): preempt (mgr.free) the last running sequence, recompute it later
    pos = mgr.append_slot(seq, token)              # decode: the slot of the token fed next
    for each layer: mgr.write(layer, seq, start, k, v) for every segment, then attention over
        mgr.gather(layer, seq, start + T) (reference) or the pool arrays through
        mgr.block_table(seq) / mgr.slot_mapping(seq, start, T) (backends)
    mgr.mark_computed(seq, start + T)              # after the step: registers full blocks
    mgr.truncate(seq, n)                           # speculative rollback
    mgr.free(seq)                                  # finished, cancelled or preempted
A BlockManager is not thread-safe: the engine's step thread owns it.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable

import numpy as np

from .errors import RefinferError, ShapeError, UnsupportedError
from .quant._common import f32_to_fp16_bits, fp16_to_f32

DEFAULT_BLOCK_SIZE = 16
MIB = 1 << 20


def _expect(ok: bool, message: str):
    """Accounting checks: an AssertionError that `python -O` does not strip."""
    if not ok:
        raise AssertionError(message)


# ---------------------------------------------------------------------------------------------
# Cache types: how one row of head_dim float32 values is kept as bytes.

@dataclass(frozen=True)
class CacheType:
    """One way of keeping a row (one position of one KV head) as bytes. Rows reach store and
    load with the KV-head axis second to last: [..., n_kv_heads, head_dim] values and
    [..., n_kv_heads, row_bytes] bytes, so per-head parameters broadcast over it."""
    name: str
    row_bytes: Callable[[int], int]                    # head_dim -> bytes of one row; ShapeError if it does not fit
    store: Callable[[np.ndarray, np.ndarray], None]    # store(dst uint8[..., row_bytes], rows float[..., head_dim])
    load: Callable[[np.ndarray], np.ndarray]           # load(src uint8[..., row_bytes]) -> float32[..., head_dim] (f64: float64)
    doc: str
    kind: str = "float"                 # family: float, ggml, lmdeploy, calibrated, fp8
    exact: CacheType | None = None      # the variant ggml mode stores and loads with (None: this one)
    # parts(src uint8[..., row_bytes]) -> {"codes": int32[..., head_dim], "scale": float32[..., groups], ...}:
    # the stored fields of quantized rows, for dumps (None: a float type, whose values are its fields)
    parts: Callable[[np.ndarray], dict] | None = None

    def for_layer(self, layer: int) -> CacheType:
        """The type as layer `layer` uses it: itself, or a calibrated type bound to that layer's parameters."""
        return self

    def in_mode(self, mode: str) -> CacheType:
        """ggml mode stores and loads with the exact variant where the type has one."""
        return self.exact if mode == "ggml" and self.exact is not None else self


def _store_f32(dst, rows):
    dst[...] = np.ascontiguousarray(rows, dtype="<f4").view(np.uint8)


def _load_f32(src):
    return np.ascontiguousarray(src).view("<f4").astype(np.float32)


def _store_f16(dst, rows):
    # round to nearest even with subnormals, overflow to inf: GGML_FP32_TO_FP16, which is what
    # llama.cpp's F16 cache holds (NumpyBackend.store_kv in ggml mode rounds the same way)
    dst[...] = np.ascontiguousarray(f32_to_fp16_bits(rows)).view(np.uint8)


def _load_f16(src):
    return fp16_to_f32(np.ascontiguousarray(src).view("<u2"))


def _store_f64(dst, rows):
    dst[...] = np.ascontiguousarray(rows, dtype="<f8").view(np.uint8)


def _load_f64(src):
    return np.ascontiguousarray(src).view("<f8").astype(np.float64)


def _ggml_type(name: str, doc: str, quantize_blocks=None) -> CacheType:
    """A ggml block type as a cache type: a row of head_dim values is head_dim / block_size
    blocks (llama.cpp refuses a type whose block does not divide n_embd_head_k), stored with
    the quantizer llama.cpp's CPU backend stores with (the type's from_float, which
    ggml_set_rows calls: _ref for q4_0, q4_1, q5_0, q5_1, bf16; the x86 variant for q8_0)."""
    from . import quant
    bt = quant.get_type(name)

    def row_bytes(hd):
        if hd % bt.block_size:
            raise ShapeError(f"KV cache type {name}: head_dim {hd} is not a multiple of its block size {bt.block_size}",
                             hint=f"llama.cpp refuses it too; use f16 or a type whose block divides {hd}")
        return hd // bt.block_size * bt.type_size

    def store(dst, rows):
        rows = np.asarray(rows, dtype=np.float32)
        flat = rows.reshape(-1, bt.block_size)
        raw = (quantize_blocks or bt.quantize_blocks)(flat)
        dst[...] = raw.reshape(dst.shape)

    def load(src):
        src = np.ascontiguousarray(src)
        n = src.shape[-1] // bt.type_size * bt.block_size
        return bt.dequantize_blocks(src.reshape(-1, bt.type_size)).reshape(src.shape[:-1] + (n,))

    def parts(src):
        """w = scale * codes + min per block of 32 (q4_0: codes = nibble - 8, q5_0: 5-bit code - 16)."""
        if not bt.name.startswith("q"):
            return None
        from .backends.numpy_backend import q8_decomposition
        src = np.ascontiguousarray(src)
        lead = src.shape[:-1]
        rows = int(np.prod(lead, dtype=np.int64))
        q, d, m = q8_decomposition(src.reshape(rows, -1), bt, rows)
        out = {"codes": q.reshape(lead + (-1,)).astype(np.int32), "scale": d.reshape(lead + (-1,))}
        if "m" in bt.layout.names:
            out["min"] = m.reshape(lead + (-1,))
        return out

    return CacheType(name, row_bytes, store, load, doc, kind="ggml", parts=None if name == "bf16" else parts)


def _q8_0_x86(x):
    from .quant.q8_0 import quantize_blocks_x86
    return quantize_blocks_x86(x)


F32 = CacheType("f32", lambda hd: 4 * hd, _store_f32, _load_f32, "float32, exact")
F16 = CacheType("f16", lambda hd: 2 * hd, _store_f16, _load_f16, "IEEE binary16, ggml's default KV type")
F64 = CacheType("f64", lambda hd: 8 * hd, _store_f64, _load_f64, "float64, for the float64 reference (dtype=np.float64)")
GGML_CACHE_TYPES = (
    _ggml_type("bf16", "bfloat16 (ggml's round-to-nearest-even)"),
    _ggml_type("q8_0", "llama.cpp's q8_0 blocks, stored as its x86 quantize_row_q8_0 does (half-even codes)", _q8_0_x86),
    _ggml_type("q4_0", "llama.cpp's q4_0 blocks (quantize_row_q4_0_ref)"),
    _ggml_type("q4_1", "llama.cpp's q4_1 blocks (quantize_row_q4_1_ref)"),
    _ggml_type("q5_0", "llama.cpp's q5_0 blocks (quantize_row_q5_0_ref)"),
    _ggml_type("q5_1", "llama.cpp's q5_1 blocks (quantize_row_q5_1_ref)"),
)
CACHE_TYPES: dict[str, CacheType] = {t.name: t for t in (F32, F16, F64, *GGML_CACHE_TYPES)}
# types that need a parameter file (calibrated scales): name -> (factory(kv_params, which) -> CacheType, doc)
PARAMETRIC_TYPES: dict[str, tuple[Callable, str]] = {}


def register_cache_type(ct: CacheType):
    CACHE_TYPES[ct.name] = ct


def register_parametric_type(name: str, factory: Callable, doc: str):
    PARAMETRIC_TYPES[name] = (factory, doc)


def cache_type_names() -> list[str]:
    return [n for n in (*CACHE_TYPES, *PARAMETRIC_TYPES) if n != "f64"]


def get_cache_type(name, kv_params=None, which="k") -> CacheType:
    """The cache type called name (a CacheType passes through). A parametric type is built from
    kv_params, the path of a parameter file (python -m refinfer calibrate-kv) or its loaded object,
    for K (which="k") or V."""
    if isinstance(name, CacheType):
        return name
    if name in CACHE_TYPES:
        return CACHE_TYPES[name]
    if name in PARAMETRIC_TYPES:
        if kv_params is None:
            raise RefinferError(f"KV cache type {name!r} needs calibrated parameters",
                                hint="make them with python -m refinfer calibrate-kv -m MODEL -o PARAMS.json and "
                                     "pass --kv-params PARAMS.json (Python: kv_params=...)")
        return PARAMETRIC_TYPES[name][0](kv_params, which)
    known = ", ".join(cache_type_names())
    raise UnsupportedError(f"unknown KV cache type {name!r}; known: {known}",
                           hint=f"the KV cache types are {known} (refinfer.kv_cache.CACHE_TYPES)")


def attn_rotation(k_type, v_type, head_dim) -> tuple[int, int]:
    """llama.cpp's attention rotation for a quantized cache (llama_kv_cache's attn_rot_k /
    attn_rot_v, src/llama-kv-cache.cpp): with a quantized K type and head_dim % 64 == 0, Q and K
    are multiplied by an orthonormal Walsh-Hadamard matrix of size n_k (the largest power of two
    dividing head_dim, build_input_k_rot) before K is stored, so that outliers spread over the
    block before quantization; with a quantized V type the same for V with n_v = 64
    (build_input_v_rot), and the attention output is rotated back. Q.K is unchanged in exact
    arithmetic (H is orthonormal, H^2 = I). Returns (n_k, n_v), 0 for no rotation. Only
    llama.cpp's own block types rotate; LMDeploy's and calibrated types do not."""
    def quantized(t):
        return t.kind == "ggml" and t.name != "bf16"
    n_k = n_v = 0
    if quantized(k_type) and head_dim % 64 == 0:
        n_k = 64
        while head_dim % (2 * n_k) == 0:
            n_k *= 2
    if quantized(v_type) and head_dim % 64 == 0:
        n_v = 64
    return n_k, n_v


# ---------------------------------------------------------------------------------------------
# The pool: the bytes of every block of every layer.

def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise RefinferError(f"{what} must be a positive integer, got {value!r}",
                            hint=f"pass {what} as a whole number of at least 1")
    return int(value)


class BlockPool:
    def __init__(self, n_layers, n_kv_heads, head_dim, n_blocks, block_size=DEFAULT_BLOCK_SIZE,
                 k_type="f32", v_type="f32"):
        self.n_layers = _positive_int(n_layers, "n_layers")
        self.n_kv_heads = _positive_int(n_kv_heads, "n_kv_heads")
        self.head_dim = _positive_int(head_dim, "head_dim")
        self.n_blocks = _positive_int(n_blocks, "the number of KV blocks")
        self.block_size = _positive_int(block_size, "--kv-block-size")
        self.k_type, self.v_type = get_cache_type(k_type), get_cache_type(v_type)
        self.check_types()
        shape = (self.n_layers, self.n_blocks, self.block_size, self.n_kv_heads)
        self.k = self.zeros(shape + (self.k_type.row_bytes(self.head_dim),))
        self.v = self.zeros(shape + (self.v_type.row_bytes(self.head_dim),))

    def check_types(self):
        """A pool in other memory (a device) refuses the cache types it has no kernels for."""

    def zeros(self, shape):  # -> uint8[shape], zeroed: the pool's memory (host here)
        return np.zeros(shape, np.uint8)

    @staticmethod
    def bytes_per_block(n_layers, n_kv_heads, head_dim, block_size=DEFAULT_BLOCK_SIZE, k_type="f32", v_type="f32") -> int:
        row = get_cache_type(k_type).row_bytes(head_dim) + get_cache_type(v_type).row_bytes(head_dim)
        return n_layers * block_size * n_kv_heads * row

    @classmethod
    def n_blocks_for(cls, mib=None, tokens=None, **shape) -> int:
        """Whole blocks in --kv-cache-mib MiB or --kv-cache-tokens positions (exactly one given),
        for a pool of this shape; a RefinferError when that is not a positive size or holds no block."""
        if (mib is None) == (tokens is None):
            raise RefinferError(f"give exactly one of --kv-cache-mib ({mib!r}) and --kv-cache-tokens ({tokens!r})",
                                hint="size the KV pool in MiB or in positions, not both")
        bs = _positive_int(shape.get("block_size", DEFAULT_BLOCK_SIZE), "--kv-block-size")
        bpb = cls.bytes_per_block(**shape)
        if mib is not None:
            if isinstance(mib, bool) or not isinstance(mib, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(mib) or mib <= 0:
                raise RefinferError(f"--kv-cache-mib must be a positive number, got {mib!r}",
                                    hint="give the KV pool's size in MiB, e.g. --kv-cache-mib 256")
            n_blocks, what = int(mib * MIB) // bpb, f"--kv-cache-mib {mib}"
        else:
            n_blocks, what = _positive_int(tokens, "--kv-cache-tokens") // bs, f"--kv-cache-tokens {tokens}"
        if n_blocks == 0:
            raise RefinferError(
                f"{what} holds no KV block: one block of {bs} positions takes {bpb} bytes "
                f"({bpb / MIB:.4g} MiB) for {shape['n_layers']} layers x {shape['n_kv_heads']} KV heads x "
                f"{shape['head_dim']} (K {shape.get('k_type', 'f32')}, V {shape.get('v_type', 'f32')})",
                hint=f"use --kv-cache-tokens {bs} / --kv-cache-mib {math.ceil(bpb / MIB * 1000) / 1000} or more, "
                     "or a smaller --kv-block-size")
        return n_blocks

    @classmethod
    def from_mib(cls, mib, **shape) -> BlockPool:
        """--kv-cache-mib: as many whole blocks as fit in mib MiB."""
        return cls(n_blocks=cls.n_blocks_for(mib=mib, **shape), **shape)

    @classmethod
    def from_tokens(cls, tokens, **shape) -> BlockPool:
        """--kv-cache-tokens: as many whole blocks as fit in that many positions."""
        return cls(n_blocks=cls.n_blocks_for(tokens=tokens, **shape), **shape)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one position takes in every layer, K and V: the pool's real bytes over its positions
        (n_layers * n_kv_heads * (K row_bytes + V row_bytes))."""
        return (self.k.nbytes + self.v.nbytes) // (self.n_blocks * self.block_size)

    def copy_block(self, src: int, dst: int, n_positions: int):
        """The first n_positions of block src, every layer, K and V, into block dst."""
        self.k[:, dst, :n_positions] = self.k[:, src, :n_positions]
        self.v[:, dst, :n_positions] = self.v[:, src, :n_positions]


# ---------------------------------------------------------------------------------------------
# Block tables and prefix caching.

NONE_HASH = hashlib.sha256(b"refinfer kv-cache: parent of a sequence's first block").digest()


def hash_block_tokens(parent_hash: bytes, token_ids) -> bytes:
    return hashlib.sha256(parent_hash + np.asarray(token_ids, dtype="<i8").tobytes()).digest()


@dataclass
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None     # set while registered in the hash map
    parent_hash: bytes | None = None    # with token_ids, what block_hash was computed from
    token_ids: tuple = ()


@dataclass
class BlockTable:
    block_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)      # every position that has a slot
    block_hashes: list[bytes] = field(default_factory=list)  # chain hashes of the full computed blocks
    num_computed: int = 0    # positions < num_computed hold KV in every layer
    num_cached: int = 0      # of those, positions taken from the prefix cache by allocate


@dataclass
class KVCacheStats:
    n_blocks: int
    used: int            # referenced by a table
    cached: int          # unreferenced, kept for prefix hits, evictable
    free: int            # unreferenced, empty
    prefix_queries: int  # prompt tokens looked up in the prefix cache
    prefix_hits: int     # of those, tokens found

    @property
    def usage(self) -> float:
        return self.used / self.n_blocks


class BlockManager:
    def __init__(self, pool: BlockPool, enable_prefix_caching: bool = True):
        self.pool = pool
        self.block_size = pool.block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(pool.n_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(pool.n_blocks))  # front: reused next
        self.cached: dict[bytes, int] = {}                    # block hash -> block id
        self.tables: dict[Hashable, BlockTable] = {}
        self.prefix_queries = self.prefix_hits = 0

    # -- block states ---------------------------------------------------------------------------

    def _new_block(self) -> int:
        if not self.free_queue:
            raise RefinferError(f"KV pool exhausted: all {len(self.blocks)} blocks are in use",
                                hint="check can_allocate() / can_append() first and preempt a sequence when they are False")
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:                     # evict the least recently freed cached block
            self._unregister(block)
        block.ref_cnt = 1
        return block_id

    def _ref(self, block_id: int):
        block = self.blocks[block_id]
        if block.ref_cnt == 0:                               # a hit revives a cached block
            del self.free_queue[block_id]
        block.ref_cnt += 1

    def _release(self, block_id: int):
        block = self.blocks[block_id]
        block.ref_cnt -= 1
        if block.ref_cnt == 0:
            self.free_queue[block_id] = None
            if block.block_hash is None:
                self.free_queue.move_to_end(block_id, last=False)

    def _unregister(self, block: Block):
        del self.cached[block.block_hash]
        block.block_hash, block.parent_hash, block.token_ids = None, None, ()

    # -- admission ------------------------------------------------------------------------------

    def blocks_needed(self, n_positions: int) -> int:
        return -(-n_positions // self.block_size)

    def check_fits(self, n_positions: int):
        """A request of n_positions that needs more blocks than the whole pool can never run."""
        need = self.blocks_needed(n_positions)
        if need > len(self.blocks):
            raise RefinferError(
                f"request needs {n_positions} KV positions = {need} blocks of {self.block_size}, "
                f"but the KV pool holds {len(self.blocks)} blocks ({len(self.blocks) * self.block_size} positions)",
                hint="raise --kv-cache-mib / --kv-cache-tokens, or shorten the prompt or max_tokens")

    def _prefix_hits(self, prompt) -> list[int]:
        """Block ids of the longest registered chain of prompt's full blocks, leaving at least the
        last token to compute (vLLM's max_cache_hit_length = prompt length - 1)."""
        hits, parent, bs = [], NONE_HASH, self.block_size
        for i in range((len(prompt) - 1) // bs):
            h = hash_block_tokens(parent, prompt[i * bs:(i + 1) * bs])
            if h not in self.cached:
                break
            hits.append(self.cached[h])
            parent = h
        return hits

    def _lookup(self, prompt, use_prefix_cache) -> list[int]:
        return self._prefix_hits(prompt) if self.enable_prefix_caching and use_prefix_cache else []

    def can_allocate(self, prompt, use_prefix_cache: bool = True) -> bool:
        hits = self._lookup(prompt, use_prefix_cache)
        revived = sum(self.blocks[b].ref_cnt == 0 for b in hits)    # hits that leave the queue too
        return self.blocks_needed(len(prompt)) - len(hits) <= len(self.free_queue) - revived

    def allocate(self, seq: Hashable, prompt, use_prefix_cache: bool = True) -> int:
        """Slots for every prompt position; returns how many leading positions the prefix cache
        already holds (the forward pass starts there)."""
        if seq in self.tables:
            raise RefinferError(f"sequence {seq!r} already has a block table", hint="free() it before allocating again")
        if len(prompt) == 0:
            raise RefinferError("cannot allocate KV blocks for an empty prompt", hint="give at least one token")
        self.check_fits(len(prompt))
        if not self.can_allocate(prompt, use_prefix_cache):
            raise RefinferError(f"KV pool exhausted: sequence {seq!r} needs {self.blocks_needed(len(prompt))} blocks, "
                                f"{len(self.free_queue)} are free or cached",
                                hint="check can_allocate() first and let the request wait or preempt another")
        hits = self._lookup(prompt, use_prefix_cache)
        if self.enable_prefix_caching and use_prefix_cache:
            self.prefix_queries += len(prompt)
            self.prefix_hits += len(hits) * self.block_size
        table = BlockTable(token_ids=[int(t) for t in prompt])
        for block_id in hits:                        # before _new_block, which could evict them
            self._ref(block_id)
            table.block_ids.append(block_id)
            table.block_hashes.append(self.blocks[block_id].block_hash)
        while len(table.block_ids) < self.blocks_needed(len(prompt)):
            table.block_ids.append(self._new_block())
        table.num_computed = table.num_cached = len(hits) * self.block_size
        self.tables[seq] = table
        return table.num_cached

    def can_append(self, seq: Hashable, n_tokens: int = 1) -> bool:
        t = self.tables[seq]
        n = len(t.token_ids)
        need = self.blocks_needed(n + n_tokens) - len(t.block_ids)
        if n % self.block_size and self.blocks[t.block_ids[-1]].ref_cnt > 1:
            need += 1                                # copy-on-write of a shared partial block
        return need <= len(self.free_queue)

    def append_slot(self, seq: Hashable, token_id: int) -> int:
        """Give token_id (the token fed next) a slot; returns its position."""
        t = self.tables[seq]
        pos = len(t.token_ids)
        if pos % self.block_size == 0:
            t.block_ids.append(self._new_block())
        else:
            self._make_writable(t, pos)
        t.token_ids.append(int(token_id))
        return pos

    def _make_writable(self, t: BlockTable, pos: int):
        """Before a table writes position pos of a partial block again (only after truncate): a
        shared block is copied, a registered block of its own is unregistered."""
        i = pos // self.block_size
        block = self.blocks[t.block_ids[i]]
        if block.ref_cnt > 1:
            new_id = self._new_block()
            self.pool.copy_block(block.block_id, new_id, pos - i * self.block_size)
            self._release(block.block_id)
            t.block_ids[i] = new_id
        elif block.block_hash is not None:
            self._unregister(block)

    def mark_computed(self, seq: Hashable, n_positions: int):
        """Positions < n_positions now hold KV in every layer: register the blocks that became
        full. Called once per step, after the forward pass."""
        t = self.tables[seq]
        if not t.num_computed <= n_positions <= len(t.token_ids):
            raise RefinferError(f"sequence {seq!r}: mark_computed({n_positions}) outside "
                                f"[{t.num_computed}, {len(t.token_ids)}]", hint="use truncate() to go back")
        t.num_computed = n_positions
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(t.block_hashes), n_positions // bs):
            parent = t.block_hashes[-1] if t.block_hashes else NONE_HASH
            tokens = tuple(t.token_ids[i * bs:(i + 1) * bs])
            h = hash_block_tokens(parent, tokens)
            t.block_hashes.append(h)
            block = self.blocks[t.block_ids[i]]
            if block.block_hash is None and h not in self.cached:   # one block per hash
                block.block_hash, block.parent_hash, block.token_ids = h, parent, tokens
                self.cached[h] = block.block_id

    def truncate(self, seq: Hashable, n_positions: int):
        """Keep positions < n_positions (speculative rollback); free the blocks past them."""
        t = self.tables[seq]
        if not 0 <= n_positions <= len(t.token_ids):
            raise RefinferError(f"sequence {seq!r}: cannot truncate {len(t.token_ids)} positions to {n_positions}",
                                hint="truncate to a position between 0 and the sequence's length")
        keep = self.blocks_needed(n_positions)
        for block_id in reversed(t.block_ids[keep:]):
            self._release(block_id)
        del t.block_ids[keep:], t.token_ids[n_positions:], t.block_hashes[n_positions // self.block_size:]
        t.num_computed = min(t.num_computed, n_positions)
        t.num_cached = min(t.num_cached, n_positions)

    def free(self, seq: Hashable):
        t = self.tables.pop(seq)
        for block_id in reversed(t.block_ids):       # tail first: evicted first
            self._release(block_id)

    # -- reading and writing through a table ------------------------------------------------------

    def block_table(self, seq: Hashable) -> list[int]:
        return list(self.tables[seq].block_ids)

    def slot_mapping(self, seq: Hashable, start: int, n: int) -> np.ndarray:
        pos = np.arange(start, start + n)
        return np.asarray(self.tables[seq].block_ids, np.int64)[pos // self.block_size] * self.block_size + pos % self.block_size

    def step_slots(self, seq: Hashable, start: int, token_ids) -> np.ndarray:
        """The slots that a forward step writes for seq's token_ids at positions start ..: checks
        that the step continues the sequence (start is its computed length, the tokens are its
        own) and that every block it writes belongs to it alone and is not registered."""
        if seq not in self.tables:
            raise RefinferError(f"sequence {seq!r} has no block table", hint="allocate() it before its first step")
        t, n = self.tables[seq], len(token_ids)
        if start != t.num_computed or start + n > len(t.token_ids):
            raise RefinferError(f"sequence {seq!r}: a step of positions {start}..{start + n - 1}, but {t.num_computed} "
                                f"positions are computed and {len(t.token_ids)} have slots",
                                hint="a step starts at num_computed_tokens(seq); give tokens slots with "
                                     "allocate() / append_slot() first")
        if list(t.token_ids[start:start + n]) != [int(x) for x in token_ids]:
            raise RefinferError(f"sequence {seq!r}: the step's tokens differ from the block table's at positions "
                                f"{start}..{start + n - 1}", hint="feed the tokens given to allocate() / append_slot()")
        for i in range(start // self.block_size, self.blocks_needed(start + n)):
            block = self.blocks[t.block_ids[i]]
            _expect(block.ref_cnt == 1 and block.block_hash is None,
                    f"a step writes block {block.block_id} (ref_cnt {block.ref_cnt}, registered "
                    f"{block.block_hash is not None}) of sequence {seq!r}")
        return self.slot_mapping(seq, start, n)

    def write(self, layer: int, seq: Hashable, start: int, k_rows, v_rows):
        """Store k_rows, v_rows float32[T, n_kv_heads, head_dim] at positions start .. start + T - 1."""
        t, p = self.tables[seq], self.pool
        k_rows, v_rows = np.asarray(k_rows), np.asarray(v_rows)
        T = len(k_rows)
        if k_rows.shape != (T, p.n_kv_heads, p.head_dim) or v_rows.shape != k_rows.shape:
            raise ShapeError(f"write: K {k_rows.shape} and V {v_rows.shape} must both be "
                             f"[T, {p.n_kv_heads}, {p.head_dim}] (n_kv_heads, head_dim)")
        if not 0 <= start <= start + T <= len(t.token_ids):
            raise RefinferError(f"sequence {seq!r}: write of positions {start}..{start + T - 1} outside its "
                                f"{len(t.token_ids)} slots", hint="allocate() / append_slot() the positions first")
        pos = start
        while pos < start + T:
            i, off = divmod(pos, self.block_size)
            n = min(self.block_size - off, start + T - pos)
            block = self.blocks[t.block_ids[i]]
            # a registered or shared block is what other requests read: writing it is a bug
            _expect(block.ref_cnt == 1 and block.block_hash is None,
                    f"write into block {block.block_id} (ref_cnt {block.ref_cnt}, registered "
                    f"{block.block_hash is not None}) at position {pos} of sequence {seq!r}")
            p.k_type.for_layer(layer).store(p.k[layer, block.block_id, off:off + n], k_rows[pos - start:pos - start + n])
            p.v_type.for_layer(layer).store(p.v[layer, block.block_id, off:off + n], v_rows[pos - start:pos - start + n])
            pos += n

    def gather(self, layer: int, seq: Hashable, n_positions: int):
        """K and V of positions 0 .. n_positions - 1 -> (float32[n, n_kv_heads, head_dim], same)."""
        t, p = self.tables[seq], self.pool
        if not 0 <= n_positions <= len(t.token_ids):
            raise RefinferError(f"sequence {seq!r}: gather of {n_positions} positions, it has {len(t.token_ids)}",
                                hint="gather at most the sequence's length")
        ids = t.block_ids[:self.blocks_needed(n_positions)]
        k = p.k[layer, ids].reshape(-1, p.n_kv_heads, p.k.shape[-1])[:n_positions]
        v = p.v[layer, ids].reshape(-1, p.n_kv_heads, p.v.shape[-1])[:n_positions]
        return p.k_type.for_layer(layer).load(k), p.v_type.for_layer(layer).load(v)

    # -- statistics and accounting ---------------------------------------------------------------

    def num_cached_tokens(self, seq: Hashable) -> int:
        return self.tables[seq].num_cached

    def num_computed_tokens(self, seq: Hashable) -> int:
        return self.tables[seq].num_computed

    def max_sequences(self, n_positions: int) -> int:
        """How many sequences of n_positions positions the pool holds at once (no shared prefix)."""
        return len(self.blocks) // self.blocks_needed(n_positions)

    def stats(self) -> KVCacheStats:
        used = sum(b.ref_cnt > 0 for b in self.blocks)
        cached = sum(b.ref_cnt == 0 and b.block_hash is not None for b in self.blocks)
        return KVCacheStats(len(self.blocks), used, cached, len(self.blocks) - used - cached,
                            self.prefix_queries, self.prefix_hits)

    def check_accounting(self):
        """Assert the invariants of the module docstring (AssertionError naming the first broken one)."""
        bs = self.block_size
        unreferenced = {b.block_id for b in self.blocks if b.ref_cnt == 0}
        _expect(len(self.free_queue) == len(set(self.free_queue)) and set(self.free_queue) == unreferenced,
                f"1: queue {sorted(self.free_queue)} != unreferenced blocks {sorted(unreferenced)}")
        holders = [0] * len(self.blocks)
        for t in self.tables.values():
            for block_id in t.block_ids:
                holders[block_id] += 1
        for b in self.blocks:
            _expect(b.ref_cnt == holders[b.block_id],
                    f"2: block {b.block_id} has ref_cnt {b.ref_cnt}, {holders[b.block_id]} tables hold it")
            _expect(b.ref_cnt <= 1 or b.block_hash is not None, f"5: block {b.block_id} shared but not registered")
            if b.block_hash is not None:
                _expect(self.cached.get(b.block_hash) == b.block_id, f"3: block {b.block_id} registered, not in the map")
                _expect(len(b.token_ids) == bs and hash_block_tokens(b.parent_hash, b.token_ids) == b.block_hash,
                        f"3: block {b.block_id}'s hash is not that of its parent and {len(b.token_ids)} tokens")
        for h, block_id in self.cached.items():
            _expect(self.blocks[block_id].block_hash == h, f"3: the map names block {block_id} under another hash")
        for seq, t in self.tables.items():
            n = len(t.token_ids)
            _expect(len(t.block_ids) == self.blocks_needed(n), f"4: {seq!r} has {len(t.block_ids)} blocks for {n} positions")
            _expect(t.num_cached <= t.num_computed <= n, f"4: {seq!r} counts {t.num_cached} cached, {t.num_computed} computed of {n}")
            if self.enable_prefix_caching:
                _expect(len(t.block_hashes) == t.num_computed // bs, f"4: {seq!r} has {len(t.block_hashes)} chain hashes")
            parent = NONE_HASH
            for i, h in enumerate(t.block_hashes):
                _expect(h == hash_block_tokens(parent, t.token_ids[i * bs:(i + 1) * bs]), f"4: {seq!r} chain hash {i} is stale")
                parent = h
            for i, block_id in enumerate(t.block_ids):
                b, used = self.blocks[block_id], t.token_ids[i * bs:(i + 1) * bs]
                _expect(b.block_hash is None or list(b.token_ids[:len(used)]) == used,
                        f"4: {seq!r} block {i} (id {block_id}) is registered under other tokens")
from . import kv_lmdeploy, kv_vllm  # noqa: E402,F401  register the LMDeploy, calibrated and fp8 types
