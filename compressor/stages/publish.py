"""Publish: finish the output directory under a temporary name, then rename it into place.

Index, config.json (with the `quantization_config` block), the input's other files, our
`compression.json` report and finally `manifest.json` (sha256 and size of every file) are
written into the temporary directory; only then is it renamed to the destination. A crash at
any point leaves either no destination or the previous one, never a partial output that looks
complete; a failure here (a full disk) removes the temporary directory and reports OutputError.
A lock file beside the destination refuses a second concurrent run. After a successful rename,
staging and temporary directories that earlier runs to this destination left under other run keys
(their input or config changed since, so they can never be resumed into it) are removed.

An fsspec URL destination (``s3://bucket/out``) has no rename: the partial prefix
``.<name>.partial-<key>/`` beside it is completed the same way, then copied to the destination
object by object with `manifest.json` last, and deleted. Only a destination holding
manifest.json is complete; `compressor verify` and readers should trust nothing else. The lock
is an object created with a conditional write where the backend supports one (S3), else none.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compressor.errors import OutputError
from compressor.formats import storage
from compressor.formats.checkpoint import INDEX_NAME
from compressor.formats.verify import MANIFEST_NAME, REPORT_NAME
from compressor.stages.digest import SourceChanged, check_unchanged
from compressor.stages.plan import Plan
from compressor.stages.write import ShardResult

__all__ = [
    "MANIFEST_NAME",
    "REPORT_NAME",
    "destination_lock",
    "partial_dir",
    "publish",
    "run_lock",
    "staging_lock",
]

_log = logging.getLogger(__name__)


def partial_dir(plan: Plan) -> Path | storage.UrlPath:
    dest = storage.as_path(plan.config.destination)
    return dest.parent / f".{dest.name}.partial-{plan.run_key}"


@contextlib.contextmanager
def run_lock(plan: Plan) -> Iterator[None]:
    """What a run holds from its first chunk to its publish: the destination's lock and, with a
    shared `--staging` directory, its staging lock."""
    with destination_lock(plan.config.destination), staging_lock(plan):
        yield


@contextlib.contextmanager
def staging_lock(plan: Plan) -> Iterator[None]:
    """Refuse a second live run on one `--staging` directory with the same input and config
    (so the same `<staging>/<run key>/`): the two would overwrite each other's chunks and fail
    late with a misleading message. The destination lock cannot see it (the destinations
    differ). An `flock` on `<staging>/<run key>/lock`, released by the kernel however the holder
    ends (crash, SIGKILL), so a dead run never blocks the next. The default staging beside the
    destination is covered by the destination's lock; object-store staging is not locked."""
    config = plan.config
    if not config.staging_dir or storage.is_url(config.staging_dir):
        yield
        return
    root = Path(storage.local_path(config.staging_dir)) / plan.run_key
    root.mkdir(parents=True, exist_ok=True)
    lock = root / "lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            raise OutputError(
                f"another run ({holder}) is using this staging directory for the same input "
                "and configuration",
                path=str(root),
                hint="wait for it to finish, or give this run its own --staging directory",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()}:{os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock (publish may have removed the file with the staging)


@contextlib.contextmanager
def destination_lock(destination: str | Path) -> Iterator[None]:
    """Hold `.<dest>.lock` for the run; a live holder makes a second run fail at once."""
    if storage.is_url(destination):
        with _url_lock(str(destination)):
            yield
        return
    dest = Path(storage.local_path(destination))
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = dest.parent / f".{dest.name}.lock"
    owner = f"{socket.gethostname()}:{os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            if _stale(lock):
                lock.unlink(missing_ok=True)
                continue
            holder = lock.read_text(errors="replace").strip() or "another process"
            raise OutputError(
                f"another run ({holder}) is writing this destination",
                path=str(dest),
                hint=f"wait for it to finish; if it died on another host, remove {lock}",
            ) from None
    else:  # pragma: no cover - the stale lock reappeared between two attempts
        raise OutputError("could not take the destination lock", path=str(lock))
    with os.fdopen(fd, "w") as f:
        f.write(owner)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def _url_lock(destination: str) -> Iterator[None]:
    """The lock as an object created with a conditional write (S3 ``If-None-Match``). Where the
    backend cannot create conditionally, runs go unlocked (documented): two concurrent runs to
    one URL destination then race, and the last publish wins."""
    dest = storage.UrlPath(destination)
    lock = str(dest.parent / f".{dest.name}.lock")
    owner = f"{socket.gethostname()}:{os.getpid()}"
    try:
        created = storage.create_exclusive(lock, owner)
    except OSError as e:
        raise OutputError(
            f"cannot write the destination lock: {e.strerror or e}",
            path=lock,
            hint="check the credentials, the endpoint and the bucket (docs/operations.md, Storage)",
        ) from e
    if created is False:
        try:
            holder = storage.read_text(lock).strip() or "another process"
        except OSError:
            holder = "another process"
        raise OutputError(
            f"another run ({holder}) is writing this destination",
            path=destination,
            hint=f"wait for it to finish; if it died, remove {lock}",
        )
    if created is None:
        _log.warning("%s cannot be locked on this storage; do not run two jobs to it", destination)
    try:
        yield
    finally:
        if created:
            with contextlib.suppress(OSError):
                storage.remove(lock)


def _stale(lock: Path) -> bool:
    """A lock is stale when it names a process of this host that no longer exists."""
    try:
        host, pid = lock.read_text().strip().rsplit(":", 1)
    except (OSError, ValueError):
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def publish(
    plan: Plan,
    directory: Path | storage.UrlPath,
    shards: list[ShardResult],
    quantization_config: dict[str, Any] | None,
    report: dict[str, Any],
    source_digests: dict[str, str] | None = None,
) -> Path | storage.UrlPath:
    """Complete `directory` and rename it to the destination; return the destination.

    `source_digests` (sha256 by source file name, from the digest stage) go into the manifest.
    Just before the rename, every source file's stamp is checked against the plan's: an input
    written during the run raises `digest.SourceChanged` and nothing is published."""
    digests = source_digests or {}
    try:
        if isinstance(directory, storage.UrlPath):
            _finish_and_copy(plan, str(directory), shards, quantization_config, report, digests)
            dest: Path | storage.UrlPath = storage.UrlPath(plan.config.destination)
        else:
            dest = _finish_and_rename(plan, directory, shards, quantization_config, report, digests)
    except SourceChanged:
        storage.remove(directory)  # an output of mixed inputs must not linger either
        raise
    except OSError as e:
        storage.remove(directory)  # frees the space a full disk needs back
        raise OutputError(
            f"cannot write the output: {e.strerror or e}",
            path=e.filename or str(directory),
            hint="check that the destination's file system is writable and has free space, then "
            "rerun the same command (finished chunks are kept in staging)",
        ) from e
    _remove_stale_runs(plan)
    return dest


def _metadata_files(
    plan: Plan,
    shards: list[ShardResult],
    quantization_config: dict[str, Any] | None,
    report: dict[str, Any],
) -> dict[str, bytes]:
    """The small files the output holds besides its shards and the input's other files (see
    `_copy_extra_files`): index, config.json with the quantization block, and our report."""
    files: dict[str, bytes] = {}
    if len(shards) > 1:
        weight_map = {name: s.file_name for s in shards for name in s.tensor_names}
        total = sum(s.nbytes for s in shards)
        files[INDEX_NAME] = _json_bytes(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        )
    config = dict(plan.checkpoint.config or {})
    # The input's own block goes (an FP8 block-scaled input is decoded; other quantized inputs
    # are refused by the plan): the output's describes the new scheme only.
    config.pop("quantization_config", None)
    if quantization_config is not None:  # None: the output is an ordinary dense model
        config["quantization_config"] = quantization_config
    files["config.json"] = _json_bytes(config)
    files[REPORT_NAME] = _json_bytes(report)
    return files


_COPY_BLOCK = 8 * 2**20


def _copy_extra_files(plan: Plan, directory: str) -> list[ShardResult]:
    """Stream the input's other files (tokenizer, generation config, anything else, of any size)
    into `directory` in blocks of 8 MiB, hashing on the way: memory stays bounded whatever their
    size (a 768 MB file used to be held whole, twice). Returned as (name, size, sha256) records
    for the manifest. config.json is not copied: it is written with the quantization block."""
    copied = []
    for rel in plan.checkpoint.extra_files:
        if rel == "config.json":
            continue
        source = storage.join(plan.checkpoint.location, rel)
        target = storage.join(directory, rel)
        digest, size = hashlib.sha256(), 0
        if not storage.is_url(target):
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        with storage.open_read(source) as fin, _open_write(target) as fout:
            while block := fin.read(_COPY_BLOCK):
                digest.update(block)
                fout.write(block)
                size += len(block)
        copied.append(ShardResult(rel, size, digest.hexdigest(), ()))
    return copied


def _open_write(path: str) -> Any:
    if storage.is_url(path):
        fs, p = storage.filesystem(path)
        return fs.open(p, "wb")
    return open(path, "wb")


def _manifest(
    plan: Plan, shards: list[ShardResult], files: dict[str, bytes], digests: dict[str, str]
) -> bytes:
    """sha256 and size of every output file (shards hashed as they were written, the rest
    here), and under "source" those of every input file the output was made from."""
    entries = {s.file_name: {"sha256": s.sha256, "size": s.nbytes} for s in shards}
    for rel, data in files.items():
        entries[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest: dict[str, Any] = {"version": 1, "files": dict(sorted(entries.items()))}
    if digests:
        manifest["source"] = {
            "location": storage.shown(plan.checkpoint.location),
            "files": {
                f.name: {"sha256": digests[f.name], "size": f.size}
                for f in plan.sources
                if f.name in digests
            },
        }
    return _json_bytes(manifest)


def _finish_and_rename(
    plan: Plan,
    directory: Path,
    shards: list[ShardResult],
    quantization_config: dict[str, Any] | None,
    report: dict[str, Any],
    digests: dict[str, str],
) -> Path:
    files = _metadata_files(plan, shards, quantization_config, report)
    copied = _copy_extra_files(plan, str(directory))
    for rel, data in files.items():
        target = directory / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (directory / MANIFEST_NAME).write_bytes(_manifest(plan, [*shards, *copied], files, digests))
    check_unchanged(plan.sources)  # last: after the input's files were copied

    dest = Path(storage.local_path(plan.config.destination))
    if dest.exists():
        if not plan.config.overwrite:  # checked in the plan; re-checked in case it appeared since
            raise OutputError(
                "the destination appeared during the run",
                path=str(dest),
                hint="pass --overwrite or choose another destination",
            )
        old = dest.parent / f".{dest.name}.old-{plan.run_key}"
        os.replace(dest, old)
        try:
            os.replace(directory, dest)
        except OSError:
            os.replace(old, dest)  # put the previous output back before reporting
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:  # the replaced destination was a file or a link: rmtree left it behind
            old.unlink(missing_ok=True)
    else:
        os.replace(directory, dest)
    return dest


def _finish_and_copy(
    plan: Plan,
    directory: str,
    shards: list[ShardResult],
    quantization_config: dict[str, Any] | None,
    report: dict[str, Any],
    digests: dict[str, str],
) -> None:
    """`_finish_and_rename` for an object store, which has no rename: complete the partial
    prefix (the manifest last), then copy it to the destination file by file with the manifest
    last, and delete the partial prefix. A destination without manifest.json is incomplete."""
    files = _metadata_files(plan, shards, quantization_config, report)
    copied = _copy_extra_files(plan, directory)
    for rel, data in files.items():
        storage.write_bytes(storage.join(directory, rel), data)
    storage.write_bytes(
        storage.join(directory, MANIFEST_NAME),
        _manifest(plan, [*shards, *copied], files, digests),
    )
    check_unchanged(plan.sources)

    dest = plan.config.destination
    if storage.exists(dest):
        if not plan.config.overwrite:
            raise OutputError(
                "the destination appeared during the run",
                path=dest,
                hint="pass --overwrite or choose another destination",
            )
        storage.remove(dest)  # no rename on object stores: the old output goes first
    for rel in sorted([s.file_name for s in (*shards, *copied)] + list(files)):
        storage.copy_file(storage.join(directory, rel), storage.join(dest, rel))
    storage.copy_file(storage.join(directory, MANIFEST_NAME), storage.join(dest, MANIFEST_NAME))
    storage.remove(directory)


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode("utf-8")


def _remove_stale_runs(plan: Plan) -> None:
    """Remove what runs to this destination under other run keys left behind (a crash, then a
    changed input or config). Staging is only touched in its default place beside the
    destination, which belongs to this destination alone; a `--staging` directory may be shared
    by several destinations, so stale keys there are left to the user. The destination lock,
    held during publish, guarantees that no other run to this destination is using them."""
    if storage.is_url(plan.config.destination):
        _remove_stale_url_runs(plan)
        return
    dest = Path(storage.local_path(plan.config.destination))
    if not plan.config.staging_dir:
        staging_parent = plan.staging_root.parent
        if isinstance(staging_parent, Path) and staging_parent.is_dir():
            for entry in staging_parent.iterdir():
                if entry.name != plan.run_key and entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
    prefix = f".{dest.name}.partial-"
    if dest.parent.is_dir():
        for entry in dest.parent.iterdir():
            if entry.name.startswith(prefix) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)


def _remove_stale_url_runs(plan: Plan) -> None:
    """`_remove_stale_runs` for a URL destination (default staging is beside it, a URL too)."""
    dest = storage.UrlPath(plan.config.destination)
    if not plan.config.staging_dir:
        staging_parent = str(plan.staging_root.parent)
        for entry in storage.list_dir(staging_parent):
            if entry != plan.run_key:
                storage.remove(storage.join(staging_parent, entry))
    prefix = f".{dest.name}.partial-"
    for entry in storage.list_dir(str(dest.parent)):
        if entry.startswith(prefix):
            storage.remove(str(dest.parent / entry))
