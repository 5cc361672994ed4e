"""python -m refinfer inspect FILE [--json] [--full]

Shows what a model file holds: the metadata (long arrays such as tokenizer vocabularies
summarized as "[49152 x str]" with their first items) and a table of tensors (name, type,
shape, bytes) with totals: parameter count, file size and bits per weight. Works on GGUF files
and on HF safetensors checkpoints (a .safetensors file, an index .json, or a directory). For a
GPTQ, AWQ or compressed-tensors checkpoint it also shows the method, bits, group size, format
version, act-order and the real bits per weight of the quantized layers.

A GGUF tensor of a ggml type that refinfer cannot compute (IQ2_XXS, ...) is listed with its
size from gguf-py's GGML_QUANT_SIZES and marked "unsupported"; the commands that compute with
the model refuse such a file, naming the tensor and its type.
"""

from __future__ import annotations

import json
import os
import sys

HELP = "show the metadata and tensor table of a GGUF file or safetensors checkpoint"

HEAD_ITEMS = 5  # array items shown before "..."
MAX_STR = 72  # characters of a string value shown before it is cut


def add_arguments(p):
    p.add_argument("file", help="GGUF file, .safetensors file, safetensors index .json, or checkpoint directory")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--full", action="store_true", help="show long arrays and strings in full")


def run(args) -> int:
    report = inspect_path(args.file, full=args.full)
    if args.json:
        json.dump(report, sys.stdout, indent=1, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_text(report, full=args.full))
    return 0


# --- collecting ------------------------------------------------------------------------------

def _detect(path: str) -> str:
    from ..errors import FormatError, RefinferError
    if os.path.isdir(path):
        return "safetensors"
    if not os.path.exists(path):
        raise RefinferError(f"no such file or directory: {path!r}",
                            hint="pass a .gguf file, a .safetensors file or a checkpoint directory")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise RefinferError(f"cannot read {path!r}: {e.strerror or e}", hint="check that the file is readable") from None
    if magic == b"GGUF":
        return "gguf"
    if path.endswith((".safetensors", ".json")):
        return "safetensors"
    raise FormatError(f"not a GGUF file (magic {magic!r}, expected b'GGUF') and not named *.safetensors",
                      file=path, offset=0, hint="pass a .gguf file, a .safetensors file or a checkpoint directory")


def _value_entry(value, vtype: str, elem_type: str | None, full: bool) -> dict:
    if isinstance(value, list):
        entry = {"type": "ARRAY", "element_type": elem_type, "length": len(value)}
        if full or len(value) <= HEAD_ITEMS:
            entry["value"] = value
        else:
            entry["head"] = value[:HEAD_ITEMS]
        return entry
    return {"type": vtype, "value": value}


def _totals(tensors: list, file_size: int) -> dict:
    n_params = sum(t["n_params"] for t in tensors)
    n_bytes = sum(t["nbytes"] for t in tensors)
    by_type: dict = {}
    for t in tensors:
        s = by_type.setdefault(t["type"], {"tensors": 0, "params": 0, "bytes": 0})
        s["tensors"] += 1
        s["params"] += t["n_params"]
        s["bytes"] += t["nbytes"]
    for s in by_type.values():
        s["bits_per_weight"] = 8 * s["bytes"] / s["params"] if s["params"] else None
    # As llama.cpp's loader reports BPW: tensor bytes over parameters, headers not counted.
    unsupported = sorted({t["type"] for t in tensors if not t.get("supported", True)})
    return {"n_tensors": len(tensors), "n_params": n_params, "tensor_bytes": n_bytes, "file_size": file_size,
            "bits_per_weight": 8 * n_bytes / n_params if n_params else None, "by_type": by_type,
            "unsupported_types": unsupported}


def _inspect_gguf(path: str, full: bool) -> dict:
    from ..gguf_file import GGUFFile
    f = GGUFFile(path, allow_unsupported=True)
    metadata = {k: _value_entry(v, f.metadata_types[k].name,
                                f.array_types[k].name if k in f.array_types else None, full)
                for k, v in f.metadata.items()}
    tensors = [{"name": t.name, "type": t.qtype.name, "shape": list(t.shape), "ne": list(t.ne),
                "offset": t.offset, "nbytes": t.nbytes, "n_params": t.n_elements, "supported": t.supported}
               for t in f.tensors.values()]
    return {"file": path, "format": "gguf", "version": f.version, "alignment": f.alignment,
            "data_offset": f.data_offset, "metadata": metadata, "tensors": tensors,
            "totals": _totals(tensors, f.file_size)}


