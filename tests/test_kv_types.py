"""llama.cpp's KV cache types as refinfer cache types: a row is stored with the bytes llama.cpp's
CPU backend writes (ggml_set_rows calls the type's CPU from_float: x86 quantize_row_q8_0 for
q8_0, the _ref quantizers for q4_0, q4_1, q5_0, q5_1, ggml's bf16 rounding) and loaded with
ggml's to_float, both compared byte for byte with libggml; the row size is the type's formula;
a head_dim the block does not divide is refused with the numbers."""

from __future__ import annotations

import numpy as np
import pytest

from refinfer.errors import ShapeError, UnsupportedError
from refinfer.kv_cache import BlockPool, get_cache_type

GGML_KV_TYPES = ("bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
BYTES_PER_32 = {"bf16": 64, "q8_0": 34, "q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24}


def rows(rng, n, head_dim):
    x = rng.standard_normal((n, head_dim)).astype(np.float32) * rng.choice([1e-3, 1.0, 40.0], (n, 1)).astype(np.float32)
    x[0] = 0.0                                                   # an all-zero row: scale 0
    x[1, :32] = np.arange(32, dtype=np.float32) - np.float32(15.5)     # a ramp of halves
    x[2, ::2] = -x[2, 1::2]                                      # symmetric: max == -min
    return x


def ggml_from_float(x: np.ndarray, name: str) -> np.ndarray:
    """llama.cpp CPU's from_float of the type (what ggml_set_rows stores), row by row."""
    from oracle import _ROW_FN, GGML_TYPE_IDS, ggml_cpu
    cpu = ggml_cpu()
    fn = _ROW_FN(cpu.lib.ggml_get_type_traits_cpu(GGML_TYPE_IDS[name]).contents.from_float)
    n, hd = x.shape
    out = np.zeros((n, get_cache_type(name).row_bytes(hd)), dtype=np.uint8)
    for i in range(n):
        fn(np.ascontiguousarray(x[i]).ctypes.data, out[i].ctypes.data, hd)
    return out


@pytest.mark.parametrize("name", GGML_KV_TYPES)
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_store_writes_llama_cpps_bytes_and_load_its_floats(name, head_dim, ggml):
    x = rows(np.random.default_rng([head_dim, len(name)]), 12, head_dim)
    t = get_cache_type(name)
    dst = np.zeros((12, t.row_bytes(head_dim)), dtype=np.uint8)
    t.store(dst, x)
    assert np.array_equal(dst, ggml_from_float(x, name))
    assert np.array_equal(t.load(dst), ggml.dequantize(dst.reshape(-1), name).reshape(12, head_dim))


def test_q8_0_store_is_the_x86_quantizer_not_the_ref_one():
    # a value at exactly .5 after scaling: the x86 quantizer rounds half to even, _ref away
    from refinfer.quant.q8_0 import quantize_blocks, quantize_blocks_x86
    x = np.zeros((1, 32), dtype=np.float32)
    x[0, 0] = 127.0
    x[0, 1] = 2.5                                  # 2.5 * 127/127 = 2.5: even 2, away 3
    assert quantize_blocks_x86(x)[0, 3] == 2 and quantize_blocks(x)[0, 3] == 3
    assert np.array_equal(ggml_from_float(x, "q8_0"), quantize_blocks_x86(x))


@pytest.mark.parametrize("name", GGML_KV_TYPES)
def test_row_bytes_is_the_type_formula_and_the_pool_holds_them(name):
    t = get_cache_type(name)
    assert t.row_bytes(64) == 2 * BYTES_PER_32[name]
    shape = dict(n_layers=2, n_kv_heads=3, head_dim=64, block_size=16, k_type=name, v_type="f16")
    per_block = BlockPool.bytes_per_block(**shape)
    assert per_block == 2 * 16 * 3 * (2 * BYTES_PER_32[name] + 2 * 64)


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q5_1"])
def test_a_head_dim_the_block_does_not_divide_is_refused(name):
    with pytest.raises(ShapeError, match="head_dim 48 is not a multiple of its block size 32"):
        get_cache_type(name).row_bytes(48)


def test_an_unknown_cache_type_lists_the_known_ones():
    with pytest.raises(UnsupportedError) as e:
        get_cache_type("q3_K")
    assert all(n in str(e.value) for n in ("f16", "q8_0", "q4_0", "q5_1"))

