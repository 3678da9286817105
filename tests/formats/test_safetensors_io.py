"""Tests of the safetensors file layer, against real files and the reference implementation."""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressor.errors import InputError, OutputError
from compressor.formats import dtypes
from compressor.formats import safetensors_io as sio

ALL_DTYPES = dtypes.SUPPORTED_DTYPES


def random_tensor(dtype: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor of `dtype` whose bits are random (NaNs and all), or 0/1 for BOOL."""
    rng = np.random.default_rng(seed)
    storage = dtypes.storage_numpy_dtype(dtype)
    if dtype == "BOOL":
        return dtypes.to_torch(rng.integers(0, 2, size=shape).astype(np.bool_), dtype)
    raw = rng.integers(0, 256, size=(*shape, storage.itemsize), dtype=np.uint8)
    return dtypes.to_torch(raw.view(storage).reshape(shape), dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and np.array_equal(dtypes.to_raw(a), dtypes.to_raw(b))
    )


def header_file(path: Path, header: object, data: bytes = b"", *, pad: bool = True) -> Path:
    """Write a file with `header` (JSON-encoded unless already bytes) and `data` after it."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


# --------------------------------------------------------------------------------------------
# dtypes


def test_dtype_table() -> None:
    assert dtypes.itemsize("BF16") == 2
    assert dtypes.storage_numpy_dtype("BF16") == np.uint16
    assert dtypes.storage_numpy_dtype("F8_E4M3") == np.uint8
    assert dtypes.storage_numpy_dtype("BOOL") == np.bool_
    assert dtypes.storage_numpy_dtype("F32") == np.float32
    assert dtypes.torch_dtype("F8_E5M2") == torch.float8_e5m2
    assert dtypes.is_float("BF16") and dtypes.is_float("F8_E4M3") and not dtypes.is_float("I8")
    for name in ALL_DTYPES:
        assert dtypes.safetensors_dtype_of(dtypes.torch_dtype(name)) == name
        assert dtypes.itemsize(name) == dtypes.storage_numpy_dtype(name).itemsize
        assert dtypes.torch_dtype(name).itemsize == dtypes.itemsize(name)


@pytest.mark.parametrize("bad", ["F4", "f32", "C64", "", "F8_E4M3FNUZ"])
def test_unknown_dtype_is_input_error(bad: str) -> None:
    with pytest.raises(InputError, match=repr(bad)):
        dtypes.itemsize(bad)
    with pytest.raises(InputError):
        dtypes.torch_dtype(bad)
    with pytest.raises(InputError, match="float8_e4m3fnuz"):
        dtypes.safetensors_dtype_of(torch.float8_e4m3fnuz)


def test_to_torch_is_zero_copy_and_handles_read_only_arrays() -> None:
    raw = np.array([[0x3F80, 0xC000]], dtype=np.uint16)  # bf16 1.0, -2.0
    t = dtypes.to_torch(raw, "BF16")
    assert t.dtype == torch.bfloat16 and t.tolist() == [[1.0, -2.0]]
    assert t.data_ptr() == raw.ctypes.data  # a view, not a copy

    raw.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when handed a read-only array
        t = dtypes.to_torch(raw, "BF16")
    assert t.tolist() == [[1.0, -2.0]]
    t.add_(1)  # writes to the private copy only
    assert raw.tolist() == [[0x3F80, 0xC000]]

    reversed_ = dtypes.to_torch(np.arange(4, dtype=np.int32)[::-1], "I32")
    assert reversed_.tolist() == [3, 2, 1, 0]
    with pytest.raises(ValueError, match="raw BF16 bits"):
        dtypes.to_torch(np.zeros(2, np.float32), "BF16")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_to_raw_inverts_to_torch(dtype: str) -> None:
    t = random_tensor(dtype, (3, 4), seed=1)
    raw = dtypes.to_raw(t)
    assert raw.dtype == dtypes.storage_numpy_dtype(dtype) and raw.flags.c_contiguous
    assert same_bits(dtypes.to_torch(raw, dtype), t)
    assert same_bits(dtypes.to_torch(dtypes.to_raw(t.T), dtype), t.T.contiguous())


# --------------------------------------------------------------------------------------------
# Round trips against the reference implementation


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_reference_file_reads_back_bit_exact(tmp_path: Path, dtype: str) -> None:
    tensors = {"w": random_tensor(dtype, (5, 3)), "s": random_tensor(dtype, (), seed=2)}
    path = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})

    header = sio.read_header(path)
    assert header.metadata == {"format": "pt"}
    assert header.file_size == path.stat().st_size
    for name, expected in tensors.items():
        info = header.tensors[name]
        assert (info.dtype, info.shape) == (dtype, tuple(expected.shape))
        assert same_bits(dtypes.to_torch(sio.read_tensor(path, info), dtype), expected)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_written_file_matches_reference_bytes(tmp_path: Path, dtype: str) -> None:
    tensors = {"w": random_tensor(dtype, (4, 6)), "b": random_tensor(dtype, (6,), seed=3)}
    ours, ref = tmp_path / "ours.safetensors", tmp_path / "ref.safetensors"
    sio.write_file(ours, tensors, metadata={"format": "pt"})
    safetensors.torch.save_file(tensors, ref, metadata={"format": "pt"})

    assert ours.read_bytes() == ref.read_bytes()
    loaded = safetensors.torch.load_file(ours)
    assert loaded.keys() == tensors.keys()
    assert all(same_bits(loaded[k], v) for k, v in tensors.items())


