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
import os
import pathlib
import re
import struct
from dataclasses import dataclass, field

import numpy as np

from .errors import FormatError, RefinferError
from .output_files import publish, temp_beside

FORMAT = "refinfer-dump"
FORMAT_VERSION = 1
# cache_k / cache_v: what the KV cache stores for the pass (refinfer's dumps), after Vcur: the
# dequantized values attention reads, and for a quantized type its stored fields (codes, scale,
# min or zero), so that the first cache store where two engines part can be found
CACHE_OPS = tuple(f"cache_{kv}{f}" for kv in "kv" for f in ("", "_codes", "_scale", "_min", "_zero"))
LAYER_OPS = ("attn_norm", "Qcur", "Kcur", "Vcur", "kq", "kqv_out", "attn_out", "ffn_inp", "ffn_norm",
             "ffn_swiglu", "ffn_out", "l_out")                    # llama.cpp's names
_ORDER = LAYER_OPS[:4] + CACHE_OPS + LAYER_OPS[4:]
_LAYER_NAME = re.compile(r"^([A-Za-z_]+)-(\d+)$")
MAX_HEADER = 100 * 1024 * 1024


def forward_key(name: str) -> tuple:
    """Sort key putting tensor names in the order the forward pass computes them; names this
    format does not define come last, alphabetically."""
    if name == "inp_embd":
        return (0, 0, 0, name)
    m = _LAYER_NAME.match(name)
    if m and m.group(1) in _ORDER:
        return (1, int(m.group(2)), _ORDER.index(m.group(1)), name)
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


def capture_refinfer(model, tokens, progress=False, skip=(), cache=False) -> dict:
    """{name: float32 array} of one teacher-forced forward pass of a refinfer Model, leaving out
    names that match a glob in skip (kq-N is T x T per head: skip it for long prompts). cache:
    also what the KV cache stored (cache_tensors; what `dump` writes), after the activations,
    which are llama.cpp's names alone otherwise."""
    from tqdm import tqdm
    cfg = model.config
    T = len(tokens)
    out = {}
    bar = tqdm(total=cfg.n_layers, desc="dump", unit="layer", disable=None if progress else True, leave=False)

    def wanted(name):
        return not any(fnmatch.fnmatchcase(name, pat) for pat in skip)

    q = {}

    def tap(name, value):
        m = _LAYER_NAME.match(name)
        if m and m.group(1) == "l_out":
            bar.update(1)
        if m and m.group(1) == "Qcur":
            q[m.group(2)] = np.array(value, dtype=np.float32)
        if m and m.group(1) == "Kcur" and wanted(f"kq-{m.group(2)}"):
            out[f"kq-{m.group(2)}"] = _kq(q.pop(m.group(2)), value, model.mode == "ggml")
        if wanted(name):
            a = np.array(value, dtype=np.float32)  # a copy: forward() reuses its buffers
            out[name] = a.reshape(T, -1) if name.startswith("kqv_out-") else a

    # one forward step over the whole prompt, as capture_llama_cpp decodes it in one call: in
    # ggml mode a longer prompt would otherwise arrive in n_ubatch micro-batches
    from .forward import KVCache, forward
    kv = KVCache(cfg, T, be=model.backend)
    try:
        forward(cfg, model.weights, model.backend, list(tokens), kv, all_logits=True, tap=tap)
    finally:
        bar.close()
    if cache:
        out.update((k, v) for k, v in cache_tensors(kv.kv, T).items() if wanted(k))
    return out


def cache_tensors(kv, n_positions, seq=0) -> dict:
    """{cache_k-N, cache_v-N: float32[T, kv, hd] as attention reads them (the type's load), and for a
    quantized type cache_k_codes-N (I32 [T, kv, hd]), cache_k_scale-N, cache_k_min-N or
    cache_k_zero-N (F32 [T, kv, groups]); the same for V} of sequence seq's stored K/V. With
    llama.cpp's rotation (kv_cache.attn_rotation) these are the rotated rows the cache holds."""
    pool, out = kv.pool, {}
    ids = kv.block_table(seq)[: kv.blocks_needed(n_positions)]
    for layer in range(pool.n_layers):
        for name, arr, ctype in (("k", pool.k, pool.k_type), ("v", pool.v, pool.v_type)):
            raw = np.asarray(arr[layer][ids]).reshape(-1, *arr.shape[-2:])[:n_positions]
            t = ctype.for_layer(layer)
            out[f"cache_{name}-{layer}"] = np.ascontiguousarray(t.load(raw), dtype=np.float32)
            for part, a in ((t.parts(raw) if t.parts else None) or {}).items():
                out[f"cache_{name}_{part}-{layer}"] = np.ascontiguousarray(a, np.int32 if part == "codes" else np.float32)
    return out


