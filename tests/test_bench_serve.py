"""bench-serve (refinfer.bench_serve): the load generator's report against refinfer's server on
the tiny chat model (every response equal to its serial reference), a negative control (a fake
server whose tokens change under concurrency must be reported as differing), the statistics on
known timings, and the command's errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import pytest

from refinfer import bench_serve as bs
from refinfer.cli import main


def _check_counts(rep, n):
    for lv in [rep["reference"], *rep["levels"]]:
        assert lv["completed"] + lv["failed"] == lv["requests"], lv
    for lv in rep["levels"]:
        assert lv["requests"] == n
        assert lv["compared"] <= lv["completed"]


# -- a fake OpenAI-compatible server: a Starlette app under uvicorn on loopback ------------------

def fake_app(*, flaky: bool, ids: bool = True, delay: float = 0.003):
    """/v1/completions streaming max_tokens tokens derived from the prompt. flaky: while another
    request is in flight, every token is shifted by one (as a server whose numerics depend on the
    batch). ids=False: text only, no logprobs."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    in_flight = [0]

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    async def completions(request):
        body = await request.json()
        base = sum(map(ord, body["prompt"])) % 1000

        async def events():
            in_flight[0] += 1
            try:
                yield 'data: {"choices": [{"index": 0, "text": ""}]}\n\n'      # no token: not the first token
                yield ": ping\n\n"
                for i in range(body["max_tokens"]):
                    await asyncio.sleep(delay)
                    tok = base + i + (1 if flaky and in_flight[0] > 1 else 0)
                    choice = {"index": 0, "text": f" w{tok}"}
                    if ids:
                        choice["logprobs"] = {"tokens": [f"token_id:{tok}"], "token_logprobs": [-0.5],
                                              "top_logprobs": [{f"token_id:{tok}": -0.5}], "text_offset": [0]}
                    yield f"data: {json.dumps({'choices': [choice]})}\n\n"
                yield 'data: {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}\n\n'
                yield ('data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": %d}}\n\n'
                       % body["max_tokens"])
                yield "data: [DONE]\n\n"
            finally:
                in_flight[0] -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"])])


@contextlib.contextmanager
def serve_app(app):
    import uvicorn
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the fake server did not start within 10 s"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(timeout=10)


def _fake_report(flaky, ids=True, levels=(1, 4), n=8):
    prompts = [f"prompt number {i}" for i in range(4)]
    s = bs.Settings(max_tokens=6, timeout=20)
    with serve_app(fake_app(flaky=flaky, ids=ids)) as url:
        return bs.bench(url, bs.make_requests(prompts, n), s, list(levels))


def test_fake_server_consistent_reports_no_difference():
    rep = _fake_report(flaky=False)
    _check_counts(rep, 8)
    for lv in rep["levels"]:
        assert (lv["completed"], lv["compared"], lv["differ"], lv["compared_by"]) == (8, 8, 0, "token ids"), lv
        assert lv["total_output_tokens"] == 8 * 6
        assert lv["mean_prompt_tokens"] == 7
    assert rep["settings"]["model"] == "fake"       # taken from /v1/models


def test_fake_server_flaky_under_concurrency_is_reported():
    """The negative control: outputs that change with load must show up as differing."""
    rep = _fake_report(flaky=True)
    _check_counts(rep, 8)
    c1, c4 = rep["levels"]
    assert c1["differ"] == 0, c1        # alone, the flaky server gives its serial answers
    assert c4["differ"] > 0, c4
    assert c4["compared_by"] == "token ids"


def test_fake_server_text_only_compares_text():
    rep = _fake_report(flaky=True, ids=False, levels=(4,))
    lv = rep["levels"][0]
    assert lv["compared_by"] == "text" and lv["differ"] > 0, lv


