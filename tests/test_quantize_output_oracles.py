"""What `quantize --method` writes is what the libraries read: for each output format, the
config parses with the library's own config class (transformers' GPTQConfig / AwqConfig,
compressed-tensors' QuantizationConfig), and every packed Linear, unpacked and dequantized by
the library's own code, equals bit for bit the weights refinfer computes with after loading
the checkpoint (q/k rows in llama.cpp's order there: the oracle's rows are permuted the same way).

Oracles: AutoGPTQ 0.7.1's QuantLinear torch forward (on an fp16 identity: out = W), AutoAWQ 0.2.9
dequantize_gemm, compressed-tensors 0.20 PackedQuantizationCompressor.decompress. gptq_v2 has no
installable oracle here (GPTQModel needs torch >= 2.14.1); its zeros are the v1 words + 1 per
field, which tests/test_w4a16_layouts.py checks against the libraries' conventions.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import oracles_w4a16 as orc
import refinfer
from ci_skips import oracle_import
from refinfer.loader import permute_qk_rows
from refinfer.methods import pipeline
from refinfer.safetensors_file import SafetensorsCheckpoint

TEXT = ("Calibration text for a generated model: the quick brown fox jumps over the lazy dog, "
        "and 1234567890 numbers follow in a line of words. ") * 40
GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down"}
CASES = {  # name -> Options: each format, with act-order (g_idx) and asymmetric zeros where it can store them
    "gptq-act-asym": dict(method="gptq", fmt="gptq", bits=4, sym=False, desc_act=True),
    "gptq-3bit-sym": dict(method="rtn", fmt="gptq", bits=3, sym=True),
    "awq": dict(method="awq", fmt="awq", bits=4, sym=False),
    "compressed-tensors-asym": dict(method="rtn", fmt="compressed-tensors", bits=4, sym=False),
    "compressed-tensors-sym-6bit": dict(method="rtn", fmt="compressed-tensors", bits=6, sym=True),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def written(request, tiny_llama_f32, tmp_path_factory):
    return write_case(request.param, tiny_llama_f32, tmp_path_factory.mktemp(request.param))


def _tensor(torch, ck, name):
    """A stored tensor as torch reads it from the file: integers as they are, bf16 as bf16."""
    a = np.array(ck.raw(name))
    if ck.tensors[name].dtype == "BF16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _oracle_weight(o, ck, prefix, qc, N, K):
    """float32[N, K]: the library's dequantization of the packed Linear at prefix."""
    torch = orc.torch()
    t = {s: _tensor(torch, ck, f"{prefix}.{s}")
         for s in ("qweight", "qzeros", "scales", "g_idx", "weight_packed", "weight_scale", "weight_zero_point",
                   "weight_shape") if f"{prefix}.{s}" in ck.tensors}
    if o.fmt == "gptq":
        Q = orc.auto_gptq_quantlinear(o.desc_act, o.group_size)
        layer = Q(o.bits, o.group_size, K, N, False)
        for s in ("qweight", "qzeros", "scales", "g_idx"):
            setattr(layer, s, t[s])
        with torch.no_grad():
            return layer(torch.eye(K, dtype=torch.float16)).float().numpy().T
    if o.fmt == "awq":
        packing_utils, _, _ = orc.awq_modules()
        return orc.f32(packing_utils.dequantize_gemm(t["qweight"], t["qzeros"], t["scales"], 4, o.group_size)).T
    _, _, base, quantization = orc.compressed_tensors()
    cfg = quantization.QuantizationConfig.model_validate(qc)
    scheme = next(iter(cfg.config_groups.values()))
    return orc.f32(base.PackedQuantizationCompressor.decompress(dict(t), scheme)["weight"])


def test_config_parses_with_the_librarys_class(written):
    name, o, out = written
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    if o.fmt == "compressed-tensors":
        _, _, _, quantization = orc.compressed_tensors()
        cfg = quantization.QuantizationConfig.model_validate(qc)
        w = next(iter(cfg.config_groups.values())).weights
        assert (w.num_bits, w.symmetric, w.group_size, cfg.format) == (o.bits, o.sym, o.group_size, "pack-quantized")
        return
    oracle_import("transformers")
    from transformers import AwqConfig, GPTQConfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = (GPTQConfig if o.fmt == "gptq" else AwqConfig).from_dict(dict(qc))
    assert (cfg.bits, cfg.group_size) == (o.bits, o.group_size)
    if o.fmt == "gptq":
        assert (cfg.sym, cfg.desc_act) == (o.sym, o.desc_act)
    else:
        assert cfg.zero_point == (not o.sym)


def test_every_linear_unpacks_through_the_library_to_refinfers_weights(written):
    check_linears_unpack_to_refinfers_weights(*written)


def write_case(name, src, tmp):
    o = pipeline.Options(group_size=32, n_samples=2, seqlen=24, **CASES[name])
    pipeline.quantize_model(str(src), tmp / "q", o, calib_text=TEXT, progress=False)
    return name, o, tmp / "q"


def check_linears_unpack_to_refinfers_weights(name, o, out):
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    ck = SafetensorsCheckpoint(out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # a clean checkpoint: no CheckpointWarning
        m = refinfer.load(str(out), backend="numpy")
    cfg = m.config
    for i, L in enumerate(m.weights.layers):
        for hf, g in GGUF.items():
            mine = getattr(L, g)
            N, K = mine.shape
            want = _oracle_weight(o, ck, f"model.layers.{i}.{hf}", qc, N, K)
            if g in ("attn_q", "attn_k"):          # refinfer holds llama.cpp's row order
                want = want[permute_qk_rows(N, cfg.n_heads if g == "attn_q" else cfg.n_kv_heads)]
            np.testing.assert_array_equal(mine.dequantize(), want, err_msg=f"{name} layer {i} {g}")
