"""The KV cache options on the command line: every command that runs a model takes
--cache-type-k/-v, --flash-attn, --kv-params and --no-kv-rotation; bad values and combinations
stop before the model loads, with the reason and a hint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_cli_model_cmds import check_fails, cli


@pytest.fixture(scope="module")
def hd32(tmp_path_factory, vocab_dir):
    from models import make_tiny_llama_gguf
    return make_tiny_llama_gguf(tmp_path_factory.mktemp("kvcli") / "hd32.gguf",
                                vocab_gguf=vocab_dir / "ggml-vocab-llama-spm.gguf", dim=64, n_heads=2, n_kv_heads=1,
                                hidden_dim=96, ctx=128, dtype="f32", seed=31, n_vocab=600)


@pytest.mark.parametrize("args, fragments", [
    (["-ctk", "q7"], ["--cache-type-k: unknown KV cache type 'q7'", "q8_0", "lmdeploy-int4", "int8-calibrated"]),
    (["--cache-type-v", "fp4"], ["--cache-type-v: unknown KV cache type 'fp4'"]),
    (["--mode", "ggml", "-ctv", "q4_0"], ["q4_0 V cache needs flash attention", "--flash-attn"]),
    (["--mode", "ggml", "-fa"], ["not K f16 / V f16", "tiled or split-KV"]),
    (["-fa"], ["ggml-mode option"]),
    (["-ctk", "int8-calibrated"], ["needs calibrated parameters", "calibrate-kv"]),
    (["-ctk", "int8-calibrated", "--kv-params", "/nonexistent/p.json"], ["/nonexistent/p.json"]),
])
def test_generate_refuses_bad_kv_options(capsys, hd32, args, fragments):
    check_fails(capsys, ["generate", "hi", "-m", hd32, "-n", "2", *args], *fragments)


def test_a_block_that_does_not_divide_head_dim_is_refused(capsys):
    from test_cli_model_cmds import TINY_Q4_1                     # head_dim 16
    check_fails(capsys, ["generate", "hi", "-m", TINY_Q4_1, "-n", "2", "-ctk", "q8_0"],
                "head_dim 16 is not a multiple of its block size 32")


def test_generate_and_batch_run_on_quantized_caches(capsys, hd32, tmp_path):
    rc, out, err = cli(capsys, ["generate", "hello", "-m", hd32, "-n", "3", "--temp", "0", "-ctk", "q4_0",
                                "-ctv", "lmdeploy-int8", "--backend", "numpy"])
    assert rc == 0 and "KV q4_0/lmdeploy-int8" in err, err
    src = tmp_path / "r.jsonl"
    src.write_text(json.dumps({"prompt": "hello", "max_tokens": 2, "temperature": 0}) + "\n")
    rc, out, err = cli(capsys, ["batch", src, "-m", hd32, "--backend", "numpy", "-ctk", "q8_0", "-ctv", "q8_0",
                                "--kv-cache-tokens", "64", "--stats"])
    stats = json.loads(err.strip().splitlines()[-1])
    # 2 layers x 1 KV head x (34 + 34) bytes: q8_0 rows of head_dim 32
    assert rc == 0 and stats["kv_types"] == "q8_0/q8_0" and stats["kv_bytes_per_token"] == 2 * 68, err
    assert "136 bytes/token" in err


def test_kld_and_perplexity_take_kv_options(capsys, hd32):
    rc, out, err = cli(capsys, ["perplexity", "-m", hd32, "-f", "c4", "-c", "32", "--chunks", "2", "-ctk", "q4_1",
                                "-ctv", "q4_1", "--no-progress", "--backend", "numpy"])
    assert rc == 0 and "Final estimate: PPL" in out, err
    rc, out, err = cli(capsys, ["kld", "--base", hd32, "--test", f"refinfer[cache_type_k=q8_0,cache_type_v=q8_0]:{hd32}",
                                "--test", str(hd32), "-ctk", "q4_0", "-ctv", "q4_0", "-f", "c4", "-c", "32",
                                "--chunks", "2", "--no-progress"])
    assert rc == 0, err
    rows = [line.split()[:2] for line in out.splitlines() if " kv=" in line]
    # the spec's own cache, and the command's -ctk/-ctv on the --test that set none
    assert rows == [["refinfer:hd32.gguf", "kv=q8_0/q8_0"], ["hd32.gguf", "kv=q4_0/q4_0"]], out


@pytest.mark.parametrize("spec, fragment", [
    ("refinfer[cache_type_k=zz]:{m}", "unknown KV cache type 'zz'"),
    ("refinfer[flash_attn=2]:{m}", "flash_attn='2': expected 0 or 1"),
    ("refinfer[kv_rotation=yes]:{m}", "kv_rotation='yes': expected 0 or 1"),
    ("llama.cpp[kv_params=x]:{m}", "unknown option(s) ['kv_params']"),
])
def test_kld_source_kv_options_are_checked(capsys, hd32, spec, fragment):
    check_fails(capsys, ["kld", "--base", hd32, "--test", spec.format(m=hd32), "-f", "c4", "-c", "32", "--chunks", "1"],
                fragment)


def test_serve_refuses_a_quantized_v_without_flash_attention():
    p = subprocess.run([sys.executable, "-m", "refinfer", "serve", "--mode", "ggml", "-ctv", "q8_0", "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "needs flash attention" in p.stderr and "hint:" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_the_server_answers_from_a_quantized_cache_as_generate_alone(hd32):
    """A model loaded with cache types serves them: the completion equals Model.generate of the
    request alone on the same quantized cache (and differs from the f32 cache's logprobs)."""
    import httpx

    import refinfer
    from server_harness import serve_model
    m = refinfer.load(hd32, backend="numpy", cache_type_k="q4_0", cache_type_v="lmdeploy-int4")
    alone = m.generate([1, 20, 30, 40], max_tokens=4, temperature=0, top_logprobs=1, details=True)
    with serve_model(m, parallel=2) as url:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 20, 30, 40], "max_tokens": 4, "temperature": 0,
                                                      "logprobs": 1}, timeout=60).json()
    got = r["choices"][0]["logprobs"]["token_logprobs"]
    assert got == [t.logprob for t in alone.logprobs]
    f32 = refinfer.load(hd32, backend="numpy").generate([1, 20, 30, 40], max_tokens=4, temperature=0,
                                                        top_logprobs=1, details=True)
    assert got != [t.logprob for t in f32.logprobs]


def test_the_fingerprint_names_the_cache(hd32, tmp_path):
    """Two servers with equal fingerprints give equal answers: the KV cache is part of it."""
    import refinfer
    from refinfer.server.app import fingerprint
    plain = fingerprint(refinfer.load(hd32, backend="numpy"))
    q = fingerprint(refinfer.load(hd32, backend="numpy", cache_type_k="q4_0", cache_type_v="q8_0"))
    assert "-kv" not in plain and "-kvq4_0.q8_0-" in q and q.rsplit("-", 1)[1] == plain.rsplit("-", 1)[1]
    g = fingerprint(refinfer.load(hd32, mode="ggml", backend="numpy", cache_type_k="q8_0", cache_type_v="q8_0",
                                  flash_attn=True))
    assert "-kvq8_0.q8_0-fa-" in g
