"""Whole-model quantization: RTN, GPTQ (AutoGPTQ 0.7.1's layer loop) or AWQ (AutoAWQ 0.2.9's),
then an HF checkpoint directory with config.json quantization_config.

Calibration: n_samples windows of seqlen tokens of the text (default: c4.utf8, exllamav2's
calibration file, refinfer/corpus.py), consecutive windows from the start, each a sequence of
its own. The forward pieces are refinfer's float32 NumPy ones (rmsnorm, RoPE, SwiGLU of
backends/numpy_backend.py, ideal mode), with BLAS float32 matmuls and a plain causal softmax:
a quantizer's working arithmetic, not the engine's.

GPTQ (AutoGPTQ modeling/_base.py BaseGPTQForCausalLM.quantize): per layer, per sub-list
(true-sequential: [k, v, q], [o], [up, gate], [down]; off: all seven at once), the layer runs on
every sample with the sub-lists quantized so far holding their fake-quantized weights; each
Linear of the sub-list accumulates its Hessian from its inputs (one add_batch per sample), then
fasterquant. The layer's outputs with every Linear quantized are the next layer's inputs.

AWQ (AwqQuantizer.quantize): per layer, inputs of every Linear from the UNQUANTIZED layer, which
also gives the next layer's inputs; scale search per group; apply_scale; clip search; fp16
pseudo-quantization.

Weights are in refinfer's orientation (llama.cpp's q/k row order); GPTQ and AWQ treat rows
independently, so the checkpoint's HF row order is a take_rows of the result.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import sys
import time

import numpy as np

from ..errors import RefinferError, UnsupportedError
from ..quant.intgroup import IntGroupTensor
from . import awq, gptq, rtn

METHODS = ("rtn", "gptq", "awq")
FORMATS = ("gptq", "gptq_v2", "awq", "compressed-tensors")
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# AutoGPTQ modeling/llama.py inside_layer_modules, in refinfer's names
TRUE_SEQUENTIAL = [["attn_k", "attn_v", "attn_q"], ["attn_output"], ["ffn_up", "ffn_gate"], ["ffn_down"]]
BITS = {"gptq": (2, 3, 4, 8), "gptq_v2": (2, 3, 4, 8), "awq": (4,), "compressed-tensors": (2, 3, 4, 5, 6, 7, 8)}


@dataclasses.dataclass
class Options:
    method: str = "gptq"
    fmt: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    damp: float = 0.01
    true_sequential: bool = True
    n_samples: int = 32
    seqlen: int = 512


def check_options(o: Options):
    if o.method not in METHODS:
        raise RefinferError(f"--method {o.method!r} is not one of {', '.join(METHODS)}", hint="choose rtn, gptq or awq")
    if o.fmt not in FORMATS:
        raise RefinferError(f"--format {o.fmt!r} is not one of {', '.join(FORMATS)}",
                            hint="gptq (v1 zeros, what AutoGPTQ writes), gptq_v2, awq (GEMM) or compressed-tensors")
    possible = ", ".join(f"{f}: bits {'/'.join(map(str, b))}" for f, b in BITS.items())
    if o.bits not in BITS[o.fmt]:
        raise RefinferError(f"--format {o.fmt} cannot store {o.bits}-bit codes", hint=f"possible: {possible}")
    if o.method == "awq" and o.fmt != "awq" and o.bits != 4:
        raise RefinferError(f"--method awq with {o.bits} bits", hint="AutoAWQ quantizes 4-bit only: --bits 4")
    if o.fmt == "awq" and (o.desc_act or o.static_groups):
        raise RefinferError("--format awq with --desc-act/--static-groups",
                            hint="AWQ's layout stores contiguous groups only: drop --desc-act, or use --format gptq")
    if o.group_size != -1 and o.group_size <= 0:
        raise RefinferError(f"--group-size {o.group_size}", hint="a positive group size, or -1 for one group per row")
    if o.fmt == "awq" and o.group_size == -1:
        raise RefinferError("--format awq with --group-size -1", hint="AWQ stores groups: e.g. --group-size 128")
    if o.n_samples < 1 or o.seqlen < 2:
        raise RefinferError(f"--calib-samples {o.n_samples}, --calib-seqlen {o.seqlen}",
                            hint="at least one sample of at least 2 tokens")


# -- float32 forward pieces ---------------------------------------------------------------------

class Layer:
    """One decoder layer's float32 weights (mutable: the quantizers replace them) and forward."""

    def __init__(self, cfg, L, be, rope_freqs):
        self.cfg, self.be, self.rope_freqs = cfg, be, rope_freqs
        self.attn_norm = np.asarray(L.attn_norm, np.float32)
        self.ffn_norm = np.asarray(L.ffn_norm, np.float32)
        self.w = {n: np.ascontiguousarray(getattr(L, n).dequantize(), np.float32) for n in LINEARS}
        self.bias = {n: getattr(L, n + "_bias", None) for n in ("attn_q", "attn_k", "attn_v")}

    def norm(self, x, weight):
        out = np.empty_like(x)
        self.be.rmsnorm(out, x, weight, self.cfg.norm_eps)
        return out

    def attention(self, h, w):
        """h [T, dim] of one sequence -> o_proj input [T, n_heads * head_dim]."""
        cfg, T = self.cfg, h.shape[0]
        hd = cfg.head_dim
        q, k, v = (h @ w[n].T for n in ("attn_q", "attn_k", "attn_v"))
        for n, a in (("attn_q", q), ("attn_k", k), ("attn_v", v)):
            if self.bias[n] is not None:
                a += self.bias[n]
        q3, k3, v3 = q.reshape(T, cfg.n_heads, hd), k.reshape(T, cfg.n_kv_heads, hd), v.reshape(T, cfg.n_kv_heads, hd)
        cos, sin = self.be.rope_cos_sin(np.arange(T), cfg, self.rope_freqs)
        self.be.rope(q3, cos, sin, cfg.rope_neox)
        self.be.rope(k3, cos, sin, cfg.rope_neox)
        rep = cfg.n_heads // cfg.n_kv_heads
        qh = np.ascontiguousarray(q3.transpose(1, 0, 2))                          # [H, T, hd]
        kh = np.repeat(k3.transpose(1, 0, 2), rep, axis=0)                          # [H, T, hd]
        vh = np.repeat(v3.transpose(1, 0, 2), rep, axis=0)
        s = np.matmul(qh, kh.transpose(0, 2, 1)) * np.float32(1 / np.sqrt(hd))     # [H, T, T] (batched BLAS)
        s += np.triu(np.full((T, T), -np.inf, np.float32), 1)
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        return np.matmul(s, vh).transpose(1, 0, 2).reshape(T, -1).astype(np.float32)

    def forward(self, x, w=None, taps=None):
        """x [T, dim] -> layer output; taps[name] receives each Linear's input."""
        w = self.w if w is None else w
        h = self.norm(x, self.attn_norm)
        att = self.attention(h, w)
        x1 = x + att @ w["attn_output"].T
        h2 = self.norm(x1, self.ffn_norm)
        gate, up = h2 @ w["ffn_gate"].T, h2 @ w["ffn_up"].T
        act = (gate / (1 + np.exp(-gate)) * up).astype(np.float32)
        if taps is not None:
            for n in ("attn_q", "attn_k", "attn_v"):
                taps(n, h)
            taps("attn_output", att)
            taps("ffn_gate", h2)
            taps("ffn_up", h2)
            taps("ffn_down", act)
        return (x1 + act @ w["ffn_down"].T).astype(np.float32)


