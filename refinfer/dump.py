"""Activation dumps: every intermediate tensor of one forward pass, named as llama.cpp's eval
callback names them, in a safetensors file (the format is specified in formats/dump-format.md),
and the comparison of two dumps that names the first tensor, in forward order, that differs by
more than its tolerance.

Tensor names and shapes (T tokens; NumPy order, i.e. ggml's ne reversed):

    inp_embd                     [T, dim]         token embeddings
    attn_norm-N                  [T, dim]         RMSNorm(x) * attn_norm weight
    Qcur-N, Kcur-N               [T, heads, hd]   after RoPE (Kcur/Vcur with n_kv_heads)
    Vcur-N                       [T, n_kv, hd]
    kq-N                         [heads, T, T]    raw K.Q scores: before scale, mask and softmax
    kqv_out-N                    [T, dim]         attention output before attn_output
    attn_out-N                   [T, dim]         after attn_output
    ffn_inp-N                    [T, dim]         residual after attention
    ffn_norm-N                   [T, dim]
    ffn_swiglu-N                 [T, hidden_dim]  silu(gate) * up
    ffn_out-N                    [T, dim]         after ffn_down
    l_out-N                      [T, dim]         residual after the block
    result_norm                  [T, dim]
    result_output                [T, vocab]       logits
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import pathlib
import re
import struct
from dataclasses import dataclass, field

import numpy as np

from .errors import FormatError, RefinferError

FORMAT = "refinfer-dump"
FORMAT_VERSION = 1
LAYER_OPS = ("attn_norm", "Qcur", "Kcur", "Vcur", "kq", "kqv_out", "attn_out", "ffn_inp", "ffn_norm",
             "ffn_swiglu", "ffn_out", "l_out")
_LAYER_NAME = re.compile(r"^([A-Za-z_]+)-(\d+)$")
MAX_HEADER = 100 * 1024 * 1024


def forward_key(name: str) -> tuple:
    """Sort key putting tensor names in the order the forward pass computes them; names this
    format does not define come last, alphabetically."""
    if name == "inp_embd":
        return (0, 0, 0, name)
    m = _LAYER_NAME.match(name)
    if m and m.group(1) in LAYER_OPS:
        return (1, int(m.group(2)), LAYER_OPS.index(m.group(1)), name)
    if name == "result_norm":
        return (2, 0, 0, name)
    if name == "result_output":
        return (2, 0, 1, name)
    return (3, 0, 0, name)


def is_known(name: str) -> bool:
    return forward_key(name)[0] < 3


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- capturing --------------------------------------------------------------------------------

def _kq(q, k, ggml_mode):  # q[T, heads, hd], k[T, n_kv, hd] -> [heads, T, T]
    """K.Q for every pair of positions, as llama.cpp's kq-N (before scale and mask). In ggml mode
    Q and K are first rounded to F16, as llama.cpp's F16 KV cache and F16 K.Q matmul see them;
    the sum is then exact in float64, not in ggml's lane order (differences ~1e-7 relative)."""
    if ggml_mode:
        q, k = q.astype(np.float16), k.astype(np.float16)
    group = q.shape[1] // k.shape[1]
    kh = np.repeat(k.astype(np.float64), group, axis=1)                      # [T, heads, hd]
    return np.einsum("thd,shd->hts", q.astype(np.float64), kh).astype(np.float32)


def capture_refinfer(model, tokens, progress=False) -> dict:
    """{name: float32 array} of one teacher-forced forward pass of a refinfer Model."""
    from tqdm import tqdm
    cfg = model.config
    T = len(tokens)
    out = {}
    bar = tqdm(total=cfg.n_layers, desc="dump", unit="layer", disable=None if progress else True, leave=False)

    def tap(name, value):
        a = np.array(value, dtype=np.float32)  # a copy: forward() reuses its buffers
        if name.startswith("kqv_out-"):
            a = a.reshape(T, -1)
        out[name] = a
        m = _LAYER_NAME.match(name)
        if m and m.group(1) == "Kcur":
            i = m.group(2)
            out[f"kq-{i}"] = _kq(out[f"Qcur-{i}"], a, model.mode == "ggml")
        if m and m.group(1) == "l_out":
            bar.update(1)

    try:
        model.logits(tokens, tap=tap)
    finally:
        bar.close()
    return out