def capture_llama_cpp(model_path, tokens, skip=(), n_threads=1) -> dict:
    """The same tensors from llama.cpp's own graph (eval callback), renamed and cut to the
    shapes above: llama.cpp calls the embeddings `embd` and computes kq-N against its whole
    padded KV cache, of which the first T columns are the prompt's."""
    from .llama_oracle import llama_intermediates
    T = len(tokens)
    _, raw = llama_intermediates(model_path, tokens, n_threads=n_threads)
    out = {}
    for name, a in raw.items():
        name = "inp_embd" if name == "embd" else name
        if not is_known(name) or any(fnmatch.fnmatchcase(name, pat) for pat in skip):
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


_DTYPES = {"F32": "<f4", "I32": "<i4"}


class SafetensorsWriter:
    """A safetensors file written front to back: the header with every tensor's dtype and
    shape first, then each tensor's data, in header order, in as many pieces as the caller
    likes (so a tensor larger than memory can be written from parts). The file is written
    under a temporary name beside path and renamed by close() once every byte is in: an
    interrupted run leaves no half file."""

    def __init__(self, path, specs: dict, meta: dict):  # specs: name -> ("F32" | "I32", shape)
        head, offset, self._todo = {"__metadata__": {k: str(v) for k, v in meta.items()}}, 0, []
        for name, (dtype, shape) in specs.items():
            nbytes = math.prod(shape) * 4
            head[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + nbytes]}
            self._todo.append([name, _DTYPES[dtype], nbytes])
            offset += nbytes
        raw = json.dumps(head).encode()
        raw += b" " * (-len(raw) % 8)
        self.path = os.fspath(path)
        fd, self._tmp = temp_beside(self.path)
        self._f = os.fdopen(fd, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)

    def write(self, name: str, piece):
        """Append piece (any shape) to tensor name, which must be the next one not yet full."""
        while self._todo and self._todo[0][2] == 0:
            self._todo.pop(0)
        if not self._todo or self._todo[0][0] != name:
            raise ValueError(f"{self.path}: {name!r} written out of order (next: {self._todo[0][0] if self._todo else None})")
        a = np.ascontiguousarray(piece, dtype=self._todo[0][1])
        if a.nbytes > self._todo[0][2]:
            raise ValueError(f"{self.path}: {name!r} gets {a.nbytes} bytes more than its shape holds")
        self._f.write(a.data)
        self._todo[0][2] -= a.nbytes

    def close(self):
        missing = [(name, n) for name, _, n in self._todo if n]
        if missing:
            raise ValueError(f"{self.path}: tensors not written in full: {missing}")
        self._f.close()
        publish(self._tmp, self.path)
        self._tmp = None

    def abort(self):
        """Remove the partial file (after close(): nothing to do)."""
        if self._tmp is not None:
            self._f.close()
            os.unlink(self._tmp)
            self._tmp = None


def write_safetensors(path, arrays: dict, meta: dict):
    """arrays (F32 or I32, written in the given order) and string metadata in a safetensors file."""
    arrays = {k: np.asarray(a) for k, a in arrays.items()}
    out = SafetensorsWriter(path, {k: ("I32" if a.dtype.kind in "iu" else "F32", a.shape) for k, a in arrays.items()},
                            meta)
    try:
        for name, a in arrays.items():
            out.write(name, a)
        out.close()
    finally:
        out.abort()


