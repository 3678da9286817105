"""Reading and writing safetensors files a block of rows at a time, with bounded memory.

File layout (https://github.com/huggingface/safetensors#format)::

    [8 bytes: N, little-endian u64][N bytes: UTF-8 JSON object][data buffer]

The JSON maps each tensor name to ``{"dtype": str, "shape": [int, ...], "data_offsets": [begin,
end]}`` with offsets relative to the start of the data buffer, plus an optional
``"__metadata__"`` str→str map. Data is little-endian, C order.

Reading: `read_header` validates the whole header against the file (the same rules as the
reference reader, so every file we accept also loads in `safetensors`), then `read_rows`,
`read_tensor` and `iter_byte_blocks` fetch only the bytes asked for with positioned reads. Paths
may be fsspec URLs (``s3://bucket/model/model.safetensors``, see `storage`): each read is then
one ranged request. No function maps or reads a whole file, and any malformed or unreadable
input surfaces as `InputError` naming the file, the tensor and what to do.

Writing: `SafetensorsWriter` lays the header out from declared (name, dtype, shape) entries, then
streams each tensor's bytes in order into a temporary file in the destination directory, which is
fsynced and atomically renamed over the destination only once every byte has arrived. Problems
surface as `OutputError`. `write_file` wraps it for whole in-memory tensors.

Byte-for-byte compatibility: `write_file` orders tensors as `safetensors.torch.save_file` does
(by descending dtype alignment, then by name; `canonical_order`) and encodes the header the same
way (compact JSON, raw UTF-8, space padding to a multiple of 8), so for the same tensors the
files are identical. The one exception is `__metadata__` with two or more keys: the reference
writes them in Rust `HashMap` order, which is randomised per process, while we sort the keys so
our output is deterministic. The streaming writer keeps the order it is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import secrets
import stat
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import torch

from compressor.errors import InputError, OutputError
from compressor.formats import dtypes, storage

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "MAX_HEADER_LEN",
    "SafetensorsHeader",
    "SafetensorsWriter",
    "TensorInfo",
    "canonical_order",
    "encode_header",
    "iter_byte_blocks",
    "read_header",
    "read_rows",
    "read_tensor",
    "write_file",
]

MAX_HEADER_LEN = 100_000_000
"""Largest JSON header accepted, in bytes; the reference reader's limit (MAX_HEADER_SIZE)."""

DEFAULT_BLOCK_BYTES = 16 * 1024 * 1024
"""Default block size of `iter_byte_blocks`."""

_MAX_DIM = 2**63 - 1  # numpy shapes are int64: larger dimensions cannot be represented
_METADATA_KEY = "__metadata__"
_REDOWNLOAD = "re-download or re-copy the file; if it was written by a tool, re-run that tool"

PathLike = str | os.PathLike[str]
Entry = tuple[str, str, Sequence[int]]
"""A tensor declared to the writer: (name, safetensors dtype, shape)."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file.

    `start`/`end` are absolute byte offsets in the file (8 + header_len + data_offsets), so
    ``end - start == numel * itemsize(dtype)``. A 0-d tensor has ``shape == ()`` and one element.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.start

    @property
    def numel(self) -> int:
        """Number of elements (1 for a 0-d tensor)."""
        return math.prod(self.shape)

    @property
    def num_rows(self) -> int:
        """Number of rows `read_rows` addresses: ``shape[0]``, or 1 for a 0-d tensor."""
        return self.shape[0] if self.shape else 1

    @property
    def row_nbytes(self) -> int:
        """Bytes per row along dim 0: ``prod(shape[1:]) * itemsize`` (the item size for 0-d
        and 1-d tensors)."""
        return math.prod(self.shape[1:]) * dtypes.itemsize(self.dtype)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header.

    Invariants (checked by `read_header`): the tensors' byte ranges tile the data buffer exactly,
    from ``8 + header_len`` to ``file_size``, with no gap or overlap; `tensors` is in order of
    offsets; every dtype is supported.
    """

    path: str
    header_len: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    file_size: int

    @property
    def data_start(self) -> int:
        """Absolute offset of the data buffer (``8 + header_len``)."""
        return 8 + self.header_len


