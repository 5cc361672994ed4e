"""refinfer's sampler chain against llama.cpp's own: the same float32 logits and history go
through `Sampler.candidates` and through a llama_sampler chain built with llama-cpp-python's
low-level API (penalties -> top-k -> top-p -> min-p -> temp -> dist, the order of
common/sampling.cpp with its other samplers off). The candidate sets must be equal and the
probabilities the draw uses within a float32 tolerance.

Ties: llama.cpp's top-k uses std::partial_sort, which is not stable, so among tokens tied at
the lowest kept logit it may keep other ids than refinfer (which keeps the lowest ids). Only
such tokens may differ, and their number must match."""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest

from refinfer.errors import RefinferError
from refinfer import sampling
from refinfer.sampling import Sampler, SamplerConfig

# float32 (llama.cpp) against float64 (refinfer) probabilities: measured max |dp| 1.2e-7 and
# max relative 2.0e-6 over CASES; bounds 10x that.
P_ABS_TOL = 1.2e-6
P_REL_TOL = 2e-5

TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data


def llama_candidates(logits, history, cfg):
    """(ids, probs) after llama.cpp's chain, in llama.cpp's order."""
    import llama_cpp as L
    n = len(logits)
    last_n = cfg.repeat_last_n if cfg.repeat_last_n >= 0 else max(len(history), 1)  # common: -1 = n_ctx
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    try:
        for s in (L.llama_sampler_init_penalties(n, last_n, cfg.repeat_penalty, 0.0, 0.0),
                  L.llama_sampler_init_top_k(cfg.top_k),
                  L.llama_sampler_init_top_p(cfg.top_p, 0),
                  L.llama_sampler_init_min_p(cfg.min_p, 0),
                  L.llama_sampler_init_temp(cfg.temperature),
                  L.llama_sampler_init_dist(1234)):
            L.llama_sampler_chain_add(chain, s)         # the chain owns and frees its samplers
        for t in history:
            L.llama_sampler_accept(chain, int(t))
        buf = np.zeros(n, TOKEN_DATA)
        buf["id"] = np.arange(n)
        buf["logit"] = logits
        data = (L.llama_token_data * n).from_buffer(buf)
        cur = L.llama_token_data_array(data=data, size=n, selected=-1, sorted=False)
        L.llama_sampler_apply(chain, ctypes.byref(cur))
        out = buf[: cur.size].copy()
    finally:
        L.llama_sampler_free(chain)
    keep = out["p"] > 0          # temp 0 leaves the other candidates at -inf, probability 0
    return out["id"][keep].astype(np.int64), out["p"][keep].astype(np.float64)


def penalized(logits, history, cfg):  # the logits after the repetition penalty, in float64
    z = np.asarray(logits, np.float64).copy()
    n = cfg.repeat_last_n
    recent = history if n < 0 else history[max(0, len(history) - n):] if n else []
    for t in set(int(t) for t in recent):
        z[t] = z[t] * cfg.repeat_penalty if z[t] <= 0 else z[t] / cfg.repeat_penalty
    return z


def assert_not_on_a_boundary(logits, history, cfg, where):
    """A case where float32 rounding could move the top-p or min-p cut says nothing: top-p
    sums n probabilities in float32 (error up to n * 2^-24 of the mass), min-p compares a
    logit with max + logf(min_p) in float32."""
    z = penalized(logits, history, cfg)
    if cfg.temperature <= 0:
        return
    z = z[np.argsort(-z, kind="stable")][: cfg.top_k or None]
    p = np.exp(z - z[0])
    p /= p.sum()
    if cfg.top_p < 1.0:
        cs = np.cumsum(p)
        k = int(np.searchsorted(cs, cfg.top_p)) + 1
        margin = np.min(np.abs(cs[max(k - 2, 0):k] - cfg.top_p))
        assert margin > k * 2.0 ** -24, f"test case: the top-p cut is {margin:.2g} from {cfg.top_p}: {where}"
        z = z[:k]
    if cfg.min_p > 0.0:
        margin = np.min(np.abs(z - z[0] - math.log(cfg.min_p)))
        assert margin > 1e-5, f"test case: a logit is {margin:.2g} from the min-p cut: {where}"


