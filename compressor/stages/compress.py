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

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from compressor.formats import dtypes
from compressor.formats.layout import CodebookArgs, nf4_dequantize_rows, nf4_quantize_rows
from compressor.formats.safetensors_io import read_rows
from compressor.formats.staging import Staging
from compressor.math.codebook import NF4_BLOCK, kmeans_assign
from compressor.math.pack import pack_rows, packed_width
from compressor.math.prune import nm_mask, row_mask, threshold_mask
from compressor.math.quant import (
    QuantArgs,
    quantized_range,
)
from compressor.math.rounding import quantize_rows
from compressor.math.stats import ErrorStats, combine_errors, error_stats, range_stats
from compressor.stages.executor import Executor, Progress
from compressor.stages.plan import Plan, TensorPlan
from compressor.stages.stats import ChunkPrune, chunk_importance
from compressor.stages.thresholds import TensorThresholds, nonfinite_error

__all__ = ["CompressJob", "compress", "compress_chunk", "prepare_outputs"]

STAGE = "compress"
# Rows per block of the quantize math: small blocks keep temporaries in cache on the CPU
# (measured 205 → 153 ms per chunk at 64 rows); a GPU wants large ones.
BLOCK_ROWS = 64
GPU_BLOCK_ROWS = 2048


@dataclass(frozen=True)
class CompressJob:
    staging: Staging
    tensor: TensorPlan
    chunk: int
    thresholds: TensorThresholds
    prune: ChunkPrune | None = None
    direct: bool = False  # read the row block from the source file, not from staging
    codebook: tuple[float, ...] | None = None  # k-means: the tensor's stored (float32) centroids


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def quantize_block(
    x: torch.Tensor, args: QuantArgs, fixed: TensorThresholds, rounding: str = "rtn"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Quantize a (rows, cols) block: unsigned codes, scale, zero/offset, and x̂ (x's dtype).

    Per-tensor parameters (`fixed`) apply as they are; otherwise `rounding` chooses each
    group's (`math.rounding.quantize_rows`). Codes are offset to unsigned, as stored.
    """
    scale = fixed.scale.to(x.device) if fixed.scale is not None else None
    zero = fixed.zero.to(x.device) if fixed.zero is not None else None
    q, scale, zero, x_hat = quantize_rows(x, args, rounding, scale, zero)  # type: ignore[arg-type]
    qmin, _ = quantized_range(args)
    codes = q - qmin  # compressed-tensors stores q + 2^(b-1); minmax codes are already ≥ 0
    return codes, scale, zero, x_hat


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


def compress_chunk(job: CompressJob) -> ErrorStats:
    t, staging = job.tensor, job.staging
    recorded = staging.done(STAGE, t.key, job.chunk)
    if recorded is not None:
        return ErrorStats(**recorded)
    r0, r1 = t.chunks[job.chunk]
    dtype = t.info.dtype
    if job.direct:
        x = dtypes.to_torch(read_rows(t.source, t.info, r0, r1), dtype)
        bad = range_stats(x).nonfinite  # ingest checks this when it runs; here it did not
        if bad:
            raise nonfinite_error(t.source, t.name, bad)
    else:
        x = dtypes.to_torch(staging.read_rows(f"in/{t.key}", r0, r1), dtype)
    pruned = x
    removed = 0
    if t.prune is not None:
        assert job.prune is not None
        mask = prune_mask(staging, t, job.chunk, x, job.prune)
        removed = int(mask.sum())
        pruned = x.masked_fill(mask, 0)  # a new tensor: the staged input stays as it was
    if t.args is None:
        total = error_stats(x, pruned, removed)
        _store_pruned(staging, t, r0, job.chunk, pruned)
    elif isinstance(t.args, CodebookArgs):
        total = _codebook_chunk(staging, t, r0, x, t.args, job.codebook)
    else:
        total = _quantize_chunk(staging, t, r0, x, pruned, job.thresholds, removed)
    staging.mark_done(STAGE, t.key, job.chunk, asdict(total))
    return total


def _quantize_chunk(
    staging: Staging,
    t: TensorPlan,
    r0: int,
    x: torch.Tensor,
    pruned: torch.Tensor,
    fixed: TensorThresholds,
    removed: int,
) -> ErrorStats:
    """Quantize a chunk (already pruned) in row blocks, store its outputs, return its error."""
    args = t.args
    assert isinstance(args, QuantArgs)
    device = _device()
    step = GPU_BLOCK_ROWS if device.type == "cuda" else BLOCK_ROWS
    packed, scales, zeros, errors = [], [], [], []
    for b0 in range(0, x.shape[0], step):
        block = pruned[b0 : b0 + step].to(device)
        codes, scale, zero, x_hat = quantize_block(block, args, fixed, t.rounding)
        errors.append(error_stats(x[b0 : b0 + step].to(device), x_hat, count_zeros=False))
        packed.append(pack_rows(codes, args.bits).cpu())
        scales.append(scale.cpu())
        if zero is not None:
            zeros.append(zero.cpu())
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
    return replace(combine_errors(*errors), pruned=removed)


def _codebook_chunk(
    staging: Staging,
    t: TensorPlan,
    r0: int,
    x: torch.Tensor,
    args: CodebookArgs,
    codebook: tuple[float, ...] | None,
) -> ErrorStats:
    """NF4 or k-means codes of a chunk, in row blocks; stores packed codes (and NF4's absmax)."""
    device = _device()
    step = GPU_BLOCK_ROWS if device.type == "cuda" else BLOCK_ROWS
    centroids = None
    if args.method == "kmeans":
        if codebook is None or len(codebook) != args.levels:
            raise ValueError(f"{t.name}: k-means compression needs its {args.levels} centroids")
        centroids = torch.tensor(codebook, dtype=torch.float64, device=device)
    packed, absmaxes, errors = [], [], []
    for b0 in range(0, x.shape[0], step):
        block = x[b0 : b0 + step].to(device)
        if centroids is None:
            codes, absmax = nf4_quantize_rows(block)
            x_hat = nf4_dequantize_rows(codes, absmax, block.dtype)
            absmaxes.append(absmax.cpu())
        else:
            codes = kmeans_assign(block, centroids)
            x_hat = centroids[codes].to(block.dtype)
        errors.append(error_stats(block, x_hat, count_zeros=False))
        packed.append(pack_rows(codes, args.bits).cpu())
    staging.write_rows(f"out/{t.key}/packed", r0, torch.cat(packed).numpy())
    if absmaxes:
        staging.write_rows(f"out/{t.key}/absmax", r0, torch.cat(absmaxes).numpy())
    return combine_errors(*errors)


def _store_pruned(staging: Staging, t: TensorPlan, r0: int, chunk: int, x: torch.Tensor) -> None:
    """A pruned, unquantized chunk: dense with zeros, or kept values + bitmask + row counts."""
    assert t.prune is not None
    if not t.prune.bitmask:
        staging.write_rows(f"out/{t.key}/dense", r0, dtypes.to_raw(x))
        return
    kept = x != 0
    bits = np.packbits(kept.numpy(), axis=1, bitorder="little")
    staging.write_rows(f"out/{t.key}/bitmask", r0, bits)
    staging.write_rows(f"out/{t.key}/row_counts", r0, kept.sum(dim=1).numpy().astype("<i8"))
    values = dtypes.to_raw(x[kept])  # row-major order: row by row, ascending column
    staging.create(
        f"out/{t.key}/values/c{chunk:05d}", values.shape, t.info.dtype, max(1, values.shape[0])
    )
    staging.write_rows(f"out/{t.key}/values/c{chunk:05d}", 0, values)


def prepare_outputs(plan: Plan, staging: Staging) -> None:
    """Create the output arrays (metadata only) with chunks aligned to the input row blocks."""
    for t in plan.staged:
        rows, cols = t.shape2d
        chunk_rows = t.chunks[0][1] - t.chunks[0][0]
        args = t.args
        if args is None:  # pruned only
            assert t.prune is not None
            if t.prune.bitmask:
                staging.create(f"out/{t.key}/bitmask", (rows, -(-cols // 8)), "U8", chunk_rows)
                staging.create(f"out/{t.key}/row_counts", (rows,), "I64", chunk_rows)
            else:
                staging.create(f"out/{t.key}/dense", t.info.shape, t.info.dtype, chunk_rows)
            continue
        staging.create(
            f"out/{t.key}/packed", (rows, packed_width(cols, args.bits)), "I32", chunk_rows
        )
        if isinstance(args, CodebookArgs):
            if args.method == "nf4":
                nblocks = -(-cols // NF4_BLOCK)
                staging.create(f"out/{t.key}/absmax", (rows, nblocks), "F32", chunk_rows)
            continue
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
    prune: dict[tuple[str, int], ChunkPrune] | None = None,
    direct: bool = False,
    codebooks: dict[str, tuple[float, ...]] | None = None,
) -> dict[str, ErrorStats]:
    """Compress every staged chunk; `prune` holds each pruned chunk's decision and `codebooks`
    each k-means tensor's stored centroids (both from the stats stage)."""
    prepare_outputs(plan, staging)
    decisions = prune or {}
    books = codebooks or {}
    jobs = [
        CompressJob(
            staging,
            t,
            k,
            fixed.get(t.name, TensorThresholds()),
            decisions.get((t.name, k)),
            direct,
            books.get(t.name),
        )
        for t in plan.staged
        for k in range(len(t.chunks))
    ]
    return executor.map_reduce(
        compress_chunk, jobs, lambda j: j.tensor.name, combine_errors, STAGE, progress
    )
