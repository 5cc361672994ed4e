"""HF transformers as a second oracle: the tensors of refinfer's dumps (dump.py's names and shapes)
from transformers' own forward pass, in float32 on the CPU, teacher-forced over a token list.

    logits, tensors = capture_transformers("path/to/hf-dir", tokens)

Where each tensor comes from (layer i = model.model.layers[i]):

    inp_embd        embed_tokens output               forward hook
    attn_norm-i     input_layernorm output            forward hook
    Qcur-i, Kcur-i  query/key after RoPE              the attention function (below)
    Vcur-i          value                             the attention function
    kq-i            query @ key^T, before the scale   the attention function
    kqv_out-i       eager attention's output          the attention function
    attn_out-i      self_attn.o_proj output           forward hook
    ffn_inp-i       post_attention_layernorm input    forward pre-hook
    ffn_norm-i      post_attention_layernorm output   forward hook
    ffn_swiglu-i    mlp.down_proj input               forward pre-hook
    ffn_out-i       mlp output                        forward hook
    l_out-i         decoder layer output              forward hook
    result_norm     model.norm output                 forward hook
    result_output   the logits                        the model's output

Post-RoPE q/k, the raw scores and the attention output before o_proj are no module's output:
they exist only inside the attention function. So the model is loaded with an attention
implementation of our own, registered with transformers' AttentionInterface: it records q, k
and v as transformers passes them, computes kq as eager attention does (repeat_kv, then
query @ key^T) and then calls the model's own eager_attention_forward, whose output it records.
The causal mask transformers builds for it is eager attention's (registered with
AttentionMaskInterface under the same name): without one, transformers gives a custom
attention function no mask at all.

Layout: for arch llama, llama.cpp's converter permutes the q/k rows of each head so that RoPE
rotates adjacent pairs, and refinfer's loader does the same to HF checkpoints
(loader.permute_qk_rows). transformers rotates halves (rotate_half). Qcur/Kcur of a llama
model are put in llama.cpp's order here with the same permutation, so they compare element by
element with refinfer's and llama.cpp's dumps. kq does not depend on that order.

torch and transformers are imported only when a capture runs (they are test and comparison
oracles; the engine never imports this module).
"""

from __future__ import annotations

import fnmatch
import json
import pathlib
import sys

import numpy as np

from .errors import FormatError, RefinferError
from .loader import permute_qk_rows

ATTN_IMPLEMENTATION = "refinfer_capture"
ORACLE_HINT = ('install the oracles: pip install torch==2.13.0 transformers==5.23.0 (or pip install -e ".[test]"); '
               "torch must be the exact version, a looser pin pulls a multi-GB CUDA build")
LLAMA_TYPES = ("llama", "mistral")   # model_type values refinfer reads as arch llama (config.config_from_hf)


def _import_oracles():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise RefinferError(f"HF transformers comparison needs torch and transformers: {e}", hint=ORACLE_HINT) from None
    return torch, transformers


def _capturing_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """An attention function for AttentionInterface: transformers' eager attention, with q, k, v
    (after RoPE), the raw scores and the output recorded through module._refinfer_tap."""
    eager = sys.modules[type(module).__module__].eager_attention_forward   # the model's own eager attention
    tap = getattr(module, "_refinfer_tap", None)
    out, weights = eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if tap is not None:
        import torch
        i = module.layer_idx
        tap(f"Qcur-{i}", lambda: query[0].transpose(0, 1))                  # [heads, T, hd] -> [T, heads, hd]
        tap(f"Kcur-{i}", lambda: key[0].transpose(0, 1))                    # [T, n_kv, hd]
        tap(f"Vcur-{i}", lambda: value[0].transpose(0, 1))
        # eager_attention_forward's first product, before `* scaling` and the mask
        group = module.num_key_value_groups
        tap(f"kq-{i}", lambda: torch.matmul(query, torch.repeat_interleave(key, group, dim=1).transpose(2, 3))[0])
        tap(f"kqv_out-{i}", lambda: out[0].reshape(out.shape[1], -1))      # [T, heads * hd]
    return out, weights


def register_attention():
    """Register the capturing attention function and eager attention's mask under
    ATTN_IMPLEMENTATION (idempotent)."""
    _, transformers = _import_oracles()
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    transformers.AttentionInterface.register(ATTN_IMPLEMENTATION, _capturing_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    return ATTN_IMPLEMENTATION


def read_hf_config(model_dir) -> dict:
    path = pathlib.Path(model_dir) / "config.json"
    if not pathlib.Path(model_dir).is_dir():
        raise RefinferError(f"{str(model_dir)!r} is not a directory",
                            hint="pass an HF checkpoint directory (config.json and model*.safetensors); "
                                 "`python -m refinfer export-hf MODEL.gguf DIR` makes one from a GGUF")
    try:
        cfg = json.loads(path.read_text())
    except OSError as e:
        raise RefinferError(f"cannot read {path}: {e.strerror}",
                            hint="an HF checkpoint directory has config.json beside model*.safetensors") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"config.json is not JSON: {e}", file=str(path), hint="write the checkpoint again") from None
    if not isinstance(cfg, dict):
        raise FormatError("config.json is not a JSON object", file=str(path), hint="write the checkpoint again")
    return cfg


