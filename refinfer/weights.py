"""The weights of a Llama-family model, named after their GGUF tensors (so loading needs no
rename table for GGUF files), each matrix kept in its stored block format."""

from __future__ import annotations

import dataclasses
import mmap

import numpy as np

from . import quant
from .quant import BlockType


@dataclasses.dataclass(eq=False)
class QTensor:
    """A 2-D weight matrix W (rows, cols) stored as rows of ggml blocks, as in the file.

    raw: uint8[rows, cols // block_size * type_size], often a read-only memory map.
    """

    name: str
    raw: np.ndarray
    qtype: BlockType
    shape: tuple  # (rows, cols) = (out_features, in_features); blocks run along cols

    def dequantize(self, rows=None) -> np.ndarray:  # -> float32[rows, cols]
        raw = self.raw if rows is None else self.raw[rows]
        return quant.dequantize(raw, self.qtype)

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    def __repr__(self):
        return f"QTensor({self.name!r}, {self.qtype.name}, {self.shape})"

    def release_pages(self):
        """Drop the resident pages of a memory-mapped raw (madvise MADV_DONTNEED) after a
        backend has copied the matrix into a layout of its own: otherwise the file's pages,
        touched once by the copy, count in this process's memory next to the copy. The file
        is read again if raw is used later; other arrays are left alone."""
        owner = self.raw
        while owner is not None and not isinstance(owner, mmap.mmap):
            owner = owner.obj if isinstance(owner, memoryview) else getattr(owner, "base", None)
        dontneed = getattr(mmap, "MADV_DONTNEED", None)   # not on every platform
        if owner is None or dontneed is None or self.raw.nbytes == 0:
            return
        start = self.raw.ctypes.data - np.frombuffer(owner, np.uint8, count=1).ctypes.data
        page = mmap.PAGESIZE
        lo = start // page * page
        owner.madvise(dontneed, lo, start + self.raw.nbytes - lo)


@dataclasses.dataclass
class LayerWeights:
    attn_norm: np.ndarray           # (dim,)
    attn_q: QTensor                 # (n_heads * head_dim, dim)
    attn_k: QTensor                 # (n_kv_heads * head_dim, dim)
    attn_v: QTensor                 # (n_kv_heads * head_dim, dim)
    attn_output: QTensor            # (dim, n_heads * head_dim)
    ffn_norm: np.ndarray            # (dim,)
    ffn_gate: QTensor               # (hidden_dim, dim)
    ffn_up: QTensor                 # (hidden_dim, dim)
    ffn_down: QTensor               # (dim, hidden_dim)
    attn_q_bias: np.ndarray | None = None  # (n_heads * head_dim,)  qwen2 only
    attn_k_bias: np.ndarray | None = None  # (kv_dim,)
    attn_v_bias: np.ndarray | None = None  # (kv_dim,)


@dataclasses.dataclass
class Weights:
    token_embd: QTensor             # (vocab_size, dim)
    layers: list                    # [LayerWeights] * n_layers
    output_norm: np.ndarray         # (dim,)
    output: QTensor                 # (vocab_size, dim); token_embd itself when embeddings are tied
    rope_freqs: np.ndarray | None = None  # (rope_dim // 2,) Llama 3 per-frequency theta divisors

    def matrices(self):
        yield self.token_embd
        for layer in self.layers:
            for f in dataclasses.fields(layer):
                v = getattr(layer, f.name)
                if isinstance(v, QTensor):
                    yield v
        if self.output is not self.token_embd:
            yield self.output
