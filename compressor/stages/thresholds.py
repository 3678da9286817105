"""Thresholds: finalize the reduced statistics into small per-tensor records on the client.

For now: handle targets with NaN/Inf (a scale computed from them would poison the whole group)
— refuse them, or with `skip_nonfinite` demote them to plain copies (`Plan.demote`: they are
streamed bit for bit from the source by the write stage and listed in the report's notes) —
and compute per-tensor scales and zero points for the `tensor` strategy, which needs the range
of the whole tensor — something no single chunk can see.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.errors import InputError
from compressor.formats import dtypes
from compressor.math.quant import qparams_from_range
from compressor.math.stats import RangeStats
from compressor.stages.plan import Plan

__all__ = ["TensorThresholds", "check_finite", "nonfinite_error", "thresholds"]


@dataclass(frozen=True)
class TensorThresholds:
    """Per-tensor parameters fixed before compression (tensor strategy only, for now)."""

    scale: torch.Tensor | None = None  # (1, 1) in the weight's dtype
    zero: torch.Tensor | None = None  # (1, 1) int8 zero point, or float offset for minmax


def nonfinite_error(source: str, tensor: str, count: int) -> InputError:
    return InputError(
        f"contains {count} NaN or infinite value(s); quantizing it would corrupt its scales",
        path=source,
        tensor=tensor,
        hint="repair the checkpoint, pass --skip-nonfinite to leave such tensors unquantized "
        "(copied as they are), or add the tensor to the recipe's ignore list",
    )


def check_finite(plan: Plan, ranges: dict[str, RangeStats]) -> Plan:
    """Refuse targets holding NaN/Inf, or with `skip_nonfinite` return a plan that copies them.

    Runs right after ingest, before the stats stage, so non-finite values never reach pruning
    histograms or budget measurements.
    """
    demoted: dict[str, str] = {}
    for t in plan.staged:
        r = ranges.get(t.name)
        if r is None or not r.nonfinite:  # not staged: compress checks the source itself
            continue
        if not plan.config.skip_nonfinite:
            raise nonfinite_error(t.source, t.name, r.nonfinite)
        demoted[t.name] = (
            f"{t.name}: {r.nonfinite} NaN or infinite value(s); left unquantized "
            "(copied as is, --skip-nonfinite)"
        )
    return plan.demote(demoted)


def thresholds(plan: Plan, ranges: dict[str, RangeStats]) -> dict[str, TensorThresholds]:
    """Per-tensor parameters of every target (the tensor strategy's scale and zero point)."""
    out: dict[str, TensorThresholds] = {}
    for t in plan.staged:
        r = ranges.get(t.name)
        if r is None or t.args is None or t.args.strategy != "tensor":
            out[t.name] = TensorThresholds()
            continue
        lo = torch.tensor([[r.min]], dtype=torch.float64)
        hi = torch.tensor([[r.max]], dtype=torch.float64)
        scale, zero = qparams_from_range(lo, hi, t.args, dtypes.torch_dtype(t.info.dtype))
        out[t.name] = TensorThresholds(scale=scale, zero=zero)
    return out
