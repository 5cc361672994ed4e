"""`python -m refinfer imatrix -m MODEL -f TEXT -o FILE`: llama-imatrix's importance matrix."""

from __future__ import annotations

import sys
import time

from .kv_args import add_kv_arguments, check_kv, kv_kwargs

HELP = "compute an importance matrix for `quantize --imatrix` (what llama-imatrix computes and writes)"


def add_arguments(p):
    p.add_argument("-m", "--model", required=True, help="model (GGUF or HF directory), run in ggml mode")
    p.add_argument("-f", "--file", required=True, metavar="TEXT", help="calibration text file")
    p.add_argument("-o", "--output", default="imatrix.gguf", help="imatrix GGUF to write (default imatrix.gguf)")
    p.add_argument("-c", "--ctx-size", type=int, default=512, help="tokens per chunk (default 512, as llama-imatrix)")
    p.add_argument("--chunks", type=int, default=-1, help="at most this many chunks (default: all)")
    p.add_argument("--process-output", action="store_true", help="collect output.weight too")
    p.add_argument("--backend", default=None, help="backend (default: the fastest available)")
    add_kv_arguments(p)                   # llama-imatrix's -ctk/-ctv/-fa: the cache its activations pass through


def run(args) -> int:
    from .. import model as model_mod
    from ..errors import RefinferError
    from ..imatrix import compute_imatrix, write_imatrix
    from ..output_files import check_output_path
    check_output_path(args.output, "-o")
    args.mode = "ggml"
    check_kv(args)
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise RefinferError(f"-f {args.file!r}: {e.strerror}", hint="give a readable UTF-8 text file") from None
    m = model_mod.load(args.model, backend=args.backend, mode="ggml", **kv_kwargs(args))
    start = time.perf_counter()

    def progress(i, n):
        if sys.stderr.isatty():
            print(f"\rimatrix: chunk {i}/{n}", end="" if i < n else "\n", file=sys.stderr)

    im = compute_imatrix(m, text, args.ctx_size, n_chunks=args.chunks, dataset=args.file,
                         process_output=args.process_output, progress=progress)
    write_imatrix(args.output, im)
    print(f"wrote {args.output}: {len(im.sums)} entries, {im.chunk_count} chunks of {args.ctx_size} tokens "
          f"in {time.perf_counter() - start:.1f} s")
    return 0
