"""Token sampling, in llama.cpp's default chain order (common/sampling.cpp, with DRY, typical-p,
XTC and top-n-sigma off): repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw.
temperature <= 0 means greedy (argmax, first index on ties).

Each stage follows its llama.cpp sampler (src/llama-sampler.cpp) with min_keep = 0, the
default; `Sampler.candidates` returns the candidates and probabilities the draw sees, and
tests/test_sampling.py compares them with llama.cpp's own sampler chain. refinfer computes in
float64 where llama.cpp uses float32, so a token exactly on a top-p or min-p boundary may fall
on the other side, and tokens tied at the top-k boundary may be chosen differently (refinfer
keeps the lowest ids; llama.cpp's partial sort is not stable).

The candidates are defined by a full stable sort (np.argsort(-z, kind="stable")) but computed
without one: top-k selects its k ids by partition (`best`), and with top-k off the top-p and
min-p cuts are found on the sorted values alone (np.sort, which needs no ids and is ~20x
faster than the stable argsort), so that only the kept prefix is ordered by id. The softmax is
taken over the same values in the same order as the full sort would give, so ids and
probabilities are the sort's bit for bit (tests/test_sampling.py checks it). Only when nothing
is cut (top-k 0, top-p 1, min-p 0) is the whole vocabulary sorted. No log-softmax is computed.

The draw. The i-th generated token of a request (i = 0, 1, 2, ...) is drawn with one number u
that is a function of (seed, i) alone, never of earlier draws, so that any engine that numbers
a request's tokens the same way draws the same numbers:
- x = word 0 of the Philox4x64-10 block (Random123) with key (seed, 0) (the seed, 0 <= seed <
  2^64, is the low key word) and counter (i + 1, 0, 0, 0): this is
  np.random.Philox(key=seed, counter=i).random_raw(), as numpy increments the counter before
  it computes its first block;
- u = (x >> 11) * 2^-53: the top 53 bits, in [0, 1), as numpy's Generator.random();
- the candidates' probabilities p_0, p_1, ... in candidate order (best first) are accumulated
  in float64 from the first, c_j = c_(j-1) + p_j (np.cumsum), and the token is the first
  candidate j with u < c_j: u equal to c_j goes to the next candidate. If u >= the last c_j,
  which only rounding allows, it is the last candidate with p_j > 0.
Greedy decoding draws no number."""

from __future__ import annotations

import dataclasses
import math
import operator
import secrets

import numpy as np

from .errors import RefinferError


@dataclasses.dataclass
class SamplerConfig:
    temperature: float = 0.8
    top_k: int = 40            # 0 disables
    top_p: float = 0.95        # 1.0 disables
    min_p: float = 0.05        # 0.0 disables
    repeat_penalty: float = 1.0  # 1.0 disables; divides positive / multiplies negative logits
    repeat_last_n: int = 64    # tokens of history the penalty looks at; 0 disables, -1 all of them
    seed: int | None = None    # None or -1: a random seed (Sampler.seed tells which)

    def check(self):
        def number(name, option, value, ok, valid, hint):
            try:
                ok = math.isfinite(float(value)) and ok(float(value))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise RefinferError(f"{name} ({option}) must be {valid}, got {value!r}", hint=hint)

        def integer(name, option, value, lo, valid, hint, hi=None):
            try:
                ok = not isinstance(value, bool) and lo <= operator.index(value) and (hi is None or value < hi)
            except TypeError:
                ok = False
            if not ok:
                raise RefinferError(f"{name} ({option}) must be {valid}, got {value!r}", hint=hint)

        number("temperature", "--temp", self.temperature, lambda v: v >= 0, "a number >= 0",
               "use --temp 0 for greedy decoding, or a temperature such as 0.8 (the default); "
               "higher values flatten the distribution")
        integer("top_k", "--top-k", self.top_k, 0, "an integer >= 0",
                "--top-k K keeps the K most likely tokens; 0 disables it (default 40)")
        number("top_p", "--top-p", self.top_p, lambda v: 0.0 < v <= 1.0, "in (0, 1]",
               "--top-p keeps the smallest set of tokens whose probability reaches P; 1 disables it (default 0.95)")
        number("min_p", "--min-p", self.min_p, lambda v: 0.0 <= v <= 1.0, "in [0, 1]",
               "--min-p P drops tokens below P x the top token's probability; 0 disables it (default 0.05)")
        number("repeat_penalty", "--repeat-penalty", self.repeat_penalty, lambda v: v > 0, "a number > 0",
               "--repeat-penalty 1 disables the penalty (the default); values such as 1.1 make recent tokens less likely")
        integer("repeat_last_n", "--repeat-last-n", self.repeat_last_n, -1, "an integer >= -1",
                "--repeat-last-n N: the penalty looks at the last N tokens (default 64); 0 disables it, -1 means all of them")
        if self.seed is not None and self.seed != -1:
            integer("seed", "--seed", self.seed, 0, "an integer >= 0 and < 2**64 (the draw's Philox key), "
                    "or -1 for a random seed",
                    "give --seed N for reproducible sampling, or -1 (or no --seed) for a random seed", hi=2 ** 64)
        return self