# --------------------------------------------------------------------------------------------
# Reading


class _DuplicateKeyError(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _object_no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # `json` silently keeps the last of repeated keys; a header naming a tensor twice is
    # ambiguous (and the reference parser's answer depends on serde details), so refuse it.
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKeyError(key)
        obj[key] = value
    return obj


def _is_utf8_text(value: object) -> bool:
    # JSON "\ud800" escapes decode to lone surrogates, which are not valid UTF-8 text (the
    # reference parser rejects them, and we could never write them back out).
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_int(value: object) -> bool:
    # bool is a subclass of int in Python, but `true` is not a valid JSON shape entry.
    return type(value) is int


def _read_exact(f: io.RawIOBase, offset: int, buf: memoryview) -> int:
    """Fill `buf` from absolute `offset`; return how many bytes were read (less only at EOF)."""
    f.seek(offset)
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])
        if not n:  # 0 = EOF; None cannot happen on a blocking file
            break
        got += n
    return got


def read_header(path: PathLike) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at `path`.

    Reads at most ``8 + min(header_len, MAX_HEADER_LEN)`` bytes, and only after checking that the
    declared header length fits in the file, so a hostile length never causes a big allocation.

    Raises:
        InputError: the file cannot be read, or is not a well-formed safetensors file (truncated,
            bad header length, header not a UTF-8 JSON object, bad `__metadata__`, a tensor entry
            with missing or mistyped fields, an unsupported dtype, a shape that disagrees with its
            byte span, byte ranges that fall past the end of the file, overlap, leave gaps or
            leave unclaimed bytes at the end). Nothing else escapes for any file content.
    """
    p = os.fspath(path)
    try:
        # Refuse FIFOs and devices before opening: opening a FIFO blocks until a writer appears.
        if not storage.is_url(p) and not stat.S_ISREG(os.stat(storage.local_path(p)).st_mode):
            raise InputError(
                "not a regular file", path=p, hint="pass the path of a .safetensors file"
            )
        with storage.open_read(p) as f:
            file_size = storage.file_size(f)
            prefix = bytearray(8)
            got = _read_exact(f, 0, memoryview(prefix))
            if got < 8:
                raise InputError(
                    f"file is only {got} bytes long, too short for a safetensors file (which "
                    "starts with an 8-byte header length); it looks truncated",
                    path=p,
                    hint=_REDOWNLOAD,
                )
            (header_len,) = struct.unpack("<Q", prefix)
            _check_header_len(p, header_len, file_size)
            raw_header = bytearray(header_len)
            got = _read_exact(f, 8, memoryview(raw_header))
            if got < header_len:  # the file shrank after fstat
                raise InputError(
                    f"file ended after {8 + got} bytes while reading its {header_len}-byte header",
                    path=p,
                    hint=f"the file changed while being read; {_REDOWNLOAD}",
                )
    except OSError as e:
        raise InputError(
            f"cannot read file: {e.strerror or e}",
            path=p,
            hint="check that the path exists, is a regular file and is readable",
        ) from e

    try:
        obj = json.loads(raw_header.decode("utf-8"), object_pairs_hook=_object_no_duplicates)
    except UnicodeDecodeError as e:
        raise InputError(
            f"header is not valid UTF-8 (bad byte at header offset {e.start}); this is not a "
            "safetensors file or it is corrupted",
            path=p,
            hint=_REDOWNLOAD,
        ) from None
    except _DuplicateKeyError as e:
        raise InputError(
            f"header JSON repeats the key {e.key!r}, so it is ambiguous which entry is meant",
            path=p,
            tensor=e.key if e.key != _METADATA_KEY else None,
            hint="the file is corrupted or was written by a broken tool; regenerate it",
        ) from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise InputError(
            f"header is not valid JSON ({e}); this is not a safetensors file or it is corrupted",
            path=p,
            hint=_REDOWNLOAD,
        ) from None
    if not isinstance(obj, dict):
        raise InputError(
            f"header is a JSON {type(obj).__name__}, expected a JSON object mapping tensor names "
            "to their dtype/shape/data_offsets; this is not a safetensors file",
            path=p,
            hint=_REDOWNLOAD,
        )

    metadata = _parse_metadata(p, obj.pop(_METADATA_KEY, None))
    data_start = 8 + header_len
    infos = [_parse_entry(p, name, entry, data_start, file_size) for name, entry in obj.items()]
    # Python's sort is stable, so zero-byte tensors sharing an offset keep their JSON order.
    infos.sort(key=lambda i: (i.start, i.end))
    _check_tiling(p, infos, data_start, file_size)
    return SafetensorsHeader(
        path=p,
        header_len=header_len,
        tensors={i.name: i for i in infos},
        metadata=metadata,
        file_size=file_size,
    )


def _check_header_len(p: str, header_len: int, file_size: int) -> None:
    if header_len == 0:
        raise InputError(
            "header length is 0; a safetensors header is at least the 2 bytes '{}', so this is "
            "not a safetensors file or it is corrupted",
            path=p,
            hint=_REDOWNLOAD,
        )
    if header_len > MAX_HEADER_LEN:
        raise InputError(
            f"header length {header_len} is above the {MAX_HEADER_LEN}-byte limit safetensors "
            "readers accept; this is not a safetensors file or its first 8 bytes are corrupted",
            path=p,
            hint=_REDOWNLOAD,
        )
    if 8 + header_len > file_size:
        raise InputError(
            f"header length {header_len} runs past the end of the {file_size}-byte file; the "
            "file looks truncated",
            path=p,
            hint=_REDOWNLOAD,
        )


def _parse_metadata(p: str, value: object) -> dict[str, str]:
    if value is None:  # absent, or JSON null (which the reference reader also accepts)
        return {}
    if not isinstance(value, dict) or not all(
        _is_utf8_text(k) and _is_utf8_text(v) for k, v in value.items()
    ):
        raise InputError(
            f"header {_METADATA_KEY!r} must be a JSON object of string keys to string values",
            path=p,
            hint="the file was written by a non-conforming tool; rewrite it with string-only "
            "metadata",
        )
    return dict(value)


def _parse_entry(p: str, name: str, entry: object, data_start: int, file_size: int) -> TensorInfo:
    def bad(message: str, hint: str = _REDOWNLOAD) -> InputError:
        return InputError(message, path=p, tensor=name, hint=hint)

    if not name or not _is_utf8_text(name):
        raise bad("tensor names must be non-empty UTF-8 strings")
    if not isinstance(entry, dict):
        raise bad(
            f"header entry is a JSON {type(entry).__name__}, expected an object with dtype, "
            "shape and data_offsets"
        )
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise bad(f"header entry is missing {', '.join(missing)}")

    dtype = entry["dtype"]
    if not dtypes.is_supported(dtype):
        raise bad(
            f"unsupported dtype {dtype!r}",
            hint=f"supported dtypes are {', '.join(dtypes.SUPPORTED_DTYPES)}; convert the "
            "checkpoint (or this tensor) to one of them first",
        )

    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= _MAX_DIM for d in shape):
        raise bad(f"shape must be a list of non-negative integers, got {_short(shape)}")

    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
    ):
        raise bad(f"data_offsets must be two non-negative integers, got {_short(offsets)}")
    begin, end = offsets
    if begin > end:
        raise bad(f"data_offsets [{begin}, {end}] end before they begin")
    if data_start + end > file_size:
        raise bad(
            f"data_offsets [{begin}, {end}] reach byte {data_start + end} but the file is only "
            f"{file_size} bytes; the file looks truncated (an incomplete download or copy)"
        )

    # span <= file_size here, so a product past file_size is wrong whatever its exact value:
    # stop multiplying there, so a hostile shape of huge dimensions never turns into a long
    # big-integer product.
    span = end - begin
    nbytes = 0 if 0 in shape else dtypes.itemsize(dtype)
    for d in shape:
        nbytes *= d
        if nbytes > file_size:
            break
    if nbytes != span:
        needs = (
            f"{nbytes} bytes"
            if nbytes <= file_size
            else f"more than the whole file's {file_size} bytes"
        )
        raise bad(
            f"shape {_short(shape)} of {dtype} needs {needs} but data_offsets [{begin}, {end}] "
            f"span {span}",
            hint="the header is inconsistent with itself; the file is corrupted or was written "
            "by a broken tool",
        )
    return TensorInfo(
        name=name, dtype=dtype, shape=tuple(shape), start=data_start + begin, end=data_start + end
    )


def _check_tiling(p: str, infos: list[TensorInfo], data_start: int, file_size: int) -> None:
    # Same rule as the reference reader: sorted by offset, each tensor starts exactly where the
    # previous one ended, the first at 0 and the last at the end of the file. Holes would be
    # harmless to us, but files with them do not load in `safetensors`, so we refuse them too.
    pos, prev = data_start, None
    for info in infos:
        rel = (info.start - data_start, info.end - data_start)
        if info.start < pos:
            assert prev is not None
            raise InputError(
                f"byte range {list(rel)} overlaps tensor {prev.name!r} (which ends at "
                f"{prev.end - data_start}); tensors must not share bytes",
                path=p,
                tensor=info.name,
                hint="the header is corrupted or was written by a broken tool; regenerate it",
            )
        if info.start > pos:
            raise InputError(
                f"data bytes [{pos - data_start}, {rel[0]}) before this tensor belong to no "
                "tensor; safetensors refuses files with holes",
                path=p,
                tensor=info.name,
                hint="the header is corrupted or was written by a non-conforming tool; "
                "regenerate it",
            )
        pos, prev = info.end, info
    if pos != file_size:
        raise InputError(
            f"the file has {file_size - pos} bytes after the last tensor's data that belong to "
            "no tensor; safetensors refuses such files",
            path=p,
            hint=f"the file was corrupted or appended to; {_REDOWNLOAD}",
        )


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_into(path: PathLike, offset: int, out: np.ndarray, tensor: str) -> None:
    """Fill C-contiguous `out` with the bytes at absolute `offset` of `path`."""
    p = os.fspath(path)
    buf = out.reshape(-1).view(np.uint8).data
    try:
        with storage.open_read(p) as f:
            got = _read_exact(f, offset, buf)
    except OSError as e:
        raise InputError(
            f"cannot read tensor data: {e.strerror or e}",
            path=p,
            tensor=tensor,
            hint="check that the file is still there and readable",
        ) from e
    if got < len(buf):
        raise InputError(
            f"file ended at byte {offset + got} while reading {len(buf)} bytes at offset "
            f"{offset}; it was truncated or replaced after its header was read",
            path=p,
            tensor=tensor,
            hint=_REDOWNLOAD,
        )


def read_rows(path: PathLike, info: TensorInfo, row_start: int, row_stop: int) -> np.ndarray:
    """Read rows ``[row_start, row_stop)`` along dim 0 of tensor `info` in file `path`.

    Returns a new writable, C-contiguous array of ``storage_numpy_dtype(info.dtype)`` (raw bits)
    with shape ``(row_stop - row_start, *info.shape[1:])``. A 1-d tensor's rows are its
    elements; a 0-d tensor is one row of one element (result shape ``(rows,)``). Only those rows'
    bytes are read, with one positioned read into the preallocated result.

    Raises:
        ValueError: the row range is not within ``0 <= row_start <= row_stop <= info.num_rows``.
        InputError: the file cannot be read or ends early.
    """
    if not 0 <= row_start <= row_stop <= info.num_rows:
        raise ValueError(
            f"read_rows: rows [{row_start}, {row_stop}) out of range for tensor {info.name!r} "
            f"with {info.num_rows} rows"
        )
    out = np.empty(
        (row_stop - row_start, *info.shape[1:]), dtype=dtypes.storage_numpy_dtype(info.dtype)
    )
    _read_into(path, info.start + row_start * info.row_nbytes, out, info.name)
    return out


def read_tensor(path: PathLike, info: TensorInfo) -> np.ndarray:
    """Read the whole tensor `info` from file `path`: a new writable, C-contiguous array of
    ``storage_numpy_dtype(info.dtype)`` with shape ``info.shape``. Meant for small tensors; use
    `read_rows` or `iter_byte_blocks` to bound memory on large ones."""
    out = np.empty(info.shape, dtype=dtypes.storage_numpy_dtype(info.dtype))
    _read_into(path, info.start, out, info.name)
    return out


def iter_byte_blocks(
    path: PathLike, info: TensorInfo, block_bytes: int = DEFAULT_BLOCK_BYTES
) -> Iterator[memoryview]:
    """Yield the raw data of tensor `info` as consecutive read-only blocks of at most
    `block_bytes` bytes (every block but the last is exactly `block_bytes`); joined, they are
    the tensor's bytes. Each block is a fresh buffer, so holding on to one is safe; memory in
    flight is one block. A zero-byte tensor yields nothing.

    Raises:
        ValueError: `block_bytes` is not positive.
        InputError: the file cannot be read or ends early.
    """
    if block_bytes <= 0:
        raise ValueError(f"iter_byte_blocks: block_bytes must be positive, got {block_bytes}")
    p = os.fspath(path)
    try:
        f = storage.open_read(p)  # closed by the `with` below, across yields
    except OSError as e:
        raise InputError(
            f"cannot read tensor data: {e.strerror or e}",
            path=p,
            tensor=info.name,
            hint="check that the file is still there and readable",
        ) from e
    with f:
        offset = info.start
        while offset < info.end:
            block = bytearray(min(block_bytes, info.end - offset))
            try:
                got = _read_exact(f, offset, memoryview(block))
            except OSError as e:
                raise InputError(
                    f"cannot read tensor data: {e.strerror or e}", path=p, tensor=info.name
                ) from e
            if got < len(block):
                raise InputError(
                    f"file ended at byte {offset + got} while reading tensor data up to byte "
                    f"{info.end}; it was truncated or replaced after its header was read",
                    path=p,
                    tensor=info.name,
                    hint=_REDOWNLOAD,
                )
            yield memoryview(block).toreadonly()
            offset += len(block)


# --------------------------------------------------------------------------------------------
# Writing


def canonical_order(entries: Sequence[Entry]) -> list[Entry]:
    """`entries` sorted the way `safetensors` serializes tensors: by descending dtype alignment
    (e.g. all F32 before BF16 before I8), then by name. Streaming in this order makes the output
    byte-identical to `safetensors.torch.save_file` (see the module docstring for the metadata
    caveat). Unknown dtypes raise InputError."""
    # Rust compares names as UTF-8 bytes, which orders valid strings exactly as Python's
    # code-point comparison does.
    return sorted(entries, key=lambda e: (-dtypes.serialization_rank(e[1]), e[0]))


def encode_header(
    entries: Sequence[Entry], metadata: Mapping[str, str] | None = None, path: str = ""
) -> tuple[bytes, list[TensorInfo]]:
    """The first ``8 + N`` bytes of a file holding `entries` contiguously in the given order,
    and where each tensor's data will be (absolute offsets): what `SafetensorsWriter` writes.
    For files assembled out of order (pieces written at their offsets by several tasks)."""
    return _encode_header(path, entries, metadata)


def _encode_header(
    path: str, entries: Sequence[Entry], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[TensorInfo]]:
    """The file's first ``8 + N`` bytes for `entries` laid out contiguously in the given order,
    and each tensor's TensorInfo."""

    def bad(message: str, tensor: str | None = None) -> OutputError:
        return OutputError(
            message, path=path, tensor=tensor, hint="this is a bug in the caller; please report it"
        )

    header: dict[str, Any] = {}
    if metadata is not None:
        if not all(_is_utf8_text(k) and _is_utf8_text(v) for k, v in metadata.items()):
            raise bad("metadata must map UTF-8 strings to UTF-8 strings")
        # Sorted so the output is deterministic (the reference uses randomised HashMap order).
        header[_METADATA_KEY] = dict(sorted(metadata.items()))
    layout: list[tuple[str, str, tuple[int, ...], int, int]] = []
    offset = 0
    for name, dtype, shape in entries:
        if not _is_utf8_text(name) or not name or name == _METADATA_KEY:
            raise bad(f"invalid tensor name {name!r}")
        if name in header:
            raise bad("tensor declared twice", name)
        if not dtypes.is_supported(dtype):
            raise bad(f"unsupported dtype {dtype!r}", name)
        dims = tuple(shape)
        if not all(isinstance(d, int | np.integer) and not isinstance(d, bool) for d in dims):
            raise bad(f"shape {dims!r} must contain integers", name)
        dims = tuple(int(d) for d in dims)
        if any(d < 0 or d > _MAX_DIM for d in dims):
            raise bad(f"shape {dims!r} has a negative or too large dimension", name)
        nbytes = math.prod(dims) * dtypes.itemsize(dtype)
        header[name] = {
            "dtype": dtype,
            "shape": list(dims),
            "data_offsets": [offset, offset + nbytes],
        }
        layout.append((name, dtype, dims, offset, offset + nbytes))
        offset += nbytes
    # Compact separators and raw (non-ASCII-escaped) UTF-8: what serde_json writes.
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    # Pad with spaces to a multiple of 8 so the data buffer starts 8-byte aligned, as the
    # reference writer does; JSON parsers ignore the trailing whitespace.
    text += b" " * (-len(text) % 8)
    if len(text) > MAX_HEADER_LEN:
        raise OutputError(
            f"header would be {len(text)} bytes, above the {MAX_HEADER_LEN}-byte limit readers "
            "accept",
            path=path,
            hint="split the tensors over more shards",
        )
    data_start = 8 + len(text)
    infos = [TensorInfo(n, d, s, data_start + b, data_start + e) for n, d, s, b, e in layout]
    return struct.pack("<Q", len(text)) + text, infos


