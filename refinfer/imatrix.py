"""Importance matrices, as llama-imatrix computes them and llama-quantize reads them
(tools/imatrix/imatrix.cpp, common/imatrix-loader.cpp, tools/quantize/quantize.cpp).

What is collected (IMatrixCollector::collect_imatrix): for every matrix multiplication whose
weight is a `blk.*` tensor (and output.weight with process_output), with at least 16 token rows
in the step and an F32 input, the sum over those rows of the squared input, per column,
accumulated in float32 in token order:

    in_sum2[name][j] += x[t, j] * x[t, j]        counts[name] += rows

For a Llama block the inputs are attn_norm-N (attn_q, attn_k, attn_v), kqv_out-N
(attn_output), ffn_norm-N (ffn_gate, ffn_up) and ffn_swiglu-N (ffn_down). The text is
tokenized with BOS; chunks of n_ctx tokens, each evaluated from an empty cache with its first
token replaced by BOS (compute_imatrix); at least 2 n_ctx tokens are needed and the
remainder of the last chunk is dropped.

The file (save_imatrix, the GGUF format): general.type = "imatrix", imatrix.datasets (string
array: the text files), imatrix.chunk_count and imatrix.chunk_size (u32); per entry, in name
order, "<name>.in_sum2" F32 [nmat, ne0] (ggml ne [ne0, nmat]) and "<name>.counts" F32 [nmat, 1].
llama-quantize gives the quantizers in_sum2 / count (1.0 where the count is 0). The legacy
.dat format (n_entries, then per entry name, ncall, nval, values = mean * ncall; then the chunk
count and the dataset name) is read too.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import numpy as np

from .errors import FormatError, RefinferError

MIN_ROWS = 16  # collect_imatrix skips matmuls of fewer token rows


@dataclass
class Imatrix:
    sums: dict = field(default_factory=dict)    # name -> float32[nmat, ne0], sums of x^2
    counts: dict = field(default_factory=dict)  # name -> int64[nmat], rows summed
    datasets: list = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    def importance(self) -> dict:
        """name -> float32[nmat * ne0]: what tools/quantize/load_imatrix hands llama_model_quantize
        (sums / count per matrix, in float32; 1.0 for a matrix never seen)."""
        out = {}
        for name, s in self.sums.items():
            c = self.counts[name]
            if self.legacy:  # the values are mean * ncall
                e = s / np.float32(c[0]) if c[0] > 0 else s
            else:
                cf = c.astype(np.float32)[:, None]
                with np.errstate(divide="ignore", invalid="ignore"):
                    e = np.where(cf > 0, s / np.where(cf > 0, cf, np.float32(1)), np.float32(1))
            out[name] = np.ascontiguousarray(e, dtype=np.float32).reshape(-1)
        return out


def add_rows(im: Imatrix, name: str, x: np.ndarray):
    """Accumulate one matmul input x float32[rows, ne0] for weight `name`, as collect_imatrix
    (sequential over rows in float32; skipped below MIN_ROWS rows)."""
    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    if len(x) < MIN_ROWS:
        return
    acc = im.sums.get(name)
    if acc is None:
        acc = im.sums[name] = np.zeros((1, x.shape[1]), dtype=np.float32)
        im.counts[name] = np.zeros(1, dtype=np.int64)
    a = acc[0]
    for row in x:
        a += row * row
    im.counts[name][0] += len(x)


# the matmuls of a Llama block and the tapped tensor that is their input
_INPUTS = {"attn_norm": ("attn_q", "attn_k", "attn_v"), "kqv_out": ("attn_output",),
           "ffn_norm": ("ffn_gate", "ffn_up"), "ffn_swiglu": ("ffn_down",)}


def collect_from_taps(im: Imatrix, taps, *, process_output=False):
    """A tap(name, array) for forward(): feeds add_rows with each matmul's input."""
    def tap(name, value):
        kind, _, layer = name.rpartition("-")
        if kind in _INPUTS and layer.isdigit():
            rows = np.asarray(value, dtype=np.float32).reshape(len(value), -1)
            for w in _INPUTS[kind]:
                add_rows(im, f"blk.{layer}.{w}.weight", rows)
        elif process_output and name == "result_norm":
            add_rows(im, "output.weight", value)
        if taps is not None:
            taps(name, value)
    return tap


def compute_imatrix(model, text: str, n_ctx: int = 512, *, n_chunks: int = -1, dataset: str = "",
                    process_output: bool = False, progress=None) -> Imatrix:
    """llama-imatrix -m MODEL -f TEXT -c n_ctx on a refinfer Model (ggml mode reproduces llama.cpp's
    activations bit for bit, and so its sums)."""
    if n_ctx < 1:
        raise RefinferError(f"--ctx-size {n_ctx}: must be > 0", hint="llama-imatrix's default is 512")
    tokens = model.tokenize(text, add_special=True)
    if len(tokens) < 2 * n_ctx:
        raise RefinferError(f"the text has {len(tokens)} tokens; llama-imatrix needs at least 2 * n_ctx = "
                            f"{2 * n_ctx}", hint="give a longer text or a smaller --ctx-size")
    bos = model.tokenizer.bos_id
    add_bos = bos is not None and len(tokens) > 0 and tokens[0] == bos
    n_chunk = len(tokens) // n_ctx
    if n_chunks >= 0:
        n_chunk = min(n_chunk, n_chunks)
    im = Imatrix(datasets=[dataset] if dataset else [], chunk_size=n_ctx)
    tap = collect_from_taps(im, None, process_output=process_output)
    saved = model.n_ubatch
    model.n_ubatch = min(saved, n_ctx) if saved else n_ctx
    try:
        for i in range(n_chunk):
            chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
            if add_bos:
                chunk[0] = bos
            model.logits(chunk, tap=tap)
            if progress is not None:
                progress(i + 1, n_chunk)
    finally:
        model.n_ubatch = saved
    im.chunk_count = max((int(c.max()) for c in im.counts.values()), default=0) // n_ctx
    return im


