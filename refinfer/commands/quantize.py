"""`python -m refinfer quantize IN OUT --type q4_0|Q4_K_M|...`: what llama-quantize writes; with
`--method rtn|gptq|awq`: a GPTQ, AWQ or compressed-tensors checkpoint (refinfer/methods/)."""

from __future__ import annotations

import argparse
import sys

from ..quantize_model import ALL_FTYPES, FLOAT_TYPES, quantize_model

HELP = ("quantize a model to a GGUF type or llama-quantize preset (the bytes llama-quantize writes, "
        "--imatrix included), or with --method rtn/gptq/awq to a GPTQ, AWQ or compressed-tensors checkpoint")


def add_arguments(p):
    p.add_argument("input", metavar="IN", help="GGUF model (f32, f16, bf16, or quantized: it is dequantized first), "
                                               "or an HF safetensors checkpoint directory")
    p.add_argument("output", metavar="OUT", help="GGUF to write (replaced if it exists); with --method, the checkpoint directory to write")
    # Checked in run(), not by argparse choices, so that a wrong type gets the usual error + hint.
    p.add_argument("--type", metavar="TYPE",
                   help=f"type for the 2-D weights: {', '.join(ALL_FTYPES)}; norms stay f32, and "
                        "weights whose row length is not a multiple of 32 become f16, as in llama.cpp")
    p.add_argument("--pure", action=argparse.BooleanOptionalAction, default=None,
                   help="--pure: every 2-D weight in the type (llama-quantize --pure); --no-pure: llama-quantize's "
                        "per-tensor rules (output.weight q6_K, some attn_v/ffn_down with more bits). Default: "
                        "--no-pure for the K-quant presets (Q2_K .. Q6_K), --pure for q4_0 .. q8_0 and f32/f16/bf16")
    p.add_argument("--imatrix", metavar="FILE",
                   help="importance matrix (llama-imatrix's GGUF or legacy .dat, or `refinfer imatrix`'s) for "
                        "ggml's importance-weighted quantizers")
    m = p.add_argument_group("W4A16 methods (--method: an HF checkpoint directory OUT instead of a GGUF)")
    m.add_argument("--method", metavar="METHOD", help="rtn, gptq (AutoGPTQ 0.7.1's) or awq (AutoAWQ 0.2.9's)")
    m.add_argument("--format", dest="w_format", default=None, metavar="FMT",
                   help="gptq (v1 zeros, AutoGPTQ's), gptq_v2, awq (GEMM, 4-bit), compressed-tensors (pack-quantized); "
                        "default: awq for --method awq, else gptq")
    m.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8 (gptq); 4 (awq); 2..8 (compressed-tensors)")
    m.add_argument("--group-size", type=int, default=128, help="columns per group; -1: one group per row")
    m.add_argument("--sym", dest="sym", action="store_true", default=None,
                   help="symmetric (the default of gptq and rtn, AutoGPTQ's sym=True)")
    m.add_argument("--asym", dest="sym", action="store_false",
                   help="asymmetric: a zero point per group (the default of awq, AutoAWQ's zero_point=True)")
    m.add_argument("--desc-act", action="store_true", help="GPTQ act-order: columns by decreasing Hessian diagonal")
    m.add_argument("--static-groups", action="store_true", help="GPTQ: group parameters from the unquantized weights")
    m.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, a fraction of mean(diag H)")
    m.add_argument("--no-true-sequential", dest="true_sequential", action="store_false",
                   help="GPTQ: all seven Linears of a layer from the unquantized layer's inputs")
    m.add_argument("--calib", metavar="FILE", help="calibration text (default: c4.utf8 of exllamav2's calibration files)")
    m.add_argument("--calib-samples", type=int, default=32, help="sequences of calibration text (default 32)")
    m.add_argument("--calib-seqlen", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--vocab-from", metavar="GGUF",
                   help="for an HF directory IN: a GGUF with the same vocabulary to copy tokenizer.* from (default: the directory's tokenizer.json or tokenizer.model)")


def print_report(args, r, verb: str):
    mb = 1024 * 1024
    source = f" (from {', '.join(r.requantized)})" if r.requantized else ""
    print(f"wrote {args.output}: {r.n_quantized} tensors {verb}{r.qtype}{source}, {r.n_copied} copied"
          + (f", {len(r.f16_fallback)} f16 (row length not a multiple of 32)" if r.f16_fallback else "")
          + f"; {r.bytes_in / mb:.2f} MiB -> {r.bytes_out / mb:.2f} MiB in {r.seconds:.2f} s")


def run_method(args) -> int:
    import pathlib
    from ..errors import RefinferError
    from ..methods.pipeline import Options, check_options
    from ..methods.pipeline import quantize_model as quantize_w4a16
    # AutoGPTQ's defaults (sym=True) for gptq and rtn, AutoAWQ's (zero_point=True: asymmetric, GEMM) for awq
    fmt = args.w_format or ("awq" if args.method == "awq" else "gptq")
    sym = args.sym if args.sym is not None else args.method != "awq"
    o = Options(method=args.method, fmt=fmt, bits=args.bits, group_size=args.group_size, sym=sym,
                desc_act=args.desc_act, static_groups=args.static_groups, damp=args.damp,
                true_sequential=args.true_sequential, n_samples=args.calib_samples, seqlen=args.calib_seqlen)
    check_options(o)
    text, source = None, "c4"
    if args.calib:
        try:
            text, source = pathlib.Path(args.calib).read_text(encoding="utf-8"), args.calib
        except (OSError, UnicodeDecodeError) as e:
            raise RefinferError(f"--calib {args.calib!r}: {e}", hint="give a UTF-8 text file") from None
    r = quantize_w4a16(args.input, args.output, o, calib_text=text, calib_source=source, progress=True)
    print(f"wrote {args.output}: {len(r.tensors)} Linears {o.method} {o.bits}-bit group {o.group_size} "
          f"{'sym' if o.sym else 'asym'} as {o.fmt}, {r.n_layers} layers in {r.seconds:.1f} s")
    return 0


def run(args) -> int:
    if getattr(args, "method", None):
        return run_method(args)
    if args.type is None:
        from ..errors import RefinferError
        raise RefinferError("quantize needs --type TYPE (a GGUF) or --method METHOD (an HF W4A16 checkpoint)",
                            hint="e.g. --type q4_0, or --method gptq --bits 4 --group-size 128")
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
