"""GGML block formats, implemented from the specification in NumPy.

Public API:

    quantize(x, qtype)   float32[..., k]             -> uint8[..., (k // block_size) * type_size]
    dequantize(raw, qtype) uint8[..., nb * type_size] -> float32[..., nb * block_size]
    get_type(qtype)      -> BlockType  (qtype: lower-case ggml name such as "q4_0", "q6_K", or
                                        the ggml type id)

Quantize output is byte-identical to ggml's reference quantizers (`quantize_row_*_ref`, what
llama-quantize writes without an imatrix); dequantize output is float-identical to ggml's
`dequantize_row_*`. Non-finite input to quantize raises NonFiniteError: ggml's scans skip NaN
when choosing a scale but then write garbage codes, and no model file should contain NaN.
"""

from __future__ import annotations

import numpy as np

from ..errors import NonFiniteError, ShapeError, UnsupportedError
from ._common import BlockType
from . import floats, q4_0, q4_1, q5_0, q5_1, q8_0, q8_1

_ALL: list[BlockType] = [
    floats.F32_BLOCK, floats.F16_BLOCK, floats.BF16_BLOCK,
    q4_0.BLOCK, q4_1.BLOCK, q5_0.BLOCK, q5_1.BLOCK, q8_0.BLOCK, q8_1.BLOCK,
]

try:  # the K-quants live in their own modules; see kquants.py
    from . import kquants as _kquants
    _ALL += _kquants.BLOCKS
except ImportError:  # pragma: no cover - only while a checkout lacks the module
    pass

TYPES: dict[str, BlockType] = {t.name: t for t in _ALL}
TYPES_BY_ID: dict[int, BlockType] = {t.type_id: t for t in _ALL}


def get_type(qtype) -> BlockType:
    if isinstance(qtype, BlockType):
        return qtype
    if isinstance(qtype, (int, np.integer)) and not isinstance(qtype, bool):
        if int(qtype) in TYPES_BY_ID:
            return TYPES_BY_ID[int(qtype)]
        raise UnsupportedError(
            f"unsupported ggml type id {int(qtype)}; supported: "
            + ", ".join(f"{t.name}={t.type_id}" for t in _ALL))
    if isinstance(qtype, str):
        key = qtype.strip()
        for cand in (key, key.lower(), key[:-1].lower() + key[-1].upper() if key.lower().endswith("_k") else key):
            if cand in TYPES:
                return TYPES[cand]
        # GGMLQuantizationType-like enums expose .name in upper case (Q4_0, Q6_K, BF16)
    if hasattr(qtype, "value") and hasattr(qtype, "name"):
        return get_type(int(qtype.value))
    raise UnsupportedError(f"unknown block type {qtype!r}; supported: {', '.join(TYPES)}")


def _check_last_axis(n: int, t: BlockType, what: str) -> int:
    unit = t.block_size if what == "elements" else t.type_size
    if n % unit:
        raise ShapeError(f"{t.name}: last axis has {n} {what}, not a multiple of the "
                         f"{t.name} {'block size' if what == 'elements' else 'block byte size'} {unit}")
    return n // unit


def quantize(x, qtype) -> np.ndarray:
    t = get_type(qtype)
    if t.quantize_blocks is None:
        raise UnsupportedError(f"quantization to {t.name} is not implemented (dequantize is)")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0:
        raise ShapeError("quantize needs at least one axis")
    nb = _check_last_axis(x.shape[-1], t, "elements")
    finite = np.isfinite(x)
    if not finite.all():
        bad = np.unravel_index(int(np.argmin(finite.ravel())), x.shape)
        raise NonFiniteError(f"cannot quantize to {t.name}: non-finite value {x[bad]} at index {tuple(int(i) for i in bad)}",
                             hint="ggml's quantizers give undefined codes for NaN/inf; clean the input first")
    blocks = x.reshape(-1, t.block_size)
    out = t.quantize_blocks(blocks) if len(blocks) else np.zeros((0, t.type_size), np.uint8)
    return out.reshape(*x.shape[:-1], nb * t.type_size)


def dequantize(raw, qtype) -> np.ndarray:
    t = get_type(qtype)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise ShapeError(f"dequantize expects uint8 bytes, got dtype {raw.dtype}")
    if raw.ndim == 0:
        raise ShapeError("dequantize needs at least one axis")
    nb = _check_last_axis(raw.shape[-1], t, "bytes")
    blocks = raw.reshape(-1, t.type_size)
    out = t.dequantize_blocks(blocks) if len(blocks) else np.zeros((0, t.block_size), np.float32)
    return out.astype(np.float32, copy=False).reshape(*raw.shape[:-1], nb * t.block_size)


def nbytes(qtype, n_elements: int) -> int:
    """Bytes taken by n_elements of qtype (n_elements must be a multiple of the block size)."""
    t = get_type(qtype)
    return _check_last_axis(int(n_elements), t, "elements") * t.type_size


__all__ = ["BlockType", "TYPES", "TYPES_BY_ID", "get_type", "quantize", "dequantize", "nbytes"]
