"""HF checkpoints with a `quantization_config`: which layout a checkpoint uses (read_spec), one
quantized Linear read into an IntGroupTensor (load_linear), and the inverse for writers (pack,
quantization_config).

The format comes from the config:
- quant_method "gptq": bits, group_size, desc_act, sym, static_groups, and the zero-point
  version in `format` (transformers, GPTQModel) or `checkpoint_format` (older name): "gptq"
  (v1, the default) or "gptq_v2". AutoGPTQ's quantize_config.json beside config.json is read
  when config.json has no quantization_config, as AutoGPTQ's from_pretrained does.
- quant_method "awq": bits (w_bit), group_size (q_group_size), zero_point, version / format
  "gemm" or "gemv" (AutoAWQ, and LMDeploy's `lite auto_awq`, which writes version "gemm").
- quant_method "compressed-tensors", format "pack-quantized": the config_groups entry whose
  targets match the Linear (its class name "Linear", "re:<regex>" or the module name).

Then the data is checked against it. For symmetric 4- and 8-bit GPTQ the stored zeros prove
the version (gptq.py: 0x77777777 words are v1, 0x88888888 v2); where the config says otherwise
(GPTQModel checkpoints labelled "gptq" that carry v2 zeros, vLLM PR #38966), a
CheckpointWarning names the tensor, the word and its count, and the data wins. For asymmetric
checkpoints the config decides, and every v1 zero field that AutoGPTQ decodes from the
corrupting zero-0 case (pitfall 1 in gptq.py) is reported with its tensor and groups; the
weights are what AutoGPTQ computes from them. Inconsistent tensors raise FormatError naming the
tensor, what was found and what the config implies.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings

import numpy as np

from ..errors import CheckpointWarning, FormatError, UnsupportedError
from ..quant.intgroup import IntGroupTensor
from . import awq, compressed_tensors as ct, gptq

FORMATS = ("gptq", "gptq_v2", "awq-gemm", "awq-gemv", "pack-quantized")
WRITE_FORMATS = ("gptq", "gptq_v2", "awq", "awq-gemv", "compressed-tensors")
# numpy dtype of an array from pack() -> the safetensors dtype to store it as
SAFETENSORS_DTYPES = {np.dtype(np.int32): "I32", np.dtype(np.int64): "I64", np.dtype(np.float16): "F16",
                      np.dtype(np.float32): "F32", np.dtype(np.uint16): "BF16"}
SCALE_ROUNDING = {"F16": "f16", "BF16": "bf16", "F32": "f32"}

HINT_CONFIG = "the checkpoint's config.json quantization_config and its tensors disagree: re-download or re-export it"


@dataclasses.dataclass
class QuantSpec:
    method: str                 # "gptq" | "awq" | "compressed-tensors"
    format: str                 # one of FORMATS (for GPTQ: what the config says; see resolved_format)
    bits: int
    group_size: int             # -1: one group per row
    sym: bool
    desc_act: bool = False
    static_groups: bool = False
    source: str = ""            # where the config came from (file, key)
    config: dict = dataclasses.field(default_factory=dict)   # the quantization_config as read
    groups: list = dataclasses.field(default_factory=list)   # compressed-tensors: [(targets, QuantSpec)]
    ignore: list = dataclasses.field(default_factory=list)
    # GPTQ version evidence found while loading: {"format": proven format, "tensor", "word", "count"}
    evidence: dict = dataclasses.field(default_factory=dict)

    @property
    def resolved_format(self) -> str:
        return self.evidence.get("format", self.format)

    def info(self) -> dict:
        return {"method": self.method, "format": self.resolved_format, "group_size": self.group_size,
                "act_order": self.desc_act, "sym": self.sym, "static_groups": self.static_groups}

    def for_module(self, module: str) -> "QuantSpec":
        """The spec of one Linear (compressed-tensors: the config group whose targets match)."""
        if self.method != "compressed-tensors":
            return self
        for targets, spec in self.groups:
            if any(_target_matches(t, module) for t in targets):
                return spec
        raise FormatError(f"module {module!r} has packed weights, but no config_groups entry of "
                          f"quantization_config targets it", file=self.source, tensor=module + ".weight_packed",
                          hint=HINT_CONFIG)


def _target_matches(target: str, module: str) -> bool:
    if target == "Linear":
        return True
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module


# --- reading the config ----------------------------------------------------------------------

def _field(qc: dict, keys, default, kind, source):
    for k in keys:
        if k in qc and qc[k] is not None:
            v = qc[k]
            if kind is bool and not isinstance(v, bool):
                raise FormatError(f"quantization_config.{k} is {v!r}, expected true or false", file=source)
            if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
                raise FormatError(f"quantization_config.{k} is {v!r}, expected an integer", file=source)
            if kind is str and not isinstance(v, str):
                raise FormatError(f"quantization_config.{k} is {v!r}, expected a string", file=source)
            return v
    return default


def _bits(value, allowed, method, source):
    if value not in allowed:
        raise FormatError(f"quantization_config.bits is {value!r}; {method} stores {', '.join(map(str, allowed))}-bit "
                          f"codes", file=source,
                          hint="this checkpoint uses a bit width its format cannot store: it is damaged or "
                               "from an unsupported producer")
    return value


def _group_size(value, source):
    if value != -1 and value <= 0:
        raise FormatError(f"quantization_config.group_size is {value}, expected -1 or a positive integer",
                          file=source)
    return value


def read_spec(hf_config: dict, path) -> QuantSpec | None:
    """The checkpoint's QuantSpec, or None for a float checkpoint."""
    source = os.path.join(os.fspath(path), "config.json") if os.path.isdir(os.fspath(path)) else os.fspath(path)
    qc = hf_config.get("quantization_config")
    if qc is None:
        qc, source = _side_config(path)
        if qc is None:
            return None
    if not isinstance(qc, dict):
        raise FormatError(f"quantization_config is a JSON {type(qc).__name__}, expected an object", file=source)
    method = qc.get("quant_method", "gptq" if "bits" in qc and "desc_act" in qc else None)
    if method == "gptq":
        return _gptq_spec(qc, source)
    if method == "awq":
        return _awq_spec(qc, source)
    if method == "compressed-tensors":
        return _ct_spec(qc, source)
    raise UnsupportedError(f"{source}: quantization_config.quant_method is {method!r}; refinfer reads 'gptq', "
                           f"'awq' and 'compressed-tensors' checkpoints",
                           hint="dequantize the checkpoint to float16 with its own library, or convert it to GGUF")


