"""AWQ-style equivalent scaling: per-input-channel scales s that make a weight easier to round.

A linear y = W x is unchanged when its columns are multiplied by s and its input divided by s
(the division is folded into whatever produces x: an RMSNorm's weight, or the rows of the
previous linear). Rounding W·diag(s) instead of W protects the columns of large activations,
at the expense of the others. AWQ picks s = a^α with a the activations' per-channel magnitude
and α in [0, 1] from a grid, by the output error it measures.

Here that error is measured with the calibration stage's XᵀX (H), not by running the module:
the output error of a rounded weight over the calibration tokens is exactly
Σ_rows ΔW H ΔWᵀ, with ΔW = W − Q(W·diag(s))·diag(s)⁻¹. The magnitude a is the activations'
root mean square, sqrt(diag(H) / tokens) (AWQ uses the mean absolute value; the RMS is what H
holds). The grid is tried twice: s = a^α, and AWQ's "duo" form s = a^α / m^(1−α) with m the
weights' mean magnitude per input channel (each weight normalised by its group's maximum, as
llm-compressor does). α = 0 of the first gives s = 1, plain rounding, so the search never does
worse than it on this measure. The rounding in the search is round-to-nearest with min-max scales, what the chunk
then applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from compressor.math.quant import (
    QuantArgs,
    dequantize,
    group_ranges,
    qparams_from_range,
    quantize,
)

__all__ = ["GRID", "ScaleSearch", "fake_quantize", "output_error", "search_scale"]

GRID = 20  # α = 0, 1/20, …, 19/20 (AWQ's grid)
MAX_ROWS = 512  # rows per weight the error is measured on (evenly strided, deterministic)


@dataclass(frozen=True)
class ScaleSearch:
    """The chosen scales (float32, one per input channel), α, whether the duo form won, and the
    output error of every candidate tried (plain α grid, then duo; the first is plain
    rounding's)."""

    scale: torch.Tensor
    alpha: float
    duo: bool
    errors: tuple[float, ...]


def fake_quantize(w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Round-to-nearest with min-max scales, decoded back: what the chunk stores, as values."""
    mins, maxs = group_ranges(w, args)
    scale, zero = qparams_from_range(mins, maxs, args, w.dtype)
    return dequantize(quantize(w, scale, zero, args), scale, zero, args, torch.float32)


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """Σ_rows ΔW H ΔWᵀ: the product in float32 (the search compares candidates; float64 would
    cost 2-4× the time), the final sum in float64."""
    d = delta.to(torch.float32)
    return float(((d @ hessian.to(torch.float32)) * d).sum(dtype=torch.float64))


def weight_magnitude(weights: Sequence[torch.Tensor], args: Sequence[QuantArgs]) -> torch.Tensor:
    """Mean over all rows of |w| / max |w| of its group, per input channel."""
    total = torch.zeros(weights[0].shape[1], dtype=torch.float64)
    rows = 0
    for w, a in zip(weights, args, strict=True):
        x = w.to(torch.float32).abs()
        grouped_inputs = a.strategy == "group" and x.shape[1] % a.group_size == 0
        g = a.group_size if grouped_inputs else x.shape[1]
        grouped = x.reshape(x.shape[0], -1, g)
        peak = grouped.amax(dim=2, keepdim=True)
        normalised = (grouped / torch.where(peak > 0, peak, torch.ones_like(peak))).reshape(x.shape)
        total += normalised.sum(dim=0, dtype=torch.float64)
        rows += x.shape[0]
    return (total / rows).to(torch.float32)


def _rows(w: torch.Tensor) -> torch.Tensor:
    step = max(1, -(-w.shape[0] // MAX_ROWS))
    return w[::step]


def search_scale(
    weights: Sequence[torch.Tensor],
    args: Sequence[QuantArgs],
    hessian: torch.Tensor,
    tokens: int,
    dtype: torch.dtype = torch.bfloat16,
) -> ScaleSearch:
    """The s = a^α (normalised to a geometric mean of max and min of 1, as AWQ does) that
    minimises the summed output error of `weights` (modules reading one input) on the grid;
    each weight is rounded with its own `args`, after scaling in `dtype` (the stored dtype)."""
    h = hessian.to(torch.float32)
    rms = (torch.diagonal(h).clamp_min(0) / max(tokens, 1)).sqrt()
    rms = torch.where(rms > 0, rms, rms[rms > 0].min() if bool((rms > 0).any()) else 1.0)
    sampled = [_rows(w.to(torch.float32)) for w in weights]
    magnitude = weight_magnitude(weights, args)
    best: tuple[float, float, bool, torch.Tensor] | None = None
    errors = []
    for duo in (False, True):
        for k in range(GRID):
            alpha = k / GRID
            s = rms.pow(alpha)
            if duo:
                s = (s / (magnitude.pow(1 - alpha) + 1e-4)).clamp_min(1e-4)
            s = s / (s.max() * s.min()).sqrt()
            error = 0.0
            for w, a in zip(sampled, args, strict=True):
                scaled = (w * s).to(dtype)
                delta = w - fake_quantize(scaled, a) / s
                error += output_error(delta, h)
            errors.append(error)
            if best is None or error < best[0]:
                best = (error, alpha, duo, s)
    assert best is not None
    return ScaleSearch(best[3].to(torch.float32), best[1], best[2], tuple(errors))
