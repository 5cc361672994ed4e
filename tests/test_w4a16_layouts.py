"""W4A16 layouts against their libraries, bit for bit.

Every layer here is packed by the library's own packer (AutoGPTQ 0.7.1 QuantLinear.pack,
AutoAWQ 0.2.9 WQLinear_GEMM/GEMV.from_linear, compressed-tensors 0.20.0
PackedQuantizationCompressor.compress) from codes, zeros and fp16-valued scales we choose, then
read by refinfer (refinfer.w4a16.checkpoint.load_linear on a safetensors file) and compared
with the library's own dequantization (AutoGPTQ's torch forward, AutoAWQ's dequantize_gemm,
compressed-tensors' decompress = unpack_from_int32 + dequantize) with np.array_equal on
float32: the README promises bit-exactness.

The float weight handed to the packers is float32 scale*(q - zero), exact, so the packers'
own re-rounding round((W + zero*scale)/scale) gives back q; the scales buffer is then fp16
as in a real checkpoint (AutoGPTQ's default weight_dtype, AutoAWQ's .half()).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import oracles_w4a16 as orc
from refinfer.errors import CheckpointWarning, FormatError
from refinfer.safetensors_file import SafetensorsCheckpoint
from refinfer.w4a16 import awq, checkpoint as ckm, gptq
from refinfer.w4a16.packing import pack_rows, unpack_rows


def write_layer(tmp_path, tensors: dict, prefix="layer"):
    from safetensors.numpy import save_file
    d = tmp_path / "ck"
    d.mkdir(parents=True, exist_ok=True)
    save_file({f"{prefix}.{k}": np.ascontiguousarray(v) for k, v in tensors.items()}, str(d / "model.safetensors"))
    return SafetensorsCheckpoint(d)


def load(tmp_path, tensors, qc, shape=None):
    ck = write_layer(tmp_path, tensors)
    spec = ckm.read_spec({"quantization_config": qc}, ck.path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = ckm.load_linear(ck, "layer", spec, shape=shape)
    return t, [w for w in caught if issubclass(w.category, CheckpointWarning)], spec


def fp16_scales(rng, shape):
    return rng.uniform(1e-3, 5e-2, shape).astype(np.float16).astype(np.float32)


# --- packing.py --------------------------------------------------------------------------

@pytest.mark.parametrize("bits", range(1, 9))
def test_dense_packing_round_trip_and_bit_positions(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, (3, 45)).astype(np.uint8)
    words = pack_rows(codes, bits)
    assert words.shape == (3, (45 * bits + 31) // 32)
    assert np.array_equal(unpack_rows(words, bits, 45), codes)
    # element i at stream bit i*bits, word j = stream bits 32j..32j+31, written out by hand
    stream = sum(int(c) << (bits * i) for i, c in enumerate(codes[0]))
    assert [int(w) for w in words[0].view(np.uint32)] == [(stream >> (32 * j)) & 0xFFFFFFFF
                                                          for j in range(words.shape[1])]


# --- GPTQ against AutoGPTQ 0.7.1 ---------------------------------------------------------

def gptq_layer(rng, N, K, bits, gs, sym, desc_act, zero0=False):
    """A layer packed by AutoGPTQ's QuantLinear.pack, and its dequantization by AutoGPTQ's torch
    forward on an fp16 identity (out = I @ W: the weight itself, one term per output)."""
    torch = orc.torch()
    Q = orc.auto_gptq_quantlinear(desc_act, gs)
    gs_ = K if gs == -1 else gs
    G = -(-K // gs_)
    maxq = (1 << bits) - 1
    scales = fp16_scales(rng, (N, G))
    zeros = (np.full((N, G), 1 << (bits - 1)) if sym else rng.integers(0 if zero0 else 1, maxq + 1, (N, G)))
    if zero0:
        zeros[0, 0] = 0
    zeros = zeros.astype(np.float32)
    g_idx = np.arange(K) // gs_
    if desc_act:
        g_idx = g_idx[np.argsort(rng.permutation(K))]      # AutoGPTQ fasterquant: g_idx[invperm]
    codes = rng.integers(0, maxq + 1, (N, K))
    W = scales[:, g_idx] * (codes - zeros[:, g_idx])
    linear = torch.nn.Linear(K, N, bias=False)
    linear.weight.data = torch.from_numpy(W.astype(np.float32))
    packer = Q(bits, gs, K, N, False)
    packer.pack(linear, torch.from_numpy(scales.copy()), torch.from_numpy(zeros.copy()),  # pack does zeros -= 1 in place
                torch.from_numpy(g_idx.astype(np.int32)))
    tensors = {"qweight": packer.qweight.numpy(), "qzeros": packer.qzeros.numpy(),
               "scales": packer.scales.half().numpy(), "g_idx": packer.g_idx.numpy().astype(np.int32)}
    loaded = Q(bits, gs, K, N, False)                        # as a checkpoint is loaded: fp16 scales
    for k, v in tensors.items():
        setattr(loaded, k, torch.from_numpy(v))
    with torch.no_grad():
        want = loaded(torch.eye(K, dtype=torch.float16)).float().numpy().T
    return tensors, want, codes, zeros


def gptq_qc(bits, gs, sym, desc_act, fmt=None):
    qc = {"quant_method": "gptq", "bits": bits, "group_size": gs, "sym": sym, "desc_act": desc_act}
    if fmt:
        qc["checkpoint_format"] = fmt
    return qc


GPTQ_CASES = [  # (N, K, bits, group_size, sym, desc_act)
    (64, 128, 4, 32, True, False), (64, 128, 4, 32, False, False), (96, 256, 4, 128, False, False),
    (64, 128, 4, -1, True, False), (64, 160, 4, 64, False, True), (64, 160, 4, 64, True, True),
    (64, 128, 2, 32, False, False), (64, 160, 2, 64, True, True),
    (64, 128, 3, 32, True, False), (32, 96, 3, 32, False, False), (64, 160, 3, 64, False, True),
    (64, 128, 8, 32, True, False), (96, 192, 8, 64, False, False), (64, 160, 8, 64, False, True),
    (64, 128, 8, -1, False, True),
]


@pytest.mark.parametrize("N,K,bits,gs,sym,desc_act", GPTQ_CASES)
def test_gptq_v1_equals_autogptq(tmp_path, N, K, bits, gs, sym, desc_act):
    rng = np.random.default_rng(N * K + bits)
    tensors, want, codes, zeros = gptq_layer(rng, N, K, bits, gs, sym, desc_act)
    t, caught, _ = load(tmp_path, tensors, gptq_qc(bits, gs, sym, desc_act), shape=(N, K))
    assert np.array_equal(t.dequantize(), want)
    assert np.array_equal(t.codes, codes) and np.array_equal(t.zeros, zeros)
    assert caught == []
    assert t.info["format"] == "gptq" and t.info["act_order"] == desc_act and t.rounding == "f16"


@pytest.mark.parametrize("bits,desc_act", [(2, False), (3, False), (4, False), (8, False), (4, True), (3, True)])
def test_gptq_v1_zero0_is_autogptqs_weights_and_reported(tmp_path, bits, desc_act):
    """A true zero of 0 in v1 (pitfall 1): AutoGPTQ's pack spills -1 over the word's higher
    fields; refinfer's weights equal AutoGPTQ's dequantization of that, and a warning names the
    tensor and the group."""
    N, K, gs = 64, 160 if desc_act else 128, 64 if desc_act else 32
    rng = np.random.default_rng(bits)
    tensors, want, codes, zeros = gptq_layer(rng, N, K, bits, gs, False, desc_act, zero0=True)
    t, caught, _ = load(tmp_path, tensors, gptq_qc(bits, gs, False, desc_act), shape=(N, K))
    assert np.array_equal(t.dequantize(), want)
    assert not np.array_equal(t.zeros, zeros)                  # the corruption is reproduced, not repaired
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "layer.qzeros" in msg and "first at group 0, output row 0" in msg
    assert f"hold {(1 << bits) - 1}" in msg


@pytest.mark.parametrize("bits,gs,sym,desc_act", [(4, 32, False, False), (3, 32, False, False), (2, 64, True, True),
                                                  (8, -1, False, False)])
def test_gptq_v2_true_zeros(tmp_path, bits, gs, sym, desc_act):
    """v2 stores the true zero: re-pack AutoGPTQ's fields +1 (GPTQModel's v1 -> v2 conversion
    per field) and the weights stay AutoGPTQ's; zero 0 is representable and not reported."""
    N, K = 64, 128
    rng = np.random.default_rng(7)
    tensors, want, _, zeros = gptq_layer(rng, N, K, bits, gs, sym, desc_act)
    stored = gptq.unpack_qzeros(tensors["qzeros"], bits, N)
    v2 = dict(tensors, qzeros=gptq.pack_qzeros(gptq.stored_from_zeros(stored.astype(np.int16) + 1, bits, "gptq_v2"),
                                               bits))
    t, caught, _ = load(tmp_path, v2, gptq_qc(bits, gs, sym, desc_act, "gptq_v2"), shape=(N, K))
    assert np.array_equal(t.dequantize(), want) and caught == []
    assert t.info["format"] == "gptq_v2"


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("label,data", [("gptq", "gptq_v2"), ("gptq_v2", "gptq"), ("gptq", "gptq"),
                                        ("gptq_v2", "gptq_v2")])
