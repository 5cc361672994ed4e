"""llama.cpp (through llama-cpp-python) as a comparison source: teacher-forced logits and the
intermediate tensors of its forward pass, read with the scheduler's eval callback.

Only comparison commands and tests import this module; the engine never does.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pathlib

import numpy as np

from .errors import RefinferError

# The build the README installs: ggml's portable AVX2 path, the one ggml mode reproduces.
LLAMA_CPP_HINT = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON '
                  '-DGGML_BMI2=ON" pip install "refinfer[test]" (builds llama-cpp-python, about 10 minutes)')

GGML_MAX_DIMS = 4
GGML_TYPE_F32 = 0
GGML_CACHE_TYPE_IDS = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}  # enum ggml_type


class _TensorHead(ctypes.Structure):
    # The first fields of struct ggml_tensor (ggml.h): type, buffer, ne[4], nb[4]. Stable since
    # ggml's backend rework; everything else is read through exported functions.
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * GGML_MAX_DIMS), ("nb", ctypes.c_size_t * GGML_MAX_DIMS)]


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise RefinferError(f"llama-cpp-python is needed for this comparison: {e}", hint=LLAMA_CPP_HINT) from None
    return llama_cpp


def version() -> str:
    """The llama-cpp-python release the oracle runs ("unknown" without it): part of a floor
    table's cache key."""
    try:
        import llama_cpp
    except ImportError:
        return "unknown"
    return f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')}"


def _ggml_base(llama_cpp):
    libdir = pathlib.Path(llama_cpp.__file__).parent / "lib"
    cands = sorted(libdir.glob("libggml-base.*"))
    if not cands:
        raise RefinferError(f"no libggml-base in {libdir}",
                            hint=f"reinstall llama-cpp-python: {LLAMA_CPP_HINT}")
    lib = ctypes.CDLL(str(cands[0]))
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_is_contiguous.restype = ctypes.c_bool
    lib.ggml_is_contiguous.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


def open_llama(model_path, *, plain=True, **kwargs):
    """llama_cpp.Llama(model_path=model_path, **kwargs). plain=True keeps the weights in ordinary
    CPU buffers (llama_model_params.use_extra_bufts = False, which Llama() does not expose): no
    AMX tiles or repacked interleaved blocks. That is the path whose arithmetic refinfer's ggml
    mode reproduces, and a workaround for builds whose AMX kernels crash on quantized models."""
    llama_cpp = _llama_cpp()
    lib = llama_cpp.llama_cpp  # the module Llama.__init__ takes its default params from
    default_params = lib.llama_model_default_params

    def params():
        p = default_params()
        p.use_extra_bufts = not plain
        return p

    lib.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=os.fspath(model_path), **kwargs)
    finally:
        lib.llama_model_default_params = default_params


def llama_intermediates(model_path, tokens, *, n_threads=1, flash_attn=False, kv_f32=False):
    """Run tokens through llama.cpp in one batch; returns (logits float32[T, vocab],
    {name: float32 array in NumPy order, i.e. ggml ne reversed}) for every contiguous F32
    tensor its graph computes (names such as attn_norm-0, Qcur-0, kqv_out-0, l_out-0)."""
    variant = "flash_attn" if flash_attn else "default"
    # one decode call for the whole prompt, so that every captured tensor covers every token
    with LlamaCpp(model_path, variant=variant, n_ctx=len(tokens), n_threads=n_threads, capture=True,
                  kv_f32=kv_f32, n_batch=max(64, len(tokens))) as llm:
        logits = llm.logits(tokens)
        return logits, llm.captured


# llama.cpp's own settings that change its results; every one is a legitimate llama.cpp output,
# so their spread around the default is llama.cpp's noise floor.
VARIANTS = {
    "default": {},                       # batch prefill, F16 KV cache, no flash attention
    "single_token": {"n_batch": 1},      # one token per llama_decode call
    "flash_attn": {"flash_attn": True},
    "kv_f32": {"kv_f32": True},          # GGML_TYPE_F32 KV cache
}


def _quiet(llama_cpp):
    # llama-cpp-python prints llama.cpp's log lines at or above its logger's level
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


