"""`python -m refinfer calibrate-kv -m MODEL [--calib FILE] -o PARAMS.json`: the int8-calibrated
KV cache's parameters, as LMDeploy's calibrate + kv_qparams computed them (v0.2.0 .. 2025).

LMDeploy's KVCacheObserver recorded, per layer, the min and max of the key (after RoPE: the
past_key_value the attention module returns) and of the value over the calibration tokens;
kv_qparams._export_asym turned them into zp = (max + min) / 2, scale = (max - min) / 255.
Here K is the Kcur-N tap of the forward pass (after RoPE, what the cache stores) and V Vcur-N,
in ideal mode. The text is tokenized with BOS and cut into --chunks chunks of --ctx tokens,
each run from an empty cache with BOS first. --per-head keeps one (scale, zp) per layer and KV
head: a refinfer extension (LMDeploy kept one pair per layer and tensor-parallel shard).

The parameter file (JSON):
    format "refinfer-kv-params", version 1, granularity "layer" | "head", n_layers, n_kv_heads,
    head_dim, model {path, size, sha256}, calibration {text, tokens, chunks, ctx},
    layers [{k_min, k_max, k_scale, k_zp, v_min, v_max, v_scale, v_zp}]   (numbers; per head: lists)
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

HELP = "record per-layer K/V min/max over calibration text and write int8-calibrated's parameters (LMDeploy kv_qparams)"


def add_arguments(p):
    p.add_argument("-m", "--model", required=True, help="model (GGUF or HF directory), run in ideal mode")
    p.add_argument("--calib", metavar="FILE", default=None,
                   help="calibration text file (default: the shared c4 text, never the evaluation text)")
    p.add_argument("-o", "--output", default="kv-params.json", help="parameter file to write (default kv-params.json)")
    p.add_argument("--per-head", action="store_true",
                   help="one scale and zp per layer and KV head (a refinfer extension; LMDeploy: per layer)")
    p.add_argument("--chunks", type=int, default=8, help="at most this many chunks of text (default 8)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--backend", default=None, help="backend (default: the fastest available)")


class KVObserver:
    """The tap callback: per layer, the running min / max of K and V per KV head, and the token count."""

    def __init__(self, n_layers, n_kv_heads):
        inf = np.float32(np.inf)
        self.mins = {w: np.full((n_layers, n_kv_heads), inf, np.float32) for w in "kv"}
        self.maxs = {w: np.full((n_layers, n_kv_heads), -inf, np.float32) for w in "kv"}
        self.tokens = 0

    def __call__(self, name, value):
        kind, _, layer = name.partition("-")
        w = {"Kcur": "k", "Vcur": "v"}.get(kind)
        if w is None:
            return
        value = np.asarray(value, np.float32)                   # [N, n_kv_heads, head_dim]
        i = int(layer)
        np.minimum(self.mins[w][i], value.min(axis=(0, 2)), out=self.mins[w][i])
        np.maximum(self.maxs[w][i], value.max(axis=(0, 2)), out=self.maxs[w][i])
        if w == "k" and i == 0:
            self.tokens += len(value)


def _positive(value, option):
    from ..errors import RefinferError
    if value < 1:
        raise RefinferError(f"{option} {value}: must be at least 1", hint=f"give {option} a positive whole number")
    return value


def calibrate(model, text: str, *, n_chunks: int = 8, n_ctx: int = 512, per_head: bool = False,
              text_name: str = "", progress=None) -> dict:
    """The parameter file's contents for model over text (tokenized with BOS)."""
    from ..errors import RefinferError
    tokens = model.tokenize(text, add_special=True)
    if len(tokens) < 2:
        raise RefinferError(f"the calibration text {text_name!r} has {len(tokens)} tokens",
                            hint="give a longer --calib text")
    return calibrate_tokens(model, tokens, n_chunks=n_chunks, n_ctx=n_ctx, per_head=per_head,
                            text_name=text_name, progress=progress)


def calibrate_tokens(model, tokens, *, n_chunks: int = 8, n_ctx: int = 512, per_head: bool = False,
                     text_name: str = "", progress=None) -> dict:
    """The parameter file's contents for model over token ids: chunks of n_ctx, each from an
    empty cache with BOS first (when the model has a BOS token)."""
    from ..kv_lmdeploy import PARAMS_FORMAT, PARAMS_VERSION, asym_params, model_identity
    _positive(n_chunks, "--chunks")
    _positive(n_ctx, "--ctx")
    cfg = model.config
    tok = getattr(model, "tokenizer", None)
    bos = tok.bos_id if tok is not None else None
    chunks = [list(tokens[i:i + n_ctx]) for i in range(0, len(tokens), n_ctx)][:n_chunks]
    obs = KVObserver(cfg.n_layers, cfg.n_kv_heads)
    for c, chunk in enumerate(chunks):
        if bos is not None:
            chunk[0] = bos
        model.logits(chunk, tap=obs)
        if progress is not None:
            progress(c + 1, len(chunks))

    def stat(a):                            # [n_kv] -> a number (per layer) or a list (per head)
        return [float(v) for v in a] if per_head else float(a)

    layers = []
    for i in range(cfg.n_layers):
        L = {}
        for w in "kv":
            mn, mx = obs.mins[w][i], obs.maxs[w][i]
            if not per_head:
                mn, mx = mn.min(), mx.max()
            scale, zp = asym_params(mn, mx)
            L.update({f"{w}_min": stat(mn), f"{w}_max": stat(mx), f"{w}_scale": stat(scale), f"{w}_zp": stat(zp)})
        layers.append(L)
    return {"format": PARAMS_FORMAT, "version": PARAMS_VERSION,
            "granularity": "head" if per_head else "layer",
            "granularity_note": ("per-head parameters are a refinfer extension; LMDeploy's kv_qparams kept one "
                                 "(scale, zp) per layer") if per_head else "per layer, as LMDeploy's kv_qparams",
            "n_layers": cfg.n_layers, "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "model": model_identity(model.path),
            "calibration": {"text": text_name, "tokens": obs.tokens, "chunks": len(chunks), "ctx": n_ctx},
            "layers": layers}


def write_params(path, params: dict):
    from ..output_files import publish, temp_beside
    fd, tmp = temp_beside(os.fspath(path), prefix=".kv-params-", suffix=".json.part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(params, f, indent=1)
            f.write("\n")
        publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run(args) -> int:
    from .. import model as model_mod
    from ..errors import RefinferError
    from ..output_files import check_output_path
    check_output_path(args.output, "-o")
    _positive(args.chunks, "--chunks")
    _positive(args.ctx, "--ctx")
    if args.calib is None:
        from ..corpus import text as corpus_text
        text, name = corpus_text("c4"), "c4"
    else:
        try:
            with open(args.calib, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or str(e)
            raise RefinferError(f"--calib {args.calib!r}: {why}", hint="give a readable UTF-8 text file") from None
        name = args.calib
    m = model_mod.load(args.model, backend=args.backend, mode="ideal")

    def progress(i, n):
        if sys.stderr.isatty():
            print(f"\rcalibrate-kv: chunk {i}/{n}", end="" if i < n else "\n", file=sys.stderr)

    params = calibrate(m, text, n_chunks=args.chunks, n_ctx=args.ctx, per_head=args.per_head,
                       text_name=name, progress=progress)
    write_params(args.output, params)
    c = params["calibration"]
    print(f"wrote {args.output}: {params['granularity']} parameters of {params['n_layers']} layers from "
          f"{c['tokens']} tokens ({c['chunks']} chunks of up to {c['ctx']}) of {name}")
    return 0