def test_gptq_sym_zero_words_prove_the_version(tmp_path, bits, label, data):
    """vLLM #38966: a checkpoint labelled gptq that carries v2 zeros. The data wins, with a
    warning naming the tensor, the word and the count; an agreeing label is silent."""
    N, K, gs = 64, 128, 32
    rng = np.random.default_rng(bits)
    tensors, want, _, zeros = gptq_layer(rng, N, K, bits, gs, True, False)
    if data == "gptq_v2":
        tensors["qzeros"] = gptq.pack_qzeros(gptq.stored_from_zeros(zeros, bits, "gptq_v2"), bits)
    t, caught, spec = load(tmp_path, tensors, gptq_qc(bits, gs, True, False, label), shape=(N, K))
    assert np.array_equal(t.dequantize(), want)
    assert t.info["format"] == data
    word = gptq.SYM_ZERO_WORDS[bits][data == "gptq_v2"]
    if label == data:
        assert caught == []
    else:
        assert len(caught) == 1
        msg = str(caught[0].message)
        n_words = 4 * N * bits // 32
        assert f"layer.qzeros: all {n_words} words are 0x{word:08x}" in msg and f"using {data}" in msg
    assert spec.evidence["word"] == word


def test_gptq_asym_follows_the_config(tmp_path):
    """Asymmetric: no proof from the data; the label decides (read as v2, AutoGPTQ's v1 fields
    give weights one zero step off, which is what a mislabelled checkpoint means)."""
    rng = np.random.default_rng(3)
    tensors, want, _, zeros = gptq_layer(rng, 64, 128, 4, 32, False, False)
    t, caught, _ = load(tmp_path, tensors, gptq_qc(4, 32, False, False, "gptq_v2"), shape=(64, 128))
    assert np.array_equal(t.zeros, zeros - 1) and caught == []