class SafetensorsWriter:
    """Stream tensors into a new safetensors file at `path`, one block at a time.

    The header is computed up front from `entries` ((name, dtype, shape) triples, laid out
    contiguously in the given order; see `canonical_order` to match the reference layout) and
    written at once. The caller then passes each tensor's raw data, in header order, through
    `write`, in as many blocks as it likes; zero-byte tensors need no call. Everything goes to a
    temporary file next to `path` (``<path>.<random>.partial``); `close` checks every tensor got
    exactly its byte count, fsyncs and atomically renames it to `path` (replacing any existing
    file). On any error, or on `abort`, the temporary file is deleted and `path` is untouched.

    Use it as a context manager (an exception inside the block aborts, a clean exit closes)::

        with SafetensorsWriter(out, [("w", "BF16", (4096, 4096))], {"format": "pt"}) as w:
            for rows in blocks:  # e.g. uint16 arrays of shape (k, 4096)
                w.write("w", rows)

    Memory held is the caller's current block plus a 1 MiB write buffer.

    Raises:
        OutputError: invalid entries, data out of order or of the wrong size or dtype, or the
            destination cannot be written (missing directory, permissions, disk full).
    """

    def __init__(
        self,
        path: PathLike,
        entries: Sequence[Entry],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        header, infos = _encode_header(self.path, entries, metadata)
        self.tensors: dict[str, TensorInfo] = {i.name: i for i in infos}
        """Where each declared tensor will be in the finished file."""
        self._infos = infos
        self._index = {info.name: i for i, info in enumerate(infos)}
        self._current = 0  # index into _infos of the tensor being written
        self._written = 0  # bytes of _infos[_current] written so far
        self._state = "open"
        # A random suffix, not a fixed "<path>.partial": a retried task may still be writing the
        # same shard, and each attempt must own its temporary file.
        self._tmp = f"{self.path}.{secrets.token_hex(6)}.partial"
        try:
            # O_EXCL: never clobber someone else's file; 0o666 so the umask decides permissions
            # (mkstemp would force 0o600 onto the final checkpoint file).
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as e:
            self._state = "aborted"
            raise self._os_error("cannot create the output file", e) from e
        self._file = open(fd, "wb", buffering=1024 * 1024)  # noqa: SIM115 - closed by close/abort
        self.sha256 = hashlib.sha256()
        """Digest of every byte written so far: the finished file's sha256 after `close`, with no
        second read of the file (the manifest needs it)."""
        self.sha256.update(header)
        self._guard(lambda: self._file.write(header))

    # -- context manager ----------------------------------------------------------------------
    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- API ----------------------------------------------------------------------------------
    def write(self, name: str, data: Any) -> None:
        """Append `data` to tensor `name`'s bytes.

        `data` is a bytes-like object (raw little-endian bytes), a numpy array of the tensor's
        storage dtype (`dtypes.storage_numpy_dtype`, any byte order, any layout) or of uint8
        (raw bytes), or a torch tensor of the tensor's dtype. Tensors must arrive in header
        order and each must receive exactly its byte count, over one or more calls.
        """
        self._check_open()
        info = self._advance_to(name)
        view = self._as_bytes(info, data)
        remaining = info.nbytes - self._written
        if view.nbytes > remaining:
            self._fail(
                f"got {self._written + view.nbytes} bytes but the header declares "
                f"{info.nbytes} ({info.dtype} {list(info.shape)})",
                info.name,
            )
        self._guard(lambda: self._file.write(view))
        self.sha256.update(view)
        self._written += view.nbytes

    def close(self) -> None:
        """Check every tensor is complete, then fsync and atomically rename the temporary file
        to `path`. Idempotent once it succeeded."""
        if self._state == "closed":
            return
        self._check_open()
        info = self._infos[self._current] if self._infos else None
        if info is not None and self._written != info.nbytes:
            self._fail(f"got {self._written} of its {info.nbytes} bytes", info.name)
        for later in self._infos[self._current + 1 :]:
            if later.nbytes:
                self._fail(f"was never written ({later.nbytes} bytes declared)", later.name)

        def finish() -> None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self.path)

        self._guard(finish)
        self._state = "closed"
        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def abort(self) -> None:
        """Discard the temporary file; `path` is left as it was. Safe to call more than once."""
        if self._state != "open":
            return
        self._state = "aborted"
        # A failing close (its flush hit a full disk) does not matter: the file is deleted.
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)

    # -- internals ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._state != "open":
            raise OutputError(
                f"the writer is already {self._state}",
                path=self.path,
                hint="this is a bug in the caller; please report it",
            )

    def _fail(self, message: str, tensor: str | None = None) -> NoReturn:
        self.abort()
        raise OutputError(
            message,
            path=self.path,
            tensor=tensor,
            hint="the output was not written; this is a bug in the stage producing this tensor, "
            "please report it",
        )

    def _os_error(self, what: str, e: OSError) -> OutputError:
        return OutputError(
            f"{what}: {e.strerror or e}",
            path=self.path,
            hint="check that the directory exists, is writable and has free space",
        )

    def _guard(self, action: Callable[[], object]) -> None:
        try:
            action()
        except OSError as e:
            self.abort()
            raise self._os_error("cannot write the output file", e) from e

    def _advance_to(self, name: str) -> TensorInfo:
        target = self._index.get(name)
        if target is None:
            self._fail("is not declared in the header", name)
        if target < self._current:
            self._fail(
                f"written after tensor {self._infos[self._current].name!r}, but it comes "
                "earlier in the header; tensors must be written in header order",
                name,
            )
        if target > self._current:
            current = self._infos[self._current]
            if self._written != current.nbytes:
                self._fail(
                    f"started after only {self._written} of tensor {current.name!r}'s "
                    f"{current.nbytes} bytes; tensors must be written completely and in header "
                    "order",
                    name,
                )
            for skipped in self._infos[self._current + 1 : target]:
                if skipped.nbytes:
                    self._fail(
                        f"written before tensor {skipped.name!r}, which comes earlier in the "
                        "header; tensors must be written in header order",
                        name,
                    )
            self._current, self._written = target, 0
        return self._infos[target]

    def _as_bytes(self, info: TensorInfo, data: Any) -> memoryview:
        """`data` as a flat memoryview of little-endian bytes (copying only for layout/order)."""
        if isinstance(data, torch.Tensor):
            if data.dtype != dtypes.torch_dtype(info.dtype):
                self._fail(f"got a torch {data.dtype} block for a {info.dtype} tensor", info.name)
            data = dtypes.to_raw(data)
        if isinstance(data, np.ndarray):
            storage = dtypes.storage_numpy_dtype(info.dtype)
            if data.dtype == np.uint8:
                pass  # raw bytes
            elif data.dtype.newbyteorder("<") == storage:
                # Converts big-endian input and makes the block contiguous; a no-op otherwise.
                data = np.ascontiguousarray(data, dtype=storage)
            else:
                self._fail(
                    f"got a numpy {data.dtype} block for a {info.dtype} tensor (expected "
                    f"{storage} raw bits or uint8 bytes)",
                    info.name,
                )
            return np.ascontiguousarray(data).reshape(-1).view(np.uint8).data
        try:
            view = memoryview(data)
        except TypeError:
            self._fail(
                f"got a {type(data).__name__}; expected bytes, a numpy array or a torch tensor",
                info.name,
            )
        if not view.c_contiguous:
            view = memoryview(view.tobytes())
        return view.cast("B") if view.ndim != 1 or view.format != "B" else view


