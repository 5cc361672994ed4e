"""Under CI=true a skip for a missing oracle fails the run (ci_skips.py); a legitimate skip
stays a skip."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

import ci_skips
import oracle

HERE = pathlib.Path(__file__).resolve().parent


class _Outcome:  # what pluggy hands a hookwrapper after the report is made
    def __init__(self, report):
        self.report = report

    def get_result(self):
        return self.report


def _skip_report(reason: str, nodeid="tests/test_quant_legacy.py::test_x") -> pytest.TestReport:
    return pytest.TestReport(nodeid=nodeid, location=(nodeid.split("::")[0], 0, "test_x"), keywords={},
                             outcome="skipped", longrepr=(nodeid.split("::")[0], 1, f"Skipped: {reason}"),
                             when="call")


def _through_hook(report: pytest.TestReport) -> pytest.TestReport:
    hook = ci_skips.pytest_runtest_makereport(item=None, call=None)
    next(hook)
    with pytest.raises(StopIteration):
        hook.send(_Outcome(report))
    return report


def check_oracle_skip_fails_ci(monkeypatch):
    """The oracle made unavailable (no libggml-base where llama-cpp-python's libraries would
    be): its skip, under CI=true, becomes a failure; a skip for no test vectors does not."""
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(ci_skips, "_FAILED_SKIPS", [])   # this session's own exit status stays as it is
    monkeypatch.setattr(oracle, "_lib_dir", lambda: pathlib.Path("/nonexistent/llama_cpp/lib"))
    monkeypatch.setattr(oracle, "_GGML", None)
    with pytest.raises(pytest.skip.Exception) as ei:
        oracle.ggml()
    rep = _through_hook(_skip_report(str(ei.value)))
    assert rep.outcome == "failed", f"an oracle skip passed under CI=true: {rep.longrepr}"
    assert "skipped under CI=true" in str(rep.longrepr)
    legit = _through_hook(_skip_report("llama.cpp ships no test vectors for ggml-vocab-x.gguf"))
    assert legit.outcome == "skipped"


def test_oracle_skip_fails_ci(monkeypatch):
    check_oracle_skip_fails_ci(monkeypatch)


def test_importorskip_of_the_test_extra_and_mutant_skips_fail_ci():
    assert ci_skips.ci_failure("tests/test_x.py", "could not import 'llama_cpp': No module named 'llama_cpp'")
    assert ci_skips.ci_failure("tests/test_x.py::t", "could not import 'safetensors.numpy': halted")
    assert ci_skips.ci_failure("tests/test_x.py::t", "llama-cpp-python is not installed")
    assert ci_skips.ci_failure("tests/test_mutants.py::test_mutant_is_caught[x]", "anything")
    assert ci_skips.ci_failure("tests/test_x.py::t", "could not import 'torch': No module named 'torch'")
    assert ci_skips.ci_failure("tests/test_x.py::t", "could not import 'transformers': No module named 'x'")
    assert ci_skips.ci_failure("tests/test_x.py::t", "could not import 'jax': No module named 'jax'") is None
    assert ci_skips.ci_failure("tests/test_x.py::t", "needs a real CUDA GPU (running in the CUDA simulator)") is None


GENERATED = {
    "test_generated.py": '''
import pathlib, sys
import pytest
import oracle

def test_oracle_backed():
    oracle._lib_dir = lambda: pathlib.Path("/nonexistent/llama_cpp/lib")
    oracle._GGML = None
    oracle.ggml()

def test_extra_missing():
    sys.modules["safetensors"] = None      # import fails, as when it is not installed
    pytest.importorskip("safetensors")

def test_no_vectors():
    pytest.skip("llama.cpp ships no test vectors for ggml-vocab-x.gguf")
''',
    "test_generated_module.py": '''
import sys
import pytest
sys.modules["gguf"] = None
pytest.importorskip("gguf")

def test_never_collected():
    pass
''',
}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    d = tmp_path_factory.mktemp("ci_skips")
    for name, text in GENERATED.items():
        (d / name).write_text(text)
    (d / "pytest.ini").write_text("[pytest]\n")

    def run(ci: str | None):
        env = {k: v for k, v in os.environ.items() if k != "CI"}
        if ci is not None:
            env["CI"] = ci
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
        return subprocess.run([sys.executable, "-m", "pytest", "-p", "ci_skips", "-p", "no:cacheprovider",
                               "-q", "-rs", str(d)], cwd=d, env=env, capture_output=True, text=True, timeout=120)
    return run


def test_a_pytest_run_under_ci_fails_on_oracle_skips(generated):
    p = generated("true")
    out = p.stdout
    assert p.returncode == 1, out + p.stderr
    assert "skips that fail under CI=true" in out
    assert "test_oracle_backed" in out and "test_extra_missing" in out and "test_generated_module.py" in out
    assert "2 failed, 2 skipped" in out, out    # the test without vectors and the skipped module


def test_a_pytest_run_without_ci_skips(generated):
    p = generated(None)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "4 skipped" in p.stdout, p.stdout
