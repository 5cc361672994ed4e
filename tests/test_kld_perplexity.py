"""perplexity and kld: llama-perplexity's chunking and statistics, checked against direct
formulas and against llama.cpp's own perplexity on the same chunks, judged by llama.cpp's spread
under its own settings (flash attention, one-token decode, F32 KV cache)."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest

from refinfer.cli import main
from refinfer.perplexity import (LogitsFileSource, eval_tokens, kl_divergence, make_chunks, parse_source, perplexity,
                                 select_chunks, targets)
from refinfer.errors import RefinferError

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "formats" / "fixtures"
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
        "it was the season of Darkness, it was the spring of hope, it was the winter of despair. ") * 6


def test_chunking_follows_llama_perplexity():
    toks = list(range(100, 100 + 2 * 16 + 5))
    chunks = make_chunks(toks, 16)
    assert len(chunks) == 2 and chunks[1] == toks[16:32]          # the tail of 5 tokens is dropped
    assert list(targets(chunks[0])) == toks[9:16]                  # first = 8 scores positions 8..14
    assert eval_tokens(chunks[1], True, 1)[:2] == [1, toks[17]]    # BOS replaces the first token
    assert eval_tokens(chunks[1], False, 1) == chunks[1]
    with pytest.raises(RefinferError, match="at least 64"):
        make_chunks(toks[:40], 32)
    # --chunks as llama-perplexity: n_chunk = n_chunks < 0 ? all : min(n_chunks, all)
    chunks = make_chunks(toks, 8)
    assert len(chunks) == 4
    assert select_chunks(chunks, None) == select_chunks(chunks, -1) == select_chunks(chunks, -7) == chunks
    assert select_chunks(chunks, 3) == chunks[:3] and select_chunks(chunks, 9) == chunks
    with pytest.raises(RefinferError, match="--chunks 0"):
        select_chunks(chunks, 0)


class ArraySource:
    """Logits from an array: chunk_logits looks the chunk up by its first token position."""

    def __init__(self, logits, tokens, n_ctx):
        self.logits, self.n_ctx, self.tokens = logits, n_ctx, tokens
        self.name, self.n_vocab, self.add_bos, self.bos = "array", logits.shape[1], False, None

    def chunk_logits(self, chunk):
        i = next(i for i in range(0, len(self.tokens), self.n_ctx) if self.tokens[i: i + self.n_ctx] == list(chunk))
        return self.logits[i: i + self.n_ctx]


def test_statistics_equal_direct_formulas():
    rng = np.random.default_rng(0)
    V, n_ctx = 50, 32
    tokens = rng.integers(0, V, 3 * n_ctx).tolist()
    zb = (rng.standard_normal((len(tokens), V)) * 3).astype(np.float32)
    zt = (zb + rng.standard_normal(zb.shape) * 0.3).astype(np.float32)
    base, test = ArraySource(zb, tokens, n_ctx), ArraySource(zt, tokens, n_ctx)
    (r,) = kl_divergence(base, [test], tokens, n_ctx)
    (same,) = kl_divergence(base, [base], tokens, n_ctx)
    # direct, position by position, in Python floats
    kl, nb, nt, dp, top = [], [], [], [], []
    for c in range(3):
        for j in range(n_ctx // 2, n_ctx - 1):
            i, tok = c * n_ctx + j, tokens[c * n_ctx + j + 1]
            pb = np.exp(zb[i].astype(float) - zb[i].max()); pb /= pb.sum()
            pt = np.exp(zt[i].astype(float) - zt[i].max()); pt /= pt.sum()
            kl.append(float(np.sum(pb * np.log(pb / pt))))
            nb.append(-math.log(pb[tok])); nt.append(-math.log(pt[tok])); dp.append(pt[tok] - pb[tok])
            top.append(np.argmax(zb[i]) == np.argmax(zt[i]))
    assert r["n"] == 3 * (n_ctx - 1 - n_ctx // 2) == len(kl)
    assert r["kld_mean"] == pytest.approx(np.mean(kl), rel=1e-9)
    assert r["kld_max"] == pytest.approx(max(kl), rel=1e-9)
    assert r["ppl_base"] == pytest.approx(math.exp(np.mean(nb)), rel=1e-9)
    assert r["ppl_test"] == pytest.approx(math.exp(np.mean(nt)), rel=1e-9)
    assert r["ppl_ratio"] == pytest.approx(math.exp(np.mean(nt) - np.mean(nb)), rel=1e-9)
    assert r["rms_dp"] == pytest.approx(math.sqrt(np.mean(np.square(dp))), rel=1e-9)
    assert r["same_top"] == pytest.approx(np.mean(top))
    assert r["kld_p99"] == pytest.approx(np.percentile(kl, 99), rel=1e-6)   # llama.cpp's interpolation is numpy's linear
    assert same["kld_mean"] == 0 and same["ppl_ratio"] == 1 and same["same_top"] == 1 and same["rms_dp"] == 0
    p = perplexity(base, tokens, n_ctx)
    assert p["ppl"] == pytest.approx(r["ppl_base"], rel=1e-12) and p["count"] == r["n"]


def llama_uint16_kld(zb, zt):
    """llama-perplexity's KLD, transcribed: base log-probs stored as uint16 over [max-16, max]
    (log_softmax with a log_prob array), then summed over base probabilities above e^-16."""
    zb, zt = zb.astype(np.float32), zt.astype(np.float32)
    mx, mn = zb.max(), max(zb.min(), zb.max() - 16)
    lse = np.float32(np.log(np.sum(np.exp(zb - mx), dtype=np.float64)))
    scale = np.float32((mx - mn) / np.float32(65535))
    q = np.where(zb > mn, np.rint((zb - mn) / scale), 0)
    lpb = scale * q + (mn - mx - lse)
    lt = zt - (zt.max() + np.float32(np.log(np.sum(np.exp(zt - zt.max()), dtype=np.float64))))
    keep = lpb > -16
    return float(np.sum(np.exp(lpb[keep]) * (lpb[keep] - lt[keep])))


def test_float32_base_agrees_with_llama_uint16_kld_up_to_its_storage_error():
    rng = np.random.default_rng(1)
    V, n_ctx = 4000, 16
    tokens = rng.integers(0, V, 2 * n_ctx).tolist()
    zb = (rng.standard_normal((len(tokens), V)) * 4).astype(np.float32)
    zt = (zb + rng.standard_normal(zb.shape) * 0.05).astype(np.float32)
    (r,) = kl_divergence(ArraySource(zb, tokens, n_ctx), [ArraySource(zt, tokens, n_ctx)], tokens, n_ctx)
    rows = [c * n_ctx + j for c in range(2) for j in range(n_ctx // 2, n_ctx - 1)]
    theirs = np.mean([llama_uint16_kld(zb[i], zt[i]) for i in rows])
    # same quantity; uint16 storage (step (max-min)/65535) and the e^-16 cut move it slightly
    assert r["kld_mean"] == pytest.approx(theirs, rel=0.05)


# ---- against llama.cpp ------------------------------------------------------------------------

def _ppl(spec, text, n_ctx, n_chunks=None):
    src = parse_source(spec, n_ctx=n_ctx)
    try:
        return perplexity(src, src.tokenize(text), n_ctx, n_chunks)["ppl"]
    finally:
        src.close()


def floor_and_refinfer(path, text, n_ctx, variants, n_chunks=None, modes=("ideal", "ggml")):
    default = _ppl(f"llama.cpp:{path}", text, n_ctx, n_chunks)
    floor = {v: _ppl(f"llama.cpp[variant={v}]:{path}", text, n_ctx, n_chunks) / default - 1 for v in variants}
    ours = {m: _ppl(f"refinfer[mode={m}]:{path}", text, n_ctx, n_chunks) / default - 1 for m in modes}
    return default, floor, ours


def check_ggml_mode_exact(qtype, n_chunks):
    """ggml mode is llama.cpp's arithmetic bit for bit (README): on the same chunks its logits
    equal llama.cpp's, so KLD and logit NMSE are 0, the PPLs are equal and the top token is
    the same everywhere. Not approximately: a 1-ulp change anywhere must fail this."""
    pytest.importorskip("llama_cpp")
    path = FIXTURES / f"tiny-llama-{qtype}.gguf"
    llama, ours = parse_source(f"llama.cpp:{path}", n_ctx=64), parse_source(f"refinfer[mode=ggml]:{path}", n_ctx=64)
    try:
        tokens = llama.tokenize(TEXT)
        chunk = make_chunks(tokens, 64)[0]
        z_llama, z_ours = llama.chunk_logits(chunk), ours.chunk_logits(chunk)
        assert np.array_equal(z_ours, z_llama), f"max |diff| {np.max(np.abs(z_ours - z_llama)):.3g}"
        (r,) = kl_divergence(llama, [ours], tokens, 64, n_chunks)
        assert (r["kld_mean"], r["kld_max"], r["nmse"], r["same_top"], r["rms_dp"]) == (0, 0, 0, 1, 0), r
        assert r["ppl_test"] == r["ppl_base"] and r["ppl_ratio"] == 1, r
    finally:
        llama.close()


@pytest.mark.parametrize("qtype", ["q4_0", "q5_1", "q8_0"])
def test_ggml_mode_logits_ppl_and_kld_equal_llama_cpp(qtype):
    check_ggml_mode_exact(qtype, 3)


@pytest.mark.parametrize("qtype", ["q4_0", "q5_1", "f16"])
def test_perplexity_on_generated_models_within_llama_cpp_floor(qtype, record_property):
    pytest.importorskip("llama_cpp")
    path = FIXTURES / f"tiny-llama-{qtype}.gguf"
    default, floor, ours = floor_and_refinfer(path, TEXT, 64, ("single_token", "flash_attn", "kv_f32"), n_chunks=3)
    print(f"\n[{qtype}] llama.cpp PPL {default:.4f}; relative to it: llama.cpp variants {floor}; refinfer {ours}")
    record_property(f"ppl_{qtype}", {"llama_cpp": default, "floor": floor, "refinfer": ours})
    assert ours["ggml"] == 0.0, (ours, floor)          # the same PPL, to the last bit (README)
    # ideal mode skips the q8 activation quantization every llama.cpp setting shares, so the
    # tiny models' floor (~1e-6) is no yardstick for it; it stays at rounding level anyway
    assert abs(ours["ideal"]) < 1e-2, ours


def test_smollm2_perplexity_within_llama_cpp_floor(smollm2_path, record_property):
    """One real-model run, ideal mode: 3 chunks of 128 tokens. llama.cpp's one-token-decode
    variant and refinfer's ggml mode are left out here only for time (`kld --floor` measures the
    first; the generated models above check the second)."""
    pytest.importorskip("llama_cpp")
    text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    default, floor, ours = floor_and_refinfer(smollm2_path, text, 128, ("flash_attn", "kv_f32"), n_chunks=3,
                                              modes=("ideal",))
    spread = max(abs(v) for v in floor.values())
    print(f"\n[SmolLM2 Q4_1] llama.cpp PPL {default:.4f}; relative: llama.cpp variants {floor}; refinfer {ours}")
    record_property("ppl_smollm2", {"llama_cpp": default, "floor": floor, "refinfer": ours})
    # llama.cpp's settings move SmolLM2's perplexity by up to 0.44% over longer texts
    assert abs(ours["ideal"]) <= max(spread, 0.0044), (ours, floor)


# ---- the commands -----------------------------------------------------------------------------

def test_perplexity_and_kld_commands(tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    path = FIXTURES / "tiny-llama-q8_0.gguf"
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert main(["perplexity", "-m", str(path), "-f", str(text), "-c", "64", "--chunks", "2", "--mode", "ggml",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[1]") and "Final estimate: PPL = " in out
    ppl = float(out.split("PPL = ")[1].split()[0])
    assert ppl == round(_ppl(f"llama.cpp:{path}", TEXT, 64, 2), 4)     # ggml mode: llama.cpp's PPL, as printed

    saved = tmp_path / "base.safetensors"
    args = ["kld", "--base", f"llama.cpp:{path}", "--test", f"refinfer[mode=ggml]:{path}", "-f", str(text), "-c", "64",
            "--chunks", "2", "--no-progress"]
    assert main(args + ["--save-base", str(saved), "--json", str(tmp_path / "a.json"), "--floor"]) == 0
    out = capsys.readouterr().out
    for name in ("Mean PPL(Q)", "Mean PPL(base)", "Mean ln(PPL(Q)/PPL(base))", "Mean PPL(Q)/PPL(base)",
                 "Mean    KLD:", "Maximum KLD:", "99.0%   KLD:", "Median  KLD:", "RMS Δp", "Same top p:",
                 "llama.cpp's noise floor", "single_token", "flash_attn", "kv_f32"):
        assert name in out, name
    a = json.loads((tmp_path / "a.json").read_text())
    r = a["tests"][f"refinfer[mode=ggml]:{path}"]
    assert r["n"] == 2 * 31 and (r["kld_mean"], r["kld_max"], r["nmse"], r["same_top"], r["ppl_ratio"]) == (0, 0, 0, 1, 1)
    assert len(a["floor"]) == 3
    # the saved float32 base gives the same numbers without -f
    assert main(["kld", "--base", str(saved), "--test", f"refinfer[mode=ggml]:{path}", "--no-progress",
                 "--json", str(tmp_path / "b.json")]) == 0
    capsys.readouterr()
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["tests"][f"refinfer[mode=ggml]:{path}"] == r               # float32 saved, float32 used: the same numbers


def test_fixture_logits_are_a_kld_base(capsys, tmp_path):
    """formats/fixtures/logits-<type>.safetensors (refinfer ideal-mode logits of prompt 0, every
    position) is a kld base as it is: one chunk of the prompt's T tokens, every row scored.
    Against llama.cpp on the same model the numbers are llama.cpp's distance from ideal
    mode: measured mean KLD 3.2e-4 on q4_0 (2.3e-4 .. 4.8e-4 over the five quantized types,
    6.6e-7 on f16), the same top token at all 4 positions."""
    pytest.importorskip("llama_cpp")
    import refinfer
    base = LogitsFileSource(FIXTURES / "logits-q4_0.safetensors")
    assert (base.n_ctx, base.first, base.chunks) == (5, 0, [[1, 9038, 2501, 263, 931]])
    model = FIXTURES / "tiny-llama-q4_0.gguf"
    assert base.chunks[0] == refinfer.load(model).tokenize("Once upon a time")
    js = tmp_path / "k.json"
    assert main(["kld", "--base", str(FIXTURES / "logits-q4_0.safetensors"), "--test", f"llama.cpp:{model}",
                 "--no-progress", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "5 tokens, chunks of 5, 4 scored positions (every position of the prompt)" in out
    r = json.loads(js.read_text())["tests"][f"llama.cpp:{model}"]
    # direct: KL(base || llama.cpp) at rows 0..3 of the stored logits
    from refinfer.llama_oracle import llama_logits
    from refinfer.metrics import kld_per_position
    direct = kld_per_position(llama_logits(model, base.chunks[0])[:4], np.asarray(base.logits[0]))
    assert r["n"] == 4 and r["kld_mean"] == pytest.approx(float(direct.mean()), rel=1e-9)
    assert 0 < r["kld_mean"] < 3e-3 and r["same_top"] == 1, r          # measured 3.19e-4
    with pytest.raises(RefinferError, match="do not fit together"):
        bad = tmp_path / "bad.safetensors"
        from refinfer.dump import write_safetensors
        write_safetensors(bad, {"tokens": np.arange(5, dtype=np.int32), "logits": np.zeros((4, 7), np.float32)},
                          {"format": "refinfer-logits", "format_version": "1"})
        LogitsFileSource(bad)


class CountingSource:
    """A source that keeps weak references to the chunk logits it hands out, to see how many
    are still alive when the next chunk is asked for, and the size of the partial file then."""

    def __init__(self, src, out_dir):
        self.src, self.out_dir, self.alive, self.sizes, self.refs = src, out_dir, [], [], []
        self.name, self.n_vocab, self.add_bos, self.bos = src.name, src.n_vocab, src.add_bos, src.bos

    def chunk_logits(self, chunk):
        import gc
        import weakref
        gc.collect()
        self.alive.append(sum(r() is not None for r in self.refs))
        self.sizes.append(sum(p.stat().st_size for p in self.out_dir.glob(".*.part")))
        z = np.array(self.src.chunk_logits(chunk))
        self.refs.append(weakref.ref(z))
        return z


def test_save_base_streams_chunk_by_chunk_and_round_trips_exactly(tmp_path):
    """--save-base writes each chunk's logits when it is computed: while chunk k is computed,
    the partial file holds the header, the tokens and chunks 0..k-1, and no more than the
    previous chunk's array is alive. The finished file gives back the very same float32 logits."""
    path = FIXTURES / "tiny-llama-q8_0.gguf"
    src = parse_source(str(path), n_ctx=32)
    tokens = src.tokenize(TEXT)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    counting = CountingSource(src, out_dir)
    saved = out_dir / "base.safetensors"
    kl_divergence(counting, [], tokens, 32, 5, save_base=saved)
    assert counting.alive == [0, 1, 1, 1, 1]
    step = 15 * 32000 * 4                               # one chunk: n_ctx - 1 - n_ctx // 2 rows of float32
    first = counting.sizes[1] - step
    assert first > 5 * 32 * 4 and counting.sizes == [0] + [first + k * step for k in range(1, 5)]
    assert saved.stat().st_size == first + 5 * step and not list(out_dir.glob(".*.part"))
    back = LogitsFileSource(saved)
    assert back.n_ctx == 32 and back.chunks == make_chunks(tokens, 32)[:5]
    for i, chunk in enumerate(back.chunks):
        assert np.array_equal(back.logits[i], src.chunk_logits(chunk)[16:31])


