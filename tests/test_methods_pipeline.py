"""The whole-model quantizers on a generated model: the checkpoint they write loads back through
refinfer.load to exactly the IntGroupTensors they made, and GPTQ's layer loop, run on the inputs
refinfer's float32 layers compute, gives the codes AutoGPTQ's fasterquant gives on the same
weights and Hessians (>= 99.9 %, every differing row traced to a near-tie)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import oracles_methods as om
import refinfer
from refinfer.methods import gptq, pipeline

TEXT = ("Calibration text for a generated model: the quick brown fox jumps over the lazy dog, "
        "and 1234567890 numbers follow in a line of words. ") * 40


@pytest.mark.parametrize("method,fmt,sym", [("rtn", "compressed-tensors", False), ("gptq", "gptq", True),
                                            ("gptq", "gptq_v2", False), ("awq", "awq", False)])
def test_checkpoint_loads_back_exactly(tiny_llama_f32, tmp_path, method, fmt, sym):
    o = pipeline.Options(method=method, fmt=fmt, sym=sym, group_size=32, n_samples=3, seqlen=24,
                         desc_act=(method == "gptq" and not sym))
    r = pipeline.quantize_model(str(tiny_llama_f32), tmp_path / "q", o, calib_text=TEXT, progress=False)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["bits"] == 4 if "bits" in cfg else cfg["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    m = refinfer.load(str(tmp_path / "q"), backend="numpy")
    for i, L in enumerate(m.weights.layers):
        for n in pipeline.LINEARS:
            np.testing.assert_array_equal(getattr(L, n).dequantize(), r.tensors[f"blk.{i}.{n}.weight"].dequantize())


def test_gptq_pipeline_codes_equal_autogptq(tiny_llama_f32, tmp_path, monkeypatch):
    seen = []
    real = gptq.fasterquant

    def record(W, H, **kw):
        r = real(W, H, **kw)
        seen.append((np.array(W), np.array(H), kw, r))
        return r

    monkeypatch.setattr(gptq, "fasterquant", record)       # observed: the pipeline's own inputs
    o = pipeline.Options(method="gptq", fmt="gptq", group_size=32, n_samples=4, seqlen=32, desc_act=True)
    pipeline.quantize_model(str(tiny_llama_f32), tmp_path / "q", o, calib_text=TEXT, progress=False, write=False)
    total = same = 0
    for W, H, kw, r in seen:
        ref = om.autogptq_fasterquant(W, H, bits=4, group_size=32, sym=True, actorder=True, static_groups=False)
        rows, margins = om.trace_mismatches(r.codes, ref["codes"], r.margin, ref["perm"])
        assert all(m < 1e-3 for m in margins), (kw["name"], rows, margins)
        total += r.codes.size
        same += int((r.codes == ref["codes"]).sum())
    assert len(seen) == 14 and same / total >= 0.999, f"{same}/{total}"


def test_cli_rejects_impossible_combination(tiny_llama_f32, tmp_path):
    p = subprocess.run([sys.executable, "-m", "refinfer", "quantize", str(tiny_llama_f32), str(tmp_path / "o"),
                        "--method", "awq", "--format", "awq", "--bits", "8"], capture_output=True, text=True)
    assert p.returncode == 2
    assert "error: --format awq cannot store 8-bit codes" in p.stderr and "awq: bits 4" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("method,want", [("awq", {"quant_method": "awq", "zero_point": True, "version": "gemm"}),
                                         ("gptq", {"quant_method": "gptq", "sym": True, "desc_act": False})])
def test_cli_defaults_are_the_libraries(tiny_llama_f32, tmp_path, method, want):
    """--method awq alone is AutoAWQ's default (GEMM, zero_point=True); gptq alone AutoGPTQ's (sym)."""
    from refinfer.cli import main
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_llama_f32), str(out), "--method", method, "--group-size", "32",
                 "--calib", str(calib), "--calib-samples", "2", "--calib-seqlen", "24"]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: qc.get(k) for k in want} == want


def test_a_format_that_cannot_hold_the_model_is_refused_before_any_work(tmp_path, capsys):
    """The fixture's k/v projections have 16 rows: AutoGPTQ's layout needs multiples of 32. The
    command stops before calibrating, naming the tensor and the formats that can hold it."""
    import pathlib
    from refinfer.cli import main
    fixture = pathlib.Path(__file__).resolve().parent.parent / "formats" / "fixtures" / "tiny-llama-f16.gguf"
    assert main(["quantize", str(fixture), str(tmp_path / "q"), "--method", "gptq", "--group-size", "32"]) == 2
    err = capsys.readouterr().err
    assert "blk.0.attn_k" in err and "(16, 32)" in err and "formats that can: awq, compressed-tensors" in err
    assert not (tmp_path / "q").exists()
