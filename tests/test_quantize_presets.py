"""`refinfer quantize --type Q4_K_M` etc. against llama.cpp's llama_model_quantize (not pure: its
per-tensor type rules), with and without an importance matrix passed through the C API
(llama_model_quantize_params.imatrix: an array of llama_model_imatrix_data {name, data, size}
ended by a NULL name). Whole output files must be byte-identical."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from ci_skips import oracle_import
from refinfer.gguf_file import GGUFFile
from refinfer.quantize_model import FTYPES, K_FTYPES, quantize_model


def llama_quantize_preset(src, dst, ftype: int, imatrix=None):
    llama_cpp = oracle_import("llama_cpp")
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    keep = []
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, v) in enumerate(imatrix.items()):
            v = np.ascontiguousarray(v, np.float32)
            b = name.encode()
            keep += [v, b]
            arr[i].name, arr[i].size = b, v.size
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[len(imatrix)].name = None
        p.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), p) == 0
    return dst


@pytest.fixture(scope="module")
def preset_models(tmp_path_factory, vocab_dir):
    from models import make_tiny_llama_gguf
    d = tmp_path_factory.mktemp("presets")
    vocab = vocab_dir / "ggml-vocab-llama-spm.gguf"
    # 8 layers: use_more_bits and the n/8, n/16 layer rules pick different layers; 4 heads on
    # 1 kv head (n_gqa 4) for Q2_K's attn_v rule; rows of 256
    deep = make_tiny_llama_gguf(d / "deep.gguf", vocab_gguf=vocab, dim=256, hidden_dim=256, n_layers=8,
                                n_heads=4, n_kv_heads=1, n_vocab=256)
    # ffn_down rows of 320 (not a multiple of 256: q4_K -> q5_0, q5_K -> q5_1, q6_K -> q8_0,
    # q2_K/q3_K -> q4_0), tied embeddings (token_embd takes output's rule)
    odd = make_tiny_llama_gguf(d / "odd.gguf", vocab_gguf=vocab, dim=256, hidden_dim=320, n_layers=2,
                               n_heads=4, n_kv_heads=2, n_vocab=256, tie_embeddings=True, seed=1)
    return {"deep": deep, "odd": odd}


def random_imatrix(path, seed=0):
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(ti.ne[0]) ** 2 + 0.01).astype(np.float32)
            for n, ti in GGUFFile(path).tensors.items() if n.startswith("blk.") and len(ti.shape) == 2}


def check_preset(preset_models, tmp_path, model, qtype, with_imatrix):
    src = preset_models[model]
    im = random_imatrix(src) if with_imatrix else None
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    report = quantize_model(src, ours, qtype, pure=False, imatrix=im)
    llama_quantize_preset(src, ref, {**K_FTYPES, **FTYPES}[qtype], im)
    a, b = GGUFFile(ours), GGUFFile(ref)
    types = {n: (a.tensors[n].qtype.name, b.tensors[n].qtype.name) for n in b.tensors}
    assert all(x == y for x, y in types.values()), {n: t for n, t in types.items() if t[0] != t[1]}
    differ = [n for n in b.tensors if not np.array_equal(a.raw(n), b.raw(n))]
    assert not differ, differ
    assert ours.read_bytes() == ref.read_bytes()
    return report


CASES = ([("deep", q, False) for q in K_FTYPES] + [("deep", q, True) for q in ("q2_k", "q3_k_m", "q4_k_m", "q6_k")]
         + [("deep", q, True) for q in ("q4_0", "q5_1")]
         + [("odd", q, False) for q in ("q2_k", "q4_k_m", "q5_k_s", "q6_k", "q4_0")]
         + [("odd", q, True) for q in ("q3_k_l", "q5_k_m", "q4_1")])


@pytest.mark.parametrize("model,qtype,with_imatrix", CASES)
def test_preset_matches_llama_model_quantize(preset_models, tmp_path, model, qtype, with_imatrix):
    report = check_preset(preset_models, tmp_path, model, qtype, with_imatrix)
    if with_imatrix and qtype != "q8_0":
        assert report.imatrix_used


def test_q4_k_m_mix_is_llama_cpps(preset_models, tmp_path):
    # the rules by hand for 8 layers: attn_v and ffn_down of layers 0, 3, 6, 7 (use_more_bits)
    quantize_model(preset_models["deep"], tmp_path / "o.gguf", "Q4_K_M")
    t = {n: ti.qtype.name for n, ti in GGUFFile(tmp_path / "o.gguf").tensors.items()}
    assert t["output.weight"] == "q6_K" and t["token_embd.weight"] == "q4_K"
    for i in range(8):
        more = i in (0, 3, 6, 7)
        assert t[f"blk.{i}.attn_v.weight"] == t[f"blk.{i}.ffn_down.weight"] == ("q6_K" if more else "q4_K")
        assert t[f"blk.{i}.attn_q.weight"] == "q4_K" and t[f"blk.{i}.attn_norm.weight"] == "f32"


def test_imatrix_of_the_wrong_size_is_an_error(preset_models, tmp_path, capsys):
    from refinfer.cli import main
    from refinfer.imatrix import Imatrix, write_imatrix
    im = Imatrix(sums={"blk.0.attn_q.weight": np.ones((1, 100), np.float32)},
                 counts={"blk.0.attn_q.weight": np.array([1])}, datasets=["x.txt"], chunk_count=1, chunk_size=16)
    write_imatrix(tmp_path / "im.gguf", im)
    rc = main(["quantize", str(preset_models["deep"]), str(tmp_path / "o.gguf"), "--type", "q4_k_m",
               "--imatrix", str(tmp_path / "im.gguf")])
    err = capsys.readouterr().err
    assert rc == 2 and "blk.0.attn_q.weight" in err and "100" in err and "256" in err and "hint:" in err
