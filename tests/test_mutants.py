"""Each injected bug must be caught: the bug is patched in at run time and the check that
names it must fail (AssertionError or pytest.fail). A check that skips makes this test skip,
which fails CI (see conftest.py). The checks are the same functions the ordinary tests call,
on the same fixtures, so this file only costs those checks.

The mutants are listed by area in tests/mutants_*.py: each module defines MUTANTS, a list of
Mutant(name, patch, check), where patch(monkeypatch) applies the bug and check(request) runs
the assertion (request.getfixturevalue gives it any fixture)."""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
from typing import Callable

import pytest


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    patch: Callable        # patch(monkeypatch): inject the bug
    check: Callable        # check(request): the assertion that must now fail


def _all_mutants():
    out = []
    for f in sorted(pathlib.Path(__file__).parent.glob("mutants_*.py")):
        out += importlib.import_module(f.stem).MUTANTS
    names = [m.name for m in out]
    dup = {n for n in names if names.count(n) > 1}
    assert not dup, f"mutant names must be unique: {sorted(dup)}"
    return out


MUTANTS = _all_mutants()


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_is_caught(mutant, monkeypatch, request):
    mutant.patch(monkeypatch)
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        mutant.check(request)