# -- per-layer quantizers -----------------------------------------------------------------------

def _rtn(W, o: Options, name):
    if o.fmt == "awq":
        return rtn.awq_rtn(W, o.bits, o.group_size, zero_point=not o.sym, name=name)
    if o.fmt == "compressed-tensors":
        return rtn.ct_rtn(W, o.bits, o.group_size, o.sym, name=name)
    return rtn.gptq_rtn(W, o.bits, o.group_size, o.sym, name=name)


def gptq_layer(layer: Layer, xs: list, o: Options, prefix: str) -> tuple[dict, list]:
    """AutoGPTQ's per-layer loop. -> (IntGroupTensor per Linear, next layer's inputs)."""
    lists = TRUE_SEQUENTIAL if o.true_sequential else [list(LINEARS)]
    out = {}
    for names in lists:
        hs = {n: gptq.Hessian(layer.w[n].shape[1]) for n in names}
        for x in xs:
            layer.forward(x, taps=lambda n, a: hs[n].add_batch(a) if n in hs else None)
        for n in names:
            r = gptq.fasterquant(layer.w[n], hs[n].H, bits=o.bits, group_size=o.group_size, sym=o.sym,
                                 actorder=o.desc_act, static_groups=o.static_groups, percdamp=o.damp,
                                 name=f"{prefix}.{n}")
            out[n] = gptq.to_intgroup(r, bits=o.bits, group_size=o.group_size, sym=o.sym, actorder=o.desc_act,
                                      static_groups=o.static_groups, name=f"{prefix}.{n}")
            layer.w[n] = r.Q
    return out, [layer.forward(x) for x in xs]


