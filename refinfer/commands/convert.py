"""`python -m refinfer convert IN OUT --type f16`: a float GGUF from any model refinfer reads.

Every quantized tensor is dequantized (ggml's dequantize_row_*) and stored as f32, f16 or bf16;
norms and other 1-D tensors stay f32, and the metadata and tokenizer are kept, with
general.file_type set to the new type. It is `quantize --type f16` under another name: the
output's bytes are those of llama.cpp's llama_model_quantize with ftype MOSTLY_F16 (ALL_F32,
MOSTLY_BF16) and pure set. An f32 conversion holds exactly the weights refinfer computes with.
"""

from __future__ import annotations

import sys

from ..quantize_model import FLOAT_TYPES, check_qtype, quantize_model
from .quantize import print_report

HELP = "dequantize a GGUF model (or convert an HF checkpoint) to an f32/f16/bf16 GGUF"


def add_arguments(p):
    p.add_argument("input", metavar="IN", help="GGUF model of any type refinfer reads, or an HF safetensors checkpoint directory")
    p.add_argument("output", metavar="OUT", help="GGUF to write (replaced if it exists)")
    p.add_argument("--type", required=True, metavar="TYPE",
                   help=f"type for the 2-D weights: {', '.join(FLOAT_TYPES)} (f32 keeps the dequantized weights exactly)")
    p.add_argument("--vocab-from", metavar="GGUF",
                   help="for an HF directory IN: a GGUF with the same vocabulary to copy tokenizer.* from")


def run(args) -> int:
    from ..errors import UnsupportedError
    from ..quantize_model import FTYPES
    if str(args.type).strip().lower() in FTYPES:
        raise UnsupportedError(f"--type: convert writes float types, not {args.type!r}",
                               hint=f"choose one of {', '.join(FLOAT_TYPES)}, or run "
                                    f"`python -m refinfer quantize IN OUT --type {args.type}`")
    qtype = check_qtype(args.type, choices=FLOAT_TYPES)
    r = quantize_model(args.input, args.output, qtype, vocab_from=args.vocab_from, progress=sys.stderr.isatty())
    print_report(args, r, "converted to " if not r.requantized else "dequantized to ")
    return 0
