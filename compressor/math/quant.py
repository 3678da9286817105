"""Integer weight quantization: choose parameters, quantize, dequantize.

Notation (rows are output channels, columns the input dimension; groups run along columns):

    x        weights, shape (rows, cols), any float dtype
    g        group size; `ngroups = ceil(cols / g)` (the last group may be partial)
    s        scale per group, shape (rows, ngroups), stored in the weight's float dtype
    z        integer zero point per group (asymmetric "int" schemes), same shape as s
    m        float offset per group (the "minmax" scheme), same shape as s

Schemes:

    int, symmetric:   q = clamp(round(x / s), -2^(b-1), 2^(b-1)-1),     x̂ = q·s
                      s = absmax / ((2^b - 1) / 2)   (compressed-tensors' convention)
    int, asymmetric:  q = clamp(round(x / s) + z, -2^(b-1), 2^(b-1)-1), x̂ = (q - z)·s
                      s = (max' - min') / (2^b - 1), z = clamp(round(-2^(b-1) - min'/s))
                      with min' = min(min, 0), max' = max(max, 0) so that 0 is exact
    minmax:           q = clamp(round((x - m) / s), 0, 2^b - 1),         x̂ = m + q·s
                      s = (max - min) / (2^b - 1), m = min   (the seed article's formula,
                      GGUF Q4_1 style: the float minimum is the offset)

`round` is round-half-to-even. Quantization always divides by the *stored* scale (already
rounded to the output dtype), so the integers written are exactly the ones that reproduce
x̂ on decompression. Scales are computed in float64 and rounded once to the stored dtype. int
schemes quantize in float32 for 16-bit inputs (exact: quotients of two values with ≤ 11
significant bits never land on a false .5 tie) and float64 otherwise; minmax always uses float64
(see `compute_dtype`).

Finite reconstruction: a code can decode slightly beyond the group's range (a symmetric code of
−2^(b−1) reaches absmax·2^b/(2^b−1); rounding the scale up widens every code's reach), which
overflows float16 for weights within a few % of its maximum (65504): compressed-tensors' own
formulas give x̂ = ±inf there. `quantize` therefore keeps each group's codes inside
`finite_code_bounds`, the codes whose x̂ is finite in the scale's dtype (one code nearer the zero
point than plain rounding, for the few weights concerned). The format and the decoder are
unchanged: any compressed-tensors loader decodes these codes to the same finite values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "QuantArgs",
    "compute_dtype",
    "dequantize",
    "finite_code_bounds",
    "finite_limit",
    "group_count",
    "group_ranges",
    "qparams_from_range",
    "quantize",
    "quantized_range",
    "round_to",
]

Method = Literal["int", "minmax"]
Strategy = Literal["tensor", "channel", "group"]


@dataclass(frozen=True)
class QuantArgs:
    """What to do to one weight matrix; the pure-math view of a scheme.

    `group_size` is meaningful only for `strategy == "group"`.
    """

    bits: int
    method: Method = "int"
    symmetric: bool = True
    strategy: Strategy = "group"
    group_size: int = 128

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if self.method == "minmax" and self.symmetric:
            raise ValueError("minmax is asymmetric by definition; set symmetric=False")
        if self.strategy == "group" and self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        if self.strategy != "group":
            # Normalised so equal schemes compare (and hash) equal whatever group size was asked.
            object.__setattr__(self, "group_size", 0)

    def describe(self) -> str:
        """Short human name, e.g. "int4 sym g128", "int8 sym channel", "int4 minmax g128"."""
        kind = "minmax" if self.method == "minmax" else ("sym" if self.symmetric else "asym")
        where = f"g{self.group_size}" if self.strategy == "group" else self.strategy
        return f"int{self.bits} {kind} {where}"

    def groups_per_row(self, cols: int) -> int:
        return group_count(cols, self.strategy, self.group_size)


def group_count(cols: int, strategy: Strategy, group_size: int) -> int:
    """Number of scale columns for a row of `cols` weights."""
    if strategy == "group":
        return math.ceil(cols / group_size)
    return 1


def quantized_range(args: QuantArgs) -> tuple[int, int]:
    """Inclusive integer range of q: signed for int schemes, unsigned for minmax."""
    if args.method == "minmax":
        return 0, (1 << args.bits) - 1
    return -(1 << (args.bits - 1)), (1 << (args.bits - 1)) - 1


def compute_dtype(dtype: torch.dtype, method: Method = "int") -> torch.dtype:
    """The arithmetic dtype of quantize/dequantize (see the module docstring).

    float32 for int schemes on ≤ 16-bit weights (a quotient of two ≤ 11-bit values never lands
    on a false .5 tie in float32), float64 otherwise. minmax always uses float64: its x − m and
    m + q·s are sums, which float32 cannot hold exactly when a group spans many binades.
    """
    if method == "minmax" or dtype in (torch.float32, torch.float64):
        return torch.float64
    return torch.float32


def _effective_group(cols: int, args: QuantArgs) -> int:
    return args.group_size if args.strategy == "group" else cols


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float64 values once, to nearest-even, into `dtype`.

    torch converts float64 to float16/bfloat16 through float32, which rounds twice and can land
    on the wrong side of a tie. Rounding first to float32 *to odd* (truncate, then set the last
    bit when inexact) keeps the information a second round-to-nearest needs: float32 has more than
    two bits beyond either 16-bit format, so the result equals one correct rounding.
    """
    if x.dtype != torch.float64 or dtype not in (torch.float16, torch.bfloat16):
        return x.to(dtype)
    y = x.to(torch.float32)
    back = y.to(torch.float64)
    inexact = back != x
    # Truncate toward zero: step back one float32 where round-to-nearest moved away from zero.
    away = inexact & (back.abs() > x.abs())
    bits = y.view(torch.int32)
    bits = torch.where(away, bits - 1, bits)
    bits = torch.where(inexact, bits | 1, bits)
    return bits.view(torch.float32).to(dtype)


