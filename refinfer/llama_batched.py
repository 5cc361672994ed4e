"""llama.cpp's multi-sequence batched decode through llama-cpp-python's low-level API, as
llama-batched-bench (tools/batched-bench) measures it, for `python -m refinfer bench --batched`.

One context holds n_seq_max sequences in one unified KV cache (kv_unified: every sequence's
cells come from one buffer of n_ctx cells, as llama-server's slots share it). A step is one
llama_batch: prefill puts every sequence's prompt in one batch (logits only at each prompt's
last token) and llama_decode splits it into ubatches; a decode step holds one token per
sequence, each with its logits. Settings, the same as refinfer's side of the bench:
  - the plain CPU path: llama_model_params.use_extra_bufts = False (no repacked or AMX weights);
  - flash attention off (LLAMA_FLASH_ATTN_TYPE_DISABLED), an F16 KV cache (llama.cpp's default);
  - n_threads = n_threads_batch = the bench's thread count.

Only the bench imports this module; the engine never does.
"""

from __future__ import annotations

import os
import pathlib
import time

import numpy as np

from .errors import RefinferError
from .llama_oracle import _llama_cpp, _quiet

SETTINGS = {"flash_attn": "off", "kv_unified": True, "extra_bufts": "off", "kv_type": "f16"}


