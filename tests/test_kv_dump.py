"""`dump` writes the stored K/V of every layer (the values attention reads, and a quantized type's
codes, scales and mins or zeros), and `compare` of an f32-cache dump against a quantized-cache
dump names the first cache store as the first divergence."""

from __future__ import annotations

import numpy as np
import pytest

from ci_skips import oracle_import
from refinfer.cli import main
from refinfer.dump import compare_dumps, read_dump


@pytest.fixture(scope="module")
def hd32_gguf(tmp_path_factory, vocab_dir):
    from models import make_tiny_llama_gguf
    return make_tiny_llama_gguf(tmp_path_factory.mktemp("kvdump") / "hd32.gguf",
                                vocab_gguf=vocab_dir / "ggml-vocab-llama-spm.gguf", dim=64, n_heads=2, n_kv_heads=1,
                                hidden_dim=96, ctx=64, dtype="f32", seed=21, n_vocab=600)


def dump(path, out, *extra):
    assert main(["dump", "-m", str(path), "--tokens", "1,20,30,40,50,60,70", "-o", str(out), "--no-progress",
                 *extra]) == 0
    return read_dump(out)


def test_dump_holds_the_stored_blocks_and_they_are_ggmls(hd32_gguf, tmp_path):
    """cache_k-N is K quantized and dequantized by libggml's q4_0 (through gguf.quants, the
    reference quantizer llama.cpp's CPU store uses for q4_0); its codes and scales rebuild it."""
    gq = oracle_import("gguf.quants")
    from gguf import GGMLQuantizationType
    d = dump(hd32_gguf, tmp_path / "q.safetensors", "-ctk", "q4_0", "-ctv", "lmdeploy-int8")
    assert d.header["cache_type_k"] == "q4_0" and d.header["cache_type_v"] == "lmdeploy-int8"
    for layer in range(2):
        k = d.tensors[f"Kcur-{layer}"]
        want = gq.dequantize(gq.quantize(k.reshape(-1, 32), GGMLQuantizationType.Q4_0),
                             GGMLQuantizationType.Q4_0).reshape(k.shape)
        np.testing.assert_array_equal(d.tensors[f"cache_k-{layer}"], want)
        codes, scale = d.tensors[f"cache_k_codes-{layer}"], d.tensors[f"cache_k_scale-{layer}"]
        assert codes.dtype == np.int32 and codes.min() >= -8 and codes.max() <= 7
        rebuilt = (scale[..., None] * codes.reshape(*codes.shape[:-1], -1, 32)).reshape(codes.shape)
        np.testing.assert_array_equal(rebuilt.astype(np.float32), d.tensors[f"cache_k-{layer}"])
        # LMDeploy TurboMind int8: w = codes * scale + zero per (token, head), zero = the row's min
        v, vc = d.tensors[f"Vcur-{layer}"], d.tensors[f"cache_v_codes-{layer}"]
        vs, vz = d.tensors[f"cache_v_scale-{layer}"], d.tensors[f"cache_v_zero-{layer}"]
        np.testing.assert_array_equal(vz[..., 0], v.min(-1).astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal((vc * vs + vz).astype(np.float32), d.tensors[f"cache_v-{layer}"])
        assert np.max(np.abs(d.tensors[f"cache_v-{layer}"] - v)) <= 0.51 * vs.max() + 1e-3


def test_compare_finds_the_first_cache_store(hd32_gguf, tmp_path):
    ref = dump(hd32_gguf, tmp_path / "f32.safetensors")
    test = dump(hd32_gguf, tmp_path / "q8.safetensors", "-ctk", "q8_0", "-ctv", "q8_0")
    assert "cache_k_codes-0" not in ref.tensors and "cache_k-0" in ref.tensors
    # the tolerance `compare` applies between two refinfer dumps of one mode (they agree to 1e-10
    # up to the cache): q8_0's error (NMSE ~1e-5) is far above it
    diffs, _, only_test = compare_dumps(ref, test, {"default": {"nmse": 1e-10}})
    first = next(x for x in diffs if not x.ok)
    assert first.name == "cache_k-0", [(x.name, x.ok) for x in diffs[:8]]
    assert "cache_k_codes-0" in only_test
