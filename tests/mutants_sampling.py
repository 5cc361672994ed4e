"""Wrong samplers that tests/test_sampling.py must catch: by comparing with llama.cpp's chain,
with the full-sort definition of the candidates, and with the documented draw rule."""

from __future__ import annotations

import numpy as np

from test_mutants import Mutant
from test_sampling import (check_against_llama_cpp, check_draws_are_independent, check_fast_chain_is_the_sort,
                           check_inverse_cdf_edges)

from refinfer import sampling


def _divides_negative_logits(z, history, penalty, last_n):
    z = z.copy()
    if penalty == 1.0 or last_n == 0 or not len(history):
        return z
    recent = np.unique(np.asarray(history if last_n < 0 else history[-last_n:], dtype=np.int64))
    z[recent] = z[recent] / penalty
    return z


_PENALIZE = sampling.penalize


def _whole_history(z, history, penalty, last_n):
    return _PENALIZE(z, history, penalty, -1 if last_n else 0)


def _temperature_first(self, logits, history=()):
    c = self.cfg
    z = sampling.penalize(np.asarray(logits, dtype=np.float64), history, c.repeat_penalty, c.repeat_last_n)
    if c.temperature <= 0:
        return np.array([np.argmax(z)]), np.ones(1)
    z = z / c.temperature
    order = np.argsort(-z, kind="stable")
    if c.top_k > 0:
        order = order[: c.top_k]
    p = sampling.softmax(z[order])
    if c.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), c.top_p) + 1)
        order, p = order[:keep], p[:keep]
    if c.min_p > 0.0:
        order = order[p >= c.min_p * p[0]]
    return order, sampling.softmax(z[order])


def _ties_by_partition(z, k, kth=None):  # argpartition's arbitrary choice among logits tied at the k-th
    if k >= len(z):
        return np.argsort(-z, kind="stable")
    ids = np.argpartition(-z, k - 1)[:k]
    return ids[np.argsort(-z[ids], kind="stable")]


def _stream_uniform():  # one stream per seed: a draw depends on how many came before
    streams = {}
    return lambda seed, i: streams.setdefault(seed, np.random.default_rng(seed)).random()


def _inverse_cdf_left(p, u):  # u on a cumulative edge stays with the candidate below it
    return min(int(np.searchsorted(np.cumsum(p), u, side="left")), len(p) - 1)


def _patch_penalize(wrong):
    return lambda monkeypatch: monkeypatch.setattr(sampling, "penalize", wrong)


def _check(request):
    check_against_llama_cpp()


MUTANTS = [
    Mutant("sampling_penalty_divides_negative_logits", _patch_penalize(_divides_negative_logits), _check),
    Mutant("sampling_repeat_last_n_ignored", _patch_penalize(_whole_history), _check),
    Mutant("sampling_temperature_before_top_p_min_p",
           lambda mp: mp.setattr(sampling.Sampler, "candidates", _temperature_first), _check),
    Mutant("sampling_top_k_ties_by_argpartition", lambda mp: mp.setattr(sampling, "best", _ties_by_partition),
           lambda request: check_fast_chain_is_the_sort()),
    Mutant("sampling_draw_from_a_shared_stream", lambda mp: mp.setattr(sampling, "uniform", _stream_uniform()),
           lambda request: check_draws_are_independent()),
    Mutant("sampling_inverse_cdf_edge_goes_below", lambda mp: mp.setattr(sampling, "inverse_cdf", _inverse_cdf_left),
           lambda request: check_inverse_cdf_edges()),
]
