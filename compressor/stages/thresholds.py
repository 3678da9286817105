"""Thresholds: finalize the reduced statistics into small per-tensor records on the client.

For now: handle targets with NaN/Inf (a scale computed from them would poison the whole group)
— refuse them, or with `skip_nonfinite` demote them to plain copies (`Plan.demote`: they are
streamed bit for bit from the source by the write stage and listed in the report's notes) —
and compute the parameters that need the range of the whole tensor, which no single chunk sees
(`Scheme.tensor_params`: the integer `tensor` strategy's scale and zero point, NVFP4's global
scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.errors import InputError
from compressor.math.stats import RangeStats
from compressor.stages.fused import shared_ranges
from compressor.stages.plan import Plan

__all__ = ["TensorThresholds", "check_finite", "nonfinite_error", "thresholds"]


@dataclass(frozen=True)
class TensorThresholds:
    """Per-tensor parameters fixed before compression (`Scheme.tensor_params`)."""

    scale: torch.Tensor | None = None  # int tensor strategy: (1, 1) in the weight's dtype;
    # NVFP4: the (1,) float32 global scale
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
    """Per-tensor parameters of every target whose scheme needs its whole range (the integer
    tensor strategy's scale and zero point, NVFP4's global scale), over the tensor's fused
    group where the scheme keeps one parameter per fused module."""
    shared = shared_ranges(plan.fused)
    out: dict[str, TensorThresholds] = {}
    for t in plan.staged:
        scheme, args = t.scheme, t.stored
        if scheme is None or args is None or not scheme.needs_range(args):
            out[t.name] = TensorThresholds()
            continue
        names = shared.get(t.name, (t.name,)) if scheme.fused_range else (t.name,)
        spans = [ranges[n] for n in names if n in ranges]
        if not spans:  # not staged (demoted): copied as is
            out[t.name] = TensorThresholds()
            continue
        lo, hi = min(r.min for r in spans), max(r.max for r in spans)
        scale, zero = scheme.tensor_params(args, lo, hi, t.dtype)
        out[t.name] = TensorThresholds(scale=scale, zero=zero)
    return out
