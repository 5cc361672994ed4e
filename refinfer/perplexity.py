"""Perplexity and KL divergence with llama-perplexity's chunking (tools/perplexity/perplexity.cpp).

Chunking (perplexity() and kl_divergence() there):
  - the whole text is tokenized once, with the special tokens the model asks for (BOS);
  - it is cut into n_tokens // n_ctx chunks of n_ctx tokens; the tail is dropped, and fewer than
    2 * n_ctx tokens is an error;
  - --chunks N keeps the first N of them; a negative N keeps all (llama-perplexity:
    n_chunk = n_chunks < 0 ? n_chunk_max : min(n_chunks, n_chunk_max)), and 0 is an error here
    (llama-perplexity would print the PPL of no tokens);
  - each chunk is evaluated from an empty KV cache; when the vocabulary adds BOS, the chunk's
    first token is replaced by BOS for evaluation (targets keep the original tokens);
  - only the second half is scored: with first = n_ctx // 2, logits at positions
    first .. n_ctx - 2 predict tokens first + 1 .. n_ctx - 1, i.e. n_ctx - 1 - first per chunk;
  - nll = log(sum_i exp(l_i - max)) - (l_tok - max), accumulated in double; PPL = exp(mean nll),
    and its uncertainty is PPL * sqrt(var(nll) / (count - 1)).

KL divergence: llama-perplexity stores base log-probabilities as uint16 over [max - 16, max] and
drops base probabilities below e^-16; here the base logits stay float32 and KL(P_base || P_test)
sums over the whole vocabulary in float64. The statistics and their names are llama.cpp's.

A source of logits is refinfer, llama.cpp, a saved logits file or an OpenAI-compatible server;
see parse_source.
"""

from __future__ import annotations

import math
import re

import numpy as np

from .errors import RefinferError

LOGITS_FORMAT = "refinfer-logits"


MIN_CTX = 4


def check_ctx(n_ctx: int, option="-c/--ctx") -> int:
    """Any n_ctx >= 4 is accepted, odd ones too (llama-perplexity scores from n_ctx // 2)."""
    if n_ctx < MIN_CTX:
        raise RefinferError(f"{option} must be at least {MIN_CTX} tokens per chunk, got {n_ctx}",
                            hint="-c 512 is llama-perplexity's default; each chunk scores its second half")
    return n_ctx


def check_chunks(n_chunks, option="--chunks"):
    if n_chunks == 0:
        raise RefinferError(f"{option} 0 would score no tokens",
                            hint=f"{option} N scores the first N chunks; leave it out, or give -1, for all of them")
    return n_chunks


def select_chunks(chunks: list, n_chunks=None) -> list:
    """llama-perplexity's --chunks: None or negative keeps every chunk, N the first N."""
    if n_chunks is None or n_chunks < 0:
        return chunks
    check_chunks(n_chunks)
    return chunks[:n_chunks]


