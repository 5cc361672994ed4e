"""python -m refinfer kld --base SRC --test SRC -f TEXT"""

from __future__ import annotations

import json

from .. import threads
from .kv_args import add_kv_arguments, source_kv
from .perplexity import add_ubatch_argument

HELP = "KL divergence, PPL ratio, RMS delta-p and same-top-p of test logits against base logits (llama-perplexity --kl-divergence)"

SOURCES = """SRC is one of
  MODEL.gguf | HF_DIR                         refinfer, ideal mode, numba backend
  refinfer[backend=numpy]:MODEL               the NumPy reference itself (slow: ~0.25 s a token on SmolLM2)
  refinfer[mode=ggml,backend=numba]:MODEL     refinfer with options (also ubatch=N; for GPTQ/AWQ/
                                              compressed-tensors dirs dequant=exact, a16=1)
  refinfer[cache_type_k=q8_0,cache_type_v=q8_0]:MODEL
                                              a quantized KV cache (also flash_attn=1 in ggml
                                              mode, kv_params=FILE, kv_rotation=0); the command's
                                              --cache-type-k/-v and --flash-attn set them for
                                              every --test source that sets none
  llama.cpp:MODEL.gguf                        llama.cpp through llama-cpp-python (default settings)
  llama.cpp[variant=flash_attn]:MODEL.gguf    variants: default, single_token, flash_attn, kv_f32;
                                              ubatch=N: tokens per llama_decode step (default 512);
                                              cache_type_k=, cache_type_v=, flash_attn=0|1
  logits:FILE.safetensors | FILE.safetensors  base logits saved with --save-base (float32), or a
                                              fixture's teacher-forced prompt logits
                                              (formats/fixtures/logits-*.safetensors: one chunk,
                                              every position scored)
  openai[vocab=MODEL,top=20]:URL | URL        an OpenAI-compatible completions endpoint (echo +
                                              logprobs): PPL and same-top exact, KLD approximate
                                              (only the top-k of each distribution is returned)"""


def add_arguments(p):
    p.epilog = SOURCES
    import argparse
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--base", required=True, metavar="SRC", help="the reference logits")
    p.add_argument("--test", action="append", default=[], metavar="SRC", help="logits to judge (repeatable)")
    p.add_argument("-f", "--file", default=None,
                   help="text file, or wiki / c4 (exllamav2 0.3.2's calibration texts); not needed when --base is a "
                        "saved logits file")
    p.add_argument("-c", "--ctx", type=int, default=None,
                   help="tokens per chunk, as llama-perplexity -c (default 512, or the saved base's)")
    p.add_argument("--chunks", type=int, default=None,
                   help="use only the first N chunks (default, or any negative N: all, as llama-perplexity)")
    p.add_argument("--save-base", metavar="FILE", default=None,
                   help="save the base logits (float32) for later runs, written to disk chunk by chunk")
    p.add_argument("--floor", nargs="?", const="", default=None, metavar="MODEL",
                   help="also measure llama.cpp's noise floor on MODEL (default: the base's model file): its "
                        "variants single_token, flash_attn and kv_f32 against its default, on the same chunks")
    p.add_argument("--json", metavar="FILE", default=None, help="write every statistic to FILE as JSON")
    add_ubatch_argument(p)
    add_kv_arguments(p)
    threads.add_argument(p, default_help="all cores for refinfer, 1 for llama.cpp sources")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _model_path(spec):
    from ..perplexity import SOURCE_SPEC
    m = SOURCE_SPEC.match(spec)
    return m.group(3) if m else spec


def _short(spec):
    """A source spec with the model's directory left out, for table rows."""
    import os
    from ..perplexity import SOURCE_SPEC
    m = SOURCE_SPEC.match(spec)
    if m is None:
        return os.path.basename(spec)
    opts = f"[{m.group(2)}]" if m.group(2) else ""
    return f"{m.group(1)}{opts}:{os.path.basename(m.group(3))}"


def _label(spec, src):
    """A table row's name: the spec, short, with its KV cache as kv=K/V (also where the command's
    -ctk/-ctv set it: the source's name has it then)."""
    import re
    short = _short(spec)
    k = re.search(r"cache_type_k=([^,\]]+)", src.name)
    v = re.search(r"cache_type_v=([^,\]]+)", src.name)
    short = re.sub(r"cache_type_k=[^,\]]+,?|cache_type_v=[^,\]]+,?", "", short).replace(",]", "]").replace("[]", "")
    if k or v:
        short += f" kv={k.group(1) if k else 'f16'}/{v.group(1) if v else 'f16'}"
    return short


def _row(name, r):
    return (f"{name:<46} {r['ppl_ratio']:9.5f} {r['ln_ppl_ratio']:+11.2e} {r['kld_mean']:10.3e} {r['kld_max']:10.3e} "
            f"{100 * r['rms_dp']:8.4f}% {100 * r['same_top']:8.3f}% {r['nmse']:10.3e}")


