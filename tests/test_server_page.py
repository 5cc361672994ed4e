"""The chat page (GET /, refinfer/server/static) in a real headless Chromium (Debian's chromium
package) driven by playwright for Python.

The page streams /v1/chat/completions itself (fetch + its own SSE parser), so what it shows is
checked against Model.generate of the same messages and sampling values alone: the text, and one
token span per generated token carrying the logprob and bytes the server sent (data-logprob is
JavaScript's shortest round-tripping form of the number, so float() of it is the server's float
exactly). Every test also checks that the page asked nothing of any host but the server and
logged no console error.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.request

import pytest

import refinfer
from ci_skips import oracle_import, oracle_skip

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    oracle_skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install -y chromium)")
sync_api = oracle_import("playwright.sync_api")
from server_harness import serve_model  # noqa: E402

# Flags for a headless run that reaches no other host (no component updates, sync or QUIC probes).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000          # any one wait on the page; the tiny model streams ~80 tokens/s on 2 busy cores
SYSTEM = "You are a helpful assistant."
SETTINGS = {"temperature": 0.8, "seed": 1234, "max_tokens": 24}


@pytest.fixture(scope="module")
def chat_model(tiny_chat_gguf):
    return refinfer.load(tiny_chat_gguf, backend="numba")


@pytest.fixture(scope="module")
def server(chat_model):
    with serve_model(chat_model, parallel=2) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class PageLog:
    """A page with what it logged and every URL it requested."""

    def __init__(self, browser, url, ready="idle"):
        self.url = url
        self.page = browser.new_page(viewport={"width": 1200, "height": 800})
        self.page.set_default_timeout(TIMEOUT_MS)
        self.errors, self.requests = [], []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(url + "/")
        self.page.wait_for_selector(f'#status[data-state="{ready}"]')

    def check_clean(self, allowed_errors=()):
        """No request to another host (nor to another port of this one), no console error."""
        foreign = [u for u in self.requests if not (u == self.url or u.startswith(self.url + "/"))]
        assert not foreign, f"the page requested URLs off the server {self.url}: {foreign}"
        errors = [e for e in self.errors if not any(re.search(a, e) for a in allowed_errors)]
        assert not errors, f"console errors: {errors}"


@pytest.fixture
def page_log(browser, server):
    log = PageLog(browser, server)
    yield log
    log.page.close()


def fill_settings(page, temperature=None, seed=None, max_tokens=None, top_p=None, system=None):
    for sel, v in (("#temperature", temperature), ("#seed", seed), ("#max-tokens", max_tokens),
                   ("#top-p", top_p), ("#system", system)):
        if v is not None:
            page.fill(sel, str(v))


def send(page, text, state="done"):
    page.fill("#prompt", text)
    page.click("#send")
    page.wait_for_selector(f'#status[data-state="{state}"]')


def shown_tokens(turn) -> list[dict]:
    """The token spans of one assistant turn: their data attributes."""
    return turn.locator(".token").evaluate_all(
        "spans => spans.map(s => ({logprob: s.dataset.logprob, bytes: s.dataset.bytes, token: s.dataset.token}))")


def check_turn(turn, result, tokenizer):
    """One assistant turn as shown equals Model.generate's result: text, tokens, logprobs."""
    assert turn.locator(".text").text_content() == result.text
    spans = shown_tokens(turn)
    assert len(spans) == len(result.logprobs), (len(spans), len(result.logprobs))
    for i, (span, lp) in enumerate(zip(spans, result.logprobs)):
        assert json.loads(span["bytes"]) == list(tokenizer.token_to_piece(lp.token_id)), i
        assert float(span["logprob"]) == lp.logprob, (i, span["logprob"], lp.logprob)
    assert turn.get_attribute("data-finish-reason") == result.finish_reason
    assert int(turn.get_attribute("data-completion-tokens")) == len(result.token_ids) + (result.eog is not None)


def reference(model, messages, max_tokens, temperature, seed):
    # the server's defaults for the fields the page leaves empty: top_p 1.0, top_k 0, min_p 0.0
    return model.generate(messages=messages, max_tokens=max_tokens, temperature=temperature, top_p=1.0,
                          top_k=0, min_p=0.0, seed=seed, details=True, top_logprobs=5)


