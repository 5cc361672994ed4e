"""Whole quantized checkpoints: a generated Llama (tests/hf_models.py) written as GPTQ, AWQ and
compressed-tensors checkpoints by the libraries' own packers, loaded with refinfer.load.

Every quantized matrix refinfer holds must equal, bit for bit, the library's dequantization of
the tensors it packed, after the same q/k row permutation as the float path: the reference is
a float checkpoint holding the library-dequantized weights, loaded through refinfer's float
path (itself tested against llama.cpp and transformers). Norms, embeddings and lm_head stay
float and equal to the original's.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

import oracles_w4a16 as orc
from hf_models import make_hf_checkpoint
from refinfer.errors import CheckpointWarning, FormatError
from refinfer.quant.intgroup import IntGroupTensor
from refinfer.safetensors_file import SafetensorsCheckpoint
from refinfer.weights import QTensor
from test_w4a16_layouts import awq_layer, ct_layer, gptq_layer

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down"}
SHAPE = dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab=96)  # N, K multiples of 32


def quantized_checkpoint(tmp_path, method, **kw):
    """(quantized dir, reference float dir): the same generated Llama with every Linear
    replaced by a layer the library packed, and by the library's dequantization of it."""
    from safetensors.numpy import save_file
    src = make_hf_checkpoint(tmp_path / "float", seed=3, **SHAPE)
    ck = SafetensorsCheckpoint(src)
    config = json.loads((src / "config.json").read_text())
    rng = np.random.default_rng(0)
    quantized, reference = {}, {}
    for name in ck.tensors:
        quantized[name] = reference[name] = np.asarray(ck.get(name))
    for i in range(SHAPE["n_layers"]):
        for lin in LINEARS:
            prefix = f"model.layers.{i}.{lin}"
            N, K = ck.tensors[prefix + ".weight"].shape
            tensors, want = _pack(method, rng, N, K, **kw)
            del quantized[prefix + ".weight"]
            quantized.update({f"{prefix}.{k}": v for k, v in tensors.items()})
            reference[prefix + ".weight"] = np.ascontiguousarray(want, np.float32)
    qdir, rdir = tmp_path / f"{method}-q", tmp_path / f"{method}-ref"
    for d, tensors, qc in ((qdir, quantized, _qc(method, **kw)), (rdir, reference, None)):
        d.mkdir()
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(dict(config, quantization_config=qc) if qc else config))
    return qdir, rdir


def _pack(method, rng, N, K, bits=4, group_size=32, sym=False, desc_act=False, zero0=False):
    if method == "gptq":
        tensors, want, _, _ = gptq_layer(rng, N, K, bits, group_size, sym, desc_act, zero0=zero0)
        return tensors, want
    if method == "awq":
        packing_utils, gemm, _ = orc.awq_modules()
        m, _, _, _ = awq_layer(rng, N, K, group_size, gemm.WQLinear_GEMM)
        want = orc.f32(packing_utils.dequantize_gemm(m.qweight, m.qzeros, m.scales, 4, group_size)).T
        return {"qweight": m.qweight.numpy(), "qzeros": m.qzeros.numpy(), "scales": m.scales.numpy()}, want
    tensors, want, _, _, _ = ct_layer(rng, N, K, bits, "group", group_size, sym)
    return tensors, want


def _qc(method, bits=4, group_size=32, sym=False, desc_act=False, zero0=False):
    if method == "gptq":
        return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym, "desc_act": desc_act,
                "static_groups": False, "checkpoint_format": "gptq", "damp_percent": 0.01, "true_sequential": True}
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                "num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group", "group_size": group_size}}}}


