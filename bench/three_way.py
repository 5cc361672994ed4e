"""refinfer ideal vs HF transformers vs llama.cpp on the same weights, per tensor kind and for the
logits: the three-way table.

    python bench/three_way.py [--tokens 48] [--models smollm2,llama,qwen2]

Like with like: each model's weights are dequantized once and all three engines run them.
- refinfer: ideal mode (float32, NumPy reference backend) on the GGUF itself;
- transformers 5.23 (float32, CPU, eager attention) on `export-hf`'s float32 directory;
- llama.cpp (llama-cpp-python, plain CPU path, default settings: F16 KV cache, batch prefill)
  on an F32 GGUF of the same dequantized weights (`convert IN OUT --type f32`).
Models: SmolLM2-135M-Instruct Q4_1 (the default model), and generated ones (tests/models.py):
a 3-layer llama with GQA and a SentencePiece vocabulary, a 2-layer tied qwen2 with q/k/v biases.

Per tensor kind (inp_embd, attn_norm, Qcur, ...): the largest NMSE over the layers, the first
engine of a pair taken as the reference; the logits: NMSE, mean KLD and same-top-1
(refinfer.metrics.compare_logits). Prints one markdown table per model.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

PROMPT = ("The history of the city begins in the Roman period, when a small fort was built at the crossing "
          "of the river. Over the following centuries the settlement grew into a market town, and by 1850 "
          "it had a railway station, three churches and a population of 12,000.")
KINDS = ("inp_embd", "attn_norm", "Qcur", "Kcur", "Vcur", "kq", "kqv_out", "attn_out", "ffn_inp", "ffn_norm",
         "ffn_swiglu", "ffn_out", "l_out", "result_norm", "result_output")
PAIRS = (("refinfer", "transformers"), ("refinfer", "llama.cpp"), ("transformers", "llama.cpp"))


def prepare(name, work: pathlib.Path):
    """(GGUF refinfer runs, F32 GGUF for llama.cpp, HF directory for transformers)."""
    from refinfer.export_hf import export_hf
    from refinfer.quantize_model import quantize_model
    if name == "smollm2":
        from refinfer.fetch import default_model_path
        src = default_model_path(quiet=True)
    else:
        from conftest import llama_cpp_models_dir
        from models import make_tiny_llama_gguf
        vocab = llama_cpp_models_dir()
        if name == "llama":
            src = make_tiny_llama_gguf(work / "llama.gguf", vocab_gguf=vocab / "ggml-vocab-llama-spm.gguf",
                                       n_layers=3, n_heads=4, n_kv_heads=2, seed=11)
        else:
            src = make_tiny_llama_gguf(work / "qwen2.gguf", vocab_gguf=vocab / "ggml-vocab-qwen2.gguf", arch="qwen2",
                                       n_layers=2, n_heads=4, n_kv_heads=1, tie_embeddings=True, seed=12)
    f32 = work / f"{name}.f32.gguf"
    quantize_model(src, f32, "f32")
    hf = work / f"{name}-hf"
    export_hf(src, hf)
    return src, f32, hf


def run_model(name, n_tokens, work):
    import refinfer
    from refinfer.dump import capture_llama_cpp, capture_refinfer
    from refinfer.hf_oracle import capture_transformers
    src, f32, hf = prepare(name, work)
    model = refinfer.load(src, backend="numpy", mode="ideal")
    tokens = model.tokenize(PROMPT)[:n_tokens]
    timing = {}
    t = time.perf_counter()
    dumps = {"refinfer": capture_refinfer(model, tokens)}
    timing["refinfer"] = time.perf_counter() - t
    t = time.perf_counter()
    dumps["transformers"] = capture_transformers(hf, tokens)[1]
    timing["transformers"] = time.perf_counter() - t
    t = time.perf_counter()
    dumps["llama.cpp"] = capture_llama_cpp(f32, tokens)
    timing["llama.cpp"] = time.perf_counter() - t
    return tokens, dumps, timing


def table(dumps) -> str:
    from refinfer.metrics import compare_logits, nmse
    lines = ["| tensor kind | " + " | ".join(f"{a} vs {b}" for a, b in PAIRS) + " |",
             "|---|" + "---|" * len(PAIRS)]
    for kind in KINDS:
        cells = []
        for a, b in PAIRS:
            names = [n for n in dumps[a] if (n == kind or n.startswith(kind + "-")) and n in dumps[b]]
            cells.append(f"{max(nmse(dumps[b][n], dumps[a][n]) for n in names):.2e}" if names else "n/a")
        lines.append(f"| {kind} (max NMSE) | " + " | ".join(cells) + " |")
    stats = [compare_logits(dumps[b]["result_output"], dumps[a]["result_output"]) for a, b in PAIRS]
    lines.append("| logits NMSE | " + " | ".join(f"{s['nmse']:.2e}" for s in stats) + " |")
    lines.append("| logits mean KLD | " + " | ".join(f"{s['kld_mean']:.2e}" for s in stats) + " |")
    lines.append("| logits max KLD | " + " | ".join(f"{s['kld_max']:.2e}" for s in stats) + " |")
    lines.append("| same top-1 | " + " | ".join(f"{100 * s['same_top']:.1f}%" for s in stats) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=48, help="prompt tokens (the start of a fixed English text)")
    p.add_argument("--models", default="smollm2,llama,qwen2", help="comma-separated: smollm2, llama, qwen2")
    args = p.parse_args(argv)
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as d:
            tokens, dumps, timing = run_model(name, args.tokens, pathlib.Path(d))
        print(f"\n### {name}: {len(tokens)} tokens ("
              + ", ".join(f"{k} {v:.1f} s" for k, v in timing.items()) + ")\n")
        print(table(dumps))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
