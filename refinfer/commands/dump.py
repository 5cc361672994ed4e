"""python -m refinfer dump -m MODEL -p PROMPT -o OUT.safetensors"""

from __future__ import annotations

import sys

from .. import threads
from .kv_args import add_kv_arguments, check_kv, kv_kwargs

HELP = "write every intermediate activation of one forward pass (llama.cpp's tensor names) to a safetensors file"


def add_arguments(p):
    p.add_argument("-m", "--model", default=None, help="GGUF file or HF safetensors directory (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("-p", "--prompt", default=None, help="prompt text (tokenized with the model's tokenizer, BOS added as the model asks)")
    p.add_argument("--tokens", default=None, help="comma-separated token ids instead of a prompt")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file")
    p.add_argument("--mode", default="ideal", choices=["ideal", "ggml"], help="refinfer numerics (default ideal)")
    p.add_argument("--backend", default="numpy",
                   help="numpy, numba, or llama.cpp (llama.cpp's own tensors through llama-cpp-python; GGUF only)")
    p.add_argument("--skip", action="append", default=[], metavar="GLOB",
                   help="leave out tensors matching GLOB (repeatable), e.g. 'kq-*' for long prompts: "
                        "kq-N holds heads x T x T floats per layer")
    p.add_argument("--floor", metavar="FILE", default=None,
                   help="also measure llama.cpp's noise floor on the same tokens and write it to FILE "
                        "(what `compare --floor` reads; GGUF only)")
    add_kv_arguments(p)
    threads.add_argument(p, default_help="all cores for refinfer, 1 for llama.cpp")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_tokens(text):
    from ..errors import RefinferError
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise RefinferError(f"--tokens must be comma-separated integers, got {text!r}",
                            hint="e.g. --tokens 1,9038,2501 (dump prints the ids it used)") from None
    if not ids:
        raise RefinferError("--tokens is empty", hint="e.g. --tokens 1,9038,2501, or -p PROMPT")
    return ids


def run(args) -> int:
    from .. import __version__
    from ..dump import capture_llama_cpp, capture_refinfer, sha256_file, write_dump
    from ..errors import RefinferError
    from ..model import load
    from ..output_files import check_output_path

    if (args.prompt is None) == (args.tokens is None):
        raise RefinferError("give exactly one of -p PROMPT or --tokens IDS",
                            hint='e.g. -p "The capital of France is"')
    ids = parse_tokens(args.tokens) if args.tokens is not None else None
    threads.check(args.threads)
    check_kv(args)
    check_output_path(args.output, "-o")
    check_output_path(args.floor, "--floor")
    threads.set_threads(args.threads)
    model = load(args.model, mode=args.mode, backend="numpy" if args.backend == "llama.cpp" else args.backend,
                 **kv_kwargs(args))
    ids = ids if ids is not None else model.tokenize(args.prompt)
    if not ids:
        raise RefinferError("the prompt is empty after tokenization", hint='give some text, e.g. -p "Hello"')
    n_vocab = model.config.vocab_size
    bad = [t for t in ids if not 0 <= t < n_vocab]
    if bad:
        raise RefinferError(f"--tokens: id {bad[0]} is outside the vocabulary of {model.path} (0..{n_vocab - 1})",
                            hint="take the ids from this model's tokenizer: dump -p PROMPT prints the ids it used")
    if len(ids) > model.config.max_seq_len:
        what = "--tokens gives" if args.tokens is not None else "-p tokenizes to"
        raise RefinferError(f"{what} {len(ids)} tokens, more than the context length of {model.path} "
                            f"({model.config.max_seq_len})",
                            hint=f"dump at most {model.config.max_seq_len} tokens (the model's context_length)")
    if (args.backend == "llama.cpp" or args.floor) and not str(model.path).endswith(".gguf"):
        raise RefinferError(f"{model.path}: llama.cpp reads GGUF files only",
                            hint="dump an HF directory with --backend numpy and without --floor")
    if args.backend == "llama.cpp":
        if not str(model.path).endswith(".gguf"):
            raise RefinferError(f"{model.path}: llama.cpp reads GGUF files only",
                                hint="dump an HF directory with --backend numpy")
        tensors = capture_llama_cpp(model.path, ids, skip=args.skip, n_threads=threads.llama_cpp_threads(args.threads))
        engine, mode = "llama.cpp", "llama.cpp-default"
    else:
        tensors = capture_refinfer(model, ids, progress=not args.no_progress, skip=args.skip, cache=True)
        engine, mode = "refinfer", args.mode
    import pathlib
    mp = pathlib.Path(model.path)
    header = {"engine": engine, "refinfer_version": __version__, "mode": mode, "backend": args.backend,
              "model_file": mp.name, "model_sha256": sha256_file(mp) if mp.is_file() else "",
              "prompt": args.prompt if args.prompt is not None else "", "n_tokens": len(ids)}
    if engine == "refinfer":
        from ..kv_cache import attn_rotation
        be = model.backend
        kt, vt = be.kv_types()
        rot = attn_rotation(kt, vt, model.config.head_dim) if be.kv_rotation else (0, 0)
        header.update(cache_type_k=kt.name, cache_type_v=vt.name, flash_attn=str(int(be.flash_attn)),
                      kv_rotation="x".join(str(n) for n in rot))
    write_dump(args.output, tensors, ids, header)
    print(f"wrote {len(tensors)} tensors for {len(ids)} tokens to {args.output} "
          f"({engine}, mode {mode}, backend {args.backend})", file=sys.stderr)
    print("tokens: " + ",".join(str(t) for t in ids), file=sys.stderr)
    if args.floor:
        from .. import floor
        floor.write(args.floor, floor.measure(model.path, ids, n_threads=threads.llama_cpp_threads(args.threads)))
        print(f"wrote llama.cpp's noise floor for the same tokens to {args.floor}", file=sys.stderr)
    return 0
