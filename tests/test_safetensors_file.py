"""Safetensors checkpoints: files written by the `safetensors` package (an independent writer),
sharded checkpoints with an index, and corrupt, truncated and inconsistent variants."""

from __future__ import annotations

import json
import struct
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ci_skips import oracle_import  # noqa: E402

safetensors = oracle_import("safetensors")   # the independent writer
from safetensors import TensorSpec, serialize  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from fuzzing import read_bounded
from refinfer.errors import FormatError, UnsupportedError  # noqa: E402
from refinfer.safetensors_file import SafetensorsCheckpoint  # noqa: E402


def serialize_arrays(arrays: dict) -> bytes:
    """The safetensors library's serializer; bf16 passed as uint16 bit patterns under a
    ("bfloat16", bits) tuple because NumPy has no bfloat16."""
    specs, keep = {}, []
    for name, a in arrays.items():
        dtype = "bfloat16" if isinstance(a, tuple) else None
        a = np.ascontiguousarray(a[1] if isinstance(a, tuple) else a)
        keep.append(a)
        specs[name] = TensorSpec(dtype=dtype or a.dtype.name, shape=list(a.shape), data_ptr=a.ctypes.data,
                                 data_len=a.nbytes)
    return bytes(serialize(specs))


def header_of(data: bytes):
    n = struct.unpack_from("<Q", data)[0]
    return n, json.loads(data[8:8 + n])


def with_header(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def rng_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {"model.embed_tokens.weight": rng.standard_normal((8, 4)).astype(np.float32),
            "model.norm.weight": rng.standard_normal(4).astype(np.float16),
            "lm_head.weight": rng.standard_normal((8, 4)).astype(np.float32)}


def check_error(e: Exception, *, file, tensor, offset, contains=()):
    """e is a FormatError that reports exactly this file, tensor and byte offset (None: the
    error must not report one), as attributes and in its message, and says each of contains."""
    msg = str(e)
    assert isinstance(e, FormatError), f"{type(e).__name__}: {msg}"
    assert (str(e.file), e.tensor, e.offset) == (str(file), tensor, offset), msg
    where = [f"file {str(file)!r}"] + [f"tensor {tensor!r}"] * (tensor is not None) + \
        [f"offset {offset}"] * (offset is not None)
    assert msg.startswith(", ".join(where) + ": "), msg
    for c in contains:
        assert c in msg, msg


def expect_error(path, *, tensor, offset, contains=(), file=None):
    with pytest.raises(FormatError) as ei:
        SafetensorsCheckpoint(path)
    check_error(ei.value, file=file or path, tensor=tensor, offset=offset, contains=contains)
    return ei.value


# --- valid checkpoints ---------------------------------------------------------------------

def test_single_file_matches_library(tmp_path):
    arrays = rng_arrays()
    p = tmp_path / "model.safetensors"
    save_file(arrays, str(p))
    ref = load_file(str(p))
    for where in (p, tmp_path):
        ck = SafetensorsCheckpoint(where)
        assert set(ck.tensors) == set(arrays)
        assert ck.config is None
        for name, a in ref.items():
            info = ck.tensors[name]
            assert info.shape == a.shape and info.file == str(p)
            assert info.dtype == {"float32": "F32", "float16": "F16"}[a.dtype.name]
            raw = ck.raw(name)
            assert raw.dtype == a.dtype and not raw.flags.writeable
            np.testing.assert_array_equal(raw, a)
            got = ck.get(name)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, a.astype(np.float32))


def test_bf16(tmp_path):
    # bf16 bits of 1.0, 2.0, -0.5 and the largest finite bf16; get() must widen them exactly.
    bits = np.array([[0x3F80, 0x4000], [0xBF00, 0x7F7F]], dtype="<u2")
    p = tmp_path / "m.safetensors"
    p.write_bytes(serialize_arrays({"w": ("bfloat16", bits)}))
    ck = SafetensorsCheckpoint(p)
    assert ck.tensors["w"].dtype == "BF16"
    assert ck.raw("w").dtype == np.uint16
    np.testing.assert_array_equal(ck.raw("w"), bits)
    expected = np.array([[1.0, 2.0], [-0.5, 3.3895313892515355e38]], dtype=np.float32)
    np.testing.assert_array_equal(ck.get("w"), expected)


