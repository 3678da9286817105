"""Compress: per chunk, quantize and pack a row block and measure its error.

Stateless and deterministic: a job reads its block from staging, writes its own output chunks,
records completion, and returns the block's error statistics, so Dask may run it anywhere and
retry it freely. Uses CUDA when the worker has a GPU and the CPU otherwise, with the same code.
Work proceeds in blocks of `BLOCK_ROWS` rows so temporaries stay cache-sized.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from compressor.formats import dtypes
from compressor.formats.staging import Staging
from compressor.math.pack import pack_rows, packed_width
from compressor.math.quant import (
    QuantArgs,
    dequantize,
    group_ranges,
    qparams_from_range,
    quantize,
    quantized_range,
)
from compressor.math.stats import ErrorStats, combine_errors, error_stats
from compressor.stages.executor import Executor, Progress
from compressor.stages.plan import Plan, TensorPlan
from compressor.stages.thresholds import TensorThresholds

__all__ = ["CompressJob", "compress", "compress_chunk", "prepare_outputs"]

STAGE = "compress"
BLOCK_ROWS = 256


@dataclass(frozen=True)
class CompressJob:
    staging: Staging
    tensor: TensorPlan
    chunk: int
    thresholds: TensorThresholds


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def quantize_block(
    x: torch.Tensor, args: QuantArgs, fixed: TensorThresholds
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, ErrorStats]:
    """Quantize a (rows, cols) block: unsigned codes, scale, zero/offset, and its error."""
    work = x.to(torch.float64 if x.dtype in (torch.float32, torch.float64) else torch.float32)
    if args.strategy == "tensor":
        assert fixed.scale is not None
        scale = fixed.scale.to(x.device)
        zero = fixed.zero.to(x.device) if fixed.zero is not None else None
    else:
        mins, maxs = group_ranges(work, args)
        scale, zero = qparams_from_range(mins, maxs, args, x.dtype)
    q = quantize(work, scale, zero, args)
    err = error_stats(x, dequantize(q, scale, zero, args, x.dtype))
    qmin, _ = quantized_range(args)
    codes = q - qmin  # compressed-tensors stores q + 2^(b-1); minmax codes are already ≥ 0
    return codes, scale, zero, err


def compress_chunk(job: CompressJob) -> ErrorStats:
    t, staging = job.tensor, job.staging
    recorded = staging.done(STAGE, t.key, job.chunk)
    if recorded is not None:
        return ErrorStats(**recorded)
    args = t.args
    assert args is not None
    r0, r1 = t.chunks[job.chunk]
    dtype = t.info.dtype
    device = _device()
    x = dtypes.to_torch(staging.read_rows(f"in/{t.key}", r0, r1), dtype)
    packed, scales, zeros, errors = [], [], [], []
    for b0 in range(0, r1 - r0, BLOCK_ROWS):
        block = x[b0 : b0 + BLOCK_ROWS].to(device)
        codes, scale, zero, err = quantize_block(block, args, job.thresholds)
        packed.append(pack_rows(codes, args.bits).cpu())
        scales.append(scale.cpu())
        if zero is not None:
            zeros.append(zero.cpu())
        errors.append(err)
    staging.write_rows(f"out/{t.key}/packed", r0, torch.cat(packed).numpy())
    if args.strategy != "tensor":
        staging.write_rows(f"out/{t.key}/scale", r0, dtypes.to_raw(torch.cat(scales)))
        if args.method == "minmax":
            staging.write_rows(f"out/{t.key}/min", r0, dtypes.to_raw(torch.cat(zeros)))
        elif not args.symmetric:
            # Zero points are packed along rows; chunks start at multiples of 32 rows, so this
            # chunk's words start at word r0·b/32 exactly.
            z = torch.cat(zeros).to(torch.int16) - quantized_range(args)[0]
            words = pack_rows(z.T.contiguous(), args.bits).T.contiguous()
            staging.write_rows(f"out/{t.key}/zero", r0 * args.bits // 32, words.numpy())
    total = combine_errors(*errors)
    staging.mark_done(STAGE, t.key, job.chunk, asdict(total))
    return total


def prepare_outputs(plan: Plan, staging: Staging) -> None:
    """Create the output arrays (metadata only) with chunks aligned to the input row blocks."""
    for t in plan.quantized:
        args = t.args
        assert args is not None
        rows, cols = t.shape2d
        chunk_rows = t.chunks[0][1] - t.chunks[0][0]
        staging.create(
            f"out/{t.key}/packed", (rows, packed_width(cols, args.bits)), "I32", chunk_rows
        )
        if args.strategy == "tensor":
            continue
        ngroups = args.groups_per_row(cols)
        staging.create(f"out/{t.key}/scale", (rows, ngroups), t.info.dtype, chunk_rows)
        if args.method == "minmax":
            staging.create(f"out/{t.key}/min", (rows, ngroups), t.info.dtype, chunk_rows)
        elif not args.symmetric:
            staging.create(
                f"out/{t.key}/zero",
                (packed_width(rows, args.bits), ngroups),
                "I32",
                chunk_rows * args.bits // 32,
            )


def compress(
    plan: Plan,
    staging: Staging,
    fixed: dict[str, TensorThresholds],
    executor: Executor,
    progress: Progress | None = None,
) -> dict[str, ErrorStats]:
    prepare_outputs(plan, staging)
    jobs = [
        CompressJob(staging, t, k, fixed[t.name])
        for t in plan.quantized
        for k in range(len(t.chunks))
    ]
    return executor.map_reduce(
        compress_chunk, jobs, lambda j: j.tensor.name, combine_errors, STAGE, progress
    )
