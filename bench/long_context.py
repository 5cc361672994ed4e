"""Long-context agreement on SmolLM2 over real text: refinfer's ideal mode against llama.cpp and
against HF transformers, per position bucket, and ggml mode's bit-exactness with llama.cpp.

    python bench/long_context.py --transformers --png docs/long-context.png --json long-context.json

The text is wiki.utf8 (refinfer.corpus, English Wikipedia), its first 8192 tokens one
teacher-forced prompt. The model is causal and every engine's positions are computed the same
way whatever comes after them (llama.cpp's micro-batches of 512 start at position 0, refinfer
is batch-invariant), so one 8192-token run gives the logits of the 512-, 2k- and 4k-token
prompts too; the table reports them per bucket of positions:

    0-512   512-2k   2k-4k   4k-8k

Engines (each one teacher-forced pass, logits float32[T, vocab]):
    llama.cpp     llama-cpp-python on the GGUF, its defaults: n_ubatch 512, F16 KV cache, no
                  flash attention (refinfer.llama_oracle.LlamaCpp, plain CPU path)
    ideal         refinfer ideal mode (numba backend): exact dequantized weights, float32
                  activations and KV cache, float64 reductions
    transformers  transformers 5.23 in float32 on the CPU, eager attention
                  (refinfer.hf_oracle), on an HF export of an F32 GGUF of the same dequantized
                  weights (refinfer convert --type f32, then refinfer.export_hf); --transformers
    ggml          refinfer ggml mode with n_ubatch 512 against llama.cpp: the share of positions
                  whose logits rows are identical bit for bit (--ggml-tokens, --ggml-backend)
    llama.cpp kv_f32  llama.cpp with an F32 KV cache against its default: llama.cpp's own
                  spread at long context (--floor)

Per bucket: logit NMSE (sum over the bucket's rows), mean and max KLD(base || test) and
same-top-p (refinfer.metrics), the base named first in each pair.

Not collected by pytest (no test_/bench_ prefix): 8192 tokens through three engines take tens
of minutes on two cores. Logits are kept in float32 (1.6 GB per engine at 8192 tokens); with
--cache DIR each engine's logits are saved there and reused by later runs of the same tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys
import time

import numpy as np

import refinfer
from refinfer import corpus, threads
from refinfer.metrics import log_softmax

BUCKETS = [(0, 512), (512, 2048), (2048, 4096), (4096, 8192)]
CURVE_BIN = 256          # positions per point of the plotted curve
ROWS = 256               # rows per metrics pass (float64 [ROWS, vocab] at a time)


def label(a, b):
    def k(n):
        return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)
    return f"{k(a)}-{k(b)}"


def wiki_tokens(model, n):
    """The first n tokens of wiki.utf8 (BOS as the tokenizer adds it), tokenizing a prefix of
    the text that is long enough (about 4 characters a token)."""
    text = corpus.text("wiki")
    chars = 6 * n
    while True:
        ids = model.tokenize(text[:chars], add_special=True)
        if len(ids) > n or chars >= len(text):
            break
        chars *= 2
    if len(ids) <= n:
        sys.exit(f"wiki.utf8 tokenizes to only {len(ids)} tokens; asked for {n}")
    return ids[:n]       # the last token of the prefix may be cut short: leave it out


def row_stats(test, base):
    """Per row: squared error, squared base (float64 sums over the vocabulary), KLD(base || test),
    same top token, identical bits."""
    out = {k: [] for k in ("err", "ref", "kld", "same_top", "bits")}
    for r0 in range(0, len(base), ROWS):
        t, b = test[r0:r0 + ROWS], base[r0:r0 + ROWS]
        t64, b64 = t.astype(np.float64), b.astype(np.float64)
        out["err"].append(np.sum((t64 - b64) ** 2, axis=1))
        out["ref"].append(np.sum(b64 * b64, axis=1))
        lb, lt = log_softmax(b64), log_softmax(t64)
        out["kld"].append(np.sum(np.exp(lb) * (lb - lt), axis=1))
        out["same_top"].append(np.argmax(t, axis=1) == np.argmax(b, axis=1))
        out["bits"].append(np.all(t.view(np.uint32) == b.view(np.uint32), axis=1))
    return {k: np.concatenate(v) for k, v in out.items()}


def bucket_stats(rows, a, b):
    n = min(b, len(rows["kld"]))
    if n <= a:
        return None
    s = slice(a, n)
    ref = float(np.sum(rows["ref"][s]))
    return {"positions": [a, n], "nmse": float(np.sum(rows["err"][s])) / ref if ref else 0.0,
            "kld_mean": float(np.mean(rows["kld"][s])), "kld_max": float(np.max(rows["kld"][s])),
            "same_top": float(np.mean(rows["same_top"][s])), "bits_equal": float(np.mean(rows["bits"][s]))}


def summarize(rows, buckets):
    n = len(rows["kld"])
    curve = [bucket_stats(rows, a, min(a + CURVE_BIN, n)) for a in range(0, n, CURVE_BIN)]
    return {"buckets": [s for s in (bucket_stats(rows, a, b) for a, b in buckets) if s], "curve": curve}


class Cache:
    """Logits of (engine, tokens) as .npy files in a directory, or nothing."""

    def __init__(self, directory, tokens):
        self.dir = pathlib.Path(directory) if directory else None
        self.key = hashlib.sha256(np.asarray(tokens, np.int64).tobytes()).hexdigest()[:16]
        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True)

    def get(self, engine, compute, log):
        path = self.dir / f"{engine}-{self.key}.npy" if self.dir else None
        if path and path.exists():
            log(f"{engine}: logits from {path}")
            return np.load(path, mmap_mode="r"), None
        t0 = time.perf_counter()
        z = np.ascontiguousarray(compute(), dtype=np.float32)
        dt = time.perf_counter() - t0
        log(f"{engine}: {len(z)} positions in {dt:.0f} s")
        if path:
            np.save(path, z)
        return z, dt


def llama_cpp_logits(model_path, tokens, n_threads, variant="default"):
    from refinfer.llama_oracle import LlamaCpp
    with LlamaCpp(model_path, variant=variant, n_ctx=len(tokens), n_threads=n_threads) as llm:
        return llm.logits(tokens)


def hf_export(model_path, work, log):
    """An HF directory of the GGUF's weights dequantized to float32, through an F32 GGUF."""
    from refinfer.export_hf import export_hf
    from refinfer.quantize_model import quantize_model
    work.mkdir(parents=True, exist_ok=True)
    f32 = work / (pathlib.Path(model_path).stem + ".f32.gguf")
    hf = work / (pathlib.Path(model_path).stem + ".f32-hf")
    if not f32.exists():
        log(f"writing {f32}")
        quantize_model(str(model_path), str(f32), "f32")
    if not (hf / "config.json").exists():
        log(f"writing {hf}")
        export_hf(f32, hf, dtype="float32")
    return hf


