"""llama.cpp's noise floor, per tensor: how much its own legitimate settings disagree with its
default, on one model and prompt. `compare` reads it as the size and shape of rounding.

The variants (llama_oracle.VARIANTS, the same as `kld --floor`) against llama.cpp's default
(one batch, F16 KV cache, no flash attention), at a fixed thread count because llama.cpp's CPU
flash attention splits the KV by threads:

    single_token   one token per llama_decode call: kq-N has only the causal half (a step
                   sees the keys so far), so it is compared on that half
    flash_attn     flash attention: llama.cpp writes no kq-N
    kv_f32         an F32 KV cache

Only llama.cpp's variants enter: refinfer ideal against ggml mode would be refinfer against
llama.cpp, and a bug in ideal mode would then widen its own tolerance.

Per tensor name the table holds the largest over the variants of NMSE, max|diff| / RMS and
1 - cosine, and the RMS over positions of the per-position scale and offset fits
(verdict.row_sigmas): the spread of the systematic-looking part of rounding.

The variants agree bit for bit before the first attention (inp_embd, attn_norm-0, Qcur-0 ...),
yet another correct engine differs there (refinfer ideal has no q8 activation quantization:
NMSE ~1e-5 at Qcur-0 on SmolLM2, 131x the floor of kqv_out-0 on tiny-llama-q5_0). effective()
therefore gives each tensor at least KIND_FRACTION of the median floor of its kind over the
layers, and never less than MIN_NMSE.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib

import numpy as np

from .errors import FormatError, RefinferError
from .llama_oracle import version as llama_cpp_version

FORMAT = "refinfer-floor"
FORMAT_VERSION = 1
KIND_FRACTION = 1.0      # a tensor's floor is at least this fraction of its kind's median floor
MIN_NMSE = 1e-10         # ... and at least this (the tight tolerance of two refinfer backends)
FLOOR_VARIANTS = ("single_token", "flash_attn", "kv_f32")
SHIPPED_DIR = pathlib.Path(__file__).resolve().parent.parent / "formats" / "fixtures"


def kind(name: str) -> str:
    """attn_norm-3 -> attn_norm; result_output -> result_output."""
    head, _, tail = name.rpartition("-")
    return head if head and tail.isdigit() else name


# ---- capturing llama.cpp's variants -----------------------------------------------------------

def _named(raw: dict, T: int) -> dict:
    from .dump import is_known
    out = {}
    for name, a in raw.items():
        name = "inp_embd" if name == "embd" else name
        if is_known(name):
            out[name] = np.ascontiguousarray(a[..., :T] if name.startswith("kq-") else a, dtype=np.float32)
    return out


def capture_single_token(model_path, tokens, n_threads=1) -> dict:
    """llama.cpp's tensors with one token per llama_decode call, stacked over the steps into the
    shapes of a batch dump; kq-N [heads, T, T] holds NaN above the diagonal (keys a step has not
    seen)."""
    from .llama_oracle import LlamaCpp
    T = len(tokens)
    steps = []
    with LlamaCpp(model_path, variant="single_token", n_ctx=max(64, T), n_threads=n_threads, capture=True) as llm:
        lib = llm._lib
        lib.llama_memory_clear(lib.llama_get_memory(llm._ctx), True)
        batch = lib.llama_batch_init(1, 0, 1)
        try:
            for i, tok in enumerate(tokens):
                llm.captured.clear()
                batch.n_tokens = 1
                batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.logits[0] = int(tok), i, 1, True
                batch.seq_id[0][0] = 0
                rc = lib.llama_decode(llm._ctx, batch)
                if rc != 0:
                    raise RefinferError(f"llama_decode failed with code {rc} at position {i}",
                                        hint="llama.cpp's log gives the reason")
                steps.append(_named(llm.captured, i + 1))
        finally:
            lib.llama_batch_free(batch)
    out = {}
    for name in steps[0]:
        rows = []
        for i, step in enumerate(steps):
            a = step[name]
            if name.startswith("kq-"):
                row = np.full((a.shape[0], 1, T), np.nan, np.float32)
                row[:, 0, : i + 1] = a.reshape(a.shape[0], -1)[:, : i + 1]
                rows.append(row)
            else:
                rows.append(a.reshape(1, -1))
        out[name] = np.concatenate(rows, axis=1 if name.startswith("kq-") else 0)
    return out


def capture_variants(model_path, tokens, n_threads=1) -> dict:
    """{variant: {name: array}} for llama.cpp's default and FLOOR_VARIANTS on these tokens."""
    from .dump import capture_llama_cpp
    from .llama_oracle import llama_intermediates
    T = len(tokens)
    caps = {"default": capture_llama_cpp(model_path, tokens, n_threads=n_threads)}
    caps["single_token"] = capture_single_token(model_path, tokens, n_threads=n_threads)
    for variant, kw in (("flash_attn", {"flash_attn": True}), ("kv_f32", {"kv_f32": True})):
        _, raw = llama_intermediates(model_path, tokens, n_threads=n_threads, **kw)
        caps[variant] = _named(raw, T)
    base = caps["default"]
    for variant in FLOOR_VARIANTS:   # the stacked single-token tensors take the batch shapes
        caps[variant] = {n: a.reshape(base[n].shape) for n, a in caps[variant].items() if n in base}
    return caps