def test_summary_statistics_on_known_timings():
    outs = [bs.Output(0, ok=True, ttft=0.1, latency=1.1, itl=[0.2] * 5, output_tokens=6, token_ids=[1] * 6),
            bs.Output(1, ok=True, ttft=0.3, latency=0.3, itl=[], output_tokens=1, token_ids=[2]),
            bs.Output(2, ok=False, error="HTTP 503: busy")]
    rep = bs.summarize(outs, 2.0, 3, {0: outs[0], 1: bs.Output(1, ok=True, token_ids=[3])})
    assert (rep["completed"], rep["failed"], rep["total_output_tokens"]) == (2, 1, 7)
    assert rep["request_throughput"] == pytest.approx(1.0) and rep["output_throughput"] == pytest.approx(3.5)
    assert rep["ttft_ms"]["mean"] == pytest.approx(200.0) and rep["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert rep["ttft_ms"]["p90"] == pytest.approx(280.0)         # numpy's linear interpolation
    assert rep["tpot_ms"]["mean"] == pytest.approx(200.0)        # (1.1 - 0.1) / (6 - 1); one-token outputs have none
    assert rep["itl_ms"]["p99"] == pytest.approx(200.0)
    assert (rep["compared"], rep["differ"], rep["differ_keys"]) == (2, 1, [1])
    assert rep["errors"] == ["HTTP 503: busy"]


def test_chunk_parsing():
    assert bs.parse_chunk("completions", {"choices": [{"text": "a", "logprobs": {"tokens": ["token_id:5"]}}]}) == ("a", [5], 1)
    assert bs.parse_chunk("completions", {"choices": [{"text": "", "logprobs": {"tokens": ["token_id:7"]}}]}) == ("", [7], 1)
    assert bs.parse_chunk("chat", {"choices": [{"delta": {"role": "assistant", "content": ""}}]}) == ("", [], 0)
    assert bs.parse_chunk("chat", {"choices": [{"delta": {"content": "hi"},
                                                "logprobs": {"content": [{"token": "token_id:9"}]}}]}) == ("hi", [9], 1)
    assert bs.parse_chunk("chat", {"choices": [{"delta": {"content": "hi"}}]}) == ("hi", None, 1)
    assert bs.parse_chunk("completion", {"content": " x", "tokens": [11], "stop": False}) == (" x", [11], 1)
    assert bs.parse_chunk("completions", {"choices": [], "usage": {"completion_tokens": 3}}) == ("", [], 0)


# -- refinfer's server ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_chat_model(tiny_chat_gguf):
    import refinfer
    return refinfer.load(tiny_chat_gguf, backend="numba")


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_refinfer_server_every_response_equals_serial(tiny_chat_model, endpoint):
    from server_harness import serve_model
    prompts = bs.builtin_prompts(6, seed=3, words=(2, 40))
    requests = bs.make_requests(prompts, 8)
    s = bs.Settings(endpoint=endpoint, max_tokens=8, temperature=0.7, seed=11, timeout=60)
    with serve_model(tiny_chat_model, parallel=4) as url:
        rep = bs.bench(url, requests, s, [1, 4])
    _check_counts(rep, 8)
    assert rep["reference"]["completed"] == 6 and rep["reference"]["failed"] == 0, rep["reference"]
    for lv in rep["levels"]:
        assert (lv["completed"], lv["compared"], lv["differ"]) == (8, 8, 0), lv
        assert lv["compared_by"] == "token ids", lv
    # the ids the generator collected are the engine's own, request alone through generate
    ref = rep["_reference_outputs"]
    for key in (0, 5):
        kw = dict(messages=[{"role": "user", "content": prompts[key]}]) if endpoint == "chat" else dict(prompt=prompts[key])
        want = tiny_chat_model.generate(**kw, max_tokens=8, temperature=0.7, top_k=0, top_p=1.0, min_p=0.0,
                                        seed=11 + key, details=True)
        # the server also streams an end-of-generation token (as OpenAI's servers do), generate does not
        ids = list(want.token_ids) + ([want.eog.token_id] if want.eog is not None else [])
        assert ref[key].token_ids == ids, key
        assert ref[key].output_tokens == len(ids)


def test_cli_against_refinfer_server(tiny_chat_model, tmp_path, capsys):
    from server_harness import serve_model
    out = tmp_path / "rep.json"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"one two three"\n{"prompt": "four five"}\n[1, 2, 3]\n')
    with serve_model(tiny_chat_model, parallel=2) as url:
        rc = main(["bench-serve", url, "--concurrency", "2", "--requests", "5", "--prompts", str(prompts),
                   "--max-tokens", "4", "--json", str(out), "--timeout", "60"])
    text = capsys.readouterr().out
    assert rc == 0, text
    rep = json.loads(out.read_text())
    lv = rep["levels"][0]
    assert (lv["concurrency"], lv["completed"], lv["differ"]) == (2, 5, 0)
    assert "0 of 5 (token ids)" in text


# -- the command's errors ---------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv, needle", [
    (["--concurrency", "1,x"], "--concurrency must be comma-separated integers"),
    (["--concurrency", "0"], "--concurrency levels must be 1..1024"),
    (["--concurrency", ","], "--concurrency names no level"),
    (["--requests", "0"], "--requests must be"),
    (["--max-tokens", "0"], "--max-tokens must be"),
    (["--timeout", "0"], "--timeout must be > 0"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
])
def test_cli_bad_options(argv, needle, capsys):
    rc = main(["bench-serve", "http://127.0.0.1:9", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and f"error: {needle}" in err and "hint: " in err, err
    assert "Traceback" not in err


def test_cli_unreachable_url(capsys):
    url = f"http://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    rc = main(["bench-serve", url, "--requests", "1", "--timeout", "5"])
    err = capsys.readouterr().err
    assert rc == 2 and f"error: {url}: no server answers" in err and "hint: " in err, err
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("content, needle", [
    ('{"text": "x"}\n', "line 1: an object needs \"prompt\" or \"messages\""),
    ('"ok"\n{not json\n', "line 2: not JSON"),
    ('[1, -2]\n', "line 1: a prompt must be a non-empty string or list of token ids"),
    ("\n\n", "holds no prompt"),
])
def test_cli_bad_prompt_file(tmp_path, content, needle, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    rc = main(["bench-serve", "http://127.0.0.1:9", "--prompts", str(f)])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "hint: " in err, err


def test_cli_bad_url(capsys):
    rc = main(["bench-serve", "localhost:8080"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: URL must be http://HOST[:PORT]" in err, err
