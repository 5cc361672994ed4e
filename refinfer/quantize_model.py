"""Quantize a float model file to one of the legacy block types, as llama.cpp does.

The output's tensor data is byte-identical to what llama.cpp's `llama_model_quantize` (the
llama-quantize tool) writes with `params.pure = True` and the matching `params.ftype`, i.e.
`llama-quantize --pure IN OUT Q4_0`. What that function does (src/llama-quant.cpp,
llama_model_quantize_impl), and so what this module does:

  * Which tensors are quantized (tensor_allows_quantization): those with at least 2 dims
    (ggml_n_dims: trailing dims of 1 do not count), whose name ends in "weight" and is not a
    norm ("_norm.weight") nor one of a few small special tensors (expert gates, position
    embeddings, ...). token_embd.weight and output.weight ARE quantized. Everything else is
    copied byte for byte, so 1-D norms stay F32.
  * Row lengths (ne[0]) that are not a multiple of the 32-element block cannot be quantized
    (tensor_type_fallback); such a tensor becomes F16 instead ("must use F16 due to unusual
    shape"): an F16 input tensor is then copied, f32/bf16 data converted to F16.
  * F16 and BF16 input is widened to float32 first (ggml_fp16_to_fp32_row,
    ggml_bf16_to_fp32_row: both exact), then quantized with the reference quantizers
    (ggml_quantize_chunk -> quantize_row_*_ref, the same function for every row, so how
    llama.cpp splits the work across threads does not change a byte).
  * Metadata: every key of the input, in order, except split.no/split.count/
    split.tensors.count; then general.quantization_version = 2 (GGML_QNT_VERSION) and
    general.file_type = the llama_ftype, both u32, both appended last (gguf_set_val removes a
    key before adding it again, so an existing general.file_type moves to the end).
  * Tensor order: the model loader's weights_map, a std::map ordered by weight_name_comparer:
    first by the layer number that sscanf("blk.%d.") finds (-1 when it finds none, so
    token_embd/output come first), then by name.
  * Alignment: tensor data padded to 32 bytes (GGUF_DEFAULT_ALIGNMENT). llama.cpp uses 32 even
    when the input declares another general.alignment and copies that key unchanged, which
    makes an inconsistent file; we keep the key and lay the data out by it instead.

Deliberate differences: any already-quantized tensor in the input is an error (llama.cpp
would copy tensors whose type equals the target and refuse others); non-finite weights raise
NonFiniteError (llama.cpp's loader rejects them too, with check_tensors).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
from gguf import GGUFValueType

from .errors import NonFiniteError, RefinferError, ShapeError, UnsupportedError
from .gguf_file import GGUFFile, write_gguf
from .quant import get_type, quantize

# --type -> llama_ftype (LLAMA_FTYPE_MOSTLY_*), written as general.file_type.
FTYPES = {"q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q8_0": 7}
GGML_QNT_VERSION = 2
FLOAT_TYPES = ("f32", "f16", "bf16")

# Name fragments llama.cpp never quantizes (tensor_allows_quantization). Most belong to other
# architectures; they are kept so that a file of any architecture gets llama.cpp's choice.
_NEVER_QUANTIZED_FRAGMENTS = (
    "_norm.weight",
    "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight",  # MoE routers
    "altup", "laurel", "per_layer_model_proj",  # Gemma 3n
    "ssm_conv1d", "shortconv.conv.weight",  # Mamba, LFM2
    "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",  # RWKV
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",  # T5
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
    ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",  # multimodal
)
_NEVER_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")  # BERT
_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")

# Rows per conversion slab: bounds the float32 temporaries of quantize() to tens of MB.
_SLAB_ELEMENTS = 1 << 20


@dataclass
class QuantizeReport:
    qtype: str
    n_quantized: int = 0
    n_copied: int = 0
    f16_fallback: list = field(default_factory=list)  # names whose row length is not a multiple of 32
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0


def n_dims(ne) -> int:
    # ggml_n_dims: the highest axis with more than one element, at least 1
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def allows_quantization(name: str, ne) -> bool:
    # llama.cpp: tensor_allows_quantization with quantize_output_tensor = true (the default)
    if n_dims(ne) < 2 or not name.endswith("weight"):
        return False
    if name in _NEVER_QUANTIZED_NAMES:
        return False
    return not any(frag in name for frag in _NEVER_QUANTIZED_FRAGMENTS)


def target_type(name: str, ne, qtype: str) -> str:
    """The ggml type llama.cpp's pure mode gives tensor `name` of shape ne (ggml order)."""
    t = get_type(qtype)
    if not allows_quantization(name, ne):
        return None  # copied unchanged
    if ne[0] % t.block_size:
        return "f16"  # tensor_type_fallback: no smaller block to fall back to, so F16
    return t.name


_LAYER = re.compile(r"blk\.\s*([+-]?\d+)")


def llama_tensor_order(names) -> list:
    """Names sorted as llama.cpp's weights_map (weight_name_comparer): layer, then name."""
    def key(name):
        m = _LAYER.match(name)
        return (int(m.group(1)) if m else -1, name.encode("utf-8"))
    return sorted(names, key=key)