def compare(logits, history, cfg):
    """Asserts refinfer's candidates equal llama.cpp's; returns (max |dp|, max relative dp)."""
    where = f"{cfg}, vocab {len(logits)}, history {len(history)}"
    assert_not_on_a_boundary(logits, history, cfg, where)
    ids, p = Sampler(cfg).candidates(logits, history)
    ref_ids, ref_p = llama_candidates(logits, history, cfg)
    assert len(ids) == len(ref_ids), f"{len(ids)} candidates, llama.cpp keeps {len(ref_ids)}: {where}"
    ours, theirs = set(ids.tolist()), set(ref_ids.tolist())
    if ours != theirs:
        z = penalized(logits, history, cfg)
        differ = np.array(sorted(ours ^ theirs))
        lowest = z[ids].min()
        assert np.all(z[differ] == lowest) and z[ref_ids].min() == lowest, (
            f"candidates differ beyond ties at the lowest kept logit: only refinfer {sorted(ours - theirs)[:8]}, "
            f"only llama.cpp {sorted(theirs - ours)[:8]}: {where}")
    assert abs(p.sum() - 1.0) < 1e-12, where
    by_id = dict(zip(ref_ids.tolist(), ref_p))
    common = [i for i, t in enumerate(ids.tolist()) if t in by_id]
    got, want = p[common], np.array([by_id[t] for t in ids[common].tolist()])
    got, want = np.concatenate([got, np.sort(p)]), np.concatenate([want, np.sort(ref_p)])  # tied swaps by value
    dp = np.abs(got - want)
    rel = dp / np.maximum(want, 1e-30)
    assert dp.max() <= P_ABS_TOL and rel.max() <= P_REL_TOL, (
        f"probabilities differ from llama.cpp's by {dp.max():.3g} (relative {rel.max():.3g}): {where}")
    return float(dp.max()), float(rel.max())


def cfg(**kw):
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, repeat_last_n=64)
    return SamplerConfig(**{**base, **kw})