# --- GPTQ: hostile input ----------------------------------------------------------------

def _good_gptq(rng):
    tensors, _, _, _ = gptq_layer(rng, 64, 128, 4, 32, False, True)
    return tensors


@pytest.mark.parametrize("edit,shape_or_qc,pattern", [
    (lambda t: t.update(qweight=t["qweight"][:-1]), None, r"tensor 'layer.qweight'.*shape \(15, 64\), expected \(16, 64\)"),
    (lambda t: None, {"bits": 3}, r"tensor 'layer.qweight'.*shape \(16, 64\), expected \(12, 64\) for 3-bit"),
    (lambda t: t.pop("scales"), None, r"tensor 'layer.scales'.*missing"),
    (lambda t: t.update(scales=t["scales"][:2]), None, r"tensor 'layer.scales'.*shape \(2, 64\), expected \(4, 64\)"),
    (lambda t: t.update(g_idx=np.where(np.arange(128) == 5, 9, t["g_idx"]).astype(np.int32)), None,
     r"tensor 'layer.g_idx'.*g_idx\[5\] = 9 is out of range: there are 4 groups"),
    (lambda t: t.pop("g_idx"), None, r"tensor 'layer.g_idx'.*missing"),
    (lambda t: t.update(qzeros=t["qzeros"].astype(np.float32)), None, r"tensor 'layer.qzeros'.*dtype F32, expected I32"),
    (lambda t: None, {"bits": 5}, r"quantization_config.bits is 5; GPTQ stores 2, 3, 4, 8-bit"),
])
def test_gptq_hostile_input_names_the_tensor(tmp_path, edit, shape_or_qc, pattern):
    tensors = _good_gptq(np.random.default_rng(0))
    edit(tensors)
    qc = dict(gptq_qc(4, 32, False, True), **(shape_or_qc or {}))
    with pytest.raises(FormatError, match=pattern) as ei:
        load(tmp_path, tensors, qc, shape=(64, 128))
    assert ei.value.hint


