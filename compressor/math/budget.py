"""Bit allocation under a budget: choose one candidate scheme per tensor.

Notation: tensor t has candidates (b, e) = (total stored bits incl. scales/zeros, importance-
weighted squared error). An allocation picks one candidate per tensor; B = Σ b, E = Σ e.

    allocate_bits(C, B_max)      minimise E subject to B ≤ B_max
    allocate_max_error(C, E_max) minimise B subject to E ≤ E_max

Both are multiple-choice knapsacks (NP-hard in general). The method is the classic greedy on
convex hulls (Shoham & Gersho 1988; the Lagrangian view of Everett 1963):

1. Per tensor, drop dominated candidates (more bits and no less error) and keep the lower convex
   hull of (b, e), cheapest first: the steps between hull points have non-increasing
   error-per-bit rates r = Δe/Δb (collinear points are kept, so steps are as small as possible).
2. Start every tensor at its cheapest hull point and take hull steps in order of decreasing r
   across all tensors (a tensor's next step becomes available once its previous one is taken).
   `allocate_bits` skips a step that no longer fits and freezes that tensor; `allocate_max_error`
   stops as soon as E ≤ E_max.
3. Local search: repeatedly apply the single-tensor swap (to any candidate, hull or not) that
   most improves the objective while staying feasible, until none does.

Optimality, precisely. Taking the hull steps in rate order *without skipping* until the first
step that does not fit (rate r*, size Δb*, error drop Δe*) gives the prefix allocation P; the
continuous relaxation (each tensor may mix two adjacent hull points) is then solved exactly by
P plus the fraction (B_max − B_P)/Δb* of that step, so

    LB = E_P − r*·(B_max − B_P) ≤ OPT ≤ E_greedy ≤ E_P,  hence  E_greedy − OPT ≤ E_P − LB < Δe*.

The gap is below the error drop of one hull step, and zero whenever B_max equals the bits of a
prefix (then P is Lagrangian-optimal: it minimises E + λB for λ = r*, so no allocation with
B ≤ B_P has less error). `error_lower_bound` returns LB so a report can state the gap
E_greedy − LB. `allocate_max_error` mirrors this: with the last step of size Δb*,
`bits_lower_bound` ≤ OPT ≤ B_greedy and B_greedy − OPT < Δb*.

Determinism: all sums and comparisons use exact rationals (`fractions.Fraction` of the float
inputs), so the result does not depend on the order of dict entries or float summation. Ties
go to the tensor whose name sorts first, then to the earlier step / the candidate listed first.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

from compressor.math.pack import packed_width
from compressor.math.quant import QuantArgs

__all__ = [
    "Candidate",
    "allocate_bits",
    "allocate_max_error",
    "bits_lower_bound",
    "bits_per_weight",
    "error_lower_bound",
    "stored_bits",
]


@dataclass(frozen=True)
class Candidate:
    """One way to store one tensor: its total stored bits and its (weighted) squared error."""

    name: str
    bits: float
    error: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bits) and self.bits >= 0):
            raise ValueError(
                f"candidate {self.name!r}: bits must be finite and ≥ 0, got {self.bits}"
            )
        if not (math.isfinite(self.error) and self.error >= 0):
            raise ValueError(
                f"candidate {self.name!r}: error must be finite and ≥ 0, got {self.error}"
            )


Candidates = Mapping[str, Sequence[Candidate]]


# --------------------------------------------------------------------------------------------
# Hulls
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    rate: Fraction  # error removed per added bit, > 0
    bits: Fraction
    error: Fraction  # error removed


def _hull(cands: Sequence[Candidate]) -> list[Candidate]:
    """Lower convex hull of the non-dominated candidates, cheapest first (collinear kept)."""
    order = sorted(range(len(cands)), key=lambda i: (cands[i].bits, cands[i].error, i))
    front: list[Candidate] = []
    for i in order:
        c = cands[i]
        if not front or (c.error < front[-1].error and c.bits > front[-1].bits):
            front.append(c)
    hull: list[Candidate] = []
    for c in front:
        while len(hull) >= 2 and _rate(hull[-2], hull[-1]) < _rate(hull[-1], c):
            hull.pop()
        hull.append(c)
    return hull


def _rate(a: Candidate, b: Candidate) -> Fraction:
    return (Fraction(a.error) - Fraction(b.error)) / (Fraction(b.bits) - Fraction(a.bits))


def _steps(hull: list[Candidate]) -> list[_Step]:
    return [
        _Step(
            _rate(a, b), Fraction(b.bits) - Fraction(a.bits), Fraction(a.error) - Fraction(b.error)
        )
        for a, b in itertools.pairwise(hull)
    ]


def _prepare(candidates: Candidates) -> tuple[list[str], dict[str, list[Candidate]]]:
    if not candidates:
        raise ValueError("no tensors to allocate")
    for name, cands in candidates.items():
        if not cands:
            raise ValueError(f"tensor {name!r} has no candidates")
    names = sorted(candidates)
    return names, {n: _hull(candidates[n]) for n in names}


def _order(names: list[str], hulls: dict[str, list[Candidate]]):
    """Hull steps in global order of decreasing rate (ties: name, then step), lazily."""
    steps = {n: _steps(hulls[n]) for n in names}
    heap = [(-steps[n][0].rate, t, 0) for t, n in enumerate(names) if steps[n]]
    heapq.heapify(heap)
    return steps, heap


# --------------------------------------------------------------------------------------------
# Budget on bits
# --------------------------------------------------------------------------------------------


def allocate_bits(candidates_by_tensor: Candidates, budget_bits: float) -> dict[str, Candidate]:
    """Minimise total error with Σ bits ≤ `budget_bits`; one candidate per tensor.

    Raises ValueError when even the cheapest candidates exceed the budget, naming the minimum.
    The result is within `error_lower_bound` (see the module docstring for the bound).
    """
    names, hulls = _prepare(candidates_by_tensor)
    budget = Fraction(budget_bits)
    pos = dict.fromkeys(names, 0)
    used = sum((Fraction(hulls[n][0].bits) for n in names), Fraction(0))
    if used > budget:
        raise ValueError(
            f"budget of {budget_bits:g} bits is infeasible: the cheapest candidate of every "
            f"tensor already needs {float(used):g} bits; raise the budget to at least that"
        )
    steps, heap = _order(names, hulls)
    while heap:
        _, t, i = heapq.heappop(heap)
        n = names[t]
        step = steps[n][i]
        if used + step.bits > budget:
            continue  # freeze this tensor: its later steps only cost more
        used += step.bits
        pos[n] = i + 1
        if i + 1 < len(steps[n]):
            heapq.heappush(heap, (-steps[n][i + 1].rate, t, i + 1))
    choice = {n: hulls[n][pos[n]] for n in names}
    _improve(candidates_by_tensor, names, choice, budget, objective="error")
    return {n: choice[n] for n in candidates_by_tensor}


def error_lower_bound(candidates_by_tensor: Candidates, budget_bits: float) -> float:
    """Optimum of the continuous relaxation: no allocation within the budget has less error."""
    names, hulls = _prepare(candidates_by_tensor)
    budget = Fraction(budget_bits)
    used = sum((Fraction(hulls[n][0].bits) for n in names), Fraction(0))
    error = sum((Fraction(hulls[n][0].error) for n in names), Fraction(0))
    if used > budget:
        raise ValueError(f"budget of {budget_bits:g} bits is below the minimum {float(used):g}")
    steps, heap = _order(names, hulls)
    while heap:
        _, t, i = heapq.heappop(heap)
        step = steps[names[t]][i]
        if used + step.bits > budget:
            return float(error - step.rate * (budget - used))
        used += step.bits
        error -= step.error
        if i + 1 < len(steps[names[t]]):
            heapq.heappush(heap, (-steps[names[t]][i + 1].rate, t, i + 1))
    return float(error)


# --------------------------------------------------------------------------------------------
# Budget on error
# --------------------------------------------------------------------------------------------


def allocate_max_error(candidates_by_tensor: Candidates, max_error: float) -> dict[str, Candidate]:
    """Minimise total bits with Σ error ≤ `max_error`; one candidate per tensor.

    Raises ValueError when even the most accurate candidates exceed `max_error`, naming the
    minimum achievable total error.
    """
    names, hulls = _prepare(candidates_by_tensor)
    limit = Fraction(max_error)
    best = sum((Fraction(hulls[n][-1].error) for n in names), Fraction(0))
    if best > limit:
        raise ValueError(
            f"max_error {max_error:g} is infeasible: the most accurate candidate of every tensor "
            f"still gives a total error of {float(best):g}; allow at least that"
        )
    pos = dict.fromkeys(names, 0)
    error = sum((Fraction(hulls[n][0].error) for n in names), Fraction(0))
    steps, heap = _order(names, hulls)
    while error > limit:
        _, t, i = heapq.heappop(heap)  # never empty here: all steps taken gives `best` ≤ limit
        n = names[t]
        error -= steps[n][i].error
        pos[n] = i + 1
        if i + 1 < len(steps[n]):
            heapq.heappush(heap, (-steps[n][i + 1].rate, t, i + 1))
    choice = {n: hulls[n][pos[n]] for n in names}
    _improve(candidates_by_tensor, names, choice, limit, objective="bits")
    return {n: choice[n] for n in candidates_by_tensor}


def bits_lower_bound(candidates_by_tensor: Candidates, max_error: float) -> float:
    """Optimum of the continuous relaxation: no allocation within `max_error` uses fewer bits."""
    names, hulls = _prepare(candidates_by_tensor)
    limit = Fraction(max_error)
    used = sum((Fraction(hulls[n][0].bits) for n in names), Fraction(0))
    error = sum((Fraction(hulls[n][0].error) for n in names), Fraction(0))
    if sum((Fraction(hulls[n][-1].error) for n in names), Fraction(0)) > limit:
        raise ValueError(f"max_error {max_error:g} is below the minimum achievable error")
    steps, heap = _order(names, hulls)
    while error > limit:
        _, t, i = heapq.heappop(heap)
        step = steps[names[t]][i]
        if error - step.error < limit:
            return float(used + (error - limit) / step.rate)
        used += step.bits
        error -= step.error
        if i + 1 < len(steps[names[t]]):
            heapq.heappush(heap, (-steps[names[t]][i + 1].rate, t, i + 1))
    return float(used)


# --------------------------------------------------------------------------------------------
# Local search
# --------------------------------------------------------------------------------------------


def _improve(
    candidates: Candidates,
    names: list[str],
    choice: dict[str, Candidate],
    limit: Fraction,
    objective: str,
) -> None:
    """Apply the best feasible single-tensor swap until none improves the objective (in place).

    objective "error": lower Σ error keeping Σ bits ≤ limit; "bits": lower Σ bits keeping
    Σ error ≤ limit. Each swap strictly improves a finite objective over a finite set, so this
    terminates. Ties: the first tensor by name, then the candidate listed first.
    """
    bits = sum((Fraction(choice[n].bits) for n in names), Fraction(0))
    error = sum((Fraction(choice[n].error) for n in names), Fraction(0))
    while True:
        best: tuple[Fraction, str, Candidate] | None = None
        for n in names:
            cur = choice[n]
            for c in candidates[n]:
                db = Fraction(c.bits) - Fraction(cur.bits)
                de = Fraction(c.error) - Fraction(cur.error)
                if objective == "error":
                    gain, ok = -de, bits + db <= limit
                else:
                    gain, ok = -db, error + de <= limit
                if ok and gain > 0 and (best is None or gain > best[0]):
                    best = (gain, n, c)
        if best is None:
            return
        _, n, c = best
        bits += Fraction(c.bits) - Fraction(choice[n].bits)
        error += Fraction(c.error) - Fraction(choice[n].error)
        choice[n] = c


# --------------------------------------------------------------------------------------------
# Stored size of an integer scheme
# --------------------------------------------------------------------------------------------


def stored_bits(shape: tuple[int, int], args: QuantArgs, scale_dtype: torch.dtype) -> int:
    """Bits one (rows, cols) weight occupies once quantized with `args`, every output tensor
    counted as the writers lay it out (the scheme's `outputs`, `compressor/schemes/`): packed int32 codes,
    scales in `scale_dtype`, the minmax offset or packed int32 zero points (int8 per tensor), and
    the int64 (2,) shape."""
    rows, cols = shape
    scale_bits = torch.finfo(scale_dtype).bits
    nscales = 1 if args.strategy == "tensor" else rows * args.groups_per_row(cols)
    total = rows * packed_width(cols, args.bits) * 32 + nscales * scale_bits + 2 * 64
    if args.method == "minmax":
        total += nscales * scale_bits
    elif not args.symmetric:
        if args.strategy == "tensor":
            total += 8
        else:
            total += packed_width(rows, args.bits) * args.groups_per_row(cols) * 32
    return total


def bits_per_weight(shape: tuple[int, int], args: QuantArgs, scale_dtype: torch.dtype) -> float:
    """`stored_bits / (rows·cols)`, e.g. ≈ 4.13 for int4 sym g128 with bfloat16 scales."""
    rows, cols = shape
    if rows * cols == 0:
        raise ValueError(f"an empty tensor {shape} has no bits per weight")
    return stored_bits(shape, args, scale_dtype) / (rows * cols)
