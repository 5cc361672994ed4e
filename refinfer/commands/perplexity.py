"""python -m refinfer perplexity -m MODEL -f TEXT [--ctx N]"""

from __future__ import annotations

import sys

from .. import threads
from .kv_args import add_kv_arguments, source_kv

HELP = "perplexity over a text file with llama-perplexity's chunking (same numbers for the same --ctx)"


def add_arguments(p):
    p.add_argument("-m", "--model", default=None,
                   help="GGUF file or HF directory (refinfer), or a source spec such as llama.cpp:MODEL.gguf or "
                        "refinfer[mode=ggml]:MODEL.gguf (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("-f", "--file", required=True,
                   help="text file to score, or wiki / c4: exllamav2 0.3.2's calibration texts (fetched on first use)")
    p.add_argument("-c", "--ctx", type=int, default=512, help="tokens per chunk, as llama-perplexity -c (default 512)")
    p.add_argument("--chunks", type=int, default=None,
                   help="score only the first N chunks (llama-perplexity --chunks; default, or any negative N: all)")
    p.add_argument("--mode", default="ideal", choices=["ideal", "ggml"], help="refinfer numerics for a plain model path")
    p.add_argument("--backend", default=None,
                   help="refinfer backend for a plain model path (default: numba in ideal mode, numpy in ggml mode)")
    add_ubatch_argument(p)
    add_kv_arguments(p)
    threads.add_argument(p, default_help="all cores for refinfer, 1 for llama.cpp sources")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_ubatch_argument(p):
    p.add_argument("--ubatch", type=int, default=None, metavar="N",
                   help="tokens per forward step (llama.cpp's -ub) of refinfer and llama.cpp sources that set no "
                        "ubatch= of their own (default 512 for llama.cpp and refinfer's ggml mode; ideal mode runs a "
                        "chunk in one step, and its numbers do not depend on it)")


def read_text(path):
    """A UTF-8 text file; a corpus name (wiki, c4) when no file has that name."""
    import os
    from ..corpus import CORPORA, text
    from ..errors import RefinferError
    if path in CORPORA and not os.path.exists(path):
        return text(path)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise RefinferError(f"-f: cannot read {path}: {e.strerror}",
                            hint="give a UTF-8 text file, e.g. -f README.md, or a corpus: -f wiki, -f c4") from None
    except UnicodeDecodeError as e:
        raise RefinferError(f"-f: {path} is not UTF-8 text (byte offset {e.start})",
                            hint="convert it to UTF-8 first (iconv -t UTF-8)") from None


def run(args) -> int:
    from ..errors import RefinferError
    from ..model import check_ubatch
    from ..perplexity import SOURCE_SPEC, LogitsFileSource, check_chunks, check_ctx, check_source_ctx, parse_source, perplexity

    check_ctx(args.ctx)
    check_chunks(args.chunks)
    check_ubatch(args.ubatch, "--ubatch")
    threads.check(args.threads)
    text = read_text(args.file)
    threads.set_threads(args.threads)
    spec = args.model
    if spec is None:
        from ..fetch import default_model_path
        spec = str(default_model_path())
    if SOURCE_SPEC.match(spec) is None and not spec.startswith(("http://", "https://")):  # a plain path: refinfer
        spec = f"refinfer[mode={args.mode}" + (f",backend={args.backend}" if args.backend else "") + f"]:{spec}"
    src = parse_source(spec, n_ctx=args.ctx, n_threads=threads.llama_cpp_threads(args.threads), n_ubatch=args.ubatch,
                       kv=source_kv(args))
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
