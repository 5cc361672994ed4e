"""Injected bugs in compare's verdicts (refinfer/verdict.py, refinfer/floor.py), each caught by
tests/test_floor_verdict.py's own checks (run by tests/test_mutants.py). The checks run on the
fixture models and a 64-token generated workload, a few seconds each."""

from __future__ import annotations

import test_floor_verdict as t
from test_mutants import Mutant

from refinfer import floor
from refinfer import verdict as V


def _no_identities(monkeypatch):
    monkeypatch.setattr(V, "identity_suspects", lambda *a, **k: {})
    monkeypatch.setattr(V, "norm_weight_mismatches", lambda *a, **k: {})


MUTANTS = [
    # the identities inside a dump never consulted: a 1% scale of ffn_inp-1 is then below what
    # the floor and the fits can see on the generated model
    Mutant("verdict_identities_ignored", _no_identities,
           lambda request: t.check_generated_injection(t.generated_workload(), "ffn_inp-1")),
    # a tensor's floor not raised to its kind's median: refinfer ideal's kqv_out-0 on
    # tiny-llama-q5_0 is 131x that layer's own floor, beyond the hard multiple
    Mutant("floor_without_the_kind_median", lambda mp: mp.setattr(floor, "KIND_FRACTION", 0.0),
           lambda request: t.check_fixture_clean_pairs(t.fixture_models())),
]
