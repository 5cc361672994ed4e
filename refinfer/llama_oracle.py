"""llama.cpp (through llama-cpp-python) as a comparison source: teacher-forced logits and the
intermediate tensors of its forward pass, read with the scheduler's eval callback.

Only comparison commands and tests import this module; the engine never does.
"""

from __future__ import annotations

import ctypes
import pathlib

import numpy as np

from .errors import RefinferError

GGML_MAX_DIMS = 4
GGML_TYPE_F32 = 0


class _TensorHead(ctypes.Structure):
    # The first fields of struct ggml_tensor (ggml.h): type, buffer, ne[4], nb[4]. Stable since
    # ggml's backend rework; everything else is read through exported functions.
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * GGML_MAX_DIMS), ("nb", ctypes.c_size_t * GGML_MAX_DIMS)]


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise RefinferError(f"llama-cpp-python is needed for this comparison: {e}",
                            hint='pip install "refinfer[test]" (or pip install llama-cpp-python)') from None
    return llama_cpp


def _ggml_base(llama_cpp):
    libdir = pathlib.Path(llama_cpp.__file__).parent / "lib"
    cands = sorted(libdir.glob("libggml-base.*"))
    if not cands:
        raise RefinferError(f"no libggml-base in {libdir}")
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


def llama_intermediates(model_path, tokens, *, n_threads=2, flash_attn=False, kv_f32=False):
    """Run tokens through llama.cpp in one batch; returns (logits float32[T, vocab],
    {name: float32 array in NumPy order, i.e. ggml ne reversed}) for every contiguous F32
    tensor its graph computes (names such as attn_norm-0, Qcur-0, kqv_out-0, l_out-0)."""
    llama_cpp = _llama_cpp()
    base = _ggml_base(llama_cpp)
    tokens = [int(t) for t in tokens]
    captured = {}

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

    callback = llama_cpp.ggml_backend_sched_eval_callback(cb)
    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
    if not model:
        raise RefinferError(f"llama.cpp could not load {model_path}")
    try:
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = max(64, len(tokens))
        cparams.n_batch = cparams.n_ubatch = max(64, len(tokens))
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.cb_eval = callback
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if kv_f32:
            cparams.type_k = cparams.type_v = GGML_TYPE_F32
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise RefinferError("llama.cpp could not create a context")
        try:
            batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
            try:
                batch.n_tokens = len(tokens)
                for i, tok in enumerate(tokens):
                    batch.token[i] = tok
                    batch.pos[i] = i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = True
                rc = llama_cpp.llama_decode(ctx, batch)
                if rc != 0:
                    raise RefinferError(f"llama_decode failed with code {rc}")
                n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
                ptr = llama_cpp.llama_get_logits(ctx)
                logits = np.ctypeslib.as_array(ptr, shape=(len(tokens) * n_vocab,)).copy().reshape(len(tokens), n_vocab)
            finally:
                llama_cpp.llama_batch_free(batch)
        finally:
            llama_cpp.llama_free(ctx)
    finally:
        llama_cpp.llama_model_free(model)
    return logits, captured
