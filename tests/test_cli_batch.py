"""`python -m refinfer batch`: JSON-lines requests through the Engine, each result what
Model.generate of the request alone gives; bad lines and options fail before the model loads."""

from __future__ import annotations

import json

import pytest

import refinfer
from test_cli_model_cmds import TINY_Q4_1, check_fails, cli

REQUESTS = [{"prompt": "Once upon a time", "max_tokens": 9, "temperature": 0},
            {"prompt": "The quick brown fox", "max_tokens": 7, "seed": 5, "top_logprobs": 2},
            {"prompt": [1, 450, 4996, 17354], "max_tokens": 5, "seed": 1},
            {"prompt": "Once upon a time there", "max_tokens": 4, "seed": 9, "prompt_logprobs": True}]


def write_lines(path, items):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in items))
    return path


@pytest.mark.parametrize("extra", [[], ["--max-batch", "2", "--max-tokens-per-step", "5", "--kv-block-size", "3"]])
def test_batch_results_equal_each_request_alone(capsys, tmp_path, extra):
    src = write_lines(tmp_path / "r.jsonl", REQUESTS)
    rc, out, err = cli(capsys, ["batch", src, "-m", TINY_Q4_1, "--backend", "numpy", *extra])
    assert rc == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    model = refinfer.load(TINY_Q4_1, backend="numpy")
    assert len(got) == len(REQUESTS)
    for g, r in zip(got, REQUESTS):
        alone = model.generate(**r, details=True)
        assert g["token_ids"] == alone.token_ids and g["text"] == alone.text
        assert g["finish_reason"] == alone.finish_reason and g["seed"] == r.get("seed", g["seed"])
        assert [lp["logprob"] for lp in g["logprobs"]] == [lp.logprob for lp in alone.logprobs]
    assert [len(x["top"]) for x in got[1]["logprobs"]] == [2] * len(got[1]["token_ids"])
    assert got[3]["prompt_logprobs"][0] is None and len(got[3]["prompt_logprobs"]) == got[3]["prompt_tokens"]
    assert "4 requests (0 failed)" in err


def test_batch_bad_request_fails_alone_and_output_file(capsys, tmp_path):
    src = write_lines(tmp_path / "r.jsonl", [REQUESTS[0], {"prompt": "x", "max_tokens": -1},
                                             {"prompt": "x", "temprature": 1}, REQUESTS[1]])
    dst = tmp_path / "out.jsonl"
    rc, out, err = cli(capsys, ["batch", src, "-m", TINY_Q4_1, "--backend", "numpy", "-o", dst])
    assert rc == 1 and out == ""
    got = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [g["finish_reason"] for g in got] == ["length", "error", "error", "length"]
    assert "max_tokens" in got[1]["error"] and "temprature" in got[2]["error"]
    assert "4 requests (2 failed)" in err


@pytest.mark.parametrize("lines, fragments", [
    (['{"prompt": "a"}', "not json"], ["line 2", "not JSON"]),
    (['["a"]'], ["line 1", "JSON object", "list"]),
    ([""], ["no requests"]),
])
def test_batch_bad_file(capsys, tmp_path, lines, fragments):
    src = write_lines(tmp_path / "r.jsonl", lines)
    check_fails(capsys, ["batch", src, "-m", TINY_Q4_1], str(src), *fragments)


@pytest.mark.parametrize("args, fragment", [
    (["--max-batch", "0"], "--max-batch"),
    (["--kv-block-size", "0"], "--kv-block-size"),
    (["--kv-cache-tokens", "0"], "--kv-cache-tokens"),
    (["--kv-cache-mib", "-1"], "--kv-cache-mib"),
    (["--mode", "fast"], "fast"),
    (["-o", "/nonexistent/dir/x.jsonl"], "/nonexistent/dir"),
])
def test_batch_bad_options(capsys, tmp_path, args, fragment):
    src = write_lines(tmp_path / "r.jsonl", REQUESTS[:1])
    check_fails(capsys, ["batch", src, "-m", TINY_Q4_1, *args], fragment)


def test_batch_pool_too_small_for_a_request(capsys, tmp_path):
    src = write_lines(tmp_path / "r.jsonl", [REQUESTS[0], {"prompt": "Once upon a time " * 8, "max_tokens": 40}])
    rc, out, err = cli(capsys, ["batch", src, "-m", TINY_Q4_1, "--backend", "numpy", "--kv-cache-tokens", "32",
                                "--kv-block-size", "4"])
    got = [json.loads(line) for line in out.splitlines()]
    assert rc == 1 and got[0]["finish_reason"] == "length" and got[1]["finish_reason"] == "error"
    assert "KV pool holds 8 blocks" in got[1]["error"]