def group_ranges(x: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max of a (rows, cols) block: two (rows, ngroups) tensors.

    Channel strategy is one group per row; the tensor strategy gets its range from the stats
    stage instead (a chunk cannot see the whole tensor), so it is not handled here.
    """
    if args.strategy == "tensor":
        raise ValueError("tensor-strategy ranges come from the stats reduction, not a chunk")
    rows, cols = x.shape
    g = _effective_group(cols, args)
    full = (cols // g) * g
    mins, maxs = [], []
    if full:
        body = x[:, :full].reshape(rows, full // g, g)
        mins.append(body.amin(dim=2))
        maxs.append(body.amax(dim=2))
    if full < cols:  # a partial last group (minmax layout and tests; the planner avoids it for CT)
        tail = x[:, full:]
        mins.append(tail.amin(dim=1, keepdim=True))
        maxs.append(tail.amax(dim=1, keepdim=True))
    return torch.cat(mins, dim=1), torch.cat(maxs, dim=1)


def qparams_from_range(
    mins: torch.Tensor, maxs: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (in `scale_dtype`) and zero point / offset for groups with the given ranges.

    Returns `(scale, zero)`: `zero` is None for symmetric int, an int8 tensor of integer zero
    points for asymmetric int, and a `scale_dtype` tensor of float offsets for minmax. A group
    whose range is empty (all equal values, e.g. all zero) gets scale 1 so nothing divides by 0.
    """
    # Per-group parameters are few: float64 keeps max − min finite for bfloat16 ranges near
    # float32's limit and rounds each scale once, from the exact value, to the stored dtype.
    work = torch.float64
    lo = mins.to(work)
    hi = maxs.to(work)
    qmin, qmax = quantized_range(args)
    levels = float(qmax - qmin)
    if args.method == "minmax":
        scale = _nonzero(round_to((hi - lo) / levels, scale_dtype))
        return scale, round_to(lo, scale_dtype)
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    if args.symmetric:
        absmax = torch.maximum(lo.abs(), hi)
        scale = _nonzero(round_to(absmax / (levels / 2), scale_dtype))
        return scale, None
    scale = _nonzero(round_to((hi - lo) / levels, scale_dtype))
    zero = torch.round(qmin - lo / scale.to(work)).clamp_(qmin, qmax)
    return scale, zero.to(torch.int8)


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """Replace zero (or underflowed) scales by 1: those groups are all one value, q = 0 or z."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _expand(p: torch.Tensor, cols: int, args: QuantArgs) -> torch.Tensor:
    """Broadcast (rows, ngroups) parameters to (rows, cols)."""
    if p.shape[1] == 1:
        return p
    g = args.group_size
    return p.repeat_interleave(g, dim=1)[:, :cols]


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, args: QuantArgs
) -> torch.Tensor:
    """Integer codes of a (rows, cols) block; int16 so every scheme's range fits.

    `scale`/`zero` are (rows, ngroups), or (1, 1) for the tensor strategy.
    """
    work = compute_dtype(scale.dtype, args.method)
    rows, cols = x.shape
    qmin, qmax = quantized_range(args)
    s = scale.to(work)
    ngroups = s.shape[1]
    fast = ngroups == 1 or cols % args.group_size == 0
    y = x.to(work)  # a fresh tensor unless x already has the work dtype
    if y.data_ptr() == x.data_ptr():
        y = y.clone()  # never mutate the caller's block: Dask may retry with the same input
    if fast and ngroups > 1:
        yv = y.view(rows, ngroups, cols // ngroups)
        if args.method == "minmax":
            assert zero is not None
            yv.sub_(zero.to(work).unsqueeze(2))
        yv.div_(s.unsqueeze(2))
    else:
        if args.method == "minmax":
            assert zero is not None
            y.sub_(_expand(zero.to(work), cols, args))
        y.div_(_expand(s, cols, args))
    y.round_()
    if args.method == "int" and zero is not None:
        if fast and ngroups > 1:
            y.view(rows, ngroups, -1).add_(zero.to(work).unsqueeze(2))
        else:
            y.add_(_expand(zero.to(work), cols, args))
    y.clamp_(qmin, qmax)
    bounds = finite_code_bounds(scale, zero, args)
    if bounds is not None:
        lo, hi = (_expand(b.to(work), cols, args) for b in bounds)
        y = torch.minimum(torch.maximum(y, lo), hi)
    return y.to(torch.int16)


def finite_limit(dtype: torch.dtype) -> float:
    """The smallest magnitude that rounds to ±inf in `dtype` (max + half an ulp; inf for
    float64): a value is finite once rounded to `dtype` iff its magnitude is below this."""
    if dtype == torch.float64:
        return math.inf
    info = torch.finfo(dtype)
    return info.max + 2.0 ** math.floor(math.log2(info.max)) * info.eps / 2


def finite_code_bounds(
    scale: torch.Tensor, zero: torch.Tensor | None, args: QuantArgs
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-group inclusive code range `(lo, hi)` (float64, the shape of `scale`) whose x̂ is
    finite in the scale's dtype, or None when that is all of `quantized_range` (the usual case).

    int: x̂ = (q − z)·s, finite iff |q − z|·s < `finite_limit` (the product of an 8-bit integer
    and a stored scale is exact in float64, so the test is exact). minmax: x̂ = m + q·s ≥ m can
    only overflow upwards; the bound is checked with the same float64 operations `dequantize`
    does. Groups with a non-finite scale are left at the full range (they are refused upstream).
    """
    limit = finite_limit(scale.dtype)
    qmin, qmax = quantized_range(args)
    s = scale.to(torch.float64)
    if args.method == "minmax":
        assert zero is not None
        m = zero.to(torch.float64)
        hi = torch.nan_to_num(torch.floor((limit - m) / s), nan=qmax).clamp_(qmin, qmax)
        hi = torch.where(m + hi * s >= limit, hi - 1, hi)
        if bool((hi >= qmax).all()):
            return None
        return torch.full_like(hi, qmin), hi
    levels = float(qmax - qmin)
    k = torch.nan_to_num(torch.floor(limit / s), nan=levels).clamp_(0, levels)
    k = torch.where(k * s >= limit, k - 1, k)
    z = torch.zeros_like(s) if zero is None else zero.to(torch.float64)
    lo = torch.clamp(z - k, min=qmin)
    hi = torch.clamp(z + k, max=qmax)
    if bool((lo <= qmin).all() and (hi >= qmax).all()):
        return None
    return lo, hi


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    args: QuantArgs,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Reconstruct x̂ (rows, cols) in `dtype` from integer codes and parameters.

    int schemes follow compressed-tensors exactly: `(q - z) * s` evaluated in the scale's dtype
    (every product of an 8-bit integer and the scale is exact in float32, so one rounding to the
    scale dtype gives the same bits). minmax evaluates `m + q·s` in the work dtype, then rounds.
    """
    work = compute_dtype(scale.dtype, args.method)
    cols = q.shape[1]
    y = q.to(work)
    if args.method == "minmax":
        assert zero is not None
        y.mul_(_expand(scale.to(work), cols, args)).add_(_expand(zero.to(work), cols, args))
        return round_to(y, dtype)
    if zero is not None:
        y.sub_(_expand(zero.to(work), cols, args))
    y.mul_(_expand(scale.to(work), cols, args))
    return y.to(scale.dtype).to(dtype)
