"""The forward pass of a Llama-family transformer, written once for every backend and mode.

    x = embed(tokens)
    for each layer:
        x = x + attention(rmsnorm(x) ; RoPE on q, k ; KV cache)
        x = x + ffn_down(silu(ffn_gate(rmsnorm(x))) * ffn_up(rmsnorm(x)))
    logits = output(rmsnorm(x))

`tap(name, array)` receives every intermediate under llama.cpp's eval-callback names
(inp_embd, attn_norm-N, Qcur-N, ..., result_output) for dumps and first-divergence search.
"""

from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .errors import RefinferError
from .weights import Weights


class KVCache:
    def __init__(self, cfg: ModelConfig, max_len: int, dtype=np.float32):
        shape = (cfg.n_layers, max_len, cfg.n_kv_heads, cfg.head_dim)
        self.k = np.zeros(shape, dtype=dtype)  # [layer, position, kv_head, head_dim]
        self.v = np.zeros(shape, dtype=dtype)
        self.max_len = max_len
        self.pos = 0                           # positions filled so far

    def truncate(self, n: int):
        """Forget positions >= n (reuse a shared prompt prefix)."""
        self.pos = min(self.pos, n)


def _no_tap(name, value):
    pass


def forward(cfg: ModelConfig, w: Weights, be, tokens, cache: KVCache, *, all_logits=True, tap=_no_tap):
    """Run tokens[T] at positions cache.pos .. cache.pos + T - 1; returns logits float32
    [T, vocab] (or [1, vocab] for the last position when all_logits is False)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    T, pos0 = len(tokens), cache.pos
    if T == 0:
        raise RefinferError("forward needs at least one token")
    if pos0 + T > cache.max_len:
        raise RefinferError(f"context overflow: {pos0} cached + {T} new tokens > context length {cache.max_len}",
                            hint="use a larger --ctx or a shorter prompt")
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise RefinferError(f"token id out of range [0, {cfg.vocab_size}): {int(tokens.max() if tokens.max() >= cfg.vocab_size else tokens.min())}",
                            hint="token ids come from this model's tokenizer (Model.tokenize)")
    dt = be.dtype
    hd, n_heads, n_kv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads

    x = np.empty((T, cfg.dim), dtype=dt)                                   # residual stream
    h = np.empty((T, cfg.dim), dtype=dt)                                   # normed input of a block
    q = np.empty((T, n_heads * hd), dtype=dt)
    k = np.empty((T, n_kv * hd), dtype=dt)
    v = np.empty((T, n_kv * hd), dtype=dt)
    att = np.empty((T, n_heads, hd), dtype=dt)
    o = np.empty((T, cfg.dim), dtype=dt)
    gate = np.empty((T, cfg.hidden_dim), dtype=dt)
    up = np.empty((T, cfg.hidden_dim), dtype=dt)

    be.embed(x, w.token_embd, tokens)
    tap("inp_embd", x)
    cos, sin = be.rope_cos_sin(np.arange(pos0, pos0 + T), cfg, w.rope_freqs)

    for i, L in enumerate(w.layers):
        be.rmsnorm(h, x, L.attn_norm, cfg.norm_eps)
        tap(f"attn_norm-{i}", h)
        be.matmuls((q, k, v), h, (L.attn_q, L.attn_k, L.attn_v))
        if cfg.qkv_bias:
            q += L.attn_q_bias
            k += L.attn_k_bias
            v += L.attn_v_bias
        q3, k3 = q.reshape(T, n_heads, hd), k.reshape(T, n_kv, hd)
        be.rope(q3, cos, sin, cfg.rope_neox)
        be.rope(k3, cos, sin, cfg.rope_neox)
        tap(f"Qcur-{i}", q3)
        tap(f"Kcur-{i}", k3)
        tap(f"Vcur-{i}", v.reshape(T, n_kv, hd))
        be.store_kv(cache.k[i], pos0, k3)
        be.store_kv(cache.v[i], pos0, v.reshape(T, n_kv, hd))
        be.attention(att, q3, cache.k[i, : pos0 + T], cache.v[i, : pos0 + T], pos0)
        tap(f"kqv_out-{i}", att)
        be.matmul(o, att.reshape(T, n_heads * hd), L.attn_output)
        tap(f"attn_out-{i}", o)
        x += o
        tap(f"ffn_inp-{i}", x)

        be.rmsnorm(h, x, L.ffn_norm, cfg.norm_eps)
        tap(f"ffn_norm-{i}", h)
        be.matmuls((gate, up), h, (L.ffn_gate, L.ffn_up))
        be.swiglu(gate, gate, up)
        tap(f"ffn_swiglu-{i}", gate)
        be.matmul(o, gate, L.ffn_down)
        tap(f"ffn_out-{i}", o)
        x += o
        tap(f"l_out-{i}", x)

    cache.pos = pos0 + T
    if not all_logits:
        x = x[-1:]
        h = h[-1:]
    be.rmsnorm(h, x, w.output_norm, cfg.norm_eps)
    tap("result_norm", h)
    logits = np.empty((len(h), cfg.vocab_size), dtype=dt)
    be.matmul(logits, h, w.output)
    tap("result_output", logits)
    return logits.astype(np.float32, copy=False)
