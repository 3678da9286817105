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
from typing import cast

import numpy as np
import torch

from compressor.formats import dtypes
from compressor.formats.layout import CodebookArgs, nf4_dequantize_rows, nf4_quantize_rows
from compressor.formats.safetensors_io import read_rows
from compressor.formats.staging import Staging
from compressor.math import kernels
from compressor.math.codebook import NF4_BLOCK, kmeans_assign
from compressor.math.pack import pack_rows, packed_width
from compressor.math.prune import nm_mask, row_mask, threshold_mask
from compressor.math.quant import QuantArgs, quantized_range
from compressor.math.rounding import RoundingMode, quantize_rows, search_qparams
from compressor.math.stats import ErrorStats, combine_errors, error_stats, range_stats
from compressor.stages import assemble
from compressor.stages.assemble import RowTarget
from compressor.stages.executor import Executor, Progress
from compressor.stages.plan import Plan, TensorPlan
from compressor.stages.stats import ChunkPrune, chunk_importance, staged_rows
from compressor.stages.thresholds import TensorThresholds, nonfinite_error

__all__ = [
    "CompressJob",
    "NonFiniteWeights",
    "PackedRows",
    "compress",
    "compress_chunk",
    "prepare_outputs",
    "quantize_rows_packed",
    "takes_fused_kernels",
    "warm_up",
]

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
    # Set when the shard files are assembled in place (`stages.assemble`): each output role's
    # place in its shard file. None: outputs go to Zarr arrays in staging.
    targets: dict[str, RowTarget] | None = None

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


def compress_chunk(job: CompressJob | assemble.CopyJob) -> ErrorStats:
    if isinstance(job, assemble.CopyJob):  # in-place assembly: a piece of a copied tensor
        assemble.copy_part(job)
        return ErrorStats(count=0, sq_error=0.0, sq_signal=0.0, max_abs_error=0.0)
    t, staging = job.tensor, job.staging
    recorded = staging.done(job.stage, t.key, job.chunk)
    if recorded is not None:
        return ErrorStats(**recorded)
    r0, r1 = t.chunks[job.chunk]
    dtype = t.info.dtype
    if job.direct:
        x = dtypes.to_torch(read_rows(t.source, t.info, r0, r1), dtype)
        # Ingest checks for NaN/inf when it runs; here it did not. The fused kernels find them
        # in their range pass (NonFiniteWeights below), every other path checks here.
        if not (takes_fused_kernels(t) and _device().type == "cpu"):
            bad = range_stats(x).nonfinite
            if bad:
                raise nonfinite_error(t.source, t.name, bad)
    else:
        x = staged_rows(staging, t, job.chunk)
    pruned = x
    removed = 0
    if t.prune is not None:
        assert job.prune is not None
        mask = prune_mask(staging, t, job.chunk, x, job.prune)
        removed = int(mask.sum())
        pruned = x.masked_fill(mask, 0)  # a new tensor: the staged input stays as it was
    out = _Outputs(job)
    if t.args is None:
        total = error_stats(x, pruned, removed)
        _store_pruned(out, staging, t, r0, job.chunk, pruned)
    elif isinstance(t.args, CodebookArgs):
        total = _codebook_chunk(out, t, r0, x, t.args, job.codebook)
    else:
        try:
            total = _quantize_chunk(out, t, r0, x, pruned, job.thresholds, removed)
        except NonFiniteWeights as e:
            raise nonfinite_error(t.source, t.name, e.count) from None
    staging.mark_done(job.stage, t.key, job.chunk, asdict(total))
    return total


