"""Injected bugs in the model commands (generate, inspect, convert/quantize) and the checks of
tests/test_cli_model_cmds.py that catch them."""

from __future__ import annotations

import numpy as np

import test_cli_model_cmds as t
from test_mutants import Mutant


def _fixtures(request, *names):
    return [request.getfixturevalue(n) for n in names]


def _patch_widen_f16(monkeypatch):
    import refinfer.quantize_model as qm
    real = qm._widen
    monkeypatch.setattr(qm, "_widen", lambda stored, raw, n: real(stored, raw, n).astype(np.float16).astype(np.float32))


MUTANTS = [
    # -n cuts an emoji after two of its four bytes: the tail decodes to U+FFFD
    Mutant("utf8_incomplete_tail_emitted",
           lambda mp: mp.setattr("refinfer.generation.complete_text", lambda data: data.decode("utf-8", "replace")),
           lambda request: t.check_utf8_cut(*_fixtures(request, "monkeypatch", "capsys"))),
    # the prompt is not fitted into the context before the echo: the error comes after the prompt
    Mutant("prompt_length_checked_after_echo",
           lambda mp: mp.setattr("refinfer.model.Model._room", lambda self, ids: self.config.max_seq_len),
           lambda request: t.check_prompt_too_long(*_fixtures(request, "capsys"))),
    # --seed -1 always the same seed
    Mutant("random_seed_fixed",
           lambda mp: mp.setattr("refinfer.model.resolve_seed",
                                 lambda seed: 0 if seed in (None, -1) else int(seed)),
           lambda request: t.check_random_seed_is_reported(*_fixtures(request, "capsys"))),
    # inspect refuses a file with an IQ2_XXS tensor again
    Mutant("inspect_refuses_unsupported_types",
           lambda mp: mp.setattr("refinfer.gguf_file.unsupported_type", lambda type_id: None),
           lambda request: t.check_inspect_unsupported(*_fixtures(request, "tmp_path", "capsys"))),
    # -t parsed but never applied
    Mutant("threads_not_set",
           lambda mp: mp.setattr("refinfer.threads.set_threads", lambda n: n),
           lambda request: t.check_threads_in_process(*_fixtures(request, "monkeypatch", "capsys"))),
    # convert rounds the dequantized weights through f16: an f32 conversion is no longer exact
    Mutant("convert_f32_rounds_weights", _patch_widen_f16,
           lambda request: t.check_convert_f32_is_exact(*_fixtures(request, "tmp_path", "capsys"))),
    # convert turns norms into f16 too (llama.cpp keeps 1-D tensors f32)
    Mutant("convert_norms_to_f16",
           lambda mp: mp.setattr("refinfer.quantize_model.allows_quantization", lambda name, ne: name.endswith("weight")),
           lambda request: t.check_convert_f16(*_fixtures(request, "tmp_path", "capsys"))),
]
