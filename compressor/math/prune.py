"""Pruning: importance scores, exact order-statistic thresholds, and masks.

Importance (float32, ≥ 0, one value per weight of a (rows, cols) block):

    magnitude    |w|
    gradient     |w·g|              first-order Taylor, g from a gradients checkpoint
    activation   |w_ij|·a_j         Wanda, a_j = ‖x_j‖₂ over calibration tokens

Exact thresholds without gathering: a non-negative float32's bit pattern, read as an integer,
orders exactly like the float. So the k-th smallest importance of a scope (one tensor, or all
targets) is found with two mergeable 65,536-bin histograms — of the high 16 bits, then of the
low 16 bits inside the selected high bin — which pin down its exact bit pattern `t`. Ties at `t`
are broken by position (tensors in plan order, elements row-major): each chunk prunes its first
`quota` elements equal to `t`, quotas coming from per-chunk tie counts. The number pruned in a
scope is then exactly k = floor(sparsity·n), and every kept importance ≥ every pruned one.

Structured patterns need no threshold: `row` prunes floor(sparsity·cols) weights of every row
(as Wanda does); N:M keeps the N most important of every M consecutive inputs (ties keep the
lower index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "BINS",
    "Histogram",
    "combine_histograms",
    "high_histogram",
    "importance",
    "importance_bits",
    "low_histogram",
    "nm_mask",
    "row_mask",
    "select",
    "threshold_mask",
]

BINS = 1 << 16


def importance(
    w: torch.Tensor,
    kind: str = "magnitude",
    grad: torch.Tensor | None = None,
    act_norm: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Importance of each weight of a (rows, cols) block, float32 (see the module docstring).

    `scale`, when given, divides the scores (per-tensor normalisation by the mean importance, so
    one global threshold compares layers fairly).
    """
    x = w.to(torch.float32)
    if kind == "magnitude":
        imp = x.abs()
    elif kind == "gradient":
        if grad is None:
            raise ValueError("gradient importance needs the gradient block")
        imp = (x * grad.to(torch.float32)).abs_()
    elif kind == "activation":
        if act_norm is None:
            raise ValueError("activation importance needs the activation norms")
        imp = x.abs_().mul_(act_norm.to(torch.float32).reshape(1, -1))
    else:
        raise ValueError(f"unknown importance {kind!r}")
    if scale is not None:
        imp = imp.div_(scale)
    return imp


def importance_bits(imp: torch.Tensor) -> torch.Tensor:
    """Order-preserving int32 keys of non-negative float32 scores (their IEEE bit patterns,
    a view: no copy). Non-negative floats have the sign bit clear, so the keys are ≥ 0."""
    return imp.contiguous().view(torch.int32)


@dataclass(frozen=True)
class Histogram:
    """Counts per bin: `counts[i]` values fell in bin i. Mergeable by addition."""

    counts: np.ndarray  # int64 (BINS,)

    @property
    def total(self) -> int:
        return int(self.counts.sum())


def high_histogram(imp: torch.Tensor) -> Histogram:
    """Pass 1 chunk step: histogram of the high 16 bits of each score."""
    keys = importance_bits(imp).reshape(-1) >> 16
    return Histogram(torch.bincount(keys, minlength=BINS).numpy().astype(np.int64))


def low_histogram(imp: torch.Tensor, high_bin: int) -> Histogram:
    """Pass 2 chunk step: histogram of the low 16 bits of the scores inside `high_bin`."""
    keys = importance_bits(imp).reshape(-1)
    inside = keys[(keys >> 16) == high_bin] & 0xFFFF
    return Histogram(torch.bincount(inside, minlength=BINS).numpy().astype(np.int64))


def combine_histograms(*parts: Histogram) -> Histogram:
    return Histogram(np.sum([p.counts for p in parts], axis=0))


def select(hist: Histogram, k: int) -> tuple[int, int]:
    """The bin holding the k-th smallest value (1-based) and k's rank inside that bin."""
    if not 1 <= k <= hist.total:
        raise ValueError(f"k={k} outside 1..{hist.total}")
    cumulative = np.cumsum(hist.counts)
    b = int(np.searchsorted(cumulative, k))  # first bin whose cumulative count reaches k
    before = int(cumulative[b - 1]) if b else 0
    return b, k - before


def threshold_mask(imp: torch.Tensor, t_bits: int, quota: int) -> torch.Tensor:
    """Pruned positions (True) of a block: scores below `t`, plus the first `quota` equal to it
    in row-major order."""
    keys = importance_bits(imp)
    mask = keys < t_bits
    if quota > 0:
        ties = keys == t_bits
        order = torch.cumsum(ties.reshape(-1), 0).reshape(ties.shape)
        mask |= ties & (order <= quota)
    return mask


def row_mask(imp: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune floor(sparsity·cols) least important weights of every row (ties: lower index)."""
    cols = imp.shape[1]
    k = int(np.floor(sparsity * cols))
    mask = torch.zeros_like(imp, dtype=torch.bool)
    if k:
        order = torch.sort(imp, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, order, True)
    return mask


def nm_mask(imp: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n most important of every m consecutive inputs (ties keep the lower index)."""
    rows, cols = imp.shape
    if cols % m:
        raise ValueError(f"{cols} inputs are not a multiple of m={m}")
    groups = imp.reshape(rows, cols // m, m)
    # Stable sort of -importance: equal scores keep input order, so lower indices win.
    keep = torch.sort(-groups, dim=2, stable=True).indices[:, :, :n]
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, keep, False)
    return mask.reshape(rows, cols)
