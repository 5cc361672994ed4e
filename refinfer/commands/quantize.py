"""`python -m refinfer quantize IN OUT --type q4_0`: the llama-quantize --pure equivalent."""

from __future__ import annotations

import argparse
import sys

from ..quantize_model import ALL_FTYPES, FLOAT_TYPES, quantize_model

HELP = ("quantize a GGUF model to q4_0/q4_1/q5_0/q5_1/q8_0, or convert it to f32/f16/bf16 "
        "(the bytes llama-quantize --pure writes)")


def add_arguments(p):
    p.add_argument("input", metavar="IN", help="GGUF model (f32, f16, bf16, or quantized: it is dequantized first), "
                                               "or an HF safetensors checkpoint directory")
    p.add_argument("output", metavar="OUT", help="GGUF to write (replaced if it exists)")
    # Checked in run(), not by argparse choices, so that a wrong type gets the usual error + hint.
    p.add_argument("--type", required=True, metavar="TYPE",
                   help=f"type for the 2-D weights: {', '.join(ALL_FTYPES)}; norms stay f32, and "
                        "weights whose row length is not a multiple of 32 become f16, as in llama.cpp")
    p.add_argument("--pure", action=argparse.BooleanOptionalAction, default=None,
                   help="--pure: every 2-D weight in the type (llama-quantize --pure); --no-pure: llama-quantize's "
                        "per-tensor rules (output.weight q6_K, some attn_v/ffn_down with more bits). Default: "
                        "--no-pure for the K-quant presets (Q2_K .. Q6_K), --pure for q4_0 .. q8_0 and f32/f16/bf16")
    p.add_argument("--imatrix", metavar="FILE",
                   help="importance matrix (llama-imatrix's GGUF or legacy .dat, or `refinfer imatrix`'s) for "
                        "ggml's importance-weighted quantizers")
    p.add_argument("--vocab-from", metavar="GGUF",
                   help="for an HF directory IN: a GGUF with the same vocabulary to copy tokenizer.* from (default: the directory's tokenizer.json or tokenizer.model)")


def print_report(args, r, verb: str):
    mb = 1024 * 1024
    source = f" (from {', '.join(r.requantized)})" if r.requantized else ""
    print(f"wrote {args.output}: {r.n_quantized} tensors {verb}{r.qtype}{source}, {r.n_copied} copied"
          + (f", {len(r.f16_fallback)} f16 (row length not a multiple of 32)" if r.f16_fallback else "")
          + f"; {r.bytes_in / mb:.2f} MiB -> {r.bytes_out / mb:.2f} MiB in {r.seconds:.2f} s")


def run(args) -> int:
    r = quantize_model(args.input, args.output, args.type, vocab_from=args.vocab_from,
                       progress=sys.stderr.isatty(), pure=getattr(args, "pure", None),
                       imatrix=getattr(args, "imatrix", None))
    print_report(args, r, "")
    if len(r.types) > 2 or r.imatrix_used:
        print("types: " + ", ".join(f"{t} {n}" for t, n in sorted(r.types.items()))
              + (f"; importance-weighted: {len(r.imatrix_used)} tensors"
                 + (f", no imatrix entry: {len(r.imatrix_missing)}" if r.imatrix_missing else "")
                 if r.imatrix_used or r.imatrix_missing else ""))
    if r.requantized and r.qtype not in FLOAT_TYPES:
        print(f"note: the input was already quantized ({', '.join(r.requantized)}); its weights were "
              f"dequantized and quantized again to {r.qtype}, which compounds the rounding error of both. "
              "Quantize from the original f32/f16/bf16 model where you have it.", file=sys.stderr)
    return 0
