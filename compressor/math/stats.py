"""Mergeable statistics: each is a `chunk → combine → finalize` triple over small frozen records.

`combine` is associative and commutative, so a Dask tree reduction in any shape and order gives
the statistic of the concatenated array. Exactness:

- counts, min, max, absmax and non-finite counts are exact under any split and merge order;
- sums of squares are float64 sums: any two merge orders agree to a relative error of about
  `n_chunks · 2^-53`, far below the precision of any figure we report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "ErrorStats",
    "RangeStats",
    "combine_errors",
    "combine_ranges",
    "error_stats",
    "range_stats",
]


@dataclass(frozen=True)
class RangeStats:
    """Range of a set of values. Empty sets have count 0 and min=+inf, max=-inf."""

    count: int
    nonfinite: int
    min: float
    max: float

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.count else 0.0


EMPTY_RANGE = RangeStats(count=0, nonfinite=0, min=math.inf, max=-math.inf)


def range_stats(x: torch.Tensor) -> RangeStats:
    """Chunk step: range of the finite values of `x` and how many values are NaN or ±inf."""
    if x.numel() == 0:
        return EMPTY_RANGE
    lo, hi = torch.aminmax(x)
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        # NaN propagates through aminmax and ±inf would be the min or max, so a finite result
        # proves every value is finite: skip the (slow, for bfloat16) element-wise check.
        return RangeStats(count=int(x.numel()), nonfinite=0, min=float(lo), max=float(hi))
    finite = torch.isfinite(x)
    values = x[finite]
    nonfinite = int(x.numel() - values.numel())
    if values.numel() == 0:
        return RangeStats(count=0, nonfinite=nonfinite, min=math.inf, max=-math.inf)
    lo, hi = torch.aminmax(values)
    return RangeStats(count=int(values.numel()), nonfinite=nonfinite, min=float(lo), max=float(hi))


def combine_ranges(*parts: RangeStats) -> RangeStats:
    """Combine step (also the finalize step: the record is already final)."""
    return RangeStats(
        count=sum(p.count for p in parts),
        nonfinite=sum(p.nonfinite for p in parts),
        min=min((p.min for p in parts), default=math.inf),
        max=max((p.max for p in parts), default=-math.inf),
    )


@dataclass(frozen=True)
class ErrorStats:
    """Reconstruction error of x̂ against x, accumulated in float64.

    `finalize` is done by the properties: relative Frobenius error ‖x − x̂‖/‖x‖ and
    SQNR = 10·log10(‖x‖² / ‖x − x̂‖²) dB (inf when exact).
    """

    count: int
    sq_error: float
    sq_signal: float
    max_abs_error: float
    zeros: int = 0  # zeros in x̂ (pruned, or rounded to zero)
    pruned: int = 0  # weights removed by pruning

    @property
    def relative_error(self) -> float:
        if self.sq_signal == 0:
            return 0.0 if self.sq_error == 0 else math.inf
        return math.sqrt(self.sq_error / self.sq_signal)

    @property
    def sqnr_db(self) -> float:
        if self.sq_error == 0:
            return math.inf
        ratio = self.sq_signal / self.sq_error
        if ratio == 0 or math.isnan(ratio):  # no signal, or an infinite error
            return -math.inf
        return 10.0 * math.log10(ratio)

    @property
    def sparsity(self) -> float:
        """Achieved pruning rate (weights removed / weights)."""
        return self.pruned / self.count if self.count else 0.0


def error_stats(
    x: torch.Tensor, x_hat: torch.Tensor, pruned: int = 0, count_zeros: bool = True
) -> ErrorStats:
    """Chunk step: squared error and signal of a block, accumulated in float64.

    The difference is taken in float32 for 16-bit inputs — exact, since both operands are
    16-bit values of nearby magnitude — and in float64 otherwise; the sums of squares reduce in
    float64 without materialising float64 copies of the block (the hot path of compress).
    `count_zeros=False` skips counting x̂'s zeros (only the bitmask layout needs them).
    """
    work = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else torch.float64
    diff = x_hat.to(work) - x.to(work)
    lo, hi = torch.aminmax(diff) if diff.numel() else (torch.zeros(()), torch.zeros(()))
    if work == torch.float32 and not (torch.isfinite(lo) and torch.isfinite(hi)):
        # bfloat16 shares float32's exponent range: a difference of values near its maximum
        # can overflow float32. Rare, so only then redo it in float64.
        diff = x_hat.to(torch.float64) - x.to(torch.float64)
        lo, hi = torch.aminmax(diff)
    return ErrorStats(
        count=int(x.numel()),
        sq_error=float(torch.linalg.vector_norm(diff, dtype=torch.float64)) ** 2,
        sq_signal=float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2,
        max_abs_error=max(-float(lo), float(hi)) if diff.numel() else 0.0,
        zeros=int(x_hat.numel() - int(torch.count_nonzero(x_hat))) if count_zeros else 0,
        pruned=pruned,
    )


def combine_errors(*parts: ErrorStats) -> ErrorStats:
    return ErrorStats(
        count=sum(p.count for p in parts),
        sq_error=math.fsum(p.sq_error for p in parts),
        sq_signal=math.fsum(p.sq_signal for p in parts),
        max_abs_error=max((p.max_abs_error for p in parts), default=0.0),
        zeros=sum(p.zeros for p in parts),
        pruned=sum(p.pruned for p in parts),
    )