def _cases():
    rng = np.random.default_rng(10)
    out = []
    # distinct random logits; every stage alone, then together
    z = (rng.standard_normal(1000) * 3).astype(np.float32)
    h = rng.integers(0, 1000, 100).tolist()
    for c in (cfg(), cfg(temperature=0.5), cfg(temperature=1.7), cfg(temperature=0),
              cfg(top_k=1), cfg(top_k=40), cfg(top_k=200, temperature=0.7),
              cfg(top_p=0.9), cfg(top_p=0.02), cfg(top_p=0.9, temperature=0.4), cfg(top_p=0.5, temperature=2.0),
              cfg(min_p=0.05), cfg(min_p=0.05, temperature=0.4), cfg(min_p=0.2, temperature=2.5),
              cfg(top_k=40, top_p=0.95, min_p=0.05, temperature=0.8),
              cfg(top_k=40, top_p=0.95, min_p=0.05, temperature=0.8, repeat_penalty=1.3),
              cfg(top_k=0, top_p=0.7, min_p=0.02, temperature=1.3, repeat_penalty=0.7, repeat_last_n=16)):
        out.append((z, h, c))
    # negative logits and a penalty: multiplied, not divided (all candidates kept, so every
    # penalized probability is compared)
    zn = -np.abs(rng.standard_normal(500) * 2).astype(np.float32) - 0.1
    zn[::7] *= -1
    hn = rng.integers(0, 500, 300).tolist()
    for c in (cfg(repeat_penalty=1.5), cfg(repeat_penalty=1.5, temperature=0.6), cfg(repeat_penalty=0.8),
              cfg(repeat_penalty=1.5, top_k=50, min_p=0.01)):
        out.append((zn, hn, c))
    # history longer than repeat_last_n: only its last n tokens are penalized; -1 means all
    # of it (llama.cpp's common: the context size), 0 disables the penalty
    hl = rng.integers(0, 500, 400).tolist()
    for n in (1, 16, 64, 399, -1, 0):
        out.append((zn, hl, cfg(repeat_penalty=1.4, repeat_last_n=n)))
    # ties: logits on a grid of 1/4, with a penalty of 1.5 that keeps ties exact in float32
    # and float64 (q/4 * 1.5 and q/4 / 1.5 either are exact or lie 1/12 off the grid)
    zt = (np.round(rng.standard_normal(300) * 8) / 4).astype(np.float32)
    ht = rng.integers(0, 300, 80).tolist()
    for c in (cfg(top_k=10), cfg(top_k=1), cfg(temperature=0), cfg(top_k=25, temperature=0.7),
              cfg(top_p=0.6), cfg(min_p=0.1), cfg(top_k=40, top_p=0.95, min_p=0.05, temperature=0.8),
              cfg(top_k=10, repeat_penalty=1.5), cfg(top_k=30, top_p=0.8, min_p=0.05, repeat_penalty=1.5, temperature=0.9)):
        out.append((zt, ht, c))
    # a SmolLM2-sized vocabulary: llama.cpp's bucket sort above 128 candidates, and top-p's
    # partial sort of 256 over 1024 candidates, extended when the cut lies beyond (here 341
    # candidates; a top-p cut among thousands of candidates is within float32 rounding)
    zb = (rng.standard_normal(49152) * 2.5).astype(np.float32)
    hb = rng.integers(0, 49152, 200).tolist()
    peaked = zb.copy()
    peaked[rng.integers(0, 49152, 30)] += 9
    for z, c in ((zb, cfg(top_k=40, top_p=0.95, min_p=0.05, temperature=0.8, repeat_penalty=1.1)),
                 (zb, cfg(top_p=0.5, temperature=0.8)), (zb, cfg(top_k=500, temperature=1.2)),
                 (zb, cfg(min_p=0.01, temperature=0.5, repeat_penalty=1.2)),
                 (peaked, cfg(top_p=0.5, temperature=0.8)),
                 (peaked, cfg(top_k=40, top_p=0.95, min_p=0.05, temperature=0.8, repeat_penalty=1.1))):
        out.append((z, hb, c))
    return out


CASES = _cases()


def check_against_llama_cpp(cases=CASES):
    pytest.importorskip("llama_cpp")
    worst = (0.0, 0.0)
    for z, h, c in cases:
        d = compare(z, h, c)
        worst = (max(worst[0], d[0]), max(worst[1], d[1]))
    return worst


def test_chain_matches_llama_cpp():
    dp, rel = check_against_llama_cpp()
    print(f"max |dp| {dp:.3g}, max relative {rel:.3g} over {len(CASES)} cases")


def test_candidates_are_what_the_draw_uses():
    z = (np.random.default_rng(3).standard_normal(200) * 2).astype(np.float32)
    c = cfg(top_k=20, top_p=0.9, min_p=0.05, temperature=0.7, seed=5)
    ids, p = Sampler(c).candidates(z)
    s = Sampler(c)
    draws = [s(z, (), i) for i in range(4000)]
    assert set(draws) <= set(ids.tolist())
    freq = np.array([draws.count(t) for t in ids.tolist()]) / len(draws)
    assert np.abs(freq - p).max() < 0.03          # 4000 draws: sd of a frequency <= 0.008


def test_greedy_candidates_are_the_argmax():
    z = np.array([1.0, 3.0, 3.0, -2.0], np.float32)
    assert Sampler(cfg(temperature=0)).candidates(z, [1])[0].tolist() == [1]   # a tie: the first index
    ids, p = Sampler(cfg(temperature=0, repeat_penalty=1.5)).candidates(z, [1])
    assert ids.tolist() == [2] and p.tolist() == [1.0]     # token 1 penalized to 2.0