def test_sharded_with_index_and_config(tmp_path):
    arrays = rng_arrays(1)
    names = list(arrays)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    weight_map = {}
    for fname, members in shards.items():
        save_file({n: arrays[n] for n in members}, str(tmp_path / fname))
        weight_map.update({n: fname for n in members})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(a.nbytes for a in arrays.values())}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 4}))
    for where in (tmp_path, tmp_path / "model.safetensors.index.json"):
        ck = SafetensorsCheckpoint(where)
        assert ck.config == {"architectures": ["LlamaForCausalLM"], "hidden_size": 4}
        assert set(ck.tensors) == set(names)
        assert ck.tensors[names[2]].file == str(tmp_path / "model-00002-of-00002.safetensors")
        for n in names:
            np.testing.assert_array_equal(ck.get(n), arrays[n].astype(np.float32))


def test_empty_tensor_and_metadata(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"e": np.zeros((0, 3), np.float32), "x": np.ones(2, np.float32)}, str(p), metadata={"format": "pt"})
    ck = SafetensorsCheckpoint(p)
    assert ck.get("e").shape == (0, 3)
    assert ck.metadata == {"format": "pt"}


def test_unsupported_dtype_on_access(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"ids": np.arange(3, dtype=np.uint64), "x": np.ones(2, np.float32)}, str(p))
    ck = SafetensorsCheckpoint(p)  # listing works; reading the uint64 tensor does not
    assert ck.tensors["ids"].dtype == "U64"
    with pytest.raises(UnsupportedError, match="tensor 'ids': dtype U64 is not supported") as ei:
        ck.get("ids")
    assert str(p) in str(ei.value)


# --- corrupt, truncated, inconsistent ------------------------------------------------------

@pytest.fixture
def valid_bytes():
    return serialize_arrays({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)})


def test_truncated_data(tmp_path, valid_bytes):
    p = tmp_path / "m.safetensors"
    p.write_bytes(valid_bytes[:-1])
    n, _ = header_of(valid_bytes)
    expect_error(p, tensor="b", offset=8 + n + 24, contains=["[24, 32]", "data section of 31 bytes"])


def test_truncated_header(tmp_path, valid_bytes):
    p = tmp_path / "m.safetensors"
    p.write_bytes(valid_bytes[:20])
    n, _ = header_of(valid_bytes)
    expect_error(p, tensor=None, offset=0, contains=[f"header length {n}", "20 bytes"])
    p.write_bytes(valid_bytes[:5])
    expect_error(p, tensor=None, offset=0, contains=["5 bytes"])


def test_huge_header_length(tmp_path, valid_bytes):
    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", 2**60) + valid_bytes[8:])
    expect_error(p, tensor=None, offset=0, contains=[f"header length {2**60}"])


def test_gguf_given_as_safetensors(tmp_path):
    p = tmp_path / "m.safetensors"
    p.write_bytes(b"GGUF" + bytes(60))
    e = expect_error(p, tensor=None, offset=0)
    assert "GGUF" in e.hint


def test_bad_json(tmp_path, valid_bytes):
    n, _ = header_of(valid_bytes)
    bad = bytearray(valid_bytes)
    bad[8 + 5] = ord("#")
    p = tmp_path / "m.safetensors"
    p.write_bytes(bytes(bad))
    expect_error(p, tensor=None, offset=13, contains=["not valid JSON"])
    p.write_bytes(with_header([1, 2], b""))
    expect_error(p, tensor=None, offset=8, contains=["JSON list"])
    p.write_bytes(struct.pack("<Q", 6000) + b"[" * 6000)
    expect_error(p, tensor=None, offset=8, contains=["RecursionError"])


def test_duplicate_tensor_entry(tmp_path):
    h = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", len(h)) + h + bytes(4))
    expect_error(p, tensor=None, offset=8, contains=["'a' twice"])


def test_offsets_outside_data(tmp_path):
    h = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 2**62]}}
    p = tmp_path / "m.safetensors"
    data = with_header(h, bytes(8))
    p.write_bytes(data)
    # the offset is where the tensor would start: the data section's first byte
    expect_error(p, tensor="a", offset=len(data) - 8, contains=[f"[0, {2**62}]", "data section of 8 bytes"])


def test_size_inconsistent_with_shape(tmp_path):
    h = {"a": {"dtype": "F16", "shape": [3], "data_offsets": [0, 8]}}
    p = tmp_path / "m.safetensors"
    data = with_header(h, bytes(8))
    p.write_bytes(data)
    expect_error(p, tensor="a", offset=len(data) - 8, contains=["hold 8 bytes", "F16 x (3,) needs 6"])


def test_unknown_dtype_and_bad_shape(tmp_path):
    p = tmp_path / "m.safetensors"
    p.write_bytes(with_header({"a": {"dtype": "F17", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)))
    # offset 9: the entry's key '"a"' is at header byte 1
    expect_error(p, tensor="a", offset=9, contains=["'F17'", "BF16"])
    p.write_bytes(with_header({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)))
    expect_error(p, tensor="a", offset=9, contains=["shape [-1]"])
    p.write_bytes(with_header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, bytes(4)))
    expect_error(p, tensor="a", offset=9, contains=["data_offsets [0]"])


