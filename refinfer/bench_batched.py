"""Batched serving throughput of refinfer against llama.cpp in the same run:
`python -m refinfer bench --batched`.

Tests (each engine and thread count in its own process, as refinfer.bench's workers):

    tg        S sequences of n_prompt distinct tokens each are prefilled, then decoded together
              for n_gen steps of one token per sequence, greedy (argmax): aggregate decode
              tokens/s = S * n_gen / decode time, as llama-batched-bench's S_TG. Also the
              prefill rate of that composition (S * n_prompt / prefill time, its S_PP).
    sampled   the same at the largest S with each sequence's own seeded sampler (llama.cpp's
              default chain: top-k 40, top-p 0.95, min-p 0.05, temperature 0.8, seed 1000 + j).
    pp        one n_prefill-token prompt in one step (llama-bench's pp512).
    ttft      time to the first token of system (n_system tokens) + a user turn (n_user tokens):
              on an empty cache (miss), and right after another request with the same system
              prompt (hit: refinfer's prefix cache by block hash; llama.cpp: the system prompt's
              cells copied from another sequence with llama_memory_seq_cp, as llama-server's
              prompt cache reuses them).

refinfer runs ideal mode over its paged KV cache (kv_cache.BlockManager): one forward() per
step over a ragged batch of Segments, prefill packed into steps of at most `budget` tokens (a
prompt split between steps when it does not fit, chunked prefill). llama.cpp runs through its
low-level batch API (refinfer.llama_batched): n_seq_max sequences in one unified KV cache,
flash attention off, extra buffer types off, the same thread count.

Checks before a timing counts (a row whose check fails reads "failed", with the reason):
  - refinfer: every sequence's tokens, prompt-last logits and last-step logits are bitwise
    those of the plain serial loop over the same forward on the same backend (one sequence,
    one token per step: the invariance claim); the TTFT hit's logits are bitwise the miss's;
    sequence 0's serial logits at every step and the pp logits are within refinfer.bench's
    REFINFER_NMSE of the NumPy reference (ideal mode, teacher-forced on the same tokens).
  - llama.cpp: each sequence's prompt-last logits against refinfer's serial ones, sequence 0's
    every step against the NumPy reference teacher-forced on llama.cpp's own tokens, the pp
    logits and both TTFT runs' first logits, all within refinfer.bench's LLAMA_CPP_LIMITS (q8
    activations and an F16 cache: a loose bound that catches a wrong model or a wrong sequence).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from .bench import LLAMA_CPP_LIMITS, REFINFER_NMSE, _peak_rss_bytes, bench_tokens
from .kv_cache import DEFAULT_BLOCK_SIZE

ENGINES = ("numba", "numpy", "llama.cpp")
LLAMA = "llama.cpp"
SAMPLING = dict(top_k=40, top_p=0.95, min_p=0.05, temperature=0.8)
SEED0 = 1000                              # sequence j samples with seed SEED0 + j


@dataclasses.dataclass
class Shape:
    seqs: tuple = (1, 4, 16)       # concurrent sequences of the tg test
    n_prompt: int = 128            # prompt tokens per sequence
    n_gen: int = 128               # decode steps per sequence (tokens generated: n_gen + 1)
    n_prefill: int = 512           # the pp test's prompt (0 skips)
    n_system: int = 512            # the TTFT test's shared system prompt (0 skips)
    n_user: int = 32               # the TTFT test's user turn
    block_size: int = 16           # refinfer's KV block size
    budget: int = 512              # refinfer's prefill tokens per step (llama.cpp's n_ubatch)
    sampled: bool = True           # the sampled test at max(seqs)
    engine: bool = True            # the tg tests again through refinfer.Engine (refinfer only)
    cache_type_k: str | None = None  # KV cache types of both engines (None: refinfer f32, llama.cpp f16)
    cache_type_v: str | None = None

    def llama_kv(self) -> dict:
        """llama.cpp's cache types for the same run: refinfer's names where llama.cpp has them (f16
        otherwise), flash attention on when V is quantized, as llama.cpp requires."""
        from .llama_oracle import GGML_CACHE_TYPE_IDS
        k, v = (t if t in GGML_CACHE_TYPE_IDS else "f16" for t in (self.cache_type_k or "f16", self.cache_type_v or "f16"))
        return {"type_k": k, "type_v": v, "flash_attn": v not in ("f16", "f32", "bf16")}

    def tests(self) -> list:
        names = [f"tg x{S}" for S in self.seqs] + ([f"tg x{max(self.seqs)} sampled"] if self.sampled else [])
        names += [f"engine x{S}" for S in self.seqs] if self.engine else []
        return names + (["pp"] if self.n_prefill else []) + (["ttft miss", "ttft hit"] if self.n_system else [])

    def positions(self) -> int:    # the longest sequence any test builds
        return max(self.n_prompt + self.n_gen + 1, self.n_prefill, self.n_system + self.n_user + 1)


QUICK = Shape(seqs=(1, 3), n_prompt=8, n_gen=4, n_prefill=24, n_system=32, n_user=5, block_size=4, budget=16)


def prompts_for(shape: Shape, vocab: int) -> list:
    """Sequence j's prompt: window j of one long bench_tokens sequence (distinct prompts)."""
    S, P = max(shape.seqs), shape.n_prompt
    toks = bench_tokens(S * P, vocab)
    return [toks[j * P:(j + 1) * P] for j in range(S)]