def make_chunks(tokens, n_ctx: int) -> list:
    check_ctx(n_ctx)
    if len(tokens) < 2 * n_ctx:
        largest = len(tokens) // 2
        hint = (f"the largest -c for this text is {largest}; or use a longer text" if largest >= MIN_CTX
                else "use a longer text")
        raise RefinferError(f"-c {n_ctx}: the text tokenizes to {len(tokens)} tokens; perplexity with a context of "
                            f"{n_ctx} needs at least {2 * n_ctx} (llama-perplexity's rule)", hint=hint)
    return [list(tokens[i * n_ctx:(i + 1) * n_ctx]) for i in range(len(tokens) // n_ctx)]


def check_source_ctx(src, n_ctx: int):
    """A refinfer model cannot run past its context length (llama.cpp only warns there)."""
    n_max = getattr(src, "max_ctx", None)
    if n_max is not None and n_ctx > n_max:
        raise RefinferError(f"-c {n_ctx} is more than the context length of {src.name} ({n_max} tokens)",
                            hint=f"-c {n_max} or less")


def eval_tokens(chunk, add_bos, bos):
    """The chunk as llama-perplexity evaluates it: its first token replaced by BOS if the
    vocabulary adds BOS."""
    chunk = list(chunk)
    if add_bos and bos is not None:
        chunk[0] = bos
    return chunk


def log_softmax64(logits) -> np.ndarray:  # float32[n, V] -> float64[n, V]
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def targets(chunk, first=None) -> np.ndarray:
    """The tokens the scored positions first .. n_ctx - 2 predict: chunk[first + 1:], with
    first = n_ctx // 2 unless given."""
    first = len(chunk) // 2 if first is None else first
    return np.asarray(chunk[first + 1:], dtype=np.int64)


def mean_and_uncertainty(values):
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    var = float(np.mean(v * v)) - mean * mean
    return mean, math.sqrt(var / (len(v) - 1)) if var > 0 and len(v) > 10 else 0.0


def _percentile(sorted_values, fraction):
    # llama.cpp's percentile(): linear interpolation at fraction * (n - 1)
    v = sorted_values
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = fraction * (len(v) - 1)
    ip = int(p)
    p -= ip
    return float((1 - p) * v[ip] + p * v[min(ip + 1, len(v) - 1)])


def ppl_stats(nll) -> dict:
    mean, unc = mean_and_uncertainty(nll)
    ppl = math.exp(mean)
    return {"ppl": ppl, "ppl_unc": ppl * unc, "count": len(nll)}


def kld_stats(nll_base, nll_test, kld, p_diff, same_top, nmse_num=0.0, nmse_den=0.0) -> dict:
    """llama-perplexity --kl-divergence's summary from per-position values."""
    nb, nt = np.asarray(nll_base), np.asarray(nll_test)
    n = len(nb)
    lb, ub = mean_and_uncertainty(nb)
    lt, ut = mean_and_uncertainty(nt)
    cov = (float(np.mean(nt * nb)) - lt * lb) / (n - 1) if n >= 10 else 0.0
    log_ratio_unc = math.sqrt(max(ut * ut + ub * ub - 2 * cov, 0.0))
    k = np.sort(np.asarray(kld))
    kmean, kunc = mean_and_uncertainty(k)
    pd = np.asarray(p_diff)
    mse, mse_unc = mean_and_uncertainty(pd * pd)
    rms = math.sqrt(mse)
    same = float(np.mean(same_top))
    out = {
        "n": n,
        "ppl_test": math.exp(lt), "ppl_test_unc": math.exp(lt) * ut,
        "ppl_base": math.exp(lb), "ppl_base_unc": math.exp(lb) * ub,
        "cor_ln_ppl": cov / (ut * ub) if ut and ub else float("nan"),
        "ln_ppl_ratio": lt - lb, "ln_ppl_ratio_unc": log_ratio_unc,
        "ppl_ratio": math.exp(lt - lb), "ppl_ratio_unc": math.exp(lt - lb) * log_ratio_unc,
        "ppl_diff": math.exp(lt) - math.exp(lb),
        "kld_mean": kmean, "kld_mean_unc": kunc, "kld_max": float(k[-1]),
        "kld_median": float(np.median(k)), "kld_min": float(k[0]),
        "rms_dp": rms, "rms_dp_unc": 0.5 / rms * mse_unc if rms else 0.0,
        "same_top": same, "same_top_unc": math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
        "nmse": nmse_num / nmse_den if nmse_den else 0.0,
    }
    for f in (0.999, 0.99, 0.95, 0.9, 0.1, 0.05, 0.01, 0.001):
        out[f"kld_p{f * 100:g}"] = _percentile(k, f)
    return out


# ---- sources of logits ----------------------------------------------------------------------

def _flag_option(name, value, spec):
    if value in (None, "0", "1", 0, 1, False, True):
        return None if value is None else value in ("1", 1, True)
    raise RefinferError(f"{spec or 'source'}: {name}={value!r}: expected 0 or 1",
                        hint=f"e.g. refinfer[mode=ggml,{name}=1]:MODEL.gguf")


KV_OPTIONS = ("cache_type_k", "cache_type_v", "flash_attn")   # refinfer and llama.cpp sources


class RefinferSource:
    def __init__(self, path, mode="ideal", backend=None, ubatch=None, dequant="deployed", a16="0",
                 cache_type_k=None, cache_type_v=None, flash_attn=None, kv_params=None, kv_rotation=None):
        # backend None: numba in ideal mode (batch-invariant kernels within NMSE 4e-12 of the
        # reference; the reference's column-order float64 matmuls take about 0.25 s a token on
        # SmolLM2), the lane-exact NumPy emulation in ggml mode. ubatch None: Model.ubatch's
        # default (llama.cpp's 512 in ggml mode)
        from .backends import check_backend_name
        from .model import load
        backend = check_backend_name(backend, mode)
        if a16 not in ("0", "1", 0, 1, False, True):
            raise RefinferError(f"source option a16={a16!r}: expected 0 or 1",
                                hint="refinfer[a16=1]:GPTQ_DIR rounds the W4A16 layers' activations to fp16")
        a16 = a16 in ("1", 1, True)
        fa = bool(_flag_option("flash_attn", flash_attn, None))
        rot = _flag_option("kv_rotation", kv_rotation, None)
        rot = True if rot is None else rot
        self.model = load(path, mode=mode, backend=backend, n_ubatch=ubatch, dequant=dequant, a16=a16,
                          cache_type_k=cache_type_k, cache_type_v=cache_type_v, flash_attn=fa, kv_params=kv_params,
                          kv_rotation=rot)
        extra = (",dequant=exact" if dequant == "exact" else "") + (",a16=1" if a16 else "")
        kt, vt = self.model.backend.kv_types()
        if cache_type_k or cache_type_v:
            extra += f",cache_type_k={kt.name},cache_type_v={vt.name}"
        extra += (",flash_attn=1" if fa else "") + ("" if rot else ",kv_rotation=0")
        self.name = f"refinfer[mode={mode},backend={backend}{extra}]:{path}"
        self.n_vocab = self.model.config.vocab_size
        self.max_ctx = self.model.config.max_seq_len
        tok = self.model.tokenizer
        self.add_bos = bool(tok and tok.add_bos)
        self.bos = tok.bos_id if tok else None

    def tokenize(self, text):
        return self.model.tokenize(text, add_special=True)

    def chunk_logits(self, chunk):
        return self.model.logits(eval_tokens(chunk, self.add_bos, self.bos))

    def close(self):
        pass


class LlamaCppSource:
    def __init__(self, path, variant="default", n_ctx=512, n_threads=1, ubatch=None, cache_type_k=None,
                 cache_type_v=None, flash_attn=None):
        from .llama_oracle import LlamaCpp
        fa = _flag_option("flash_attn", flash_attn, None)
        self.llm = LlamaCpp(path, variant=variant, n_ctx=n_ctx, n_threads=n_threads, n_batch=ubatch,
                            type_k=cache_type_k, type_v=cache_type_v, flash_attn=fa)
        extra = "".join(f",{k}={v}" for k, v in (("cache_type_k", cache_type_k), ("cache_type_v", cache_type_v),
                                                 ("flash_attn", None if fa is None else int(fa))) if v is not None)
        self.name = f"llama.cpp[variant={variant}{extra}]:{path}"
        self.n_vocab, self.add_bos, self.bos = self.llm.n_vocab, self.llm.add_bos, self.llm.bos

    def tokenize(self, text):
        return self.llm.tokenize(text, add_special=True)

    def chunk_logits(self, chunk):
        return self.llm.logits(eval_tokens(chunk, self.add_bos, self.bos))

    def close(self):
        self.llm.close()


class LogitsFileSource:
    """Base logits in a refinfer-logits file (formats/dump-format.md), in one of two layouts:

      - `kld --save-base`: tokens [n_chunk * n_ctx], logits [n_chunk, n_ctx - 1 - n_ctx // 2, V]
        (the scored second half of every chunk) and metadata n_ctx;
      - a teacher-forced prompt, as the fixtures' logits-<type>.safetensors: tokens [T] and
        logits [T, V], row t predicting token t + 1, no n_ctx. It is one chunk of n_ctx = T
        tokens, evaluated from an empty cache like a perplexity chunk, and every row of it is
        scored (first = 0): the file holds nothing else to compare.
    """

    def __init__(self, path):
        from .dump import read_safetensors
        meta, arrays = read_safetensors(path, LOGITS_FORMAT)
        if "tokens" not in arrays or "logits" not in arrays:
            raise RefinferError(f"{path}: a logits file needs `tokens` and `logits` tensors",
                                hint="write one with kld --save-base FILE")
        self.tokens, logits = arrays["tokens"], arrays["logits"]
        self.name = f"logits:{path} (of {meta.get('source') or meta.get('model', '?')})"
        self.add_bos, self.bos = False, None
        ok = logits.ndim in (2, 3) and self.tokens.ndim == 1
        if ok and logits.ndim == 2:                             # one teacher-forced prompt
            T = self.tokens.shape[0]
            self.n_ctx, self.first = T, 0
            ok = T >= 2 and logits.shape[0] == T and meta.get("n_ctx", str(T)) == str(T)
            self.logits = logits[None, : T - 1]                 # [1, T - 1, V]: the rows that predict a token
        elif ok:                                                # kld --save-base
            self.n_ctx = int(meta["n_ctx"]) if str(meta.get("n_ctx", "")).isdigit() else 0
            self.first = self.n_ctx // 2
            n_chunk = logits.shape[0]
            ok = (self.n_ctx >= MIN_CTX and n_chunk >= 1 and self.tokens.shape == (n_chunk * self.n_ctx,)
                  and logits.shape[1] == self.n_ctx - 1 - self.first)
            self.logits = logits                                # [n_chunk, n_ctx - 1 - n_ctx // 2, V]
        if not ok:
            raise RefinferError(f"{path}: tokens {self.tokens.shape}, logits {logits.shape} and n_ctx "
                                f"{meta.get('n_ctx', '(none)')} do not fit together",
                                hint="expected logits [n_chunk, n_ctx - 1 - n_ctx // 2, vocab] with n_ctx in the "
                                     "metadata (kld --save-base), or [T, vocab] for tokens [T]; see formats/dump-format.md")
        self.n_vocab = self.logits.shape[2]
        self.chunks = [[int(t) for t in self.tokens[i * self.n_ctx:(i + 1) * self.n_ctx]]
                       for i in range(self.logits.shape[0])]
        self._index = {tuple(c): i for i, c in enumerate(self.chunks)}

    def scored_logits(self, chunk, first=None):
        i = self._index.get(tuple(chunk))
        if i is None or first not in (None, self.first):
            raise RefinferError(f"{self.name}: no saved logits for this chunk of tokens",
                                hint="score the file's own chunks: leave out -f and -c")
        return self.logits[i]

    def close(self):
        pass


class OpenAISource:
    """An OpenAI-compatible completions endpoint (llama.cpp server, vLLM, ...): each chunk's token
    ids are sent as the prompt with echo and logprobs, and the server's per-position log-prob of
    the actual token and its top-k log-probs come back.

    PPL and same-top-p are exact (the target's log-prob and the top token are reported). The
    protocol gives only the top k of each distribution, so the rest of the vocabulary shares the
    remaining probability evenly: KLD and NMSE against this source are approximations that
    improve with `top`. Top-k entries are keyed by token text; keys of the form token_id:N
    (vLLM's return_tokens_as_token_ids) are used directly, other texts are matched against the
    pieces of the vocabulary of `vocab` (a GGUF or HF model with the server's tokenizer)."""

    def __init__(self, url, vocab=None, model=None, top="20", timeout="600"):
        self.url, self.model, self.top, self.timeout = url, model, int(top), float(timeout)
        self.name = f"openai:{url}"
        self.add_bos, self.bos, self._ids, self.n_vocab, self._tok = False, None, None, None, None
        if vocab is not None:
            from .model import load
            tok = load(vocab).tokenizer
            if tok is None:
                raise RefinferError(f"{vocab}: no tokenizer to map the server's token texts to ids",
                                    hint="vocab= names a GGUF or HF model with the server's tokenizer")
            self.n_vocab, self.add_bos, self.bos = tok.n_vocab, tok.add_bos, tok.bos_id
            self._ids = {}
            for i in range(tok.n_vocab):
                self._ids.setdefault(tok.token_to_piece(i).decode("utf-8", "replace"), i)
            self._tok = tok

    def tokenize(self, text):
        if self._tok is None:
            raise RefinferError(f"{self.url}: no tokenizer to cut the text into tokens", hint="openai[vocab=MODEL]:URL")
        return self._tok.encode(text, add_special=True)

    def _post(self, prompt):
        import json
        import urllib.error
        import urllib.request
        body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": self.top}
        if self.model:
            body["model"] = self.model
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise RefinferError(f"{self.url}: request failed: {e}",
                                hint="the URL is the completions endpoint, e.g. http://localhost:8080/v1/completions") from None

    def _id(self, key):
        if key.startswith("token_id:") and key[9:].isdigit():
            return int(key[9:])
        if self._ids is None or key not in self._ids:
            raise RefinferError(f"{self.url}: cannot map token text {key!r} to an id",
                                hint="give the model whose tokenizer the server uses: openai[vocab=MODEL]:URL")
        return self._ids[key]

    def scored_logits(self, chunk, first=None):
        """Approximate log-probs float32[n_ctx - 1 - first, n_vocab] of the scored positions
        (first = n_ctx // 2 unless given)."""
        if self.n_vocab is None:
            raise RefinferError(f"{self.url}: the vocabulary size is unknown", hint="openai[vocab=MODEL]:URL")
        n_ctx = len(chunk)
        first = n_ctx // 2 if first is None else first
        try:
            lp = self._post(eval_tokens(chunk, self.add_bos, self.bos))["choices"][0]["logprobs"]
            token_lp, top_lp = lp["token_logprobs"], lp["top_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise RefinferError(f"{self.url}: the reply has no choices[0].logprobs with token_logprobs and "
                                "top_logprobs (does the server support echo with logprobs?)",
                                hint="the URL is the completions endpoint, e.g. http://localhost:8080/v1/completions") from None
        if len(token_lp) < n_ctx or len(top_lp) < n_ctx:
            raise RefinferError(f"{self.url}: {len(token_lp)} echoed log-probs for a prompt of {n_ctx} tokens",
                                hint="the server must echo the prompt with logprobs (echo: true)")
        out = np.empty((n_ctx - 1 - first, self.n_vocab), dtype=np.float64)
        for row, j in enumerate(range(first + 1, n_ctx)):     # log-probs of tokens first+1 .. n_ctx-1
            known = {self._id(k): float(v) for k, v in (top_lp[j] or {}).items()}
            known[int(chunk[j])] = float(token_lp[j])
            rest = max(1.0 - sum(math.exp(v) for v in known.values()), 1e-30)
            out[row] = math.log(rest / max(self.n_vocab - len(known), 1))
            out[row, list(known)] = list(known.values())
        return out.astype(np.float32)

    def close(self):
        pass


SOURCE_SPEC = re.compile(r"^(refinfer|llama\.cpp|logits|openai)(?:\[([^\]]*)\])?:(.+)$")


def _ubatch_option(value, spec):
    """ubatch=N of a source spec: a positive integer."""
    if value is None or isinstance(value, int):
        return value
    if not value.isdigit() or int(value) < 1:
        raise RefinferError(f"{spec!r}: ubatch={value!r} is not a positive integer",
                            hint="tokens per forward step, as llama.cpp's -ub: e.g. refinfer[mode=ggml,ubatch=512]:MODEL.gguf")
    return int(value)


def parse_source(spec: str, n_ctx=512, n_threads=1, n_ubatch=None, kv=None):
    """refinfer[mode=ggml,backend=numpy,ubatch=512]:PATH, llama.cpp[variant=flash_attn,ubatch=512]:PATH,
    logits:FILE; openai[vocab=MODEL,top=20,model=NAME]:URL (or a bare http(s) URL); a bare path is
    refinfer's ideal mode (or a logits file if it ends in .safetensors). n_ubatch: the ubatch of
    refinfer and llama.cpp sources whose spec gives none; kv: defaults of the KV options
    (cache_type_k, cache_type_v, flash_attn; kv_params, kv_rotation for refinfer) for them, the
    command line's --cache-type-k/-v and --flash-attn."""
    m = SOURCE_SPEC.match(spec)
    if m is None and spec.startswith(("http://", "https://")):
        kind, opts, path = "openai", "", spec
    elif m is None:
        kind, opts, path = ("logits" if spec.endswith(".safetensors") else "refinfer"), "", spec
    else:
        kind, opts, path = m.group(1), m.group(2) or "", m.group(3)
    kw = {}
    for item in filter(None, (s.strip() for s in opts.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise RefinferError(f"source option {item!r} in {spec!r} is not key=value",
                                hint="e.g. refinfer[mode=ggml]:MODEL.gguf")
        kw[key.strip()] = value.strip()
    allowed = {"refinfer": {"mode", "backend", "ubatch", "dequant", "a16", *KV_OPTIONS, "kv_params", "kv_rotation"},
               "llama.cpp": {"variant", "ubatch", *KV_OPTIONS}, "logits": set(),
               "openai": {"vocab", "model", "top", "timeout"}}[kind]
    if set(kw) - allowed:
        raise RefinferError(f"{spec!r}: unknown option(s) {sorted(set(kw) - allowed)} for a {kind} source "
                            f"(allowed: {sorted(allowed) or 'none'})",
                            hint="e.g. refinfer[mode=ggml,backend=numba]:MODEL.gguf or llama.cpp[variant=flash_attn]:MODEL.gguf")
    if kind in ("refinfer", "llama.cpp"):
        kw["ubatch"] = _ubatch_option(kw.get("ubatch", n_ubatch), spec)
        for key, value in (kv or {}).items():
            if value is not None and (kind == "refinfer" or key in KV_OPTIONS):
                kw.setdefault(key, value)
        for key in ("flash_attn", "kv_rotation"):
            if key in kw:
                _flag_option(key, kw[key], spec)
    if kind == "refinfer":
        return RefinferSource(path, **kw)
    if kind == "llama.cpp":
        return LlamaCppSource(path, n_ctx=n_ctx, n_threads=n_threads, **kw)
    if kind == "openai":
        return OpenAISource(path, **kw)
    return LogitsFileSource(path)


def _scored_logits(src, chunk, first):  # -> float32[n_ctx - 1 - first, V]: the scored positions
    if isinstance(src, (LogitsFileSource, OpenAISource)):
        return np.asarray(src.scored_logits(chunk, first))
    return src.chunk_logits(chunk)[first: len(chunk) - 1]


def chunks_of(base, tokens, n_ctx, n_chunks=None) -> tuple:
    """(chunks, first): the chunks a run scores and the first scored position of each; a
    logits file brings its own."""
    if isinstance(base, LogitsFileSource):
        return select_chunks(base.chunks, n_chunks), base.first
    return select_chunks(make_chunks(tokens, n_ctx), n_chunks), n_ctx // 2


def _bar(total, desc, progress):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="chunk", disable=None if progress else True, leave=False)


def perplexity(src, tokens, n_ctx=512, n_chunks=None, progress=False, on_chunk=None) -> dict:
    """llama-perplexity's PPL of src over tokens: {ppl, ppl_unc, count, chunks: running PPL}."""
    chunks, first = chunks_of(src, tokens, n_ctx, n_chunks)
    nll, running = [], []
    with _bar(len(chunks), "perplexity", progress) as bar:
        for chunk in chunks:
            lp, tgt = log_softmax64(_scored_logits(src, chunk, first)), targets(chunk, first)
            nll.extend((-lp[np.arange(len(tgt)), tgt]).tolist())
            running.append(math.exp(float(np.mean(nll))))
            if on_chunk:
                on_chunk(len(running), running[-1])
            bar.update(1)
    out = ppl_stats(nll)
    out["chunks"] = running
    out["n_ctx"] = n_ctx
    return out


def kl_divergence(base, tests, tokens, n_ctx=512, n_chunks=None, progress=False, save_base=None) -> list:
    """llama-perplexity --kl-divergence statistics of each test source against base, over the
    same chunks; base logits are computed once per chunk and kept in float32. With save_base,
    each chunk's base logits are appended to that file as soon as they are computed
    (BaseLogitsWriter), so no more than one chunk is held in memory."""
    chunks, first = chunks_of(base, tokens, n_ctx, n_chunks)
    acc = [{"nll_base": [], "nll_test": [], "kld": [], "p_diff": [], "same_top": [], "num": 0.0, "den": 0.0}
           for _ in tests]
    writer = None
    try:
        with _bar(len(chunks), "kld", progress) as bar:
            for chunk in chunks:
                zb = np.asarray(_scored_logits(base, chunk, first), dtype=np.float32)
                if save_base is not None:
                    if writer is None:
                        writer = BaseLogitsWriter(save_base, chunks, zb.shape[-1], base.name)
                    writer.append(zb)
                lb = log_softmax64(zb)
                tgt = targets(chunk, first)
                rows = np.arange(len(tgt))
                pb = np.exp(lb)
                for src, a in zip(tests, acc):
                    zt = np.asarray(_scored_logits(src, chunk, first), dtype=np.float32)
                    if zt.shape != zb.shape:
                        raise RefinferError(f"{src.name} gives logits {zt.shape}, the base {zb.shape}: different vocabularies?",
                                        hint="KL divergence compares models that share a tokenizer")
                    lt = log_softmax64(zt)
                    a["nll_base"].extend((-lb[rows, tgt]).tolist())
                    a["nll_test"].extend((-lt[rows, tgt]).tolist())
                    a["kld"].extend(np.sum(pb * (lb - lt), axis=-1).tolist())
                    a["p_diff"].extend((np.exp(lt[rows, tgt]) - pb[rows, tgt]).tolist())
                    a["same_top"].extend((np.argmax(zt, axis=-1) == np.argmax(zb, axis=-1)).tolist())
                    a["num"] += float(np.sum((zt.astype(np.float64) - zb) ** 2))
                    a["den"] += float(np.sum(zb.astype(np.float64) ** 2))
                bar.update(1)
        if writer is not None:
            writer.close()
    finally:
        if writer is not None:
            writer.abort()
    return [kld_stats(a["nll_base"], a["nll_test"], a["kld"], a["p_diff"], a["same_top"], a["num"], a["den"])
            for a in acc]


class BaseLogitsWriter:
    """`kld --save-base FILE`, written chunk by chunk: the safetensors header (tokens I32
    [n_chunk * n_ctx], logits F32 [n_chunk, n_ctx - 1 - n_ctx // 2, V]) first, since every
    size is known before the first chunk, then the tokens, then each chunk's logits as they
    come. The file is the same as one written at once, and LogitsFileSource reads both."""

    def __init__(self, path, chunks, n_vocab, source):
        from .dump import SafetensorsWriter
        n_ctx = len(chunks[0])
        self._out = SafetensorsWriter(path, {"tokens": ("I32", [len(chunks) * n_ctx]),
                                             "logits": ("F32", [len(chunks), n_ctx - 1 - n_ctx // 2, n_vocab])},
                                      {"format": LOGITS_FORMAT, "format_version": "1", "n_ctx": str(n_ctx),
                                       "source": source})
        self._out.write("tokens", np.asarray([t for c in chunks for t in c], dtype="<i4"))

    def append(self, chunk_logits):  # float32[n_ctx - 1 - n_ctx // 2, V]
        self._out.write("logits", chunk_logits[None])

    def close(self):
        self._out.close()

    def abort(self):
        self._out.abort()


def format_kld(r: dict) -> str:
    """The summary in llama-perplexity's layout and names."""
    lines = [
        "====== Perplexity statistics ======",
        f"Mean PPL(Q)                   : {r['ppl_test']:10.6f} ± {r['ppl_test_unc']:10.6f}",
        f"Mean PPL(base)                : {r['ppl_base']:10.6f} ± {r['ppl_base_unc']:10.6f}",
        f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * r['cor_ln_ppl']:6.2f}%",
        f"Mean ln(PPL(Q)/PPL(base))     : {r['ln_ppl_ratio']:10.6f} ± {r['ln_ppl_ratio_unc']:10.6f}",
        f"Mean PPL(Q)/PPL(base)         : {r['ppl_ratio']:10.6f} ± {r['ppl_ratio_unc']:10.6f}",
        f"Mean PPL(Q)-PPL(base)         : {r['ppl_diff']:10.6f}",
        "",
        "====== KL divergence statistics ======",
        f"Mean    KLD: {r['kld_mean']:10.6f} ± {r['kld_mean_unc']:10.6f}",
        f"Maximum KLD: {r['kld_max']:10.6f}",
    ]
    for f in (99.9, 99, 95, 90):
        lines.append(f"{f:4.1f}%   KLD: {r[f'kld_p{f:g}']:10.6f}")
    lines.append(f"Median  KLD: {r['kld_median']:10.6f}")
    for f in (10, 5, 1, 0.1):
        lines.append(f"{f:4.1f}%   KLD: {r[f'kld_p{f:g}']:10.6f}")
    lines += [
        f"Minimum KLD: {r['kld_min']:10.6f}",
        "",
        "====== Token probability statistics ======",
        f"RMS Δp    : {100 * r['rms_dp']:6.3f} ± {100 * r['rms_dp_unc']:5.3f} %",
        f"Same top p: {100 * r['same_top']:6.3f} ± {100 * r['same_top_unc']:5.3f} %",
        f"Logit NMSE: {r['nmse']:.3e}   (refinfer addition: scored positions, full vocabulary)",
    ]
    return "\n".join(lines)
