"""Write: one job per output shard streams its tensors into a safetensors file.

The header is computed from the planned shapes first, then bytes follow tensor by tensor and,
within a tensor, chunk by chunk: memory stays at one chunk, not one shard. Copied tensors are
streamed from the source file bit for bit. The file is written under a temporary name and
renamed when complete; its sha256 goes into the manifest. For an fsspec URL destination the
shard is written to a local temporary file the same way, then uploaded as one object.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compressor.errors import OutputError
from compressor.formats import storage
from compressor.formats.layout import OutputSpec
from compressor.formats.safetensors_io import SafetensorsWriter, iter_byte_blocks
from compressor.formats.staging import Staging
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
    if spec.role == "values":  # one array per chunk, concatenated in chunk order
        for k in range(len(t.chunks)):
            yield job.staging.read_rows(f"out/{t.key}/values/c{k:05d}", 0, 2**62)
        return
    if spec.role == "row_offsets":  # a running sum of the per-row kept counts
        offset = 0
        yield np.zeros(1, dtype="<i8")
        for r0, r1 in t.chunks:
            counts = job.staging.read_rows(f"out/{t.key}/row_counts", r0, r1)
            offsets = np.cumsum(counts, dtype="<i8") + offset
            offset = int(offsets[-1])
            yield offsets
        return
    path = f"out/{t.key}/{spec.role}"
    bits = t.args.bits if t.args is not None else 0
    for r0, r1 in t.chunks:
        if spec.role == "zero":  # packed along rows: chunk rows → words
            w0, w1 = r0 * bits // 32, min(spec.shape[0], -(-r1 * bits // 32))
            yield job.staging.read_rows(path, w0, w1)
        else:
            yield job.staging.read_rows(path, r0, r1)


def write_shard(job: WriteJob) -> ShardResult:
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


def write(
    plan: Plan,
    staging: Staging,
    small: dict[str, np.ndarray],
    directory: Path | storage.UrlPath,
    executor: Executor,
    progress: Progress | None = None,
    shards: tuple[OutputShard, ...] | None = None,
) -> list[ShardResult]:
    """Write every output shard (`shards`: the final layout, by default the plan's)."""
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
            )
        )
    return executor.map(write_shard, jobs, STAGE, progress)
