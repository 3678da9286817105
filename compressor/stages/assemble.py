"""In-place assembly: compress tasks write their outputs straight into the final shard files.

Staging the outputs in Zarr and streaming them into safetensors files afterwards moves every
output byte three more times (Zarr write, Zarr read, shard write) and costs more than the
quantization itself once the math is fused (docs/benchmarks.md). But the size and offset of
every output tensor follow from the plan's shard layout before compress starts. So the shard
files are created up front in staging (`shards/<file>`: header written, space reserved), each
compress chunk writes its rows at their final offsets (`pwrite`, no locking: chunks own disjoint
byte ranges), and the write stage adds the small and copied tensors, fsyncs, hashes and moves
each file into the output (`write.write_shard`).

When (`assembles_in_place`): staging is a local directory, workers run on this machine (no
`--scheduler`: workers on other hosts share staging over a network file system, where two hosts
writing neighbouring bytes of one file can overwrite each other's cached pages), and every output
size is known in advance (bitmask pruning counts its kept values only while compressing).
Otherwise outputs are staged in Zarr as before.

Resume: chunks record completion under their own marker stage (`STAGE`), after their bytes are
written. A shard file created anew (first run, or lost since) forgets the markers of the tensors
it holds, so no chunk counts as done unless its bytes are in the file.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from compressor.errors import OutputError
from compressor.formats import storage
from compressor.formats.safetensors_io import TensorInfo, encode_header, iter_byte_blocks
from compressor.formats.staging import Staging
from compressor.schemes import all_schemes
from compressor.stages.plan import OutputShard, Plan, TensorPlan

__all__ = [
    "COPY_STAGE",
    "STAGE",
    "CopyJob",
    "RowTarget",
    "assembles_in_place",
    "copied",
    "copy_into",
    "copy_jobs",
    "copy_part",
    "prepare_shard_files",
    "pwrite_all",
    "shard_layout",
    "staged_shard",
    "write_rows",
]

STAGE = "assemble"  # completion markers of chunks written in place (not "compress": see above)
COPY_STAGE = "assemble-copy"  # parts of copied tensors written into their shard file
COPY_BLOCK = 32 * 2**20  # bytes per copy job
SHARD_METADATA = {"format": "pt"}
# Output tensors that compress writes row block by row block (the others are written whole by
# the write stage: copies, and small tensors such as shapes or per-tensor scales).
ROW_ROLES = frozenset({"dense"}.union(*(s.row_roles for s in all_schemes())))


@dataclass(frozen=True)
class RowTarget:
    """Where a row-major output tensor's data lies in a shard file being assembled."""

    file: str
    start: int  # absolute byte offset of row 0
    row_bytes: int


def assembles_in_place(plan: Plan, staging: Staging, scheduler: str | None) -> bool:
    """Whether this run writes compress outputs straight into shard files (module docstring)."""
    if scheduler is not None or not isinstance(staging.root, Path):
        return False
    return not any(t.scheme is not None and t.scheme.sized_after_compress for t in plan.staged)


def staged_shard(staging: Staging, file_name: str) -> Path:
    assert isinstance(staging.root, Path)
    return staging.root / "shards" / file_name


def shard_layout(shard: OutputShard) -> tuple[bytes, list[TensorInfo]]:
    """The shard file's header and where each of its entries lies (as the writer lays it out)."""
    entries = [(e.name, e.dtype, e.shape) for e in shard.entries]
    return encode_header(entries, SHARD_METADATA, shard.file_name)


def prepare_shard_files(plan: Plan, staging: Staging) -> dict[str, dict[str, RowTarget]]:
    """Create (or keep) every shard file; return each input tensor's targets by output role."""
    targets: dict[str, dict[str, RowTarget]] = {}
    by_name = plan.by_name
    for shard in plan.shards:
        header, infos = shard_layout(shard)
        path = staged_shard(staging, shard.file_name)
        size = infos[-1].end if infos else len(header)
        if not _holds(path, header, size):
            _create(path, header, size)
            for source in {e.source for e in shard.entries}:
                t = by_name[source]
                staging.forget(STAGE, t.key, len(t.chunks))
                staging.forget(COPY_STAGE, t.key, len(copy_parts(t.info.nbytes)))
        for spec, info in zip(shard.entries, infos, strict=True):
            if spec.role in ROW_ROLES and spec.shape and spec.shape[0]:
                row_bytes = info.nbytes // spec.shape[0]
                targets.setdefault(spec.source, {})[spec.role] = RowTarget(
                    str(path), info.start, row_bytes
                )
    return targets


@dataclass(frozen=True)
class CopyJob:
    """Copy bytes [span) of a tensor kept as it is into its place in a shard file.

    Copies are pure I/O; as jobs of the compress stage they fill the workers' idle moments and
    leave the write stage only the small tensors, fsync and the hash.
    """

    staging: Staging
    tensor: TensorPlan
    part: int
    span: tuple[int, int]  # byte range within the tensor's data
    target: RowTarget  # the tensor's data in the shard file (row_bytes unused)