def _inspect_safetensors(path: str, full: bool) -> dict:
    from ..safetensors_file import SafetensorsCheckpoint
    ck = SafetensorsCheckpoint(path)
    files = sorted({t.file for t in ck.tensors.values()})
    metadata = {k: _value_entry(v, type(v).__name__, None, full) for k, v in ck.metadata.items()}
    config = None
    if ck.config is not None:
        config = {k: (_value_entry(v, None, type(v[0]).__name__ if v else None, full) if isinstance(v, list)
                      else {"type": type(v).__name__, "value": v}) for k, v in ck.config.items()}
    tensors = []
    for t in ck.tensors.values():
        n = 1
        for d in t.shape:
            n *= d
        tensors.append({"name": t.name, "type": t.dtype, "shape": list(t.shape), "file": os.path.basename(t.file),
                        "offset": t.offset, "nbytes": t.nbytes, "n_params": n})
    file_size = sum(os.path.getsize(f) for f in files)
    report = {"file": path, "format": "safetensors", "files": [os.path.basename(f) for f in files],
              "metadata": metadata, "config": config, "tensors": tensors, "totals": _totals(tensors, file_size)}
    if ck.config is not None:
        report["quantization"] = _quantization(ck, path)
    return report


def _quantization(ck, path) -> dict | None:
    """Method, bits, group size, format version (as the data proves it, for symmetric 4/8-bit
    GPTQ), act-order and the real bits per weight of the quantized Linears: every stored byte
    of their codes, zeros, scales and g_idx over their weights."""
    from ..w4a16 import checkpoint as w4a16
    spec = w4a16.read_spec(ck.config, path)
    if spec is None:
        return None
    linears = w4a16.quantized_linears(ck, spec)
    n_weights = sum(n * k for n, k in linears.values())
    n_bytes = sum(ck.tensors[f"{p}.{s}"].nbytes for p in linears for s in w4a16.COMPONENTS[spec.method]
                  if f"{p}.{s}" in ck.tensors)
    notes = []
    if linears:  # the first Linear, fully read: proves the GPTQ version and reports what loading would
        first = sorted(linears)[0]
        w4a16.load_linear(ck, first, spec, warn=notes.append, shape=linears[first])
    s = spec.for_module(sorted(linears)[0]) if linears else spec
    return {"method": s.method, "format": spec.resolved_format, "config_format": spec.format, "bits": s.bits,
            "group_size": s.group_size, "act_order": s.desc_act, "sym": s.sym, "static_groups": s.static_groups,
            "source": spec.source, "quantized_linears": len(linears), "quantized_weights": n_weights,
            "quantized_bytes": n_bytes, "real_bits_per_weight": 8 * n_bytes / n_weights if n_weights else None,
            "notes": notes}


def inspect_path(path, full: bool = False) -> dict:
    path = os.fspath(path)
    if _detect(path) == "gguf":
        return _inspect_gguf(path, full)
    return _inspect_safetensors(path, full)


# --- text ------------------------------------------------------------------------------------

def _short(value, full: bool) -> str:
    if isinstance(value, str):
        s = json.dumps(value, ensure_ascii=False)  # quotes and escapes newlines
        if not full and len(s) > MAX_STR:
            return f"{s[:MAX_STR - 4]}...\" ({len(value)} chars)"
        return s
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        s = json.dumps(value, ensure_ascii=False)
        return s if full or len(s) <= MAX_STR else s[:MAX_STR - 3] + "..."
    return repr(value)


def _format_value(e: dict, full: bool) -> str:
    if e.get("type") == "ARRAY":
        items = e.get("value", e.get("head", []))
        shown = ", ".join(_short(v, full) for v in items)
        more = ", ..." if "head" in e else ""
        return f"[{e['length']} x {_type_word(e['element_type'])}] [{shown}{more}]"
    if e.get("type") == "FLOAT32":
        import numpy as np
        return str(np.float32(e["value"]))  # shortest text that reads back as the stored float32
    return _short(e["value"], full)


