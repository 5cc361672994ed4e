"""GGUF container: round trips, one test per validation rule, fuzzing, and the real model file
checked against gguf-py's GGUFReader as an independent reader.

Malformed files are built byte by byte with struct (below), independently of refinfer's
writer, so each test controls exactly which field is wrong and knows its offset.
"""

from __future__ import annotations

import struct
from datetime import timedelta

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from hypothesis import HealthCheck, given, settings, strategies as st

from fuzzing import read_bounded
from refinfer.errors import FormatError, UnsupportedError
from refinfer.gguf_file import GGUFFile, UnsupportedTensorTypeError, open_gguf, write_gguf
from refinfer.quant import TYPES_BY_ID, quantize

V = GGUFValueType
SCALAR_FMT = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I",
              V.INT32: "<i", V.FLOAT32: "<f", V.BOOL: "<B", V.UINT64: "<Q", V.INT64: "<q",
              V.FLOAT64: "<d"}


class Builder:
    """Writes GGUF fields one by one, remembering where each integer field and each labelled
    position is, so tests can corrupt a precise field and predict the reported offset."""

    def __init__(self):
        self.buf = bytearray()
        self.fields = []  # (offset, struct format) of every integer field
        self.at = {}  # label -> offset

    def mark(self, label):
        self.at[label] = len(self.buf)

    def put(self, fmt, value, label=None):
        if label:
            self.mark(label)
        if fmt[-1] in "BbHhIiQq":
            self.fields.append((len(self.buf), fmt))
        self.buf += struct.pack(fmt, value)

    def string(self, s, label=None):
        b = s.encode("utf-8") if isinstance(s, str) else s
        self.put("<Q", len(b), label)
        self.buf += b

    def value(self, vtype, value):
        if vtype == V.STRING:
            self.string(value)
        elif vtype == V.ARRAY:
            etype, items = value
            self.put("<I", etype)
            self.put("<Q", len(items))
            for item in items:
                self.value(etype, item)
        else:
            self.put(SCALAR_FMT[vtype], value)


def build_gguf(kvs=(), tensors=(), *, version=3, magic=b"GGUF", alignment=32, n_kv=None, n_tensors=None,
               pad_data=True):
    """kvs: (key, vtype, value) with arrays as (ARRAY, (etype, items)).
    tensors: (name, ne, type_id, relative offset, data bytes). Returns the Builder."""
    b = Builder()
    b.buf += magic
    b.put("<I", version, "version")
    b.put("<Q", len(tensors) if n_tensors is None else n_tensors, "n_tensors")
    b.put("<Q", len(kvs) if n_kv is None else n_kv, "n_kv")
    for key, vtype, value in kvs:
        b.string(key, f"kv:{key}")
        b.put("<I", vtype, f"kv:{key}:type")
        b.mark(f"kv:{key}:value")
        b.value(vtype, value)
    for name, ne, type_id, rel, _ in tensors:
        b.string(name, f"ti:{name}")
        b.put("<I", len(ne), f"ti:{name}:n_dims")
        for i, d in enumerate(ne):
            b.put("<Q", d, f"ti:{name}:ne{i}")
        b.put("<I", type_id, f"ti:{name}:type")
        b.put("<Q", rel, f"ti:{name}:offset")
    b.mark("end_of_infos")
    if tensors or pad_data:
        b.buf += bytes(-len(b.buf) % alignment)
    b.mark("data")
    data_start = len(b.buf)
    for name, ne, type_id, rel, data in tensors:
        end = data_start + rel + len(data)
        if len(b.buf) < end:
            b.buf += bytes(end - len(b.buf))
        b.buf[data_start + rel:end] = data
    return b


def q4_0_bytes(rows, cols, seed=0):
    x = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return quantize(x, "q4_0").tobytes()


def small_gguf():
    """A valid file: scalars, a string array, an int array, a q4_0 matrix and an f32 vector."""
    w = q4_0_bytes(3, 64)  # 3 rows x 2 blocks x 18 bytes = 108 bytes
    norm = np.arange(8, dtype="<f4").tobytes()
    kvs = [("general.architecture", V.STRING, "llama"),
           ("llama.block_count", V.UINT32, 1),
           ("tokenizer.ggml.tokens", V.ARRAY, (V.STRING, ["a", "bc", "<s>"])),
           ("tokenizer.ggml.scores", V.ARRAY, (V.FLOAT32, [0.0, -1.5, 2.0]))]
    tensors = [("w.weight", (64, 3), 2, 0, w), ("norm.weight", (8,), 0, 128, norm)]
    return build_gguf(kvs, tensors)


