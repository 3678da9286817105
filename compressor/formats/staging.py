"""Zarr v3 staging: the input's target tensors in row-block chunks, and the compressed results.

Layout under one staging root (keyed by the input fingerprint and the output-affecting config,
so a rerun of the same job finds its finished chunks and a changed input starts afresh):

    in/t00012            the input tensor, raw bits (bfloat16 as uint16; the logical
                         safetensors dtype in the attribute "dtype"), chunk = one row block
    out/t00012/packed    int32 codes, same row blocks
    out/t00012/scale     raw bits of the scales (rows, ngroups)
    out/t00012/zero|min  zero points (packed along rows) or float offsets
    done/<stage>/t00012.c0003.json   written after a chunk is complete (with its small result)

Each chunk of each array is written by exactly one task (chunks are aligned with the row blocks
and zero-point words with 32-row multiples), so no two writers ever touch one Zarr chunk file.
Arrays are uncompressed: weights barely compress and the codec would sit on the hot path.

The root is a local directory or an fsspec URL (``s3://bucket/staging/<key>``): zarr then uses
its fsspec store, and markers are single objects (a PUT is atomic, so a marker is either absent
or complete there too). Local staging only works when every worker runs on this machine; a
multi-node cluster needs shared storage or a URL (docs/operations.md, "The staging rule").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from compressor.formats import dtypes, storage

__all__ = ["Staging"]


class Staging:
    """Handle on a staging root; cheap to create, safe to send to workers (it is just a path)."""

    def __init__(self, root: str | Path | storage.UrlPath) -> None:
        self.root: Path | storage.UrlPath = storage.as_path(root)

    def __reduce__(self):
        return (Staging, (str(self.root),))

    # -- arrays -------------------------------------------------------------------------------
    def create(self, path: str, shape: tuple[int, ...], dtype: str, chunk_rows: int) -> None:
        """Create (or keep, if it matches) an array holding safetensors dtype `dtype`."""
        storage = dtypes.storage_numpy_dtype(dtype)
        chunks = (max(1, min(chunk_rows, shape[0])), *shape[1:]) if shape else ()
        target = self.root / path
        if (target / "zarr.json").exists():
            existing = zarr.open_array(store=str(target), mode="r")
            if existing.shape == tuple(shape) and existing.attrs.get("dtype") == dtype:
                return
        zarr.create_array(
            store=str(target),
            shape=shape,
            chunks=chunks,
            dtype=storage,
            compressors=None,
            fill_value=0,
            attributes={"dtype": dtype},
            overwrite=True,
            # Flat chunk files ("c.3.0"), not a directory per row block: far fewer directories
            # to create and, at the end, to delete.
            chunk_key_encoding={"name": "default", "separator": "."},
        )

    def array(self, path: str, mode: str = "r") -> zarr.Array:
        arr = zarr.open_array(store=str(self.root / path), mode=mode)  # type: ignore[arg-type]
        # Zarr otherwise scans every chunk it writes to see whether it is all fill value (to skip
        # storing it): ~100 ms per 22 MB chunk, most of ingest's time. Our chunks are weights.
        # (`config=` of open_array is ignored in zarr 3.1; with_config is what takes effect.)
        return arr.with_config({"write_empty_chunks": True}) if mode != "r" else arr

    def write_rows(self, path: str, row_start: int, values: np.ndarray) -> None:
        arr = self.array(path, mode="r+")
        arr[row_start : row_start + values.shape[0]] = values

    def read_rows(self, path: str, row_start: int, row_stop: int) -> np.ndarray:
        return np.asarray(self.array(path)[row_start:row_stop])

    # -- completion markers --------------------------------------------------------------------
    def _marker(self, stage: str, key: str, chunk: int) -> Path | storage.UrlPath:
        return self.root / "done" / stage / f"{key}.c{chunk:05d}.json"

    def mark_done(
        self, stage: str, key: str, chunk: int, result: dict[str, Any] | None = None
    ) -> None:
        """Record a finished chunk, atomically: a marker is either absent or complete."""
        marker = self._marker(stage, key, chunk)
        if not isinstance(marker, Path):  # one PUT: atomic on object stores
            storage.write_text(str(marker), json.dumps(result or {}))
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(result or {}))
        os.replace(tmp, marker)

    def done(self, stage: str, key: str, chunk: int) -> dict[str, Any] | None:
        """The recorded result of a finished chunk, or None if it must be (re)done."""
        marker = self._marker(stage, key, chunk)
        try:
            if not isinstance(marker, Path):
                return json.loads(storage.read_text(str(marker)))  # type: ignore[no-any-return]
            return json.loads(marker.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def forget(self, stage: str, key: str, chunks: int) -> None:
        """Drop the markers of a tensor's chunks: their output is gone and must be redone."""
        for chunk in range(chunks):
            marker = self._marker(stage, key, chunk)
            if isinstance(marker, Path):
                marker.unlink(missing_ok=True)
            else:
                storage.remove(str(marker))

    def count_done(self, stage: str) -> int:
        folder = self.root / "done" / stage
        if not isinstance(folder, Path):
            return sum(1 for f in storage.list_files(str(folder)) if f.endswith(".json"))
        return len(list(folder.glob("*.json"))) if folder.exists() else 0
