"""Which input bytes a run depends on: every file it reads, with a stamp and a content digest.

A run reads its source checkpoint's shards, its index, config.json and the other files it
carries over, and the side inputs of pruning (gradients, activation norms). Each of those files
gets two identities:

- a **stamp**, taken at plan time from the file system (no data read): the size, the inode, and
  the modification *and change* times in nanoseconds. Any write to a file moves its ctime, which
  no user can set back (``touch -d`` restores only the mtime), so an in-place edit that keeps
  the size and the mtime still changes the stamp. Object stores give the object's ETag/version.
  The stamp goes into the run key (a changed input never resumes from the staging of another)
  and is checked again just before publishing: a file written while the run was in flight
  stops the publish.
- a **digest**: the sha256 of the whole file, read once during the run (the digest stage). It
  is what `manifest.json` records under ``"source"``, so ``compressor verify DST --source SRC``
  can prove that an output came from exactly these bytes. For a shard downloaded from the
  Hugging Face hub it equals the name of its blob in the hub cache.

Together: the digest is taken between the plan's stamp and the publish-time check, and the
stamp did not change in between, so the digest is that of the bytes every chunk used.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from compressor.formats import storage
from compressor.formats.checkpoint import INDEX_NAME, Checkpoint

__all__ = [
    "SourceFile",
    "changed_files",
    "checkpoint_files",
    "relative_name",
    "sha256_of",
    "source_file",
    "stamp_of",
]

_BLOCK = 8 << 20  # read size of the digest: large enough to keep hashlib off the GIL


@dataclass(frozen=True)
class SourceFile:
    """One file a run reads. `name` is how reports and the manifest call it: its path relative
    to the checkpoint (side inputs are prefixed with their role, e.g. ``gradients/x.safetensors``);
    `location` is where it is read (a local path or an fsspec URL)."""

    name: str
    location: str
    size: int
    stamp: str


def stamp_of(location: str) -> tuple[int, str]:
    """(size, stamp) of a file now; follows symbolic links (a hub-cache snapshot's blob).

    Raises:
        OSError: the file is gone or cannot be stat'ed.
    """
    if storage.is_url(location):
        size, version = storage.size_and_version(location)
        return size, f"version:{version}"
    st = os.stat(storage.local_path(location))
    return st.st_size, f"{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def source_file(name: str, location: str) -> SourceFile:
    size, stamp = stamp_of(location)
    return SourceFile(name, location, size, stamp)


def changed_files(files: Iterable[SourceFile]) -> list[str]:
    """Names of the files whose stamp differs from the recorded one (or that are gone)."""
    changed = []
    for f in files:
        try:
            now = stamp_of(f.location)
        except OSError:
            changed.append(f.name)
            continue
        if now != (f.size, f.stamp):
            changed.append(f.name)
    return changed


def sha256_of(location: str) -> str:
    """sha256 (hex) of a file's content, read in 8 MiB blocks (memory stays at one block)."""
    digest = hashlib.sha256()
    with storage.open_read(location) as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def relative_name(root: str | Path, location: str) -> str:
    """`location` relative to `root` with '/' separators (its last part when not under it)."""
    if storage.is_url(location) or storage.is_url(str(root)):
        base = str(root).rstrip("/") + "/"
        return location[len(base) :] if location.startswith(base) else storage.name(location)
    path, base_path = Path(location), Path(root)
    try:
        return path.relative_to(base_path).as_posix()
    except ValueError:
        return path.name


def checkpoint_files(
    checkpoint: Checkpoint, given: str, prefix: str = "", extras: bool = True
) -> list[tuple[str, str]]:
    """(name, location) of every file a run reads from `checkpoint` (opened from the path or URL
    `given`): its shards, its index when it was read through one, and with `extras` the files it
    carries over (config.json among them). Names are relative to the checkpoint, with `prefix`."""
    base = checkpoint.location
    locations = [h.path for h in checkpoint.shards]
    index = storage.join(base, INDEX_NAME)
    if not storage.isfile(given) and storage.isfile(index):
        locations.append(index)
    if extras:
        locations += [storage.join(base, rel) for rel in checkpoint.extra_files]
    return [(prefix + relative_name(base, location), location) for location in locations]