# ---- the table --------------------------------------------------------------------------------

def _metrics(a: np.ndarray, b: np.ndarray) -> dict:
    ok = np.isfinite(a) & np.isfinite(b)
    a64, b64 = a[ok].astype(np.float64), b[ok].astype(np.float64)
    den = float(np.sum(a64 * a64))
    d = b64 - a64
    err = float(np.sum(d * d))
    rms = math.sqrt(den / max(1, a64.size))
    nb = math.sqrt(float(np.sum(b64 * b64)))
    cos = float(np.sum(a64 * b64)) / (math.sqrt(den) * nb) if den and nb else 1.0
    return {"nmse": err / den if den else 0.0,
            "max_rel": float(np.max(np.abs(d))) / rms if (d.size and rms) else 0.0,
            "one_minus_cos": max(0.0, 1.0 - cos)}


def floor_table(caps: dict, header: dict) -> dict:
    """The floor table of captured variants (capture_variants)."""
    from .dump import forward_key
    from .verdict import row_sigmas
    base = caps["default"]
    tensors = {}
    for name in sorted(base, key=forward_key):
        entry = {"nmse": 0.0, "max_rel": 0.0, "one_minus_cos": 0.0, "sigma_scale": 0.0, "sigma_offset": 0.0,
                 "row_nmse": 0.0, "by_variant": {}}
        for variant in FLOOR_VARIANTS:
            if name not in caps[variant]:
                continue   # flash attention writes no kq-N
            m = _metrics(base[name], caps[variant][name])
            ss, so, rn = row_sigmas(name, base[name], caps[variant][name])
            entry["by_variant"][variant] = m["nmse"]
            for key, v in (*m.items(), ("sigma_scale", ss), ("sigma_offset", so), ("row_nmse", rn)):
                entry[key] = max(entry[key], v)
        tensors[name] = entry
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **header, "variants": list(FLOOR_VARIANTS),
            "tensors": tensors}


def measure(model_path, tokens, n_threads=1) -> dict:
    """The floor table of llama.cpp on model_path and these tokens."""
    from .dump import sha256_file
    path = pathlib.Path(model_path)
    header = {"model_file": path.name, "model_sha256": sha256_file(path), "n_tokens": len(tokens),
              "tokens": [int(t) for t in tokens], "llama_cpp": llama_cpp_version(), "n_threads": int(n_threads)}
    return floor_table(capture_variants(path, list(tokens), n_threads=n_threads), header)


def write(path, table: dict):
    from .output_files import publish, temp_beside
    fd, tmp = temp_beside(os.fspath(path))
    with os.fdopen(fd, "w") as f:
        json.dump(table, f, indent=1)
    publish(tmp, os.fspath(path))


def read(path) -> dict:
    hint = "write it with `python -m refinfer floor -m MODEL -p PROMPT -o FLOOR.json`"
    try:
        table = json.loads(pathlib.Path(path).read_text())
    except OSError as e:
        raise RefinferError(f"cannot read floor table {path}: {e.strerror}", hint=hint) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"floor table is not JSON: {e}", file=str(path), hint=hint) from None
    if not isinstance(table, dict) or table.get("format") != FORMAT:
        raise FormatError(f"not a floor table (format {table.get('format') if isinstance(table, dict) else None!r}, "
                          f"expected {FORMAT!r})", file=str(path), hint=hint)
    if table.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"floor table format_version {table.get('format_version')!r} is not {FORMAT_VERSION}",
                          file=str(path), hint=hint)
    tensors = table.get("tensors")
    if not isinstance(tensors, dict):
        raise FormatError("floor table has no `tensors` object", file=str(path), hint=hint)
    for name, e in tensors.items():
        if not isinstance(e, dict) or not all(isinstance(e.get(k), (int, float)) and not isinstance(e.get(k), bool)
                                              and e.get(k) >= 0 for k in ("nmse", "sigma_scale", "sigma_offset")):
            raise FormatError("entry needs non-negative numbers nmse, sigma_scale and sigma_offset",
                              file=str(path), tensor=name, hint=hint)
    table["source"] = str(path)
    return table