def penalize(z, history, penalty, last_n):
    """llama_sampler_penalties with penalty_repeat only: every distinct token among the last
    `last_n` of `history` (all of it for -1; none for 0) has its logit multiplied by `penalty`
    if <= 0, divided by it if > 0. Returns a new array."""
    z = z.copy()
    if penalty == 1.0 or last_n == 0 or not len(history):
        return z
    recent = np.asarray(history if last_n < 0 else history[-last_n:], dtype=np.int64)
    recent = np.unique(recent[(recent >= 0) & (recent < len(z))])
    z[recent] = np.where(z[recent] > 0, z[recent] / penalty, z[recent] * penalty)
    return z


def softmax(z):
    p = np.exp(z - z.max())
    p /= p.sum()
    return p


def best(z, k, kth=None):
    """The ids of the k largest entries of z, largest first, ties in id order:
    np.argsort(-z, kind="stable")[:k], found by partition and a sort of those k alone. kth,
    if given, is the k-th largest value of z (so no partition is needed)."""
    w = -z
    if k >= len(z):
        return np.argsort(w, kind="stable")
    kth = np.partition(w, k - 1)[k - 1] if kth is None else -kth   # the k-th smallest of -z
    if np.isnan(kth):                                       # fewer than k non-NaN entries
        return np.argsort(w, kind="stable")[:k]
    chosen = w < kth
    chosen[np.flatnonzero(w == kth)[: k - np.count_nonzero(chosen)]] = True   # ties: the lowest ids
    ids = np.flatnonzero(chosen)                            # in id order, so the stable sort keeps it
    return ids[np.argsort(w[ids], kind="stable")]


def top_p_count(p, top_p):
    """llama_sampler_top_p: the length of the smallest prefix of p with mass >= top_p,
    np.searchsorted(np.cumsum(p), top_p) + 1 (which may exceed len(p) when rounding keeps the
    mass below top_p), summing only as much of p as the cut needs."""
    m = 256
    while True:
        cs = np.cumsum(p[:m])                               # sequential: a prefix of the full cumsum
        if cs[-1] >= top_p or m >= len(p):
            return int(np.searchsorted(cs, top_p)) + 1
        m *= 4


def uniform(seed, i) -> float:
    """The draw's u for generated token i: Philox4x64-10 keyed by the seed, counter i + 1, word
    0, top 53 bits (see the module docstring)."""
    x = int(np.random.Philox(key=seed, counter=i).random_raw())
    return (x >> 11) * 2.0 ** -53


def inverse_cdf(p, u) -> int:
    """The index of the first candidate whose cumulative probability exceeds u."""
    j = int(np.searchsorted(np.cumsum(p), u, side="right"))     # first j with u < c_j
    return j if j < len(p) else int(np.flatnonzero(p > 0)[-1])


def resolve_seed(seed) -> int:
    """The seed a request draws with: None or -1 (llama.cpp's LLAMA_DEFAULT_SEED, "random")
    picks a fresh 32-bit seed, to be reported so that the run can be repeated; any other value
    must pass SamplerConfig's seed rule."""
    if seed is None or (not isinstance(seed, bool) and seed == -1):
        return secrets.randbits(32)
    SamplerConfig(seed=seed).check()
    return int(seed)


class Sampler:
    """One request's sampler: the chain of SamplerConfig and its seed. sampler(logits, history,
    i) gives generated token i; it keeps no state between calls, so calls may come in any
    order, and the same (logits, history, i) always gives the same token."""

    def __init__(self, cfg: SamplerConfig):
        self.cfg = cfg.check()
        self.seed = resolve_seed(cfg.seed)

    def candidates(self, logits, history=()):
        """The candidates of the draw: token ids int64[n], best first, and their probabilities
        float64[n] after the whole chain. Greedy (temperature <= 0): the argmax alone."""
        c = self.cfg
        z = penalize(np.asarray(logits, dtype=np.float64), history, c.repeat_penalty, c.repeat_last_n)  # [vocab]
        if c.temperature <= 0:
            return np.array([np.argmax(z)]), np.ones(1)
        n = len(z)
        k = c.top_k if 0 < c.top_k < n else n                   # llama_sampler_top_k
        if k < n or not np.isfinite(z.max()):                # top-k; or a NaN or +inf logit (a NaN softmax)
            order = best(z, k)
            p = softmax(z[order])
            if c.top_p < 1.0:                                   # llama_sampler_top_p: smallest prefix with mass >= top_p
                keep = top_p_count(p, c.top_p)
                order, p = order[:keep], p[:keep]
            if c.min_p > 0.0:                                   # llama_sampler_min_p: drop p < min_p * p_max
                keep = p >= c.min_p * p[0]
                order, p = order[keep], p[keep]
        else:                                                   # no top-k: cut on the sorted values, then find the ids
            zs = np.sort(z)[::-1]                               # = z[np.argsort(-z, kind="stable")]: ties are equal
            p = softmax(zs)
            keep = np.ones(n, bool)
            if c.top_p < 1.0:
                keep[top_p_count(p, c.top_p):] = False
            if c.min_p > 0.0:
                keep &= p >= c.min_p * p[0]
            cut = int(np.flatnonzero(keep)[-1]) + 1              # keep is a prefix, unless exp is not monotonic
            order = best(z, cut, zs[cut - 1])[keep[:cut]]
        return order, softmax(z[order] / c.temperature)         # llama_sampler_temp, then dist's softmax

    def __call__(self, logits, history, i) -> int:
        """Generated token i (0 for the first token after the prompt) of this request."""
        ids, p = self.candidates(logits, history)
        if self.cfg.temperature <= 0:
            return int(ids[0])
        return int(ids[inverse_cdf(p, uniform(self.seed, i))])
