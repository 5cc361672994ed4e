"""`python -m refinfer export-hf GGUF DIR`: a GGUF model as an HF checkpoint directory
(config.json, model.safetensors, tokenizer files, generation_config.json) that transformers
loads with from_pretrained and refinfer.load reads; the weights dequantized to float32 by
default, q/k rows put back in HF's order (refinfer/export_hf.py)."""

from __future__ import annotations

import sys

HELP = "write a GGUF model as an HF transformers checkpoint directory (float32 weights by default)"


def add_arguments(p):
    from ..export_hf import DTYPES
    p.add_argument("input", metavar="GGUF", help="GGUF model (llama or qwen2, any type refinfer reads)")
    p.add_argument("output", metavar="DIR", help="directory to write (created if missing; its checkpoint files replaced)")
    p.add_argument("--dtype", default="float32", metavar="DTYPE",
                   help=f"weight dtype: {', '.join(DTYPES)} (default float32: the dequantized weights exactly)")


def run(args) -> int:
    import time
    from ..export_hf import export_hf
    t0 = time.perf_counter()
    r = export_hf(args.input, args.output, dtype=args.dtype, progress=sys.stderr.isatty())
    mb = 1024 * 1024
    types = ", ".join(f"{n} {t}" for t, n in sorted(r.source_types.items()))
    print(f"wrote {r.out_dir}: {r.arch}, {r.n_tensors} tensors ({types}) as {r.dtype}, "
          f"{r.bytes_out / mb:.2f} MiB; {', '.join(['config.json', 'generation_config.json'] + r.tokenizer_files)} "
          f"in {time.perf_counter() - t0:.2f} s")
    return 0