# --- AWQ against AutoAWQ 0.2.9 ----------------------------------------------------------

def awq_qc(gs, version="gemm", **kw):
    return dict({"quant_method": "awq", "bits": 4, "group_size": gs, "zero_point": True, "version": version}, **kw)


def awq_layer(rng, N, K, gs, cls):
    torch = orc.torch()
    G = K // gs
    scales = fp16_scales(rng, (N, G))
    zeros = rng.integers(0, 16, (N, G)).astype(np.float32)
    codes = rng.integers(0, 16, (N, K))
    W = scales[:, np.arange(K) // gs] * (codes - zeros[:, np.arange(K) // gs])
    linear = torch.nn.Linear(K, N, bias=False)
    linear.weight.data = torch.from_numpy(W.astype(np.float32))
    if cls.__name__ == "WQLinear_GEMM":                        # AutoAWQ's quantizer passes [G, N] (scales.t())
        m = cls.from_linear(linear, 4, gs, scales=torch.from_numpy(scales.T.copy()).half(),
                            zeros=torch.from_numpy(zeros.T.copy()))
    else:                                                      # WQLinear_GEMV: [N, G]
        m = cls.from_linear(linear, 4, gs, scales=torch.from_numpy(scales).half(), zeros=torch.from_numpy(zeros))
    return m, codes, zeros, scales


@pytest.mark.parametrize("N,K,gs", [(64, 128, 32), (96, 256, 128), (32, 192, 64), (64, 128, -1)])
def test_awq_gemm_equals_dequantize_gemm(tmp_path, N, K, gs):
    packing_utils, gemm, _ = orc.awq_modules()
    rng = np.random.default_rng(N + K)
    m, codes, zeros, _ = awq_layer(rng, N, K, K if gs == -1 else gs, gemm.WQLinear_GEMM)
    want = orc.f32(packing_utils.dequantize_gemm(m.qweight, m.qzeros, m.scales, 4, K if gs == -1 else gs)).T
    tensors = {"qweight": m.qweight.numpy(), "qzeros": m.qzeros.numpy(), "scales": m.scales.numpy()}
    t, caught, _ = load(tmp_path, tensors, awq_qc(gs), shape=(N, K))
    assert np.array_equal(t.dequantize(), want) and caught == []
    assert np.array_equal(t.codes, codes) and np.array_equal(t.zeros, zeros)
    # pack is the inverse: the same words as AutoAWQ's from_linear
    out = ckm.pack(t, "awq")
    assert np.array_equal(out["qweight"], tensors["qweight"]) and np.array_equal(out["qzeros"], tensors["qzeros"])
    assert np.array_equal(out["scales"], tensors["scales"])


def test_awq_gemm_bf16_scales_lmdeploy(tmp_path):
    """LMDeploy's lite auto_awq: GEMM layout, config {quant_method awq, version gemm, bits,
    group_size, zero_point}, scales in the model dtype (bf16): dequantize_gemm in bf16."""
    torch = orc.torch()
    packing_utils, gemm, _ = orc.awq_modules()
    rng = np.random.default_rng(11)
    m, _, _, _ = awq_layer(rng, 64, 256, 128, gemm.WQLinear_GEMM)
    scales_bf16 = m.scales.to(torch.bfloat16) * 1.37
    want = orc.f32(packing_utils.dequantize_gemm(m.qweight, m.qzeros, scales_bf16, 4, 128)).T
    from safetensors.torch import save_file
    d = tmp_path / "lmdeploy"
    d.mkdir()
    save_file({"layer.qweight": m.qweight, "layer.qzeros": m.qzeros, "layer.scales": scales_bf16.contiguous()},
              str(d / "model.safetensors"))
    ck = SafetensorsCheckpoint(d)
    spec = ckm.read_spec({"quantization_config": {"quant_method": "awq", "version": "gemm", "bits": 4,
                                                  "group_size": 128, "zero_point": True}}, d)
    t = ckm.load_linear(ck, "layer", spec, shape=(64, 256))
    assert t.rounding == "bf16" and np.array_equal(t.dequantize(), want)


def gemv_kernel_weights(qweight, qzeros, scales, K, group_size):
    """A NumPy transcription of the indexing of the AWQ GEMV CUDA kernels (llm-awq's
    gemv_kernel_g64 / gemv_kernel_g128 in AutoAWQ's awq_ext; AutoAWQ has no CPU dequantization
    for GEMV), thread by thread: oc row, packed_group_idx, threadIdx.x (32 lanes), ic_0 (4 words),
    ic_1 (8 nibbles). Returns float32[N, K] of `scaling_factor * (q - zero)` as the kernel forms it."""
    N = qweight.shape[0]
    PACK, WARP = 8, 32
    G = K // group_size
    per_iter = {128: 1, 64: 2}[group_size]                       # packed zero words read per iteration
    zeros_w = qzeros.shape[1]
    sf_w = scales.shape[1]
    groups_per_lane = {128: 4, 64: 2}[group_size]                 # lanes per group
    n_iter = -(-(-(-G // PACK)) // per_iter) if group_size == 64 else -(-G // PACK)
    qw = qweight.view(np.uint32).reshape(-1)
    qz = qzeros.view(np.uint32).reshape(-1)
    sf = scales.astype(np.float32).reshape(-1)
    out = np.zeros((N, K), np.float32)
    for oc in range(N):
        for pg in range(n_iter):
            packed_zeros = 0
            for w in range(per_iter):                              # uint32 or uint64 load, little-endian
                packed_zeros |= int(qz[oc * zeros_w + pg * per_iter + w]) << (32 * w)
            for tid in range(WARP):
                grp = tid // groups_per_lane
                sfi = oc * sf_w + pg * (PACK * per_iter) + grp
                zero = (packed_zeros >> (grp * 4)) & 0xF
                for ic0 in range(4):
                    word_idx = pg * (WARP * 4) + tid * 4 + ic0
                    if word_idx >= K // PACK:
                        continue
                    word = int(qw[oc * (K // PACK) + word_idx])
                    for ic1 in range(PACK):
                        q = (word >> (4 * ic1)) & 0xF
                        out[oc, word_idx * PACK + ic1] = np.float32(sf[sfi]) * np.float32(q - zero)
    return out


@pytest.mark.parametrize("N,K,gs", [(8, 1024, 128), (16, 640, 64), (8, 2048, 64), (8, 384, 128)])
def test_awq_gemv_equals_kernel_transcription(tmp_path, N, K, gs):
    """No CPU oracle exists for GEMV (AutoAWQ's is CUDA-only): the layer is packed by AutoAWQ's
    own WQLinear_GEMV.from_linear and compared with a transcription of the CUDA kernel's
    indexing above, and refinfer's pack reproduces from_linear's words (round trip)."""
    _, _, gemv = orc.awq_modules()
    rng = np.random.default_rng(K)
    m, codes, zeros, scales = awq_layer(rng, N, K, gs, gemv.WQLinear_GEMV)
    tensors = {"qweight": m.qweight.numpy(), "qzeros": m.qzeros.numpy(), "scales": m.scales.numpy()}
    t, caught, _ = load(tmp_path, tensors, awq_qc(gs, "gemv"), shape=(N, K))
    want = gemv_kernel_weights(tensors["qweight"], tensors["qzeros"], tensors["scales"], K, gs)
    assert t.rounding == "f32" and np.array_equal(t.dequantize(), want) and caught == []
    assert np.array_equal(t.codes, codes) and np.array_equal(t.zeros, zeros)
    out = ckm.pack(t.with_rounding("f16"), "awq-gemv")
    for k in tensors:
        assert np.array_equal(out[k], tensors[k]), k


def test_awq_calculate_zeros_width_equals_autoawq():
    _, _, gemv = orc.awq_modules()
    for K in (128, 640, 1024, 4096, 11008):
        for gs in (32, 64, 128, 256):
            if K % gs == 0:
                assert awq.calculate_zeros_width(K, gs) == gemv.calculate_zeros_width(K, gs)
    assert awq.calculate_zeros_width(4096, 16) is None


def test_awq_hostile_input(tmp_path):
    _, gemm, _ = orc.awq_modules()
    m, _, _, _ = awq_layer(np.random.default_rng(0), 64, 128, 32, gemm.WQLinear_GEMM)
    tensors = {"qweight": m.qweight.numpy(), "qzeros": m.qzeros.numpy()}
    with pytest.raises(FormatError, match=r"tensor 'layer.scales'.*missing"):
        load(tmp_path, tensors, awq_qc(32), shape=(64, 128))
    tensors["scales"] = m.scales.numpy()
    with pytest.raises(FormatError, match=r"tensor 'layer.qweight'.*shape \(128, 8\), expected \(128, 12\)"):
        load(tmp_path, tensors, awq_qc(32), shape=(96, 128))
    with pytest.raises(FormatError, match=r"quantization_config.bits is 3; AWQ stores 4-bit"):
        load(tmp_path, tensors, awq_qc(32, bits=3), shape=(64, 128))


# --- compressed-tensors against 0.20.0 ----------------------------------------------------

def ct_layer(rng, N, K, bits, strategy, gs, sym, scale_dtype="float16"):
    """compress() and decompress() of compressed-tensors' PackedQuantizationCompressor."""
    torch = orc.torch()
    _, _, base, quantization = orc.compressed_tensors()
    args = quantization.QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy=strategy,
                                         group_size=gs if strategy == "group" else None)
    scheme = quantization.QuantizationScheme(targets=["Linear"], weights=args)
    G = 1 if strategy == "channel" else -(-K // gs)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    dt = getattr(torch, scale_dtype)
    scale = torch.from_numpy(fp16_scales(rng, (N, G))).to(dt)
    zp = torch.zeros((N, G), dtype=torch.int8) if sym else torch.from_numpy(rng.integers(qmin, qmax + 1, (N, G)).astype(np.int8))
    q = rng.integers(qmin, qmax + 1, (N, K))
    gidx = np.arange(K) // (K if strategy == "channel" else gs)
    W = (scale.float().numpy()[:, gidx] * (q - zp.numpy().astype(np.int64)[:, gidx])).astype(np.float32)
    sd = {"weight": torch.from_numpy(W).to(dt), "weight_scale": scale, "weight_zero_point": zp}
    packed = base.PackedQuantizationCompressor.compress(sd, scheme)
    want = orc.f32(base.PackedQuantizationCompressor.decompress(dict(packed), scheme)["weight"])
    tensors = {k: v.numpy() if v.dtype != torch.bfloat16 else v for k, v in packed.items()}
    return tensors, want, q, zp.numpy(), args


def ct_qc(bits, strategy, gs, sym):
    w = {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": strategy,
         "group_size": gs if strategy == "group" else None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": w}}}


CT_CASES = [(bits, strategy, sym) for bits in range(2, 9) for strategy in ("group", "channel")
            for sym in (True, False)]


@pytest.mark.parametrize("bits,strategy,sym", CT_CASES)
def test_compressed_tensors_equals_decompress(tmp_path, bits, strategy, sym):
    N, K, gs = 40, 200, 64                                  # odd: K*bits not a multiple of 32, last group partial
    if strategy == "group" and K % gs:
        K = 192                                             # compressed-tensors' quantize needs whole groups
    rng = np.random.default_rng(bits * 10 + sym)
    tensors, want, q, zp, _ = ct_layer(rng, N, K, bits, strategy, gs, sym)
    assert ("weight_zero_point" in tensors) == (not sym)
    t, caught, _ = load(tmp_path, tensors, ct_qc(bits, strategy, gs, sym), shape=(N, K))
    assert np.array_equal(t.dequantize(), want) and caught == []
    off = 1 << (bits - 1)
    assert np.array_equal(t.codes.astype(int), q + off) and np.array_equal(t.zeros[:, 0].astype(int), zp[:, 0].astype(int) + off)
    # pack is the inverse: compressed-tensors' own words
    out = ckm.pack(dataclasses_replace_info(t, sym=sym), "compressed-tensors")
    assert sorted(out) == sorted(tensors)
    for k in tensors:
        assert np.array_equal(out[k], tensors[k]), k


def dataclasses_replace_info(t, **kw):
    import dataclasses
    return dataclasses.replace(t, info=dict(t.info, **kw))


def test_compressed_tensors_bf16_scales(tmp_path):
    torch = orc.torch()
    from safetensors.torch import save_file
    rng = np.random.default_rng(5)
    tensors, want, _, _, _ = ct_layer(rng, 32, 128, 4, "group", 32, False, scale_dtype="bfloat16")
    d = tmp_path / "bf"
    d.mkdir()
    save_file({f"layer.{k}": (v if isinstance(v, torch.Tensor) else torch.from_numpy(v)).contiguous()
               for k, v in tensors.items()}, str(d / "model.safetensors"))
    t = ckm.load_linear(SafetensorsCheckpoint(d), "layer", ckm.read_spec({"quantization_config": ct_qc(4, "group", 32, False)}, d),
                        shape=(32, 128))
    assert t.rounding == "bf16" and np.array_equal(t.dequantize(), want)


def test_compressed_tensors_hostile_input(tmp_path):
    rng = np.random.default_rng(0)
    tensors, _, _, _, _ = ct_layer(rng, 32, 128, 4, "group", 32, False)
    with pytest.raises(FormatError, match=r"tensor 'layer.weight_shape'.*is \(32, 128\), but the model's hyperparameters give \(32, 256\)"):
        load(tmp_path, tensors, ct_qc(4, "group", 32, False), shape=(32, 256))
    with pytest.raises(FormatError, match=r"tensor 'layer.weight_packed'.*shape \(32, 16\), expected \(32, 20\) for 5-bit"):
        load(tmp_path, tensors, ct_qc(5, "group", 32, False), shape=(32, 128))
    del tensors["weight_zero_point"]
    with pytest.raises(FormatError, match=r"tensor 'layer.weight_zero_point'.*missing"):
        load(tmp_path, tensors, ct_qc(4, "group", 32, False), shape=(32, 128))


# --- writers' configs parse with the libraries ----------------------------------------------

def test_quantization_configs_parse_with_compressed_tensors():
    _, _, _, quantization = orc.compressed_tensors()
    for bits, gs, sym in ((4, 128, True), (8, -1, False), (3, 64, False)):
        qc = ckm.quantization_config("compressed-tensors", bits, gs, sym)
        parsed = quantization.QuantizationConfig.model_validate(qc)
        w = parsed.config_groups["group_0"].weights
        assert (w.num_bits, w.symmetric, w.strategy) == (bits, sym, "channel" if gs == -1 else "group")
        spec = ckm.read_spec({"quantization_config": qc}, ".")
        assert (spec.bits, spec.group_size, spec.sym) == (bits, gs, sym)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2", "awq", "awq-gemv"])
def test_quantization_config_round_trips_read_spec(fmt):
    bits = 4
    qc = ckm.quantization_config(fmt, bits, 128, fmt.startswith("gptq"), desc_act=fmt == "gptq", static_groups=True)
    spec = ckm.read_spec({"quantization_config": qc}, ".")
    want = {"gptq": "gptq", "gptq_v2": "gptq_v2", "awq": "awq-gemm", "awq-gemv": "awq-gemv"}[fmt]
    assert spec.format == want and spec.bits == bits and spec.group_size == 128
    if fmt.startswith("gptq"):
        assert spec.desc_act == (fmt == "gptq") and spec.static_groups and spec.sym


@pytest.mark.parametrize("bits,sym,desc_act,fmt", [(4, True, False, "gptq"), (3, False, True, "gptq"),
                                                   (2, False, False, "gptq_v2"), (8, True, True, "gptq_v2")])
def test_gptq_pack_is_autogptqs_words(tmp_path, bits, sym, desc_act, fmt):
    """pack(., "gptq") writes AutoGPTQ's words for zeros >= 1 (v1); v2 writes true zeros and
    reads back to the same weights."""
    N, K, gs = 64, 128, 32
    rng = np.random.default_rng(bits)
    tensors, want, _, _ = gptq_layer(rng, N, K, bits, gs, sym, desc_act)
    t, _, _ = load(tmp_path, tensors, gptq_qc(bits, gs, sym, desc_act), shape=(N, K))
    out = ckm.pack(t, fmt)
    if fmt == "gptq":
        for k in tensors:
            assert np.array_equal(out[k], tensors[k]), k
    t2, caught, _ = load(tmp_path / "again", out, gptq_qc(bits, gs, sym, desc_act, fmt), shape=(N, K))
    assert np.array_equal(t2.dequantize(), want) and caught == []


def test_read_spec_rejects_what_it_cannot_read():
    from refinfer.errors import UnsupportedError
    assert ckm.read_spec({}, ".") is None
    with pytest.raises(UnsupportedError, match="quant_method is 'bitsandbytes'"):
        ckm.read_spec({"quantization_config": {"quant_method": "bitsandbytes"}}, ".")
    with pytest.raises(UnsupportedError, match="format is 'marlin'"):
        ckm.read_spec({"quantization_config": {"quant_method": "gptq", "bits": 4, "format": "marlin"}}, ".")
    with pytest.raises(UnsupportedError, match="version is 'gemv_fast'"):
        ckm.read_spec({"quantization_config": {"quant_method": "awq", "bits": 4, "version": "GEMV_FAST"}}, ".")
    with pytest.raises(FormatError, match="quantization_config.sym is 'yes'"):
        ckm.read_spec({"quantization_config": {"quant_method": "gptq", "bits": 4, "sym": "yes"}}, ".")
