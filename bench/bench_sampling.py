"""Time per token of the sampler on SmolLM2's 49,152-entry vocabulary, against the full stable
sort that defined it before (tests/test_sampling.py's sorted_candidates plus today's draw).

    python -m pytest bench/bench_sampling.py --benchmark-enable [-s]

Two chains: llama.cpp's default (top-k 40, top-p 0.95, min-p 0.05, temperature 0.8) and the
same with top-k 0, where top-p and min-p cut the whole vocabulary. The logits are float32
N(0, 2.5^2) with 30 tokens raised by 9 (a peaked next-token distribution), and a 64-token
history. Every case first checks, on 8 logit vectors, that Sampler.candidates gives the sort's
ids and probabilities bitwise, then times one sampler call per token (candidates and draw).
Nothing is asserted about time.

With benchmarks disabled (`--benchmark-disable`, the default in pyproject.toml, as in CI) the
check runs once on a 2,000-entry vocabulary and nothing is timed.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from refinfer.sampling import Sampler, SamplerConfig
from test_sampling import sorted_candidates

CHAINS = {"default": dict(top_k=40, top_p=0.95, min_p=0.05, temperature=0.8),
          "top_k_0": dict(top_k=0, top_p=0.95, min_p=0.05, temperature=0.8)}


def quick(config) -> bool:  # benchmarks off (pytest-benchmark's rule): check on small shapes, time nothing
    return bool(config.getoption("benchmark_disable") and not config.getoption("benchmark_enable"))


def logits(vocab, seed):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal(vocab) * 2.5).astype(np.float32)
    z[rng.integers(0, vocab, 30)] += 9
    return z


class SortSampler(Sampler):
    """The sampler before partial selection: the full stable sort and one random stream."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, z, history, i):
        ids, p = sorted_candidates(self.cfg, z, history)
        return int(ids[self.rng.choice(len(ids), p=p)])


def check_chain(cfg, vocab, history):
    for seed in range(8):
        z = logits(vocab, seed)
        ids, p = Sampler(cfg).candidates(z, history)
        ref_ids, ref_p = sorted_candidates(cfg, z, history)
        assert np.array_equal(ids, ref_ids) and np.array_equal(p, ref_p), f"{cfg} vocab {vocab} logits {seed}"
    return z


@pytest.mark.parametrize("impl", ["refinfer", "full_sort"])
@pytest.mark.parametrize("chain", CHAINS)
def test_sampler(benchmark, request, chain, impl):
    vocab = 2000 if quick(request.config) else 49152
    cfg = SamplerConfig(**CHAINS[chain], seed=1)
    history = np.random.default_rng(9).integers(0, vocab, 64).tolist()
    z = check_chain(cfg, vocab, history)
    s = (Sampler if impl == "refinfer" else SortSampler)(cfg)
    i = itertools.count()
    benchmark(lambda: s(z, history, next(i)))
    mean = benchmark.stats.stats.mean if benchmark.stats else None
    if mean:
        n = len(Sampler(cfg).candidates(z, history)[0])
        benchmark.extra_info["ms/token"] = mean * 1e3
        benchmark.extra_info["candidates"] = n
        print(f"\n{chain} ({impl}), vocab {vocab}: {mean * 1e3:.3f} ms per token, {n} candidates")
