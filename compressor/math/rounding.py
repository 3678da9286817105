"""Data-free rounding search: better scales and zero points in the *same* integer formats.

Notation as in `quant` (rows are output channels, groups run along columns):

    x        weights (rows, cols), any float dtype; groups of g columns, `ngroups` per row
    s        scale per group (rows, ngroups), stored in `scale_dtype`
    z / m    integer zero point (int asymmetric) / float offset (minmax), as `quant` stores them
    q        integer codes, `quant.quantize(x, s, z)`
    x̂        `quant.dequantize(q, s, z)` in x's dtype: what a loader reconstructs
    w        importance per weight (any shape broadcastable to (rows, cols)), w ≥ 0; 1 if absent
    E(s, z)  per-group error Σ_group w·(x − x̂)², the quantity every mode minimises

`search_qparams` returns exactly what `qparams_from_range` returns (same shapes, dtypes, zero
convention), so the result feeds `quantize`/`dequantize` and the writers unchanged. Modes:

    rtn   `qparams_from_range(group_ranges(x))`: the round-to-nearest baseline.
    mse   grid search over clipped ranges. Symmetric: the absmax is shrunk by α ∈ {1, …, 0.6}
          (`grid` equally spaced factors). Asymmetric / minmax: the range [lo, hi] (for int
          asymmetric the range that includes 0) is shrunk to width α·(hi − lo) and placed at
          three positions: keeping lo, centred, keeping hi (the two one-sided clips are what
          AWQ's clip search and llama.cpp's `make_qkx` explore; centred is the plain shrink).
          Every candidate goes through `qparams_from_range`, so it is a storable parameter set.
          int schemes walk the grid coarse to fine (`_mse`): every 4th factor (symmetric) or
          every 5th (asymmetric: at the three shifts, the last factor centred only), then ∓2
          and ∓1 factors around the best, at its shift — 9 of the 20 candidates (symmetric),
          14 of 60 (asymmetric), for an error within ~1 % of the whole grid's (tested: ≥ 97 %
          of its gain over RTN); minmax tries the whole grid.
    hqq   int schemes: HQQ-style half-quadratic alternating optimisation (Badri & Shaji 2023),
          extended from the zero point to scale *and* zero: with codes q = clamp(round((x − o)/s))
          and the affine reconstruction s·q + o (o = −s·z for int, o = 0 symmetric),
          repeat `iterations` times
              e  ← shrink_p((x − s·q − o)/s, β)·s      (proximal step of the ℓ_p loss, p = ½)
              s, o ← weighted least squares fit of x − e on q       (closed form, 2×2 normal eqs)
              q  ← clamp(round((x − o)/s)),  β ← κ·β
          snapping every iterate to the format (s to `scale_dtype`, z = round(−o/s) clamped to
          the code range for int asymmetric) and going on from
          the snapped one: the codes are then always the stored format's own, so the fit sees
          the integer zero point it must live with, and the fused kernel measures an iterate
          in the pass that fits the next. Against carrying the continuous (s, o) between
          iterations (as until 0d3e159), on three SmolLM2 weights: 5 % less error at int4
          asym g64 (6 % weighted), 0.2 % more at int4 sym g128 (`bench.search_quality`).
          minmax (`_offset_fit`): the `hqq` library's own default optimiser, which a float
          offset can keep. At its defaults (ℓ0.7 shrink, β = 10 in weight units) the shrink
          zeroes every residual of real weights, so it is a least-squares fit of the offset
          alone: the scale stays the full range's, the offset starts on the grid through 0
          (the library's rounded zero) and moves by the group's mean error, stopping after the
          first pass whose mean |error| did not fall (`OFFSET_FIT_ITERATIONS` at most). It
          ends in a different local optimum than the squared-error searches, with slightly more
          squared error and much less perplexity loss (SmolLM2 4-bit g64: +16.8 % against
          +21.7 % for minmax `mse`; Gemma 3 270M: +23.6 against +25.6 %; docs/accuracy.md), so
          it is kept as the library runs it: without the per-group choice against RTN below.

Guarantee (all modes but minmax's hqq): every candidate is evaluated in the stored format, and
the RTN parameters are always a candidate, so for every group E(chosen) ≤ E(rtn). The search ranks
candidates by an error accumulated in the work dtype (`quant.compute_dtype`); the final choice
between the best candidate and RTN compares float64 errors of the bit-exact reconstructions, and
keeps RTN unless the candidate is strictly better. "≤" therefore holds exactly for E as computed
in float64 by `reconstruction_error` (summation order aside: any float64 recomputation agrees to a
relative ~g·2^-53). Groups whose RTN error is NaN (non-finite weights) keep RTN.

The search reconstructs x̂ with a private fused path on a (rows, ngroups, g) view that performs
the same IEEE operations in the same dtypes as `quantize` followed by `dequantize`; a test pins it
to `reconstruction_error` bit for bit. Partial last groups (cols % g ≠ 0) are padded (by repeating
the row's last weight) with importance 0 on the padding, so they work for every method.

Cost: mse evaluates 1 + 9 candidates (int symmetric), 1 + 19 (int asymmetric) or
1 + 3·(grid − 1) (minmax), hqq `iterations` iterates (minmax: until its last group stops);
each evaluation is ~8 vectorised passes over the block (no Python loop over groups), plus two
float64 passes for the final choice. Measured on bfloat16
1024×1024 Student-t weights, int4 g128, defaults, one CPU thread of the (shared, loaded) test
machine, CPU time per 1M weights, before the walk: rtn ≈ 1.3 ms; mse ≈ 75 ms (sym), ≈ 230 ms (asym),
≈ 200 ms (minmax); hqq ≈ 175-300 ms. Peak memory is about six copies of the block in the work
dtype. The same code runs on CUDA tensors. On the CPU, compress runs int schemes' mse and hqq
on 16-bit weights through `fused_search` instead (`math.search_kernels`: the same walk and
iteration, one compiled loop per group; docs/benchmarks.md has the figures).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from compressor.math.quant import (
    QuantArgs,
    compute_dtype,
    dequantize,
    finite_code_bounds,
    group_ranges,
    qparams_from_range,
    quantize,
    quantized_range,
    round_to,
)

__all__ = [
    "HQQ_ITERATIONS",
    "MSE_GRID",
    "OFFSET_FIT_ITERATIONS",
    "RoundingMode",
    "fused_search",
    "quantize_rows",
    "reconstruction_error",
    "search_qparams",
]

RoundingMode = Literal["rtn", "mse", "hqq"]

_SHRINK_MIN = 0.6  # smallest range fraction the mse grid tries
_SHIFTS = (0.0, 0.5, 1.0)  # where the shrunk range sits: keep lo, centred, keep hi
# hqq's schedule: 5 iterations, β from 1.5 doubling (1.5 … 24, in code units: residuals divided
# by s). Against the 15 of β 0.3 × 1.3ⁿ it had until 2026-12-05 it runs a third of the passes
# (≤ 5× RTN's time) and, data-free, has less perplexity in 7 of 8 cases measured (far less at
# 3 bits); weighted by calibration it has 1-2 points more at 4 bits and 15-25 more at 3 bits,
# where GPTQ is the method (docs/benchmarks.md, "hqq's schedule"; `bench.hqq_schedule`).
_HQQ_BETA = 1.5  # initial penalty
_HQQ_KAPPA = 2.0  # β growth per iteration (HQQ's annealing: the fit settles as β grows)
MSE_GRID = 21  # mse's shrink factors, 1.0 down to 0.6
# mse first tries every k-th shrink factor (and the last) at each shift, then steps of 2 and 1
# around the best; k by the number of shifts: 4 symmetric, 5 asymmetric, whose three shifts make
# each factor three error passes. Asymmetric tries its last factor (0.6) centred only: the
# one-sided placements' coarse clips stop at 0.7, 30 % of the range off one end (the steps reach
# 0.64), the centred one's at a fifth off each end. 10 coarse candidates instead of 15 put
# weighted asymmetric mse under 5× RTN's time (5.5× before), for 98.2 % of the whole grid's gain
# over RTN on average instead of 98.8 % (docs/benchmarks.md, "mse's asymmetric walk";
# `bench.mse_walks`).
MSE_COARSE = {1: 4, 3: 5}  # shifts → coarse spacing
HQQ_ITERATIONS = 5
OFFSET_FIT_ITERATIONS = 20  # minmax's hqq: the hqq library's cap on its passes

QParams = tuple[torch.Tensor, torch.Tensor | None]


def search_qparams(
    x: torch.Tensor,
    args: QuantArgs,
    scale_dtype: torch.dtype,
    mode: RoundingMode,
    importance: torch.Tensor | None = None,
    grid: int = MSE_GRID,
    iterations: int | None = None,
) -> QParams:
    """Scale and zero/offset for a (rows, cols) block, chosen by `mode` (see the module doc).

    Returns `(scale, zero)` with the shapes and dtypes of `qparams_from_range`: scale
    (rows, ngroups) in `scale_dtype`; zero None (int symmetric), int8 integer zero points (int
    asymmetric) or `scale_dtype` float offsets (minmax). For every group the weighted squared
    reconstruction error is ≤ RTN's (but for minmax's hqq, the library's offset fit).
    `importance` (≥ 0, broadcastable to (rows, cols), e.g. a per-input-column (cols,) vector)
    weights the error; `grid` is the number of shrink factors of `mse` (1.0 down to 0.6);
    `iterations` the number of `hqq` steps (default `HQQ_ITERATIONS`, minmax
    `OFFSET_FIT_ITERATIONS`). Never mutates `x`.

    >>> x = torch.randn(8, 256, dtype=torch.bfloat16)
    >>> args = QuantArgs(bits=4, symmetric=True, strategy="group", group_size=128)
    >>> s, z = search_qparams(x, args, torch.bfloat16, "mse")
    >>> s.shape, s.dtype, z
    (torch.Size([8, 2]), torch.bfloat16, None)
    """
    if x.dim() != 2:
        raise ValueError(f"expected a (rows, cols) block, got shape {tuple(x.shape)}")
    if args.strategy == "tensor":
        raise ValueError(
            "tensor-strategy parameters come from the stats reduction over the whole tensor; "
            "use strategy='channel' or 'group' for a per-block search"
        )
    if mode not in ("rtn", "mse", "hqq"):
        raise ValueError(f"mode must be 'rtn', 'mse' or 'hqq', got {mode!r}")
    if iterations is None:
        iterations = OFFSET_FIT_ITERATIONS if args.method == "minmax" else HQQ_ITERATIONS
    if grid < 1 or iterations < 0:
        raise ValueError(f"grid must be ≥ 1 and iterations ≥ 0, got {grid} and {iterations}")
    lo, hi = group_ranges(x, args)
    rtn = qparams_from_range(lo, hi, args, scale_dtype)
    if mode == "rtn" or x.numel() == 0:
        return rtn
    blocks = _Blocks.build(x, args, scale_dtype, importance)
    if mode == "hqq" and args.method == "minmax":
        return _offset_fit(blocks, rtn, lo, iterations)
    best = _Best(blocks, rtn)
    if mode == "mse":
        _mse(best, rtn, _mse_candidates(lo, hi, args, scale_dtype, grid), grid)
    else:
        _hqq(blocks, rtn, best, iterations)
    return best.finish(rtn)


def reconstruction_error(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    args: QuantArgs,
    importance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-group Σ w·(x − x̂)² in float64, (rows, ngroups), x̂ from the real quantize/dequantize.

    The general (slow) path: the reference the search's fused path is tested against.
    """
    rows, cols = x.shape
    xhat = dequantize(quantize(x, scale, zero, args), scale, zero, args, x.dtype)
    d = xhat.to(torch.float64) - x.to(torch.float64)
    e = d * d
    if importance is not None:
        e = e * torch.broadcast_to(importance.to(torch.float64), (rows, cols))
    g = cols if args.strategy != "group" else args.group_size
    ngroups = -(-cols // g)
    padded = torch.zeros((rows, ngroups * g), dtype=torch.float64, device=x.device)
    padded[:, :cols] = e
    return padded.view(rows, ngroups, g).sum(dim=2)


# --------------------------------------------------------------------------------------------
# Grouped view and the fused reconstruction
# --------------------------------------------------------------------------------------------


class _Blocks:
    """x in the work dtype as (rows, ngroups, g), padded, and the matching weights.

    `w` (work dtype, for ranking) and `w64` (float64, for the final choice) are None when every
    weight counts once (no importance, no padding); otherwise they are (1 or rows, ngroups, g)
    and 0 on the padding.
    """

    def __init__(
        self,
        x: torch.Tensor,
        w: torch.Tensor | None,
        w64: torch.Tensor | None,
        args: QuantArgs,
        dtype: torch.dtype,
        scale_dtype: torch.dtype,
    ) -> None:
        self.x = x
        self.w = w
        self.w64 = w64
        self.args = args
        self.dtype = dtype
        self.scale_dtype = scale_dtype
        self.work = x.dtype
        self._buffer: torch.Tensor | None = None

    @staticmethod
    def build(
        x: torch.Tensor,
        args: QuantArgs,
        scale_dtype: torch.dtype,
        importance: torch.Tensor | None,
    ) -> _Blocks:
        work = compute_dtype(scale_dtype)
        rows, cols = x.shape
        g = args.group_size if args.strategy == "group" else cols
        ngroups = -(-cols // g)
        pad = ngroups * g - cols
        xw = x.to(work)  # may alias x (float64 weights): the search only ever reads it
        if pad:
            # Repeat the last column rather than pad with 0: the padding then reconstructs as
            # finitely as a real weight of its group, so weight 0 never meets inf (0·inf = NaN).
            xw = torch.cat([xw, xw[:, -1:].expand(rows, pad)], dim=1)
        xw = xw.reshape(rows, ngroups, g)
        if importance is None:
            if not pad:
                return _Blocks(xw, None, None, args, x.dtype, scale_dtype)
            imp = torch.ones((1, cols), dtype=torch.float64, device=x.device)
        else:
            imp = importance.to(device=x.device, dtype=torch.float64)
            if bool((imp < 0).any()) or not bool(torch.isfinite(imp).all()):
                raise ValueError("importance must be finite and non-negative")
            try:
                imp = torch.broadcast_to(imp, (rows, cols))
            except RuntimeError as err:
                raise ValueError(
                    f"importance of shape {tuple(imp.shape)} does not broadcast to the block's "
                    f"({rows}, {cols}); pass (cols,), (1, cols), (rows, 1) or (rows, cols)"
                ) from err
            if importance.dim() < 2 or importance.shape[0] == 1:
                imp = imp[:1]  # one row serves every row: keep it (1, cols)
        w64 = torch.nn.functional.pad(imp, (0, pad)).reshape(imp.shape[0], ngroups, g)
        return _Blocks(xw, w64.to(work), w64, args, x.dtype, scale_dtype)

    def params(self, qp: QParams) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale, zero-or-offset) in the work dtype, shaped (rows, ngroups, 1)."""
        s, z = qp
        return s.to(self.work).unsqueeze(2), None if z is None else z.to(self.work).unsqueeze(2)

    def reconstruct(self, qp: QParams, out: torch.Tensor | None = None) -> torch.Tensor:
        """x̂ as `dequantize(quantize(x))` computes it, held exactly in the work dtype.

        The same IEEE operations in the same dtypes as `quantize` then `dequantize`, with one
        shortcut that is exact: for int asymmetric, clamp(round(x/s) + z, qmin, qmax) − z equals
        clamp(round(x/s), qmin − z, qmax − z) because every term is a small integer.
        """
        s, z = self.params(qp)
        qmin, qmax = quantized_range(self.args)
        bounds = finite_code_bounds(*qp, self.args)  # as `quantize`: x̂ stays finite
        if self.args.method == "minmax":
            assert z is not None
            y = torch.sub(self.x, z, out=out).div_(s).round_().clamp_(qmin, qmax)
            if bounds is not None:
                y = torch.minimum(y, bounds[1].to(self.work).unsqueeze(2))
            return y.mul_(s).add_(z).to(self.dtype).to(self.work)
        y = torch.div(self.x, s, out=out).round_()
        if z is None:
            y.clamp_(qmin, qmax)
        else:
            y.clamp_(min=qmin - z, max=qmax - z)
        if bounds is not None:
            lo, hi = (b.to(self.work).unsqueeze(2) for b in bounds)
            if z is not None:
                lo, hi = lo - z, hi - z
            y = torch.minimum(torch.maximum(y, lo), hi)
        return y.mul_(s).to(self.scale_dtype).to(self.dtype).to(self.work)

    def error(self, qp: QParams) -> torch.Tensor:
        """Per-group Σ w·(x − x̂)², accumulated in the work dtype (for ranking only)."""
        if self._buffer is None:
            self._buffer = torch.empty_like(self.x)
        d = self.reconstruct(qp, out=self._buffer).sub_(self.x)
        dw = d if self.w is None else d * self.w
        return torch.einsum("rgk,rgk->rg", dw, d)

    def error64(self, qp: QParams) -> torch.Tensor:
        """Per-group Σ w·(x − x̂)² in float64: equal to `reconstruction_error` (tested)."""
        d = self.reconstruct(qp).to(torch.float64).sub_(self.x.to(torch.float64))
        d.mul_(d)
        if self.w64 is not None:
            d.mul_(self.w64)
        return d.sum(dim=2)


class _Best:
    """Per-group best candidate so far; `finish` makes the final float64 choice against RTN."""

    def __init__(self, blocks: _Blocks, rtn: QParams) -> None:
        self.blocks = blocks
        self.scale, self.zero = rtn
        self.err = blocks.error(rtn)
        self.changed = False

    def offer(self, cand: QParams) -> torch.Tensor:
        """Keep `cand` where it is strictly better; returns where it was (rows, ngroups)."""
        err = self.blocks.error(cand)
        better = err < self.err  # NaN compares false: a non-finite candidate never wins
        if not bool(better.any()):
            return better
        self.changed = True
        self.err = torch.where(better, err, self.err)
        self.scale = torch.where(better, cand[0], self.scale)
        if self.zero is not None:
            assert cand[1] is not None
            self.zero = torch.where(better, cand[1], self.zero)
        return better

    def finish(self, rtn: QParams) -> QParams:
        if not self.changed:
            return rtn
        cand = (self.scale, self.zero)
        better = self.blocks.error64(cand) < self.blocks.error64(rtn)
        scale = torch.where(better, self.scale, rtn[0])
        if rtn[1] is None:
            return scale, None
        assert self.zero is not None
        return scale, torch.where(better, self.zero, rtn[1])


# --------------------------------------------------------------------------------------------
# mse: clipped-range grid
# --------------------------------------------------------------------------------------------


def fused_search(
    raw: np.ndarray,
    kind: int,
    args: QuantArgs,
    mode: RoundingMode,
    importance: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """`search_qparams` with the defaults, for int schemes on 16-bit weight bits (uint16), on
    the fused CPU kernels (`math.search_kernels`): the same walk (mse) and iteration (hqq), in
    one compiled loop per group. Returns the scales' 16-bit patterns, the int8 zero points (None when
    symmetric) and the number of groups holding NaN or ±inf (left at RTN; refuse the block)."""
    from compressor.math import search_kernels

    cols = raw.shape[1]
    group = args.group_size if args.strategy == "group" else cols
    qrange = quantized_range(args)
    imp = None if importance is None else importance.to(torch.float64).cpu().numpy()
    if mode == "mse":
        factors = np.array(_shrink_factors(MSE_GRID), np.float64)
        path = mse_path(MSE_GRID, 1 if args.symmetric else len(_SHIFTS))
        return search_kernels.search_mse_16(
            raw, kind, group, args.symmetric, qrange, factors, path, imp
        )
    if mode == "hqq":
        return search_kernels.search_hqq_16(
            raw, kind, group, args.symmetric, qrange, HQQ_ITERATIONS, _HQQ_BETA, _HQQ_KAPPA, imp
        )
    raise ValueError(f"the fused search runs mse or hqq, not {mode!r}")


def _shrink_factors(grid: int) -> list[float]:
    if grid == 1:
        return [1.0]
    return [1.0 - (1.0 - _SHRINK_MIN) * i / (grid - 1) for i in range(grid)]


def mse_path(
    grid: int,
    shifts: int,
    exhaustive: bool = False,
    every: int | None = None,
    last_at_every_shift: bool = False,
) -> tuple[list[tuple[int, int]], tuple[int, ...]]:
    """The order in which mse visits its grid (factor index i, 0 = RTN; shift index t):
    (the coarse candidates, tried in this order, every shift at factors `every`, 2·`every`, …,
    and the last factor at the centred shift only; the refinement steps, each tried as best ∓
    step at the best's shift). `exhaustive`: every candidate, no refinement. `every`
    (MSE_COARSE[shifts] unless given) and `last_at_every_shift` (the walk until 2026-12-06:
    every 4th, the last factor at every shift) are for `bench.mse_walks`."""
    if exhaustive:
        return [(i, t) for i in range(1, grid) for t in range(shifts)], ()
    every = MSE_COARSE[shifts] if every is None else every
    factors = sorted({*range(every, grid, every), grid - 1} - {0})
    centre = shifts // 2
    coarse = [
        (i, t)
        for i in factors
        for t in range(shifts)
        if t == centre or i < grid - 1 or last_at_every_shift
    ]
    steps = tuple(k for k in (2, 1) if k < grid - 1)
    return coarse, steps


def _mse(best: _Best, rtn: QParams, cands: list[list[QParams]], grid: int) -> None:
    """mse's coarse-to-fine walk over `cands[i − 1][t]` (factor i ≥ 1, shift t), per group: the
    coarse candidates, then from the best so far, factor ∓ step at its shift for each step,
    each candidate replacing the best only when strictly better: 9 of the 20 candidates (int
    symmetric) or 14 of 60 (int asymmetric), for an error within ~1 % of the whole grid's on
    SmolLM2 and Student-t weights (docs/benchmarks.md)."""
    shifts = len(cands[0]) if cands else 1
    # minmax (float offsets, torch only) keeps the whole grid: its best candidates are often
    # deep one-sided clips the walk misses (it found 80-90 % of their gain in the tests)
    coarse, steps = mse_path(grid, shifts, exhaustive=best.blocks.args.method == "minmax")
    at_i = torch.zeros(best.err.shape, dtype=torch.long, device=best.err.device)  # 0 = RTN
    at_t = torch.full_like(at_i, shifts // 2)  # RTN "is" the centred shift
    for i, t in coarse:
        better = best.offer(cands[i - 1][t])
        at_i = torch.where(better, i, at_i)
        at_t = torch.where(better, t, at_t)
    if not steps:
        return
    # every candidate's parameters stacked, RTN first at each shift: [i, t] → (rows, ngroups)
    scale = torch.stack(
        [torch.stack([rtn[0]] * shifts)] + [torch.stack([c[0] for c in row]) for row in cands]
    )
    zero = None
    if rtn[1] is not None:
        zero = torch.stack(
            [torch.stack([rtn[1]] * shifts)] + [torch.stack([c[1] for c in row]) for row in cands]  # type: ignore[misc]
        )
    for step in steps:
        centre = at_i.clone()
        for d in (-step, step):
            to = (centre + d).clamp(0, grid - 1)
            pick = (to * shifts + at_t).unsqueeze(0)
            cand_s = scale.flatten(0, 1).gather(0, pick)[0]
            cand_z = None if zero is None else zero.flatten(0, 1).gather(0, pick)[0]
            better = best.offer((cand_s, cand_z))
            at_i = torch.where(better, to, at_i)


def _mse_candidates(
    lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype, grid: int
) -> list[list[QParams]]:
    """Storable parameter sets for the shrunk ranges, [factor index − 1][shift index] (α = 1 is
    RTN itself and is skipped; int symmetric has one shift)."""
    work = compute_dtype(scale_dtype)
    lo = lo.to(work)
    hi = hi.to(work)
    out: list[list[QParams]] = []
    if args.method == "int" and args.symmetric:
        for a in _shrink_factors(grid)[1:]:
            out.append([qparams_from_range(lo * a, hi * a, args, scale_dtype)])
        return out
    if args.method == "int":  # the int asymmetric range always contains 0
        lo = torch.clamp(lo, max=0.0)
        hi = torch.clamp(hi, min=0.0)
    width = hi - lo
    for a in _shrink_factors(grid)[1:]:
        cut = width * (1.0 - a)
        out.append(
            [
                qparams_from_range(lo + cut * t, hi - cut * (1.0 - t), args, scale_dtype)
                for t in _SHIFTS
            ]
        )
    return out


# --------------------------------------------------------------------------------------------
# hqq: half-quadratic alternating optimisation of (s, o)
# --------------------------------------------------------------------------------------------


def _shrink_(r: torch.Tensor, beta: float, scratch: torch.Tensor) -> torch.Tensor:
    """HQQ's generalised soft threshold for the ℓ_p loss with p = ½, in place on `r`:
    sign(r)·max(|r| − |r|^(p−1)/β, 0). (p = ½ makes |r|^(p−1) one rsqrt instead of a pow;
    p = 0.3, 0.5 and HQQ's 0.7 gave the same errors to 4 digits in our measurements.)"""
    a = torch.abs(r, out=scratch)
    threshold = a.clamp_min(1e-8).rsqrt_().div_(beta)
    return torch.copysign(a.sub_(threshold).clamp_(min=0.0), r, out=r)


def _hqq(blocks: _Blocks, rtn: QParams, best: _Best, iterations: int) -> None:
    """hqq from RTN's parameters, each iterate snapped to the format before the next: the codes
    of an iteration are those the stored parameters give (as the fused kernel computes them in
    the pass that measures the iterate). The fit's sums are float32, its 2×2 solve float64
    (the determinant Σw·Σwq² − (Σwq)² cancels), then s and the offset are each rounded once."""
    args = blocks.args
    x, w = blocks.x, blocks.w
    s, z = blocks.params(rtn)
    sym = args.method == "int" and args.symmetric
    qmin, qmax = quantized_range(args)
    beta = _HQQ_BETA

    def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.einsum("rgk,rgk->rg", a, b).unsqueeze(2).double()

    n = float(x.shape[2]) if w is None else w.expand_as(x).sum(dim=2, keepdim=True).double()
    u, q, t, scratch = (torch.empty_like(x) for _ in range(4))
    for _ in range(iterations):
        if args.method == "minmax":  # z is the float offset m: q = clamp(round((x − m)/s))
            assert z is not None
            torch.sub(x, z, out=u).div_(s)
            o = z.double()
            torch.round(u, out=q).clamp_(qmin, qmax)
        else:  # int: the stored codes q = clamp(round(x/s) + z) (not round(x/s + z): ties
            # differ with an odd z); u = x/s + z in code units
            torch.div(x, s, out=u)
            torch.round(u, out=q)
            o = torch.zeros_like(s, dtype=torch.float64) if z is None else -z.double() * s.double()
            if z is not None:
                q.add_(z)
                u.add_(z)
            q.clamp_(qmin, qmax)
        e = _shrink_(u.sub_(q), beta, scratch)  # residual (code units), shrunk in place
        target = torch.addcmul(x, e, s, value=-1.0, out=t)  # x − e·s
        beta *= _HQQ_KAPPA
        qw = q if w is None else torch.mul(q, w, out=scratch)
        sqq = dot(qw, q)
        sqy = dot(qw, target)
        fit_s = s.double()
        if sym:
            new_s = sqy / sqq
            ok = (sqq > 0) & (new_s > 0) & torch.isfinite(new_s)
            fit_s = torch.where(ok, new_s, fit_s)
        else:
            sq = qw.sum(dim=2, keepdim=True).double()
            sy = (
                target.sum(dim=2, keepdim=True).double()
                if w is None
                else dot(target, w.expand_as(x))
            )
            det = n * sqq - sq * sq
            inv = 1.0 / det  # Cramer's rule, as the fused kernel solves it (`_hqq_fit`)
            new_s = (n * sqy - sq * sy) * inv
            new_o = (sqq * sy - sq * sqy) * inv
            ok = (det > 0) & (new_s > 0) & torch.isfinite(new_s) & torch.isfinite(new_o)
            fit_s = torch.where(ok, new_s, fit_s)
            o = torch.where(ok, new_o, o)
        snapped = _snap(fit_s, o, args, blocks.scale_dtype, qmin, qmax)
        best.offer(snapped)
        s, z = blocks.params(snapped)


def _offset_fit(blocks: _Blocks, rtn: QParams, lo: torch.Tensor, iterations: int) -> QParams:
    """minmax's hqq: the `hqq` library's default optimiser as it behaves on real weights (see
    the module doc), per group. The scale stays RTN's stored one (the full range); the offset
    starts on the grid through 0 (m = s·round(lo/s), the library's rounded zero) and moves by
    the group's (weighted) mean error. A group stops after the first pass whose mean |x − x̂|
    did not fall below its best, keeping that pass's move (the library's rule, which it applies
    to the whole tensor at once; per group, a chunk's result does not depend on the others).
    The offset is carried unrounded (work dtype) and stored once at the end: rounded to bf16
    at every pass, moves under half its ulp (a few hundredths of a code) vanish and groups stop
    early (ΔPPL +18.6 against +16.8 % on SmolLM2, +29.0 against +23.6 % on Gemma 3 270M;
    `bench.offset_fit`, docs/accuracy.md)."""
    scale, rtn_offset = rtn
    assert rtn_offset is not None
    x, w = blocks.x, blocks.w
    qmin, qmax = quantized_range(blocks.args)
    s = scale.to(x.dtype).unsqueeze(2)
    offset = torch.round(lo.to(x.dtype).unsqueeze(2) / s).mul_(s)
    total = (
        torch.full_like(offset, x.shape[2]) if w is None else w.expand_as(x).sum(2, keepdim=True)
    )
    counted = total > 0  # a group of zero importance keeps RTN
    best = torch.full_like(offset, torch.inf)
    live = counted.clone()
    d = torch.empty_like(x)
    for _ in range(iterations):
        if not bool(live.any()):
            break
        # x − x̂ with x̂ = m + s·clamp(round((x − m)/s)), the codes `quantize` gives
        torch.sub(x, offset, out=d).div_(s).round_().clamp_(qmin, qmax).mul_(s).add_(offset)
        torch.sub(x, d, out=d)
        dw = d if w is None else d * w
        step = dw.sum(dim=2, keepdim=True).div_(total)
        err = dw.abs_().sum(dim=2, keepdim=True).div_(total)  # dw is d or a fresh product
        offset = torch.where(live, offset + step, offset)
        improved = err < best  # NaN compares false: a non-finite group stops at once
        best = torch.where(improved, err, best)
        live &= improved
    stored = round_to(offset.squeeze(2).to(torch.float64), blocks.scale_dtype)
    keep = torch.isfinite(x).all(dim=2) & counted.squeeze(2) & torch.isfinite(stored)
    return scale, torch.where(keep, stored, rtn_offset)  # NaN/±inf groups keep RTN


def _snap(
    s: torch.Tensor,
    o: torch.Tensor,
    args: QuantArgs,
    scale_dtype: torch.dtype,
    qmin: int,
    qmax: int,
) -> QParams:
    """Round a continuous float64 (s, o) to what the format stores, each once (`round_to`)."""
    scale = round_to(s.squeeze(2), scale_dtype)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    if args.method == "minmax":
        return scale, round_to(o.squeeze(2), scale_dtype)
    if args.symmetric:
        return scale, None
    zero = torch.round(-o.squeeze(2) / scale.double())
    zero = torch.nan_to_num(zero, nan=0.0).clamp_(qmin, qmax)
    return scale, zero.to(torch.int8)


def quantize_rows(
    x: torch.Tensor,
    args: QuantArgs,
    mode: RoundingMode = "rtn",
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Quantize a (rows, cols) block: integer codes q, scale, zero/offset, and x̂ in x's dtype.

    Parameters come from `scale`/`zero` when given (the tensor strategy, fixed from the whole
    tensor's range), else from the block's own groups by `mode` (its error weighted per input
    by `importance`, e.g. calibration's diag(XᵀX)). The one place the compress
    stage and the budget's error measurements quantize, so both see the same x̂.
    """
    # `x` as it is, not a copy in the work dtype: the search reconstructs x̂ in x's dtype (what
    # is stored), and `quantize` makes its own work-dtype copy.
    if scale is None:
        if mode != "rtn":
            scale, zero = search_qparams(x, args, x.dtype, mode, importance)
        else:
            mins, maxs = group_ranges(x, args)
            scale, zero = qparams_from_range(mins, maxs, args, x.dtype)
    q = quantize(x, scale, zero, args)
    return q, scale, zero, dequantize(q, scale, zero, args, x.dtype)
