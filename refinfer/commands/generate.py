"""python -m refinfer generate [PROMPT] ...

Order of work: every option is checked, then the model loads, then the prompt is tokenized and
fitted into the context, and only then is anything written to stdout, so that an error never
follows the echoed prompt.
"""

from __future__ import annotations

import sys
import time

from .. import threads
from .kv_args import add_kv_arguments, check_kv, kv_kwargs

HELP = "generate text from a prompt (default model: SmolLM2-135M-Instruct Q4_1, fetched on first use)"


def add_arguments(p):
    p.add_argument("prompt", nargs="?", default=None, help="prompt text (default: read standard input)")
    p.add_argument("-m", "--model", default=None, help="GGUF file or HF safetensors directory (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("-n", "--n-predict", type=int, default=128, help="maximum number of tokens to generate (default 128)")
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens; 0 disables (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass; 1 disables (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="drop tokens below min-p x the top probability (default 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty over the last --repeat-last-n tokens (default 1.0 = off)")
    p.add_argument("--repeat-last-n", type=int, default=64, help="tokens of history the penalty looks at; 0 disables, -1 all (default 64)")
    p.add_argument("--seed", type=int, default=-1,
                   help="random seed for reproducible sampling (default -1: a random seed, printed in the summary line)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--backend", default=None, help="compute backend: numba (the default when installed), numpy (the reference) or cuda (NVIDIA GPU, extra [cuda])")
    # Checked in run(), not by argparse choices, so that a wrong mode gets the usual error + hint.
    p.add_argument("--mode", default="ideal", metavar="ideal|ggml",
                   help="numerics: ideal (exact float) or ggml (llama.cpp's CPU roundings)")
    p.add_argument("--ubatch", type=int, default=None, metavar="N",
                   help="tokens per forward step of a prompt, as llama.cpp's -ub (default: 512 in ggml mode, the whole prompt in ideal mode, whose numbers do not depend on it)")
    p.add_argument("--dequant", default="deployed", metavar="deployed|exact",
                   help="GPTQ/AWQ/compressed-tensors checkpoints: deployed (default) uses the weights each library's "
                        "dequantization computes, rounded to fp16; exact the float32 product scale * (q - zero)")
    p.add_argument("--a16", action="store_true",
                   help="GPTQ/AWQ/compressed-tensors checkpoints: round those layers' input and output activations "
                        "to fp16, as A16 kernels (exllama, Marlin) do")
    add_kv_arguments(p)
    threads.add_argument(p)


def check_args(args):
    """Every option that can be checked without the model, in the order of the command line."""
    from ..backends import check_backend_name
    from ..model import check_dequant, check_max_tokens, check_ubatch, resolve_seed
    from ..sampling import SamplerConfig

    check_max_tokens(args.n_predict, "-n/--n-predict")
    seed = resolve_seed(args.seed)
    SamplerConfig(args.temp, args.top_k, args.top_p, args.min_p, args.repeat_penalty, args.repeat_last_n,
                  seed=seed).check()
    check_backend_name(args.backend, args.mode)
    check_ubatch(args.ubatch, "--ubatch")
    check_dequant(args.dequant, "--dequant")
    check_kv(args)
    threads.check(args.threads)
    return seed


def run(args) -> int:
    from ..errors import RefinferError
    from ..model import EMPTY_PROMPT_HINT, load

    seed = check_args(args)
    prompt = args.prompt
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise RefinferError("no prompt given", hint=EMPTY_PROMPT_HINT + ", or pipe the prompt to standard input")
        prompt = sys.stdin.read()
    if not prompt:
        raise RefinferError("the prompt is empty", hint=EMPTY_PROMPT_HINT)
    threads.set_threads(args.threads)   # before Numba loads with the model's backend
    t0 = time.perf_counter()
    model = load(args.model, backend=args.backend, mode=args.mode, n_ubatch=args.ubatch, dequant=args.dequant,
                 a16=args.a16, **kv_kwargs(args))
    load_s = time.perf_counter() - t0
    stats = {}
    pieces = model.generate(prompt, max_tokens=args.n_predict, temperature=args.temp, top_k=args.top_k,
                            top_p=args.top_p, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                            repeat_last_n=args.repeat_last_n, seed=seed, stream=True, stop=args.stop, chat=args.chat, stats=stats)
    if not args.chat:   # the prompt has been tokenized and fits: nothing below raises on bad input
        sys.stdout.write(prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    n = stats.get("generated_tokens", 0)
    dec = stats.get("decode_s", 0.0)
    print(f"[{stats.get('prompt_tokens', 0)} prompt tokens in {stats.get('prefill_s', 0.0):.2f} s, "
          f"{n} generated tokens at {n / dec if dec > 0 else 0.0:.1f} tokens/s; "
          f"load {load_s:.1f} s; backend {model.backend.name}, mode {args.mode}, "
          f"KV {'/'.join(t.name for t in model.backend.kv_types())}"
          + (f", threads {args.threads}" if args.threads is not None else "") + f"; seed {seed}]", file=sys.stderr)
    return 0
