"""Compress: per chunk, quantize and pack a row block and measure its error.

Codebook schemes take the same path: NF4 is local to a row block (absmax per 64 values of a
row); a k-means tensor arrives with its codebook, fitted by the stats stage, and each chunk
assigns its weights to the nearest stored (float32) centroid and packs the indices.

Stateless and deterministic: a job reads its block from staging, writes its own output chunks,
records completion, and returns the block's error statistics, so Dask may run it anywhere and
retry it freely. Uses CUDA when the worker has a GPU and the CPU otherwise, with the same code.
Work proceeds in blocks of `BLOCK_ROWS` rows so temporaries stay cache-sized.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from compressor.formats import dtypes
from compressor.formats.staging import Staging
from compressor.math.gptq import InputHessian
from compressor.math.prune import nm_mask, row_mask, threshold_mask
from compressor.math.stats import ErrorStats, combine_errors, error_stats, range_stats
from compressor.schemes import ChunkInput
from compressor.schemes.int_packed import (
    BLOCK_ROWS,
    GPU_BLOCK_ROWS,
    NonFiniteWeights,
    PackedRows,
    device,
    quantize_block,
    quantize_rows_packed,
    warm_up,
)
from compressor.stages import assemble
from compressor.stages.assemble import RowTarget
from compressor.stages.awq import Scaling
from compressor.stages.calibrate import Calibration, Statistic, load_factor, load_hessian
from compressor.stages.executor import Executor, Progress
from compressor.stages.ingest import source_rows
from compressor.stages.plan import Plan, TensorPlan
from compressor.stages.stats import ChunkPrune, chunk_importance, staged_rows
from compressor.stages.thresholds import TensorThresholds, nonfinite_error

__all__ = [
    "BLOCK_ROWS",
    "GPU_BLOCK_ROWS",
    "CompressJob",
    "NonFiniteWeights",
    "PackedRows",
    "compress",
    "compress_chunk",
    "prepare_outputs",
    "quantize_block",
    "quantize_rows_packed",
    "takes_fused_kernels",
    "takes_search_kernels",
    "warm_up",
]

STAGE = "compress"


@dataclass(frozen=True)
class CompressJob:
    staging: Staging
    tensor: TensorPlan
    chunk: int
    thresholds: TensorThresholds
    prune: ChunkPrune | None = None
    direct: bool = False  # read the row block from the source file, not from staging
    codebook: tuple[float, ...] | None = None  # k-means: the tensor's stored (float32) centroids
    # Set when the shard files are assembled in place (`stages.assemble`): each output role's
    # place in its shard file. None: outputs go to Zarr arrays in staging.
    targets: dict[str, RowTarget] | None = None
    # Calibration: the weight's input XᵀX (and GPTQ's factor) as `stages.calibrate` staged it.
    statistic: Statistic | None = None
    # AWQ (`stages.awq`): multipliers of the weight's columns, divisors of its rows (float32).
    columns: np.ndarray | None = None
    row_divisors: np.ndarray | None = None

    @property
    def stage(self) -> str:
        """The marker stage: in-place chunks must not count as done for a Zarr run, or back."""
        return STAGE if self.targets is None else assemble.STAGE


class _Outputs:
    """Where a chunk's output rows go: a staged Zarr array, or their place in the shard file."""

    def __init__(self, job: CompressJob) -> None:
        self.staging = job.staging
        self.key = job.tensor.key
        self.targets = job.targets

    def put(self, role: str, first_row: int, values: np.ndarray) -> None:
        if self.targets is None:
            self.staging.write_rows(f"out/{self.key}/{role}", first_row, values)
        else:
            assemble.write_rows(self.targets[role], first_row, values)

    def put_array(self, name: str, values: np.ndarray, dtype: str) -> None:
        if self.targets is not None:  # sizes unknown before compress: never in place
            raise ValueError(f"{self.key}: {name} cannot be assembled in place")
        path = f"out/{self.key}/{name}"
        self.staging.create(path, values.shape, dtype, max(1, values.shape[0]))
        self.staging.write_rows(path, 0, values)


def takes_fused_kernels(t: TensorPlan) -> bool:
    """Whether every chunk of `t` runs the fused CPU kernels (which release the GIL)."""
    scheme = t.scheme
    return (
        scheme is not None
        and t.args is not None
        and t.prune is None
        and scheme.takes_fused_kernels(t.args, t.dtype, t.rounding)
    )


def takes_search_kernels(t: TensorPlan) -> bool:
    """Whether chunks of `t` search their scales on the fused CPU kernels (mse, hqq)."""
    scheme = t.scheme
    return (
        takes_fused_kernels(t)
        and scheme is not None
        and t.args is not None
        and scheme.takes_search_kernels(t.args, t.dtype, t.rounding)
    )


def prune_mask(
    staging: Staging, t: TensorPlan, chunk: int, x: torch.Tensor, decision: ChunkPrune
) -> torch.Tensor:
    """Positions of the chunk's weights that pruning removes (True)."""
    assert t.prune is not None
    imp = chunk_importance(staging, t, chunk, x, decision.scale)
    if t.prune.nm is not None:
        return nm_mask(imp, *t.prune.nm)
    if t.prune.structure == "row":
        return row_mask(imp, t.prune.sparsity)
    return threshold_mask(imp, decision.t_bits, decision.quota)