def awq_layer(layer: Layer, xs: list, o: Options, prefix: str) -> tuple[dict, list]:
    """AutoAWQ's per-layer loop. -> (IntGroupTensor per Linear, next layer's inputs)."""
    feats = {n: [] for n in LINEARS}
    nxt = [layer.forward(x, taps=lambda n, a: feats[n].append(a)) for x in xs]   # unquantized layer
    X = {n: np.concatenate(v) for n, v in feats.items()}
    w, gs = dict(layer.w), o.group_size
    kw = dict(bits=o.bits, group_size=gs, zero_point=not o.sym)
    hs = feats["attn_q"]

    def attn_block(ws):
        wq = dict(w, attn_q=ws[0], attn_k=ws[1], attn_v=ws[2])
        return np.concatenate([layer.attention(h, wq) @ w["attn_output"].T for h in hs])

    def mlp_block(ws):
        h2 = X["ffn_gate"]
        g, u = h2 @ ws[0].T, h2 @ ws[1].T
        return (g / (1 + np.exp(-g)) * u) @ w["ffn_down"].T

    groups = [("attn_norm", ["attn_q", "attn_k", "attn_v"], attn_block)]
    if w["attn_v"].shape == w["attn_output"].shape:
        groups.append(("attn_v", ["attn_output"], lambda ws: X["attn_output"] @ ws[0].T))
    groups += [("ffn_norm", ["ffn_gate", "ffn_up"], mlp_block),
               ("ffn_up", ["ffn_down"], lambda ws: X["ffn_down"] @ ws[0].T)]
    found = [(prev, names, awq.search_best_scale(X[names[0]], [w[n] for n in names], block, **kw,
                                                 duo_scaling=True).scales)
             for prev, names, block in groups]
    for prev, names, s in found:                                  # apply_scale
        if prev == "attn_norm":
            layer.attn_norm = (layer.attn_norm / s).astype(np.float32)
        elif prev == "ffn_norm":
            layer.ffn_norm = (layer.ffn_norm / s).astype(np.float32)
        else:
            w[prev] = (w[prev] / s[:, None]).astype(np.float32)
        for n in names:
            w[n] = (w[n] * s[None, :]).astype(np.float32)
            X[n] = X[n] / s[None, :]
    out = {}
    for n in LINEARS:
        if n not in ("attn_q", "attn_k"):                         # AutoAWQ skips q_, k_ in the clip search
            w[n] = awq.apply_clip(w[n], awq.compute_best_clip(w[n], X[n], **kw).max_val)
        out[n] = awq.quantize_weight(w[n], **kw, name=f"{prefix}.{n}")
    layer.w = w
    return out, nxt