def write(tmp_path, b, name="t.gguf"):
    p = tmp_path / name
    p.write_bytes(bytes(b.buf) if isinstance(b, Builder) else bytes(b))
    return p


def expect_error(path, *, tensor=None, offset=None, contains=(), cls=FormatError):
    with pytest.raises(cls) as ei:
        GGUFFile(path)
    msg = str(ei.value)
    assert str(path) in msg, msg
    if tensor is not None:
        assert repr(tensor) in msg, msg
        assert ei.value.tensor == tensor
    if offset is not None:
        assert f"offset {offset}:" in msg, msg
        assert ei.value.offset == offset
    for c in contains:
        assert c in msg, msg
    return ei.value


# --- valid files ---------------------------------------------------------------------------

def test_hand_built_file_reads(tmp_path):
    b = small_gguf()
    f = open_gguf(write(tmp_path, b))
    assert f.version == 3 and f.alignment == 32 and f.data_offset == b.at["data"]
    assert f.metadata["tokenizer.ggml.tokens"] == ["a", "bc", "<s>"]
    assert f.metadata["tokenizer.ggml.scores"] == [0.0, -1.5, 2.0]
    assert f.metadata_types["llama.block_count"] == V.UINT32
    assert f.array_types["tokenizer.ggml.tokens"] == V.STRING
    assert list(f.tensors) == ["w.weight", "norm.weight"]
    ti = f.tensors["w.weight"]
    assert (ti.shape, ti.ne, ti.qtype.name, ti.nbytes, ti.offset) == ((3, 64), (64, 3), "q4_0", 108, b.at["data"])
    raw = f.raw("w.weight")
    assert raw.shape == (3, 36) and raw.tobytes() == q4_0_bytes(3, 64)
    assert not raw.flags.writeable
    np.testing.assert_array_equal(f.dequantize("norm.weight"), np.arange(8, dtype=np.float32))


def test_round_trip_all_value_types(tmp_path):
    rng = np.random.default_rng(1)
    f32 = rng.standard_normal((4, 32)).astype(np.float32)
    q8 = rng.standard_normal((2, 64)).astype(np.float32)
    q4_raw = quantize(rng.standard_normal((5, 32)).astype(np.float32), "q4_0")
    metadata = {
        "general.name": "tiny", "general.empty": "", "u8": 255, "i8": -128, "u16": 65535, "i16": -32768,
        "u32": 2**32 - 1, "i32": -2**31, "u64": 2**64 - 1, "i64": -2**63, "f32": 0.5, "f64": 1e300,
        "flag": True, "general.alignment": 64,
        "tokenizer.ggml.tokens": ["<unk>", "▁a", "é", ""], "tokenizer.ggml.scores": [0.0, -1.25, 3.5, 1e-3],
        "tokenizer.ggml.token_type": [2, 1, 1, 6], "bools": [True, False], "u64s": [0, 2**64 - 1],
        "empty": [],
    }
    types = {"u8": V.UINT8, "i8": V.INT8, "u16": V.UINT16, "i16": V.INT16, "u32": V.UINT32, "i32": V.INT32,
             "u64": V.UINT64, "i64": V.INT64, "f32": V.FLOAT32, "f64": V.FLOAT64, "flag": V.BOOL,
             "general.alignment": V.UINT32, "general.name": V.STRING, "general.empty": V.STRING}
    arrays = {"u64s": V.UINT64, "empty": V.UINT16}
    tensors = [("a", f32, "f32", (4, 32)), ("b", f32.astype(np.float16), "f16", (4, 32)),
               ("c", q8, "q8_0", (2, 64)), ("d", q4_raw, "q4_0", (5, 32)), ("e", f32, "bf16", (4, 32))]
    path = tmp_path / "rt.gguf"
    write_gguf(path, "llama", metadata, types, tensors, array_types=arrays)

    f = GGUFFile(path)
    expected = dict(metadata, **{"general.architecture": "llama",  # FLOAT32 values come back rounded
                                 "tokenizer.ggml.scores": [0.0, -1.25, 3.5, float(np.float32(1e-3))]})
    assert f.metadata == expected
    assert f.alignment == 64
    for k, t in types.items():
        assert f.metadata_types[k] == t
    assert f.array_types["tokenizer.ggml.tokens"] == V.STRING
    assert f.array_types["tokenizer.ggml.scores"] == V.FLOAT32
    assert f.array_types["tokenizer.ggml.token_type"] == V.INT32
    assert f.array_types["u64s"] == V.UINT64 and f.array_types["empty"] == V.UINT16
    np.testing.assert_array_equal(f.dequantize("a"), f32)
    np.testing.assert_array_equal(f.dequantize("b"), f32.astype(np.float16).astype(np.float32))
    assert f.raw("c").tobytes() == quantize(q8, "q8_0").tobytes()
    assert f.raw("d").tobytes() == q4_raw.tobytes()
    assert [t.offset % 64 for t in f.tensors.values()] == [0] * 5

    # An independent reader agrees on what was written.
    r = GGUFReader(path)
    assert [t.name for t in r.tensors] == list("abcde")
    assert [int(t.tensor_type) for t in r.tensors] == [0, 1, 8, 2, 30]
    assert r.fields["u64"].contents() == 2**64 - 1 and r.fields["u64"].types == [V.UINT64]
    assert r.fields["tokenizer.ggml.tokens"].contents() == metadata["tokenizer.ggml.tokens"]
    for t in r.tensors:
        assert bytes(t.data.tobytes()) == f.raw(t.name).tobytes()


