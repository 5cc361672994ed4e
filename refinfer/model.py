"""`refinfer.load(path) -> Model`: the public face of the engine."""

from __future__ import annotations

import codecs
import time

import numpy as np

from .backends import get_backend
from .errors import RefinferError
from .forward import KVCache, forward
from .loader import load as load_checkpoint
from .sampling import Sampler, SamplerConfig, resolve_seed


class Model:
    def __init__(self, cfg, weights, meta, tokenizer, backend, path):
        self.config = cfg
        self.weights = weights
        self.metadata = meta
        self.tokenizer = tokenizer
        self.backend = backend
        self.path = path

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
        return forward(self.config, self.weights, self.backend, tokens, cache, **kw)

    # ---- generation -----------------------------------------------------------------------
    def generate(self, prompt, max_tokens=128, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05,
                 repeat_penalty=1.0, seed=None, stream=False, stop=(), chat=False, add_special=True,
                 stats=None, repeat_last_n=64):
        """Generate up to max_tokens after prompt (text, or a list of token ids). Returns the text,
        or with stream=True an iterator of text pieces. Stops at an end-of-generation token or a
        stop string. seed None or -1: a random seed (llama.cpp's LLAMA_DEFAULT_SEED), reported
        in stats["seed"] so that the run can be repeated. `stats`, if a dict, receives seed,
        prompt_tokens, generated_tokens and timings.

        Every argument is checked, and the prompt tokenized and fitted into the context, before
        this returns, also with stream=True: an error never comes after the first piece."""
        seed = resolve_seed(seed)
        cfg = SamplerConfig(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed=seed).check()
        check_max_tokens(max_tokens)
        ids = self._prompt_ids(prompt, chat, add_special)
        max_tokens = min(max_tokens, self._room(ids))
        if isinstance(stats, dict):
            stats["seed"] = seed
        it = self._generate(ids, max_tokens, cfg, stop, stats)
        return it if stream else "".join(it)

    def _prompt_ids(self, prompt, chat, add_special) -> list:
        tok = self._need_tokenizer()
        if isinstance(prompt, str):
            if not prompt:
                raise RefinferError("the prompt is empty", hint=EMPTY_PROMPT_HINT)
            if chat:
                prompt = self.apply_chat_template([{"role": "user", "content": prompt}])
                ids = tok.encode(prompt, add_special=add_special, parse_special=True)
            else:
                ids = tok.encode(prompt, add_special=add_special)
        else:
            ids = [int(i) for i in prompt]
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

    def _generate(self, ids, max_tokens, sampler_cfg, stop, stats):
        sample = Sampler(sampler_cfg)
        tok = self._need_tokenizer()
        cache = self.new_cache()
        stops = [s for s in (stop or ()) if s]
        t0 = time.perf_counter()
        logits = forward(self.config, self.weights, self.backend, ids, cache, all_logits=False)[-1]
        t1 = time.perf_counter()
        history, out_ids = list(ids), []
        emitted = 0                                     # characters of the decoded text already yielded
        hold = max((len(x) for x in stops), default=1) - 1  # a stop string may start in the last `hold` chars
        text = ""
        for i in range(max_tokens):
            nxt = sample(logits, history, i)            # generated token i: its draw depends on (seed, i) only
            if tok.is_eog(nxt):
                break
            history.append(nxt)
            out_ids.append(nxt)
            text = complete_text(tok.decode_bytes(out_ids))
            cut = min((text.find(x) for x in stops if x in text), default=-1)
            if cut >= 0:
                text = text[:cut]
                break
            safe = len(text) - hold
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
            if len(out_ids) == max_tokens:
                break
            logits = forward(self.config, self.weights, self.backend, [nxt], cache, all_logits=False)[-1]
        if len(text) > emitted:
            yield text[emitted:]
        t2 = time.perf_counter()
        if isinstance(stats, dict):
            stats.update(prompt_tokens=len(ids), generated_tokens=len(out_ids), prefill_s=t1 - t0, decode_s=t2 - t1)


EMPTY_PROMPT_HINT = 'give some text, e.g. python -m refinfer generate "Once upon a time"'


def complete_text(data: bytes) -> str:
    """The text of data up to a trailing incomplete UTF-8 sequence, which is left out: the
    bytes of a character that the next tokens would complete (or that -n cut off). Invalid
    bytes elsewhere still decode to U+FFFD, as in a plain decode with errors="replace"."""
    return codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=False)


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


def load(path=None, backend=None, mode="ideal", dtype=np.float32) -> Model:  # backend None: see backends.get_backend
    """Load a GGUF file or HF safetensors directory (None: the default model, fetched on first use)."""
    if path is None:
        from .fetch import default_model_path
        path = default_model_path()
    be = get_backend(backend, mode, dtype=dtype)
    cfg, weights, meta = load_checkpoint(path)
    return Model(cfg, weights, meta, _tokenizer_for(meta, path), be, str(path))