class LlamaBatched:
    def __init__(self, model_path, *, n_seq_max, n_ctx, n_threads, n_batch=2048, n_ubatch=512, type_k="f16",
                 type_v="f16", flash_attn=False):
        llama_cpp = self._lib = _llama_cpp()
        _quiet(llama_cpp)
        self.path = os.fspath(model_path)
        self._model = self._ctx = None
        if not pathlib.Path(self.path).is_file():
            raise RefinferError(f"{self.path}: no such model file", hint="give the path of a GGUF file")
        mparams = llama_cpp.llama_model_default_params()
        mparams.use_extra_bufts = False
        self._model = llama_cpp.llama_model_load_from_file(self.path.encode(), mparams)
        if not self._model:
            raise RefinferError(f"llama.cpp could not load {self.path}",
                                hint="python -m refinfer inspect MODEL shows whether the file is a valid GGUF")
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model)))
        self.n_seq_max = int(n_seq_max)
        self.n_batch = int(n_batch)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = int(n_ctx)
        cparams.n_batch, cparams.n_ubatch = self.n_batch, min(int(n_ubatch), self.n_batch)
        cparams.n_seq_max = self.n_seq_max
        cparams.n_threads = cparams.n_threads_batch = int(n_threads)
        cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                   else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        from .llama_oracle import GGML_CACHE_TYPE_IDS
        cparams.type_k, cparams.type_v = GGML_CACHE_TYPE_IDS[type_k], GGML_CACHE_TYPE_IDS[type_v]
        self.type_k, self.type_v = type_k, type_v
        cparams.kv_unified = True
        cparams.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            raise RefinferError(f"llama.cpp could not create a context of {n_ctx} cells for {n_seq_max} sequences",
                                hint="use fewer or shorter sequences (-p, -n, --seqs)")
        self.n_ctx = int(llama_cpp.llama_n_ctx(self._ctx))
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, self.n_seq_max)

    # -- one llama_decode call per step ---------------------------------------------------------

    def clear(self):
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self._ctx), True)

    def copy_sequence(self, src: int, dst: int, n_positions: int):
        """Share src's first n_positions cells with dst (llama-server's cached system prompt)."""
        self._lib.llama_memory_seq_cp(self._lib.llama_get_memory(self._ctx), src, dst, 0, n_positions)

    def decode(self, entries) -> np.ndarray:
        """entries: (token, pos, seq_id, wants_logits) in order, split into llama_decode calls
        of n_batch tokens as batched-bench's decode_helper does -> the logit rows float32
        [n_wanted, vocab] in entry order: a view into llama.cpp's buffer for one call (valid
        until the next), copies when the batch took several."""
        b, rows = self._batch, []
        for s in range(0, len(entries), self.n_batch):
            part = entries[s:s + self.n_batch]
            b.n_tokens = len(part)
            n_out = 0
            for i, (tok, pos, seq, want) in enumerate(part):
                b.token[i], b.pos[i], b.n_seq_id[i] = int(tok), int(pos), 1
                b.seq_id[i][0] = int(seq)
                b.logits[i] = bool(want)
                n_out += bool(want)
            rc = self._lib.llama_decode(self._ctx, b)
            if rc != 0:
                raise RefinferError(f"llama_decode failed with code {rc} on a batch of {len(part)} tokens",
                                    hint="llama.cpp's KV cache is too small for this workload: fewer --seqs or a shorter -p/-n")
            ptr = self._lib.llama_get_logits(self._ctx)
            rows.append(np.ctypeslib.as_array(ptr, shape=(n_out * self.n_vocab,)).reshape(n_out, self.n_vocab))
            if s + self.n_batch < len(entries):
                rows[-1] = rows[-1].copy()
        return rows[0] if len(rows) == 1 else np.concatenate(rows)

    # -- the workloads ----------------------------------------------------------------------------

    def prefill(self, prompts, seq0=0, start=0) -> np.ndarray:
        """Every prompt at positions start.. into sequence seq0 + j, in one batch -> a copy of
        the logits of each prompt's last token float32[len(prompts), vocab]."""
        entries = [(t, start + i, seq0 + j, i == len(p) - 1) for j, p in enumerate(prompts) for i, t in enumerate(p)]
        return np.array(self.decode(entries))

    def generate(self, prompts, n_steps, pick):
        """Batched decode after prefill: step i feeds every sequence its token i, picked from
        the previous logits by pick(j, logits_row, i) -> token. Returns (tokens int64[S, n_steps + 1],
        prompt-last logits [S, V], last step's logits [S, V], prefill seconds, decode seconds)."""
        S = len(prompts)
        toks = np.zeros((S, n_steps + 1), np.int64)
        self.clear()
        t0 = time.perf_counter()
        z0 = self.prefill(prompts)
        for j in range(S):
            toks[j, 0] = pick(j, z0[j], 0)
        t1 = time.perf_counter()
        z = z0
        for i in range(n_steps):
            z = self.decode([(toks[j, i], len(prompts[j]) + i, j, True) for j in range(S)])
            for j in range(S):
                toks[j, i + 1] = pick(j, z[j], i + 1)
        t2 = time.perf_counter()
        return toks, z0, z.copy(), t1 - t0, t2 - t1

    def kv_bytes(self) -> int:
        """Bytes of the unified KV cache: n_ctx cells x layers x KV heads x (a K row + a V row of
        head_dim values in their ggml types: 2 * head_dim bytes each for F16)."""
        from .kv_cache import get_cache_type
        lib = self._lib
        head_dim = lib.llama_model_n_embd(self._model) // lib.llama_model_n_head(self._model)
        row = get_cache_type(self.type_k).row_bytes(head_dim) + get_cache_type(self.type_v).row_bytes(head_dim)
        return self.n_ctx * lib.llama_model_n_layer(self._model) * lib.llama_model_n_head_kv(self._model) * row

    def sampler_chain(self, seed, top_k=40, top_p=0.95, min_p=0.05, temperature=0.8):
        """llama.cpp's default chain (common/sampling.cpp's order, penalties off) with its own
        seeded distribution sampler; free it with free_sampler."""
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        for s in (lib.llama_sampler_init_top_k(top_k), lib.llama_sampler_init_top_p(top_p, 1),
                  lib.llama_sampler_init_min_p(min_p, 1), lib.llama_sampler_init_temp(temperature),
                  lib.llama_sampler_init_dist(seed)):
            lib.llama_sampler_chain_add(chain, s)
        return chain

    def sample(self, chain, row: int) -> int:
        return int(self._lib.llama_sampler_sample(chain, self._ctx, row))

    def free_sampler(self, chain):
        self._lib.llama_sampler_free(chain)

    def close(self):
        lib = self._lib
        if getattr(self, "_batch", None) is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            lib.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            lib.llama_model_free(self._model)
            self._model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
