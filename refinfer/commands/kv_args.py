"""The KV cache options every command that runs a model takes (llama.cpp's names)."""

from __future__ import annotations

KV_HELP = ("KV cache type: f32, f16 (ggml mode's default), bf16, llama.cpp's q8_0 q4_0 q4_1 q5_0 q5_1, "
           "LMDeploy's lmdeploy-int8 lmdeploy-int4 lmdeploy-pt-int8 lmdeploy-pt-int4, int8-calibrated "
           "(with --kv-params), vLLM's fp8 fp8_e5m2; default: f32 in ideal mode, f16 in ggml mode")


def add_kv_arguments(p):
    g = p.add_argument_group("KV cache")
    g.add_argument("-ctk", "--cache-type-k", default=None, metavar="TYPE", help="K " + KV_HELP)
    g.add_argument("-ctv", "--cache-type-v", default=None, metavar="TYPE", help="V " + KV_HELP)
    g.add_argument("-fa", "--flash-attn", action="store_true",
                   help="ggml mode: llama.cpp's CPU flash-attention kernel (needed for a quantized V, as in llama.cpp)")
    g.add_argument("--kv-params", default=None, metavar="FILE",
                   help="parameters of an int8-calibrated cache (python -m refinfer calibrate-kv)")
    g.add_argument("--no-kv-rotation", action="store_true",
                   help="store llama.cpp's quantized cache types without its Hadamard rotation of Q/K/V "
                        "(llama.cpp: LLAMA_ATTN_ROT_DISABLE=1)")


def kv_kwargs(args) -> dict:
    """refinfer.load's KV keyword arguments from the parsed options."""
    return dict(cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v, flash_attn=bool(args.flash_attn),
                kv_params=args.kv_params, kv_rotation=not args.no_kv_rotation)


def check_kv(args):
    """The KV options checked before the model loads (unknown types, combinations llama.cpp or
    ggml mode refuses, a parameter file that does not read)."""
    from ..backends.numpy_backend import NumpyBackend
    from ..model import configure_kv
    configure_kv(NumpyBackend(mode=getattr(args, "mode", "ideal") or "ideal"), **kv_kwargs(args))


def source_kv(args) -> dict:
    """--cache-type-k/-v, --flash-attn, --kv-params, --no-kv-rotation as source defaults (parse_source's kv):
    None where the command line leaves them out, so that a spec's own options and variants stand."""
    return {"cache_type_k": args.cache_type_k, "cache_type_v": args.cache_type_v,
            "flash_attn": "1" if args.flash_attn else None, "kv_params": args.kv_params,
            "kv_rotation": "0" if args.no_kv_rotation else None}