def transformers_logits(hf_dir, tokens, n_threads):
    import torch
    from refinfer.hf_oracle import capture_transformers
    if n_threads:
        torch.set_num_threads(n_threads)
    logits, _ = capture_transformers(hf_dir, tokens, skip=("*",))   # logits only: no tensor is kept
    return logits


def format_table(results, n_tokens):
    lines = [f"SmolLM2 on the first {n_tokens} tokens of wiki.utf8, per bucket of positions "
             "(base first: KLD(base || test))", "",
             "| pair | positions | logit NMSE | mean KLD | max KLD | same top p |", "|---|---|---|---|---|---|"]
    for name, r in results["pairs"].items():
        for s in r["buckets"]:
            lines.append(f"| {name} | {label(*s['positions'])} | {s['nmse']:.2e} | {s['kld_mean']:.2e} | "
                         f"{s['kld_max']:.2e} | {100 * s['same_top']:.1f}% |")
    if "ggml" in results:
        g = results["ggml"]
        lines += ["", f"ggml mode ({g['backend']} backend, n_ubatch 512) against llama.cpp: positions whose "
                      "logits are identical bit for bit", "",
                  "| positions | identical rows | logit NMSE |", "|---|---|---|"]
        for s in g["buckets"]:
            n = s["positions"][1] - s["positions"][0]
            lines.append(f"| {label(*s['positions'])} | {round(s['bits_equal'] * n)}/{n} "
                         f"({100 * s['bits_equal']:.1f}%) | {s['nmse']:.1e} |")
    lines += ["", "times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["times_s"].items() if v is not None)]
    return "\n".join(lines)


def plot(results, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = ["-", "--", "-.", ":"]
    for (name, r), ls in zip(results["pairs"].items(), styles * 2):
        x = [(c["positions"][0] + c["positions"][1]) / 2 for c in r["curve"]]
        axes[0].plot(x, [c["kld_mean"] for c in r["curve"]], ls, label=name)
        axes[1].plot(x, [c["nmse"] for c in r["curve"]], ls, label=name)
        axes[2].plot(x, [100 * c["same_top"] for c in r["curve"]], ls, label=name)
    if "ggml" in results:
        c = results["ggml"]["curve"]
        x = [(s["positions"][0] + s["positions"][1]) / 2 for s in c]
        axes[2].plot(x, [100 * s["bits_equal"] for s in c], "k-", lw=2.5, alpha=0.4,
                     label="ggml vs llama.cpp: identical rows")
    for ax, title in zip(axes, ("mean KLD per 256 positions", "logit NMSE per 256 positions",
                                "same top token (%) per 256 positions")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("position in the prompt")
        ax.grid(True, alpha=0.3)
        for a, _ in BUCKETS[1:]:
            if a < results["n_tokens"]:
                ax.axvline(a, color="grey", lw=0.5)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[2].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"SmolLM2-135M Q4_1, wiki.utf8, {results['n_tokens']} tokens", fontsize=11)
    fig.tight_layout()
    pathlib.Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("-n", "--tokens", type=int, default=8192, help="prompt length (default 8192)")
    p.add_argument("--transformers", action="store_true", help="add the transformers column")
    p.add_argument("--floor", action="store_true", help="add llama.cpp kv_f32 against llama.cpp's default")
    p.add_argument("--ggml-tokens", type=int, default=0,
                   help="run ggml mode on the first N tokens against llama.cpp (0: not at all)")
    p.add_argument("--ggml-backend", default="numpy", help="backend of the ggml-mode run (default numpy)")
    p.add_argument("--png", default=None, help="write the plot to this PNG (needs the plot extra: matplotlib)")
    p.add_argument("--json", default=None, help="write every number to this JSON file")
    p.add_argument("--cache", default=None, help="keep each engine's logits in this directory and reuse them")
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="threads for every engine (default: all cores for refinfer and transformers, 1 for llama.cpp)")
    args = p.parse_args(argv)

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    threads.set_threads(args.threads)
    n_threads = args.threads or threads.set_threads(None)
    n_llama = threads.llama_cpp_threads(args.threads)     # 1 unless asked: ggml's spinning threads on a busy machine
    from refinfer.fetch import cache_dir, default_model_path
    model_path = str(args.model or default_model_path())
    ideal = refinfer.load(model_path, backend="numba")
    tokens = wiki_tokens(ideal, args.tokens)
    cache = Cache(args.cache, tokens)
    log(f"{model_path}: {len(tokens)} tokens of wiki.utf8, {n_threads} threads ({n_llama} for llama.cpp)")
    results = {"model": model_path, "n_tokens": len(tokens), "threads": n_threads, "pairs": {}, "times_s": {}}
    buckets = [(a, b) for a, b in BUCKETS if a < len(tokens)]

    base, results["times_s"]["llama.cpp"] = cache.get(
        "llama.cpp", lambda: llama_cpp_logits(model_path, tokens, n_llama), log)
    ideal_z, results["times_s"]["ideal"] = cache.get("ideal", lambda: ideal.logits(tokens), log)
    results["pairs"]["llama.cpp vs ideal"] = summarize(row_stats(ideal_z, base), buckets)
    if args.floor:
        kv, results["times_s"]["llama.cpp kv_f32"] = cache.get(
            "llama.cpp-kv_f32", lambda: llama_cpp_logits(model_path, tokens, n_llama, "kv_f32"), log)
        results["pairs"]["llama.cpp vs llama.cpp kv_f32"] = summarize(row_stats(kv, base), buckets)
        del kv
    if args.transformers:
        hf = hf_export(model_path, pathlib.Path(args.cache or cache_dir() / "bench"), log)
        hf_z, results["times_s"]["transformers"] = cache.get(
            "transformers", lambda: transformers_logits(hf, tokens, args.threads), log)
        results["pairs"]["transformers vs ideal"] = summarize(row_stats(ideal_z, hf_z), buckets)
        results["pairs"]["transformers vs llama.cpp"] = summarize(row_stats(base, hf_z), buckets)
        del hf_z
    del ideal_z
    if args.ggml_tokens:
        n = min(args.ggml_tokens, len(tokens))
        ggml = refinfer.load(model_path, mode="ggml", backend=args.ggml_backend, n_ubatch=512)
        g, results["times_s"][f"ggml ({args.ggml_backend})"] = cache.get(
            f"ggml-{args.ggml_backend}-{n}", lambda: ggml.logits(tokens[:n]), log)
        results["ggml"] = {"backend": args.ggml_backend, "n_ubatch": 512,
                           **summarize(row_stats(g, base[:n]), [(a, b) for a, b in buckets if a < n])}
    print(format_table(results, len(tokens)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.png:
        plot(results, args.png)
        log(f"plot: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
