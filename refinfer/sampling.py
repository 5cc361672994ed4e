"""Token sampling, in llama.cpp's default chain order: repetition penalty -> top-k -> top-p ->
min-p -> temperature -> draw. temperature <= 0 means greedy (argmax, first index on ties)."""

from __future__ import annotations

import dataclasses

import numpy as np

from .errors import RefinferError


@dataclasses.dataclass
class SamplerConfig:
    temperature: float = 0.8
    top_k: int = 40            # 0 disables
    top_p: float = 0.95        # 1.0 disables
    min_p: float = 0.05        # 0.0 disables
    repeat_penalty: float = 1.0  # 1.0 disables; divides positive / multiplies negative logits
    repeat_last_n: int = 64
    seed: int | None = None

    def check(self):
        if not (self.temperature >= 0):
            raise RefinferError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise RefinferError(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise RefinferError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (0.0 <= self.min_p <= 1.0):
            raise RefinferError(f"min_p must be in [0, 1], got {self.min_p}")
        if not (self.repeat_penalty > 0):
            raise RefinferError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        return self


class Sampler:
    def __init__(self, cfg: SamplerConfig):
        self.cfg = cfg.check()
        self.rng = np.random.default_rng(cfg.seed)

    def __call__(self, logits: np.ndarray, history=()) -> int:
        c = self.cfg
        z = np.asarray(logits, dtype=np.float64).copy()          # [vocab]
        if c.repeat_penalty != 1.0 and len(history):
            recent = np.unique(np.asarray(history[-c.repeat_last_n:], dtype=np.int64))
            z[recent] = np.where(z[recent] > 0, z[recent] / c.repeat_penalty, z[recent] * c.repeat_penalty)
        if c.temperature <= 0:
            return int(np.argmax(z))
        order = np.argsort(-z, kind="stable")                     # candidates, best first
        if c.top_k > 0:
            order = order[: c.top_k]
        p = np.exp(z[order] - z[order[0]])
        p /= p.sum()
        if c.top_p < 1.0:                                         # smallest prefix with mass >= top_p
            keep = int(np.searchsorted(np.cumsum(p), c.top_p) + 1)
            order, p = order[:keep], p[:keep]
        if c.min_p > 0.0:                                         # drop tokens below min_p * p_max
            keep = p >= c.min_p * p[0]
            order, p = order[keep], p[keep]
        zt = z[order] / c.temperature
        p = np.exp(zt - zt.max())
        p /= p.sum()
        return int(order[self.rng.choice(len(order), p=p)])