def test_mixed_file_matches_reference_bytes(tmp_path: Path) -> None:
    # Every dtype, several names per dtype, a 0-d and a zero-size tensor, a non-ASCII name:
    # exercises the reference's (alignment, name) ordering and its JSON encoding.
    tensors: dict[str, torch.Tensor] = {}
    for i, dtype in enumerate(ALL_DTYPES):
        tensors[f"layer.{i}.b"] = random_tensor(dtype, (3,), seed=i)
        tensors[f"layer.{i}.a"] = random_tensor(dtype, (2, 2), seed=100 + i)
    tensors["scalar"] = torch.tensor(7, dtype=torch.int64)
    tensors["empty"] = torch.zeros((0, 4), dtype=torch.float16)
    tensors['poids.é"\\\n'] = torch.ones(2, dtype=torch.bfloat16)
    ours, ref = tmp_path / "ours.safetensors", tmp_path / "ref.safetensors"
    sio.write_file(ours, tensors)
    safetensors.torch.save_file(tensors, ref)
    assert ours.read_bytes() == ref.read_bytes()

    header = sio.read_header(ours)
    assert list(header.tensors) == [
        name
        for name, _, _ in sio.canonical_order(
            [(k, i.dtype, i.shape) for k, i in header.tensors.items()]
        )
    ]
    with safetensors.safe_open(ours, framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        assert all(same_bits(f.get_tensor(k), v) for k, v in tensors.items())


def test_write_file_accepts_numpy_arrays(tmp_path: Path) -> None:
    arrays = {
        "f": np.arange(6, dtype=np.float32).reshape(2, 3),
        "u": np.arange(4, dtype=">u2"),  # big-endian input is stored little-endian
        "m": np.array([True, False]),
    }
    path = tmp_path / "np.safetensors"
    sio.write_file(path, arrays, metadata={"a": "1", "b": "2"})
    with safetensors.safe_open(path, framework="np") as f:
        assert f.metadata() == {"a": "1", "b": "2"}
        for name, arr in arrays.items():
            np.testing.assert_array_equal(f.get_tensor(name), arr)
    assert sio.read_header(path).tensors["u"].dtype == "U16"


def test_golden_bytes(tmp_path: Path) -> None:
    # Worked out by hand from the format spec: BF16 (2-byte alignment) is laid out before I8
    # (1-byte), the JSON is compact with __metadata__ first, padded with spaces to a multiple
    # of 8; bf16 1.0 = 0x3F80 and -2.0 = 0xC000, little-endian; int8 -1 = 0xFF.
    header = (
        b'{"__metadata__":{"format":"pt"},'
        b'"w":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]},'
        b'"b":{"dtype":"I8","shape":[],"data_offsets":[4,5]}}'
    )
    # 32 + 54 + 51 bytes, then 7 spaces of padding: N = 144 = 18 * 8 = 0x90
    assert len(header) == 137
    expected = b"\x90\x00\x00\x00\x00\x00\x00\x00" + header + b" " * 7 + b"\x80\x3f\x00\xc0\xff"
    tensors = {
        "b": torch.tensor(-1, dtype=torch.int8),
        "w": torch.tensor([1.0, -2.0], dtype=torch.bfloat16),
    }
    path = tmp_path / "golden.safetensors"
    sio.write_file(path, tensors, metadata={"format": "pt"})
    assert path.read_bytes() == expected

    h = sio.read_header(path)
    assert h.header_len == 144 and h.data_start == 152 and h.file_size == 157
    assert h.tensors["w"] == sio.TensorInfo("w", "BF16", (2,), 152, 156)
    assert h.tensors["b"] == sio.TensorInfo("b", "I8", (), 156, 157)
    assert (h.tensors["w"].nbytes, h.tensors["w"].numel, h.tensors["b"].numel) == (4, 2, 1)


# --------------------------------------------------------------------------------------------
# Partial reads


@pytest.fixture
def bf16_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = {
        "w": random_tensor("BF16", (37, 11)),
        "v": random_tensor("BF16", (13,), seed=1),
        "s": random_tensor("BF16", (), seed=2),
        "z": random_tensor("BF16", (0, 5), seed=3),
        "x": random_tensor("F32", (4, 3, 2), seed=4),
    }
    path = tmp_path / "rows.safetensors"
    safetensors.torch.save_file(tensors, path)
    return path, tensors


@pytest.mark.parametrize("rows", [(0, 0), (0, 1), (3, 17), (36, 37), (0, 37), (5, 5), (1, 36)])
def test_read_rows_equals_slice(
    bf16_file: tuple[Path, dict[str, torch.Tensor]], rows: tuple[int, int]
) -> None:
    path, tensors = bf16_file
    info = sio.read_header(path).tensors["w"]
    got = sio.read_rows(path, info, *rows)
    assert got.dtype == np.uint16 and got.shape == (rows[1] - rows[0], 11)
    assert got.flags.writeable and got.flags.c_contiguous
    assert same_bits(dtypes.to_torch(got, "BF16"), tensors["w"][rows[0] : rows[1]])


def test_read_rows_of_1d_0d_3d_and_empty_tensors(
    bf16_file: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    path, tensors = bf16_file
    infos = sio.read_header(path).tensors
    v = sio.read_rows(path, infos["v"], 4, 9)
    assert same_bits(dtypes.to_torch(v, "BF16"), tensors["v"][4:9])
    s = sio.read_rows(path, infos["s"], 0, 1)
    assert s.shape == (1,) and same_bits(dtypes.to_torch(s, "BF16"), tensors["s"].reshape(1))
    x = sio.read_rows(path, infos["x"], 1, 3)
    assert same_bits(dtypes.to_torch(x, "F32"), tensors["x"][1:3])
    assert sio.read_rows(path, infos["z"], 0, 0).shape == (0, 5)
    assert sio.read_tensor(path, infos["z"]).shape == (0, 5)
    for bad in [(-1, 2), (3, 2), (0, 38)]:
        with pytest.raises(ValueError, match="out of range"):
            sio.read_rows(path, infos["w"], *bad)


def test_read_rows_reads_only_the_rows(
    bf16_file: tuple[Path, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = bf16_file
    info = sio.read_header(path).tensors["w"]
    requested: list[tuple[int, int]] = []
    real = sio._read_exact

    def spy(f, offset, buf):  # type: ignore[no-untyped-def]
        requested.append((offset, len(buf)))
        return real(f, offset, buf)

    monkeypatch.setattr(sio, "_read_exact", spy)
    sio.read_rows(path, info, 10, 12)
    assert requested == [(info.start + 10 * 22, 2 * 22)]


@pytest.mark.parametrize("block", [1, 7, 22, 10_000])
def test_iter_byte_blocks_concatenate_to_the_data(
    bf16_file: tuple[Path, dict[str, torch.Tensor]], block: int
) -> None:
    path, tensors = bf16_file
    infos = sio.read_header(path).tensors
    blocks = list(sio.iter_byte_blocks(path, infos["w"], block_bytes=block))
    assert all(len(b) == block for b in blocks[:-1]) and 0 < len(blocks[-1]) <= block
    assert all(b.readonly for b in blocks)
    assert b"".join(blocks) == dtypes.to_raw(tensors["w"]).tobytes()
    assert list(sio.iter_byte_blocks(path, infos["z"], block_bytes=block)) == []


def test_reads_of_a_file_truncated_after_its_header_was_read(
    bf16_file: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    path, _ = bf16_file
    info = sio.read_header(path).tensors["x"]  # laid out first (F32): truncation hits it
    os.truncate(path, info.start + 5)
    with pytest.raises(InputError, match="truncated") as e:
        sio.read_tensor(path, info)
    assert str(path) in str(e.value) and "'x'" in str(e.value)
    with pytest.raises(InputError, match="truncated"):
        list(sio.iter_byte_blocks(path, info, block_bytes=4))
    os.unlink(path)
    with pytest.raises(InputError, match=str(path)):
        sio.read_rows(path, info, 0, 1)


# --------------------------------------------------------------------------------------------
# Streaming writer


def test_writer_streams_row_blocks(tmp_path: Path) -> None:
    weight = random_tensor("BF16", (29, 16))
    scale = torch.rand(29, 1, dtype=torch.float32)
    flags = torch.tensor([True, False, True])
    path = tmp_path / "out" / "model.safetensors"
    path.parent.mkdir()
    entries = [("weight", "BF16", (29, 16)), ("none", "F32", (0,)), ("scale", "F32", (29, 1))]
    entries.append(("flags", "BOOL", (3,)))
    with sio.SafetensorsWriter(path, entries, metadata={"format": "pt"}) as w:
        raw = dtypes.to_raw(weight)
        for start in range(0, 29, 4):  # 8 blocks, the last one short
            w.write("weight", raw[start : start + 4])
            assert not path.exists()  # nothing at the target until close
        # "none" has zero bytes: it needs no write call
        w.write("scale", scale[:10])  # torch tensor block
        w.write("scale", dtypes.to_raw(scale[10:]).tobytes())  # bytes block
        w.write("flags", flags)
    assert sorted(os.listdir(path.parent)) == ["model.safetensors"]  # no temp file left

    loaded = safetensors.torch.load_file(path)
    assert same_bits(loaded["weight"], weight) and same_bits(loaded["scale"], scale)
    assert loaded["none"].shape == (0,) and loaded["flags"].tolist() == [True, False, True]
    header = sio.read_header(path)
    assert list(header.tensors) == ["weight", "none", "scale", "flags"]  # the given order
    assert header.tensors == w.tensors
    with safetensors.safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_writer_close_without_context_manager(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    w = sio.SafetensorsWriter(path, [("a", "I32", (2,))])
    w.write("a", np.array([1, 2], dtype=np.int32))
    w.close()
    w.close()  # idempotent
    assert safetensors.torch.load_file(path)["a"].tolist() == [1, 2]
    with pytest.raises(OutputError, match="already closed"):
        w.write("a", b"")


def _writer_misuse_cases() -> dict[str, tuple[list[sio.Entry], list[tuple[str, object]], str]]:
    two: list[sio.Entry] = [("a", "F32", (2,)), ("b", "I8", (3,))]
    f32 = np.zeros(2, np.float32)
    i8 = np.zeros(3, np.int8)
    return {
        "too many bytes": (two, [("a", f32), ("a", b"\0")], "declares 8"),
        "too few bytes at close": (two, [("a", f32), ("b", i8[:2])], "got 2 of its 3 bytes"),
        "tensor never written": (two, [("a", f32)], "never written"),
        "out of order": (two, [("b", i8), ("a", f32)], "header order"),
        "started before previous complete": (two, [("a", f32[:1]), ("b", i8)], "only 4"),
        "back to an earlier tensor": (two, [("a", f32), ("b", i8), ("a", b"")], "earlier"),
        "undeclared": (two, [("c", b"")], "not declared"),
        "wrong numpy dtype": (two, [("a", np.zeros(2, np.int32))], "numpy int32"),
        "wrong torch dtype": (two, [("a", torch.zeros(2, dtype=torch.float16))], "torch.float16"),
        "not bytes": (two, [("a", [0.0, 0.0])], "list"),
    }


@pytest.mark.parametrize("case", list(_writer_misuse_cases()))
def test_writer_errors_leave_no_file(tmp_path: Path, case: str) -> None:
    entries, writes, message = _writer_misuse_cases()[case]
    path = tmp_path / "bad.safetensors"
    with pytest.raises(OutputError, match=message) as e, sio.SafetensorsWriter(path, entries) as w:
        for name, data in writes:
            w.write(name, data)
    assert str(path) in str(e.value)
    assert os.listdir(tmp_path) == []


def test_writer_failure_keeps_existing_file_and_aborts_on_exception(tmp_path: Path) -> None:
    path = tmp_path / "keep.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), sio.SafetensorsWriter(path, [("a", "U8", (1,))]) as w:
        w.write("a", b"\x01")
        raise RuntimeError("stage crashed")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["keep.safetensors"]


@pytest.mark.parametrize(
    "entries",
    [
        [("a", "F32", (1,)), ("a", "F32", (1,))],
        [("", "F32", (1,))],
        [("__metadata__", "F32", (1,))],
        [("a", "F4", (2,))],
        [("a", "F32", (-1,))],
        [("a", "F32", (1.5,))],
    ],
)
def test_writer_rejects_bad_entries(tmp_path: Path, entries: list[sio.Entry]) -> None:
    with pytest.raises(OutputError):
        sio.SafetensorsWriter(tmp_path / "x.safetensors", entries)
    assert os.listdir(tmp_path) == []


def test_writer_reports_unwritable_destination(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="cannot create"):
        sio.SafetensorsWriter(tmp_path / "missing" / "x.safetensors", [])


# --------------------------------------------------------------------------------------------
# Malformed input


def _entry(dtype: str = "F32", shape: object = (2,), offsets: object = (0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}  # type: ignore[call-overload]


BAD_FILES: dict[str, tuple[object, bytes, str]] = {
    # name: (header (object, or raw bytes), data, expected message fragment)
    "header not JSON": (b"{not json", b"", "not valid JSON"),
    "header a JSON list": ([{"dtype": "F32"}], b"", "JSON list"),
    "header a JSON string": (b'"hello"', b"", "JSON str"),
    "header not UTF-8": (b'{"\xff":1}', b"", "UTF-8"),
    "metadata not a dict": ({"__metadata__": ["x"]}, b"", "__metadata__"),
    "metadata value not str": ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
    "entry not an object": ({"w": [1, 2]}, b"", "JSON list"),
    "missing field": ({"w": {"dtype": "F32", "shape": [2]}}, bytes(8), "missing data_offsets"),
    "unknown dtype": ({"w": _entry(dtype="F4")}, bytes(8), "unsupported dtype 'F4'"),
    "dtype not a string": ({"w": _entry(dtype=7)}, bytes(8), "unsupported dtype 7"),  # type: ignore[arg-type]
    "shape not a list": ({"w": {**_entry(), "shape": 2}}, bytes(8), "shape must be"),
    "shape negative": ({"w": _entry(shape=[-2])}, bytes(8), "shape must be"),
    "shape of bools": ({"w": _entry(shape=[True, True])}, bytes(8), "shape must be"),
    "shape of floats": ({"w": _entry(shape=[2.0])}, bytes(8), "shape must be"),
    "offsets not a pair": ({"w": _entry(offsets=[0])}, bytes(8), "data_offsets must be"),
    "offsets negative": ({"w": _entry(offsets=[-8, 0])}, bytes(8), "data_offsets must be"),
    "offsets reversed": ({"w": _entry(offsets=[8, 0])}, bytes(8), "end before they begin"),
    "shape x dtype != span": ({"w": _entry(shape=[3])}, bytes(8), "needs 12 bytes"),
    "huge shape": ({"w": _entry(shape=[2**40, 2**40])}, bytes(8), "more than the whole file"),
    "offsets past end": ({"w": _entry(offsets=[0, 8])}, bytes(6), "looks truncated"),
    "overlapping offsets": (
        {"a": _entry(offsets=[0, 8]), "b": _entry(offsets=[4, 12])},
        bytes(12),
        "overlaps tensor 'a'",
    ),
    "hole between tensors": (
        {"a": _entry(offsets=[0, 8]), "b": _entry(offsets=[12, 20])},
        bytes(20),
        "holes",
    ),
    "not starting at 0": ({"a": _entry(offsets=[4, 12])}, bytes(12), "holes"),
    "trailing bytes": ({"a": _entry()}, bytes(9), "1 bytes after the last tensor"),
    "duplicate tensor name": (
        b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
        b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
        b"\0",
        "repeats the key 'a'",
    ),
    "empty name": ({"": _entry()}, bytes(8), "non-empty"),
    "lone surrogate name": (
        b'{"\\ud800":{"dtype":"U8","shape":[],"data_offsets":[0,1]}}',
        b"\0",
        "UTF-8",
    ),
    "deeply nested": (b"[" * 100_000 + b"]" * 100_000, b"", "not valid JSON"),
    "huge integer": (b'{"a":' + b"9" * 5000 + b"}", b"", "not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_malformed_header_is_input_error(tmp_path: Path, case: str) -> None:
    header, data, message = BAD_FILES[case]
    path = header_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(InputError, match=message) as e:
        sio.read_header(path)
    text = str(e.value)
    assert str(path) in text and "fix:" in text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "only 0 bytes"),
        (b"\x05\x00\x00", "only 3 bytes"),
        (struct.pack("<Q", 0), "header length is 0"),
        (struct.pack("<Q", 100) + b"{}", "past the end"),
        (struct.pack("<Q", sio.MAX_HEADER_LEN + 1) + b"{}", "above the 100000000-byte limit"),
    ],
)
def test_bad_prefix_is_input_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as e:
        sio.read_header(path)
    assert str(path) in str(e.value)


def test_huge_header_length_allocates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}" + bytes(100))
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=str(path)):
            sio.read_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_truncated_shard_says_so(tmp_path: Path) -> None:
    path = tmp_path / "shard.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(64, 64)}, path)
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(InputError, match="looks truncated") as e:
        sio.read_header(path)
    assert "tensor 'w'" in str(e.value) and "re-download" in str(e.value)


def test_unreadable_paths_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read file"):
        sio.read_header(tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match="not a regular file"):
        sio.read_header(tmp_path)  # a directory
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")
        with pytest.raises(InputError, match="not a regular file"):
            sio.read_header(tmp_path / "fifo")  # must not block waiting for a writer


def test_edge_cases_that_are_valid(tmp_path: Path) -> None:
    # No tensors at all; null metadata; unknown extra fields; zero-size tensors sharing offsets.
    assert sio.read_header(header_file(tmp_path / "a", {})).tensors == {}
    path = header_file(
        tmp_path / "b",
        {
            "__metadata__": None,
            "e1": {**_entry(shape=[0], offsets=[0, 0]), "extra": 1},
            "w": _entry(),
            "e2": _entry(shape=[2, 0], offsets=[8, 8]),
        },
        bytes(8),
        pad=False,
    )
    header = sio.read_header(path)
    assert header.metadata == {} and list(header.tensors) == ["e1", "w", "e2"]


# --------------------------------------------------------------------------------------------
# Fuzzing: whatever the bytes, only InputError escapes


_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=6)
)
_json = st.recursive(
    _json_scalars,
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3)
    ),
    max_leaves=12,
)
_small_int = st.integers(-2, 40)
_entry_st = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from([*ALL_DTYPES, "F4", "X", ""]) | _json,
        "shape": st.lists(_small_int, max_size=3) | _json,
        "data_offsets": st.lists(_small_int, min_size=2, max_size=2) | _json,
    },
)
_header_st = st.dictionaries(
    st.sampled_from(["a", "b", "c", "", "__metadata__"]) | st.text(max_size=4),
    _entry_st | _json,
    max_size=4,
)