def _side_config(path):
    """AutoGPTQ's quantize_config.json / quant_config.json beside config.json."""
    folder = os.fspath(path) if os.path.isdir(os.fspath(path)) else os.path.dirname(os.fspath(path))
    for name in ("quantize_config.json", "quant_config.json"):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            try:
                with open(p, "rb") as f:
                    qc = json.loads(f.read(1_000_000).decode("utf-8"))
            except ValueError as e:
                raise FormatError(f"not valid JSON: {e}", file=p) from None
            if name == "quant_config.json" and "quant_method" not in qc:
                qc = dict(qc, quant_method="awq" if "w_bit" in qc else "gptq")
            return qc, p
    return None, None


def _gptq_spec(qc, source) -> QuantSpec:
    if qc.get("is_marlin_format"):
        raise UnsupportedError(f"{source}: quantization_config.is_marlin_format is true (Marlin-repacked GPTQ)",
                               hint="use the checkpoint's plain GPTQ version")
    if qc.get("dynamic"):
        raise UnsupportedError(f"{source}: quantization_config.dynamic has per-module overrides "
                               f"({', '.join(list(qc['dynamic'])[:3])}); refinfer reads one bits/group_size per model",
                               hint="use a checkpoint quantized with one setting for all modules")
    fmt = _field(qc, ("format", "checkpoint_format"), "gptq", str, source)
    other = qc.get("checkpoint_format")
    if isinstance(other, str) and other in ("gptq", "gptq_v2") and fmt not in ("gptq", "gptq_v2"):
        fmt = other
    if fmt not in ("gptq", "gptq_v2"):
        raise UnsupportedError(f"{source}: quantization_config.format is {fmt!r}; refinfer reads 'gptq' (v1) and "
                               f"'gptq_v2'", hint="re-export the checkpoint in the plain GPTQ format")
    bits = _bits(_field(qc, ("bits", "w_bit"), 4, int, source), gptq.BITS, "GPTQ", source)
    gs = _group_size(_field(qc, ("group_size", "q_group_size"), 128, int, source), source)
    meta = qc.get("meta") if isinstance(qc.get("meta"), dict) else {}
    return QuantSpec("gptq", fmt, bits, gs, sym=_field(qc, ("sym",), True, bool, source),
                     desc_act=_field(qc, ("desc_act",), False, bool, source),
                     static_groups=bool(_field(qc, ("static_groups",), meta.get("static_groups", False), bool, source)),
                     source=source, config=dict(qc))