def test_an_interrupted_save_base_leaves_no_file(tmp_path):
    path = FIXTURES / "tiny-llama-q8_0.gguf"
    src = parse_source(str(path), n_ctx=32)
    tokens = src.tokenize(TEXT)

    class Fails(CountingSource):
        def chunk_logits(self, chunk):
            if len(self.refs) == 2:
                raise KeyboardInterrupt
            return super().chunk_logits(chunk)

    with pytest.raises(KeyboardInterrupt):
        kl_divergence(Fails(src, tmp_path), [], tokens, 32, 5, save_base=tmp_path / "base.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_command_errors(tmp_path, capsys):
    path = FIXTURES / "tiny-llama-q8_0.gguf"
    short = tmp_path / "s.txt"
    short.write_text("too short")
    assert main(["perplexity", "-m", str(path), "-f", str(short), "-c", "64"]) == 2
    assert "needs at least 128" in capsys.readouterr().err
    assert main(["kld", "--base", f"refinfer[variant=x]:{path}", "--test", str(path), "-f", str(short)]) == 2
    assert "unknown option" in capsys.readouterr().err
    assert main(["kld", "--base", str(tmp_path / "none.safetensors"), "--test", str(path)]) == 2
    assert "cannot read" in capsys.readouterr().err


# ---- an OpenAI-compatible server ----------------------------------------------------------------

@pytest.fixture
def fake_server():
    """A completions endpoint answering echo + logprobs requests from llama.cpp's logits of a
    fixture model, keyed by token id (vLLM's return_tokens_as_token_ids) or by token text."""
    import http.server
    import threading
    from refinfer.llama_oracle import LlamaCpp
    path = FIXTURES / "tiny-llama-q8_0.gguf"
    llm = LlamaCpp(path, n_ctx=64)
    tok = refinfer_tokenizer(path)
    state = {"by_text": False}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ids = req["prompt"]
            z = llm.logits(ids).astype(np.float64)
            lp = z - z.max(axis=-1, keepdims=True)
            lp -= np.log(np.exp(lp).sum(axis=-1, keepdims=True))
            key = (lambda i: tok.token_to_piece(i).decode("utf-8", "replace")) if state["by_text"] else (lambda i: f"token_id:{i}")
            token_lp, top_lp = [None], [None]
            for j in range(1, len(ids)):
                row = lp[j - 1]
                top = np.argsort(-row)[: req["logprobs"]]
                token_lp.append(float(row[ids[j]]))
                top_lp.append({key(int(i)): float(row[i]) for i in top})
            body = json.dumps({"choices": [{"text": "", "logprobs": {"token_logprobs": token_lp,
                                                                     "top_logprobs": top_lp}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1/completions", path, state
    server.shutdown()
    llm.close()


def refinfer_tokenizer(path):
    import refinfer
    return refinfer.load(path).tokenizer


def test_openai_compatible_server_source(fake_server):
    pytest.importorskip("llama_cpp")
    url, path, state = fake_server
    tokens = refinfer_tokenizer(path).encode(TEXT)
    base = parse_source(f"llama.cpp:{path}", n_ctx=64)
    try:
        kld = {}
        for by_text, top in ((False, 40), (True, 40), (False, 4000)):
            state["by_text"] = by_text
            srv = parse_source(f"openai[vocab={path},top={top}]:{url}", n_ctx=64)
            (r,) = kl_divergence(base, [srv], tokens, 64, n_chunks=2)
            # the target's log-prob and the top token come from the server: PPL and same-top exact
            # (up to the float32 rounding of the log-probs)
            assert r["ppl_ratio"] == pytest.approx(1.0, abs=1e-6) and r["same_top"] == 1.0, r
            kld[by_text, top] = r["kld_mean"]
        # token texts give the ids' answer, but for texts several ids share (byte tokens shown
        # as U+FFFD), which go to the first of them
        assert kld[True, 40] == pytest.approx(kld[False, 40], rel=1e-2)
        # the untold tail is spread evenly, so KLD is an approximation that improves with top
        # (these random models are nearly flat over 32000 tokens: the worst case)
        assert kld[False, 4000] < 0.5 * kld[False, 40], kld
    finally:
        base.close()
    with pytest.raises(RefinferError, match="vocabulary size is unknown"):
        parse_source(url).scored_logits(tokens[:64])
    state["by_text"] = True
    with pytest.raises(RefinferError, match="cannot map token text"):
        parse_source(url)._id("no such token text")
