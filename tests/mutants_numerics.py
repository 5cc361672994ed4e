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


def release_pages_noop(monkeypatch):
    """QTensor.release_pages does nothing: the file's pages stay resident beside the copy."""
    from refinfer.weights import QTensor
    monkeypatch.setattr(QTensor, "release_pages", lambda self: None)


def check_released_pages(request):
    import test_numba_backend as t
    t.check_released_pages(request.getfixturevalue("tiny_quantized")["q4_0"])


def numba_attention_softmax_off(monkeypatch):
    """numba attention whose softmax is normalized by a sum 2^-19 (1.9e-6) relative too small,
    as a float32 accumulation of the denominator would leave it."""
    from refinfer.backends.numba_backend import NumbaBackend
    original = NumbaBackend.attention

    def attention(self, out, *args):
        original(self, out, *args)
        out *= np.float32(1 + 2.0 ** -19)
    monkeypatch.setattr(NumbaBackend, "attention", attention)


def check_numba_attention_ggml(request):
    import test_numba_backend as t
    t.check_activation_op("attention", "ggml")


def output_norm_ignored(monkeypatch):
    """The loader leaves output_norm.weight out: the final RMSNorm multiplies by ones."""
    import refinfer.loader as loader
    original = loader._assemble

    def assemble(*args, **kwargs):
        w = original(*args, **kwargs)
        w.output_norm = np.ones_like(w.output_norm)
        return w
    monkeypatch.setattr(loader, "_assemble", assemble)


def check_engine_ideal_q4_0(request):
    import test_engine_llama as t
    t.check_ideal_logits(request.getfixturevalue("tiny_quantized")["q4_0"], "q4_0")


def check_engine_ggml_q4_0(request):
    import test_engine_llama as t
    t.check_ggml_logits(request.getfixturevalue("tiny_quantized")["q4_0"])


def check_fixture_layer_stats_f16(request):
    import test_fixtures as t
    m = t.committed_expectations()["models"]["f16"]
    path, tokens = t.FIXTURES / m["file"], m["prompts"][m["logits_prompt"]]["tokens"]
    t.check_layer_stats("f16", t.fresh_layer_stats(path, tokens), path, tokens)


MUTANTS = [
    Mutant("architectures_rms_eps_x100", rms_eps_x100, check_architecture_qwen2),
    Mutant("ggml_exact_tap_dropped", drop_ffn_out_tap, check_ggml_exact_prefill_q4_0),
    Mutant("ggml_matmul_hsum8_one_ulp", hsum8_one_ulp, check_ggml_matmul_q4_0),
    Mutant("engine_llama_output_norm_ignored", output_norm_ignored, check_engine_ideal_q4_0),
    Mutant("engine_llama_ggml_hsum8_one_ulp", hsum8_one_ulp, check_engine_ggml_q4_0),
    Mutant("numba_release_pages_noop", release_pages_noop, check_released_pages),
    Mutant("fixtures_layer_stats_rms_eps", rms_eps_x100, check_fixture_layer_stats_f16),
    Mutant("numba_attention_softmax_off", numba_attention_softmax_off, check_numba_attention_ggml),
]