def read_safetensors(path, expect_format: str):
    """(metadata, {name: read-only array}) of a file whose __metadata__.format is expect_format;
    every size and offset is checked before the data is mapped."""
    path = str(path)
    damaged = "the file is damaged or was not written by refinfer: write it again; the layout is in formats/dump-format.md"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            first = f.read(8)
            n = struct.unpack("<Q", first)[0] if len(first) == 8 else None
            if n is None:
                raise FormatError(f"file of {size} bytes is too short for a safetensors header", file=path, offset=0, hint=damaged)
            if n > min(MAX_HEADER, size - 8):
                raise FormatError(f"header length {n} exceeds the file size {size}", file=path, offset=0, hint=damaged)
            raw = f.read(n)
    except OSError as e:
        raise RefinferError(f"cannot read {path}: {e.strerror}", hint="check the path") from None
    try:
        head = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"header is not JSON: {e}", file=path, offset=8, hint=damaged) from None
    if not isinstance(head, dict):
        raise FormatError("header is not a JSON object", file=path, offset=8, hint=damaged)
    meta = head.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or meta.get("format") != expect_format:
        raise FormatError(f"__metadata__.format is {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                          f"expected {expect_format!r}", file=path,
                          hint="see formats/dump-format.md for the layout refinfer writes")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise FormatError(f"format_version {meta.get('format_version')!r} is not supported (expected {FORMAT_VERSION})",
                          file=path, hint="written by another refinfer version: write it again with this one")
    start, data_size = 8 + n, size - 8 - n
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(data_size,)) if data_size else np.zeros(0, np.uint8)
    arrays = {}
    for name, e in head.items():
        dtype = _DTYPES.get(e.get("dtype") if isinstance(e, dict) else None)
        if dtype is None:
            raise FormatError(f"dtype {e.get('dtype') if isinstance(e, dict) else e!r} not allowed (F32 or I32)",
                              file=path, tensor=name, hint=damaged)
        shape, offs = e.get("shape"), e.get("data_offsets")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)):
            raise FormatError(f"bad shape {shape!r} or data_offsets {offs!r}", file=path, tensor=name, hint=damaged)
        a, b = offs
        want = math.prod(shape) * 4
        if not 0 <= a <= b <= data_size or b - a != want:
            raise FormatError(f"data_offsets [{a}, {b}] do not hold {want} bytes inside {data_size} data bytes",
                              file=path, tensor=name, offset=start + a, hint=damaged)
        arrays[name] = data[a:b].view(dtype).reshape(shape)
    return meta, arrays