def run(args) -> int:
    from ..errors import RefinferError
    from ..perplexity import (LogitsFileSource, check_chunks, check_ctx, check_source_ctx, chunks_of, format_kld,
                              kl_divergence, parse_source)
    from ..output_files import check_distinct, check_output_path
    from ..model import check_ubatch
    from .perplexity import read_text

    if not args.test and args.floor is None:
        raise RefinferError("nothing to compare: give --test SRC and/or --floor",
                            hint="e.g. --test MODEL.gguf, or --floor to measure llama.cpp's own spread")
    if args.ctx is not None:
        check_ctx(args.ctx)
    check_chunks(args.chunks)
    check_ubatch(args.ubatch, "--ubatch")
    threads.check(args.threads)
    check_output_path(args.json, "--json")
    check_output_path(args.save_base, "--save-base")
    check_distinct({"--json": args.json, "--save-base": args.save_base})
    if args.save_base is not None and not args.test:
        raise RefinferError("--save-base saves the base logits of a --test run", hint="add --test SRC")
    threads.set_threads(args.threads)
    n_llama = threads.llama_cpp_threads(args.threads)
    n_ctx = 512 if args.ctx is None else args.ctx
    base = parse_source(args.base, n_ctx=n_ctx, n_threads=n_llama, n_ubatch=args.ubatch)
    opened = [base]
    try:
        if isinstance(base, LogitsFileSource):
            if args.save_base is not None:
                raise RefinferError(f"--base {args.base} is already a saved logits file", hint="leave out --save-base")
            tokens, n_ctx = [int(t) for t in base.tokens], base.n_ctx
            if args.ctx not in (None, n_ctx):
                raise RefinferError(f"{args.base} holds chunks of {n_ctx} tokens, not -c {args.ctx}",
                                    hint=f"leave out -c (or give -c {n_ctx})")
            if args.floor is not None and base.first == 0:
                raise RefinferError(f"--floor runs llama.cpp on chunks of a text; {args.base} holds one prompt",
                                    hint="measure the floor with a model as --base and -f TEXT")
        else:
            if args.file is None:
                raise RefinferError("-f TEXT is needed unless --base is a saved logits file",
                                    hint="e.g. -f README.md, or --base FILE.safetensors from an earlier --save-base")
            check_source_ctx(base, n_ctx)
            tokens = base.tokenize(read_text(args.file))
        _, first = chunks_of(base, tokens, n_ctx)   # a text too short for -c fails here, before any model runs
        tests = []
        for s in args.test:
            tests.append(parse_source(s, n_ctx=n_ctx, n_threads=n_llama, n_ubatch=args.ubatch, kv=source_kv(args)))
            opened.append(tests[-1])
            check_source_ctx(tests[-1], n_ctx)
        for t in tests:
            if t.n_vocab != base.n_vocab:
                raise RefinferError(f"{t.name} has {t.n_vocab} tokens in its vocabulary, the base {base.n_vocab}",
                                    hint="KL divergence compares models that share a tokenizer")
        progress = not args.no_progress
        results = kl_divergence(base, tests, tokens, n_ctx, args.chunks, progress, args.save_base) if tests else []
        floor = {}
        if args.floor is not None:
            model = args.floor or _model_path(args.base)
            if isinstance(base, LogitsFileSource) and not args.floor:
                raise RefinferError("--floor needs a MODEL when the base is a logits file",
                                    hint="--floor MODEL.gguf: the GGUF the base logits came from")
            fbase = parse_source(f"llama.cpp:{model}", n_ctx=n_ctx, n_threads=n_llama)
            opened.append(fbase)
            variants = [parse_source(f"llama.cpp[variant={v}]:{model}", n_ctx=n_ctx, n_threads=n_llama)
                        for v in ("single_token", "flash_attn", "kv_f32")]
            opened += variants
            floor = dict(zip((v.name for v in variants), kl_divergence(fbase, variants, tokens, n_ctx, args.chunks, progress)))
    finally:
        for s in opened:
            s.close()

    scored = "second half of each chunk" if first == n_ctx // 2 else "every position of the prompt"
    n_scored = results[0]["n"] if results else next(iter(floor.values()))["n"]
    print(f"base: {base.name}\n{len(tokens)} tokens, chunks of {n_ctx}, {n_scored} scored positions ({scored})")
    for t, r in zip(tests, results):
        print(f"\n### test: {t.name}")
        print(format_kld(r))
    if floor or len(results) > 1:
        print(f"\n{'source':<46} {'PPL ratio':>9} {'ln ratio':>11} {'mean KLD':>10} {'max KLD':>10} "
              f"{'RMS dp':>9} {'same top':>9} {'NMSE':>10}")
        for spec, t, r in zip(args.test, tests, results):
            print(_row(_label(spec, t)[:46], r))
        if floor:
            print("llama.cpp's noise floor (each variant against llama.cpp's default):")
            for name, r in floor.items():
                print(_row("  " + name.split("]")[0].replace("llama.cpp[variant=", ""), r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"base": base.name, "n_ctx": n_ctx, "tests": dict(zip(args.test, results)), "floor": floor},
                      f, indent=1)
    return 0
