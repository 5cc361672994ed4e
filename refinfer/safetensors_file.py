"""HF safetensors checkpoints: one file, or shards listed in model.safetensors.index.json.

File layout (the safetensors specification; all little-endian):

    u64 N                       length of the JSON header
    N bytes of UTF-8 JSON       {"name": {"dtype": "BF16", "shape": [d0, d1], "data_offsets": [b, e]},
                                 ..., "__metadata__": {str: str}}  (may end with spaces)
    data section                tensor bytes, C order; offsets are relative to the section start

The data section must be fully covered by the tensors, without holes or overlaps (the
safetensors library refuses both). Every length and offset is checked with Python ints before
anything is sliced, so a corrupt file raises FormatError naming the file, the tensor and the
byte offset; tensor data is memory-mapped, never read eagerly.

Index file: {"metadata": {...}, "weight_map": {"tensor name": "model-00001-of-00002.safetensors"}}.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass

import numpy as np

from .errors import FormatError, RefinferError, UnsupportedError
from .quant._common import bf16_to_f32

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# The safetensors library's own limit; real headers are well under 1 MB per shard.
MAX_HEADER_BYTES = 100_000_000

# Every dtype the format defines, with its byte size, so sizes can be checked for all tensors.
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
               "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# What refinfer computes with: the dtype raw() returns (bf16 as its uint16 bit patterns).
SUPPORTED = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
             # packed integer weights (GPTQ/AWQ qweight, qzeros, g_idx; compressed-tensors weight_shape)
             "I32": np.dtype("<i4"), "U32": np.dtype("<u4"), "I64": np.dtype("<i8"), "I16": np.dtype("<i2"),
             "I8": np.dtype("i1"), "U8": np.dtype("u1")}


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs):
    # json.loads would silently keep the last of two equal keys: two entries for one tensor
    # name mean a corrupt header.
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


@dataclass(frozen=True)
class SafetensorsInfo:
    name: str
    dtype: str  # safetensors dtype name: "F32", "F16", "BF16", ...
    shape: tuple
    file: str
    offset: int  # absolute byte offset in `file`
    nbytes: int


class _ShardFile:
    """One .safetensors file: its validated header and a read-only memory map."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise FormatError(f"file has {size} bytes, fewer than the 8-byte header length",
                                      file=path, offset=0)
                self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise RefinferError(f"cannot open {path!r}: {e.strerror or e}") from None
        self.size = size
        self.metadata, self.tensors = self._parse()

    def fail(self, message, tensor=None, offset=None, hint=None):
        raise FormatError(message, file=self.path, tensor=tensor, offset=offset, hint=hint)

    def _parse(self):
        n = int.from_bytes(self.mm[0:8], "little")
        if n > self.size - 8:
            hint = None
            if self.mm[0:4] == b"GGUF":
                hint = "this is a GGUF file, not safetensors"
            self.fail(f"header length {n} runs past the end of the file ({self.size} bytes, so at most "
                      f"{self.size - 8}); the file is truncated or not safetensors", offset=0, hint=hint)
        if n > MAX_HEADER_BYTES:
            self.fail(f"header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes", offset=0)
        if n < 2:
            self.fail(f"header length {n}, expected at least 2 (\"{{}}\")", offset=0)
        self.header_bytes = bytes(self.mm[8:8 + n])
        try:
            header = json.loads(self.header_bytes.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except UnicodeDecodeError as e:
            self.fail(f"header is not valid UTF-8 (byte {e.start})", offset=8 + e.start)
        except json.JSONDecodeError as e:
            self.fail(f"header is not valid JSON: {e.msg} (header byte {e.pos})", offset=8 + e.pos)
        except _DuplicateKey as e:
            self.fail(f"header has the key {e.args[0]!r} twice", offset=8)
        except (ValueError, RecursionError) as e:  # e.g. an integer of more than 4300 digits, deep nesting
            self.fail(f"header JSON cannot be read: {type(e).__name__}: {str(e)[:200]}", offset=8)
        if not isinstance(header, dict):
            self.fail(f"header is a JSON {type(header).__name__}, expected an object", offset=8)

        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            self.fail(f"__metadata__ is a JSON {type(metadata).__name__}, expected an object", offset=8)

        data_start = 8 + n
        data_size = self.size - data_start
        tensors = {}
        for name, entry in header.items():
            tensors[name] = self._check_entry(name, entry, data_start, data_size)

        # Coverage: sorted by start, each tensor must begin where the previous one ended.
        pos = 0
        for ti in sorted(tensors.values(), key=lambda t: (t.offset, t.nbytes)):
            begin = ti.offset - data_start
            if begin < pos:
                self.fail(f"data bytes {begin}..{begin + ti.nbytes} overlap the previous tensor, which ends at "
                          f"{pos}", tensor=ti.name, offset=ti.offset)
            if begin > pos:
                self.fail(f"data bytes {pos}..{begin} of the data section belong to no tensor",
                          tensor=ti.name, offset=data_start + pos)
            pos = begin + ti.nbytes
        if pos != data_size:
            self.fail(f"the tensors cover {pos} bytes of the data section but it has {data_size}; "
                      f"the file has trailing bytes or is corrupt", offset=data_start + pos)
        return metadata, tensors

    def _check_entry(self, name, entry, data_start, data_size) -> SafetensorsInfo:
        def bad(message):
            # Point at the entry's key in the JSON header when it can be found.
            at = self.header_bytes.find(json.dumps(name, ensure_ascii=False).encode("utf-8"))
            self.fail(message, tensor=name, offset=8 + max(at, 0))

        if not isinstance(entry, dict):
            bad(f"header entry is a JSON {type(entry).__name__}, expected an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            bad(f"dtype {dtype!r} is not a safetensors dtype; expected one of {', '.join(DTYPE_SIZES)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            bad(f"shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            bad(f"data_offsets {offsets!r} is not a list of two integers")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            self.fail(f"data_offsets [{begin}, {end}] do not lie within the data section of {data_size} bytes "
                      f"(file offsets {data_start}..{self.size})", tensor=name,
                      offset=data_start + begin if 0 <= begin <= data_size else data_start)
        n = 1
        for d in shape:
            n *= d
        nbytes = n * DTYPE_SIZES[dtype]
        if end - begin != nbytes:
            self.fail(f"data_offsets [{begin}, {end}] hold {end - begin} bytes, but {dtype} x {tuple(shape)} "
                      f"needs {nbytes}", tensor=name, offset=data_start + begin)
        return SafetensorsInfo(name, dtype, tuple(shape), self.path, data_start + begin, nbytes)


class SafetensorsCheckpoint:
    """Tensors of a checkpoint directory (sharded or not) or of one .safetensors file."""

    def __init__(self, path):
        path = os.fspath(path)
        self.path = path
        files, weight_map, index_path = self._locate(path)
        self._shards = {f: _ShardFile(f) for f in files}
        self.tensors: dict[str, SafetensorsInfo] = {}
        if weight_map is None:
            for shard in self._shards.values():
                self.tensors.update(shard.tensors)
        else:
            self._merge_index(weight_map, index_path)
        self.metadata = {k: v for s in self._shards.values() for k, v in s.metadata.items()}
        self.config = self._read_config(os.path.dirname(files[0]) if files else path)

    def __repr__(self):
        return f"SafetensorsCheckpoint({self.path!r}, {len(self._shards)} files, {len(self.tensors)} tensors)"

    def _locate(self, path):
        """-> (shard files, weight_map or None, index path or None)"""
        if os.path.isdir(path):
            if os.path.exists(os.path.join(path, INDEX_NAME)):
                return self._read_index(os.path.join(path, INDEX_NAME))
            if os.path.exists(os.path.join(path, SINGLE_NAME)):
                return [os.path.join(path, SINGLE_NAME)], None, None
            found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if len(found) == 1:
                return [os.path.join(path, found[0])], None, None
            raise FormatError(f"found {len(found)} .safetensors files and no {INDEX_NAME}; expected "
                              f"{SINGLE_NAME} or an index listing the shards", file=path,
                              hint="pass a single .safetensors file, or a checkpoint directory")
        if not os.path.exists(path):
            raise RefinferError(f"no such file or directory: {path!r}")
        if path.endswith(".index.json"):
            return self._read_index(path)
        return [path], None, None

    def _read_index(self, index_path):
        try:
            size = os.path.getsize(index_path)
            if size > MAX_HEADER_BYTES:
                raise FormatError(f"index file has {size} bytes, more than the limit of {MAX_HEADER_BYTES}",
                                  file=index_path, offset=0)
            with open(index_path, "rb") as f:
                index = json.loads(f.read().decode("utf-8"))
        except OSError as e:
            raise RefinferError(f"cannot read {index_path!r}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise FormatError(f"index is not valid UTF-8 (byte {e.start})", file=index_path, offset=e.start) from None
        except json.JSONDecodeError as e:
            raise FormatError(f"index is not valid JSON: {e.msg}", file=index_path, offset=e.pos) from None
        except (ValueError, RecursionError) as e:
            raise FormatError(f"index JSON cannot be read: {type(e).__name__}", file=index_path, offset=0) from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise FormatError("index has no \"weight_map\" object mapping tensor names to file names",
                              file=index_path, offset=0)
        folder = os.path.dirname(index_path)
        files = []
        for name, fname in weight_map.items():
            # Shards are plain file names beside the index; anything else could reach outside it.
            if os.path.basename(fname) != fname or fname in ("", ".", ".."):
                raise FormatError(f"weight_map names shard {fname!r}, expected a file name in the same directory",
                                  file=index_path, tensor=name)
            full = os.path.join(folder, fname)
            if full not in files:
                if not os.path.isfile(full):
                    raise FormatError(f"weight_map names shard {fname!r}, which does not exist",
                                      file=index_path, tensor=name, hint="the checkpoint download is incomplete")
                files.append(full)
        return files, weight_map, index_path

    def _merge_index(self, weight_map, index_path):
        folder = os.path.dirname(index_path)
        owner = {}
        for shard in self._shards.values():
            for name, info in shard.tensors.items():
                if name in owner:
                    raise FormatError(f"tensor is stored in two shards: {os.path.basename(owner[name])!r} and "
                                      f"{os.path.basename(shard.path)!r}", file=shard.path, tensor=name,
                                      offset=info.offset)
                owner[name] = shard.path
                if name not in weight_map:
                    raise FormatError(f"tensor is in shard {os.path.basename(shard.path)!r} but not in the index "
                                      f"weight_map", file=index_path, tensor=name)
        for name, fname in weight_map.items():
            shard = self._shards[os.path.join(folder, fname)]
            if name not in shard.tensors:
                where = f"; it is in {os.path.basename(owner[name])!r}" if name in owner else ""
                raise FormatError(f"index maps tensor to {fname!r}, which does not contain it{where}",
                                  file=index_path, tensor=name)
            self.tensors[name] = shard.tensors[name]

    @staticmethod
    def _read_config(folder):
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            return None
        try:
            with open(path, "rb") as f:
                config = json.loads(f.read(MAX_HEADER_BYTES).decode("utf-8"))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError included
            raise FormatError(f"config.json is not valid JSON: {e}", file=path,
                              offset=getattr(e, "pos", None)) from None
        if not isinstance(config, dict):
            raise FormatError(f"config.json is a JSON {type(config).__name__}, expected an object", file=path)
        return config

    # --- access --------------------------------------------------------------------------

    def _info(self, name) -> SafetensorsInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise FormatError("no such tensor in the checkpoint", file=self.path, tensor=name) from None

    def raw(self, name) -> np.ndarray:
        """The stored array, memory-mapped read-only: float32, float16, uint16 bits for bf16, or the integers."""
        ti = self._info(name)
        if ti.dtype not in SUPPORTED:
            raise UnsupportedError(f"file {ti.file!r}, tensor {name!r}: dtype {ti.dtype} is not supported; "
                                   f"supported: {', '.join(SUPPORTED)}")
        dt = SUPPORTED[ti.dtype]
        count = ti.nbytes // dt.itemsize
        if count == 0:
            return np.zeros(ti.shape, dt)
        return np.frombuffer(self._shards[ti.file].mm, dtype=dt, count=count, offset=ti.offset).reshape(ti.shape)

    def get(self, name) -> np.ndarray:
        ti = self._info(name)
        raw = self.raw(name)
        if ti.dtype == "BF16":
            return bf16_to_f32(raw).reshape(ti.shape)
        return raw.astype(np.float32)  # a writable copy, also for F32


__all__ = ["SafetensorsCheckpoint", "SafetensorsInfo", "DTYPE_SIZES", "SUPPORTED"]