def _assert_consistent(header: sio.SafetensorsHeader, path: Path) -> None:
    pos = header.data_start
    for info in header.tensors.values():
        assert info.start == pos and info.nbytes == info.numel * dtypes.itemsize(info.dtype)
        assert sio.read_tensor(path, info).shape == info.shape
        pos = info.end
    assert pos == header.file_size


_fuzz = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_fuzz
@given(content=st.binary(max_size=64) | st.binary(min_size=8, max_size=8).map(lambda b: b + b"{}"))
def test_fuzz_arbitrary_bytes(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(content)
    try:
        header = sio.read_header(path)
    except InputError:
        return
    _assert_consistent(header, path)


@_fuzz
@given(
    header=_header_st | _json,
    data_len=st.integers(0, 48),
    length_delta=st.sampled_from([0, 0, 0, -1, 1, 2**63]),
)
def test_fuzz_json_headers(
    tmp_path: Path, header: object, data_len: int, length_delta: int
) -> None:
    text = json.dumps(header).encode()
    length = (len(text) + length_delta) % 2**64
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", length) + text + bytes(data_len))
    try:
        parsed = sio.read_header(path)
    except InputError as e:
        assert str(path) in str(e)
        return
    _assert_consistent(parsed, path)


_small_tensors = st.dictionaries(
    st.text(min_size=1, max_size=4).filter(lambda s: s != "__metadata__"),
    st.tuples(st.sampled_from(ALL_DTYPES), st.lists(st.integers(0, 3), max_size=2)),
    max_size=3,
)


@_fuzz
@given(
    spec=_small_tensors,
    edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=3),
    cut=st.none() | st.integers(0, 400),
)
def test_fuzz_mutated_valid_files(
    tmp_path: Path,
    spec: dict[str, tuple[str, list[int]]],
    edits: list[tuple[int, int]],
    cut: int | None,
) -> None:
    # Near-valid input reaches the deep checks far more often than random bytes do.
    path = tmp_path / "fuzz.safetensors"
    tensors = {name: random_tensor(dtype, tuple(shape)) for name, (dtype, shape) in spec.items()}
    sio.write_file(path, tensors)
    content = bytearray(path.read_bytes())
    for pos, value in edits:
        if pos < len(content):
            content[pos] = value
    path.write_bytes(bytes(content[:cut]))
    try:
        header = sio.read_header(path)
    except InputError as e:
        assert str(path) in str(e)
        return
    _assert_consistent(header, path)
    if not edits and cut is None:
        assert set(header.tensors) == set(tensors)
