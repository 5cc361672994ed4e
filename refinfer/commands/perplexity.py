"""python -m refinfer perplexity -m MODEL -f TEXT [--ctx N]"""

from __future__ import annotations

import sys

from .. import threads

HELP = "perplexity over a text file with llama-perplexity's chunking (same numbers for the same --ctx)"


def add_arguments(p):
    p.add_argument("-m", "--model", default=None,
                   help="GGUF file or HF directory (refinfer), or a source spec such as llama.cpp:MODEL.gguf or "
                        "refinfer[mode=ggml]:MODEL.gguf (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("-f", "--file", required=True, help="text file to score")
    p.add_argument("-c", "--ctx", type=int, default=512, help="tokens per chunk, as llama-perplexity -c (default 512)")
    p.add_argument("--chunks", type=int, default=None,
                   help="score only the first N chunks (llama-perplexity --chunks; default, or any negative N: all)")
    p.add_argument("--mode", default="ideal", choices=["ideal", "ggml"], help="refinfer numerics for a plain model path")
    p.add_argument("--backend", default=None,
                   help="refinfer backend for a plain model path (default: numba in ideal mode, numpy in ggml mode)")
    threads.add_argument(p, default_help="all cores for refinfer, 1 for llama.cpp sources")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def read_text(path):
    from ..errors import RefinferError
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise RefinferError(f"-f: cannot read {path}: {e.strerror}", hint="give a UTF-8 text file, e.g. -f README.md") from None
    except UnicodeDecodeError as e:
        raise RefinferError(f"-f: {path} is not UTF-8 text (byte offset {e.start})",
                            hint="convert it to UTF-8 first (iconv -t UTF-8)") from None


def run(args) -> int:
    from ..errors import RefinferError
    from ..perplexity import SOURCE_SPEC, LogitsFileSource, check_chunks, check_ctx, check_source_ctx, parse_source, perplexity

    check_ctx(args.ctx)
    check_chunks(args.chunks)
    threads.check(args.threads)
    text = read_text(args.file)
    threads.set_threads(args.threads)
    spec = args.model
    if spec is None:
        from ..fetch import default_model_path
        spec = str(default_model_path())
    if SOURCE_SPEC.match(spec) is None and not spec.startswith(("http://", "https://")):  # a plain path: refinfer
        spec = f"refinfer[mode={args.mode}" + (f",backend={args.backend}" if args.backend else "") + f"]:{spec}"
    src = parse_source(spec, n_ctx=args.ctx, n_threads=threads.llama_cpp_threads(args.threads))
    try:
        if isinstance(src, LogitsFileSource):
            raise RefinferError(f"-m {spec}: perplexity runs a model, not saved logits",
                                hint="kld --base FILE --test MODEL scores a model against saved logits")
        check_source_ctx(src, args.ctx)
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