def output_metadata(f: GGUFFile, qtype: str):
    """Input metadata in order minus the split keys, then quantization version and file type."""
    drop = set(_SPLIT_KEYS) | {"general.quantization_version", "general.file_type"}
    metadata = {k: v for k, v in f.metadata.items() if k not in drop}
    types = {k: f.metadata_types[k] for k in metadata}
    metadata["general.quantization_version"] = GGML_QNT_VERSION
    types["general.quantization_version"] = GGUFValueType.UINT32
    metadata["general.file_type"] = FTYPES[qtype]
    types["general.file_type"] = GGUFValueType.UINT32
    return metadata, types


def check_qtype(qtype: str) -> str:
    key = str(qtype).strip().lower()
    if key in FTYPES:
        return key
    if key.endswith(("_k", "_k_s", "_k_m", "_k_l")) or key.startswith("iq"):
        hint = ("K-quant and IQ files (Q4_K_M, ...) mix types per tensor and are not produced by "
                f"this command; choose one of {', '.join(FTYPES)}")
    else:
        hint = f"choose one of {', '.join(FTYPES)}"
    raise UnsupportedError(f"unsupported quantization type {qtype!r}", hint=hint)


def _as_float32_rows(f: GGUFFile, ti, a: int, b: int) -> np.ndarray:
    # rows a..b of the tensor as float32 [b - a, ne[0]]; f16/bf16 widen exactly
    # (ggml_fp16_to_fp32_row / ggml_bf16_to_fp32_row)
    raw = f.raw(ti.name)[a:b]
    if ti.qtype.name == "f32":
        return raw.view("<f4")
    return ti.qtype.dequantize_blocks(raw.reshape(-1, ti.qtype.type_size)).reshape(b - a, ti.ne[0])


def _convert(f: GGUFFile, ti, new_type: str) -> np.ndarray:
    t = get_type(new_type)
    n_rows = ti.n_rows
    out = np.empty((n_rows, ti.ne[0] // t.block_size * t.type_size), np.uint8)  # [n_rows, row_bytes]
    step = max(1, _SLAB_ELEMENTS // ti.ne[0])
    for a in range(0, n_rows, step):
        b = min(n_rows, a + step)
        try:
            out[a:b] = quantize(_as_float32_rows(f, ti, a, b), t)
        except (NonFiniteError, ShapeError) as e:
            raise type(e)(f"{f.path!r}, tensor {ti.name!r}, rows {a}..{b}: {e}", hint=e.hint) from None
    return out


def _check_input(f: GGUFFile):
    for ti in f.tensors.values():
        if ti.qtype.name not in FLOAT_TYPES:
            raise UnsupportedError(
                f"{f.path!r}: tensor {ti.name!r} is {ti.qtype.name}; the input is already quantized",
                hint="quantize from the original f32/f16/bf16 model: quantizing quantized weights "
                     "again compounds the rounding error")


def quantize_gguf(in_path, out_path, qtype: str, *, progress: bool = False) -> QuantizeReport:
    qtype = check_qtype(qtype)
    in_path, out_path = os.fspath(in_path), os.fspath(out_path)
    if not os.path.exists(in_path):
        raise RefinferError(f"input file {in_path!r} does not exist",
                            hint="give the path of an f32/f16/bf16 GGUF model")
    if os.path.isdir(in_path):
        raise UnsupportedError(f"input {in_path!r} is a directory; quantize reads a single GGUF file",
                               hint="convert a Hugging Face checkpoint to an f16/f32 GGUF first "
                                    "(llama.cpp's convert_hf_to_gguf.py)")
    same = os.path.samefile(in_path, out_path) if os.path.exists(out_path) else \
        os.path.realpath(in_path) == os.path.realpath(out_path)
    if same:
        raise RefinferError(f"output {out_path!r} is the input file",
                            hint="write the quantized model to a new file; the input is read while the output is written")
    if os.path.isdir(out_path):
        raise RefinferError(f"output {out_path!r} is a directory", hint="give a file name such as model-q4_0.gguf")

    start = time.perf_counter()
    f = GGUFFile(in_path)
    _check_input(f)
    report = QuantizeReport(qtype)
    metadata, types = output_metadata(f, qtype)
    arch = f.metadata.get("general.architecture", "llama")
    names = llama_tensor_order(f.tensors)

    def tensors():
        from tqdm import tqdm
        for name in tqdm(names, desc=f"quantize {qtype}", unit="tensor", disable=not progress, file=sys.stderr):
            ti = f.tensors[name]
            new = target_type(name, ti.ne, qtype)
            report.bytes_in += ti.nbytes
            if new is None or new == ti.qtype.name:
                report.n_copied += 1
                data, t = f.raw(name), ti.qtype.name
            else:
                if new == "f16":
                    report.f16_fallback.append(name)
                else:
                    report.n_quantized += 1
                data, t = _convert(f, ti, new), new
            report.bytes_out += data.nbytes
            yield name, data, t, ti.shape

    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise RefinferError(f"output directory {out_dir!r} does not exist")
    # Written next to the target and renamed at the end: an interrupted run leaves no half file.
    fd, tmp = tempfile.mkstemp(prefix=".quantize-", suffix=".gguf.part", dir=out_dir)
    os.close(fd)
    try:
        write_gguf(tmp, arch, metadata, types, tensors(), array_types=f.array_types)
        os.replace(tmp, out_path)
    except BaseException:
        os.unlink(tmp)
        raise
    report.seconds = time.perf_counter() - start
    return report
