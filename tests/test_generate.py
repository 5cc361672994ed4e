"""Sampling semantics, Model.generate and the generate command."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import refinfer
from refinfer.errors import RefinferError
from refinfer.sampling import Sampler, SamplerConfig


def draws(cfg, logits, n=400):
    s = Sampler(cfg)
    return [s(logits, (), i) for i in range(n)]


LOGITS = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.04, 0.01]))


def test_greedy_is_argmax_with_first_index_on_ties():
    z = np.array([1.0, 3.0, 3.0, 0.0])
    assert Sampler(SamplerConfig(temperature=0))(z, (), 0) == 1


def test_top_k_top_p_min_p_restrict_the_candidates():
    assert set(draws(SamplerConfig(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, seed=1), LOGITS)) == {0, 1}
    # top_p = 0.8: the smallest prefix with mass >= 0.8 is {0.5, 0.2, 0.15}
    assert set(draws(SamplerConfig(temperature=1.0, top_k=0, top_p=0.8, min_p=0.0, seed=1), LOGITS)) == {0, 1, 2}
    # min_p = 0.25: keep p >= 0.125 -> {0.5, 0.2, 0.15}
    assert set(draws(SamplerConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.25, seed=1), LOGITS)) == {0, 1, 2}


def test_temperature_sharpens_and_flattens():
    cold = draws(SamplerConfig(temperature=0.2, top_k=0, top_p=1.0, min_p=0.0, seed=2), LOGITS, 2000)
    hot = draws(SamplerConfig(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0, seed=2), LOGITS, 2000)
    assert cold.count(0) > hot.count(0) + 300
    # at temperature 1 the empirical frequencies follow the distribution
    t1 = draws(SamplerConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3), LOGITS, 4000)
    freq = np.bincount(t1, minlength=6) / 4000
    assert np.abs(freq - np.exp(LOGITS)).max() < 0.03


def test_repetition_penalty_discourages_seen_tokens():
    z = np.array([2.0, 1.9, -1.0])
    s = Sampler(SamplerConfig(temperature=0, repeat_penalty=1.5))
    assert s(z, [0], 0) == 1          # 2.0 / 1.5 < 1.9
    assert s(z, [], 0) == 0


def test_seeded_sampling_is_reproducible():
    cfg = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    assert draws(SamplerConfig(seed=7, **cfg), LOGITS, 50) == draws(SamplerConfig(seed=7, **cfg), LOGITS, 50)
    assert draws(SamplerConfig(seed=7, **cfg), LOGITS, 50) != draws(SamplerConfig(seed=8, **cfg), LOGITS, 50)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(min_p=1.5),
                                 dict(repeat_penalty=0)])
def test_bad_sampler_settings_raise(bad):
    with pytest.raises(RefinferError):
        Sampler(SamplerConfig(**bad))


@pytest.fixture(scope="module")
def tiny(tiny_llama_f32):
    return refinfer.load(tiny_llama_f32)


def test_generate_streams_the_same_text_and_is_seeded(tiny):
    kw = dict(max_tokens=12, temperature=0.9, seed=11)
    full = tiny.generate("Hello world", **kw)
    pieces = list(tiny.generate("Hello world", stream=True, **kw))
    assert "".join(pieces) == full and len(pieces) > 1
    assert tiny.generate("Hello world", **kw) == full


def test_greedy_generate_equals_argmax_of_teacher_forced_logits(tiny):
    stats = {}
    ids = tiny.tokenize("The meaning of life is")
    text = tiny.generate(ids, max_tokens=10, temperature=0, stats=stats)
    assert stats["prompt_tokens"] == len(ids)
    n = stats["generated_tokens"]
    out = list(ids)
    for _ in range(n):  # the same continuation, one teacher-forced pass per step
        out.append(int(np.argmax(tiny.logits(out)[-1])))
    assert tiny.detokenize(out[len(ids):]) == text


def test_stop_string_cuts_the_output(tiny):
    full = tiny.generate("Hello world", max_tokens=16, temperature=0)
    assert len(full) > 4
    stop = full[2:4]
    assert tiny.generate("Hello world", max_tokens=16, temperature=0, stop=[stop]) == full[: full.index(stop)]


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "refinfer", *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=600)


def test_generate_command_prints_text_and_a_summary(tiny_llama_f32):
    r = run("generate", "Once upon a time", "-m", tiny_llama_f32, "-n", "8", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time") and len(r.stdout) > len("Once upon a time")
    assert "prompt tokens" in r.stderr and "tokens/s" in r.stderr


@pytest.mark.parametrize("args,fragment", [
    (["-n", "-3"], "-n/--n-predict must be an integer >= 0, got -3"),
    (["-m", "/nonexistent/model.gguf"], "model file not found"),
    (["--backend", "nonsense"], "unknown backend"),
    (["--temp", "-1"], "temperature"),
])
def test_generate_command_errors(tiny_llama_f32, args, fragment):
    argv = ["generate", "hi"] + (args if "-m" in args else ["-m", tiny_llama_f32] + args)
    r = run(*argv)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout == "", "nothing is echoed before the options are checked"
    assert r.stderr.startswith("error:") and fragment in r.stderr and "Traceback" not in r.stderr
    assert "\nhint: " in r.stderr, r.stderr