def test_copy_real_file_metadata_keeps_types(tmp_path, smollm2_path):
    src = GGUFFile(smollm2_path)
    names = ["token_embd.weight", "blk.0.attn_norm.weight", "blk.0.ffn_down.weight"]
    out = tmp_path / "copy.gguf"
    write_gguf(out, src.metadata["general.architecture"], src.metadata, src.metadata_types,
               [(n, src.raw(n), src.tensors[n].qtype, src.tensors[n].shape) for n in names],
               array_types=src.array_types)
    dst = GGUFFile(out)
    assert dst.metadata == src.metadata
    assert dst.metadata_types == src.metadata_types and dst.array_types == src.array_types
    for n in names:
        assert dst.raw(n).tobytes() == src.raw(n).tobytes()
    r = GGUFReader(out)  # the token list survives as an array of strings for gguf-py too
    assert r.fields["tokenizer.ggml.tokens"].types == [V.ARRAY, V.STRING]


def test_real_model_against_gguf_reader(smollm2_path):
    f = GGUFFile(smollm2_path)
    r = GGUFReader(smollm2_path)
    assert len(f.tensors) == len(r.tensors) == 272
    assert f.data_offset == r.data_offset
    for t in r.tensors:
        ti = f.tensors[t.name]
        assert ti.qtype.type_id == int(t.tensor_type)
        assert ti.ne == tuple(int(d) for d in t.shape)
        assert ti.offset == int(t.data_offset)  # gguf-py reports absolute offsets
        assert ti.nbytes == int(t.n_bytes)
    counts = {}
    for ti in f.tensors.values():
        counts[ti.qtype.name] = counts.get(ti.qtype.name, 0) + 1
    assert counts == {"q4_1": 210, "f32": 61, "q8_0": 1}
    assert set(f.metadata) == set(r.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    for key in ["llama.block_count", "llama.embedding_length", "tokenizer.ggml.model", "llama.rope.freq_base"]:
        assert f.metadata[key] == pytest.approx(r.fields[key].contents())
    assert f.metadata["tokenizer.ggml.tokens"] == r.fields["tokenizer.ggml.tokens"].contents()
    assert f.raw("token_embd.weight").shape == (49152, 576 // 32 * 34)
    check_raw_is_a_view_of_the_file(f, "token_embd.weight")


def check_raw_is_a_view_of_the_file(f: GGUFFile, name: str):
    """raw() is a read-only view into the memory map at the tensor's offset, not a copy: the
    bytes of a 49152 x 612 embedding are not read until used."""
    emb = f.raw(name)
    ti = f.tensors[name]
    whole = np.frombuffer(f._mm, dtype=np.uint8)
    assert np.shares_memory(emb, whole), f"{name}: raw() returned a copy, not a view of the file"
    assert emb.__array_interface__["data"][0] - whole.__array_interface__["data"][0] == ti.offset
    assert not emb.flags.writeable
    with open(f.path, "rb") as fh:
        fh.seek(ti.offset)
        head = fh.read(4096)
    assert emb.reshape(-1)[:4096].tobytes() == head


# --- each validation rule ------------------------------------------------------------------

def test_bad_magic(tmp_path):
    b = small_gguf()
    b.buf[0:4] = b"GGML"
    expect_error(write(tmp_path, b), offset=0, contains=["b'GGML'", "b'GGUF'"])


def test_short_file(tmp_path):
    expect_error(write(tmp_path, b"GGUF\x03\x00"), offset=0, contains=["6 bytes"])
    expect_error(write(tmp_path, b"", "empty.gguf"), offset=0, contains=["0 bytes"])


@pytest.mark.parametrize("version", [1, 4, 0x03000000])
def test_bad_version(tmp_path, version):
    e = expect_error(write(tmp_path, build_gguf(version=version)), offset=4, contains=[f"version {version}", "(2, 3)"])
    if version == 0x03000000:
        assert "big-endian" in e.hint


def test_version_2_accepted(tmp_path):
    assert GGUFFile(write(tmp_path, build_gguf(version=2))).version == 2


@pytest.mark.parametrize("field", ["n_tensors", "n_kv"])
def test_implausible_counts(tmp_path, field):
    b = build_gguf(**{field: 2**60})
    expect_error(write(tmp_path, b), offset=8, contains=[str(2**60), "bytes follow the header"])


def test_string_length_past_end(tmp_path):
    b = build_gguf([("general.name", V.STRING, "x")])
    off = b.at["kv:general.name:value"]
    struct.pack_into("<Q", b.buf, off, 2**60)
    expect_error(write(tmp_path, b), offset=off + 8, contains=["'general.name'", str(2**60), "truncated"])


def test_key_length_past_end(tmp_path):
    b = build_gguf([("general.name", V.STRING, "x")])
    struct.pack_into("<Q", b.buf, b.at["kv:general.name"], 1000)
    expect_error(write(tmp_path, b), offset=b.at["kv:general.name"] + 8, contains=["metadata entry 0", "1000 bytes"])


def test_array_count_past_end(tmp_path):
    b = build_gguf([("tokenizer.ggml.scores", V.ARRAY, (V.FLOAT32, [1.0, 2.0]))])
    off = b.at["kv:tokenizer.ggml.scores:value"] + 4
    struct.pack_into("<Q", b.buf, off, 2**60)
    expect_error(write(tmp_path, b), offset=off, contains=["'tokenizer.ggml.scores'", f"array of {2**60} FLOAT32"])


def test_unknown_value_type(tmp_path):
    b = build_gguf([("general.name", V.STRING, "x")])
    off = b.at["kv:general.name:type"]
    struct.pack_into("<I", b.buf, off, 13)
    expect_error(write(tmp_path, b), offset=off, contains=["'general.name'", "unknown value type 13", "FLOAT64=12"])


def test_unknown_array_element_type(tmp_path):
    b = build_gguf([("a", V.ARRAY, (V.UINT8, [1]))])
    off = b.at["kv:a:value"]
    struct.pack_into("<I", b.buf, off, 99)
    expect_error(write(tmp_path, b), offset=off, contains=["'a'", "array element type 99"])


def test_nested_array(tmp_path):
    b = build_gguf([("a", V.ARRAY, (V.UINT8, [1]))])
    off = b.at["kv:a:value"]
    struct.pack_into("<I", b.buf, off, V.ARRAY)
    expect_error(write(tmp_path, b), offset=off, contains=["'a'", "arrays of arrays"])


def test_duplicate_key(tmp_path):
    b = build_gguf([("k", V.UINT8, 1), ("k", V.UINT8, 2)])
    expect_error(write(tmp_path, b), offset=b.at["kv:k"], contains=["metadata key 'k'", "duplicate"])


def test_bad_bool_and_bad_utf8(tmp_path):
    b = build_gguf([("flag", V.BOOL, 2)])
    expect_error(write(tmp_path, b), offset=b.at["kv:flag:value"], contains=["'flag'", "bool value 2"])
    b = build_gguf([("name", V.STRING, b"ab\xff")])
    expect_error(write(tmp_path, b, "u.gguf"), offset=b.at["kv:name:value"], contains=["'name'", "UTF-8"])


@pytest.mark.parametrize("alignment", [0, 48])
def test_alignment_not_power_of_two(tmp_path, alignment):
    b = build_gguf([("general.alignment", V.UINT32, alignment)])
    expect_error(write(tmp_path, b), offset=b.at["kv:general.alignment"], contains=[f"alignment {alignment}"])


def test_alignment_wrong_type(tmp_path):
    b = build_gguf([("general.alignment", V.UINT64, 32)])
    expect_error(write(tmp_path, b), offset=b.at["kv:general.alignment"], contains=["UINT64", "UINT32"])


def test_custom_alignment_honoured(tmp_path):
    data = np.ones(4, "<f4").tobytes()
    b = build_gguf([("general.alignment", V.UINT32, 256)], [("x", (4,), 0, 256, data)], alignment=256)
    f = GGUFFile(write(tmp_path, b))
    assert f.alignment == 256 and f.data_offset == 256 and f.tensors["x"].offset == 512
    np.testing.assert_array_equal(f.dequantize("x"), np.ones(4, np.float32))


def test_unaligned_tensor_offset(tmp_path):
    data = np.ones(8, "<f4").tobytes()
    b = build_gguf([], [("x", (8,), 0, 4, data)])
    expect_error(write(tmp_path, b), tensor="x", offset=b.at["ti:x"], contains=["data offset 4", "alignment 32"])


def test_tensor_data_past_end(tmp_path):
    b = small_gguf()
    end = len(b.buf)
    p = write(tmp_path, b.buf[:end - 1])
    expect_error(p, tensor="norm.weight", offset=b.at["ti:norm.weight"],
                 contains=[f"ends at {end}", f"({end - 1} bytes)"])


def test_tensor_offset_huge(tmp_path):
    b = small_gguf()
    struct.pack_into("<Q", b.buf, b.at["ti:w.weight:offset"], 2**60)
    expect_error(write(tmp_path, b), tensor="w.weight", offset=b.at["ti:w.weight"], contains=["past the end"])


def test_row_not_multiple_of_block(tmp_path):
    b = build_gguf([], [("w", (48, 1), 2, 0, bytes(64))])
    expect_error(write(tmp_path, b), tensor="w", offset=b.at["ti:w"], contains=["ne[0] = 48", "q4_0 block size 32"])


def test_unknown_tensor_type(tmp_path):
    b = build_gguf([], [("w", (32,), 99, 0, bytes(64))])
    e = expect_error(write(tmp_path, b), tensor="w", offset=b.at["ti:w:type"], contains=["type id 99", "q4_0=2"])
    assert not isinstance(e, UnsupportedError)


def test_ggml_type_refinfer_lacks(tmp_path):
    missing = next(int(t) for t in GGMLQuantizationType if int(t) not in TYPES_BY_ID)
    b = build_gguf([], [("w", (256,), missing, 0, bytes(512))])
    e = expect_error(write(tmp_path, b), tensor="w", offset=b.at["ti:w:type"], cls=UnsupportedTensorTypeError,
                     contains=[f"type id {missing}", GGMLQuantizationType(missing).name, "f32=0"])
    assert isinstance(e, UnsupportedError) and isinstance(e, FormatError)


def test_duplicate_tensor_name(tmp_path):
    d = np.ones(8, "<f4").tobytes()
    b = build_gguf([], [("x", (8,), 0, 0, d), ("x", (8,), 0, 32, d)])  # b.at["ti:x"]: the second one
    expect_error(write(tmp_path, b), tensor="x", offset=b.at["ti:x"], contains=["duplicate"])


@pytest.mark.parametrize("n_dims", [0, 5])
def test_bad_n_dims(tmp_path, n_dims):
    b = build_gguf([], [("x", (8,), 0, 0, bytes(32))])
    struct.pack_into("<I", b.buf, b.at["ti:x:n_dims"], n_dims)
    expect_error(write(tmp_path, b), tensor="x", offset=b.at["ti:x:n_dims"], contains=[f"n_dims is {n_dims}"])


def test_zero_dim(tmp_path):
    b = build_gguf([], [("x", (8, 0), 0, 0, bytes(32))])
    expect_error(write(tmp_path, b), tensor="x", offset=b.at["ti:x:ne1"], contains=["ne[1] is 0"])


def test_overlapping_tensors(tmp_path):
    d = np.ones(16, "<f4").tobytes()
    b = build_gguf([], [("x", (16,), 0, 0, d), ("y", (16,), 0, 32, d)])
    expect_error(write(tmp_path, b), tensor="y", contains=["overlaps tensor 'x'"])


def test_long_tensor_name(tmp_path):
    name = "n" * 64
    b = build_gguf([], [(name, (8,), 0, 0, bytes(32))])
    expect_error(write(tmp_path, b), tensor=name, offset=b.at[f"ti:{name}"], contains=["GGML_MAX_NAME"])


def test_unknown_tensor_name_lookup(tmp_path):
    f = GGUFFile(write(tmp_path, small_gguf()))
    with pytest.raises(FormatError, match="'nope'"):
        f.raw("nope")


# --- fuzzing: success or a RefinferError, nothing else ---------------------------------------

VALID = bytes(small_gguf().buf)
FIELDS = small_gguf().fields
FUZZ = settings(max_examples=300, deadline=timedelta(seconds=5), derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def _read_gguf(path):
    f = GGUFFile(path)
    for name in f.tensors:
        f.raw(name)
        f.dequantize(name)


def parse_bounded(data: bytes):
    """Parse and fully read a candidate file: success or RefinferError, bounded allocation."""
    read_bounded(data, ".gguf", _read_gguf)


@FUZZ
@given(st.integers(0, len(VALID)))
def test_fuzz_truncate(n):
    parse_bounded(VALID[:n])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_overwrite_bytes(edits):
    data = bytearray(VALID)
    for pos, val in edits:
        data[pos] = val
    parse_bounded(bytes(data))


@FUZZ
@given(st.sampled_from(FIELDS),
       st.sampled_from([2**60, 2**63, 2**64 - 1, 2**32 - 1, 2**31, 0, 1, 7, 33, 255]) | st.integers(0, 2**64 - 1))
def test_fuzz_integer_fields(field, value):
    offset, fmt = field
    data = bytearray(VALID)
    struct.pack_into(fmt, data, offset, value % (1 << (8 * struct.calcsize(fmt))))
    parse_bounded(bytes(data))


# --- writer type inference and refusals ----------------------------------------------------

def test_writer_infers_types(tmp_path):
    path = tmp_path / "w.gguf"
    write_gguf(path, "llama", {"n": 3, "big": 2**40, "x": 0.5, "s": "a", "ints": [1, 2], "mixed": [0, 0.5],
                               "flags": [True]}, None, [("t", np.zeros(32, np.float32), "f32", (32,))])
    r = GGUFReader(path)  # the types as an independent reader sees them
    assert r.fields["n"].types == [V.INT32] and r.fields["big"].types == [V.INT64]
    assert r.fields["x"].types == [V.FLOAT32] and r.fields["s"].types == [V.STRING]
    assert r.fields["ints"].types == [V.ARRAY, V.INT32] and r.fields["mixed"].types == [V.ARRAY, V.FLOAT32]
    assert r.fields["flags"].types == [V.ARRAY, V.BOOL]
    assert r.fields["general.architecture"].contents() == "llama"


@pytest.mark.parametrize("metadata,types,match", [
    ({"k": 300}, {"k": V.UINT8}, "does not fit UINT8"),
    ({"k": -1}, {"k": V.UINT32}, "does not fit UINT32"),
    ({"k": 1.5}, {"k": V.INT32}, "does not fit INT32"),
    ({"k": [1, "a"]}, None, "mixes element types"),
    ({"k": [[1]]}, None, "arrays of arrays"),
    ({"general.alignment": 48}, {"general.alignment": V.UINT32}, "power of two"),
])
def test_writer_refuses_bad_metadata(tmp_path, metadata, types, match):
    with pytest.raises(FormatError, match=match):
        write_gguf(tmp_path / "w.gguf", "llama", metadata, types, [])


def test_writer_refuses_bad_tensor(tmp_path):
    from refinfer.errors import ShapeError
    with pytest.raises(ShapeError, match="'t'.*q4_0"):
        write_gguf(tmp_path / "w.gguf", "llama", {}, None, [("t", np.zeros(48, np.float32), "q4_0", (48,))])
    with pytest.raises(ShapeError, match="'t': 10 bytes given"):
        write_gguf(tmp_path / "w.gguf", "llama", {}, None, [("t", np.zeros(10, np.uint8), "q4_0", (32,))])