# -- the model ------------------------------------------------------------------------------------

def calibration(tok, text: str, n_samples: int, seqlen: int, source: str) -> list[np.ndarray]:
    ids = tok.encode(text, add_special=False)
    if len(ids) < n_samples * seqlen:
        n = len(ids) // seqlen
        if n < 1:
            raise RefinferError(f"calibration text {source!r} has {len(ids)} tokens, fewer than --calib-seqlen {seqlen}",
                                hint="give a longer --calib text or a smaller --calib-seqlen")
        print(f"note: {source} has {len(ids)} tokens: {n} samples of {seqlen} instead of {n_samples}", file=sys.stderr)
        n_samples = n
    return [np.asarray(ids[i * seqlen:(i + 1) * seqlen]) for i in range(n_samples)]


@dataclasses.dataclass
class Report:
    out: str
    n_layers: int
    seconds: float
    tensors: dict          # refinfer name -> IntGroupTensor


def _storable(W, o: Options, fmt: str):
    """None if fmt can store every Linear of W at o's bits and group size, else the reason
    (checkpoint.pack's own checks, run on one empty matrix of each shape)."""
    from ..quant.intgroup import from_weights
    from ..w4a16.checkpoint import pack
    for name, (N, K) in {f"blk.0.{n}": getattr(W.layers[0], n).shape for n in LINEARS}.items():
        gs = K if o.group_size == -1 else o.group_size
        if K % gs:
            return f"{name}: in_features {K} is not a multiple of the group size {gs}"
        G = K // gs
        t = from_weights(name, np.zeros((N, K)), np.ones((N, G)), np.full((N, G), 1 << (o.bits - 1)),
                         bits=o.bits, group_size=gs)
        try:
            pack(t, {"awq": "awq"}.get(fmt, fmt))
        except UnsupportedError as e:
            return str(e)
    return None


def check_storable(W, o: Options):
    """Before any work: the chosen format can hold every Linear of this model."""
    why = _storable(W, o, o.fmt)
    if why is not None:
        others = [f for f in FORMATS if f != o.fmt and o.bits in BITS[f] and _storable(W, o, f) is None]
        raise RefinferError(f"--format {o.fmt} cannot store this model: {why}",
                            hint=(f"formats that can: {', '.join(others)}" if others else
                                  "no format stores these shapes at these bits: try another --group-size"))


