"""Thresholds: finalize the reduced statistics into small per-tensor records on the client.

For now: refuse targets with NaN/Inf (a scale computed from them would poison the whole group),
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

__all__ = ["TensorThresholds", "thresholds"]


@dataclass(frozen=True)
class TensorThresholds:
    """Per-tensor parameters fixed before compression (tensor strategy only, for now)."""

    scale: torch.Tensor | None = None  # (1, 1) in the weight's dtype
    zero: torch.Tensor | None = None  # (1, 1) int8 zero point, or float offset for minmax


def thresholds(plan: Plan, ranges: dict[str, RangeStats]) -> dict[str, TensorThresholds]:
    out: dict[str, TensorThresholds] = {}
    for t in plan.quantized:
        r = ranges[t.name]
        if r.nonfinite:
            raise InputError(
                f"contains {r.nonfinite} NaN or infinite value(s); quantizing it would corrupt "
                "its scales",
                path=t.source,
                tensor=t.name,
                hint="repair the checkpoint, or add the tensor to the recipe's ignore list to "
                "keep it unquantized",
            )
        assert t.args is not None
        if t.args.strategy != "tensor":
            out[t.name] = TensorThresholds()
            continue
        lo = torch.tensor([[r.min]], dtype=torch.float64)
        hi = torch.tensor([[r.max]], dtype=torch.float64)
        scale, zero = qparams_from_range(lo, hi, t.args, dtypes.torch_dtype(t.info.dtype))
        out[t.name] = TensorThresholds(scale=scale, zero=zero)
    return out