class NonFiniteWeights(ValueError):
    """The block holds NaN or infinite weights (found by the fused kernels' range pass)."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} NaN or infinite weight(s)")
        self.count = count


@dataclass(frozen=True)
class PackedRows:
    """A quantized row block as stored: packed codes, scales, zero points, and its error."""

    packed: torch.Tensor  # int32 (rows, ceil(cols·bits/32)), codes q − qmin
    scale: torch.Tensor  # (rows, ngroups) in the weight dtype, or (1, 1) for the tensor strategy
    zero: torch.Tensor | None  # int8 zero points / float offsets (minmax), None when symmetric
    error: ErrorStats


def _fused_kind(x: torch.Tensor, args: QuantArgs, fixed: TensorThresholds) -> int | None:
    """The kernels' `kind` when the fused CPU path computes exactly what the torch path does,
    and the work stays on the CPU (a GPU worker moves its blocks to the device instead)."""
    kind = {torch.bfloat16: kernels.BF16, torch.float16: kernels.F16}.get(x.dtype)
    if kind is None or x.device.type != "cpu" or _device().type != "cpu" or args.method != "int":
        return None
    if fixed.scale is not None and fixed.scale.dtype != x.dtype:
        return None
    return kind


def warm_up() -> None:
    """Load (or compile, the first time on a machine) the fused kernels in this process, so the
    cost shows as start-up, not inside the first chunks of the stage."""
    if _device().type == "cpu":
        kernels.warm_up()


def takes_fused_kernels(t: TensorPlan) -> bool:
    """Whether every chunk of `t` runs the fused CPU kernels (which release the GIL)."""
    args = t.args
    return (
        isinstance(args, QuantArgs)
        and args.method == "int"
        and args.strategy != "tensor"
        and t.info.dtype in ("BF16", "F16")
        and t.prune is None
        and t.rounding == "rtn"
    )


def quantize_rows_packed(
    x: torch.Tensor,
    pruned: torch.Tensor,
    args: QuantArgs,
    fixed: TensorThresholds,
    rounding: str = "rtn",
) -> PackedRows:
    """Quantize `pruned` (= `x` when nothing was pruned), pack it, and measure it against `x`.

    On the CPU, integer schemes on 16-bit weights take the fused kernels (`math.kernels`: one
    pass, same bits as the torch path); everything else runs the torch path in blocks of
    `BLOCK_ROWS` (GPU: `GPU_BLOCK_ROWS`) rows so temporaries stay cache-sized.
    """
    kind = _fused_kind(x, args, fixed)
    if kind is not None:
        return _fused_rows(x, pruned, args, fixed, rounding, kind)
    device = _device()
    step = GPU_BLOCK_ROWS if device.type == "cuda" else BLOCK_ROWS
    packed, scales, zeros, errors = [], [], [], []
    for b0 in range(0, x.shape[0], step):
        block = pruned[b0 : b0 + step].to(device)
        codes, scale, zero, x_hat = quantize_block(block, args, fixed, rounding)
        errors.append(error_stats(x[b0 : b0 + step].to(device), x_hat, count_zeros=False))
        packed.append(pack_rows(codes, args.bits).cpu())
        scales.append(scale.cpu())
        if zero is not None:
            zeros.append(zero.cpu())
    if args.strategy == "tensor":  # one (1, 1) parameter set for every block
        return PackedRows(
            torch.cat(packed), scales[0], zeros[0] if zeros else None, combine_errors(*errors)
        )
    return PackedRows(
        torch.cat(packed),
        torch.cat(scales),
        torch.cat(zeros) if zeros else None,
        combine_errors(*errors),
    )


def _fused_rows(
    x: torch.Tensor,
    pruned: torch.Tensor,
    args: QuantArgs,
    fixed: TensorThresholds,
    rounding: str,
    kind: int,
) -> PackedRows:
    rows, cols = x.shape
    raw = dtypes.to_raw(pruned.contiguous()).view(np.uint16)
    reference = None if pruned is x else dtypes.to_raw(x.contiguous()).view(np.uint16)
    group = args.group_size if args.strategy == "group" else cols
    qrange = quantized_range(args)
    if fixed.scale is None and rounding == "rtn":  # parameters from each group's range, same pass
        packed, bits16, zeros, (sq_error, sq_signal, max_abs), bad = kernels.quantize_pack_rtn_16(
            raw, kind, group, args.symmetric, qrange, args.bits, reference
        )
        if bad:
            raise NonFiniteWeights(int((~torch.isfinite(pruned)).sum()))
        scale = torch.from_numpy(bits16.view(np.int16)).view(x.dtype)
        zero = None if zeros is None else torch.from_numpy(zeros)
    else:
        if fixed.scale is not None:
            scale, zero = fixed.scale, fixed.zero
        else:  # the search runs in torch, block by block; the kernel then applies its parameters
            found = [
                search_qparams(
                    pruned[b0 : b0 + BLOCK_ROWS],
                    args,
                    x.dtype,
                    cast(RoundingMode, rounding),
                )
                for b0 in range(0, rows, BLOCK_ROWS)
            ]
            scale = torch.cat([s for s, _ in found])
            zero = (
                None if found[0][1] is None else torch.cat([z for _, z in found if z is not None])
            )
        ngroups = -(-cols // group)
        packed, sq_error, sq_signal, max_abs = kernels.quantize_pack_16(
            raw,
            kind,
            group,
            scale.float().expand(rows, ngroups).contiguous().numpy(),
            None if zero is None else zero.int().expand(rows, ngroups).numpy(),
            qrange,
            args.bits,
            reference,
        )
    error = ErrorStats(x.numel(), sq_error, sq_signal, max_abs)
    return PackedRows(torch.from_numpy(packed), scale, zero, error)


def _quantize_chunk(
    out: _Outputs,
    t: TensorPlan,
    r0: int,
    x: torch.Tensor,
    pruned: torch.Tensor,
    fixed: TensorThresholds,
    removed: int,
) -> ErrorStats:
    """Quantize a chunk (already pruned), store its outputs, return its error."""
    args = t.args
    assert isinstance(args, QuantArgs)
    rows = quantize_rows_packed(x, pruned, args, fixed, t.rounding)
    out.put("packed", r0, rows.packed.numpy())
    if args.strategy != "tensor":
        out.put("scale", r0, dtypes.to_raw(rows.scale))
        if args.method == "minmax":
            assert rows.zero is not None
            out.put("min", r0, dtypes.to_raw(rows.zero))
        elif not args.symmetric:
            assert rows.zero is not None
            # Zero points are packed along rows; chunks start at multiples of 32 rows, so this
            # chunk's words start at word r0·b/32 exactly.
            z = rows.zero.to(torch.int16) - quantized_range(args)[0]
            words = pack_rows(z.T.contiguous(), args.bits).T.contiguous()
            out.put("zero", r0 * args.bits // 32, words.numpy())
    return replace(rows.error, pruned=removed)


def _codebook_chunk(
    out: _Outputs,
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
    out.put("packed", r0, torch.cat(packed).numpy())
    if absmaxes:
        out.put("absmax", r0, torch.cat(absmaxes).numpy())
    return combine_errors(*errors)


def _store_pruned(
    out: _Outputs, staging: Staging, t: TensorPlan, r0: int, chunk: int, x: torch.Tensor
) -> None:
    """A pruned, unquantized chunk: dense with zeros, or kept values + bitmask + row counts."""
    assert t.prune is not None
    if not t.prune.bitmask:
        out.put("dense", r0, dtypes.to_raw(x))
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
    targets: dict[str, dict[str, RowTarget]] | None = None,
) -> dict[str, ErrorStats]:
    """Compress every staged chunk; `prune` holds each pruned chunk's decision and `codebooks`
    each k-means tensor's stored centroids (both from the stats stage). `targets` (from
    `assemble.prepare_shard_files`): write the outputs straight into the shard files instead of
    Zarr arrays."""
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