def quantize_model(src, out_dir, o: Options, *, calib_text: str | None = None, calib_source: str = "c4",
                   progress=True, write=True) -> Report:
    from ..backends.numpy_backend import NumpyBackend
    from ..model import load

    check_options(o)
    t0 = time.perf_counter()
    model = load(src, backend="numpy")
    cfg, W = model.config, model.weights
    check_storable(W, o)
    be = NumpyBackend("ideal")
    xs = []
    if o.method != "rtn":
        if calib_text is None:
            from ..corpus import text
            calib_text = text("c4")
        for ids in calibration(model.tokenizer, calib_text, o.n_samples, o.seqlen, calib_source):
            x = np.empty((len(ids), cfg.dim), np.float32)
            be.embed(x, W.token_embd, ids)
            xs.append(x)
    tensors = {}
    for i, L in enumerate(W.layers):
        layer = Layer(cfg, L, be, W.rope_freqs)
        prefix = f"blk.{i}"
        if o.method == "rtn":
            res = {n: _rtn(layer.w[n], o, f"{prefix}.{n}") for n in LINEARS}
        elif o.method == "gptq":
            res, xs = gptq_layer(layer, xs, o, prefix)
        else:
            res, xs = awq_layer(layer, xs, o, prefix)
            W.layers[i].attn_norm, W.layers[i].ffn_norm = layer.attn_norm, layer.ffn_norm
        for n, t in res.items():
            t.info.update(format=o.fmt)
            tensors[f"{prefix}.{n}.weight"] = t
        if progress:
            done = time.perf_counter() - t0
            eta = done / (i + 1) * (len(W.layers) - i - 1)
            print(f"\r{o.method}: layer {i + 1}/{len(W.layers)}, {done:.0f} s, ETA {eta:.0f} s", end="",
                  file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    if write:
        write_checkpoint(src, out_dir, model, tensors, o)
    return Report(str(out_dir), len(W.layers), time.perf_counter() - t0, tensors)


def write_checkpoint(src, out_dir, model, tensors: dict, o: Options):
    """The float parts as export_hf writes them, the quantized Linears packed for o.fmt, and
    config.json's quantization_config."""
    from ..export_hf import _write_json, _write_safetensors, export_hf, hf_tensor_name
    from ..loader import permute_qk_rows
    from ..w4a16.checkpoint import SAFETENSORS_DTYPES, pack, quantization_config

    cfg = model.config
    out = pathlib.Path(out_dir)
    srcp = pathlib.Path(src)
    if srcp.is_dir():
        out.mkdir(parents=True, exist_ok=True)
        for f in srcp.iterdir():
            if f.suffix in (".json", ".model", ".txt") and f.name != "model.safetensors.index.json":
                shutil.copy(f, out / f.name)
    else:
        export_hf(src, out)
    fmt = {"awq": "awq"}.get(o.fmt, o.fmt)
    arrays = {}
    Wt = model.weights
    for hf, arr in _float_parts(Wt, cfg, hf_tensor_name):
        # fp16, as AutoGPTQ and AutoAWQ save the model around the quantized layers (torch_dtype
        # float16); this rounds the embeddings and norms of a float32 source once
        arrays[hf] = np.ascontiguousarray(arr.astype(np.float16))
    for name, t in tensors.items():
        if cfg.arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            n_head = cfg.n_heads if ".attn_q." in name else cfg.n_kv_heads
            t = t.take_rows(np.argsort(permute_qk_rows(t.shape[0], n_head)))
        base = hf_tensor_name(name[:-len(".weight")] + ".weight")[:-len(".weight")]
        for suffix, a in pack(t, fmt).items():
            arrays[f"{base}.{suffix}"] = a
    specs = {k: (SAFETENSORS_DTYPES.get(a.dtype, "F32"), tuple(a.shape)) for k, a in arrays.items()}
    for p in out.glob("model*.safetensors"):
        p.unlink()
    _write_safetensors(out / "model.safetensors", specs, (arrays[k] for k in specs))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = quantization_config(fmt, o.bits, o.group_size, o.sym, o.desc_act,
                                                        o.static_groups, damp_percent=o.damp,
                                                        true_sequential=o.true_sequential)
    config["torch_dtype"] = "float16"
    _write_json(out / "config.json", config)


def _float_parts(Wt, cfg, hf_tensor_name):
    """(HF name, float32 array) of the unquantized tensors: embeddings, norms, lm_head."""
    yield hf_tensor_name("token_embd.weight"), np.ascontiguousarray(Wt.token_embd.dequantize(), np.float32)
    yield hf_tensor_name("output_norm.weight"), np.asarray(Wt.output_norm, np.float32)
    if Wt.output is not Wt.token_embd:
        yield hf_tensor_name("output.weight"), np.ascontiguousarray(Wt.output.dequantize(), np.float32)
    for i, L in enumerate(Wt.layers):
        yield hf_tensor_name(f"blk.{i}.attn_norm.weight"), np.asarray(L.attn_norm, np.float32)
        yield hf_tensor_name(f"blk.{i}.ffn_norm.weight"), np.asarray(L.ffn_norm, np.float32)
        for n in ("attn_q", "attn_k", "attn_v"):
            b = getattr(L, n + "_bias", None)
            if b is not None:
                yield hf_tensor_name(f"blk.{i}.{n}.bias"), np.asarray(b, np.float32)


__all__ = ["Options", "check_options", "quantize_model", "write_checkpoint", "METHODS", "FORMATS", "BITS",
           "UnsupportedError", "IntGroupTensor"]