def capture_llama_cpp(model_path, tokens) -> dict:
    """The same tensors from llama.cpp's own graph (eval callback), renamed and cut to the
    shapes above: llama.cpp calls the embeddings `embd` and computes kq-N against its whole
    padded KV cache, of which the first T columns are the prompt's."""
    from .llama_oracle import llama_intermediates
    T = len(tokens)
    _, raw = llama_intermediates(model_path, tokens)
    out = {}
    for name, a in raw.items():
        name = "inp_embd" if name == "embd" else name
        if not is_known(name):
            continue
        if name.startswith("kq-"):
            a = a[..., :T]
        out[name] = np.ascontiguousarray(a, dtype=np.float32)
    return out


# ---- the file ---------------------------------------------------------------------------------

@dataclass
class Dump:
    header: dict
    tokens: np.ndarray                           # int32[T]
    tensors: dict = field(default_factory=dict)  # name -> float32 array, in forward order
    path: str = ""


def write_dump(path, tensors: dict, tokens, header: dict):
    """A safetensors file: F32 tensors in forward order, the token ids as I32 `tokens`, and the
    header as string values in __metadata__."""
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
    meta.update({k: str(v) for k, v in header.items()})
    arrays = {"tokens": np.asarray(tokens, dtype="<i4")}
    for name in sorted(tensors, key=forward_key):
        arrays[name] = np.ascontiguousarray(tensors[name], dtype="<f4")
    head, blobs, offset = {"__metadata__": meta}, [], 0
    for name, a in arrays.items():
        b = a.tobytes()
        head[name] = {"dtype": "I32" if a.dtype.kind == "i" else "F32", "shape": list(a.shape),
                      "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    raw = json.dumps(head).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)


def read_dump(path) -> Dump:
    path = str(path)
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as e:
        raise RefinferError(f"cannot read dump {path}: {e.strerror}") from None
    if len(data) < 8:
        raise FormatError(f"file of {len(data)} bytes is too short for a safetensors header", file=path, offset=0)
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > min(MAX_HEADER, len(data) - 8):
        raise FormatError(f"header length {n} exceeds the file size {len(data)}", file=path, offset=0)
    try:
        head = json.loads(data[8: 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"header is not JSON: {e}", file=path, offset=8) from None
    if not isinstance(head, dict):
        raise FormatError("header is not a JSON object", file=path, offset=8)
    meta = head.pop("__metadata__", None) or {}
    if meta.get("format") != FORMAT:
        raise FormatError(f"__metadata__.format is {meta.get('format')!r}, expected {FORMAT!r}", file=path,
                          hint="write dumps with `python -m refinfer dump` or follow formats/dump-format.md")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise FormatError(f"format_version {meta.get('format_version')!r} is not supported (expected {FORMAT_VERSION})",
                          file=path)
    start, size = 8 + n, len(data) - 8 - n
    arrays = {}
    for name, e in head.items():
        dtype = {"F32": "<f4", "I32": "<i4"}.get(e.get("dtype") if isinstance(e, dict) else None)
        if dtype is None:
            raise FormatError(f"dtype {e.get('dtype') if isinstance(e, dict) else e!r} not allowed (F32 or I32)",
                              file=path, tensor=name)
        shape, offs = e.get("shape"), e.get("data_offsets")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)):
            raise FormatError(f"bad shape {shape!r} or data_offsets {offs!r}", file=path, tensor=name)
        a, b = offs
        want = math.prod(shape) * 4
        if not 0 <= a <= b <= size or b - a != want:
            raise FormatError(f"data_offsets [{a}, {b}] do not hold {want} bytes inside {size} data bytes",
                              file=path, tensor=name, offset=start + a)
        arrays[name] = np.frombuffer(data, dtype=dtype, count=want // 4, offset=start + a).reshape(shape)
    if "tokens" not in arrays:
        raise FormatError("no `tokens` tensor", file=path)
    tokens = arrays.pop("tokens")
    tensors = {k: arrays[k] for k in sorted(arrays, key=forward_key)}
    return Dump(meta, tokens, tensors, path)


# ---- comparing --------------------------------------------------------------------------------

# Default limit: what separates rounding from a bug when the two sides run the same weights.
# On SmolLM2-135M Q4_1 (30 layers, 25 tokens) refinfer's ideal mode differs from llama.cpp by
# NMSE <= 6e-3 on every tensor (largest at kqv_out: llama.cpp's F16 KV cache and q8 activation
# quantization); ggml mode is bit-identical except kq (~1e-14, lane order). A real bug (RoPE
# pairs mixed up, a norm weight missing, a tensor scaled by 1.1) gives 1e-2 and far more.
DEFAULT_TOLERANCES = {"default": {"nmse": 1e-2}}


@dataclass
class TensorDiff:
    name: str
    shape: tuple
    nmse: float
    max_abs: float
    cos: float
    limit: dict
    ok: bool
    why: str = ""


def load_tolerances(path=None) -> dict:
    if path is None:
        return DEFAULT_TOLERANCES
    try:
        table = json.loads(pathlib.Path(path).read_text())
    except OSError as e:
        raise RefinferError(f"cannot read tolerance table {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"tolerance table is not JSON: {e}", file=str(path)) from None
    if not isinstance(table, dict) or not isinstance(table.get("tensors", {}), dict):
        raise FormatError('expected {"default": {...}, "tensors": {"glob": {...}}}', file=str(path))
    for key, rule in [("default", table.get("default", {}))] + list(table.get("tensors", {}).items()):
        if not isinstance(rule, dict) or set(rule) - {"nmse", "max_abs", "cos"} or not all(
                isinstance(v, (int, float)) for v in rule.values()):
            raise FormatError(f"rule {key!r} must map nmse / max_abs / cos to numbers, got {rule!r}", file=str(path))
    return table


def limit_for(name: str, table: dict) -> dict:
    for pattern, rule in table.get("tensors", {}).items():
        if fnmatch.fnmatchcase(name, pattern):
            return rule
    return table.get("default", DEFAULT_TOLERANCES["default"])


def diff_tensor(name, a, b, limit) -> TensorDiff:
    """b against the reference a: NMSE = sum((b - a)^2) / sum(a^2), max |b - a|, cosine."""
    if a.shape != b.shape:
        if a.size != b.size:
            return TensorDiff(name, a.shape, math.inf, math.inf, 0.0, limit, False,
                              f"shape {tuple(b.shape)} vs reference {tuple(a.shape)}")
        b = b.reshape(a.shape)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    fa, fb = np.isfinite(a64), np.isfinite(b64)
    if not np.array_equal(fa, fb) or not np.array_equal(a64[~fa], b64[~fb]):
        return TensorDiff(name, a.shape, math.inf, math.inf, 0.0, limit, False, "non-finite values differ")
    d = np.where(fa, b64 - a64, 0.0)
    a0, b0 = np.where(fa, a64, 0.0), np.where(fb, b64, 0.0)
    den = float(np.sum(a0 * a0))
    err = float(np.sum(d * d))
    nmse = err / den if den else (0.0 if err == 0 else math.inf)
    max_abs = float(np.max(np.abs(d))) if d.size else 0.0
    na, nb = math.sqrt(den), math.sqrt(float(np.sum(b0 * b0)))
    cos = float(np.sum(a0 * b0)) / (na * nb) if na and nb else (1.0 if na == nb else 0.0)
    why = []
    if nmse > limit.get("nmse", math.inf):
        why.append(f"nmse {nmse:.3g} > {limit['nmse']:.3g}")
    if max_abs > limit.get("max_abs", math.inf):
        why.append(f"max|diff| {max_abs:.3g} > {limit['max_abs']:.3g}")
    if cos < limit.get("cos", -math.inf):
        why.append(f"cos {cos:.9f} < {limit['cos']}")
    return TensorDiff(name, a.shape, nmse, max_abs, cos, limit, not why, "; ".join(why))


def compare_dumps(ref: Dump, test: Dump, table=None):
    """(diffs in forward order, names only in ref, names only in test). Raises if the two
    dumps are of different token sequences: their tensors would not be comparable."""
    table = table or DEFAULT_TOLERANCES
    if not np.array_equal(ref.tokens, test.tokens):
        n = min(len(ref.tokens), len(test.tokens))
        first = next((i for i in range(n) if ref.tokens[i] != test.tokens[i]), n)
        raise RefinferError(f"the dumps are of different tokens ({len(ref.tokens)} vs {len(test.tokens)} tokens, "
                            f"first difference at position {first})",
                            hint="dump both with the same --tokens list (dump prints the ids it used)")
    names = sorted(set(ref.tensors) & set(test.tensors), key=forward_key)
    diffs = [diff_tensor(n, ref.tensors[n], test.tensors[n], limit_for(n, table)) for n in names]
    only_ref = sorted(set(ref.tensors) - set(test.tensors), key=forward_key)
    only_test = sorted(set(test.tensors) - set(ref.tensors), key=forward_key)
    return diffs, only_ref, only_test
