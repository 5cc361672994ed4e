"""`refinfer.load(path) -> Model`: the public face of the engine."""

from __future__ import annotations

import dataclasses

import time

import numpy as np

from .backends import get_backend
from .errors import RefinferError
from .forward import KVCache, Segment, forward
from .generation import Decoder, Request, check_fields
from .kv_cache import DEFAULT_BLOCK_SIZE, BlockManager, BlockPool
from .loader import load as load_checkpoint
from .sampling import Sampler, SamplerConfig, resolve_seed


# llama.cpp's default n_ubatch (-ub): the most tokens one llama_decode step computes at once
DEFAULT_N_UBATCH = 512


class Model:
    def __init__(self, cfg, weights, meta, tokenizer, backend, path, n_ubatch=None):
        self.config = cfg
        self.weights = weights
        self.metadata = meta
        self.tokenizer = tokenizer
        self.backend = backend
        self.path = path
        self.n_ubatch = check_ubatch(n_ubatch)

    @property
    def ubatch(self) -> int | None:
        """Tokens per forward step of a prompt. ggml mode: n_ubatch (default 512), since
        llama.cpp evaluates a prompt as micro-batches of n_ubatch tokens, each with its own
        padded KV length and its own kernel choice (a one-token step takes the vec_dot path).
        Ideal mode: n_ubatch when given, else the whole prompt in one step; its numbers do not
        depend on the split (batch invariance)."""
        if self.n_ubatch is None and self.mode == "ggml":
            return DEFAULT_N_UBATCH
        return self.n_ubatch

    def prompt_steps(self, n: int) -> list[tuple[int, int]]:
        """[start, end) of each forward step of an n-token prompt."""
        step = self.ubatch or n
        return [(s, min(n, s + step)) for s in range(0, n, step)]

    @property
    def mode(self):
        return self.backend.mode

    def new_cache(self, max_len=None) -> KVCache:
        """A paged cache for one sequence of up to max_len positions (the context length), in
        the backend's memory (be.new_kv_pool)."""
        n = self.config.max_seq_len if max_len is None else min(int(max_len), self.config.max_seq_len)
        return KVCache(self.config, n, be=self.backend)

    # ---- text <-> tokens ------------------------------------------------------------------
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise RefinferError(f"{self.path}: no tokenizer found for this model",
                                hint="GGUF files carry tokenizer.ggml.*; HF directories need tokenizer.json or tokenizer.model")
        return self.tokenizer

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list:
        return self._need_tokenizer().encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids) -> str:
        return self._need_tokenizer().decode(list(ids))

    def apply_chat_template(self, messages, add_generation_prompt=True) -> str:
        return self._need_tokenizer().apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    # ---- logits ---------------------------------------------------------------------------
    def logits(self, tokens, tap=None) -> np.ndarray:
        """Teacher-forced logits float32[len(tokens), vocab]: row i predicts token i + 1."""
        tokens = list(tokens)
        cache = self.new_cache(len(tokens))
        if len(tokens) > cache.max_len:
            raise RefinferError(f"{len(tokens)} tokens exceed the context length {cache.max_len}",
                                hint=f"pass at most {cache.max_len} tokens (the model's context_length), "
                                     "or split the text into windows")
        kw = {"tap": tap} if tap is not None else {}
        rows = [forward(self.config, self.weights, self.backend, tokens[s:e], cache, **kw)
                for s, e in self.prompt_steps(len(tokens))]
        return rows[0] if len(rows) == 1 else np.concatenate(rows)

    # ---- generation -----------------------------------------------------------------------
    def generate(self, prompt=None, max_tokens=128, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05,
                 repeat_penalty=1.0, seed=None, stream=False, stop=(), chat=False, add_special=True,
                 stats=None, repeat_last_n=64, *, messages=None, details=False, top_logprobs=None,
                 prompt_logprobs=False):
        """Generate up to max_tokens after prompt (text, or a list of token ids) or messages (chat
        turns through the chat template). Returns the text; with details=True the
        GenerationResult (token ids, text, finish_reason, per-token logprobs, prompt logprobs
        with prompt_logprobs=True); with stream=True an iterator of text pieces (of Events with
        details=True). Stops at an end-of-generation token or a stop string. seed None or -1: a
        random seed (llama.cpp's LLAMA_DEFAULT_SEED), reported in stats["seed"] and the result
        so that the run can be repeated. `stats`, if a dict, receives seed, prompt_tokens,
        generated_tokens and timings.

        This is the reference for one request alone: the plain serial loop, one forward step of
        one segment per token over a paged cache of its own, and the same Decoder as the Engine.

        Every argument is checked, and the prompt tokenized and fitted into the context, before
        this returns, also with stream=True: an error never comes after the first piece."""
        req = self.prepare_request(prompt=prompt, messages=messages, max_tokens=max_tokens, temperature=temperature,
                                   top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                                   repeat_last_n=repeat_last_n, seed=seed, stop=stop, chat=chat,
                                   add_special=add_special, top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs)
        if isinstance(stats, dict):
            stats["seed"] = req.seed
        dec = Decoder(req, self._need_tokenizer(), Sampler(req.sampler))
        events = self._generate(dec, stats)
        if stream:
            return events if details else (e.text for e in events if e.text)
        for _ in events:
            pass
        return dec.result() if details else dec.text

    def prepare_request(self, **fields) -> Request:
        """One request (Model.generate's keyword names) checked, tokenized and fitted into the
        context; RefinferError names the bad field."""
        f = check_fields(fields)
        seed = resolve_seed(f["seed"])
        cfg = SamplerConfig(f["temperature"], f["top_k"], f["top_p"], f["min_p"], f["repeat_penalty"],
                            f["repeat_last_n"], seed=seed).check()
        max_tokens = check_max_tokens(f["max_tokens"])
        ids = self._prompt_ids(f["prompt"], f["chat"], f["add_special"], f["messages"])
        max_tokens = min(max_tokens, self._room(ids))
        return Request(ids, max_tokens, cfg, f["stop"], f["top_logprobs"], f["prompt_logprobs"])

    def prompt_ids(self, prompt=None, messages=None, chat=False, add_special=True) -> list:
        """The token ids that generate feeds the model for this prompt (text or ids) or messages."""
        return self._prompt_ids(prompt, chat, add_special, messages)

    def _prompt_ids(self, prompt, chat, add_special, messages=None) -> list:
        tok = self._need_tokenizer()
        if messages is not None:
            text = self.apply_chat_template(list(messages))
            ids = tok.encode(text, add_special=add_special, parse_special=True)
        elif isinstance(prompt, str):
            if not prompt:
                raise RefinferError("the prompt is empty", hint=EMPTY_PROMPT_HINT)
            if chat:
                prompt = self.apply_chat_template([{"role": "user", "content": prompt}])
                ids = tok.encode(prompt, add_special=add_special, parse_special=True)
            else:
                ids = tok.encode(prompt, add_special=add_special)
        else:
            ids = [int(i) for i in prompt]
            n_vocab = self.config.vocab_size
            for i, t in enumerate(ids):
                if not 0 <= t < n_vocab:
                    raise RefinferError(f"prompt token {i} is id {t}, outside the vocabulary [0, {n_vocab})",
                                        hint="token ids come from this model's tokenizer (Model.tokenize)")
        if not ids:
            raise RefinferError("the prompt is empty after tokenization (0 tokens)", hint=EMPTY_PROMPT_HINT)
        return ids

    def _room(self, ids) -> int:
        """Tokens that fit after the prompt; the prompt must leave room for one."""
        n_ctx = self.config.max_seq_len
        if len(ids) >= n_ctx:
            raise RefinferError(f"the prompt is {len(ids)} tokens long and the context length is {n_ctx}: "
                                "no room for a generated token",
                                hint=f"shorten the prompt to at most {n_ctx - 1} tokens (the model's "
                                     f"context_length is {n_ctx})")
        return n_ctx - len(ids)

    def new_kv(self, tokens=None, mib=None, block_size=DEFAULT_BLOCK_SIZE, enable_prefix_caching=True) -> BlockManager:
        """A paged KV cache for many sequences in the backend's memory (be.new_kv_pool, with the
        backend's cache types): a pool of `mib` MiB or of `tokens` positions (whole blocks; by
        default the context length, llama.cpp's unified cache of n_ctx cells)."""
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise RefinferError(f"kv_block_size (--kv-block-size) must be a positive integer, got {block_size!r}",
                                hint=f"positions per KV block; the default is {DEFAULT_BLOCK_SIZE}")
        cfg = self.config
        k_type, v_type = self.backend.kv_types()
        shape = dict(n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, block_size=int(block_size),
                     k_type=k_type, v_type=v_type)
        if tokens is None and mib is None:
            tokens = cfg.max_seq_len
        n_blocks = BlockPool.n_blocks_for(mib=mib, tokens=tokens, **shape)
        pool = self.backend.new_kv_pool(n_blocks=n_blocks, **shape)
        return BlockManager(pool, enable_prefix_caching=enable_prefix_caching)

    def _generate(self, dec: Decoder, stats):
        """The serial loop: the prompt in one step, then one step per generated token, every step
        a batch of one segment over this request's own paged cache."""
        req, seq = dec.request, 0
        bs = DEFAULT_BLOCK_SIZE
        kv = self.new_kv(tokens=-(-req.positions // bs) * bs, block_size=bs, enable_prefix_caching=False)
        kv.allocate(seq, req.prompt_ids, use_prefix_cache=False)
        t0 = time.perf_counter()
        n = len(req.prompt_ids)
        for s, e in self.prompt_steps(n):          # ggml mode: llama.cpp's n_ubatch micro-batches
            rows = forward(self.config, self.weights, self.backend,
                           [Segment(seq, req.prompt_ids[s:e], s,
                                    "all" if req.prompt_logprobs else "last" if e == n else "none")], kv)[0]
            if req.prompt_logprobs:
                dec.add_prompt_rows(s + 1, rows[:e - s - (e == n)])
        row, t1 = rows[-1], None
        while True:
            ev = dec.step(row)
            now = time.perf_counter()
            if t1 is None:
                t1 = now
                dec.stats.ttft_s = dec.stats.prefill_s = t1 - t0
            if ev.token_id is not None:
                dec.stats.token_times.append(now - t0)
            if ev.finish_reason is not None:
                dec.stats.decode_s = now - t1
                dec.stats.generated_tokens = len(dec.token_ids)
                if isinstance(stats, dict):
                    s = dec.stats
                    stats.update(prompt_tokens=s.prompt_tokens, generated_tokens=s.generated_tokens,
                                 prefill_s=s.prefill_s, decode_s=s.decode_s, ttft_s=s.ttft_s)
                yield ev
                return
            yield ev
            pos = kv.append_slot(seq, ev.token_id)
            row = forward(self.config, self.weights, self.backend, [Segment(seq, [ev.token_id], pos)], kv)[0][-1]


EMPTY_PROMPT_HINT = 'give some text, e.g. python -m refinfer generate "Once upon a time"'


def check_max_tokens(n, option="max_tokens") -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise RefinferError(f"{option} must be an integer >= 0, got {n!r}",
                            hint="-n 128 generates up to 128 tokens; -n 0 only reads the prompt")
    return int(n)


def _tokenizer_for(meta, path):
    """GGUF: tokenizer.ggml.* metadata; HF directory: tokenizer.json or tokenizer.model beside
    the weights. None when the model ships no tokenizer (token ids still work)."""
    import pathlib
    from .tokenizer import Tokenizer, tokenizer_from_hf_dir
    if "tokenizer.ggml.model" in meta:
        return Tokenizer.from_gguf_metadata(meta)
    d = pathlib.Path(path)
    d = d if d.is_dir() else d.parent
    if (d / "tokenizer.json").exists() or (d / "tokenizer.model").exists():
        return tokenizer_from_hf_dir(d)
    return None


def check_dequant(dequant, option="dequant"):
    if dequant not in DEQUANT:
        raise RefinferError(f"{option} must be one of {', '.join(DEQUANT)}, got {dequant!r}",
                            hint="deployed: the weights each library's dequantization computes (fp16); "
                                 "exact: the float32 product scale * (q - zero)")


def exact_intg_weights(weights):
    """Integer-group matrices switched to the exact float32 product (in place)."""
    from .quant.intgroup import IntGroupTensor
    for layer in weights.layers:
        for f in dataclasses.fields(layer):
            v = getattr(layer, f.name)
            if isinstance(v, IntGroupTensor):
                setattr(layer, f.name, v.with_rounding("exact"))
    for name in ("token_embd", "output"):
        v = getattr(weights, name)
        if isinstance(v, IntGroupTensor):
            setattr(weights, name, v.with_rounding("exact"))


def check_ubatch(n, option="n_ubatch"):
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise RefinferError(f"{option} must be a positive integer, got {n!r}",
                            hint=f"tokens per forward step of a prompt, as llama.cpp's -ub (default {DEFAULT_N_UBATCH} "
                                 "in ggml mode)")
    return int(n)


DEQUANT = ("deployed", "exact")


def configure_kv(be, cache_type_k=None, cache_type_v=None, flash_attn=False, kv_params=None, kv_rotation=True):
    """Set the backend's KV cache types (names as llama.cpp's --cache-type-k/-v, or LMDeploy's
    and refinfer's: kv_cache.CACHE_TYPES) and flash attention; None keeps the mode's default
    (ideal f32, ggml f16). Each type is taken in the backend's mode (CacheType.in_mode: ggml mode
    stores the LMDeploy types with their fp16 arithmetic). Combinations that llama.cpp refuses
    or that ggml mode does not reproduce are refused here, before any weight is read."""
    from .backends.numpy_backend import check_ggml_kv
    from .kv_cache import get_cache_type
    if not isinstance(flash_attn, (bool, np.bool_)):
        raise RefinferError(f"flash_attn must be True or False, got {flash_attn!r}", hint="--flash-attn takes no value")
    default_k, default_v = be.kv_types()
    types = []
    for which, name, default, opt in (("k", cache_type_k, default_k, "--cache-type-k"),
                                      ("v", cache_type_v, default_v, "--cache-type-v")):
        if name is None:
            types.append(default)
            continue
        try:
            t = get_cache_type(name, kv_params=kv_params, which=which)
        except RefinferError as e:
            raise type(e)(f"{opt}: {e}", hint=e.hint) from None
        types.append(t.in_mode(be.mode))
    if flash_attn and be.mode != "ggml":
        raise RefinferError("--flash-attn selects llama.cpp's flash-attention arithmetic, a ggml-mode option",
                            hint="add --mode ggml; ideal mode's attention is the exact one with or without it")
    if be.mode == "ggml" and all(t.kind in ("float", "ggml") for t in types):
        check_ggml_kv(types[0].name, types[1].name, bool(flash_attn))
    be.kv_cache_types = tuple(types)
    be.flash_attn = bool(flash_attn)
    be.kv_rotation = bool(kv_rotation)
    return be


def check_kv_model(be, cfg):
    """The backend's cache types against the model's shape, before any KV is allocated: a block
    that does not divide head_dim, calibrated parameters made for another model."""
    for t in be.kv_types():
        t.row_bytes(cfg.head_dim)
        if getattr(t, "params", None) is not None:
            t.params.check_model(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)


def load(path=None, backend=None, mode="ideal", dtype=np.float32, n_ubatch=None, dequant="deployed",
         a16=False, cache_type_k=None, cache_type_v=None, flash_attn=False, kv_params=None, kv_rotation=True) -> Model:
    # backend None: see backends.get_backend
    """Load a GGUF file or HF safetensors directory (None: the default model, fetched on first use).
    n_ubatch: tokens per forward step of a prompt (Model.ubatch; None: 512 in ggml mode, the
    whole prompt in ideal mode).
    For GPTQ / AWQ / compressed-tensors checkpoints (quant/intgroup.py): dequant "deployed" uses
    each library's own dequantized weights, rounded to the scales' dtype (fp16) as torch does;
    "exact" the float32 product scale * (q - zero). a16=True rounds the activations entering
    and leaving those layers to fp16, as A16 kernels (exllama, Marlin) do.
    cache_type_k / cache_type_v / flash_attn / kv_params / kv_rotation: the KV cache
    (configure_kv; kv_rotation False drops llama.cpp's Hadamard rotation, kv_cache.attn_rotation),
    used by Model.generate, Model.logits, the Engine and the server alike."""
    n_ubatch = check_ubatch(n_ubatch)
    check_dequant(dequant)
    if path is None:
        from .fetch import default_model_path
        path = default_model_path()
    be = get_backend(backend, mode, dtype=dtype)
    be.a16 = bool(a16)
    configure_kv(be, cache_type_k, cache_type_v, flash_attn, kv_params, kv_rotation)   # before any weight is read
    cfg, weights, meta = load_checkpoint(path)
    check_kv_model(be, cfg)
    if dequant == "exact":
        exact_intg_weights(weights)
    return Model(cfg, weights, meta, _tokenizer_for(meta, path), be, str(path), n_ubatch=n_ubatch)