def check_checkpoint_loads_exactly(tmp_path, method, **kw):
    import refinfer
    qdir, rdir = quantized_checkpoint(tmp_path, method, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = refinfer.load(qdir, backend="numpy")
    ref = refinfer.load(rdir, backend="numpy")
    assert model.metadata["quantization"].method == method
    for i, (lq, lr) in enumerate(zip(model.weights.layers, ref.weights.layers)):
        for gguf in GGUF.values():
            t, r = getattr(lq, gguf), getattr(lr, gguf)
            assert isinstance(t, IntGroupTensor) and isinstance(r, QTensor)
            assert t.name == f"blk.{i}.{gguf}.weight"
            assert np.array_equal(t.dequantize(), r.dequantize()), (i, gguf)
        assert np.array_equal(lq.attn_norm, lr.attn_norm)
    for name in ("token_embd", "output"):
        assert isinstance(getattr(model.weights, name), QTensor)
        assert np.array_equal(getattr(model.weights, name).dequantize(), getattr(ref.weights, name).dequantize())
    return model, [w for w in caught if issubclass(w.category, CheckpointWarning)]


def test_gptq_checkpoint_loads_exactly(tmp_path):
    model, caught = check_checkpoint_loads_exactly(tmp_path, "gptq")
    assert caught == []
    t = model.weights.layers[0].attn_q
    assert t.info == {"method": "gptq", "format": "gptq", "group_size": 32, "act_order": False, "sym": False,
                      "static_groups": False}


def test_gptq_act_order_3bit_checkpoint_loads_exactly(tmp_path):
    check_checkpoint_loads_exactly(tmp_path, "gptq", bits=3, group_size=64, desc_act=True)


def test_gptq_zero0_checkpoint_reports_each_tensor(tmp_path):
    _, caught = check_checkpoint_loads_exactly(tmp_path, "gptq", zero0=True)
    named = {str(w.message).split(":")[0] for w in caught}
    assert "model.layers.0.self_attn.q_proj.qzeros" in named and len(named) == 2 * len(LINEARS)


def test_awq_checkpoint_loads_exactly(tmp_path):
    check_checkpoint_loads_exactly(tmp_path, "awq")


def test_compressed_tensors_checkpoint_loads_exactly(tmp_path):
    check_checkpoint_loads_exactly(tmp_path, "compressed-tensors", bits=4, sym=True)


def test_mislabelled_v2_checkpoint_warns_once_and_uses_the_data(tmp_path):
    """GPTQModel-style v2 zeros under checkpoint_format "gptq": one warning (the first tensor
    proves v2), every weight equal to what the data means."""
    import refinfer
    from refinfer.w4a16 import gptq
    qdir, rdir = quantized_checkpoint(tmp_path, "gptq", sym=True)
    ck = SafetensorsCheckpoint(qdir)
    tensors = {n: np.asarray(ck.raw(n)) for n in ck.tensors}
    for n in list(tensors):
        if n.endswith(".qzeros"):
            N = tensors[n].shape[1] * 8
            tensors[n] = gptq.pack_qzeros(np.full((N, tensors[n].shape[0]), 8, np.uint8), 4)
    del ck
    from safetensors.numpy import save_file
    save_file(tensors, str(qdir / "model.safetensors"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = refinfer.load(qdir, backend="numpy")
    caught = [w for w in caught if issubclass(w.category, CheckpointWarning)]
    assert len(caught) == 1 and "0x88888888" in str(caught[0].message) and "using gptq_v2" in str(caught[0].message)
    ref = refinfer.load(rdir, backend="numpy")
    assert np.array_equal(model.weights.layers[1].ffn_down.dequantize(), ref.weights.layers[1].ffn_down.dequantize())
    assert model.weights.layers[1].ffn_down.info["format"] == "gptq_v2"


def test_quantized_checkpoint_with_a_bad_tensor_names_it(tmp_path):
    import refinfer
    from safetensors.numpy import save_file
    qdir, _ = quantized_checkpoint(tmp_path, "gptq")
    ck = SafetensorsCheckpoint(qdir)
    tensors = {n: np.asarray(ck.raw(n)) for n in ck.tensors}
    del ck
    bad = "model.layers.1.mlp.up_proj.scales"
    tensors[bad] = tensors[bad][:1]
    save_file(tensors, str(qdir / "model.safetensors"))
    with pytest.raises(FormatError, match=rf"tensor '{bad}'.*shape \(1, 128\), expected \(2, 128\)"):
        refinfer.load(qdir, backend="numpy")


def test_autogptq_quantize_config_json_beside_config(tmp_path):
    """AutoGPTQ's own checkpoints (TheBloke's) may carry quantize_config.json instead of a
    quantization_config in config.json; AutoGPTQ's from_pretrained reads it, so does refinfer."""
    from refinfer.loader import load as load_checkpoint
    qdir, _ = quantized_checkpoint(tmp_path, "gptq")
    config = json.loads((qdir / "config.json").read_text())
    (qdir / "quantize_config.json").write_text(json.dumps(config.pop("quantization_config")))
    (qdir / "config.json").write_text(json.dumps(config))
    _, weights, meta = load_checkpoint(qdir)
    assert isinstance(weights.layers[0].ffn_gate, IntGroupTensor)
    assert meta["quantization"].source.endswith("quantize_config.json")
    shutil.rmtree(qdir)
