"""Publish: finish the output directory under a temporary name, then rename it into place.

Index, config.json (with the `quantization_config` block), the input's other files, our
`compression.json` report and finally `manifest.json` (sha256 and size of every file) are
written into the temporary directory; only then is it renamed to the destination. A crash at
any point leaves either no destination or the previous one, never a partial output that looks
complete; a failure here (a full disk) removes the temporary directory and reports OutputError.
A lock file beside the destination refuses a second concurrent run. After a successful rename,
staging and temporary directories that earlier runs to this destination left under other run keys
(their input or config changed since, so they can never be resumed into it) are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compressor.errors import OutputError
from compressor.formats.checkpoint import INDEX_NAME
from compressor.formats.verify import MANIFEST_NAME, REPORT_NAME
from compressor.stages.plan import Plan
from compressor.stages.write import ShardResult

__all__ = ["MANIFEST_NAME", "REPORT_NAME", "destination_lock", "partial_dir", "publish"]


def partial_dir(plan: Plan) -> Path:
    dest = Path(plan.config.destination)
    return dest.parent / f".{dest.name}.partial-{plan.run_key}"


@contextlib.contextmanager
def destination_lock(destination: str | Path) -> Iterator[None]:
    """Hold `.<dest>.lock` for the run; a live holder makes a second run fail at once."""
    dest = Path(destination)
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def publish(
    plan: Plan,
    directory: Path,
    shards: list[ShardResult],
    quantization_config: dict[str, Any] | None,
    report: dict[str, Any],
) -> Path:
    """Complete `directory` and rename it to the destination; return the destination."""
    try:
        dest = _finish_and_rename(plan, directory, shards, quantization_config, report)
    except OSError as e:
        shutil.rmtree(directory, ignore_errors=True)  # frees the space a full disk needs back
        raise OutputError(
            f"cannot write the output: {e.strerror or e}",
            path=e.filename or str(directory),
            hint="check that the destination's file system is writable and has free space, then "
            "rerun the same command (finished chunks are kept in staging)",
        ) from e
    _remove_stale_runs(plan)
    return dest


def _finish_and_rename(
    plan: Plan,
    directory: Path,
    shards: list[ShardResult],
    quantization_config: dict[str, Any] | None,
    report: dict[str, Any],
) -> Path:
    source_root = plan.checkpoint.root
    weight_map = {name: s.file_name for s in shards for name in s.tensor_names}
    if len(shards) > 1:
        total = sum(s.nbytes for s in shards)
        _write_json(
            directory / INDEX_NAME,
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        )
    for rel in plan.checkpoint.extra_files:
        if rel == "config.json":
            continue
        target = directory / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source_root / rel, target)
    config = dict(plan.checkpoint.config or {})
    if quantization_config is not None:  # None: the output is an ordinary dense model
        config["quantization_config"] = quantization_config
    _write_json(directory / "config.json", config)
    _write_json(directory / REPORT_NAME, report)

    hashed = {s.file_name: (s.sha256, s.nbytes) for s in shards}
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = str(path.relative_to(directory))
        sha, size = hashed.get(rel) or (_sha256(path), path.stat().st_size)
        files[rel] = {"sha256": sha, "size": size}
    _write_json(directory / MANIFEST_NAME, {"version": 1, "files": files})

    dest = Path(plan.config.destination)
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
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(directory, dest)
    return dest


def _remove_stale_runs(plan: Plan) -> None:
    """Remove what runs to this destination under other run keys left behind (a crash, then a
    changed input or config). Staging is only touched in its default place beside the
    destination, which belongs to this destination alone; a `--staging` directory may be shared
    by several destinations, so stale keys there are left to the user. The destination lock,
    held during publish, guarantees that no other run to this destination is using them."""
    dest = Path(plan.config.destination)
    if not plan.config.staging_dir:
        staging_parent = plan.staging_root.parent
        if staging_parent.is_dir():
            for entry in staging_parent.iterdir():
                if entry.name != plan.run_key and entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
    prefix = f".{dest.name}.partial-"
    if dest.parent.is_dir():
        for entry in dest.parent.iterdir():
            if entry.name.startswith(prefix) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
