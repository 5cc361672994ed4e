"""Injected bugs for the test-hygiene checks: the tokenizer's clean-up of spaces, the format
vectors' inputs, oracle skips under CI, crashed child processes, the GGUF memory map and the
errors of the containers. Each check is the function the ordinary test calls."""

from __future__ import annotations

import copy
import pathlib
import subprocess
import sys

import pytest

from test_mutants import Mutant

FORMATS = pathlib.Path(__file__).resolve().parents[1] / "formats"


# ---- the detokenizer's clean_spaces flag flipped ----------------------------------------------

def _flip_clean_spaces(monkeypatch):
    from refinfer.tokenizer.vocab import Tokenizer
    load = Tokenizer._load

    def flipped(self, md):
        load(self, md)
        self.clean_spaces = not self.clean_spaces
    monkeypatch.setattr(Tokenizer, "_load", flipped)


def _vocab_examples(vocab):
    def check(request):
        from test_tokenizer import Subject, check_examples
        s = Subject(request.getfixturevalue("vocab_dir") / f"ggml-vocab-{vocab}.gguf")
        try:
            check_examples(s)
        finally:
            s.close()
    return check


def _pre_examples(pre):
    def check(request):
        from refinfer.gguf_file import GGUFFile
        from test_tokenizer_pre import PreSubject, write_variant
        base = request.getfixturevalue("vocab_dir") / "ggml-vocab-gpt-2.gguf"
        path = write_variant(request.getfixturevalue("tmp_path"), base, pre)
        s = PreSubject(path, GGUFFile(base).metadata, pre)
        try:
            s.check_examples()
        finally:
            s.close()
    return check


# ---- one bit of q4_K's quantize output flipped -------------------------------------------------

def _q4_K_one_bit(monkeypatch):
    from refinfer import quant
    t = quant.TYPES["q4_K"]

    def quantize_blocks(blocks):
        out = t.quantize_blocks(blocks).copy()
        out[..., 20] ^= 0x04   # one bit of one code byte per block
        return out
    mutant = copy.copy(t)
    mutant.quantize_blocks = quantize_blocks
    monkeypatch.setitem(quant.TYPES, "q4_K", mutant)


def _q4_K_vectors(request):
    from test_format_vectors import check_quantize_vectors
    check_quantize_vectors(FORMATS / "vectors" / "q4_K.json")


# ---- oracle skips under CI=true ------------------------------------------------------------------

def _untagged_oracle_skip(monkeypatch):
    import oracle
    monkeypatch.setattr(oracle, "oracle_skip", lambda reason: pytest.skip(reason))


def _ci_ignored(monkeypatch):
    import ci_skips
    monkeypatch.setattr(ci_skips, "ci", lambda: False)


def _oracle_skip_fails_ci(request):
    from test_ci_skips import check_oracle_skip_fails_ci
    check_oracle_skip_fails_ci(request.getfixturevalue("monkeypatch"))


# ---- a crashed child process taken for a skip ----------------------------------------------------

def _crash_is_empty_output(monkeypatch):
    import child_process
    monkeypatch.setattr(child_process, "finished", lambda p, what: p.stdout)   # "" as before: a skip


def _crashed_child_fails(request):
    import child_process
    p = subprocess.run([sys.executable, "-c", "import os; os.abort()"], capture_output=True, text=True, timeout=60)
    try:
        out = child_process.finished(p, "a child that aborts")
    except pytest.fail.Exception:
        return
    raise AssertionError(f"a child killed by a signal gave {out!r} instead of a failure")


# ---- GGUF raw() copying instead of viewing the memory map ----------------------------------------

def _raw_copies(monkeypatch):
    from refinfer.gguf_file import GGUFFile
    raw = GGUFFile.raw
    monkeypatch.setattr(GGUFFile, "raw", lambda self, name: raw(self, name).copy())


def _raw_is_a_view(request):
    from refinfer.gguf_file import GGUFFile
    from test_gguf_file import check_raw_is_a_view_of_the_file
    check_raw_is_a_view_of_the_file(GGUFFile(request.getfixturevalue("smollm2_path")), "token_embd.weight")


# ---- container errors that lose the tensor or the offset ------------------------------------------

def _drop_where(keep):
    def patch(monkeypatch):
        from refinfer import safetensors_file
        from refinfer.errors import FormatError

        class Lossy(FormatError):
            def __init__(self, message, *, file=None, tensor=None, offset=None, hint=None):
                kw = dict(file=file, tensor=tensor, offset=offset)
                super().__init__(message, hint=hint, **{k: v for k, v in kw.items() if k in keep})
        monkeypatch.setattr(safetensors_file, "FormatError", Lossy)
    return patch


def _safetensors_named_errors(request):
    from test_safetensors_file import test_hole_and_overlap
    test_hole_and_overlap(request.getfixturevalue("tmp_path"))


def _safetensors_fuzz_errors(request):
    from test_safetensors_file import VALID, parse_bounded
    data = bytearray(VALID)
    data[-1:] = b""   # truncated: the last tensor runs past the data section
    parse_bounded(bytes(data))
    parse_bounded(VALID + b"xx")   # trailing bytes after the last tensor


MUTANTS = [
    Mutant("clean_spaces_flipped_gpt2", _flip_clean_spaces, _vocab_examples("gpt-2")),
    Mutant("clean_spaces_flipped_qwen2", _flip_clean_spaces, _vocab_examples("qwen2")),
    Mutant("clean_spaces_flipped_llama_spm", _flip_clean_spaces, _vocab_examples("llama-spm")),
    Mutant("clean_spaces_flipped_pre_gpt4o", _flip_clean_spaces, _pre_examples("gpt-4o")),
    Mutant("clean_spaces_flipped_pre_deepseek_v3", _flip_clean_spaces, _pre_examples("deepseek-v3")),
    Mutant("q4_K_quantize_one_bit", _q4_K_one_bit, _q4_K_vectors),
    Mutant("oracle_skip_untagged", _untagged_oracle_skip, _oracle_skip_fails_ci),
    Mutant("ci_variable_ignored", _ci_ignored, _oracle_skip_fails_ci),
    Mutant("crashed_child_is_skip", _crash_is_empty_output, _crashed_child_fails),
    Mutant("gguf_raw_copies", _raw_copies, _raw_is_a_view),
    Mutant("safetensors_error_drops_tensor", _drop_where({"file", "offset"}), _safetensors_named_errors),
    Mutant("safetensors_error_drops_offset", _drop_where({"file", "tensor"}), _safetensors_named_errors),
    Mutant("safetensors_fuzz_error_drops_offset", _drop_where({"file", "tensor"}), _safetensors_fuzz_errors),
]