@pytest.mark.parametrize("field,value,option,valid", [
    ("temperature", -1.0, "--temp", ">= 0"), ("temperature", math.nan, "--temp", ">= 0"),
    ("temperature", math.inf, "--temp", ">= 0"),
    ("top_k", -1, "--top-k", ">= 0"), ("top_k", 2.5, "--top-k", ">= 0"),
    ("top_p", 0.0, "--top-p", "(0, 1]"), ("top_p", 1.5, "--top-p", "(0, 1]"), ("top_p", math.nan, "--top-p", "(0, 1]"),
    ("min_p", -0.1, "--min-p", "[0, 1]"), ("min_p", 1.5, "--min-p", "[0, 1]"),
    ("repeat_penalty", 0.0, "--repeat-penalty", "> 0"), ("repeat_penalty", -1.0, "--repeat-penalty", "> 0"),
    ("repeat_last_n", -2, "--repeat-last-n", ">= -1"), ("seed", -2, "--seed", ">= 0"), ("seed", 1.5, "--seed", ">= 0"),
    ("seed", 2 ** 64, "--seed", "< 2**64"),
])
def test_bad_settings_name_the_option_the_value_and_the_range(field, value, option, valid):
    with pytest.raises(RefinferError) as e:
        SamplerConfig(**{field: value}).check()
    msg = str(e.value)
    assert field in msg and option in msg and valid in msg and repr(value) in msg, msg
    assert e.value.hint and option in e.value.hint, e.value.hint


def test_temperature_hint_names_greedy_decoding():
    with pytest.raises(RefinferError) as e:
        SamplerConfig(temperature=-0.5).check()
    assert "--temp 0" in e.value.hint and "greedy" in e.value.hint


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(top_k=0), dict(top_p=1.0), dict(min_p=0.0), dict(min_p=1.0),
                                dict(repeat_last_n=-1), dict(repeat_last_n=0), dict(seed=-1), dict(seed=None),
                                dict(seed=2 ** 40), dict(seed=2 ** 64 - 1), dict(top_k=np.int64(5))])
def test_edge_settings_are_valid(kw):
    SamplerConfig(**kw).check()


def test_random_seed_is_reported_and_reproduces():
    z = (np.random.default_rng(4).standard_normal(100)).astype(np.float32)
    s = Sampler(cfg(seed=-1))
    first = [s(z, (), i) for i in range(30)]
    again = Sampler(cfg(seed=s.seed))
    assert isinstance(s.seed, int) and s.seed >= 0
    assert [again(z, (), i) for i in range(30)] == first


# --- the fast chain is the sort-based chain, bit for bit -----------------------------------------

def sorted_candidates(cfg, logits, history=()):
    """The sampler as it was before partial selection, kept verbatim as the definition:
    a full stable sort of the vocabulary."""
    c = cfg
    z = sampling.penalize(np.asarray(logits, dtype=np.float64), history, c.repeat_penalty, c.repeat_last_n)
    if c.temperature <= 0:
        return np.array([np.argmax(z)]), np.ones(1)
    order = np.argsort(-z, kind="stable")                     # llama_sampler_top_k
    if c.top_k > 0:
        order = order[: c.top_k]
    p = sampling.softmax(z[order])
    if c.top_p < 1.0:                                         # llama_sampler_top_p: smallest prefix with mass >= top_p
        keep = int(np.searchsorted(np.cumsum(p), c.top_p) + 1)
        order, p = order[:keep], p[:keep]
    if c.min_p > 0.0:                                         # llama_sampler_min_p: drop p < min_p * p_max
        keep = p >= c.min_p * p[0]
        order, p = order[keep], p[keep]
    return order, sampling.softmax(z[order] / c.temperature)  # llama_sampler_temp, then dist's softmax


def _tie_logits():
    """Logits with many ties: on a grid of 1/4 (ties at every cut), a SmolLM2-sized grid, a
    peaked one, a nearly flat one (top-p keeps thousands), and one with -inf entries."""
    rng = np.random.default_rng(11)
    grid = lambda n, s: (np.round(rng.standard_normal(n) * s) / 4).astype(np.float32)  # noqa: E731
    big = grid(49152, 10)
    peaked = big.copy()
    peaked[rng.integers(0, 49152, 30)] += 12
    flat = (np.round(rng.standard_normal(49152) * 2) / 64).astype(np.float32)
    masked = grid(3000, 8)
    masked[rng.integers(0, 3000, 1000)] = -np.inf
    return [grid(300, 8), big, peaked, flat, masked]


