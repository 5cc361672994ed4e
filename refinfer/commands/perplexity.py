"""python -m refinfer perplexity -m MODEL -f TEXT [--ctx N]"""

from __future__ import annotations

import sys

HELP = "perplexity over a text file with llama-perplexity's chunking (same numbers for the same --ctx)"


def add_arguments(p):
    p.add_argument("-m", "--model", default=None,
                   help="GGUF file or HF directory (refinfer), or a source spec such as llama.cpp:MODEL.gguf or "
                        "refinfer[mode=ggml]:MODEL.gguf (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("-f", "--file", required=True, help="text file to score")
    p.add_argument("-c", "--ctx", type=int, default=512, help="tokens per chunk, as llama-perplexity -c (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="score only the first N chunks (llama-perplexity --chunks)")
    p.add_argument("--mode", default="ideal", choices=["ideal", "ggml"], help="refinfer numerics for a plain model path")
    p.add_argument("--backend", default="numpy", help="refinfer backend for a plain model path (default numpy)")
    p.add_argument("-t", "--threads", type=int, default=1, help="threads for llama.cpp sources (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def read_text(path):
    from ..errors import RefinferError
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise RefinferError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise RefinferError(f"{path} is not UTF-8 text (byte offset {e.start})") from None


def run(args) -> int:
    from ..perplexity import SOURCE_SPEC, parse_source, perplexity

    text = read_text(args.file)
    spec = args.model
    if spec is None:
        from ..fetch import default_model_path
        spec = str(default_model_path())
    if SOURCE_SPEC.match(spec) is None and not spec.startswith(("http://", "https://")):  # a plain path: refinfer
        spec = f"refinfer[mode={args.mode},backend={args.backend}]:{spec}"
    src = parse_source(spec, n_ctx=args.ctx, n_threads=args.threads)
    try:
        tokens = src.tokenize(text)
        line = []

        def on_chunk(i, ppl):
            line.append(f"[{i}]{ppl:.4f}")

        r = perplexity(src, tokens, n_ctx=args.ctx, n_chunks=args.chunks, progress=not args.no_progress,
                       on_chunk=on_chunk)
    finally:
        src.close()
    print(f"{src.name}: {len(tokens)} tokens, {len(r['chunks'])} chunks of {args.ctx}, "
          f"{r['count']} scored", file=sys.stderr)
    print(",".join(line))
    print(f"Final estimate: PPL = {r['ppl']:.4f} +/- {r['ppl_unc']:.5f}")
    return 0