def copy_jobs(plan: Plan, staging: Staging) -> list[CopyJob]:
    """One job per `COPY_BLOCK` bytes of every copied tensor (prepare the shard files first)."""
    by_name = plan.by_name
    jobs = []
    for shard in plan.shards:
        _, infos = shard_layout(shard)
        path = str(staged_shard(staging, shard.file_name))
        for spec, info in zip(shard.entries, infos, strict=True):
            if spec.role != "copy":
                continue
            t = by_name[spec.source]
            for part, span in enumerate(copy_parts(info.nbytes)):
                jobs.append(CopyJob(staging, t, part, span, RowTarget(path, info.start, 0)))
    return jobs


def copy_parts(nbytes: int) -> list[tuple[int, int]]:
    return [(a, min(a + COPY_BLOCK, nbytes)) for a in range(0, nbytes, COPY_BLOCK)]


def copy_part(job: CopyJob) -> None:
    """Run a `CopyJob` (idempotent; skipped when its marker says it was done)."""
    t = job.tensor
    if job.staging.done(COPY_STAGE, t.key, job.part) is not None:
        return
    a, b = job.span
    if storage.is_url(t.source) or not _copy_in_kernel(t, job.target, a, b):
        piece = replace(t.info, start=t.info.start + a, end=t.info.start + b)
        copy_into(
            Path(job.target.file),
            job.target.start + a,
            iter_byte_blocks(t.source, piece),
            b - a,
            t.name,
        )
    job.staging.mark_done(COPY_STAGE, t.key, job.part)


def _copy_in_kernel(t: TensorPlan, target: RowTarget, a: int, b: int) -> bool:
    """`copy_file_range` (no trip through user space; what `cp` uses): False where the file
    systems or the kernel do not support it, and the caller copies through a buffer instead."""
    if not hasattr(os, "copy_file_range"):  # Linux only
        return False
    try:
        src = os.open(storage.local_path(t.source), os.O_RDONLY)
    except OSError:
        return False  # the buffered copy reports it, naming the file
    try:
        dst = os.open(target.file, os.O_WRONLY)
        try:
            done = a
            while done < b:
                n = os.copy_file_range(src, dst, b - done, t.info.start + done, target.start + done)
                if n == 0:  # the source ended early: let the buffered copy say so
                    return False
                done += n
            return True
        finally:
            os.close(dst)
    except OSError as e:
        if e.errno in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
            return False
        raise OutputError(
            f"cannot copy into the output shard: {e.strerror or e}",
            path=target.file,
            tensor=t.name,
            hint="check the staging directory's free space and permissions, then rerun",
        ) from e
    finally:
        os.close(src)


def copied(staging: Staging, t: TensorPlan) -> bool:
    """Whether every part of copied tensor `t` is in its shard file."""
    parts = len(copy_parts(t.info.nbytes))
    return all(staging.done(COPY_STAGE, t.key, k) is not None for k in range(parts))


def copy_into(path: Path, start: int, blocks: Iterable[Any], nbytes: int, tensor: str) -> None:
    """Write byte blocks (bytes or numpy arrays) back to back from `start`; exactly `nbytes`."""
    offset = start
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            for block in blocks:
                data = _bytes_of(block)
                pwrite_all(fd, data, offset)
                offset += data.nbytes
        finally:
            os.close(fd)
    except OSError as e:
        raise OutputError(
            f"cannot write into the output shard: {e.strerror or e}",
            path=str(path),
            tensor=tensor,
            hint="check the staging directory's free space and permissions, then rerun",
        ) from e
    if offset - start != nbytes:
        raise OutputError(
            f"got {offset - start} bytes but the header declares {nbytes}",
            path=str(path),
            tensor=tensor,
            hint="this is a bug in the stage producing this tensor; please report it",
        )


def _bytes_of(block: Any) -> memoryview:
    if isinstance(block, np.ndarray):
        return np.ascontiguousarray(block).data.cast("B")
    return memoryview(block).cast("B")


def _holds(path: Path, header: bytes, size: int) -> bool:
    """Whether `path` is this shard's file from an earlier attempt (same header and size)."""
    try:
        with open(path, "rb") as f:
            return os.fstat(f.fileno()).st_size == size and f.read(len(header)) == header
    except FileNotFoundError:
        return False


def _create(path: Path, header: bytes, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.new")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            # Reserve the space now: a full disk fails here, in the first seconds, not in the
            # middle of compress with half the chunks written.
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, size)
            else:  # macOS: no reservation, only the size (a full disk then fails in pwrite)
                os.ftruncate(fd, size)
            pwrite_all(fd, memoryview(header), 0)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(
            f"cannot create the output shard: {e.strerror or e}",
            path=str(path),
            hint="check that the staging directory is writable and has room for the output "
            "(--staging chooses another place)",
        ) from e


def write_rows(target: RowTarget, first_row: int, values: np.ndarray) -> None:
    """Write `values` (C order, the tensor's storage dtype) as rows `first_row…` of the tensor."""
    data = _bytes_of(values)
    try:
        fd = os.open(target.file, os.O_WRONLY)
        try:
            pwrite_all(fd, data, target.start + first_row * target.row_bytes)
        finally:
            os.close(fd)
    except OSError as e:
        raise OutputError(
            f"cannot write into the output shard: {e.strerror or e}",
            path=target.file,
            hint="check the staging directory's free space and permissions, then rerun (finished "
            "chunks are kept)",
        ) from e


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset` (a regular file may take it in several pieces)."""
    while data.nbytes:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n