def _document(shape: Shape, vocab: int) -> list:
    """The tokens the pp and TTFT tests read from: pp's prompt is its first n_prefill tokens,
    the TTFT test's system prompt its first n_system, so that one reference pass covers both."""
    n = max(shape.n_prefill, shape.n_system + shape.n_user)
    return bench_tokens(n + 3, vocab)[3:]           # not the tg prompts' first window


def pp_prompt(shape: Shape, vocab: int) -> list:
    return _document(shape, vocab)[:shape.n_prefill]


def ttft_prompts(shape: Shape, vocab: int) -> tuple:
    """(system + user A, system + user B): the same n_system tokens, then different users."""
    doc = _document(shape, vocab)
    b = doc[:shape.n_system + shape.n_user]
    a = b[:shape.n_system] + bench_tokens(2 * shape.n_user + 7, vocab)[-shape.n_user:]
    return a, b


def greedy(j, z, i, history=None) -> int:
    return int(np.argmax(z))


# ---------------------------------------------------------------------------------------------
# refinfer: the serial loop and the batched steps over one forward.

def new_manager(m, n_positions, block_size, n_seqs=1, prefix_caching=True):
    """A BlockManager over a pool of the backend's own cache types with room for n_seqs
    sequences of n_positions each (every sequence fills its own last, partial block)."""
    from .kv_cache import BlockManager
    cfg, be = m.config, m.backend
    k_type, v_type = be.kv_types()
    pool = be.new_kv_pool(n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                          n_blocks=n_seqs * -(-n_positions // block_size) + 1, block_size=block_size, k_type=k_type, v_type=v_type)
    return BlockManager(pool, enable_prefix_caching=prefix_caching)


def serial_generate(m, prompt, n_gen, pick, keep_all=False):
    """The plain serial loop (Model.generate's): prompt in one forward, then one token per step.
    -> (tokens int64[n_gen + 1], logits rows float32[n_gen + 1, V] if keep_all else [first, last])."""
    from .forward import forward
    cache = m.new_cache(len(prompt) + n_gen + 1)
    cfg, w, be = m.config, m.weights, m.backend
    z = forward(cfg, w, be, prompt, cache, all_logits=False)[-1]
    history, toks, rows = list(prompt), [], [z.copy()]
    for i in range(n_gen + 1):
        toks.append(pick(0, z, i, history))
        history.append(toks[-1])
        if i == n_gen:
            break
        z = forward(cfg, w, be, [toks[-1]], cache, all_logits=False)[-1]
        if keep_all or i == n_gen - 1:
            rows.append(z.copy())
    return np.array(toks, np.int64), np.stack(rows)


def batched_generate(m, kv, prompts, n_gen, pick, budget):
    """All prompts prefilled (steps of at most budget tokens), then n_gen decode steps of one
    token per sequence. pick(j, logits_row, i, history) -> generated token i of sequence j.
    -> dict tokens int64[S, n_gen + 1], first/last float32[S, V], prefill_s, decode_s, blocks
    (the blocks each sequence held at the end), hit_tokens (positions taken from the prefix cache)."""
    from .forward import Segment, forward
    cfg, w, be = m.config, m.weights, m.backend
    S = len(prompts)
    toks = np.zeros((S, n_gen + 1), np.int64)
    first = np.empty((S, cfg.vocab_size), np.float32)
    hist = [list(p) for p in prompts]
    t0 = time.perf_counter()
    todo = [[j, kv.allocate(j, p)] for j, p in enumerate(prompts)]   # [sequence, next position]
    hits = sum(s for _, s in todo)
    while todo:
        batch, n = [], 0
        for item in todo:
            j, s = item
            take = min(len(prompts[j]) - s, budget - n)
            if take <= 0:
                break
            done = s + take == len(prompts[j])
            batch.append(Segment(j, prompts[j][s:s + take], s, "last" if done else "none"))
            item[1] += take
            n += take
        for seg, z in zip(batch, forward(cfg, w, be, batch, kv)):
            if z is not None:
                j = seg.seq_id
                first[j] = z[0]
                toks[j, 0] = pick(j, z[0], 0, hist[j])
                hist[j].append(int(toks[j, 0]))
        todo = [item for item in todo if item[1] < len(prompts[item[0]])]
    t1 = time.perf_counter()
    out = None
    for i in range(n_gen):
        batch = [Segment(j, [int(toks[j, i])], kv.append_slot(j, int(toks[j, i]))) for j in range(S)]
        out = forward(cfg, w, be, batch, kv)
        for j in range(S):
            toks[j, i + 1] = pick(j, out[j][0], i + 1, hist[j])
            hist[j].append(int(toks[j, i + 1]))
    t2 = time.perf_counter()
    last = first.copy() if out is None else np.stack([z[0] for z in out])
    blocks = [len(kv.block_table(j)) for j in range(S)]
    for j in range(S):
        kv.free(j)
    kv.check_accounting()
    return dict(tokens=toks, first=first, last=last, prefill_s=t1 - t0, decode_s=t2 - t1, blocks=blocks, hit_tokens=hits)


def engine_generate(m, prompts, n_gen, shape: Shape, sampled=False):
    """The same sequences through refinfer.Engine.generate_many (continuous batching: a sequence
    decodes as soon as its prompt is in, beside the others' prefill chunks). -> (results, the
    aggregate decode rate: tokens generated after the last sequence's first token, over the
    time from that token to the last one)."""
    from .engine import Engine
    S = len(prompts)
    eng = Engine(m, max_batch=S, max_tokens_per_step=shape.budget, kv_block_size=shape.block_size,
                 kv_cache_tokens=S * (shape.n_prompt + n_gen + 1 + shape.block_size))
    knobs = dict(SAMPLING) if sampled else dict(temperature=0.0)
    reqs = [dict(prompt=list(p), max_tokens=n_gen + 1, seed=SEED0 + j, **knobs) for j, p in enumerate(prompts)]
    results = eng.generate_many(reqs)
    eng.check_accounting()
    times = [r.stats.token_times for r in results]         # seconds after submission, all submitted at once
    if any(not ts for ts in times):
        return results, None
    start = max(ts[0] for ts in times)
    end = max(ts[-1] for ts in times)
    n = sum(t > start for ts in times for t in ts)
    return results, (n / (end - start) if end > start else None)


def _check_engine(results, serial, is_eog) -> str | None:
    """Each result's tokens are its serial run's, up to an end-of-generation token."""
    for j, r in enumerate(results):
        want = [int(t) for t in serial[j][0]]
        if r.finish_reason == "error":
            return f"sequence {j}: the engine failed it: {r.error}"
        got = list(r.token_ids)
        if got != want[:len(got)]:
            i = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
            return f"sequence {j}'s token {i} is {got[i]} through the engine, {want[i]} in the serial run"
        if len(got) < len(want) and not (r.finish_reason == "stop" and is_eog(want[len(got)])):
            return (f"sequence {j}: the engine stopped after {len(got)} tokens ({r.finish_reason}), "
                    f"the serial run generated {want[len(got)]} next")
    return None


def sampler_picks(n):
    from .sampling import Sampler, SamplerConfig
    samplers = [Sampler(SamplerConfig(**SAMPLING, seed=SEED0 + j)) for j in range(n)]
    return lambda j, z, i, history: samplers[j](z, history, i)


def _same(what, got, want) -> str | None:
    """None when got is bitwise want, else the first difference."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape == want.shape and np.array_equal(got.view(np.uint8), want.view(np.uint8)):
        return None
    if got.shape != want.shape:
        return f"{what}: shape {got.shape}, serial {want.shape}"
    idx = tuple(int(i) for i in np.argwhere(got != want)[0]) if np.any(got != want) else "a NaN bit pattern"
    return f"{what} differ from the serial run's at {idx}"


def _check_against_serial(res, serial, S) -> str | None:
    for j in range(S):
        st, rows = serial[j]
        for what, got, want in (("tokens", res["tokens"][j], st), ("prompt-last logits", res["first"][j], rows[0]),
                                ("last-step logits", res["last"][j], rows[-1])):
            bad = _same(f"sequence {j}'s {what}", got, want)
            if bad:
                return bad
    return None


def worker_refinfer(model, backend, threads, shape: Shape, out_dir):
    from . import threads as thread_pools
    thread_pools.set_threads(threads)
    t_start = time.perf_counter()
    from .forward import Segment, forward
    from .model import load
    m = load(model, backend=backend, mode="ideal", cache_type_k=shape.cache_type_k, cache_type_v=shape.cache_type_v)
    cfg, w, be = m.config, m.weights, m.backend
    V = cfg.vocab_size
    prompts = prompts_for(shape, V)
    serial_generate(m, prompts[0][:2], 1, greedy)                   # warm-up: compiles or loads the kernels
    k_type, v_type = be.kv_types()
    res = {"startup_s": time.perf_counter() - t_start, "kv_types": [k_type.name, v_type.name]}
    from .kv_cache import BlockPool
    res["kv_block_bytes"] = BlockPool.bytes_per_block(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, shape.block_size,
                                                      k_type, v_type)
    res["kv_bytes_per_token"] = res["kv_block_bytes"] // shape.block_size
    res["kv_contiguous_bytes"] = cfg.max_seq_len * res["kv_bytes_per_token"]
    res["context"] = cfg.max_seq_len
    S_max = max(shape.seqs)

    # the serial runs every batched run must reproduce bitwise
    t = time.perf_counter()
    serial = [serial_generate(m, p, shape.n_gen, greedy, keep_all=j == 0) for j, p in enumerate(prompts)]
    np.save(os.path.join(out_dir, "serial0_tokens.npy"), serial[0][0])
    np.save(os.path.join(out_dir, "serial0_logits.npy"), serial[0][1])
    np.save(os.path.join(out_dir, "serial_first.npy"), np.stack([r[1][0] for r in serial]))
    sampled_serial = None
    if shape.sampled:
        pick = sampler_picks(S_max)
        sampled_serial = [serial_generate(m, p, shape.n_gen, lambda _, z, i, h, j=j: pick(j, z, i, h))
                          for j, p in enumerate(prompts)]
    res["serial_s"] = time.perf_counter() - t

    tests = {}
    runs = [(f"tg x{S}", S, greedy, serial) for S in shape.seqs]
    if shape.sampled:
        runs.append((f"tg x{S_max} sampled", S_max, None, sampled_serial))
    for name, S, pick, ref in runs:
        kv = new_manager(m, shape.n_prompt + shape.n_gen + 1, shape.block_size, n_seqs=S)
        r = batched_generate(m, kv, prompts[:S], shape.n_gen, pick or sampler_picks(S), shape.budget)
        bad = _check_against_serial(r, ref, S)
        tests[name] = {"seqs": S, "tokens_per_s": S * shape.n_gen / r["decode_s"],
                       "prefill_tokens_per_s": S * shape.n_prompt / r["prefill_s"],
                       "kv_blocks_per_seq": float(np.mean(r["blocks"])), "error": bad}

    for S in shape.seqs if shape.engine else ():
        results, rate = engine_generate(m, prompts[:S], shape.n_gen, shape)
        tests[f"engine x{S}"] = {"seqs": S, "tokens_per_s": rate,
                                 "error": _check_engine(results, serial, m.tokenizer.is_eog if m.tokenizer else
                                                        (lambda t: False)) or
                                 (None if rate else "no token was generated after the last first token")}

    if shape.n_prefill:
        p = pp_prompt(shape, V)
        kv = new_manager(m, shape.n_prefill, shape.block_size)
        kv.allocate("pp", p)
        t0 = time.perf_counter()
        z = forward(cfg, w, be, [Segment("pp", p, 0)], kv)[0][0]
        dt = time.perf_counter() - t0
        np.save(os.path.join(out_dir, "pp.npy"), z)
        tests["pp"] = {"seqs": 1, "tokens_per_s": shape.n_prefill / dt, "error": None}   # checked in the parent

    if shape.n_system:
        a, b = ttft_prompts(shape, V)
        room = 2 * len(b) + 2 * shape.block_size
        miss = batched_generate(m, new_manager(m, room, shape.block_size), [b], 0, greedy, shape.budget)  # empty cache
        kv = new_manager(m, room, shape.block_size)
        batched_generate(m, kv, [a], 0, greedy, shape.budget)             # A leaves the system prompt cached
        hit = batched_generate(m, kv, [b], 0, greedy, shape.budget)
        np.save(os.path.join(out_dir, "ttft.npy"), miss["first"][0])
        want_hit = shape.n_system // shape.block_size * shape.block_size
        for name, r in (("ttft miss", miss), ("ttft hit", hit)):
            bad = _same("the first token's logits", r["first"][0], miss["first"][0]) if r is hit else None
            if r is hit and r["hit_tokens"] != want_hit:
                bad = f"the prefix cache gave {r['hit_tokens']} tokens, expected {want_hit}"
            if r is miss and r["hit_tokens"]:
                bad = f"the prefix cache gave {r['hit_tokens']} tokens on an empty cache"
            tests[name] = {"seqs": 1, "ms": 1e3 * r["prefill_s"], "cached_tokens": r["hit_tokens"], "error": bad}
    res["tests"] = tests
    return res


# ---------------------------------------------------------------------------------------------
# llama.cpp

def worker_llama_cpp(model, threads, shape: Shape, out_dir):
    from .llama_batched import LlamaBatched
    t_start = time.perf_counter()
    S_max = max(shape.seqs)
    res, tests = {}, {}
    per_seq = shape.n_prompt + shape.n_gen + 1
    kv = shape.llama_kv()
    with LlamaBatched(model, n_seq_max=1, n_ctx=shape.positions() + 8, n_threads=threads, **kv) as L:
        V = L.n_vocab
        prompts = prompts_for(shape, V)
        L.generate([prompts[0][:2]], 1, greedy)                        # warm-up
        res["startup_s"] = time.perf_counter() - t_start
        if shape.n_prefill:
            L.clear()
            p = pp_prompt(shape, V)
            t0 = time.perf_counter()
            z = L.prefill([p])[0]
            dt = time.perf_counter() - t0
            np.save(os.path.join(out_dir, "pp.npy"), z)
            tests["pp"] = {"seqs": 1, "tokens_per_s": shape.n_prefill / dt, "error": None}
    if shape.n_system:
        a, b = ttft_prompts(shape, V)
        with LlamaBatched(model, n_seq_max=3, n_ctx=3 * len(b) + 8, n_threads=threads, **kv) as L:
            L.clear()
            t0 = time.perf_counter()
            z_miss = L.prefill([b])[0]
            greedy(0, z_miss, 0)
            t_miss = time.perf_counter() - t0
            L.clear()
            L.prefill([a], seq0=1)                                      # A's cells hold the system prompt
            t0 = time.perf_counter()
            L.copy_sequence(1, 2, shape.n_system)
            z_hit = L.prefill([b[shape.n_system:]], seq0=2, start=shape.n_system)[0]
            greedy(0, z_hit, 0)
            t_hit = time.perf_counter() - t0
            np.save(os.path.join(out_dir, "ttft_miss.npy"), z_miss)
            np.save(os.path.join(out_dir, "ttft_hit.npy"), z_hit)
            tests["ttft miss"] = {"seqs": 1, "ms": 1e3 * t_miss, "cached_tokens": 0, "error": None}
            tests["ttft hit"] = {"seqs": 1, "ms": 1e3 * t_hit, "cached_tokens": shape.n_system, "error": None}
    runs = [(f"tg x{S}", S, False) for S in shape.seqs]
    if shape.sampled:
        runs.append((f"tg x{S_max} sampled", S_max, True))
    for name, S, sampled in runs:
        # llama-batched-bench's context: every sequence's cells in one unified cache
        with LlamaBatched(model, n_seq_max=S, n_ctx=S * per_seq + 8, n_threads=threads,
                          n_batch=max(2048, S * shape.n_prompt), **kv) as L:
            chains = [L.sampler_chain(SEED0 + j, **SAMPLING) for j in range(S)] if sampled else []
            # llama_sampler_sample(ctx, -k) reads output row n_outputs - k of the last llama_decode
            # call: sequence j's row, in prefill (one call, n_batch >= S * n_prompt) and in decode
            pick = (lambda j, z, i: L.sample(chains[j], j - S)) if sampled else greedy
            toks, first, last, t_pp, t_tg = L.generate(prompts[:S], shape.n_gen, pick)
            for c in chains:
                L.free_sampler(c)
            kv_bytes = L.kv_bytes() / S
        if S == S_max and not sampled:
            np.save(os.path.join(out_dir, "tg_first.npy"), first)
        tests[name] = {"seqs": S, "tokens_per_s": S * shape.n_gen / t_tg, "prefill_tokens_per_s": S * shape.n_prompt / t_pp,
                       "kv_bytes_per_seq": kv_bytes, "error": None}
    # sequence 0's logits at every step, alone, for the check against the NumPy reference
    with LlamaBatched(model, n_seq_max=1, n_ctx=per_seq + 8, n_threads=threads, **kv) as L:
        L.clear()
        rows = [L.prefill([prompts[0]])[0]]
        toks = [greedy(0, rows[0], 0)]
        for i in range(shape.n_gen):
            rows.append(np.array(L.decode([(toks[-1], shape.n_prompt + i, 0, True)])[0]))
            toks.append(greedy(0, rows[-1], i + 1))
        np.save(os.path.join(out_dir, "serial0_tokens.npy"), np.array(toks, np.int64))
        np.save(os.path.join(out_dir, "serial0_logits.npy"), np.stack(rows))
    res["tests"] = tests
    return res


def worker_main(argv):
    engine, model, threads, shape, out_dir = argv[0], argv[1], int(argv[2]), Shape(**json.loads(argv[3])), argv[4]
    shape.seqs = tuple(shape.seqs)
    if engine == LLAMA:
        res = worker_llama_cpp(model, threads, shape, out_dir)
    else:
        res = worker_refinfer(model, engine, threads, shape, out_dir)
    res["peak_rss_bytes"] = _peak_rss_bytes()
    print("BENCH " + json.dumps(res), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# The parent: workers, checks, the table.

def _load(out_dir, name):
    path = os.path.join(out_dir, name)
    return np.load(path) if os.path.exists(path) else None


def run_worker(engine, model, threads, shape: Shape, timeout=3600):
    """One engine in a fresh process -> (its result dict or {"error": reason}, {file: array})."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory(prefix="refinfer-bench-") as out_dir:
        cmd = [sys.executable, "-m", "refinfer.bench_batched", engine, os.fspath(model), str(threads),
               json.dumps(dataclasses.asdict(shape)), out_dir]
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s"}, {}
        res = next((json.loads(line[6:]) for line in p.stdout.splitlines() if line.startswith("BENCH ")), None)
        if res is None:
            tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [""]
            why = f"killed by signal {-p.returncode}" if p.returncode < 0 else f"exit code {p.returncode}"
            return {"error": f"{why}: {tail[0][:300]}"}, {}
        files = {f[:-4]: np.load(os.path.join(out_dir, f)) for f in os.listdir(out_dir) if f.endswith(".npy")}
    return res, files


def _close_to(engine, what, got, want, bound=REFINFER_NMSE) -> str | None:
    """None when got matches the reference want within engine's bound, else the numbers."""
    from .metrics import compare_logits
    if got is None or np.size(got) != np.size(want):
        return f"{what} missing or of the wrong size"
    got, want = np.asarray(got).reshape(-1, want.shape[-1]), want.reshape(-1, want.shape[-1])
    if not np.all(np.isfinite(got)):
        return f"{what} are not finite"
    r = compare_logits(got, want)
    if engine == LLAMA:
        over = [f"{k} {r[k]:.3g} > {lim:.3g}" for k, lim in LLAMA_CPP_LIMITS.items() if r[k] > lim]
    else:
        over = [f"nmse {r['nmse']:.3g} > {bound:.3g}"] if r["nmse"] > bound else []
    return f"{what} differ from the reference: {', '.join(over)}" if over else None


# refinfer against the NumPy reference with a quantized KV cache: the backends' ~1e-13 matmul
# differences move a few K/V values across a rounding boundary of the cache type, which then
# store another code (the attention over the same bytes is bitwise the reference's). Measured
# on SmolLM2 (64 tokens): q8_0 1.4e-6, q4_0/q8_0 1.2e-4, lmdeploy-int4/int8 3.4e-4; over 32 decode
# steps more (a flipped code moves later layers' values across other boundaries): lmdeploy-int4
# 1.1e-2 (q4_0 weights, 64 + 32 tokens). A wrong cache or kernel is at NMSE of order 0.1 to 1, so
# this bound guards against gross errors only; tests/test_kv_backends.py proves the kernels
# bitwise on the same bytes. An f16 cache rounds the same way at its last bit: NMSE 5.6e-9.
REFINFER_NMSE_QUANTIZED_KV = 5e-2
REFINFER_NMSE_F16_KV = 1e-7


def reference_checks(engine, res, files, ref, serial_first) -> dict:
    """{test: reason} for the tests whose logits do not match the references (ref: the NumPy
    model's seq0 function and pp / TTFT logits; serial_first: refinfer's prompt-last rows)."""
    bad = {}
    kv_types = set(res.get("kv_types") or ())
    bound = (REFINFER_NMSE_QUANTIZED_KV if kv_types - {"f32", "f64", "f16", "bf16"} else
             REFINFER_NMSE_F16_KV if kv_types & {"f16", "bf16"} else REFINFER_NMSE)

    def _close(engine, what, got, want):
        return _close_to(engine, what, got, want, bound)
    # sequence 0's serial steps against NumPy, teacher-forced on the engine's own tokens
    toks, rows = files.get("serial0_tokens"), files.get("serial0_logits")
    if toks is None or rows is None:
        seq0 = "sequence 0's serial run is missing"
    else:
        want, n = ref["seq0"](toks)
        seq0 = _close(engine, f"sequence 0's logits (the {n} steps checked)", rows[:n], want)
    for test in res["tests"]:
        if test.startswith(("tg", "engine")) and seq0:
            bad[test] = seq0
    if "pp" in res["tests"]:
        why = _close(engine, "pp logits", files.get("pp"), ref["pp"])
        if why:
            bad["pp"] = why
    if engine == LLAMA:
        first = files.get("tg_first")
        if serial_first is not None and first is not None:
            why = _close(engine, "prompt-last logits of the batched run", first, serial_first[:len(first)])
            for test in res["tests"]:
                if test.startswith("tg") and why:
                    bad.setdefault(test, why)
        for test, f in (("ttft miss", "ttft_miss"), ("ttft hit", "ttft_hit")):
            if test in res["tests"]:
                why = _close(engine, "first-token logits", files.get(f), ref["ttft"])
                if why:
                    bad[test] = why
    elif "ttft miss" in res["tests"]:
        why = _close(engine, "first-token logits", files.get("ttft"), ref["ttft"])
        if why:
            bad["ttft miss"] = bad["ttft hit"] = why
    return bad


def numpy_reference(model, shape: Shape):
    """The NumPy backend in ideal mode (slow: its matmul sums exact products in float64): the pp
    and TTFT logits from one pass over their common tokens, and seq0(tokens) -> (rows, n): the
    teacher-forced rows that sequence 0's decode steps see (prompt-last, then after each fed
    token). The pass over the first engine's tokens is kept; another engine's tokens are
    checked on the rows where its tokens agree with them (row i depends on tokens[:i] only)."""
    from .forward import Segment, forward
    from .model import load
    m = load(model, backend="numpy", mode="ideal", cache_type_k=shape.cache_type_k, cache_type_v=shape.cache_type_v)
    cfg, V = m.config, m.config.vocab_size
    prompt0 = prompts_for(shape, V)[0]
    kept = {}

    def seq0(gen):
        gen = [int(t) for t in gen]
        if not kept:
            toks = prompt0 + gen[:-1]
            kept["gen"], kept["rows"] = gen, forward(cfg, m.weights, m.backend, toks, m.new_cache(len(toks)))[len(prompt0) - 1:]
        same = next((i for i, (x, y) in enumerate(zip(gen, kept["gen"])) if x != y), min(len(gen), len(kept["gen"])))
        n = min(same + 1, len(gen), len(kept["rows"]))
        return kept["rows"][:n], n

    ref = {"seq0": seq0}
    need = [n - 1 for n in (shape.n_prefill, shape.n_system and shape.n_system + shape.n_user) if n]
    if need:
        doc = _document(shape, V)[:max(need) + 1]
        kv = new_manager(m, len(doc), DEFAULT_BLOCK_SIZE)
        kv.allocate("ref", doc)
        rows = forward(cfg, m.weights, m.backend, [Segment("ref", doc, 0, sorted(set(need)))], kv)[0]
        at = dict(zip(sorted(set(need)), rows))
        if shape.n_prefill:
            ref["pp"] = at[shape.n_prefill - 1]
        if shape.n_system:
            ref["ttft"] = at[shape.n_system + shape.n_user - 1]
    return ref


def run_batched_bench(model, threads_list, engines=("numba", LLAMA), shape: Shape = Shape(), reps=1, log=None) -> list:
    """-> rows: backend, threads, test, seqs, tokens_per_s (TTFT: ttft_ms), ratio_vs_llama_cpp,
    and error for a failed engine or check (then the rate is None). With reps > 1 the engines
    run in turn reps times and each row keeps its best (a failed check in any run fails it)."""
    best, ref, ref_llama = {}, None, None
    for threads in threads_list:
        for rep in range(reps):
            results = {}
            for engine in engines:
                results[engine] = run_worker(engine, model, threads, shape)
                if log:
                    log(f"{engine} threads={threads} run {rep + 1}/{reps}: {results[engine][0]}")
            if ref is None:
                if log:
                    log("reference logits (numpy, ideal mode) ...")
                ref = numpy_reference(model, shape)
                # llama.cpp's rows against the reference of the cache it runs: f16 for a type it lacks
                # (the f32 reference then, as without -ctk/-ctv), its own quantized type otherwise
                lk = shape.llama_kv()
                quantized = {t for t in (lk["type_k"], lk["type_v"]) if t not in ("f16", "f32", "bf16")}
                llama_shape = dataclasses.replace(shape, cache_type_k=lk["type_k"] if quantized else None,
                                                  cache_type_v=lk["type_v"] if quantized else None)
                ref_llama = ref if llama_shape == shape else numpy_reference(model, llama_shape)
            serial_first = next((f.get("serial_first") for e, (r, f) in results.items() if e != LLAMA and "error" not in r),
                                None)
            checked = {e: (res, {} if "error" in res else
                           reference_checks(e, res, files, ref, serial_first) if e != LLAMA or ref_llama is ref else
                           reference_checks(e, res, files, ref_llama, None))   # refinfer's serial rows: another cache
                       for e, (res, files) in results.items()}
            for row in _rows(checked, threads, shape):
                key = (row["backend"], row["threads"], row["test"])
                best[key] = row if key not in best else _better(best[key], row)
    rows = list(best.values())
    _add_ratios(rows)
    return rows


def _better(a, b):
    if a.get("error") or b.get("error"):
        return a if a.get("error") else b
    if "ttft_ms" in a:
        return a if a["ttft_ms"] <= b["ttft_ms"] else b
    out = dict(a if a["tokens_per_s"] >= b["tokens_per_s"] else b)
    if a.get("prefill_tokens_per_s") is not None:
        out["prefill_tokens_per_s"] = max(a["prefill_tokens_per_s"], b["prefill_tokens_per_s"])
    return out


def _add_ratios(rows):
    """ratio_vs_llama_cpp: refinfer's speed / llama.cpp's of the same test and threads (TTFT:
    llama.cpp's time / refinfer's), None where either failed."""
    base = {(r["threads"], r["test"]): r for r in rows if r["backend"] == LLAMA and not r.get("error")}
    for r in rows:
        b = base.get((r["threads"], r.get("base_test", r["test"])))
        r["ratio_vs_llama_cpp"] = None
        if b is None or r.get("error"):
            continue
        if "ttft_ms" in r:
            r["ratio_vs_llama_cpp"] = b["ttft_ms"] / r["ttft_ms"]
        else:
            r["ratio_vs_llama_cpp"] = r["tokens_per_s"] / b["tokens_per_s"]


def _rows(checked, threads, shape):
    out = []
    for test in shape.tests():
        for engine, (res, bad) in checked.items():
            if engine == LLAMA and test.startswith("engine"):
                continue
            t = (res.get("tests") or {}).get(test, {})
            error = res.get("error") or t.get("error") or bad.get(test) or ("" if t else "the worker ran no such test")
            row = {"backend": engine, "threads": threads, "test": _test_label(test, shape), "seqs": t.get("seqs")}
            if test.startswith("engine"):                       # against llama.cpp's batch of the same sequences
                row["base_test"] = _test_label(test.replace("engine", "tg"), shape)
            if test.startswith("ttft"):
                row["ttft_ms"] = None if error else t.get("ms")
                row["cached_tokens"] = t.get("cached_tokens")
            else:
                row["tokens_per_s"] = None if error else t.get("tokens_per_s")
                if "prefill_tokens_per_s" in t:
                    row["prefill_tokens_per_s"] = None if error else t["prefill_tokens_per_s"]
                if t.get("kv_bytes_per_seq"):                   # llama.cpp: its unified cache / S
                    row["kv_bytes_per_seq"] = t["kv_bytes_per_seq"]
                if "kv_blocks_per_seq" in t:
                    row["kv_bytes_per_seq"] = t["kv_blocks_per_seq"] * res["kv_block_bytes"]
                    row["kv_contiguous_bytes_per_seq"] = res["kv_contiguous_bytes"]
            row["peak_rss_bytes"] = res.get("peak_rss_bytes")
            if engine != LLAMA:
                row["kv_types"] = res.get("kv_types")
                row["kv_bytes_per_token"] = res.get("kv_bytes_per_token")
            if error:
                row["error"] = error
            out.append(row)
    return out


def _test_label(test, shape):
    if test == "pp":
        return f"pp{shape.n_prefill}"
    if test.startswith("tg"):
        return test.replace("tg", f"p{shape.n_prompt}+tg{shape.n_gen}", 1)
    if test.startswith("engine"):
        return f"p{shape.n_prompt}+tg{shape.n_gen} {test[len('engine '):]} engine"
    return test.replace("ttft", f"ttft sys{shape.n_system}+{shape.n_user}", 1)


def settings_line(model, threads_list, shape: Shape, rows) -> str:
    from .loader import load as load_checkpoint
    from .llama_batched import SETTINGS
    cfg, weights, _ = load_checkpoint(model)
    def qtype(t):
        return t.qtype.name if hasattr(t, "qtype") else str(getattr(t, "dtype", "?"))
    qtypes = sorted({qtype(getattr(L, n)) for L in weights.layers for n in ("attn_q", "ffn_down")})
    kv = next((r.get("kv_types") for r in rows if r.get("kv_types")), None)
    kv_bpt = next((r.get("kv_bytes_per_token") for r in rows if r.get("kv_bytes_per_token")), None)
    return (f"model {os.path.basename(model)} ({', '.join(map(str, qtypes))}, {cfg.n_layers} layers, dim {cfg.dim}); "
            f"threads {','.join(map(str, threads_list))}; refinfer: ideal mode, paged KV blocks of {shape.block_size} "
            f"({'/'.join(kv) if kv else '?'}, {kv_bpt or '?'} bytes/token), prefix cache on, prefill budget {shape.budget} tokens/step; "
            f"llama.cpp: flash attention {'on' if shape.llama_kv()['flash_attn'] else SETTINGS['flash_attn']}, "
            f"unified KV ({shape.llama_kv()['type_k']}/{shape.llama_kv()['type_v']}), "
            f"extra buffer types {SETTINGS['extra_bufts']}, n_ubatch 512. "
            f"tg: aggregate decode tokens/s over the sequences (llama-batched-bench's S_TG), pp: their prefill; "
            f"engine: the same sequences through refinfer.Engine (continuous batching), decode rate after the last "
            f"sequence's first token, vs llama.cpp's batch; sampled: seeded top-k 40 / top-p 0.95 / min-p 0.05 / T 0.8 per sequence; "
            f"vs llama.cpp: speed ratio (TTFT: llama.cpp's time / refinfer's)")


def format_table(rows, model, threads_list, shape: Shape) -> str:
    head = ["backend", "threads", "test", "t/s", "vs llama.cpp", "prefill t/s", "TTFT", "KV/seq paged",
            "KV/seq contiguous", "peak mem"]
    mib = lambda b: "" if b is None else f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"  # noqa: E731
    lines = []
    for r in rows:
        tps = r.get("tokens_per_s")
        ttft = r.get("ttft_ms")
        is_ttft = "ttft_ms" in r
        lines.append([r["backend"], str(r["threads"]), r["test"],
                      "" if is_ttft else ("failed" if tps is None else f"{tps:.2f}"),
                      "" if r.get("ratio_vs_llama_cpp") is None else f"{r['ratio_vs_llama_cpp']:.2f}x",
                      "" if r.get("prefill_tokens_per_s") is None else f"{r['prefill_tokens_per_s']:.1f}",
                      ("failed" if ttft is None else f"{ttft:.1f} ms ({r['cached_tokens']} cached)") if is_ttft else "",
                      mib(r.get("kv_bytes_per_seq")), mib(r.get("kv_contiguous_bytes_per_seq")),
                      mib(r.get("peak_rss_bytes"))])
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [settings_line(model, threads_list, shape, rows), "", fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt(x) for x in lines]
    out += [f"FAILED: {r['backend']} threads={r['threads']} {r['test']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