# ---- using a table --------------------------------------------------------------------------

def effective(table: dict) -> dict:
    """{name: entry with `floor_nmse`}: each tensor's NMSE floor raised to KIND_FRACTION of its
    kind's median over layers and to MIN_NMSE (see the module docstring)."""
    by_kind = {}
    for name, e in table["tensors"].items():
        by_kind.setdefault(kind(name), []).append((e["nmse"], e.get("row_nmse", e["nmse"])))
    med = {k: np.median(np.array(v), axis=0) for k, v in by_kind.items()}
    out = {}
    for name, e in table["tensors"].items():
        m_nmse, m_row = med[kind(name)]
        out[name] = dict(e, floor_nmse=max(e["nmse"], KIND_FRACTION * m_nmse, MIN_NMSE),
                         floor_row_nmse=max(e.get("row_nmse", e["nmse"]), KIND_FRACTION * m_row, MIN_NMSE))
    return out


def by_kind(eff: dict) -> dict:
    """{kind: the largest effective entry of that kind}: a floor of another model (or the
    shipped tables merged) used by tensor kind, since its layer count and names may differ."""
    out = {}
    for name, e in eff.items():
        m = out.setdefault(kind(name), {k: 0.0 for k in ENTRY_KEYS})
        for k in ENTRY_KEYS:
            m[k] = max(m[k], e[k])
    return out


ENTRY_KEYS = ("floor_nmse", "floor_row_nmse", "sigma_scale", "sigma_offset")


def cache_path(model_sha256: str, tokens, n_threads: int) -> pathlib.Path:
    from .fetch import cache_dir
    key = hashlib.sha256(json.dumps([llama_cpp_version(), list(FLOOR_VARIANTS), n_threads]).encode()).hexdigest()[:12]
    return cache_dir() / "floors" / f"{model_sha256[:20]}-T{len(tokens)}-{key}.json"


def for_model(model_path, tokens, n_threads=1, quiet=False) -> dict:
    """The floor table of model_path at len(tokens), from the cache or measured (and cached).
    The key is the model's SHA-256, the prompt length, llama.cpp's version, the variants and
    the thread count: a floor is a property of the model and the length more than of the words."""
    import sys
    from .dump import sha256_file
    if not pathlib.Path(model_path).is_file():
        raise RefinferError(f"{model_path}: no such model file",
                            hint="give the GGUF file the dumps were made from (its floor is measured with llama.cpp)")
    if not str(model_path).endswith(".gguf"):
        raise RefinferError(f"{model_path}: llama.cpp reads GGUF files only",
                            hint="give the GGUF the checkpoint came from, or --floor FILE")
    sha = sha256_file(model_path)
    path = cache_path(sha, tokens, n_threads)
    if path.is_file():
        try:
            return read(path)
        except RefinferError:
            pass   # a damaged cache entry is measured again
    if not quiet:
        print(f"measuring llama.cpp's noise floor on {pathlib.Path(model_path).name} at {len(tokens)} tokens "
              f"(4 runs; cached in {path.parent})", file=sys.stderr)
    table = measure(model_path, tokens, n_threads=n_threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, table)
    table["source"] = str(path)
    return table


def shipped(model_sha256: str | None):
    """(table, exact): the shipped floor table of the model with this SHA-256 (formats/fixtures/
    floor-*.json) and True; else (the shipped tables' effective floors merged by tensor kind,
    False); (None, False) when none is shipped."""
    tables = [read(p) for p in sorted(SHIPPED_DIR.glob("floor-*.json"))]
    for t in tables:
        if model_sha256 and t.get("model_sha256") == model_sha256:
            return t, True
    if not tables:
        return None, False
    merged = {}
    for t in tables:
        for k, e in by_kind(effective(t)).items():
            m = merged.setdefault(k, dict(e))
            for key in ENTRY_KEYS:
                m[key] = max(m[key], e[key])
    names = ", ".join(t["model_file"] for t in tables)
    return {"kinds": merged, "source": f"the shipped floor tables ({names}), by tensor kind"}, False