def metrics(url) -> dict:
    """refinfer_* samples of /metrics by name, labels dropped (one model: one sample per name and
    label set; request_success_total is kept per finished_reason)."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'(refinfer_\w+)(\{[^}]*\})? (\S+)$', line)
        if m:
            reason = re.search(r'finished_reason="(\w+)"', m.group(2) or "")
            out[m.group(1) + (f":{reason.group(1)}" if reason else "")] = float(m.group(3))
    return out


def test_chat_page_streams_what_generate_gives(page_log, chat_model, server, tmp_path):
    page, tok = page_log.page, chat_model.tokenizer
    model_id = json.load(urllib.request.urlopen(server + "/v1/models", timeout=10))["data"][0]["id"]
    assert page.text_content("#model") == model_id

    s = SETTINGS
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name three colours."}]
    ref = reference(chat_model, messages, s["max_tokens"], s["temperature"], s["seed"])
    fill_settings(page, system=SYSTEM, **s)
    send(page, messages[1]["content"])
    first = page.locator(".message.assistant").nth(0)
    check_turn(first, ref, tok)

    # Hovering a token shows its top alternatives: the server's top_logprobs, best first.
    i = min(3, len(ref.logprobs) - 1)
    first.locator(".token").nth(i).hover()
    page.wait_for_selector("#tooltip:not([hidden])")
    rows = page.locator("#tooltip tr").evaluate_all(
        "rows => rows.map(r => [JSON.parse(r.dataset.bytes), Number(r.dataset.logprob), r.className])")
    top = ref.logprobs[i].top
    assert [(b, lp) for b, lp, _ in rows] == [(list(tok.token_to_piece(t)), lp) for t, lp in top]
    assert [c == "chosen" for _, _, c in rows] == [t == ref.logprobs[i].token_id for t, _ in top]
    page.screenshot(path=str(tmp_path / "chat-page.png"))
    page.mouse.move(0, 0)
    page.wait_for_selector("#tooltip", state="hidden")

    # The per-token view and the text view switch with the checkbox.
    assert first.locator(".tokens").is_visible() and not first.locator(".text").is_visible()
    page.uncheck("#show-tokens")
    assert first.locator(".text").is_visible() and not first.locator(".tokens").is_visible()
    page.check("#show-tokens")

    # A second turn sends the first as history.
    messages += [{"role": "assistant", "content": ref.text}, {"role": "user", "content": "And three more?"}]
    ref2 = reference(chat_model, messages, s["max_tokens"], s["temperature"], s["seed"])
    send(page, messages[3]["content"])
    check_turn(page.locator(".message.assistant").nth(1), ref2, tok)
    usage = page.locator(".message.assistant").nth(1).locator(".usage").text_content()
    assert f"completion {len(ref2.token_ids) + (ref2.eog is not None)} tokens" in usage
    page.screenshot(path=str(tmp_path / "chat-page-two-turns.png"), full_page=True)
    page_log.check_clean()


def test_chat_page_stop_cancels_the_request(page_log, chat_model, server, tmp_path):
    page, tok = page_log.page, chat_model.tokenizer
    before = metrics(server)
    # 400 tokens take ~5 s here: the stop comes after the first few
    fill_settings(page, temperature=1.0, seed=7, max_tokens=400)
    page.fill("#prompt", "Tell me a long story.")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.message.assistant .token').length >= 3")
    page.click("#stop")
    page.wait_for_selector('#status[data-state="stopped"]')
    turn = page.locator(".message.assistant").nth(0)
    n = len(shown_tokens(turn))
    assert 3 <= n < 400
    assert page.is_disabled("#stop") and page.is_enabled("#send")

    # The server cancelled it: nothing runs, no KV block is held, one more "cancelled" request.
    deadline, now = time.monotonic() + 10, {}
    while time.monotonic() < deadline:
        now = metrics(server)
        if now["refinfer_num_requests_running"] == 0 and now["refinfer_kv_cache_blocks_used"] == 0 \
                and now.get("refinfer_request_success_total:cancelled", 0) > before.get(
                    "refinfer_request_success_total:cancelled", 0):
            break
        time.sleep(0.1)
    assert now["refinfer_num_requests_running"] == 0, now
    assert now["refinfer_num_requests_queued"] == 0, now
    assert now["refinfer_kv_cache_blocks_used"] == 0, now
    assert now.get("refinfer_request_success_total:cancelled", 0) == \
        before.get("refinfer_request_success_total:cancelled", 0) + 1, now
    assert now["refinfer_generation_tokens_total"] - before["refinfer_generation_tokens_total"] < 400

    # What was shown before the stop is the start of the same generation alone.
    messages = [{"role": "user", "content": "Tell me a long story."}]
    ref = reference(chat_model, messages, n, 1.0, 7)
    spans = shown_tokens(turn)
    assert [float(s["logprob"]) for s in spans] == [lp.logprob for lp in ref.logprobs]
    assert [json.loads(s["bytes"]) for s in spans] == [list(tok.token_to_piece(lp.token_id)) for lp in ref.logprobs]
    page.screenshot(path=str(tmp_path / "chat-page-stopped.png"))
    page_log.check_clean()


def test_chat_page_sse_parser(page_log):
    """The page's own SSE parser (readSSE) on a stream cut into one-byte chunks: CR, LF and CRLF line
    ends (a CR at a chunk's end, its LF in the next), pings, "data:" without its space, data over
    several lines, a UTF-8 character split between chunks, and no empty line after the last event."""
    stream = "data: a\r\n\r\n: ping\n\ndata:b\rdata: c\r\rid: 1\ndata: \u00e9\u20ac\n\ndata: [DONE]"
    events = page_log.page.evaluate("""async (text) => {
        const bytes = new TextEncoder().encode(text);
        let i = 0;
        const body = new ReadableStream({pull(c) { i < bytes.length ? c.enqueue(bytes.slice(i, ++i)) : c.close(); }});
        const out = [];
        for await (const data of readSSE(body)) out.push(data);
        return out;
    }""", stream)
    assert events == ["a", "b\nc", "\u00e9\u20ac", "[DONE]"]
    page_log.check_clean()


def test_chat_page_shows_the_servers_error(page_log):
    page = page_log.page
    fill_settings(page, top_p=0, max_tokens=4)
    send(page, "Hello", state="error")
    shown = page.locator(".message.assistant .error").text_content()
    assert shown.startswith("HTTP 400") and "top_p" in shown, shown
    assert "top_p" in page.text_content("#status")
    # the turn that failed is not part of the conversation sent next
    assert page.locator(".message.user.dropped").count() == 1
    # Chromium logs every non-2xx response as a console error: that one is expected
    page_log.check_clean(allowed_errors=[r"status of 400 \(Bad Request\)"])


def test_chat_page_with_an_api_key(browser, chat_model):
    with serve_model(chat_model, parallel=1, api_key="sesame") as url:
        log = PageLog(browser, url, ready="error")
        page = log.page
        assert "401" in page.text_content("#status")
        page.fill("#api-key", "sesame")
        page.press("#api-key", "Enter")
        page.wait_for_selector('#status[data-state="idle"]')
        fill_settings(page, temperature=0.8, seed=5, max_tokens=4)
        send(page, "Hi")
        ref = reference(chat_model, [{"role": "user", "content": "Hi"}], 4, 0.8, 5)
        check_turn(page.locator(".message.assistant").nth(0), ref, chat_model.tokenizer)
        log.check_clean(allowed_errors=[r"status of 401 \(Unauthorized\)"])
        log.page.close()


def test_chat_page_waits_for_the_model(browser, chat_model):
    """While the model loads, /v1/models is a 503 with Retry-After: the page says so and asks
    again until the model is there."""
    loaded = threading.Event()

    def loader():
        loaded.wait(30)
        return chat_model

    with serve_model(loader=loader, parallel=1) as url:
        try:
            log = PageLog(browser, url, ready="loading")
            assert "Loading model" in log.page.text_content("#status")
        finally:
            loaded.set()
        log.page.wait_for_selector('#status[data-state="idle"]')
        assert log.page.text_content("#model") == \
            json.load(urllib.request.urlopen(url + "/v1/models", timeout=10))["data"][0]["id"]
        log.check_clean(allowed_errors=[r"status of 503 \(Service Unavailable\)"])
        log.page.close()