TIE_LOGITS = _tie_logits()
ALL_SETTINGS = [dict(top_k=k, top_p=p, min_p=m, temperature=t, repeat_penalty=r)
                for k in (0, 1, 40, 10 ** 9) for p in (1.0, 0.95, 0.02) for m in (0.0, 0.05, 0.9)
                for t in (0, 0.8, 2.0) for r in (1.0, 1.5)]


def check_fast_chain_is_the_sort(logits_list=TIE_LOGITS, settings=ALL_SETTINGS):
    """Sampler.candidates against sorted_candidates: the same ids in the same order and the
    same float64 probabilities, bitwise. Returns the number of cases whose cut fell on a tie."""
    rng = np.random.default_rng(12)
    on_a_tie = 0
    for z in logits_list:
        history = rng.integers(0, len(z), 64).tolist()
        for kw in settings:
            c = cfg(**kw)
            ids, p = Sampler(c).candidates(z, history)
            ref_ids, ref_p = sorted_candidates(c, z, history)
            where = f"{kw}, vocab {len(z)}"
            assert ids.dtype == ref_ids.dtype and p.dtype == ref_p.dtype, where
            assert np.array_equal(ids, ref_ids), f"ids differ from the sort's: {where}"
            assert np.array_equal(p, ref_p), f"probabilities differ from the sort's by {np.abs(p - ref_p).max()}: {where}"
            zp = sampling.penalize(np.asarray(z, np.float64), history, c.repeat_penalty, c.repeat_last_n)
            on_a_tie += len(ids) < len(z) and np.count_nonzero(zp == zp[ids[-1]]) > np.count_nonzero(zp[ids] == zp[ids[-1]])
    return on_a_tie


def test_fast_chain_equals_the_full_sort_bitwise():
    on_a_tie = check_fast_chain_is_the_sort()
    assert on_a_tie >= 50, f"only {on_a_tie} cases cut through a run of tied logits"   # 408 of 1080 today


def test_best_is_the_stable_sort_prefix():
    rng = np.random.default_rng(13)
    z = np.round(rng.standard_normal(5000) * 3)            # about 20 distinct values
    z[rng.integers(0, 5000, 50)] = np.nan                  # NaN sorts last in the stable sort of -z
    for k in (1, 2, 7, 100, 4949, 4960, 4999, 5000, 6000):
        assert np.array_equal(sampling.best(z, k), np.argsort(-z, kind="stable")[:k]), k


# --- the draw: a pure function of (seed, i) ------------------------------------------------------

M64 = (1 << 64) - 1


def philox4x64_10(counter, key):
    """Philox4x64-10 of Random123 (Salmon et al., SC'11), written from the paper's constants."""
    c, k = list(counter), list(key)
    for r in range(10):
        if r:
            k = [(k[0] + 0x9E3779B97F4A7C15) & M64, (k[1] + 0xBB67AE8584CAA73B) & M64]
        p0, p1 = 0xD2E7470EE14C6C93 * c[0], 0xCA5A826395121157 * c[2]
        c = [(p1 >> 64) ^ c[1] ^ k[0], p1 & M64, (p0 >> 64) ^ c[3] ^ k[1], p0 & M64]
    return c


def documented_uniform(seed, i):  # the rule of refinfer/sampling.py's docstring
    return (philox4x64_10([i + 1, 0, 0, 0], [seed, 0])[0] >> 11) * 2.0 ** -53


def test_uniform_is_the_documented_philox_rule():
    for seed in (0, 1, 42, 2 ** 32 - 1, 2 ** 63 + 5, M64):
        for i in (0, 1, 2, 3, 4, 5, 1000, 2 ** 40):
            u = sampling.uniform(seed, i)
            assert u == documented_uniform(seed, i) and 0.0 <= u < 1.0, (seed, i)


