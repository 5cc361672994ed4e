"""Injected numeric bugs and the checks that must catch them: tolerances, exact equality where
the README claims it, the golden fixtures and the tensor-name sets (see test_mutants.py)."""

from __future__ import annotations

import dataclasses

import numpy as np

from test_mutants import Mutant


def rms_eps_x100(monkeypatch):
    """RMSNorm epsilon read 100x too large from the model file."""
    import refinfer.loader as loader
    original = loader.config_from_gguf

    def config_from_gguf(*args, **kwargs):
        cfg = original(*args, **kwargs)
        return dataclasses.replace(cfg, norm_eps=cfg.norm_eps * 100)
    monkeypatch.setattr(loader, "config_from_gguf", config_from_gguf)


def check_architecture_qwen2(request):
    import test_architectures as t
    spm = request.getfixturevalue("vocab_dir") / "ggml-vocab-llama-spm.gguf"
    t.check_variant_against_llama_cpp(t.variant_model("qwen2", request.getfixturevalue("tmp_path"), spm))


def drop_ffn_out_tap(monkeypatch):
    """The forward pass no longer taps ffn_out-1 (a dump would silently lack it)."""
    import refinfer.model
    original = refinfer.model.forward

    def forward(*args, tap=None, **kwargs):
        if tap is not None:
            inner = tap
            tap = lambda name, a: None if name == "ffn_out-1" else inner(name, a)  # noqa: E731
            kwargs["tap"] = tap
        return original(*args, **kwargs)
    monkeypatch.setattr(refinfer.model, "forward", forward)


def check_ggml_exact_prefill_q4_0(request):
    import test_ggml_exact as t
    t.check_prefill(request.getfixturevalue("tiny_quantized")["q4_0"])


def hsum8_one_ulp(monkeypatch):
    """ggml_emulation.hsum8 (hsum_float_8's lane order) one float32 ulp too large."""
    from refinfer.backends import ggml_emulation as ge
    original = ge.hsum8
    monkeypatch.setattr(ge, "hsum8", lambda v: np.nextafter(original(v), np.float32(np.inf)))


def check_ggml_matmul_q4_0(request):
    import test_ggml_matmul as t
    t.check_matmul(request.getfixturevalue("ggml"), "q4_0", 0)


MUTANTS = [
    Mutant("architectures_rms_eps_x100", rms_eps_x100, check_architecture_qwen2),
    Mutant("ggml_exact_tap_dropped", drop_ffn_out_tap, check_ggml_exact_prefill_q4_0),
    Mutant("ggml_matmul_hsum8_one_ulp", hsum8_one_ulp, check_ggml_matmul_q4_0),
]