def compress_chunk(job: CompressJob | assemble.CopyJob) -> ErrorStats:
    if isinstance(job, assemble.CopyJob):  # in-place assembly: a piece of a copied tensor
        assemble.copy_part(job)
        return ErrorStats(count=0, sq_error=0.0, sq_signal=0.0, max_abs_error=0.0)
    t, staging = job.tensor, job.staging
    recorded = staging.done(job.stage, t.key, job.chunk)
    if recorded is not None:
        return ErrorStats(**recorded)
    r0, r1 = t.chunks[job.chunk]
    if job.direct:
        x = source_rows(t, r0, r1)
        # Ingest checks for NaN/inf when it runs; here it did not. The fused kernels find them
        # in their range pass (NonFiniteWeights below), every other path checks here.
        if not (takes_fused_kernels(t) and device().type == "cpu"):
            bad = range_stats(x).nonfinite
            if bad:
                raise nonfinite_error(t.source, t.name, bad)
    else:
        x = staged_rows(staging, t, job.chunk)
    if job.columns is not None or job.row_divisors is not None:
        x = _equivalently_scaled(x, job.columns, job.row_divisors, r0, r1)
    pruned = x
    removed = 0
    if t.prune is not None:
        assert job.prune is not None
        mask = prune_mask(staging, t, job.chunk, x, job.prune)
        removed = int(mask.sum())
        pruned = x.masked_fill(mask, 0)  # a new tensor: the staged input stays as it was
    out = _Outputs(job)
    scheme, stored = t.scheme, t.stored
    if scheme is None or stored is None:  # pruned, written dense with its zeros
        total = error_stats(x, pruned, removed)
        out.put("dense", r0, dtypes.to_raw(pruned))
    else:
        chunk = ChunkInput(
            x,
            pruned,
            r0,
            job.chunk,
            removed,
            t.rounding,
            job.thresholds.scale,
            job.thresholds.zero,
            job.codebook,
            t.name,
            _hessian(job),
        )
        try:
            total = scheme.encode_chunk(out, stored, chunk)
        except NonFiniteWeights as e:
            raise nonfinite_error(t.source, t.name, e.count) from None
    staging.mark_done(job.stage, t.key, job.chunk, asdict(total))
    return total


def _equivalently_scaled(
    x: torch.Tensor, columns: np.ndarray | None, rows: np.ndarray | None, r0: int, r1: int
) -> torch.Tensor:
    """AWQ's W·diag(s) (and diag(1/s')·W for a producing linear), in float32, stored back in
    the weight's dtype as the checkpoint will hold it."""
    y = x.to(torch.float32)
    if columns is not None:
        y = y * torch.from_numpy(columns)[None, :]
    if rows is not None:
        y = y / torch.from_numpy(rows[r0:r1])[:, None]
    return y.to(x.dtype)


def _hessian(job: CompressJob) -> InputHessian | None:
    if job.statistic is None:
        return None
    return InputHessian(
        load_hessian(job.staging, job.statistic),
        load_factor(job.staging, job.statistic),
        job.statistic.ordered,
    )


def prepare_outputs(plan: Plan, staging: Staging) -> None:
    """Create the output arrays (metadata only) with chunks aligned to the input row blocks."""
    for t in plan.staged:
        chunk_rows = t.chunks[0][1] - t.chunks[0][0]
        scheme, stored = t.scheme, t.stored
        if scheme is None or stored is None:  # pruned only, written dense
            staging.create(f"out/{t.key}/dense", t.info.shape, t.dtype, chunk_rows)
            continue
        for array in scheme.staged_arrays(t.shape2d, t.dtype, stored, chunk_rows):
            staging.create(f"out/{t.key}/{array.role}", array.shape, array.dtype, array.chunk_rows)


def compress(
    plan: Plan,
    staging: Staging,
    fixed: dict[str, TensorThresholds],
    executor: Executor,
    progress: Progress | None = None,
    prune: dict[tuple[str, int], ChunkPrune] | None = None,
    direct: bool = False,
    codebooks: dict[str, tuple[float, ...]] | None = None,
    targets: dict[str, dict[str, RowTarget]] | None = None,
    calibration: Calibration | None = None,
    scaling: Scaling | None = None,
) -> dict[str, ErrorStats]:
    """Compress every staged chunk; `prune` holds each pruned chunk's decision and `codebooks`
    each k-means tensor's stored centroids (both from the stats stage). `targets` (from
    `assemble.prepare_shard_files`): write the outputs straight into the shard files instead of
    Zarr arrays. `calibration` (from `stages.calibrate`): each weight's input statistics, for
    gptq and activation-weighted rounding. `scaling` (from `stages.awq`): AWQ's column and row
    scales per weight."""
    scaled = scaling if scaling is not None else Scaling()
    if targets is None:
        prepare_outputs(plan, staging)
    decisions = prune or {}
    books = codebooks or {}
    jobs: list[CompressJob | assemble.CopyJob] = [
        CompressJob(
            staging,
            t,
            k,
            fixed.get(t.name, TensorThresholds()),
            decisions.get((t.name, k)),
            direct,
            books.get(t.name),
            None if targets is None else targets.get(t.name, {}),
            # rtn chooses its scales from the weights alone: no statistic to read
            calibration.get(t.name) if calibration is not None and t.rounding != "rtn" else None,
            scaled.columns.get(t.name),
            scaled.rows.get(t.name),
        )
        for t in plan.staged
        for k in range(len(t.chunks))
    ]
    if targets is not None:
        # Copied tensors are written into the shard files by the same workers, in between.
        jobs.extend(assemble.copy_jobs(plan, staging))
    errors = executor.map_reduce(
        compress_chunk, jobs, lambda j: j.tensor.name, combine_errors, STAGE, progress
    )
    staged = {t.name for t in plan.staged}
    return {name: e for name, e in errors.items() if name in staged}