class LlamaCpp:
    """One llama.cpp model and context on its plain CPU path, for teacher-forced logits.

    The model is loaded with use_extra_bufts = False: llama.cpp otherwise moves q4_0/q4_1/q8_0
    weights into repacked or AMX buffers, which round differently from the plain CPU kernels
    (and crash llama-cpp-python 0.3.36 on AMX machines). The KV cache is cleared before every
    logits() call, as llama-perplexity clears it before every chunk.

    One thread by default: the logits do not depend on the thread count (checked bit for bit on
    q4_1, f16 and SmolLM2), and on a busy machine ggml's spin-waiting threads make two threads
    up to 100x slower than one."""

    def __init__(self, model_path, variant="default", n_ctx=512, n_threads=1, capture=False, kv_f32=False,
                 n_batch=None, type_k=None, type_v=None, flash_attn=None):
        if variant not in VARIANTS:
            raise RefinferError(f"unknown llama.cpp variant {variant!r}; choose one of {', '.join(VARIANTS)}",
                                hint="e.g. llama.cpp[variant=flash_attn]:MODEL.gguf")
        opts = dict(VARIANTS[variant])
        llama_cpp = self._lib = _llama_cpp()
        _quiet(llama_cpp)
        self.path = str(model_path)
        self.variant = variant
        # tokens per llama_decode call: llama.cpp's default ubatch of 512 unless given
        self.n_batch = opts.get("n_batch", n_batch or 512)
        self.captured = {}
        self._model = self._ctx = None
        mparams = llama_cpp.llama_model_default_params()
        mparams.use_extra_bufts = False
        if not pathlib.Path(self.path).is_file():
            raise RefinferError(f"{self.path}: no such model file", hint="give the path of a GGUF file")
        self._model = llama_cpp.llama_model_load_from_file(self.path.encode(), mparams)
        if not self._model:
            raise RefinferError(f"llama.cpp could not load {self.path}",
                                hint="python -m refinfer inspect MODEL shows whether the file is a valid GGUF")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(self._vocab))
        self.n_ctx = max(64, int(n_ctx))
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self.n_ctx
        cparams.n_batch = cparams.n_ubatch = min(self.n_batch, self.n_ctx)
        cparams.n_threads = cparams.n_threads_batch = n_threads
        fa = opts.get("flash_attn") if flash_attn is None else flash_attn
        cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if fa
                                   else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        if opts.get("kv_f32") or kv_f32:
            cparams.type_k = cparams.type_v = GGML_TYPE_F32
        # cache types by name (llama.cpp's --cache-type-k/-v): the quantized ones are stored as
        # ggml blocks by ggml_set_rows, a quantized V only with flash attention
        for field, name in (("type_k", type_k), ("type_v", type_v)):
            if name is not None:
                if name not in GGML_CACHE_TYPE_IDS:
                    raise RefinferError(f"llama.cpp cache type {name!r} unknown here",
                                        hint=f"one of {', '.join(GGML_CACHE_TYPE_IDS)}")
                setattr(cparams, field, GGML_CACHE_TYPE_IDS[name])
        if capture:
            self._callback = llama_cpp.ggml_backend_sched_eval_callback(self._capture_cb(_ggml_base(llama_cpp)))
            cparams.cb_eval = self._callback
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            raise RefinferError("llama.cpp could not create a context", hint="try a smaller -c")

    def _capture_cb(self, base):
        captured = self.captured

        def cb(t, ask, _user):
            if ask:
                return True
            name = base.ggml_get_name(t).decode("utf-8", "replace")
            head = _TensorHead.from_address(t)
            if head.type != GGML_TYPE_F32 or not base.ggml_is_contiguous(t):
                return True
            n = base.ggml_nbytes(t)
            buf = np.empty(n // 4, dtype=np.float32)
            base.ggml_backend_tensor_get(t, buf.ctypes.data, 0, n)
            shape = tuple(int(head.ne[i]) for i in reversed(range(GGML_MAX_DIMS)))
            while len(shape) > 1 and shape[0] == 1:
                shape = shape[1:]
            captured[name] = buf.reshape(shape)
            return True
        return cb

    def tokenize(self, text: str, add_special=True) -> list:
        raw = text.encode("utf-8")
        n_max = len(raw) + 8
        buf = (self._lib.llama_token * n_max)()
        n = self._lib.llama_tokenize(self._vocab, raw, len(raw), buf, n_max, add_special, False)
        if n < 0:
            raise RefinferError(f"llama.cpp tokenization needs {-n} tokens, more than {n_max}",
                                hint="a bug in the buffer estimate; please report the text")
        return list(buf[:n])

    def logits(self, tokens) -> np.ndarray:
        """Teacher-forced logits float32[len(tokens), vocab] from a cleared KV cache."""
        llama_cpp = self._lib
        tokens = [int(t) for t in tokens]
        if not tokens or len(tokens) > self.n_ctx:
            raise RefinferError(f"llama.cpp context holds 1..{self.n_ctx} tokens, got {len(tokens)}",
                                hint="use a larger -c or fewer tokens")
        if min(tokens) < 0 or max(tokens) >= self.n_vocab:
            raise RefinferError(f"token id out of range [0, {self.n_vocab})",
                                hint="the token ids must come from this model's tokenizer")
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        out = np.empty((len(tokens), self.n_vocab), dtype=np.float32)
        step = min(self.n_batch, self.n_ctx)
        batch = llama_cpp.llama_batch_init(step, 0, 1)
        try:
            for s in range(0, len(tokens), step):
                part = tokens[s: s + step]
                batch.n_tokens = len(part)
                for i, tok in enumerate(part):
                    batch.token[i] = tok
                    batch.pos[i] = s + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = True
                rc = llama_cpp.llama_decode(self._ctx, batch)
                if rc != 0:
                    raise RefinferError(f"llama_decode failed with code {rc}",
                                        hint="llama.cpp's log above gives the reason; try a smaller -c")
                ptr = llama_cpp.llama_get_logits(self._ctx)
                out[s: s + len(part)] = np.ctypeslib.as_array(ptr, shape=(len(part) * self.n_vocab,)).reshape(len(part), -1)
        finally:
            llama_cpp.llama_batch_free(batch)
        return out

    def close(self):
        if self._ctx:
            self._lib.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            self._lib.llama_model_free(self._model)
            self._model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def llama_logits(model_path, tokens, variant="default", n_threads=1, n_ctx=None) -> np.ndarray:
    """float32[len(tokens), vocab] teacher-forced logits from llama.cpp under one variant."""
    with LlamaCpp(model_path, variant=variant, n_ctx=n_ctx or len(tokens), n_threads=n_threads) as llm:
        return llm.logits(tokens)


def noise_floor(model_path, tokens, base=None):
    """llama.cpp's spread under its own settings: (default logits, {variant: compare_logits
    against the default}, plus 'worst': the largest nmse/kld and the smallest same_top)."""
    from .metrics import compare_logits
    base = llama_logits(model_path, tokens) if base is None else base
    out = {v: compare_logits(llama_logits(model_path, tokens, v), base) for v in VARIANTS if v != "default"}
    out["worst"] = {"nmse": max(r["nmse"] for r in out.values()),
                    "kld_mean": max(r["kld_mean"] for r in out.values()),
                    "same_top": min(r["same_top"] for r in out.values())}
    return base, out
