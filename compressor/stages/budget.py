"""The automatic budget: choose each target's scheme from the measured candidate errors.

Runs on the client in the thresholds stage: the stats stage has reduced, per tensor, the squared
error of every candidate; `math.budget` picks one candidate per tensor (greedy on each tensor's
lower convex hull of (bits, error), then a local improvement) to minimise the total squared
error under `target_bits · weights` stored bits, or the stored bits under a total error of
`max_error² · ‖W‖²`. Bits are counted exactly as the writers lay the outputs out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from compressor.config import BudgetConfig
from compressor.errors import ConfigError
from compressor.formats import dtypes
from compressor.math.budget import (
    Candidate,
    allocate_bits,
    allocate_max_error,
    bits_lower_bound,
    error_lower_bound,
    stored_bits,
)
from compressor.math.quant import QuantArgs
from compressor.stages.plan import Plan, TensorPlan
from compressor.stages.stats import CandidateErrors

__all__ = ["BudgetChoice", "choose_schemes"]


@dataclass(frozen=True)
class BudgetChoice:
    args: dict[str, QuantArgs]  # tensor → chosen scheme
    summary: dict[str, Any]  # for compression.json


def _dtype(t: TensorPlan) -> torch.dtype:
    return dtypes.torch_dtype(t.dtype)


def _infeasible(
    budget: BudgetConfig, options: dict[str, list[Candidate]], weights: int, signal: float
) -> ConfigError | None:
    """An unreachable budget, said in the user's units (bits per target weight, relative
    error), before `math.budget` would say it in total bits or total squared error."""
    if budget.target_bits is not None:
        least = sum(min(c.bits for c in cands) for cands in options.values()) / weights
        if least <= budget.target_bits:
            return None
        return ConfigError(
            f"the budget --target-bits {budget.target_bits:g} cannot be met: the cheapest "
            "candidate of "
            f"every target already stores {least:.4f} bits per weight (scales, zero points and "
            "shapes counted)",
            hint=f"raise --target-bits to at least {math.ceil(least * 1e4) / 1e4:g}, or "
            "ignore the tensors with the costliest metadata",
        )
    assert budget.max_error is not None
    best = math.fsum(min(c.error for c in cands) for cands in options.values())
    least = math.sqrt(best / signal) if signal > 0 else 0.0
    if least <= budget.max_error:
        return None
    return ConfigError(
        f"the budget --max-error {budget.max_error:g} cannot be met: the most accurate candidate "
        f"of every target still gives a relative error of {least:.4g}",
        hint=f"raise --max-error to at least {math.ceil(least * 1e4) / 1e4:g}",
    )


def choose_schemes(
    plan: Plan,
    budget: BudgetConfig,
    candidates: list[QuantArgs],
    errors: dict[str, CandidateErrors],
) -> BudgetChoice:
    # A fused group (stages/fused.py) is one unit: one candidate for all its members, with
    # their bits and errors summed, so servers that load them as one module can.
    units: dict[str, list[TensorPlan]] = {}
    group_of = {name: g.name for g in plan.fused for name in g.members}
    for t in plan.quantized:
        units.setdefault(group_of.get(t.name, t.name), []).append(t)
    options: dict[str, list[Candidate]] = {}
    for unit, members in units.items():
        options[unit] = [
            Candidate(
                str(k),
                float(sum(stored_bits(t.shape2d, args, _dtype(t)) for t in members)),
                math.fsum(errors[t.name].errors[k] for t in members),
            )
            for k, args in enumerate(candidates)
            if not any(math.isnan(errors[t.name].errors[k]) for t in members)
        ]
        if not options[unit]:
            t = members[0]
            raise ConfigError(
                "no budget candidate fits its shape (every group size fails to divide "
                f"{t.shape2d[1]})",
                path=t.source,
                tensor=t.name,
                hint="add a per-channel candidate or ignore the tensor",
            )
    weights = sum(t.info.numel for t in plan.quantized)
    signal = math.fsum(errors[t.name].signal for t in plan.quantized)
    if (infeasible := _infeasible(budget, options, weights, signal)) is not None:
        raise infeasible
    try:
        if budget.target_bits is not None:
            limit = budget.target_bits * weights
            chosen = allocate_bits(options, limit)
            bound = {"error_lower_bound": error_lower_bound(options, limit)}
        else:
            assert budget.max_error is not None
            limit = budget.max_error**2 * signal
            chosen = allocate_max_error(options, limit)
            bound = {"bits_lower_bound": bits_lower_bound(options, limit)}
    except ValueError as e:
        raise ConfigError(
            f"the budget cannot be met: {e}",
            hint="raise --target-bits / --max-error, or add cheaper candidates",
        ) from e
    args = {t.name: candidates[int(c.name)] for unit, c in chosen.items() for t in units[unit]}
    total_bits = sum(c.bits for c in chosen.values())
    total_error = math.fsum(c.error for c in chosen.values())
    counts: dict[str, int] = {}
    for a in args.values():
        counts[a.describe()] = counts.get(a.describe(), 0) + 1
    return BudgetChoice(
        args,
        {
            "target_bits": budget.target_bits,
            "max_error": budget.max_error,
            "bits_per_weight": total_bits / weights,
            "relative_error": math.sqrt(total_error / signal) if signal else 0.0,
            "schemes": counts,
            **bound,
        },
    )