def write_dump(path, tensors: dict, tokens, header: dict):
    """F32 tensors in forward order, the token ids as I32 `tokens`, the header in __metadata__."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **header}
    arrays = {"tokens": np.asarray(tokens, dtype="<i4")}
    arrays.update((name, tensors[name]) for name in sorted(tensors, key=forward_key))
    write_safetensors(path, arrays, meta)


def _is_codes(name):
    m = _LAYER_NAME.match(name)
    return bool(m) and m.group(1) in ("cache_k_codes", "cache_v_codes")


def read_dump(path) -> Dump:
    meta, arrays = read_safetensors(path, FORMAT)
    if "tokens" not in arrays or arrays["tokens"].dtype.kind != "i" or arrays["tokens"].ndim != 1:
        raise FormatError("no 1-D I32 `tokens` tensor", file=str(path), hint="write the dump again with `dump`")
    tokens = np.array(arrays.pop("tokens"))
    bad = next((k for k, a in arrays.items() if a.dtype.kind != "f" and not _is_codes(k)), None)
    if bad is not None:
        raise FormatError("activations must be F32 (I32 only for tokens and cache_*_codes-N)", file=str(path),
                          tensor=bad, hint="see formats/dump-format.md")
    tensors = {k: arrays[k] for k in sorted(arrays, key=forward_key)}
    return Dump(meta, tokens, tensors, str(path))


# ---- comparing --------------------------------------------------------------------------------

# Default limit: what separates rounding from a bug when the two sides run the same weights.
# On SmolLM2-135M Q4_1 (30 layers) refinfer's ideal mode differs from llama.cpp and from its own
# ggml mode by NMSE up to ~8e-3 on some tensors (largest at kqv_out: llama.cpp's F16 KV cache and
# q8 activation quantization); ggml mode is bit-identical to llama.cpp except kq (~1e-14, lane
# order). A real bug (RoPE pairs mixed up, a norm weight missing) gives 1e-1 and more.
DEFAULT_TOLERANCES = {"default": {"nmse": 2e-2}}


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


TABLE_KEYS = ("default", "tensors")
RULE_KEYS = ("nmse", "max_abs", "cos")


def load_tolerances(path=None) -> dict:
    """A JSON tolerance table {"default": RULE, "tensors": {"glob": RULE, ...}}, RULE mapping
    some of nmse / max_abs / cos to numbers. Unknown keys are refused: a misspelt limit would
    otherwise be no limit at all."""
    if path is None:
        return DEFAULT_TOLERANCES
    shape_hint = ('e.g. {"default": {"nmse": 1e-2}, "tensors": {"kq-*": {"nmse": 1e-3, "max_abs": 0.5, "cos": 0.999}}}')
    try:
        table = json.loads(pathlib.Path(path).read_text())
    except OSError as e:
        raise RefinferError(f"--tolerance-table: cannot read {path}: {e.strerror}", hint=shape_hint) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"tolerance table is not JSON: {e}", file=str(path), hint=shape_hint) from None
    if not isinstance(table, dict) or not isinstance(table.get("tensors", {}), dict):
        raise FormatError('expected {"default": {...}, "tensors": {"glob": {...}}}', file=str(path), hint=shape_hint)
    unknown = sorted(set(table) - set(TABLE_KEYS))
    if unknown:
        raise FormatError(f"unknown key(s) {', '.join(map(repr, unknown))} at the top level", file=str(path),
                          hint=f"valid top-level keys: {', '.join(TABLE_KEYS)}; {shape_hint}")
    for key, rule in [("default", table.get("default", {}))] + list(table.get("tensors", {}).items()):
        where = "default" if key == "default" else f"tensors[{key!r}]"
        if not isinstance(rule, dict):
            raise FormatError(f"{where} must be an object of limits, got {rule!r}", file=str(path), hint=shape_hint)
        unknown = sorted(set(rule) - set(RULE_KEYS))
        if unknown:
            raise FormatError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}", file=str(path),
                              hint=f"valid keys of a rule: {', '.join(RULE_KEYS)}")
        bad = {k: v for k, v in rule.items() if isinstance(v, bool) or not isinstance(v, (int, float))}
        if bad:
            raise FormatError(f"{where}: {', '.join(f'{k} = {v!r}' for k, v in bad.items())} is not a number",
                              file=str(path), hint='limits are numbers, e.g. "nmse": 1e-3')
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
    if not np.array_equal(fa, fb) or not np.array_equal(a64[~fa], b64[~fb], equal_nan=True):
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


def check_same_run(ref: Dump, test: Dump):
    """Two dumps are comparable when they are of the same token sequence and, where both
    headers name it, the same model file (model_sha256): anything else is bad input, not a
    divergence."""
    if not np.array_equal(ref.tokens, test.tokens):
        n = min(len(ref.tokens), len(test.tokens))
        first = next((i for i in range(n) if ref.tokens[i] != test.tokens[i]), n)
        raise RefinferError(f"{ref.path} and {test.path} are dumps of different tokens ({len(ref.tokens)} vs "
                            f"{len(test.tokens)} tokens, first difference at position {first})",
                            hint="dump both with the same --tokens list (dump prints the ids it used)")
    a, b = ref.header.get("model_sha256"), test.header.get("model_sha256")
    if a and b and a != b:
        raise RefinferError(f"{ref.path} and {test.path} are dumps of different models: "
                            f"{ref.header.get('model_file', '?')} (sha256 {a[:16]}...) vs "
                            f"{test.header.get('model_file', '?')} (sha256 {b[:16]}...)",
                            hint="dump both from the same model file; kld measures how far two models are apart")


def summarise_names(names, most=8) -> str:
    """'kq-* (30 tensors), ffn_swiglu-1, result_output': per-layer names grouped by op, in
    forward order; at most `most` groups, then how many more."""
    groups = {}
    for name in names:
        m = _LAYER_NAME.match(name)
        groups.setdefault(f"{m.group(1)}-*" if m else name, []).append(name)
    parts = [members[0] if len(members) == 1 else f"{key} ({len(members)} tensors)" for key, members in groups.items()]
    more = f", and {len(parts) - most} more groups" if len(parts) > most else ""
    return ", ".join(parts[:most]) + more


def compare_dumps(ref: Dump, test: Dump, table=None):
    """(diffs in forward order, names only in ref, names only in test). Raises if the two
    dumps are not of the same run (check_same_run): their tensors would not be comparable."""
    table = table or DEFAULT_TOLERANCES
    check_same_run(ref, test)
    names = sorted(set(ref.tensors) & set(test.tensors), key=forward_key)
    diffs = [diff_tensor(n, ref.tensors[n], test.tensors[n], limit_for(n, table)) for n in names]
    only_ref = sorted(set(ref.tensors) - set(test.tensors), key=forward_key)
    only_test = sorted(set(test.tensors) - set(ref.tensors), key=forward_key)
    # the stored K/V are refinfer's addition: against a dump without any (llama.cpp's) they are
    # not news, so they are not listed as missing from it
    if not any(_is_cache(n) for n in test.tensors):
        only_ref = [n for n in only_ref if not _is_cache(n)]
    if not any(_is_cache(n) for n in ref.tensors):
        only_test = [n for n in only_test if not _is_cache(n)]
    return diffs, only_ref, only_test


def _is_cache(name):
    m = _LAYER_NAME.match(name)
    return bool(m) and m.group(1) in CACHE_OPS
