"""GGUF files: a bounded, validating reader and a writer built on gguf.GGUFWriter.

Layout (all little-endian; ggml's gguf.cpp is the reader we agree with):

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv      x  key: string | value type: u32 | value
    n_tensors x  name: string | n_dims: u32 | ne: u64[n_dims] | ggml type: u32 | offset: u64
    zero padding up to a multiple of general.alignment (default 32), then the data section;
    tensor offsets are relative to the data section and aligned.

    string = u64 byte length + UTF-8 bytes (no terminator)
    array  = u32 element type + u64 count + elements (arrays of arrays are rejected, as gguf.cpp)

The reader checks every length and offset with Python ints against the file size before it
slices or allocates anything, so a truncated or hostile file raises FormatError (naming the
file, the key or tensor, the byte offset, what was found and what was expected) instead of
crashing, hanging or allocating without bound. Tensor data is never copied: raw() returns a
read-only view into a memory map of the file.

A tensor of a ggml type that refinfer cannot compute (IQ2_XXS, ...) is an error, unless the
file is opened with allow_unsupported=True (for `inspect`): then its size comes from gguf-py's
GGML_QUANT_SIZES table, raw() still works, and dequantize() raises.

Shapes: GGUF stores ggml's ne (ne[0] = row length, fastest-varying first). TensorInfo.shape is
the NumPy shape, i.e. ne reversed: a [n_vocab, dim] embedding has ne = (dim, n_vocab).
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES

from .errors import FormatError, RefinferError, ShapeError, UnsupportedError
from .quant import BlockType, TYPES_BY_ID, dequantize as _dequantize, get_type, quantize as _quantize

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts and is rejected by gguf.cpp too
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME: gguf.cpp rejects tensor names of 64 bytes or more
# Far above any real vocabulary (~260k) or merge list; stops a forged count from building a
# Python list of hundreds of millions of objects out of a large but valid file.
MAX_ARRAY_ELEMENTS = 1 << 24

_HEADER_BYTES = 4 + 4 + 8 + 8
# The smallest possible records, used to reject header counts the file cannot hold.
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, a 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length (empty name), n_dims, one ne, type, offset

# Scalar value types: struct format and byte size.
_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<B",
}
_NUMPY = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.FLOAT64: "<f8",
    GGUFValueType.BOOL: "<u1",
}
_INT_RANGES = {
    GGUFValueType.UINT8: (0, 2**8), GGUFValueType.INT8: (-2**7, 2**7),
    GGUFValueType.UINT16: (0, 2**16), GGUFValueType.INT16: (-2**15, 2**15),
    GGUFValueType.UINT32: (0, 2**32), GGUFValueType.INT32: (-2**31, 2**31),
    GGUFValueType.UINT64: (0, 2**64), GGUFValueType.INT64: (-2**63, 2**63),
}


# Most format errors mean the file was cut short or damaged on its way.
DAMAGED_HINT = "the file is damaged or incomplete: re-download or re-convert it"


class UnsupportedTensorTypeError(FormatError, UnsupportedError):
    """A tensor uses a ggml type that exists but that refinfer does not implement."""


def _unsupported_hint(path=None) -> str:
    inspect = f"`python -m refinfer inspect {path}` lists its tensors; " if path else ""
    return (f"{inspect}refinfer computes with {', '.join(t.name for t in _model_types())}: use a "
            "model quantized to one of those (e.g. llama-quantize the f16 original to Q4_K_M or Q8_0)")


def _model_types():
    return [t for t in sorted(TYPES_BY_ID.values(), key=lambda t: t.type_id) if not t.activation_only]


@functools.cache
def unsupported_type(type_id: int) -> BlockType | None:
    """A size-only BlockType for a ggml type refinfer does not implement (None: no known size);
    one object per type, so that every tensor of that type shares it."""
    try:
        g = GGMLQuantizationType(type_id)
        block_size, type_size = GGML_QUANT_SIZES[g]
    except (ValueError, KeyError):
        return None
    name = g.name.lower()

    def dequantize_blocks(blocks):
        raise UnsupportedError(f"ggml type {g.name} ({type_id}) cannot be computed by refinfer",
                               hint=_unsupported_hint())

    return BlockType(name, type_id, block_size, np.dtype((np.void, type_size)), dequantize_blocks, None)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: BlockType
    shape: tuple  # NumPy order: ne reversed
    ne: tuple  # ggml order: ne[0] is the row length
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.ne:
            n *= d
        return n

    @property
    def n_rows(self) -> int:
        return self.n_elements // self.ne[0]

    @property
    def row_bytes(self) -> int:
        return self.ne[0] // self.qtype.block_size * self.qtype.type_size

    @property
    def supported(self) -> bool:  # False only in a file opened with allow_unsupported=True
        return TYPES_BY_ID.get(self.qtype.type_id) is self.qtype


def _supported_types() -> str:
    return ", ".join(f"{t.name}={t.type_id}" for t in sorted(TYPES_BY_ID.values(), key=lambda t: t.type_id))


class _Cursor:
    """Reads little-endian fields from a buffer, refusing to run past its end."""

    def __init__(self, buf, size: int, path: str):
        self.buf, self.size, self.path = buf, size, path
        self.pos = 0
        self.tensor = None  # the tensor being read, for error messages
        self.where = "header"  # what is being read, for error messages

    def fail(self, message: str, offset: int | None = None, hint: str | None = None):
        where = f"{self.where}: " if self.where else ""
        raise FormatError(where + message, file=self.path, tensor=self.tensor,
                          offset=self.pos if offset is None else offset, hint=hint or DAMAGED_HINT)

    def need(self, n: int, what: str):
        remain = self.size - self.pos
        if n > remain:
            self.fail(f"{what} needs {n} bytes but only {remain} remain before the end of the file "
                      f"({self.size} bytes); the file is truncated or a length field is corrupt",
                      hint=f"re-download or re-convert the file: reading it needs at least {self.pos + n} "
                           f"bytes, the file has {self.size}")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.scalar("<I", what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", what)

    def string(self, what: str) -> str:
        start = self.pos
        n = self.u64(f"{what} length")
        self.need(n, f"{what} ({n} bytes)")
        raw = bytes(self.buf[self.pos:self.pos + n])
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(f"{what} is not valid UTF-8 (byte {e.start} of {n}: {raw[e.start:e.start + 4]!r})", start)
        self.pos += n
        return s


class GGUFFile:
    def __init__(self, path, *, allow_unsupported: bool = False):
        self.path = os.fspath(path)
        self.allow_unsupported = allow_unsupported
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < _HEADER_BYTES:
                    head = f.read(4)
                    raise FormatError(f"file has {size} bytes, fewer than the {_HEADER_BYTES}-byte GGUF header"
                                      + ("" if head == GGUF_MAGIC[:len(head)] else f" (starts with {head!r})"),
                                      file=self.path, offset=0,
                                      hint="a GGUF model file is megabytes long: re-download or re-convert it")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise RefinferError(f"cannot open {self.path!r}: {e.strerror or e}",
                                hint="check the path and that the file is readable") from None
        self.file_size = size
        self.metadata: dict = {}
        self.metadata_types: dict = {}  # key -> GGUFValueType (ARRAY for arrays)
        self.array_types: dict = {}  # key -> GGUFValueType of the elements, for array values
        self.tensors: dict[str, TensorInfo] = {}
        self._kv_offsets: dict = {}  # key -> file offset of its entry, for error messages
        self._parse()

    def __repr__(self):
        return f"GGUFFile({self.path!r}, v{self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"

    # --- parsing -------------------------------------------------------------------------

    def _parse(self):
        c = _Cursor(self._mm, self.file_size, self.path)
        magic = bytes(self._mm[0:4])
        if magic != GGUF_MAGIC:
            c.fail(f"bad magic {magic!r}, expected {GGUF_MAGIC!r}: not a GGUF file", 0,
                   "pass a .gguf model file (a safetensors checkpoint is read from its directory)")
        c.pos = 4
        self.version = c.u32("version")
        if self.version not in SUPPORTED_VERSIONS:
            hint = None
            if self.version & 0xFFFF == 0 and self.version:
                hint = "the version looks byte-swapped: this is probably a big-endian GGUF file"
            elif self.version == 1:
                hint = "GGUF v1 is no longer supported by llama.cpp either; convert the model again"
            c.fail(f"GGUF version {self.version}, expected one of {SUPPORTED_VERSIONS}", 4, hint)
        n_tensors = c.u64("tensor count")
        n_kv = c.u64("metadata key count")
        room = self.file_size - _HEADER_BYTES
        if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > room:
            c.fail(f"header claims {n_tensors} tensors and {n_kv} metadata keys, which need at least "
                   f"{n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES} bytes, but only {room} "
                   f"bytes follow the header", 8)

        for i in range(n_kv):
            self._read_kv(c, i)

        self.alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in self.metadata:
            a = self.metadata["general.alignment"]
            t = self.metadata_types["general.alignment"]
            c.where = "metadata key 'general.alignment'"
            if t != GGUFValueType.UINT32:
                c.fail(f"has type {t.name}, expected UINT32 (as gguf.cpp requires)", self._kv_offsets["general.alignment"])
            if a <= 0 or a & (a - 1):
                c.fail(f"alignment {a} is not a power of two", self._kv_offsets["general.alignment"])
            self.alignment = a

        infos, names = [], set()
        for i in range(n_tensors):
            info = self._read_tensor_info(c, i, names)
            names.add(info[0])
            infos.append(info)
        c.tensor = None
        c.where = "tensor data"

        # gguf.cpp: the data section starts at the next multiple of the alignment.
        self.data_offset = -(-c.pos // self.alignment) * self.alignment
        if infos and self.data_offset > self.file_size:
            c.fail(f"data section would start at {self.data_offset}, past the end of the file "
                   f"({self.file_size} bytes)", c.pos)
        ends = [self.data_offset + rel + _n_bytes(ne, t) for _, _, ne, t, rel in infos if not ne[0] % t.block_size]
        self._expected_size = max(ends, default=self.data_offset)
        for name, info_offset, ne, qtype, rel in infos:
            self.tensors[name] = self._check_tensor(c, name, info_offset, ne, qtype, rel)
        self._check_overlaps(c)

    def _read_kv(self, c: _Cursor, i: int):
        c.where = f"metadata entry {i}"
        start = c.pos
        key = c.string("key")
        if not key:
            c.fail("empty key", start)
        c.where = f"metadata key {key!r}"
        if key in self.metadata:
            c.fail("duplicate key", start)
        vtype = self._value_type(c, "value type")
        if vtype == GGUFValueType.ARRAY:
            etype = self._value_type(c, "array element type")
            if etype == GGUFValueType.ARRAY:
                c.fail("arrays of arrays are not supported (gguf.cpp rejects them too)", c.pos - 4)
            count_at = c.pos
            count = c.u64("array count")
            min_size = 8 if etype == GGUFValueType.STRING else struct.calcsize(_SCALAR[etype])
            if count * min_size > c.size - c.pos:
                c.fail(f"array of {count} {etype.name} needs at least {count * min_size} bytes, "
                       f"only {c.size - c.pos} remain", count_at)
            if count > MAX_ARRAY_ELEMENTS:
                c.fail(f"array of {count} elements exceeds the limit of {MAX_ARRAY_ELEMENTS}", count_at)
            value = self._read_array(c, etype, count)
            self.array_types[key] = etype
        else:
            value = self._read_scalar(c, vtype)
        self.metadata[key] = value
        self.metadata_types[key] = vtype
        self._kv_offsets[key] = start

    def _value_type(self, c: _Cursor, what: str) -> GGUFValueType:
        at = c.pos
        t = c.u32(what)
        try:
            return GGUFValueType(t)
        except ValueError:
            c.fail(f"unknown {what} {t}, expected one of "
                   + ", ".join(f"{v.name}={v.value}" for v in GGUFValueType), at)

    def _read_scalar(self, c: _Cursor, vtype: GGUFValueType):
        if vtype == GGUFValueType.STRING:
            return c.string("string value")
        at = c.pos
        v = c.scalar(_SCALAR[vtype], f"{vtype.name} value")
        if vtype == GGUFValueType.BOOL:
            if v > 1:
                c.fail(f"bool value {v}, expected 0 or 1", at)
            return bool(v)
        return v

    def _read_array(self, c: _Cursor, etype: GGUFValueType, count: int) -> list:
        if etype == GGUFValueType.STRING:
            out = []
            for j in range(count):
                out.append(c.string(f"string {j} of {count}"))
            return out
        dt = np.dtype(_NUMPY[etype])
        # Bounds were checked by the caller: count * itemsize <= bytes remaining.
        arr = np.frombuffer(self._mm, dtype=dt, count=count, offset=c.pos)
        if etype == GGUFValueType.BOOL and count and int(arr.max()) > 1:
            j = int(np.argmax(arr > 1))
            c.fail(f"bool element {j} is {int(arr[j])}, expected 0 or 1", c.pos + j)
        c.pos += count * dt.itemsize
        values = arr.tolist()
        return [bool(v) for v in values] if etype == GGUFValueType.BOOL else values

    def _read_tensor_info(self, c: _Cursor, i: int, seen: set):
        c.tensor, c.where = None, f"tensor info {i}"
        start = c.pos
        name = c.string("tensor name")
        c.tensor, c.where = name, "tensor info"
        if len(name.encode("utf-8")) >= MAX_NAME:
            c.fail(f"name is {len(name.encode('utf-8'))} bytes, expected fewer than {MAX_NAME} (GGML_MAX_NAME)", start)
        if name in seen:
            c.fail("duplicate tensor name", start)
        at = c.pos
        n_dims = c.u32("n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            c.fail(f"n_dims is {n_dims}, expected 1 to {MAX_DIMS}", at)
        ne = []
        for d in range(n_dims):
            at = c.pos
            v = c.u64(f"ne[{d}]")
            if not 0 < v < 2**63:
                c.fail(f"ne[{d}] is {v}, expected a positive int64", at)
            ne.append(v)
        at = c.pos
        type_id = c.u32("ggml type")
        t = TYPES_BY_ID.get(type_id)
        if t is None:
            try:
                ggml_name = GGMLQuantizationType(type_id).name
            except ValueError:
                c.fail(f"ggml type id {type_id} is not a ggml type; supported: {_supported_types()}", at,
                       "the file is damaged, or was written by a newer ggml with a type refinfer does not know")
            t = unsupported_type(type_id) if self.allow_unsupported else None
            if t is None:
                raise UnsupportedTensorTypeError(
                    f"tensor info: ggml type id {type_id} ({ggml_name}) is not supported by refinfer; "
                    f"supported: {_supported_types()}", file=self.path, tensor=name, offset=at,
                    hint=_unsupported_hint(self.path))
        rel = c.u64("data offset")
        return name, start, tuple(ne), t, rel

    def _check_tensor(self, c: _Cursor, name, info_offset, ne, t: BlockType, rel) -> TensorInfo:
        c.tensor, c.where = name, "tensor info"
        if ne[0] % t.block_size:
            c.fail(f"row length ne[0] = {ne[0]} is not a multiple of the {t.name} block size {t.block_size}",
                   info_offset)
        nbytes = _n_bytes(ne, t)
        if rel % self.alignment:
            c.fail(f"data offset {rel} is not a multiple of the alignment {self.alignment}", info_offset)
        start = self.data_offset + rel
        if start + nbytes > self.file_size:
            c.fail(f"{t.name} data of shape {tuple(reversed(ne))} ({nbytes} bytes) at file offset {start} "
                   f"ends at {start + nbytes}, past the end of the file ({self.file_size} bytes)", info_offset,
                   f"the file is truncated: re-download or re-convert it; its tensor table needs "
                   f"{self._expected_size} bytes, the file has {self.file_size}")
        return TensorInfo(name, t, tuple(reversed(ne)), ne, start, nbytes)

    def _check_overlaps(self, c: _Cursor):
        prev = None
        for ti in sorted(self.tensors.values(), key=lambda t: t.offset):
            if prev is not None and ti.offset < prev.offset + prev.nbytes:
                c.tensor = ti.name
                c.fail(f"data at file offset {ti.offset} overlaps tensor {prev.name!r} "
                       f"(bytes {prev.offset}..{prev.offset + prev.nbytes})", ti.offset)
            prev = ti

    # --- access --------------------------------------------------------------------------

    def _info(self, name) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise FormatError("no such tensor in the file", file=self.path, tensor=name,
                              hint=f"`python -m refinfer inspect {self.path}` lists the tensors it has") from None

    def raw(self, name) -> np.ndarray:
        ti = self._info(name)
        # A read-only view into the memory map: nothing is copied until someone computes with it.
        return np.frombuffer(self._mm, dtype=np.uint8, count=ti.nbytes,
                             offset=ti.offset).reshape(ti.n_rows, ti.row_bytes)  # [n_rows, row_bytes]

    def dequantize(self, name) -> np.ndarray:
        ti = self._info(name)
        if not ti.supported:
            raise UnsupportedTensorTypeError(f"ggml type {ti.qtype.name} cannot be computed by refinfer",
                                             file=self.path, tensor=name, hint=_unsupported_hint(self.path))
        return _dequantize(self.raw(name), ti.qtype).reshape(ti.shape)  # float32, NumPy shape


def _n_bytes(ne, t: BlockType) -> int:
    n = 1
    for d in ne:
        n *= d
    return n // t.block_size * t.type_size


def open_gguf(path) -> GGUFFile:
    return GGUFFile(path)


# --- writing ------------------------------------------------------------------------------

def _infer_type(value) -> GGUFValueType:
    if isinstance(value, bool):
        return GGUFValueType.BOOL
    if isinstance(value, (int, np.integer)):
        v = int(value)
        if -2**31 <= v < 2**31:
            return GGUFValueType.INT32
        return GGUFValueType.INT64 if -2**63 <= v < 2**63 else GGUFValueType.UINT64
    if isinstance(value, (float, np.floating)):
        return GGUFValueType.FLOAT32
    if isinstance(value, str):
        return GGUFValueType.STRING
    if isinstance(value, (list, tuple)):
        return GGUFValueType.ARRAY
    raise TypeError(f"cannot store a {type(value).__name__} in GGUF metadata")


def _infer_array_type(values) -> GGUFValueType:
    kinds = {_infer_type(v) for v in values}
    ints = [GGUFValueType.INT32, GGUFValueType.INT64, GGUFValueType.UINT64]
    if not kinds:
        return GGUFValueType.INT32
    if GGUFValueType.ARRAY in kinds:
        raise TypeError("arrays of arrays cannot be stored (gguf.cpp rejects them)")
    if len(kinds) == 1:
        return kinds.pop()
    if kinds <= set(ints):
        return max(kinds, key=ints.index)  # the narrowest type that holds every element
    if kinds <= {GGUFValueType.INT32, GGUFValueType.INT64, GGUFValueType.FLOAT32}:
        return GGUFValueType.FLOAT32  # e.g. [0, 0.5]
    raise TypeError(f"array mixes element types {sorted(k.name for k in kinds)}")


def _check_value(key, value, vtype: GGUFValueType):
    if vtype in _INT_RANGES:
        lo, hi = _INT_RANGES[vtype]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= int(value) < hi:
            raise TypeError(f"value {value!r} does not fit {vtype.name}")
    elif vtype == GGUFValueType.STRING and not isinstance(value, str):
        raise TypeError(f"value {value!r} is not a str")
    elif vtype == GGUFValueType.BOOL and not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"value {value!r} is not a bool")


class _Writer(GGUFWriter):
    # GGUFWriter refuses empty arrays; gguf.cpp reads them fine, and copying a file must not fail
    # because one of its arrays happens to be empty.
    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == GGUFValueType.ARRAY and len(val) == 0:
            head = struct.pack("<I", vtype) if add_vtype else b""
            return head + struct.pack("<IQ", sub_type if sub_type is not None else GGUFValueType.INT32, 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def write_gguf(path, arch: str, metadata: dict, metadata_types: dict | None = None, tensors=(),
               *, array_types: dict | None = None) -> None:
    """Write a GGUF v3 file.

    metadata_types (key -> GGUFValueType) and array_types (key -> element type of an array
    value) keep the value types of a file being copied: pass f.metadata_types and f.array_types
    of a GGUFFile. Keys without a type get one inferred (int -> INT32, or INT64 when too large;
    float -> FLOAT32). general.architecture is always `arch`; general.alignment, when present,
    sets the data alignment.

    tensors: (name, data, qtype, numpy_shape) in file order. uint8 data is taken as the raw
    block bytes (any shape holding exactly the tensor's bytes); float data is quantized to
    qtype with refinfer.quant.quantize (for f32/f16/bf16 that is a plain conversion).
    """
    path = os.fspath(path)
    metadata_types = metadata_types or {}
    array_types = array_types or {}
    w = _Writer(path, arch)
    for key, value in metadata.items():
        if key == "general.architecture":
            continue
        try:
            vtype = GGUFValueType(metadata_types[key]) if key in metadata_types else _infer_type(value)
            sub = None
            if vtype == GGUFValueType.ARRAY:
                value = list(value)
                sub = GGUFValueType(array_types[key]) if key in array_types else _infer_array_type(value)
                if sub == GGUFValueType.ARRAY:
                    raise TypeError("arrays of arrays cannot be stored (gguf.cpp rejects them)")
                for v in value:
                    _check_value(key, v, sub)
            else:
                _check_value(key, value, vtype)
        except (TypeError, ValueError) as e:
            raise FormatError(f"cannot write metadata key {key!r}: {e}", file=path,
                              hint="the value must fit the key's GGUF type (as read from the input file)") from None
        if key == "general.alignment":
            if vtype != GGUFValueType.UINT32 or value <= 0 or value & (value - 1):
                raise FormatError(f"general.alignment must be a UINT32 power of two, got {value!r} "
                                  f"({vtype.name})", file=path, hint="use 32, the GGUF default, or another power of two")
            w.data_alignment = value
        w.add_key_value(key, value, vtype, sub_type=sub)

    for name, data, qtype, shape in tensors:
        t = get_type(qtype)
        shape = tuple(int(s) for s in shape)
        if not shape or any(s <= 0 for s in shape) or shape[-1] % t.block_size:
            raise ShapeError(f"tensor {name!r}: shape {shape} is not a valid {t.name} shape (positive dims, "
                             f"last one a multiple of the block size {t.block_size})",
                             hint="store it as f16 or f32, whose block size is 1")
        row_bytes = shape[-1] // t.block_size * t.type_size
        data = np.asarray(data)
        if data.dtype != np.uint8:
            if data.size != int(np.prod(shape)):
                raise ShapeError(f"tensor {name!r}: {data.size} values for shape {shape}",
                                 hint="the data must hold exactly prod(shape) values")
            data = _quantize(np.asarray(data, dtype=np.float32).reshape(shape), t)
        raw = np.ascontiguousarray(data)
        if raw.size != int(np.prod(shape[:-1])) * row_bytes:
            raise ShapeError(f"tensor {name!r}: {raw.size} bytes given, {t.name} shape {shape} needs "
                             f"{int(np.prod(shape[:-1])) * row_bytes}",
                             hint="uint8 data is taken as the raw blocks; pass float data to have it converted")
        # GGUFWriter turns the byte shape back into the element shape and reverses it into ne.
        w.add_tensor(name, raw.reshape(*shape[:-1], row_bytes), raw_dtype=GGMLQuantizationType(t.type_id))

    try:
        w.write_header_to_file(path)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


__all__ = ["GGUFFile", "open_gguf", "TensorInfo", "write_gguf", "UnsupportedTensorTypeError"]
