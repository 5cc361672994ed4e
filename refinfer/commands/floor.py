"""python -m refinfer floor -m MODEL -p PROMPT -o FLOOR.json"""

from __future__ import annotations

import sys

from .. import threads

HELP = ("measure llama.cpp's noise floor per tensor (its one-token, flash-attention and F32-KV variants "
        "against its default) on one prompt: the tolerances `compare` reads")


def add_arguments(p):
    p.add_argument("-m", "--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("-p", "--prompt", default=None, help="prompt text (tokenized as `dump` tokenizes it)")
    p.add_argument("--tokens", default=None, help="comma-separated token ids instead of a prompt")
    p.add_argument("-o", "--output", required=True, help="output floor table (.json)")
    threads.add_argument(p, default_help="1 (llama.cpp's flash attention splits the KV by thread count)")


def tokens_for(model_path, prompt, token_text):
    """The token ids of -p/--tokens for model_path, checked as `dump` checks them."""
    from ..errors import RefinferError
    from ..model import load
    from .dump import parse_tokens
    if (prompt is None) == (token_text is None):
        raise RefinferError("give exactly one of -p PROMPT or --tokens IDS", hint='e.g. -p "The capital of France is"')
    model = load(model_path, mode="ggml")
    ids = parse_tokens(token_text) if token_text is not None else model.tokenize(prompt)
    if not ids:
        raise RefinferError("the prompt is empty after tokenization", hint='give some text, e.g. -p "Hello"')
    bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
    if bad:
        raise RefinferError(f"--tokens: id {bad[0]} is outside the vocabulary of {model.path} "
                            f"(0..{model.config.vocab_size - 1})", hint="dump -p PROMPT prints the ids it used")
    if len(ids) > model.config.max_seq_len:
        raise RefinferError(f"{len(ids)} tokens, more than the context length of {model.path} ({model.config.max_seq_len})",
                            hint=f"at most {model.config.max_seq_len} tokens")
    return model, ids


def run(args) -> int:
    from .. import floor
    from ..errors import RefinferError
    from ..output_files import check_output_path
    threads.check(args.threads)
    check_output_path(args.output, "-o")
    model, ids = tokens_for(args.model, args.prompt, args.tokens)
    if not str(model.path).endswith(".gguf"):
        raise RefinferError(f"{model.path}: llama.cpp reads GGUF files only",
                            hint="measure the floor on the GGUF the checkpoint came from")
    table = floor.measure(model.path, ids, n_threads=threads.llama_cpp_threads(args.threads))
    floor.write(args.output, table)
    worst = max(table["tensors"].items(), key=lambda kv: kv[1]["nmse"])
    print(f"wrote the floor of {len(table['tensors'])} tensors for {len(ids)} tokens to {args.output} "
          f"(largest nmse {worst[1]['nmse']:.3g} at {worst[0]})", file=sys.stderr)
    return 0
