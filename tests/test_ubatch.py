"""ggml mode runs a prompt as llama.cpp does: micro-batches of n_ubatch tokens (llama.cpp's -ub,
default 512), each a forward step with its own KV length padded to 256 and its own kernels (a
one-token step takes ggml_vec_dot_f16 where a batch takes tinyBLAS). Ideal mode's numbers do
not depend on the split.

On the generated models the split changes bits only through one-token steps: a longer KV
padding adds exact zeros at the end of every lane's sum. So the negative control is a prompt
whose last micro-batch is one token.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import refinfer
from ci_skips import oracle_import
from refinfer.errors import RefinferError
from refinfer.generation import token_logprob

N_VOCAB = 512   # a small output matrix keeps the NumPy emulation fast
# (prompt length, n_ubatch): 65 = 2 x 32 + a one-token step; 300 with 128 crosses the 256 padding
# of the KV length: steps over 128, 256 and 300 positions, padded to 256, 256 and 512
CASES = [(65, 32), (300, 128)]


def _prompt(T):
    return [1] + [int(t) for t in np.random.default_rng(T).integers(3, N_VOCAB, T - 1)]


@pytest.fixture(scope="module")
def ubatch_models(tmp_path_factory, vocab_dir):
    """A generated F16 model (F16 weight matmuls and attention) and llama.cpp's q4_1 of its F32
    twin (SmolLM2's main type), with a context of 1024."""
    oracle_import("llama_cpp")
    from models import llama_quantize, make_tiny_llama_gguf
    d = tmp_path_factory.mktemp("ubatch")
    vocab = vocab_dir / "ggml-vocab-llama-spm.gguf"
    f16 = make_tiny_llama_gguf(d / "f16.gguf", vocab_gguf=vocab, dtype="f16", ctx=1024, n_vocab=N_VOCAB)
    f32 = make_tiny_llama_gguf(d / "f32.gguf", vocab_gguf=vocab, dtype="f32", ctx=1024, n_vocab=N_VOCAB)
    return {"f16": f16, "q4_1": llama_quantize(f32, d / "q4_1.gguf", "q4_1")}


def llama_cpp_run(path, tokens, n_batch):
    """llama.cpp's logits with n_batch = n_ubatch, and the tensors of its last llama_decode."""
    from refinfer.llama_oracle import LlamaCpp
    with LlamaCpp(path, n_ctx=len(tokens), n_batch=n_batch, capture=True) as llm:
        return llm.logits(tokens), dict(llm.captured)


def check_ubatch_equals_llama_cpp(path, T, n_ubatch):
    """Logits of every position, and every tensor of the last micro-batch, bit for bit."""
    from llama_ref import assert_taps_match, collect_taps
    tokens = _prompt(T)
    ref, ref_last = llama_cpp_run(path, tokens, n_ubatch)
    model = refinfer.load(path, mode="ggml", backend="numpy", n_ubatch=n_ubatch)
    tap, mine = collect_taps()          # keeps each name's last step
    got = model.logits(tokens, tap=tap)
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
    assert_taps_match(mine, ref_last, f"{path.name} last ubatch of {T} tokens in steps of {n_ubatch}",
                      n_layers=model.config.n_layers)


@pytest.mark.parametrize("qtype", ["f16", "q4_1"])
@pytest.mark.parametrize("T,n_ubatch", CASES)
def test_ggml_ubatch_steps_equal_llama_cpp(ubatch_models, qtype, T, n_ubatch):
    check_ubatch_equals_llama_cpp(ubatch_models[qtype], T, n_ubatch)


def test_another_ubatch_gives_other_bits(ubatch_models):
    """Negative control: the F16 model's 65-token prompt in one step differs from llama.cpp's
    steps of 32 in exactly the last row, which llama.cpp computes alone on the vec_dot path;
    with n_ubatch 32 it is equal (test above), and one step equals llama.cpp's one step."""
    path, tokens = ubatch_models["f16"], _prompt(65)
    ref32, _ = llama_cpp_run(path, tokens, 32)
    ref65, _ = llama_cpp_run(path, tokens, 65)
    one_step = refinfer.load(path, mode="ggml", backend="numpy", n_ubatch=65).logits(tokens)
    np.testing.assert_array_equal(one_step.view(np.uint32), ref65.view(np.uint32))
    differs = np.any(one_step.view(np.uint32) != ref32.view(np.uint32), axis=1)
    assert np.flatnonzero(differs).tolist() == [64]


def test_generate_prompt_runs_in_ubatch_steps(ubatch_models):
    """Model.generate's prompt goes through the same steps: its prompt logprobs are those of
    llama.cpp's logits rows (steps of 32: positions 1..64 in three steps), and the first
    greedy token is llama.cpp's argmax with its logprob from llama.cpp's last row (computed
    alone, on the vec_dot path)."""
    path, tokens = ubatch_models["f16"], _prompt(65)
    ref, _ = llama_cpp_run(path, tokens, 32)
    model = refinfer.load(path, mode="ggml", backend="numpy", n_ubatch=32)
    r = model.generate(tokens, max_tokens=1, temperature=0, prompt_logprobs=True, details=True)
    want = [token_logprob(ref[i - 1], tokens[i], None).logprob for i in range(1, len(tokens))]
    assert r.prompt_logprobs[0] is None
    assert [lp.logprob for lp in r.prompt_logprobs[1:]] == want
    assert r.token_ids == [int(np.argmax(ref[-1]))]
    assert r.logprobs[0].logprob == token_logprob(ref[-1], r.token_ids[0], None).logprob


def test_ideal_mode_is_one_step_and_split_invariant(ubatch_models):
    path, tokens = ubatch_models["q4_1"], _prompt(65)
    whole = refinfer.load(path, backend="numpy")
    assert whole.ubatch is None and whole.prompt_steps(65) == [(0, 65)]
    split = refinfer.load(path, backend="numpy", n_ubatch=16)
    assert split.prompt_steps(65) == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 65)]
    np.testing.assert_array_equal(split.logits(tokens).view(np.uint32), whole.logits(tokens).view(np.uint32))
    assert refinfer.load(path, mode="ggml", backend="numpy").ubatch == 512


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "512"])
def test_bad_n_ubatch_is_a_clear_error(bad):
    with pytest.raises(RefinferError, match=f"n_ubatch must be a positive integer, got {bad!r}") as e:
        refinfer.load("no-such-model.gguf", mode="ggml", n_ubatch=bad)
    assert "-ub" in e.value.hint


@pytest.mark.parametrize("argv,message", [
    (["generate", "hi", "--mode", "ggml", "--ubatch", "0"], "error: --ubatch must be a positive integer, got 0"),
    (["perplexity", "-f", "README.md", "--ubatch", "-1"], "error: --ubatch must be a positive integer, got -1"),
    (["kld", "--base", "refinfer[mode=ggml,ubatch=x]:m.gguf", "--test", "m.gguf", "-f", "README.md"],
     "error: 'refinfer[mode=ggml,ubatch=x]:m.gguf': ubatch='x' is not a positive integer"),
])
def test_bad_ubatch_option_exits_2(argv, message):
    r = subprocess.run([sys.executable, "-m", "refinfer", *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "hint: " in r.stderr and "Traceback" not in r.stderr