def check_inverse_cdf_edges():
    p = np.array([0.25, 0.5, 0.0, 0.25])
    assert [sampling.inverse_cdf(p, u) for u in (0.0, 0.2499, 0.25, 0.7499, 0.75, 0.9999)] == [0, 0, 1, 1, 3, 3]
    q = np.array([0.5, 0.25, 0.25 - 2 ** -40, 0.0])         # sums to below 1: u above it is the last p > 0
    assert sampling.inverse_cdf(q, 1.0 - 2 ** -53) == 2


def test_inverse_cdf_edges():
    check_inverse_cdf_edges()


class SharedStreamSampler(Sampler):
    """Today's sampler before the counter-based draw: one stream per request, so a draw depends
    on how many came before. The negative control of the independence test."""

    def __init__(self, c):
        super().__init__(c)
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, logits, history, i):
        ids, p = self.candidates(logits, history)
        return int(ids[self.rng.choice(len(ids), p=p)])


FLAT = np.zeros(40, np.float32)   # 40 equally likely tokens: two unrelated draws agree 1 time in 40


def check_draws_are_independent(make=Sampler):
    """Token i is the same drawn first, drawn after tokens 0..i-1, or after other i."""
    c = cfg(seed=123)
    n = 30
    in_order = make(c)
    seq = [in_order(FLAT, (), i) for i in range(n)]
    alone = [make(c)(FLAT, (), i) for i in range(n)]
    backwards = make(c)
    rev = [backwards(FLAT, (), i) for i in reversed(range(n))][::-1]
    assert seq == alone == rev, (seq, alone, rev)
    assert len(set(seq)) > 10                               # the draws do vary with i
    first5 = make(c)(FLAT, (), 5)
    assert first5 == seq[5]


def test_draw_i_does_not_depend_on_earlier_draws():
    check_draws_are_independent()


def test_a_shared_stream_fails_the_independence_test():
    with pytest.raises(AssertionError):
        check_draws_are_independent(SharedStreamSampler)


def check_draw_frequencies(n=20000):
    """Tokens drawn with keys (seed, i), i < n, follow the candidate probabilities. Each
    frequency has sd sqrt(p(1 - p) / n) <= 0.0035; the bound is 5 sd per candidate (a chance
    of 6e-7 each for a correct draw; the draw is deterministic, so the test cannot flake) and
    chi-square below df + 5 sqrt(2 df)."""
    z = (np.random.default_rng(14).standard_normal(200) * 1.5).astype(np.float32)
    c = cfg(top_k=40, top_p=0.95, min_p=0.02, temperature=0.9, seed=2024)
    s = Sampler(c)
    ids, p = s.candidates(z)
    pos = {t: j for j, t in enumerate(ids.tolist())}
    counts = np.bincount([pos[s(z, (), i)] for i in range(n)], minlength=len(ids))
    freq = counts / n
    sd = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= 5 * sd + 1 / n), np.max(np.abs(freq - p) / sd)
    chi2 = float(np.sum((counts - n * p) ** 2 / (n * p)))
    df = len(ids) - 1
    assert chi2 < df + 5 * math.sqrt(2 * df), (chi2, df)
    return chi2, df


def test_draw_frequencies_follow_the_probabilities():
    chi2, df = check_draw_frequencies()
    print(f"chi-square {chi2:.1f} with {df} degrees of freedom")


@pytest.fixture(scope="module")
def tiny(tiny_llama_f32):
    import refinfer
    return refinfer.load(tiny_llama_f32, backend="numpy")


def test_generate_draws_token_i_with_key_seed_i(tiny, monkeypatch):
    import refinfer.model
    calls = []

    class Recorder(refinfer.model.Sampler):
        def __call__(self, logits, history, i):
            tok = super().__call__(logits, history, i)
            calls.append((i, self.seed, tok))
            return tok

    monkeypatch.setattr(refinfer.model, "Sampler", Recorder)
    kw = dict(max_tokens=10, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=77)
    first = tiny.generate("Hello world", **kw)
    run1, calls[:] = list(calls), []
    assert tiny.generate("Hello world", **kw) == first and calls == run1
    assert [i for i, _, _ in run1] == list(range(len(run1))) and {s for _, s, _ in run1} == {77}
    assert len(run1) == 10                                  # no end-of-generation token in 10 at temperature 1.5
