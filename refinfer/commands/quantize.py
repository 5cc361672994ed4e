"""`python -m refinfer quantize IN OUT --type q4_0`: the llama-quantize --pure equivalent."""

from __future__ import annotations

import sys

from ..quantize_model import FTYPES, quantize_model

HELP = "quantize an f32/f16/bf16 GGUF model to q4_0/q4_1/q5_0/q5_1/q8_0 (the bytes llama-quantize --pure writes)"


def add_arguments(p):
    p.add_argument("input", metavar="IN", help="f32, f16 or bf16 GGUF model, or an HF safetensors checkpoint directory")
    p.add_argument("output", metavar="OUT", help="quantized GGUF to write (replaced if it exists)")
    # Checked in run(), not by argparse choices, so that a wrong type gets the usual error + hint.
    p.add_argument("--type", required=True, metavar="TYPE",
                   help=f"block type for the 2-D weights: {', '.join(FTYPES)}; norms stay f32, and "
                        "weights whose row length is not a multiple of 32 become f16, as in llama.cpp")
    p.add_argument("--vocab-from", metavar="GGUF",
                   help="for an HF directory IN: a GGUF with the same vocabulary to copy tokenizer.* from (default: the directory's tokenizer.json or tokenizer.model)")


def run(args) -> int:
    r = quantize_model(args.input, args.output, args.type, vocab_from=args.vocab_from,
                       progress=sys.stderr.isatty())
    mb = 1024 * 1024
    print(f"wrote {args.output}: {r.n_quantized} tensors {r.qtype}, {r.n_copied} copied"
          + (f", {len(r.f16_fallback)} f16 (row length not a multiple of 32)" if r.f16_fallback else "")
          + f"; {r.bytes_in / mb:.2f} MiB -> {r.bytes_out / mb:.2f} MiB in {r.seconds:.2f} s")
    return 0