def _awq_spec(qc, source) -> QuantSpec:
    version = _field(qc, ("version", "format"), "gemm", str, source).lower()
    if version not in ("gemm", "gemv"):
        raise UnsupportedError(f"{source}: quantization_config.version is {version!r}; refinfer reads AWQ 'gemm' "
                               f"and 'gemv'", hint="re-export the checkpoint with AutoAWQ's GEMM version")
    bits = _bits(_field(qc, ("bits", "w_bit"), 4, int, source), (awq.BITS,), "AWQ", source)
    gs = _group_size(_field(qc, ("group_size", "q_group_size"), 128, int, source), source)
    zero_point = _field(qc, ("zero_point",), True, bool, source)
    return QuantSpec("awq", "awq-" + version, bits, gs, sym=not zero_point, source=source, config=dict(qc))


def _ct_spec(qc, source) -> QuantSpec:
    top = qc.get("format")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise FormatError("quantization_config.config_groups is missing or empty", file=source, hint=HINT_CONFIG)
    parsed = []
    for gname, group in groups.items():
        where = f"quantization_config.config_groups.{gname}"
        if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
            raise FormatError(f"{where}.weights is missing", file=source, hint=HINT_CONFIG)
        fmt = group.get("format") or top
        if fmt != "pack-quantized":
            raise UnsupportedError(f"{source}: {where} has format {fmt!r}; refinfer reads compressed-tensors "
                                   f"'pack-quantized'", hint="re-export the checkpoint with format pack-quantized")
        if group.get("input_activations"):
            raise UnsupportedError(f"{source}: {where}.input_activations are quantized; refinfer reads weight-only "
                                   f"(W*A16) schemes", hint="use a W4A16/W8A16 checkpoint")
        w = group["weights"]
        if w.get("type", "int") != "int":
            raise UnsupportedError(f"{source}: {where}.weights.type is {w.get('type')!r}; pack-quantized stores 'int'")
        bits = _bits(w.get("num_bits"), ct.BITS, "compressed-tensors pack-quantized", source)
        strategy = w.get("strategy")
        if strategy == "group":
            gs = _group_size(_field(w, ("group_size",), None, int, source), source) if w.get("group_size") else None
            if gs is None or gs == -1:
                raise FormatError(f"{where}.weights.strategy is 'group' but group_size is {w.get('group_size')!r}",
                                  file=source, hint=HINT_CONFIG)
        elif strategy == "channel":
            gs = -1
        else:
            raise UnsupportedError(f"{source}: {where}.weights.strategy is {strategy!r}; refinfer reads 'group' and "
                                   f"'channel'")
        targets = group.get("targets") or []
        spec = QuantSpec("compressed-tensors", "pack-quantized", bits, gs, sym=bool(w.get("symmetric", True)),
                         desc_act=w.get("actorder") in ("group", "dynamic"), source=source, config=dict(qc))
        parsed.append((list(targets) if isinstance(targets, list) else [targets], spec))
    first = parsed[0][1]
    return dataclasses.replace(first, groups=parsed, ignore=list(qc.get("ignore") or []))