def load_transformers(model_dir):
    """The checkpoint as a transformers model in float32 on the CPU, with the capturing
    attention (offline: only files in model_dir are read)."""
    torch, transformers = _import_oracles()
    read_hf_config(model_dir)
    name = register_attention()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32, attn_implementation=name, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise RefinferError(f"transformers cannot load {str(model_dir)!r}: {type(e).__name__}: {str(e)[:500]}",
                            hint="the directory needs config.json and model.safetensors of a LlamaForCausalLM "
                                 "or Qwen2ForCausalLM checkpoint") from None
    return model.eval()


def capture_transformers(model_dir, tokens, *, skip=(), model=None, position_ids=None):
    """(logits float32[T, vocab], {dump name: float32 array}) of one teacher-forced forward pass
    of transformers over tokens, leaving out names matching a glob in skip (kq-N is T x T per
    head). model: one load_transformers(model_dir) already made (loading is the slow part);
    position_ids: positions of the tokens (default 0 .. T-1), to look at RoPE far out without a
    long prompt."""
    torch, _ = _import_oracles()
    cfg = read_hf_config(model_dir)
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    vocab = int(cfg.get("vocab_size", 0))
    if len(tokens) == 0:
        raise RefinferError("no tokens to run", hint="give at least one token id")
    bad = tokens[(tokens < 0) | (tokens >= vocab)]
    if len(bad):
        raise RefinferError(f"token id {int(bad[0])} outside the vocabulary [0, {vocab}) of {model_dir}/config.json",
                            hint="token ids come from this model's tokenizer")
    model = load_transformers(model_dir) if model is None else model
    llama_order = cfg.get("model_type") in LLAMA_TYPES
    out = {}

    def tap(name, get):
        if any(fnmatch.fnmatchcase(name, pat) for pat in skip):
            return
        t = get()
        a = np.array(t.detach().to(torch.float32).numpy(), dtype=np.float32)
        if a.ndim == 3 and a.shape[0] == 1 and not name.startswith(("kq-", "Qcur-", "Kcur-", "Vcur-")):
            a = a[0]                                                        # [1, T, n] -> [T, n]
        if llama_order and name.startswith(("Qcur-", "Kcur-")):
            T, H, hd = a.shape
            a = a.reshape(T, H * hd)[:, permute_qk_rows(H * hd, H)].reshape(T, H, hd)
        out[name] = np.ascontiguousarray(a)

    def output_hook(name):
        return lambda module, args, result: tap(name, lambda: result[0] if isinstance(result, tuple) else result)

    def input_hook(name):
        return lambda module, args: tap(name, lambda: args[0])

    base = model.model
    handles = [base.embed_tokens.register_forward_hook(output_hook("inp_embd")),
               base.norm.register_forward_hook(output_hook("result_norm"))]
    for i, layer in enumerate(base.layers):
        layer.self_attn._refinfer_tap = tap
        handles += [
            layer.input_layernorm.register_forward_hook(output_hook(f"attn_norm-{i}")),
            layer.self_attn.o_proj.register_forward_hook(output_hook(f"attn_out-{i}")),
            layer.post_attention_layernorm.register_forward_pre_hook(input_hook(f"ffn_inp-{i}")),
            layer.post_attention_layernorm.register_forward_hook(output_hook(f"ffn_norm-{i}")),
            layer.mlp.down_proj.register_forward_pre_hook(input_hook(f"ffn_swiglu-{i}")),
            layer.mlp.register_forward_hook(output_hook(f"ffn_out-{i}")),
            layer.register_forward_hook(output_hook(f"l_out-{i}")),
        ]
    kw = {}
    if position_ids is not None:
        pos = np.asarray(position_ids, dtype=np.int64).reshape(-1)
        if pos.shape != tokens.shape:
            raise RefinferError(f"{len(pos)} position ids for {len(tokens)} tokens", hint="give one position per token")
        kw["position_ids"] = torch.from_numpy(pos)[None]
    try:
        with torch.inference_mode():
            logits = model(input_ids=torch.from_numpy(tokens)[None], use_cache=False, **kw).logits
    finally:
        for h in handles:
            h.remove()
        for layer in base.layers:
            layer.self_attn._refinfer_tap = None
    logits = np.ascontiguousarray(logits[0].to(torch.float32).numpy(), dtype=np.float32)
    if not any(fnmatch.fnmatchcase("result_output", pat) for pat in skip):
        out["result_output"] = logits
    return logits, out
