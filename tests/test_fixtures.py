"""The portable fixtures in formats/fixtures/: they regenerate bit for bit (models) and value for
value (expectations), and what they claim agrees with llama.cpp run now."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import pytest

import refinfer
from refinfer.dump import read_safetensors
from refinfer.metrics import compare_logits

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "formats" / "fixtures"

llama_cpp = pytest.importorskip("llama_cpp")


def load_script():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def committed():
    return json.loads((FIXTURES / "expected.json").read_text())


def test_every_fixture_is_small_and_listed(committed):
    script = load_script()
    assert sorted(committed["models"]) == sorted(script.FTYPES)
    for name, m in committed["models"].items():
        for f in (m["file"], m["logits_file"]):
            size = (FIXTURES / f).stat().st_size
            assert size < 3_000_000, f"{f}: {size} bytes"


def test_fixtures_regenerate_without_drift(vocab_dir, tmp_path, committed):
    script = load_script()
    paths = script.make_models(vocab_dir / "ggml-vocab-llama-spm.gguf", tmp_path)
    for name, path in paths.items():
        assert script.sha256(path) == committed["models"][name]["sha256"], f"{name}: the generated model drifted"
        assert path.read_bytes() == (FIXTURES / path.name).read_bytes()
    fresh = script.make_expectations(paths, tmp_path)
    assert fresh["model"] == committed["model"]
    for name, want in committed["models"].items():
        got = fresh["models"][name]
        assert got["prompts"] == want["prompts"], f"{name}: tokens or greedy ids drifted"
        for t, s in want["layer_stats"].items():
            g = got["layer_stats"][t]
            assert g["shape"] == s["shape"]
            for k in ("mean", "rms", "min", "max"):
                assert g[k] == pytest.approx(s[k], rel=1e-5, abs=1e-6), f"{name} {t} {k}"
        _, a = read_safetensors(FIXTURES / want["logits_file"], "refinfer-logits")
        _, b = read_safetensors(tmp_path / got["logits_file"], "refinfer-logits")
        assert np.array_equal(a["tokens"], b["tokens"])
        r = compare_logits(np.asarray(b["logits"]), np.asarray(a["logits"]))
        assert r["nmse"] < 1e-12, f"{name}: logits drifted {r}"


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "f16"])
def test_fixture_expectations_agree_with_llama_cpp(name, committed):
    """Checked against llama.cpp now, not against refinfer: the greedy ids are llama.cpp's
    (regenerated) and refinfer's ggml mode reproduces them; the stored ideal-mode logits sit
    within rounding of llama.cpp's."""
    from refinfer.llama_oracle import llama_logits
    m = committed["models"][name]
    path = FIXTURES / m["file"]
    script = load_script()
    ggml = refinfer.load(path, mode="ggml")
    for p in m["prompts"]:
        assert ggml.tokenize(p["text"]) == p["tokens"]
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        try:
            assert llm.tokenize(p["text"].encode(), add_bos=True) == p["tokens"]
        finally:
            llm.close()
        assert script.refinfer_greedy(ggml, p["tokens"], committed["n_greedy"]) == p["greedy_llama_cpp"]
    _, stored = read_safetensors(FIXTURES / m["logits_file"], "refinfer-logits")
    ids = [int(t) for t in stored["tokens"]]
    r = compare_logits(np.asarray(stored["logits"]), llama_logits(path, ids))
    assert r["nmse"] < 1e-2 and r["same_top"] == 1.0, r