def write_imatrix(path, im: Imatrix):
    """save_imatrix's GGUF file."""
    import gguf
    from .output_files import publish, temp_beside
    fd, tmp = temp_beside(os.fspath(path), prefix=".imatrix-", suffix=".gguf.part")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "imatrix")
        for kv in w.kv_data:  # GGUFWriter always adds general.architecture; llama-imatrix writes none
            kv.pop("general.architecture", None)
        w.add_string("general.type", "imatrix")
        # gguf-py cannot write an empty array (llama-imatrix can): one empty name stands for none
        w.add_array("imatrix.datasets", list(im.datasets) or [""])
        w.add_uint32("imatrix.chunk_count", int(im.chunk_count))
        w.add_uint32("imatrix.chunk_size", int(im.chunk_size))
        for name in sorted(im.sums):
            w.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(im.sums[name], dtype=np.float32))
            w.add_tensor(f"{name}.counts", im.counts[name].astype(np.float32).reshape(-1, 1))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        publish(tmp, os.fspath(path))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_imatrix(path) -> Imatrix:
    """common_imatrix_load: the GGUF format, else the legacy .dat."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise RefinferError(f"--imatrix {path!r} does not exist",
                            hint="compute one with `python -m refinfer imatrix -m MODEL -f TEXT -o FILE`")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _read_gguf(path)
    return _read_legacy(path)


def _read_gguf(path) -> Imatrix:
    from .gguf_file import GGUFFile
    f = GGUFFile(path)
    md = f.metadata
    im = Imatrix(datasets=list(md.get("imatrix.datasets", [])), chunk_count=int(md.get("imatrix.chunk_count", 0)),
                 chunk_size=int(md.get("imatrix.chunk_size", 0)))
    if not all(k in md for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")):
        raise FormatError("missing imatrix metadata (imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size)",
                          file=path, hint="is this an importance matrix? llama-quantize rejects it too")
    pairs = {}
    for name, ti in f.tensors.items():
        for suffix, slot in ((".in_sum2", 0), (".counts", 1)):
            if name.endswith(suffix):
                pairs.setdefault(name[: -len(suffix)], [None, None])[slot] = name
    if not pairs:
        raise FormatError("no .in_sum2/.counts tensors", file=path, hint="is this an importance matrix?")
    for base, (s, c) in sorted(pairs.items()):
        if s is None or c is None:
            raise FormatError(f"mismatched sums and counts for {base!r}", file=path,
                              hint="each entry needs <name>.in_sum2 and <name>.counts")
        for n in (s, c):
            if f.tensors[n].qtype.name != "f32":
                raise FormatError(f"sums and counts for {base!r} must be F32, {n!r} is "
                                  f"{f.tensors[n].qtype.name}", file=path, hint="recompute the imatrix")
        sums = np.ascontiguousarray(f.raw(s)).view("<f4").reshape(-1)
        counts = np.ascontiguousarray(f.raw(c)).view("<f4").reshape(-1)
        nmat = len(counts)
        if sums.size % max(nmat, 1):
            raise FormatError(f"{base!r}: {sums.size} sums for {nmat} counts", file=path, hint="recompute the imatrix")
        im.sums[base] = np.ascontiguousarray(sums, dtype=np.float32).reshape(nmat, -1)
        im.counts[base] = np.array([int(np.floor(abs(v) + 0.5)) * (1 if v >= 0 else -1) for v in counts],
                                   dtype=np.int64)  # std::lround
    return im


def _read_legacy(path) -> Imatrix:
    data = open(path, "rb").read()
    pos = 0

    def take(fmt):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise FormatError(f"truncated at byte {pos}", file=path, offset=pos,
                              hint="not a GGUF nor a legacy .dat importance matrix, or a damaged one")
        v = struct.unpack_from(fmt, data, pos)
        pos += size
        return v

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise FormatError(f"{n_entries} entries", file=path, hint="not an importance matrix, or an empty one")
    im = Imatrix(legacy=True)
    for _ in range(n_entries):
        (n,) = take("<i")
        if n < 0 or pos + n > len(data):
            raise FormatError(f"bad name length {n}", file=path, offset=pos, hint="a damaged importance matrix")
        name = data[pos:pos + n].decode("utf-8", "replace")
        pos += n
        ncall, nval = take("<ii")
        if nval < 1 or pos + 4 * nval > len(data):
            raise FormatError(f"entry {name!r}: bad value count {nval}", file=path, offset=pos,
                              hint="a damaged importance matrix")
        im.sums[name] = np.frombuffer(data, "<f4", nval, pos).astype(np.float32).reshape(1, -1)
        pos += 4 * nval
        im.counts[name] = np.array([ncall], dtype=np.int64)
    if pos + 4 <= len(data):
        (im.chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (n,) = take("<i")
            if n > 0 and pos + n <= len(data):
                im.datasets.append(data[pos:pos + n].decode("utf-8", "replace"))
    return im
