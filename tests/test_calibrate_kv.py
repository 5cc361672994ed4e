"""calibrate-kv: per-layer (and per-head) K/V min/max over calibration text, as LMDeploy's
kv_qparams observer recorded them, checked against transformers' own K (after RoPE) and V on a
generated HF checkpoint; the command's parameter file, its errors, and a model that generates
with the int8-calibrated cache it configures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ci_skips import oracle_import
from hf_models import make_hf_checkpoint

import refinfer
from refinfer.cli import main
from refinfer.commands.calibrate_kv import calibrate_tokens
from refinfer.errors import RefinferError
from refinfer.kv_lmdeploy import int8_calibrated

N_LAYERS, N_KV, CTX, CHUNKS = 2, 2, 48, 3


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("calib") / "llama", n_layers=N_LAYERS, n_kv_heads=N_KV, seed=7)


def transformers_minmax(model_dir, chunks):
    """{(k|v, layer): (min[n_kv], max[n_kv])} of transformers' Kcur-N / Vcur-N over the chunks."""
    oracle_import("torch")
    oracle_import("transformers")
    from refinfer.hf_oracle import capture_transformers, load_transformers
    model = load_transformers(model_dir)
    out = {}
    for chunk in chunks:
        _, taps = capture_transformers(model_dir, chunk, model=model, skip=("kq-*",))
        for w, tap in (("k", "Kcur"), ("v", "Vcur")):
            for i in range(N_LAYERS):
                a = taps[f"{tap}-{i}"].reshape(len(chunk), N_KV, -1)
                mn, mx = a.min(axis=(0, 2)), a.max(axis=(0, 2))
                if (w, i) in out:
                    mn, mx = np.minimum(out[w, i][0], mn), np.maximum(out[w, i][1], mx)
                out[w, i] = (mn, mx)
    return out


def check_minmax_matches_transformers(hf_dir, per_head):
    tokens = np.random.default_rng(11).integers(0, 256, CTX * CHUNKS + 5).tolist()
    m = refinfer.load(hf_dir, backend="numpy", mode="ideal")
    p = calibrate_tokens(m, tokens, n_chunks=CHUNKS, n_ctx=CTX, per_head=per_head)
    assert p["calibration"]["tokens"] == CTX * CHUNKS and p["calibration"]["chunks"] == CHUNKS
    ref = transformers_minmax(hf_dir, [tokens[i * CTX:(i + 1) * CTX] for i in range(CHUNKS)])
    for i, L in enumerate(p["layers"]):
        for w in "kv":
            mn, mx = ref[w, i]
            if not per_head:
                mn, mx = mn.min(), mx.max()
            # float32 on both sides in different orders (Kcur NMSE ~1e-12, test_hf_oracle): measured
            # |difference| <= 9.5e-7 on values up to 4.2
            np.testing.assert_allclose(L[f"{w}_min"], mn, rtol=0, atol=1e-5)
            np.testing.assert_allclose(L[f"{w}_max"], mx, rtol=0, atol=1e-5)
            lo, hi = np.float32(L[f"{w}_min"]), np.float32(L[f"{w}_max"])
            assert np.array_equal(np.float32(L[f"{w}_scale"]), (hi - lo) / np.float32(255))
            assert np.array_equal(np.float32(L[f"{w}_zp"]), (hi + lo) / np.float32(2))
    return p


@pytest.mark.parametrize("per_head", [False, True], ids=["layer", "head"])
def test_minmax_matches_transformers(hf_dir, per_head):
    p = check_minmax_matches_transformers(hf_dir, per_head)
    assert p["granularity"] == ("head" if per_head else "layer")
    if per_head:
        assert len(p["layers"][0]["k_min"]) == N_KV and "extension" in p["granularity_note"]
    int8_calibrated(p)        # the factory accepts what calibrate writes


