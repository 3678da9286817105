"""Write: one job per output shard streams its tensors into a safetensors file.

The header is computed from the planned shapes first, then bytes follow tensor by tensor and,
within a tensor, chunk by chunk: memory stays at one chunk, not one shard. Copied tensors are
streamed from the source file bit for bit. The file is written under a temporary name and
renamed when complete; its sha256 goes into the manifest. For an fsspec URL destination the
shard is written to a local temporary file the same way, then uploaded as one object.

When compress assembled the shard files in place (`stages.assemble`), a job only finishes its
file: the small and copied tensors go to their offsets, then fsync, sha256 (one read of the file)
and a rename (or upload) into the output directory.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compressor.errors import OutputError
from compressor.formats import storage
from compressor.formats.layout import OutputSpec
from compressor.formats.safetensors_io import SafetensorsWriter, iter_byte_blocks
from compressor.formats.staging import Staging
from compressor.stages import assemble
from compressor.stages.executor import Executor, Progress
from compressor.stages.plan import OutputShard, Plan, TensorPlan

__all__ = ["ShardResult", "WriteJob", "write", "write_shard"]

STAGE = "write"


@dataclass(frozen=True)
class WriteJob:
    staging: Staging
    shard: OutputShard
    tensors: dict[str, TensorPlan]  # the input tensors this shard's entries come from
    small: dict[str, np.ndarray]  # raw bytes of tiny outputs (shapes, per-tensor scales)
    directory: str
    in_place: bool = False  # the shard file was assembled in staging by compress (`assemble`)


@dataclass(frozen=True)
class ShardResult:
    file_name: str
    nbytes: int
    sha256: str
    tensor_names: tuple[str, ...]


def _blocks(job: WriteJob, spec: OutputSpec):
    """Yield the raw bytes of one output tensor in bounded blocks."""
    if spec.name in job.small:
        yield job.small[spec.name]
        return
    t = job.tensors[spec.source]
    if spec.role == "copy":
        yield from iter_byte_blocks(t.source, t.info)
        return
    if spec.role == "dense":  # pruned, written dense with its zeros
        for r0, r1 in t.chunks:
            yield job.staging.read_rows(f"out/{t.key}/dense", r0, r1)
        return
    scheme, stored = t.scheme, t.stored
    assert scheme is not None and stored is not None

    def read(role: str, first: int, stop: int) -> np.ndarray:
        return job.staging.read_rows(f"out/{t.key}/{role}", first, stop)

    rows_out = spec.shape[0] if spec.shape else 0
    yield from scheme.write_blocks(spec.role, rows_out, stored, t.chunks, read)


def write_shard(job: WriteJob) -> ShardResult:
    if job.in_place:
        return _finish_in_place(job)
    if storage.is_url(job.directory):
        # Object stores take whole objects: stream the shard into a local temporary file (the
        # writer stays bounded in memory), then upload it into the partial prefix.
        with tempfile.TemporaryDirectory(prefix="compressor-shard-") as tmp:
            result = _write_local(job, Path(tmp) / job.shard.file_name)
            target = storage.join(job.directory, job.shard.file_name)
            try:
                storage.put_file(Path(tmp) / job.shard.file_name, target)
            except OSError as e:
                raise OutputError(
                    f"cannot upload the shard: {e.strerror or e}",
                    path=target,
                    hint="check the credentials, the endpoint and the bucket, then rerun (finished "
                    "chunks are kept in staging)",
                ) from e
            return result
    return _write_local(job, Path(storage.local_path(job.directory)) / job.shard.file_name)


def _write_local(job: WriteJob, target: Path) -> ShardResult:
    entries = [(e.name, e.dtype, e.shape) for e in job.shard.entries]
    with SafetensorsWriter(target, entries, metadata={"format": "pt"}) as writer:
        for spec in job.shard.entries:
            for block in _blocks(job, spec):
                writer.write(spec.name, block)
    return ShardResult(
        job.shard.file_name,
        target.stat().st_size,
        writer.sha256.hexdigest(),
        tuple(e.name for e in job.shard.entries),
    )


def _finish_in_place(job: WriteJob) -> ShardResult:
    """Complete a shard that compress assembled in staging: write its small and copied tensors
    at their offsets, fsync, hash, and move (or upload) it into the output directory."""
    name = job.shard.file_name
    staged = assemble.staged_shard(job.staging, name)
    names = tuple(e.name for e in job.shard.entries)
    is_url = storage.is_url(job.directory)
    target = (
        storage.join(job.directory, name)
        if is_url
        else str(Path(storage.local_path(job.directory)) / name)
    )
    if not staged.exists() and not is_url and Path(target).exists():  # a retry: already moved
        return ShardResult(name, Path(target).stat().st_size, _sha256(Path(target)), names)
    _check_complete(job, staged)
    _, infos = assemble.shard_layout(job.shard)
    try:
        fd = os.open(staged, os.O_WRONLY)
        try:
            for spec, info in zip(job.shard.entries, infos, strict=True):
                t = job.tensors[spec.source]
                missing = spec.role == "copy" and not assemble.copied(job.staging, t)
                if spec.name in job.small or missing:
                    blocks = _blocks(job, spec)
                    assemble.copy_into(staged, info.start, blocks, info.nbytes, spec.name)
            # The flush to disk waits on the device, the hash on the CPU: overlap them.
            with ThreadPoolExecutor(1, thread_name_prefix="fsync") as pool:
                flushed = pool.submit(os.fsync, fd)
                digest = _sha256(staged)
                flushed.result()
        finally:
            os.close(fd)
        size = staged.stat().st_size
        if is_url:
            storage.put_file(staged, target)
        else:
            _move(staged, Path(target))
    except OSError as e:
        raise OutputError(
            f"cannot write the shard: {e.strerror or e}",
            path=target,
            hint="check the free space and permissions of the staging and output directories "
            "(and for an object store the credentials), then rerun (finished chunks are kept)",
        ) from e
    return ShardResult(name, size, digest, names)


def _check_complete(job: WriteJob, staged: Path) -> None:
    """Every chunk of every tensor assembled into this shard is recorded as written."""
    for source in sorted({e.source for e in job.shard.entries if e.role in assemble.ROW_ROLES}):
        t = job.tensors[source]
        missing = [
            k for k in range(len(t.chunks)) if job.staging.done(assemble.STAGE, t.key, k) is None
        ]
        if missing or not staged.exists():
            raise OutputError(
                f"{len(missing)} chunk(s) of {source} were never written into the shard",
                path=str(staged),
                tensor=source,
                hint="rerun the same command: unfinished chunks are compressed again",
            )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(8 * 2**20):
            digest.update(block)
    return digest.hexdigest()


def _move(staged: Path, target: Path) -> None:
    """Rename into the output; copy when staging is on another file system."""
    try:
        os.replace(staged, target)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
        shutil.copyfile(staged, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        staged.unlink()


def write(
    plan: Plan,
    staging: Staging,
    small: dict[str, np.ndarray],
    directory: Path | storage.UrlPath,
    executor: Executor,
    progress: Progress | None = None,
    shards: tuple[OutputShard, ...] | None = None,
    in_place: bool = False,
) -> list[ShardResult]:
    """Write every output shard (`shards`: the final layout, by default the plan's); `in_place`:
    compress assembled the shard files in staging, and they only need finishing."""
    by_name = plan.by_name
    jobs = []
    for shard in shards if shards is not None else plan.shards:
        sources = {e.source for e in shard.entries}
        names = {e.name for e in shard.entries}
        jobs.append(
            WriteJob(
                staging,
                shard,
                {s: by_name[s] for s in sources},
                {k: v for k, v in small.items() if k in names},
                str(directory),
                in_place,
            )
        )
    return executor.map(write_shard, jobs, STAGE, progress)
