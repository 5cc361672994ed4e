"""Skips that must fail the run under CI=true (a pytest plugin, loaded by conftest.py).

A skip is only honest when the thing it needs cannot be had on this machine: a vocabulary for
which llama.cpp ships no test vectors, a test marked `gpu` without a GPU. A skip because an
oracle (libggml, llama.cpp, the safetensors writer) or another part of the test extra is
missing would hide every failure the test exists to catch, so with CI=true (set by every CI
service) such skips fail the run:
- a skip raised through oracle_skip(), which tags its reason with ORACLE_TAG;
- pytest.importorskip of a module that the test extra installs, or a skip whose reason says
  that such a package "is not installed";
- any skip in tests/test_mutants.py: a mutant check that skips proves nothing.
Skips of tests are reported as failures of those tests; skipped modules (an importorskip at
import time) are listed at the end and make the exit status non-zero.
"""

from __future__ import annotations

import importlib
import os
import re

import pytest

ORACLE_TAG = "[oracle unavailable] "
# top-level modules that `pip install -e ".[test]"` provides
TEST_EXTRA_MODULES = {"llama_cpp", "safetensors", "hypothesis", "pytest_benchmark", "numba_cuda", "numba",
                      "sentencepiece", "gguf", "torch", "transformers"}
_IMPORTORSKIP = re.compile(r"could not import '([\w.]+)'")
_NOT_INSTALLED = re.compile(r"\b(llama-cpp-python|llama_cpp|safetensors|numba-cuda|numba_cuda|sentencepiece) is not "
                            r"installed")


def ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def oracle_skip(reason: str):
    """Skip because an oracle or a tool from the test extra is unavailable: fails under CI=true."""
    __tracebackhide__ = True
    pytest.skip(ORACLE_TAG + reason, allow_module_level=True)


def oracle_import(name: str):
    """importlib.import_module(name), or oracle_skip naming the module."""
    __tracebackhide__ = True
    try:
        return importlib.import_module(name)
    except ImportError as e:
        oracle_skip(f"could not import {name!r} (pip install -e \".[test]\"): {e}")


def ci_failure(nodeid: str, reason: str) -> str | None:
    """Why this skip must fail under CI=true, or None for a legitimate skip."""
    if ORACLE_TAG in reason:
        return "an oracle is unavailable"
    m = _IMPORTORSKIP.search(reason)
    if m and m.group(1).split(".")[0] in TEST_EXTRA_MODULES:
        return f"{m.group(1)} (from the test extra) is not installed"
    m = _NOT_INSTALLED.search(reason)
    if m:
        return f"{m.group(1)} (from the test extra) is not installed"
    if nodeid.split("::")[0].endswith("test_mutants.py"):
        return "a mutant check that skips proves nothing"
    return None


def _reason(report) -> str:
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        return str(lr[2])
    return str(lr)


_FAILED_SKIPS: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and not hasattr(rep, "wasxfail") and ci():
        reason = _reason(rep)
        why = ci_failure(rep.nodeid, reason)
        if why:
            rep.outcome = "failed"
            rep.longrepr = f"skipped under CI=true, which fails the run ({why}): {reason}"
            _FAILED_SKIPS.append(f"{rep.nodeid}: {reason}")


def pytest_collectreport(report):
    if report.skipped and ci():
        reason = _reason(report)
        if ci_failure(report.nodeid, reason):
            _FAILED_SKIPS.append(f"{report.nodeid} (whole module): {reason}")


def pytest_terminal_summary(terminalreporter):
    if _FAILED_SKIPS:
        terminalreporter.section("skips that fail under CI=true")
        for line in _FAILED_SKIPS:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus):
    if _FAILED_SKIPS and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