# --- one Linear ----------------------------------------------------------------------------

COMPONENTS = {  # the tensors one quantized Linear stores, by method
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "awq": ("qweight", "qzeros", "scales"),
    "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"),
}


def quantized_linears(ck, spec: QuantSpec) -> dict:
    """{module prefix: (N, K)} for every quantized Linear of ck, (N, K) as its tensors declare it
    (load_linear checks every tensor against the shape the model's hyperparameters give)."""
    key = "weight_packed" if spec.method == "compressed-tensors" else "qweight"
    out = {}
    for name, info in ck.tensors.items():
        prefix, _, suffix = name.rpartition(".")
        if suffix != key:
            continue
        if len(info.shape) != 2:
            raise FormatError(f"has {len(info.shape)} dimensions, expected 2", file=ck.path, tensor=name,
                              hint=HINT_CONFIG)
        rows, cols = info.shape
        if spec.method == "compressed-tensors":
            ws = ck.tensors.get(prefix + ".weight_shape")
            if ws is None or ws.dtype not in ("I64", "I32") or tuple(ws.shape) != (2,):
                raise FormatError("missing or not an integer pair: a pack-quantized Linear needs weight_shape (N, K)",
                                  file=ck.path, tensor=prefix + ".weight_shape", hint=HINT_CONFIG)
            out[prefix] = tuple(int(v) for v in np.asarray(ck.raw(prefix + ".weight_shape")))
        elif spec.method == "gptq":
            out[prefix] = (cols, rows * 32 // spec.for_module(prefix).bits)
        elif spec.format == "awq-gemm":
            out[prefix] = (cols * 8, rows)
        else:
            out[prefix] = (rows, cols * 8)
    return out


def _warn_default(message):
    warnings.warn(message, CheckpointWarning, stacklevel=4)


class _Reader:
    """Fetches a Linear's tensors with dtype and shape checks that name the tensor."""

    def __init__(self, ck, prefix):
        self.ck, self.prefix, self.file = ck, prefix, ck.path

    def fail(self, suffix, message, hint=HINT_CONFIG):
        raise FormatError(message, file=self.file, tensor=f"{self.prefix}.{suffix}", hint=hint)

    def has(self, suffix):
        return f"{self.prefix}.{suffix}" in self.ck.tensors

    def get(self, suffix, dtypes, shape=None, what=""):
        name = f"{self.prefix}.{suffix}"
        info = self.ck.tensors.get(name)
        if info is None:
            self.fail(suffix, f"missing: a quantized Linear needs {suffix}{what}",
                      hint="the checkpoint is incomplete or its config names the wrong format")
        if info.dtype not in dtypes:
            self.fail(suffix, f"dtype {info.dtype}, expected {' or '.join(dtypes)}")
        if shape is not None and tuple(info.shape) != tuple(shape):
            self.fail(suffix, f"shape {tuple(info.shape)}, expected {tuple(shape)}{what}")
        return info, self.ck.raw(name)

    def scales(self, shape, what):
        info, _ = self.get("scales", ("F16", "BF16", "F32"), shape, what)
        return self.ck.get(f"{self.prefix}.scales"), SCALE_ROUNDING[info.dtype]


def load_linear(ck, hf_prefix: str, spec: QuantSpec, *, warn=None, name=None, shape=None) -> IntGroupTensor:
    """The quantized Linear `<hf_prefix>.*` of checkpoint ck (a SafetensorsCheckpoint).
    shape (N, K), when given, is what the model's hyperparameters imply; the tensors must agree."""
    warn = warn or _warn_default
    spec = spec.for_module(hf_prefix)
    r = _Reader(ck, hf_prefix)
    load = {"gptq": _load_gptq, "awq": _load_awq, "compressed-tensors": _load_ct}[spec.method]
    codes, scales, zeros, g_idx, rounding = load(r, spec, shape, warn)
    return IntGroupTensor(name or hf_prefix + ".weight", codes, scales, zeros, g_idx, spec.bits, rounding,
                          spec.info())


def _n_groups(K, gs):
    return 1 if gs == -1 else -(-K // gs)


def _g_idx(r, K, G, gs, stored_dtype=("I32",)):
    info, raw = r.get("g_idx", stored_dtype, (K,), f" (one group index per input, K = {K})")
    g = np.asarray(raw, np.int64)
    if K and (g.min() < 0 or g.max() >= G):
        bad = int(np.flatnonzero((g < 0) | (g >= G))[0])
        r.fail("g_idx", f"g_idx[{bad}] = {int(g[bad])} is out of range: there are {G} groups "
                        f"(group_size {gs}, K = {K}), so 0..{G - 1}")
    return g.astype(np.int32)


def _load_gptq(r, spec, shape, warn):
    bits, gs = spec.bits, spec.group_size
    qinfo, qweight = r.get("qweight", ("I32", "U32"))
    if len(qinfo.shape) != 2:
        r.fail("qweight", f"has {len(qinfo.shape)} dimensions, expected 2 ([K*bits/32, N])")
    N = qinfo.shape[1] if shape is None else shape[0]
    K = qinfo.shape[0] * 32 // bits if shape is None else shape[1]
    if K * bits % 32:
        r.fail("qweight", f"K = {K} inputs at {bits} bits do not fill whole 32-bit words", hint=HINT_CONFIG)
    want = gptq.qweight_shape(N, K, bits)
    if tuple(qinfo.shape) != want:
        r.fail("qweight", f"shape {tuple(qinfo.shape)}, expected {want} for {bits}-bit codes of a "
                          f"{N} x {K} weight (K*bits/32 words per column)")
    G = _n_groups(K, gs)
    what = f" for group_size {gs} ({G} groups)"
    zinfo, qzeros = r.get("qzeros", ("I32", "U32"), gptq.qzeros_shape(N, G, bits), what)
    scales, rounding = r.scales((G, N), what)
    g_idx = gptq.default_g_idx(K, gs)
    if r.has("g_idx"):
        stored = _g_idx(r, K, G, gs)
        if not spec.desc_act and not np.array_equal(stored, g_idx):
            warn(f"{r.prefix}.g_idx: the stored groups are not k // group_size (act-order), but "
                 f"quantization_config.desc_act is false; using the stored g_idx")
        g_idx = stored
    elif spec.desc_act and gs != -1:
        r.get("g_idx", ("I32",), (K,), " (quantization_config.desc_act is true)")

    fmt = _gptq_version(r, spec, qzeros, warn)
    qlinear = gptq.autogptq_qlinear(spec.desc_act, gs)
    stored_z = gptq.unpack_qzeros(np.asarray(qzeros), bits, N)                    # [N, G]
    if fmt == "gptq":
        _report_v1_zero0(r, stored_z, bits, qlinear, warn)
    zeros = gptq.zeros_from_stored(stored_z, bits, fmt, qlinear)
    codes = gptq.unpack_qweight(np.asarray(qweight), bits, K)
    return codes, np.ascontiguousarray(scales.T), np.ascontiguousarray(zeros), g_idx, rounding


def _gptq_version(r, spec, qzeros, warn) -> str:
    """v1 or v2: proven by symmetric 4/8-bit zero words, else the config's."""
    words = gptq.SYM_ZERO_WORDS.get(spec.bits)
    if not (spec.sym and words):
        return spec.resolved_format
    u = np.asarray(qzeros).view(np.uint32)
    for fmt, word in zip(("gptq", "gptq_v2"), words):
        count = int(np.count_nonzero(u == word))
        if u.size and count == u.size:
            if fmt != spec.resolved_format:
                said = (f"the earlier tensor {spec.evidence['tensor']} proved {spec.evidence['format']}"
                        if spec.evidence else f"quantization_config says format {spec.format!r}")
                warn(f"{r.prefix}.qzeros: all {count} words are 0x{word:08x}, the symmetric {spec.bits}-bit zero "
                     f"stored as {'zero - 1 (v1, gptq)' if fmt == 'gptq' else 'the true zero (v2, gptq_v2)'}, but "
                     f"{said}; using {fmt}")
            spec.evidence = {"format": fmt, "tensor": f"{r.prefix}.qzeros", "word": word, "count": count}
            return fmt
    return spec.resolved_format


def _report_v1_zero0(r, stored_z, bits, qlinear, warn):
    maxq = (1 << bits) - 1
    hit = stored_z == maxq                                                       # [N, G]
    if not hit.any():
        return
    n, g = np.nonzero(hit)
    groups = sorted(set(int(x) for x in g))
    decoded = 0 if (qlinear == "qlinear_cuda_old" and bits != 3) else maxq + 1
    warn(f"{r.prefix}.qzeros: {len(n)} v1 zero fields hold {maxq} (a true zero of 0 stored as -1, which "
         f"AutoGPTQ's pack also spills into the higher fields of the same word), in groups "
         f"{', '.join(map(str, groups[:8]))}{' ...' if len(groups) > 8 else ''} (first at group {int(g[0])}, "
         f"output row {int(n[0])}); AutoGPTQ's {qlinear} dequantizes them with zero {decoded}, and so does "
         f"refinfer")


def _load_awq(r, spec, shape, warn):
    gs = spec.group_size
    if spec.format == "awq-gemm":
        qinfo, qweight = r.get("qweight", ("I32", "U32"))
        if len(qinfo.shape) != 2:
            r.fail("qweight", f"has {len(qinfo.shape)} dimensions, expected 2 ([K, N/8])")
        K, N = (qinfo.shape[0], qinfo.shape[1] * 8) if shape is None else (shape[1], shape[0])
        if N % 8 or tuple(qinfo.shape) != (K, N // 8):
            r.fail("qweight", f"shape {tuple(qinfo.shape)}, expected {(K, N // 8)} for the AWQ GEMM layout of a "
                              f"{N} x {K} weight (8 codes per word along N)")
        gs_ = K if gs == -1 else gs
        if K % gs_:
            r.fail("qweight", f"K = {K} is not a multiple of group_size {gs} (AutoAWQ's layout needs whole groups)")
        G = K // gs_
        _, qzeros = r.get("qzeros", ("I32", "U32"), (G, N // 8), f" for group_size {gs} ({G} groups)")
        scales, rounding = r.scales((G, N), f" for group_size {gs} ({G} groups)")
        codes, zeros, _ = awq.unpack_gemm(np.asarray(qweight), np.asarray(qzeros), np.zeros((G, N), np.float32))
        return codes, np.ascontiguousarray(scales.T), zeros, gptq.default_g_idx(K, gs), rounding
    qinfo, qweight = r.get("qweight", ("I32", "U32"))
    if len(qinfo.shape) != 2:
        r.fail("qweight", f"has {len(qinfo.shape)} dimensions, expected 2 ([N, K/8])")
    N, K = (qinfo.shape[0], qinfo.shape[1] * 8) if shape is None else shape
    if tuple(qinfo.shape) != (N, K // 8) or K % 8:
        r.fail("qweight", f"shape {tuple(qinfo.shape)}, expected {(N, K // 8)} for the AWQ GEMV layout of a "
                          f"{N} x {K} weight (8 codes per word along K)")
    gs_ = K if gs == -1 else gs
    Zw = awq.calculate_zeros_width(K, gs_)
    if Zw is None or K % gs_:
        r.fail("qweight", f"group_size {gs} with K = {K}: AutoAWQ's GEMV layout takes group sizes 32, 64 and "
                          f">= 128 dividing K", hint="the checkpoint's group_size is wrong for this layout")
    G = K // gs_
    _, qzeros = r.get("qzeros", ("I32", "U32"), (N, Zw), f" (calculate_zeros_width({K}, {gs_}) = {Zw})")
    scales, _ = r.scales((N, 8 * Zw), f" (8 * calculate_zeros_width = {8 * Zw})")
    codes, zeros, scales = awq.unpack_gemv(np.asarray(qweight), np.asarray(qzeros), scales, K, G)
    return codes, scales, zeros, gptq.default_g_idx(K, gs), "f32"


def _load_ct(r, spec, shape, warn):
    bits, gs = spec.bits, spec.group_size
    _, ws = r.get("weight_shape", ("I64", "I32"), (2,))
    N, K = (int(v) for v in np.asarray(ws))
    if shape is not None and (N, K) != tuple(shape):
        r.fail("weight_shape", f"is ({N}, {K}), but the model's hyperparameters give {tuple(shape)}")
    if N <= 0 or K <= 0:
        r.fail("weight_shape", f"is ({N}, {K}), expected positive sizes")
    _, packed = r.get("weight_packed", ("I32",), ct.weight_packed_shape(N, K, bits),
                      f" for {bits}-bit codes of a {N} x {K} weight")
    G = _n_groups(K, gs)
    what = f" for strategy {'channel' if gs == -1 else 'group'} ({G} groups)"
    info, _ = r.get("weight_scale", ("F16", "BF16", "F32"), (N, G), what)
    scales = r.ck.get(f"{r.prefix}.weight_scale")
    rounding = SCALE_ROUNDING[info.dtype]
    g_idx = _g_idx(r, K, G, gs) if r.has("weight_g_idx") else gptq.default_g_idx(K, gs)
    if spec.sym:
        zeros = np.full((N, G), ct.offset(bits), np.int16)
    else:
        _, zp = r.get("weight_zero_point", ("I32",), ct.zero_point_shape(N, G, bits), f" (asymmetric, {G} groups)")
        zeros = ct.unpack_zero_point(np.asarray(zp), bits, N)
    codes = ct.unpack_weight(np.asarray(packed), bits, K)
    return codes, scales, zeros, g_idx, rounding


# --- writing -----------------------------------------------------------------------------

def _scales_array(t: IntGroupTensor) -> np.ndarray:
    if t.rounding == "bf16":
        from ..quant._common import f32_to_bf16_bits
        return f32_to_bf16_bits(t.scales)                                        # uint16 bits -> "BF16"
    if t.rounding == "f16":
        return t.scales.astype(np.float16)
    return t.scales.astype(np.float32)


def _group_size_of(t: IntGroupTensor) -> int:
    gs = t.info.get("group_size")
    if gs is None:
        K = t.shape[1]
        gs = -1 if t.n_groups == 1 else -(-K // t.n_groups)
    return int(gs)


def pack(t: IntGroupTensor, fmt: str) -> dict:
    """The tensors a checkpoint of format fmt stores for t, by suffix ("qweight", "qzeros",
    "scales", "g_idx"; "weight_packed", "weight_scale", "weight_zero_point", "weight_shape").
    Arrays are int32/int64, float16/float32 scales, or uint16 bit patterns for bf16 scales
    (SAFETENSORS_DTYPES maps each to its safetensors dtype). t.zeros are the true zeros."""
    N, K = t.shape
    gs = _group_size_of(t)
    trivial = np.array_equal(t.g_idx, gptq.default_g_idx(K, gs))

    def need(ok, message):
        if not ok:
            raise UnsupportedError(f"{t.name}: cannot store as {fmt}: {message}",
                                   hint=f"choose a format that can store it: {', '.join(WRITE_FORMATS)}")

    need(fmt in WRITE_FORMATS, f"unknown format; choose one of {', '.join(WRITE_FORMATS)}")
    need(int(t.zeros.min()) >= 0 and int(t.zeros.max()) < (1 << t.bits), "zeros outside 0..2^bits-1")
    if fmt in ("gptq", "gptq_v2"):
        need(t.bits in gptq.BITS, f"{t.bits}-bit codes (GPTQ stores {gptq.BITS})")
        need(K % 32 == 0 and N % 32 == 0, f"shape {t.shape}: AutoGPTQ's layout needs N and K multiples of 32")
        stored = gptq.stored_from_zeros(t.zeros, t.bits, fmt)
        return {"qweight": gptq.pack_qweight(t.codes, t.bits), "qzeros": gptq.pack_qzeros(stored, t.bits),
                "scales": np.ascontiguousarray(_scales_array(t).T), "g_idx": t.g_idx.astype(np.int32)}
    if fmt in ("awq", "awq-gemv"):
        need(t.bits == 4, f"{t.bits}-bit codes (AWQ stores 4-bit)")
        need(trivial, "act-order g_idx (AWQ groups are contiguous)")
        need(N % 8 == 0 and K % (K if gs == -1 else gs) == 0, f"shape {t.shape} with group_size {gs}")
        if fmt == "awq":
            qweight, qzeros, scales = awq.pack_gemm(t.codes, t.zeros.astype(np.uint8), _scales_array(t))
            return {"qweight": qweight, "qzeros": qzeros, "scales": scales}
        need(awq.calculate_zeros_width(K, K if gs == -1 else gs) is not None, f"group_size {gs} (GEMV: 32, 64, >= 128)")
        qweight, qzeros, scales = awq.pack_gemv(t.codes, t.zeros.astype(np.uint8), _scales_array(t),
                                                K if gs == -1 else gs)
        return {"qweight": qweight, "qzeros": qzeros, "scales": scales}
    need(t.bits in ct.BITS, f"{t.bits}-bit codes (pack-quantized stores {ct.BITS[0]}..{ct.BITS[-1]})")
    need(trivial, "act-order g_idx (compressed-tensors 0.20 stores no g_idx)")
    out = {"weight_packed": ct.pack_weight(t.codes, t.bits), "weight_scale": _scales_array(t),
           "weight_shape": np.array([N, K], np.int64)}
    if not _is_sym(t):
        out["weight_zero_point"] = ct.pack_zero_point(t.zeros, t.bits)
    return out


def _is_sym(t: IntGroupTensor) -> bool:
    if "sym" in t.info:
        return bool(t.info["sym"])
    return bool(np.all(t.zeros == (1 << (t.bits - 1))))


def quantization_config(fmt: str, bits: int, group_size: int, sym: bool, desc_act: bool = False,
                        static_groups: bool = False, *, damp_percent: float = 0.01, true_sequential: bool = True,
                        ignore=("lm_head",)) -> dict:
    """config.json's quantization_config for a checkpoint written with pack(., fmt)."""
    if fmt in ("gptq", "gptq_v2"):
        return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
                "static_groups": static_groups, "damp_percent": damp_percent, "true_sequential": true_sequential,
                "format": fmt, "checkpoint_format": fmt, "model_name_or_path": None, "model_file_base_name": None,
                "is_marlin_format": False}
    if fmt in ("awq", "awq-gemv"):
        return {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": not sym,
                "version": "gemm" if fmt == "awq" else "gemv", "modules_to_not_convert": None}
    if fmt == "compressed-tensors":
        weights = {"num_bits": bits, "type": "int", "symmetric": sym,
                   "strategy": "channel" if group_size == -1 else "group",
                   "group_size": None if group_size == -1 else group_size, "block_structure": None,
                   "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}}
        return {"quant_method": "compressed-tensors", "format": "pack-quantized",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                              "output_activations": None, "format": "pack-quantized"}},
                "ignore": list(ignore), "kv_cache_scheme": None, "quantization_status": "compressed",
                "sparsity_config": {}, "transform_config": {}, "version": "0.20.0"}
    raise UnsupportedError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(WRITE_FORMATS)}")


__all__ = ["QuantSpec", "read_spec", "load_linear", "quantized_linears", "COMPONENTS", "pack", "quantization_config", "FORMATS",
           "WRITE_FORMATS", "SAFETENSORS_DTYPES"]