def test_hole_and_overlap(tmp_path):
    p = tmp_path / "m.safetensors"
    h = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1],
                                                                            "data_offsets": [8, 12]}}
    data = with_header(h, bytes(12))
    p.write_bytes(data)
    start = len(data) - 12
    expect_error(p, tensor="b", offset=start + 4, contains=["bytes 4..8", "belong to no tensor"])
    h["b"]["data_offsets"] = [2, 6]
    data = with_header(h, bytes(6))
    p.write_bytes(data)
    expect_error(p, tensor="b", offset=len(data) - 6 + 2, contains=["overlap"])


def test_trailing_bytes(tmp_path, valid_bytes):
    p = tmp_path / "m.safetensors"
    p.write_bytes(valid_bytes + b"xx")
    expect_error(p, tensor=None, offset=len(valid_bytes), contains=["cover 32 bytes", "has 34"])


def make_sharded(tmp_path, weight_map_override=None):
    arrays = rng_arrays(2)
    names = list(arrays)
    save_file({names[0]: arrays[names[0]]}, str(tmp_path / "s1.safetensors"))
    save_file({n: arrays[n] for n in names[1:]}, str(tmp_path / "s2.safetensors"))
    wm = {names[0]: "s1.safetensors", names[1]: "s2.safetensors", names[2]: "s2.safetensors"}
    wm.update(weight_map_override or {})
    idx = tmp_path / "model.safetensors.index.json"
    idx.write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return idx, names


def test_index_missing_shard(tmp_path):
    idx, names = make_sharded(tmp_path, {"lm_head.weight": "s3.safetensors"})
    expect_error(tmp_path, file=idx, tensor="lm_head.weight", offset=None, contains=["'s3.safetensors'", "does not exist"])


def test_index_wrong_shard(tmp_path):
    idx, names = make_sharded(tmp_path, {"lm_head.weight": "s1.safetensors"})
    expect_error(tmp_path, file=idx, tensor="lm_head.weight", offset=None,
                 contains=["'s1.safetensors'", "in 's2.safetensors'"])


def test_index_path_outside_directory(tmp_path):
    idx, names = make_sharded(tmp_path, {"lm_head.weight": "../s2.safetensors"})
    expect_error(tmp_path, file=idx, tensor="lm_head.weight", offset=None, contains=["expected a file name"])


def test_index_unlisted_tensor(tmp_path):
    idx, names = make_sharded(tmp_path)
    data = json.loads(idx.read_text())
    del data["weight_map"]["lm_head.weight"]
    idx.write_text(json.dumps(data))
    expect_error(tmp_path, file=idx, tensor="lm_head.weight", offset=None, contains=["not in the index"])


def test_index_corrupt(tmp_path):
    idx, _ = make_sharded(tmp_path)
    idx.write_text('{"weight_map": ')
    expect_error(tmp_path, file=idx, tensor=None, offset=len('{"weight_map": '), contains=["not valid JSON"])
    idx.write_text('{"metadata": {}}')
    expect_error(tmp_path, file=idx, tensor=None, offset=0, contains=["weight_map"])


def test_corrupt_shard_named(tmp_path):
    idx, _ = make_sharded(tmp_path)
    shard = tmp_path / "s2.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-3])
    n, header = header_of(data)
    # the tensor that ended the data section now runs past it; the offset is where it starts
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    expect_error(tmp_path, file=shard, tensor=last, offset=8 + n + header[last]["data_offsets"][0],
                 contains=["do not lie within the data section"])


def test_directory_without_weights(tmp_path):
    expect_error(tmp_path, tensor=None, offset=None, contains=["found 0 .safetensors files"])


def test_bad_config(tmp_path):
    save_file({"x": np.ones(2, np.float32)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{nope")
    expect_error(tmp_path, file=tmp_path / "config.json", tensor=None, offset=1, contains=["config.json"])


# --- fuzzing -------------------------------------------------------------------------------

VALID = serialize_arrays({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16),
                          "c": ("bfloat16", np.arange(3, dtype="<u2"))})
FUZZ = settings(max_examples=200, deadline=timedelta(seconds=5), derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def _read_checkpoint(path):
    ck = SafetensorsCheckpoint(path)
    for name in ck.tensors:
        ck.get(name)


def parse_bounded(data: bytes):
    read_bounded(data, ".safetensors", _read_checkpoint)


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
@given(st.sampled_from([2**60, 2**64 - 1, 0, 1, 7]) | st.integers(0, 2**64 - 1))
def test_fuzz_header_length(n):
    parse_bounded(struct.pack("<Q", n) + VALID[8:])
