"""Ingest: copy each target tensor's row blocks from safetensors into Zarr staging.

Each job reads one row block with positioned reads (never the whole tensor), writes it to its own
Zarr chunk, and, while the block is in memory, computes the block's range statistics (the
`chunk` step of the stats triple) so the data is not read a second time just to find ranges.
A chunk whose completion marker exists is skipped on a rerun and returns its recorded result.
Tensors that are only copied are not staged: the write stage streams them from the source.

Staging the inputs only pays when something must look at the data before compressing it: a
per-tensor range (tensor strategy), pruning thresholds, an automatic budget, k-means codebooks
(fitted over several passes; their range seeds the initial centroids), or demoting
non-finite tensors. Otherwise (`needs_ingest` is False: the usual channel/group presets) the
compress stage reads its row block straight from the safetensors file — a positioned read costs
a few ms per chunk against ~100 ms to write it to Zarr and read it back — and checks it for
NaN/Inf itself. Resume works the same: compress's completion markers live in staging.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from compressor.formats import dtypes
from compressor.formats.safetensors_io import read_rows
from compressor.formats.staging import Staging
from compressor.math.stats import RangeStats, combine_ranges, range_stats
from compressor.stages.executor import Executor, Progress
from compressor.stages.plan import Plan, TensorPlan

__all__ = [
    "IngestJob",
    "ingest",
    "ingest_chunk",
    "needs_ingest",
    "prepare_staging",
    "source_rows",
]

STAGE = "ingest"


@dataclass(frozen=True)
class IngestJob:
    staging: Staging
    tensor: TensorPlan
    chunk: int


def source_rows(t: TensorPlan, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) of an input tensor as the chunks work on them (an FP8 block-scaled weight
    decoded to bfloat16, anything else as stored)."""
    if t.encoded is not None:
        return t.encoded.decode(r0, r1)
    return dtypes.to_torch(read_rows(t.source, t.info, r0, r1), t.info.dtype)


def ingest_chunk(job: IngestJob) -> RangeStats:
    """Stage one row block; return its range statistics (recorded for resume)."""
    t = job.tensor
    recorded = job.staging.done(STAGE, t.key, job.chunk)
    if recorded is not None:
        return RangeStats(**recorded)
    r0, r1 = t.chunks[job.chunk]
    x = source_rows(t, r0, r1)
    job.staging.write_rows(f"in/{t.key}", r0, dtypes.to_raw(x))
    if t.prune is not None and t.prune.gradient is not None:
        # The gradient is a side input of the same shape: staged in the same row blocks.
        grad_file, grad_info = t.prune.gradient
        job.staging.write_rows(f"in/{t.key}.grad", r0, read_rows(grad_file, grad_info, r0, r1))
    stats = range_stats(x)
    job.staging.mark_done(STAGE, t.key, job.chunk, asdict(stats))
    return stats


def needs_ingest(plan: Plan) -> bool:
    """Whether any stage before compress needs the staged input (see the module docstring)."""
    config = plan.config
    return (
        config.skip_nonfinite
        or config.recipe.budget is not None
        or any(
            t.prune is not None
            or (
                t.scheme is not None
                and t.stored is not None
                and (t.scheme.needs_range(t.stored) or t.scheme.fits_codebook(t.stored))
            )
            for t in plan.staged
        )
    )


def prepare_staging(plan: Plan) -> Staging:
    """Create the staging arrays (metadata only) on the client, before any job runs."""
    staging = Staging(plan.staging_root)
    staging.root.mkdir(parents=True, exist_ok=True)
    for t in plan.staged:
        rows = t.chunks[0][1] - t.chunks[0][0]
        staging.create(f"in/{t.key}", t.info.shape, t.dtype, rows)
        if t.prune is not None and t.prune.gradient is not None:
            grad = t.prune.gradient[1]
            staging.create(f"in/{t.key}.grad", grad.shape, grad.dtype, rows)
    return staging


def ingest(
    plan: Plan, staging: Staging, executor: Executor, progress: Progress | None = None
) -> dict[str, RangeStats]:
    """Stage every target chunk; return each target tensor's range, reduced as a tree."""
    jobs = [IngestJob(staging, t, k) for t in plan.staged for k in range(len(t.chunks))]
    return executor.map_reduce(
        ingest_chunk, jobs, lambda j: j.tensor.name, combine_ranges, STAGE, progress
    )