def test_command_writes_params_and_a_model_generates_with_them(tiny_llama_f32, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    out = tmp_path / "p.json"
    assert main(["calibrate-kv", "-m", str(tiny_llama_f32), "--calib", str(text), "-o", str(out),
                 "--per-head", "--chunks", "2", "--ctx", "64"]) == 0
    assert "wrote" in capsys.readouterr().out
    p = json.loads(out.read_text())
    assert p["format"] == "refinfer-kv-params" and p["version"] == 1 and p["granularity"] == "head"
    assert p["model"]["size"] == tiny_llama_f32.stat().st_size and len(p["model"]["sha256"]) == 64
    assert p["calibration"] == {"text": str(text), "tokens": 128, "chunks": 2, "ctx": 64}
    for L in p["layers"]:
        for w in "kv":
            assert all(a < b for a, b in zip(L[f"{w}_min"], L[f"{w}_max"]))
    m = refinfer.load(tiny_llama_f32, backend="numpy", mode="ideal",
                      cache_type_k="int8-calibrated", cache_type_v="int8-calibrated", kv_params=str(out))
    base = refinfer.load(tiny_llama_f32, backend="numpy", mode="ideal")
    assert isinstance(m.generate("The quick brown", max_tokens=8, temperature=0, seed=1), str)
    ids = m.tokenize("The quick brown fox jumps over the lazy dog.")
    a, b = m.logits(ids), base.logits(ids)
    nm = float(np.mean((a - b) ** 2) / np.mean(b ** 2))
    # int8 K and V with calibrated ranges: measured NMSE 4.3e-5 against the f32 cache; not 0 (the
    # cache really holds int8 codes), and far below what a wrong scale or zero point gives
    assert 0 < nm < 4e-4, nm


def test_command_errors(tiny_llama_f32, tmp_path, capsys):
    def err(argv):
        assert main(["calibrate-kv", *argv]) == 2
        e = capsys.readouterr().err
        assert "error:" in e and "hint:" in e and "Traceback" not in e
        return e
    out = str(tmp_path / "p.json")
    assert "missing.txt" in err(["-m", str(tiny_llama_f32), "--calib", str(tmp_path / "missing.txt"), "-o", out])
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 10)
    assert "--chunks 0" in err(["-m", str(tiny_llama_f32), "--calib", str(text), "-o", out, "--chunks", "0"])
    assert "--ctx" in err(["-m", str(tiny_llama_f32), "--calib", str(text), "-o", out, "--ctx", "-1"])
    assert "--bogus" in err(["-m", str(tiny_llama_f32), "--bogus"])
    assert "no_dir" in err(["-m", str(tiny_llama_f32), "--calib", str(text), "-o", str(tmp_path / "no_dir" / "p.json")])


def test_params_for_another_model_are_refused(tiny_llama_f32, hf_dir, tmp_path):
    m = refinfer.load(hf_dir, backend="numpy", mode="ideal")
    p = calibrate_tokens(m, list(range(40)), n_chunks=1, n_ctx=40)
    p["n_layers"] = 3
    p["layers"].append(p["layers"][-1])
    f = tmp_path / "three.json"
    f.write_text(json.dumps(p))
    # 3 layers of parameters for a 2-layer model: refused when the model's cache is set up or used
    with pytest.raises(RefinferError, match="three.json") as e:
        m3 = refinfer.load(hf_dir, backend="numpy", mode="ideal", cache_type_k="int8-calibrated",
                           cache_type_v="f32", kv_params=str(f))
        kt = m3.backend.kv_types()[0]
        kt.params.check_model(m3.config.n_layers, m3.config.n_kv_heads, m3.config.head_dim)
    assert "calibrate-kv" in e.value.hint
    f.write_text('{"format": "refinfer-kv-params", "version": 1, "granularity": "layer"')
    with pytest.raises(RefinferError, match="three.json.*not JSON"):
        refinfer.load(hf_dir, backend="numpy", mode="ideal", cache_type_k="int8-calibrated", kv_params=str(f))
