"""The C oracle: ggml's own quantize/dequantize, loaded from the libggml-base that
llama-cpp-python builds, through ctypes. Tests only; the engine never imports this."""

from __future__ import annotations

import ctypes
import pathlib

import numpy as np

from ci_skips import oracle_skip

GGML_TYPE_IDS = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8,
                 "q8_1": 9, "q2_K": 10, "q3_K": 11, "q4_K": 12, "q5_K": 13, "q6_K": 14,
                 "q8_K": 15, "bf16": 30}


class _TypeTraits(ctypes.Structure):  # struct ggml_type_traits (ggml.h)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_ROW_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def _lib_dir() -> pathlib.Path:
    import importlib.util
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llama_cpp is not installed")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "lib"


class Ggml:
    def __init__(self):
        libdir = _lib_dir()
        cands = sorted(libdir.glob("libggml-base.*")) or sorted(libdir.glob("libggml.*"))
        if not cands:
            raise ImportError(f"no libggml-base in {libdir}")
        self.lib = ctypes.CDLL(str(cands[0]))
        L = self.lib
        L.ggml_quantize_chunk.restype = ctypes.c_size_t
        L.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                          ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        L.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        L.ggml_get_type_traits.argtypes = [ctypes.c_int]
        L.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        L.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]

    def traits(self, name):
        return self.lib.ggml_get_type_traits(GGML_TYPE_IDS[name]).contents

    def quantize(self, x: np.ndarray, name: str) -> np.ndarray:
        """ggml_quantize_chunk (no imatrix) over rows of x: float32[nrows, n] -> uint8[nrows, bytes]."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        nrows, n = x.shape
        t = self.traits(name)
        out = np.zeros((nrows, n // t.blck_size * t.type_size), dtype=np.uint8)
        self.lib.ggml_quantize_chunk(GGML_TYPE_IDS[name], x.ctypes.data, out.ctypes.data, 0, nrows, n, None)
        return out

    def quantize_row_ref(self, x: np.ndarray, name: str) -> np.ndarray:
        """The type's from_float_ref (e.g. quantize_row_q8_1_ref) on a flat array."""
        x = np.ascontiguousarray(x, dtype=np.float32).ravel()
        t = self.traits(name)
        if name == "q8_1":  # q8_1 has no from_float_ref in the traits table; call it by name
            fn = self.lib.quantize_row_q8_1_ref
            fn.restype, fn.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        elif name == "q8_K":
            fn = self.lib.quantize_row_q8_K_ref
            fn.restype, fn.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        else:
            if not t.from_float_ref:
                raise ValueError(f"{name} has no from_float_ref")
            fn = _ROW_FN(t.from_float_ref)
        out = np.zeros(x.size // t.blck_size * t.type_size, dtype=np.uint8)
        fn(x.ctypes.data, out.ctypes.data, x.size)
        return out

    def dequantize(self, raw: np.ndarray, name: str) -> np.ndarray:
        """The type's to_float on a flat byte array."""
        raw = np.ascontiguousarray(raw, dtype=np.uint8).ravel()
        t = self.traits(name)
        if not t.to_float:
            raise ValueError(f"{name} has no to_float in ggml")
        n = raw.size // t.type_size * t.blck_size
        out = np.zeros(n, dtype=np.float32)
        _ROW_FN(t.to_float)(raw.ctypes.data, out.ctypes.data, n)
        return out


_GGML = None


def ggml() -> Ggml:
    """The oracle, or a skip with the reason when llama-cpp-python cannot be loaded (a failure
    under CI=true: see ci_skips.py)."""
    global _GGML
    if _GGML is None:
        try:
            _GGML = Ggml()
        except (ImportError, OSError) as e:
            oracle_skip(f"libggml oracle unavailable (install llama-cpp-python): {e}")
    return _GGML


class _CpuTraits(ctypes.Structure):  # struct ggml_type_traits_cpu (ggml-cpu.h)
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p),
                ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]


_VEC_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                            ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class GgmlCpu:
    """ggml's CPU matmul building blocks: the activation quantizer (from_float of the weight's
    vec_dot_type) and the row dot product (vec_dot), exactly as MUL_MAT calls them."""

    def __init__(self, base: Ggml):
        self.base = base
        libdir = _lib_dir()
        cands = sorted(libdir.glob("libggml-cpu.*"))
        if not cands:
            raise ImportError(f"no libggml-cpu in {libdir}")
        self.lib = ctypes.CDLL(str(cands[0]))
        self.lib.ggml_cpu_init.restype = None
        self.lib.ggml_cpu_init()
        self.lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_CpuTraits)
        self.lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]

    def matmul(self, x: np.ndarray, w_raw: np.ndarray, name: str) -> np.ndarray:
        """x float32[T, n] @ W.T where W is uint8[rows, row_bytes] of type name -> float32[T, rows]."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        w_raw = np.ascontiguousarray(w_raw, dtype=np.uint8)
        T, n = x.shape
        tw = self.lib.ggml_get_type_traits_cpu(GGML_TYPE_IDS[name]).contents
        vd = tw.vec_dot_type
        vd_traits = self.base.lib.ggml_get_type_traits(vd).contents
        row_bytes_x = n // vd_traits.blck_size * vd_traits.type_size
        xq = np.zeros((T, row_bytes_x), dtype=np.uint8)
        if vd == GGML_TYPE_IDS["f32"]:
            xq = x.view(np.uint8).copy()
        else:
            from_float = _ROW_FN(self.lib.ggml_get_type_traits_cpu(vd).contents.from_float)
            for t in range(T):
                from_float(x[t].ctypes.data, xq[t].ctypes.data, n)
        dot = _VEC_DOT(tw.vec_dot)
        out = np.zeros((T, w_raw.shape[0]), dtype=np.float32)
        s = ctypes.c_float()
        for t in range(T):
            for r in range(w_raw.shape[0]):
                dot(n, ctypes.byref(s), 0, w_raw[r].ctypes.data, 0, xq[t].ctypes.data, 0, 1)
                out[t, r] = s.value
        return out


_CPU = None


def ggml_cpu() -> GgmlCpu:
    global _CPU
    if _CPU is None:
        try:
            _CPU = GgmlCpu(ggml())
        except (ImportError, OSError) as e:
            oracle_skip(f"libggml-cpu oracle unavailable (install llama-cpp-python): {e}")
    return _CPU
