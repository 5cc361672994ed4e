"""Token sampling, in llama.cpp's default chain order (common/sampling.cpp, with DRY, typical-p,
XTC and top-n-sigma off): repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw.
temperature <= 0 means greedy (argmax, first index on ties).

Each stage follows its llama.cpp sampler (src/llama-sampler.cpp) with min_keep = 0, the
default; `Sampler.candidates` returns the candidates and probabilities the draw sees, and
tests/test_sampling.py compares them with llama.cpp's own sampler chain. refinfer computes in
float64 where llama.cpp uses float32, so a token exactly on a top-p or min-p boundary may fall
on the other side, and tokens tied at the top-k boundary may be chosen differently (refinfer
keeps the lowest ids; llama.cpp's partial sort is not stable)."""

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

        def integer(name, option, value, lo, valid, hint):
            try:
                ok = not isinstance(value, bool) and operator.index(value) >= lo
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
            integer("seed", "--seed", self.seed, 0, "an integer >= 0, or -1 for a random seed",
                    "give --seed N for reproducible sampling, or -1 (or no --seed) for a random seed")
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


class Sampler:
    def __init__(self, cfg: SamplerConfig):
        self.cfg = cfg.check()
        self.seed = secrets.randbits(32) if cfg.seed in (None, -1) else int(cfg.seed)
        self.rng = np.random.default_rng(self.seed)

    def candidates(self, logits, history=()):
        """The candidates of the draw: token ids int64[n], best first, and their probabilities
        float64[n] after the whole chain. Greedy (temperature <= 0): the argmax alone."""
        c = self.cfg
        z = penalize(np.asarray(logits, dtype=np.float64), history, c.repeat_penalty, c.repeat_last_n)  # [vocab]
        if c.temperature <= 0:
            return np.array([np.argmax(z)]), np.ones(1)
        order = np.argsort(-z, kind="stable")                     # llama_sampler_top_k
        if c.top_k > 0:
            order = order[: c.top_k]
        p = softmax(z[order])
        if c.top_p < 1.0:                                         # llama_sampler_top_p: smallest prefix with mass >= top_p
            keep = int(np.searchsorted(np.cumsum(p), c.top_p) + 1)
            order, p = order[:keep], p[:keep]
        if c.min_p > 0.0:                                         # llama_sampler_min_p: drop p < min_p * p_max
            keep = p >= c.min_p * p[0]
            order, p = order[keep], p[keep]
        return order, softmax(z[order] / c.temperature)           # llama_sampler_temp, then dist's softmax

    def __call__(self, logits, history=()) -> int:
        ids, p = self.candidates(logits, history)
        if self.cfg.temperature <= 0:
            return int(ids[0])
        return int(ids[self.rng.choice(len(ids), p=p)])