def _type_word(t) -> str:
    return {"STRING": "str", "FLOAT32": "f32", "FLOAT64": "f64", "BOOL": "bool"}.get(t, (t or "?").lower())


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _count(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def format_text(r: dict, full: bool = False) -> str:
    out = [f"file:     {r['file']}"]
    t = r["totals"]
    if r["format"] == "gguf":
        out.append(f"format:   GGUF v{r['version']}, alignment {r['alignment']}, tensor data from offset {r['data_offset']}")
    else:
        out.append(f"format:   safetensors, {len(r['files'])} file(s): {', '.join(r['files'])}")
    out.append(f"size:     {t['file_size']:,} bytes ({_size(t['file_size'])})")

    sections = [("metadata", r["metadata"])]
    if r.get("config") is not None:
        sections.append(("config.json", r["config"]))
    for title, entries in sections:
        out.append("")
        out.append(f"{title} ({len(entries)} keys):")
        if not entries:
            continue
        width = min(max(len(k) for k in entries), 48)
        for k, e in entries.items():
            tname = "" if e.get("type") == "ARRAY" else _type_word(e.get("type"))
            out.append(f"  {k:<{width}}  {tname:<6} {_format_value(e, full)}")

    q = r.get("quantization")
    if q:
        out.append("")
        out.append("quantization:")
        version = q["format"] if q["format"] == q["config_format"] else \
            f"{q['format']} (the stored zeros prove it; the config says {q['config_format']})"
        bpw = f"{q['real_bits_per_weight']:.3f}" if q["real_bits_per_weight"] is not None else "-"
        out += [f"  method         {q['method']}", f"  format         {version}", f"  bits           {q['bits']}",
                f"  group size     {q['group_size']}{' (one group per row)' if q['group_size'] == -1 else ''}",
                f"  act-order      {'yes' if q['act_order'] else 'no'}", f"  symmetric      {'yes' if q['sym'] else 'no'}",
                f"  static groups  {'yes' if q['static_groups'] else 'no'}",
                f"  real bits/weight {bpw} over {q['quantized_linears']} quantized Linears "
                f"({q['quantized_weights']:,} weights, {q['quantized_bytes']:,} bytes of codes, zeros, scales, g_idx)"]
        out += [f"  note: {n}" for n in q["notes"]]

    out.append("")
    out.append(f"tensors ({t['n_tensors']}):")
    rows = [(x["name"], x["type"], " x ".join(str(d) for d in x["shape"]), f"{x['nbytes']:,}") for x in r["tensors"]]
    notes = ["" if x.get("supported", True) else "  unsupported" for x in r["tensors"]]
    header = ("name", "type", "shape", "bytes")
    if rows:
        w = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        fmt = "  {:<%d}  {:<%d}  {:<%d}  {:>%d}" % tuple(w)
        out.append(fmt.format(*header))
        out.extend(fmt.format(*row) + note for row, note in zip(rows, notes))

    out.append("")
    out.append("totals:")
    tw = max([6, *(len(name) for name in t["by_type"])])
    for name, s in sorted(t["by_type"].items(), key=lambda kv: -kv[1]["bytes"]):
        bpw = f"{s['bits_per_weight']:.2f}" if s["bits_per_weight"] is not None else "-"
        out.append(f"  {name:<{tw}} {s['tensors']:>5} tensors  {s['params']:>15,} params  {s['bytes']:>15,} bytes  {bpw:>6} bits/weight")
    bpw = f"{t['bits_per_weight']:.2f}" if t["bits_per_weight"] is not None else "-"
    out.append(f"  {'all':<{tw}} {t['n_tensors']:>5} tensors  {t['n_params']:>15,} params  {t['tensor_bytes']:>15,} bytes  {bpw:>6} bits/weight")
    out.append(f"  {_count(t['n_params'])} parameters, {_size(t['tensor_bytes'])} of tensor data in a "
               f"{_size(t['file_size'])} file")
    if t.get("unsupported_types"):
        n = sum(1 for x in r["tensors"] if not x.get("supported", True))
        out.append(f"  unsupported: {n} tensors of type {', '.join(t['unsupported_types'])}, which refinfer "
                   "cannot compute; generate, dump, perplexity and kld refuse this file")
    return "\n".join(out) + "\n"