def _fsync_dir(directory: str) -> None:
    # Persist the rename itself. Not every platform/filesystem lets a directory be opened or
    # fsynced; the rename is atomic regardless, only its durability across a crash is at stake.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file(
    path: PathLike,
    tensors: Mapping[str, np.ndarray | torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write in-memory `tensors` to a new safetensors file at `path` (atomically, via
    `SafetensorsWriter`), in `canonical_order`: the bytes equal `safetensors.torch.save_file`'s
    for the same tensors and metadata (given at most one metadata key).

    Torch tensors keep their dtype. numpy arrays are taken by their natural dtype (a uint16
    array is U16; pass a torch tensor, or use the writer, for BF16/F8).

    Raises:
        OutputError: an unsupported dtype, or the destination cannot be written.
    """
    p = os.fspath(path)
    entries: list[Entry] = []
    for name, value in tensors.items():
        try:
            if isinstance(value, torch.Tensor):
                dtype = dtypes.safetensors_dtype_of(value.dtype)
            else:
                dtype = dtypes.safetensors_dtype_of_numpy(value.dtype)
        except InputError as e:
            raise OutputError(e.message, path=p, tensor=name, hint=e.hint) from None
        entries.append((name, dtype, tuple(value.shape)))
    with SafetensorsWriter(p, canonical_order(entries), metadata) as writer:
        for info in writer.tensors.values():
            writer.write(info.name, tensors[info.name])
