"""How far apart two sets of logits are: the measures llama.cpp and its users quote.

nmse      sum((a - b)^2) / sum(b^2), b the base (test-backend-ops' NMSE)
kld       per position KL(P_base || P_test) of the softmax distributions, in nats
same_top  share of positions where both pick the same most likely token
All computed in float64 from float32 logits.
"""

from __future__ import annotations

import numpy as np


def log_softmax(z: np.ndarray) -> np.ndarray:  # [T, V] -> [T, V] float64
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def nmse(test: np.ndarray, base: np.ndarray) -> float:
    test, base = np.asarray(test, np.float64), np.asarray(base, np.float64)
    den = float(np.sum(base * base))
    return float(np.sum((test - base) ** 2)) / den if den else float(np.sum((test - base) ** 2))


def kld_per_position(test: np.ndarray, base: np.ndarray) -> np.ndarray:  # -> [T]
    lb, lt = log_softmax(base), log_softmax(test)
    return np.sum(np.exp(lb) * (lb - lt), axis=-1)


def compare_logits(test: np.ndarray, base: np.ndarray) -> dict:
    """Summary of test vs base logits [T, V]: nmse, mean/max/p99 KLD, same_top."""
    if test.shape != base.shape:
        raise ValueError(f"logit shapes differ: {test.shape} vs {base.shape}")
    kld = kld_per_position(test, base)
    top_same = np.argmax(test, axis=-1) == np.argmax(base, axis=-1)
    return {"nmse": nmse(test, base), "kld_mean": float(kld.mean()), "kld_max": float(kld.max()),
            "kld_p99": float(np.percentile(kld, 99)), "same_top": float(top_same.mean()), "n": int(len(kld))}
