"""Fused CPU kernels for the data-free rounding searches (`rounding.search_qparams`'s mse and hqq
for int schemes on 16-bit weights): one compiled loop per group instead of ~8 torch passes per
candidate over the whole block.

Each group's weights are widened once into a small buffer, then every candidate is evaluated
there, in cache:

    mse   the same walk over the same candidates as `rounding._mse` (each clipped range's
          parameters from `kernels._rtn_params`, the float64 steps of
          `quant.qparams_from_range`), ranked by Σ w·(x − x̂)² in float32. A candidate's
          error is not summed when clipping the group's extremes alone costs RTN's error
          (coarse candidates) or the best error before its step, and it is taken only when
          that clipping cost and its error are both under the best so far (it could not win
          otherwise, so nothing chosen changes).
    hqq   the iteration of `rounding._hqq` (shrunk residual, weighted least squares fit of scale
          and offset, β annealed) on snapped iterates: each iterate is stored-format parameters,
          so one pass both measures it (the format's codes) and fits the next from those codes.
          Where β shrinks no residual, the fit's targets are the weights themselves and their
          sums come from the codes pass (no targets pass).

x̂ is what the stored format reconstructs: `kernels._quantize_pack`'s codes (one float32
division, rint, the finite code range; mse's error passes multiply by 1/s instead where that
gives the same error term, `_by_reciprocal`) and its product narrowed once to the 16-bit dtype
(bfloat16 by Veltkamp's split, `kernels._bf16_of_product`: the same bits in fewer operations).

Guarantee, as the torch search: RTN's parameters are always a candidate, and the final choice
between the best candidate and RTN keeps RTN unless the candidate is strictly better in float64,
so for every group E(chosen) ≤ E(rtn) in float64. The float64 sums are taken only where the two
float32 errors are within n·2^-22 of each other (`_TIE`): a wider gap can't be rounding.

Against the torch search: the walk over the candidates (mse) and the iteration (hqq, whose fit
sums and solves in float64 in both) are the same, but float32 error sums run in another order
(and hqq's shrink threshold is an estimate, `_over_sqrt`), so where two candidates' errors
agree to rounding the two may keep different ones (tested: at most max(2, 1 %) of the groups
differ; the total error agrees to 1e-5 relative).

Speed: each error sum is one straight loop that LLVM vectorises; a per-element branch or an early
exit inside it (tried) kept it scalar and 4-5× slower than summing the whole group. The searches run
without numba's runtime (see `_mse_block`): the runtime's reference counts were half the time of a
search with an empty walk. mse makes its candidates' parameters 8 at a time, vectorised across
candidates (`_candidates_at_once`): one by one, their float64 steps were a third of its time. It
sums a stage's errors before it chooses among them (`_mse_block`), so no pass waits on the
comparison of the one before it, and it prepares the next group (its weights, RTN's error, its
coarse candidates) between a group's coarse stage and its steps, whose chain that work fills. The
loops are bound by the number of instructions per weight, so each is kept short: the sums are fused
multiply-adds (`kernels._fmuladd`), codes are clamped relative to the zero point, the 16-bit kind is
a constant inside each loop (and in hqq's loops the symmetry: no zero point and no Σ w·q when
symmetric), hqq's targets pass sums the shrunk residuals rather than making each target and takes
their threshold from the CPU's reciprocal square root estimate (`_over_sqrt`), and its bound on the
largest residual comes from the group's two extremes (`_largest_residual`), not from a max over
every weight. Between its passes an hqq iteration is a chain of dependent scalar steps (the sums'
reductions, the float64 fit, the snap to the format): on a fast core that chain is most of its time,
so hqq iterates two groups at once (`_hqq_pair`), each filling the other's waits.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from compressor.math.kernels import (
    _LIMIT_BF16,
    _LIMIT_F16,
    _SPLIT,
    BF16,
    F16,
    _bf16_of_product,
    _bits16,
    _check_raw,
    _f32_as_u32,
    _finite_codes,
    _fmuladd,
    _jit,
    _narrow,
    _range_of,
    _round_to_scalar,
    _rtn_params,
    _splits_exactly,
    _u32_as_f32,
    _widen,
)

__all__ = ["search_hqq_16", "search_mse_16"]

_FASTMATH = {"reassoc"}
# Two float32 errors of an n-weight group whose relative gap is wider than n·_TIE rank as their
# float64 values do: each term w·d² is within ~2^-23 relative of its exact value (x and x̂ are
# 16-bit values, so d = x̂ − x is exact but at extreme exponent gaps) and a float32 sum of n
# non-negative terms within n·2^-24 of the exact sum, in any order.
_TIE = np.float32(2.0**-22)  # per weight summed: the gap must exceed n·2^-22 (4× the bound)


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _error32(xf, wf, weighted, n, s, r, z, glo, ghi, kind):
    """Σ w·(x − x̂)² of one group in float32 for parameters (s, z), r = 1/s in float32
    (`_reciprocal`), with the codes taken relative to the zero point: m = q − z =
    clamp(rint(x/s), glo − z, ghi − z), exactly the stored code's (small integers), one add and
    one subtract fewer per weight; x̂ by the split where it is exact (`_x_hat`), x/s rounded as
    x·r where that gives the same error term (`_by_reciprocal`). The 16-bit kind and both
    choices are constants of each loop (`_error32_loop`), so it holds no test of them; one
    level of dispatch, not one per choice, since numba's inliner copies every inlined level's
    IR at each call site (docs/benchmarks.md, "A first run's compile")."""
    mlo = glo - z
    mhi = ghi - z
    if kind == BF16:
        if _splits_exactly(s) and _by_reciprocal(s, BF16):
            return _error32_loop(xf, wf, weighted, n, s, r, mlo, mhi, BF16, True, True)
        return _error32_loop(xf, wf, weighted, n, s, r, mlo, mhi, BF16, False, False)
    return _error32_loop(xf, wf, weighted, n, s, r, mlo, mhi, F16, False, True)


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _error32_loop(xf, wf, weighted, n, s, r, mlo, mhi, kind, split_product, reciprocal):
    """`_error32`'s loop. One straight loop per case, so LLVM vectorises it (8 lanes): an
    early exit inside the loop, or the weighting decided per element, kept it scalar and 4-5×
    slower than the whole sum."""
    acc = np.float32(0.0)
    split = s * _SPLIT
    if weighted:
        for k in range(n):
            m = min(max(np.rint(_quotient(xf[k], s, r, reciprocal)), mlo), mhi)
            d = _x_hat(m, s, split, kind, split_product) - xf[k]
            acc = _fmuladd(d * d, wf[k], acc)
    else:
        for k in range(n):
            m = min(max(np.rint(_quotient(xf[k], s, r, reciprocal)), mlo), mhi)
            d = _x_hat(m, s, split, kind, split_product) - xf[k]
            acc = _fmuladd(d, d, acc)
    return acc


@_jit(inline="always")
def _quotient(x, s, r, reciprocal):
    """x/s as the error passes round it to a code: x·r (r = 1/s in float32) where the caller
    found that exact for the code's error term (`_by_reciprocal`; `reciprocal` a constant of
    the loop), else the division. A multiply where the division held the pass: Zen 4's divider
    takes ~6 cycles per 16 lanes, the whole weighted pass without it ~5.6."""
    return x * r if reciprocal else x / s


# The bfloat16 scales whose error passes take x·(1/s) (`_by_reciprocal`): 1/s and x·r then stay
# normal floats, each within half an ulp (above 2^126, 1/s is subnormal).
_RECIPROCAL_MIN = np.float32(2.0**-100)
_RECIPROCAL_MAX = np.float32(2.0**126)


@_jit(inline="always")
def _by_reciprocal(s, kind):
    """Whether an error pass may take the code of x as rint(x·r), r = fl(1/s), for the 16-bit
    scale s: it then has the same error term (x − x̂)² as rint(x/s), for every 16-bit x and every
    code range within ±255 (checked exhaustively for every such s and x: tests/math/
    test_search_kernels.py). Where the two round apart x/s is an exact tie k + ½ (away from a
    tie, |x/s − (k + ½)| ≥ 1/(2·2^p) for p-bit significands, far above x·r's error), and then
    both k·s and (k + 1)·s are 16-bit values, so both codes lie s/2 from x. float16 scales
    always qualify (2^-24 ≤ s ≤ 65504); bfloat16 from `_RECIPROCAL_MIN` to `_RECIPROCAL_MAX`."""
    return kind == F16 or (s >= _RECIPROCAL_MIN and s <= _RECIPROCAL_MAX)


@intrinsic
def _reciprocal(typingctx, s):
    """float32 1/s, correctly rounded, behind `llvm.arithmetic.fence`: without the fence LLVM
    folds x·(1/s) back into x/s in the error loop (seen in the emitted code), which is exact
    but keeps the divider. The coarse and step candidates' reciprocals come from memory
    (`_candidates_of`) and need none."""

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fence = builder.module.declare_intrinsic(
            "llvm.arithmetic.fence", [f32], ir.FunctionType(f32, [f32])
        )
        return builder.call(fence, [builder.fdiv(ir.Constant(f32, 1.0), args[0])])

    return types.float32(types.float32), codegen


@_jit(inline="always")
def _x_hat(m, s, split, kind, split_product):
    """x̂ of code m (relative to the zero point) at scale s: bfloat16 by Veltkamp's split
    (`kernels._bf16_of_product`, split = s·(2^16 + 1)) where the caller found it exact
    (`_splits_exactly`; `split_product` a constant of the loop), else `_narrow`."""
    return _bf16_of_product(m, s, split) if split_product else _narrow(m * s, kind)


@_jit(inline="always", error_model="numpy")
def _error64(xf, wd, weighted, n, s, z, glo, ghi, kind):
    """The same error in float64: the exact comparison that decides against RTN."""
    acc = 0.0
    for k in range(n):
        y = np.rint(xf[k] / s) + z
        y = glo if y < glo else y
        y = ghi if y > ghi else y
        d = np.float64(_narrow((y - z) * s, kind)) - np.float64(xf[k])
        acc += d * d * wd[k] if weighted else d * d
    return acc


@_jit(inline="always")
def _load_group(xr, kr, c0, n, kind, xf):
    """The group's weights widened into xf; returns the group's (min, max). The loop indexes a
    slice from 0, so the compiler sees contiguous non-negative indices and vectorises it: with
    xr[c0 + k] it cannot rule out a negative index (which numba wraps) and gathers element by
    element."""
    seg = xr[c0 : c0 + n]
    for k in range(n):
        xf[k] = _widen(seg[k], kind)
    return _range_of(kr[c0 : c0 + n], kind)


@_jit(inline="always", fastmath=_FASTMATH)
def _extremes(xf, wf, weighted, n, lo, hi):
    """The summed weights of the group's weights equal to its largest and smallest value: what
    clipping costs first, per unit of squared clip. A sum, not an index search, so it vectorises;
    unweighted, at least one weight of 1 sits at each end."""
    if not weighted:
        return np.float32(1.0), np.float32(1.0)
    w_hi = np.float32(0.0)
    w_lo = np.float32(0.0)
    for k in range(n):
        w_hi += wf[k] if xf[k] == hi else np.float32(0.0)
        w_lo += wf[k] if xf[k] == lo else np.float32(0.0)
    return w_hi, w_lo


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _clip_bound(lo, hi, w_lo, w_hi, s, z, glo, ghi, kind):
    """A lower bound of a candidate's error: what clipping the two extremes alone costs (no
    code reconstructs above narrow((ghi − z)·s) or below narrow((glo − z)·s)). Selects, not
    branches, so `_candidates_at_once` vectorises."""
    top = _narrow((ghi - z) * s, kind)
    bottom = _narrow((glo - z) * s, kind)
    above = w_hi * (hi - top) * (hi - top) if hi > top else np.float32(0.0)
    below = w_lo * (bottom - lo) * (bottom - lo) if lo < bottom else np.float32(0.0)
    return above + below


@_jit(inline="always")
def _finish(xf, wd, weighted, n, kind, s0, z0, e0, bs, bz, e1, fmin, fmax, scale, zero, r, gi):
    """Store the best candidate (float32 error e1) if it beats RTN (e0) in float64, else RTN's
    parameters. Only near-ties are summed again in float64: a wider gap decides alone."""
    if (bs != s0 or bz != z0) and not e1 < e0 * (np.float32(1.0) - np.float32(n) * _TIE):
        lo0, hi0 = _finite_codes(s0, np.float32(z0), kind, fmin, fmax)
        lo1, hi1 = _finite_codes(bs, np.float32(bz), kind, fmin, fmax)
        e0 = _error64(xf, wd, weighted, n, s0, np.float32(z0), lo0, hi0, kind)
        e1 = _error64(xf, wd, weighted, n, bs, np.float32(bz), lo1, hi1, kind)
        if not e1 < e0:
            bs, bz = s0, z0
    scale[r, gi] = _bits16(bs, kind)
    zero[r, gi] = bz


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _clipped_params(lo, hi, factor, cut_share, shift, kind, symmetric, qmin, qmax):
    """The parameters of [lo, hi] shrunk by `factor` (symmetric: both ends scaled; asymmetric:
    the range, which always holds 0, cut by `cut_share` = 1 − factor of its width, `shift` of
    the cut taken from below: 0 keeps lo, ½ centred, 1 keeps hi), all float32, as
    `rounding._mse_candidates` makes them."""
    if symmetric:
        return _rtn_params(np.float64(lo * factor), np.float64(hi * factor), kind, True, qmin, qmax)
    clo = min(lo, np.float32(0.0))
    chi = max(hi, np.float32(0.0))
    cut = (chi - clo) * cut_share
    c_lo = clo + cut * shift
    c_hi = chi - cut * (np.float32(1.0) - shift)
    return _rtn_params(np.float64(c_lo), np.float64(c_hi), kind, False, qmin, qmax)


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _mse_candidate(lo, hi, i, t, factors, s0, z0, kind, symmetric, qmin, qmax):
    """Grid point (factor index i, shift index t)'s parameters (i = 0 is RTN's)."""
    if i == 0:
        return s0, z0
    return _clipped_params(
        lo, hi, np.float32(factors[i]), np.float32(1.0 - factors[i]),
        np.float32(0.5) * np.float32(t), kind, symmetric, qmin, qmax,
    )  # fmt: skip


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _one_candidate(lo, hi, i, t, factors, s0, z0, kind, symmetric, qmin, qmax, w_lo, w_hi):
    """Grid point (i, t)'s scale, zero point, clipping bound and code range, made alone: for a
    group where a candidate's codes could overflow (`_every_code_finite` false)."""
    s, z = _mse_candidate(lo, hi, i, t, factors, s0, z0, kind, symmetric, qmin, qmax)
    glo, ghi = _finite_codes(s, np.float32(z), kind, np.float32(qmin), np.float32(qmax))
    bound = _clip_bound(lo, hi, w_lo, w_hi, s, np.float32(z), glo, ghi, kind)
    return s, z, bound, glo, ghi


@_jit(inline="always")
def _every_code_finite(s0, kind, qmin, qmax):
    """Whether every mse candidate of a group with RTN's scale s0 keeps all its codes finite
    (`_finite_codes`' first case): a candidate's range lies within RTN's (factors ≤ 1), so its
    scale is at most s0 (to float32 rounding; the margin is 2×)."""
    limit = _LIMIT_F16 if kind == F16 else _LIMIT_BF16
    return np.float64(s0) * 2.0 * (np.float64(qmax - qmin) + 1.0) < limit


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _candidates_at_once(lo, hi, w_lo, w_hi, kind, symmetric, qmin, qmax, table, cs, cr, cz, cb):
    """The scale, its reciprocal (for `_quotient`), zero point and clipping bound of every
    candidate in `table` (rows: factor, cut share, shift; `_clipped_params`) into cs, cr, cz, cb,
    for a group whose every candidate keeps every code finite (the caller's check): one loop
    with no branch on the values, which LLVM vectorises across candidates (8 lanes; tables are
    padded to a multiple of 8). Made one by one, each candidate's float64 steps were a third of
    the asymmetric walk's time. The kind and the symmetry are made constants for the loop
    (`_candidates_of`): tested inside it, both kinds' roundings were made for every candidate
    (fewer operations by construction; −5 % in a one-process A/B, within the spread between
    processes: docs/benchmarks.md)."""
    if kind == BF16:
        if symmetric:
            _candidates_of(lo, hi, w_lo, w_hi, BF16, True, qmin, qmax, table, cs, cr, cz, cb)
        else:
            _candidates_of(lo, hi, w_lo, w_hi, BF16, False, qmin, qmax, table, cs, cr, cz, cb)
    elif symmetric:
        _candidates_of(lo, hi, w_lo, w_hi, F16, True, qmin, qmax, table, cs, cr, cz, cb)
    else:
        _candidates_of(lo, hi, w_lo, w_hi, F16, False, qmin, qmax, table, cs, cr, cz, cb)


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _candidates_of(lo, hi, w_lo, w_hi, kind, symmetric, qmin, qmax, table, cs, cr, cz, cb):
    """`_candidates_at_once`' loop, with the 16-bit kind and the symmetry constants in it."""
    fmin = np.float32(qmin)
    fmax = np.float32(qmax)
    for k in range(table.shape[1]):
        s, z = _clipped_params(lo, hi, table[0, k], table[1, k], table[2, k], kind, symmetric, qmin, qmax)  # fmt: skip
        cs[k] = s
        cr[k] = np.float32(1.0) / s
        cz[k] = z
        cb[k] = _clip_bound(lo, hi, w_lo, w_hi, s, np.float32(z), fmin, fmax, kind)


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _mse_prepare(raw, keys, j, ngroups, g, kind, symmetric, qmin, qmax, imp32, weighted, xf, coarse, cs, cr, cz, cb):  # fmt: skip
    """Group j of the block (row-major) made ready for mse's walk: its weights widened into xf,
    RTN's parameters and float32 error (the walk's first best), the summed weights at its
    extremes (`_extremes`) and, unless a code could overflow (`_every_code_finite`), its coarse
    candidates (`_candidates_at_once` of the `coarse` table into cs, cr, cz, cb). None of it reads
    another group's walk, so `_mse_block` runs it for the next group in the middle of this
    one's. Returns (row, index, first column, size, min, max, RTN's scale and zero point, RTN's
    error, finite, batched, w_lo, w_hi); a non-finite group (NaN or ±inf) gets no more."""
    r, gi = j // ngroups, j % ngroups
    c0 = gi * g
    n = min(g, raw.shape[1] - c0)
    lo, hi = _load_group(raw[r], keys[r], c0, n, kind, xf)
    wf = imp32[c0 : c0 + n]
    s0, z0 = _rtn_params(np.float64(lo), np.float64(hi), kind, symmetric, qmin, qmax)
    e0 = np.float32(np.inf)
    finite = np.isfinite(lo) and np.isfinite(hi)
    batched = False
    w_hi = w_lo = np.float32(1.0)
    if finite:
        glo, ghi = _finite_codes(s0, np.float32(z0), kind, np.float32(qmin), np.float32(qmax))
        e0 = _error32(xf, wf, weighted, n, s0, _reciprocal(s0), np.float32(z0), glo, ghi, kind)
        w_hi, w_lo = _extremes(xf, wf, weighted, n, lo, hi)
        batched = _every_code_finite(s0, kind, qmin, qmax)
        if batched:
            _candidates_at_once(lo, hi, w_lo, w_hi, kind, symmetric, qmin, qmax, coarse, cs, cr, cz, cb)  # fmt: skip
    return r, gi, c0, n, lo, hi, s0, z0, e0, finite, batched, w_lo, w_hi


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _mse_coarse(xf, wf, weighted, n, s0, z0, best, kind, symmetric, qmin, qmax, path_i, path_t, cs, cr, cz, cb, ce):  # fmt: skip
    """The walk's coarse stage over the made candidates (path_i, path_t; cs, cr, cz, cb): the
    errors of those whose bound is under RTN's error `best` (into ce), then the choice in path
    order. Returns the walk's state (`_mse_take`)."""
    fmin = np.float32(qmin)
    fmax = np.float32(qmax)
    for k in range(path_i.shape[0]):
        ce[k] = _gated_error(xf, wf, weighted, n, kind, fmin, fmax, best, cs, cr, cz, cb, k)
    st = (best, s0, np.int64(z0), np.int64(0), np.int64(0 if symmetric else 1))
    for k in range(path_i.shape[0]):
        st = _mse_take(cs, cz, cb, k, ce[k], path_i[k], path_t[k], st)
    return st


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _mse_near(lo, hi, w_lo, w_hi, kind, symmetric, qmin, qmax, factors, steps, st, cs, cr, cz, cb, near):  # fmt: skip
    """The steps' candidates, made at once into cs, cr, cz, cb (over the coarse ones): every factor
    within Σ steps (`reach`) of the coarse best a0, at its shift. Returns (a0, reach)."""
    top = factors.shape[0] - 1
    reach = 0
    for step in steps:
        reach += step
    a0, at_t = st[3], st[4]
    for o in range(near.shape[1]):  # every factor the steps can reach from a0, at its shift
        f = factors[min(max(a0 + o - reach, 0), top)]
        near[0, o] = np.float32(f)
        near[1, o] = np.float32(1.0 - f)
        near[2, o] = np.float32(0.5) * np.float32(at_t)
    _candidates_at_once(lo, hi, w_lo, w_hi, kind, symmetric, qmin, qmax, near, cs, cr, cz, cb)
    return a0, reach


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _mse_steps(xf, wf, weighted, n, kind, qmin, qmax, factors, steps, st, a0, reach, cs, cr, cz, cb):  # fmt: skip
    """The refinement: for each step, the errors of the best's factor ∓ step at its shift (where
    their bound is under the best before the step), then the choice. Returns the walk's state."""
    fmin = np.float32(qmin)
    fmax = np.float32(qmax)
    top = factors.shape[0] - 1
    at_t = st[4]
    for step in steps:
        centre = st[3]
        below = centre - step - a0 + reach  # near's index of factor centre − step
        above = below + 2 * step
        e_below = _step_error(xf, wf, weighted, n, kind, fmin, fmax, st, cs, cr, cz, cb, below)
        e_above = _step_error(xf, wf, weighted, n, kind, fmin, fmax, st, cs, cr, cz, cb, above)
        st = _mse_take(cs, cz, cb, below, e_below, max(centre - step, 0), at_t, st)
        st = _mse_take(cs, cz, cb, above, e_above, min(centre + step, top), at_t, st)
    return st


# The searches' entry points are compiled without numba's runtime (`_nrt=False`): with it,
# every array view and every array handed to an inlined helper takes and drops an atomic
# reference count, which numba's pruning leaves inside loops: half of the samples of a search
# with an empty walk. Without the runtime the kernel cannot allocate, so the group buffers (xf,
# qb, rb) come from the caller. Each search is its own compiled function, so neither holds the
# other's code (timed: the same speed, docs/benchmarks.md). Each entry point holds its loop
# itself rather than inlining it from a wrapper: numba's inliner deep-copies an inlined
# function's whole expanded IR, twice per call site, which made inlining the search into a
# one-line wrapper most of a first compile (8.6 min and 9 GB for both searches before;
# docs/benchmarks.md, "A first run's compile").
@_jit(fastmath=_FASTMATH, error_model="numpy", _nrt=False)
def _mse_block(raw, keys, kind, g, symmetric, qmin, qmax, factors, path_i, path_t, steps, imp, imp32, weighted, scale, zero, xf, coarse, cs, cr, cz, cb, ce, near):  # fmt: skip
    """mse over every group of the block: RTN's parameters, the walk, then the float64 choice.
    imp and imp32 are the per-column importance in float64 and float32 (ones when unweighted),
    which each group reads in place; xf the group buffer (`_group_buffers`); coarse, cs, cr, cz,
    cb, ce, near the walk's tables and buffers (`_walk_buffers`). Returns the number of groups
    holding NaN or ±inf (left at RTN's parameters).

    Each group's walk is as `rounding._mse` walks it: the coarse points
    (path_i, path_t; their factor, cut share and shift in `coarse`), then ∓ each of `steps` in
    factor index around the best so far, at its shift (`_mse_coarse`, `_mse_near`,
    `_mse_steps`); a group where a code could overflow walks one candidate at a time
    (`_mse_one_by_one`).

    Errors are summed before the choices that read them: those of the coarse candidates whose
    bound is under RTN's error, then the choice in path order; those of each step's two
    candidates (where their bound is under the best before the step), then its choice. A pass
    then never waits on the comparison that follows the pass before it, which alternated with
    them and, mispredicted, cost that pass's latency (the weighted walk took 6-8 % longer;
    docs/benchmarks.md). Each choice still takes a candidate only when its bound and its error
    are both under the best so far, in the walk's order (`_mse_take`): the same choice as one
    pass after the other, tie for tie.

    The next group is prepared (`_mse_prepare`: loaded, RTN's parameters and error, its coarse
    candidates) between this group's coarse stage and its steps, into the other half of xf and
    of cs, cr, cz, cb (`_group_buffers`, `_walk_buffers`): its work is independent of this group's
    steps, whose chain (the steps' candidates made from the coarse best, each step's choice
    before the next) it fills, and its RTN error is known before its own coarse gates read it
    (with `_step_error`: 2-3 % less time asymmetric, weighted or not, 12 % weighted symmetric,
    over 12 fresh processes each: docs/benchmarks.md)."""
    ngroups = scale.shape[1]
    total = raw.shape[0] * ngroups
    fmin = np.float32(qmin)
    fmax = np.float32(qmax)
    m = cs.shape[0] // 2
    nonfinite = 0
    if total == 0:
        return nonfinite
    nxt = _mse_prepare(raw, keys, 0, ngroups, g, kind, symmetric, qmin, qmax, imp32, weighted, xf[:g], coarse, cs[:m], cr[:m], cz[:m], cb[:m])  # fmt: skip
    for j in range(total):
        h = j % 2  # this group's half of the buffers; the next group's is the other
        xj = xf[h * g : h * g + g]
        csj, crj = cs[h * m : h * m + m], cr[h * m : h * m + m]
        czj, cbj = cz[h * m : h * m + m], cb[h * m : h * m + m]
        r, gi, c0, n, lo, hi, s0, z0, e0, finite, batched, w_lo, w_hi = nxt
        wf = imp32[c0 : c0 + n]
        st = (e0, s0, np.int64(z0), np.int64(0), np.int64(0))  # typed on every path; only a
        a0 = reach = 0  # batched group's walk reads st, a0 and reach
        if batched:
            st = _mse_coarse(xj, wf, weighted, n, s0, z0, e0, kind, symmetric, qmin, qmax, path_i, path_t, csj, crj, czj, cbj, ce)  # fmt: skip
            a0, reach = _mse_near(lo, hi, w_lo, w_hi, kind, symmetric, qmin, qmax, factors, steps, st, csj, crj, czj, cbj, near)  # fmt: skip
        if j + 1 < total:
            o = 1 - h
            nxt = _mse_prepare(raw, keys, j + 1, ngroups, g, kind, symmetric, qmin, qmax, imp32, weighted, xf[o * g : o * g + g], coarse, cs[o * m : o * m + m], cr[o * m : o * m + m], cz[o * m : o * m + m], cb[o * m : o * m + m])  # fmt: skip
        best, bs, bz = e0, s0, z0
        if batched:
            st = _mse_steps(xj, wf, weighted, n, kind, qmin, qmax, factors, steps, st, a0, reach, csj, crj, czj, cbj)  # fmt: skip
            best, bs, bz = st[0], st[1], st[2]
        elif finite:
            best, bs, bz = _mse_one_by_one(xj, wf, weighted, n, lo, hi, s0, z0, e0, kind, symmetric, qmin, qmax, factors, path_i, path_t, steps, w_lo, w_hi)  # fmt: skip
        else:
            nonfinite += 1
        _finish(xj, imp[c0 : c0 + n], weighted, n, kind, s0, z0, e0, bs, bz, best, fmin, fmax, scale, zero, r, gi)  # fmt: skip
    return nonfinite


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _gated_error(xf, wf, weighted, n, kind, fmin, fmax, gate, cs, cr, cz, cb, k):
    """Made candidate k's error where its clipping bound is under `gate`, ∞ where not."""
    if cb[k] < gate:
        return _error32(xf, wf, weighted, n, cs[k], cr[k], np.float32(cz[k]), fmin, fmax, kind)
    return np.float32(np.inf)


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _step_error(xf, wf, weighted, n, kind, fmin, fmax, st, cs, cr, cz, cb, k):
    """A step's candidate k's error (`_gated_error`, gated by the best before the step), ∞ where
    it is the best's own parameters (0.33 of weighted asymmetric's 4 step passes per group on
    the bench's block, 0.62 of weighted symmetric's: a neighbouring factor rounds to the same
    scale and zero point): `_mse_take` would not take it."""
    if cs[k] == st[1] and cz[k] == st[2]:
        return np.float32(np.inf)
    return _gated_error(xf, wf, weighted, n, kind, fmin, fmax, st[0], cs, cr, cz, cb, k)


@_jit(inline="always")
def _mse_take(cs, cz, cb, k, e, i, t, st):
    """The walk's state st = (best error, scale, zero point, factor index, shift index) with
    made candidate k (error e, grid point (i, t)) taken where it is a new parameter set whose
    bound and error are both under the best error."""
    if (cs[k] != st[1] or cz[k] != st[2]) and cb[k] < st[0] and e < st[0]:
        return (e, cs[k], cz[k], np.int64(i), np.int64(t))
    return st


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _mse_one_by_one(xf, wf, weighted, n, lo, hi, s0, z0, best, kind, symmetric, qmin, qmax, factors, path_i, path_t, steps, w_lo, w_hi):  # fmt: skip
    """`_mse_block`'s walk for a group near the 16-bit limit: each candidate made alone with its
    own code range (`_one_candidate`), its error summed where its bound is under the best."""
    bs, bz = s0, z0
    at_i = 0
    at_t = 0 if symmetric else 1
    for k in range(path_i.shape[0]):
        s, z, bound, glo, ghi = _one_candidate(lo, hi, path_i[k], path_t[k], factors, s0, z0, kind, symmetric, qmin, qmax, w_lo, w_hi)  # fmt: skip
        if (s != bs or z != bz) and bound < best:
            e = _error32(xf, wf, weighted, n, s, _reciprocal(s), np.float32(z), glo, ghi, kind)
            if e < best:
                best, bs, bz, at_i, at_t = e, s, z, path_i[k], path_t[k]
    top = factors.shape[0] - 1
    for step in steps:
        centre = at_i
        for d in (-step, step):
            i = min(max(centre + d, 0), top)
            s, z, bound, glo, ghi = _one_candidate(lo, hi, i, at_t, factors, s0, z0, kind, symmetric, qmin, qmax, w_lo, w_hi)  # fmt: skip
            if (s != bs or z != bz) and bound < best:
                e = _error32(xf, wf, weighted, n, s, _reciprocal(s), np.float32(z), glo, ghi, kind)
                if e < best:
                    best, bs, bz, at_i = e, s, z, i
    return best, bs, bz


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _hqq_codes(xf, wf, symmetric, n, s, z, glo, ghi, kind, qb, rb):
    """The codes half of an hqq pass at the stored parameters (s, z): their error Σ w·(x − x̂)²
    with the format's own codes, Σ w·q² and Σ w·q of the fit (Σ w·q only asymmetric: 0
    otherwise), and Σ w·q·x (the fit's Σ w·q·y when no residual is shrunk); each weight's code
    and residual kept in qb and rb for `_hqq_targets`. wf is all ones when unweighted. Codes
    relative to the zero point as in `_error32`; bfloat16's x̂ by the split where it is exact, as
    there. The kind, the symmetry and the split are constants of each loop (`_hqq_codes_loop`),
    so it holds only what the case needs; one level of dispatch, as `_error32`'s. (Making the
    weighting one too gained 0-5 % more and added ~20 s to the kernels' first compile.)"""
    mlo = glo - z
    mhi = ghi - z
    if kind == BF16:
        split = _splits_exactly(s)
        if symmetric:
            if split:
                return _hqq_codes_loop(xf, wf, n, s, z, mlo, mhi, BF16, True, qb, rb, True)
            return _hqq_codes_loop(xf, wf, n, s, z, mlo, mhi, BF16, True, qb, rb, False)
        if split:
            return _hqq_codes_loop(xf, wf, n, s, z, mlo, mhi, BF16, False, qb, rb, True)
        return _hqq_codes_loop(xf, wf, n, s, z, mlo, mhi, BF16, False, qb, rb, False)
    if symmetric:
        return _hqq_codes_loop(xf, wf, n, s, z, mlo, mhi, F16, True, qb, rb, False)
    return _hqq_codes_loop(xf, wf, n, s, z, mlo, mhi, F16, False, qb, rb, False)


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _hqq_codes_loop(xf, wf, n, s, z, mlo, mhi, kind, symmetric, qb, rb, split_product):
    """`_hqq_codes`' loop, x̂ by `_x_hat`."""
    err = np.float32(0.0)
    sqq = np.float32(0.0)
    sq = np.float32(0.0)
    sqx = np.float32(0.0)
    split = s * _SPLIT
    for k in range(n):
        t = xf[k] / s
        m = min(max(np.rint(t), mlo), mhi)
        d = _x_hat(m, s, split, kind, split_product) - xf[k]
        if symmetric:
            q = m
            res = t - m
        else:
            q = m + z  # the stored code
            res = t + z - q  # code units
        qb[k] = q
        rb[k] = res
        err = _fmuladd(d * d, wf[k], err)
        qw = q * wf[k]
        sqq = _fmuladd(qw, q, sqq)
        if not symmetric:
            sq += qw
        sqx = _fmuladd(qw, xf[k], sqx)
    return err, sqq, sq, sqx


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _largest_residual(lo, hi, s, z, glo, ghi):
    """An upper bound of the largest |residual| (code units) of the codes pass at (s, z) on a
    group with range [lo, hi], from its two extremes alone: a weight whose code is not clipped
    has |r| ≤ ½ (its rounding's own distance); a clipped one's residual grows toward the end of
    the range it lies beyond, so the extremes' are the largest, here with a slack of a few
    float32 roundings of t + z (the loop may add in another order). Two scalar divisions
    instead of an |r| and a max per weight in the codes loop; `_repeats` only needs a bound (a
    larger one leaves out less work, never more)."""
    a = np.float32(0.5)
    for v in (lo, hi):
        t = v / s
        q = min(max(np.rint(t), glo - z), ghi - z) + z
        r = abs(t + z - q)
        if r > a:
            a = r + np.float32(2.0**-20) * (abs(t) + abs(z) + np.float32(1.0))
    return a


_ESTIMATE = ("afn", "arcp", "ninf", "nsz", "contract")  # the flags that allow LLVM's estimate


@intrinsic
def _over_sqrt(typingctx, c, a):
    """float32 c/√a for a > 0 by the CPU's reciprocal square root estimate and a Newton step
    (LLVM's lowering where the flags allow it: `vrsqrt14ps` or `vrsqrtps` on x86), within
    2^-20 relative (tested; ~2 ulp measured) where the exact square root and division take the
    divider twice per weight: hqq's targets pass was bound by it. Only the shrink's threshold
    |r|^(−½)/β uses it (the heuristic that picks the next iterate, whose every candidate is
    then measured exactly), never a value the format stores; the torch search's own rsqrt
    rounds differently again. The flags sit on these two operations alone: the kernel keeps
    `reassoc`. (c·estimate(1/√a) written out instead, LLVM folded the product back into a
    division in some loops.)"""

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        sqrt = builder.module.declare_intrinsic("llvm.sqrt", [f32], ir.FunctionType(f32, [f32]))
        root = builder.call(sqrt, [args[1]], fastmath=_ESTIMATE)
        return builder.fdiv(args[0], root, flags=_ESTIMATE)

    return types.float32(types.float32, types.float32), codegen


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _hqq_targets(wf, symmetric, n, beta, qb, rb):
    """The targets half: Σ w·q·e and Σ w·e (asymmetric only: 0 otherwise) of the shrunk
    residuals e = shrink(r, β) kept by `_hqq_codes`; the fit's sums of its targets y = x − e·s
    follow from them (Σ w·q·y = Σ w·q·x − s·Σ w·q·e, Σ w·y = Σ w·x − s·Σ w·e), one load, a
    multiply and a subtract per weight fewer than making each target. The symmetry is a
    constant in the loop."""
    if symmetric:
        return _hqq_targets_of(wf, n, beta, qb, rb, True)
    return _hqq_targets_of(wf, n, beta, qb, rb, False)


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _hqq_targets_of(wf, n, beta, qb, rb, symmetric):
    """`_hqq_targets`' loop. shrink_p(r, β), p = ½: sign(r)·max(|r| − |r|^(−½)/β, 0), the
    threshold by `_over_sqrt` (14 % less time for hqq sym, 10 % asym: docs/benchmarks.md); |r|
    clamped to 1e-8 as torch's shrink does (r = 0 shrinks to 0; the estimate of 1/√0 would
    make a NaN). The sign is set as a bit (an or), not a select."""
    sqe = np.float32(0.0)
    se = np.float32(0.0)
    inv_beta = np.float32(1.0) / beta
    for k in range(n):
        res = rb[k]
        a = max(abs(res), np.float32(1e-8))
        shrunk = max(a - _over_sqrt(inv_beta, a), np.float32(0.0))
        e = _u32_as_f32(_f32_as_u32(shrunk) | (_f32_as_u32(res) & np.uint32(0x80000000)))
        we = wf[k] * e
        sqe = _fmuladd(qb[k], we, sqe)
        if not symmetric:
            se += we
    return sqe, se


@_jit(inline="always")
def _repeats(amax, beta):
    """Whether β shrinks no residual of a pass whose largest |r| is at most amax
    (|r| − |r|^−½/β < 0 for every |r| ≤ amax): then every target is its weight, so the fit's
    sums are the codes pass's own (Σ w·q·x, Σ w·x), and for an iterate that did not move (the
    same codes and residuals as the last pass; at the last, smaller β no residual was shrunk
    either) the pass would fit (s, z) again. The margin (amax^1.5·β < 1 − 1e-4) keeps float32
    rounding from shrinking the largest residual; amax·√amax, not a power (a call to libm, run
    every iteration)."""
    a = np.float64(amax)
    return a * np.sqrt(a) * np.float64(beta) < 1.0 - 1e-4


# One group's hqq between iterations: the iteration `it`, the iterate (s, z) and β; the last
# codes pass's parameters, its bound on |r| and its sums; RTN's error, the best error and its
# parameters; the passes run; Σ w and Σ w·x.
HqqState = namedtuple(
    "HqqState",
    "it s z beta last_s last_z amax e sqq sq sqx e0 best bs bz passes targets nw swx",
)


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _hqq_start(xf, wf, n, s0, z0, beta0):
    """The state before hqq's first pass on a group, from RTN's (s0, z0)."""
    nw = np.float32(0.0)
    swx = np.float32(0.0)
    for k in range(n):
        nw += wf[k]
        swx += wf[k] * xf[k]
    inf = np.float32(np.inf)
    nil = np.float32(0.0)
    return HqqState(
        np.int64(0), s0, z0, np.float32(beta0), np.float32(np.nan), z0, inf, nil, nil, nil, nil,
        inf, inf, s0, z0, np.int64(0), np.int64(0), nw, swx,
    )  # fmt: skip


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _hqq_step(xf, wf, lo, hi, n, kind, symmetric, fmin, fmax, iterations, kappa, skip, qb, rb, st):  # fmt: skip
    """One iteration of hqq on one group (`rounding._hqq`, every iterate snapped to the format
    before the next): a codes pass measures the iterate (`_hqq_codes`), a targets pass
    (`_hqq_targets`) and the weighted least squares fit of scale and offset make the next. With
    `skip`, an iterate equal to the last one keeps that pass's codes, error and code sums (they
    would come out the same) and only its targets are made again at the new β; when β shrinks no
    residual either, nothing is (`_repeats`). Where β shrinks no residual, with or without
    `skip`, the targets are the weights and no targets pass runs. The last iterate, measured
    and not fitted, takes an error pass (`_error32`), not a codes pass (3-4 % less time asym).
    Returns the next state; the group is done when its `it` passes `iterations`."""
    it, s, z, beta = st.it, st.s, st.z, st.beta
    last_s, last_z, amax = st.last_s, st.last_z, st.amax
    e, sqq, sq, sqx = st.e, st.sqq, st.sq, st.sqx
    e0, best, bs, bz, passes, targets = st.e0, st.best, st.bs, st.bz, st.passes, st.targets
    same = skip and s == last_s and z == last_z
    if same and (it == iterations or _repeats(amax, beta)):
        beta *= np.float32(kappa)  # as after a pass; the fit would give (s, z) again
    else:
        zf = np.float32(z)
        if not same:  # the same codes as the last pass otherwise: its error, Σwq², Σwq hold
            glo, ghi = _finite_codes(s, zf, kind, fmin, fmax)
            # The last iterate is measured, not fitted: its error alone, summed as weighted
            # (wf is all ones unweighted), the same sum as the codes pass's.
            if it == iterations:
                e = _error32(xf, wf, True, n, s, _reciprocal(s), zf, glo, ghi, kind)
            else:
                e, sqq, sq, sqx = _hqq_codes(xf, wf, symmetric, n, s, zf, glo, ghi, kind, qb, rb)
                amax = _largest_residual(lo, hi, s, zf, glo, ghi)
                last_s, last_z = s, z
            passes += 1
        if it == 0:
            e0, best = e, e
        elif e < best:
            best, bs, bz = e, s, z
        if it < iterations:  # the last iterate is measured, not fitted
            if _repeats(amax, beta):  # no residual is shrunk: the targets are the weights
                sqe = se = np.float32(0.0)
            else:
                sqe, se = _hqq_targets(wf, symmetric, n, beta, qb, rb)
                targets += 1
            beta *= np.float32(kappa)
            s, z = _hqq_fit(
                s, zf, sqq, sq, sqx, sqe, se, st.nw, st.swx, kind, symmetric, fmin, fmax
            )
    return HqqState(it + 1, s, z, beta, last_s, last_z, amax, e, sqq, sq, sqx, e0, best, bs, bz, passes, targets, st.nw, st.swx)  # fmt: skip


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _hqq_fit(s, zf, sqq, sq, sqx, sqe, se, nw, swx, kind, symmetric, fmin, fmax):
    """The next iterate from a pass at (s, zf): the weighted least squares of the targets on
    the codes, solved in float64 from the float32 sums (its determinant Σw·Σwq² − (Σwq)²
    cancels) for the scale and the offset o, then snapped to the format (the scale rounded once
    to 16 bits, `_round_to_scalar`; an integer zero point). Keeps (s, zf)'s scale or offset
    where the fit is not a positive finite scale. Asymmetric, scale and offset both come from
    one reciprocal of the determinant (Cramer's rule, as the torch search solves it): the
    offset by back-substitution waited on the scale, two divisions in a row on the iteration's
    chain of dependent steps (−7 % for hqq asym in one-process A/Bs, within the spread between
    processes: docs/benchmarks.md)."""
    new_s = np.float64(s)
    new_o = -np.float64(zf) * np.float64(s)
    a_qq = np.float64(sqq)
    a_qy = np.float64(sqx) - np.float64(s) * np.float64(sqe)
    if symmetric:
        fit = a_qy / a_qq
        if a_qq > 0 and fit > 0 and np.isfinite(fit):
            new_s = fit
    else:
        a_w, a_q = np.float64(nw), np.float64(sq)
        a_y = np.float64(swx) - np.float64(s) * np.float64(se)
        det = a_w * a_qq - a_q * a_q
        inv = 1.0 / det
        fit = (a_w * a_qy - a_q * a_y) * inv
        off = (a_qq * a_y - a_q * a_qy) * inv
        if det > 0 and fit > 0 and np.isfinite(fit) and np.isfinite(off):
            new_s = fit
            new_o = off
    s = _round_to_scalar(new_s, kind)
    if s == 0:
        s = np.float32(1.0)
    z = 0
    if not symmetric:
        zr = np.rint(-new_o / np.float64(s))
        zr = np.float32(0.0) if zr != zr else zr
        z = int(min(max(zr, fmin), fmax))
    return s, z


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _hqq_pair(a, b, kind, symmetric, qmin, qmax, iterations, beta0, kappa, skip):
    """hqq on two groups at once, an iteration of each in turn: each group's iterations are a
    chain (a pass's sums, the fit, the next pass), mostly latency, and the other group's
    independent chain fills it (15-25 % less time than one group after the other, measured;
    four at once were slower, and one step's code picked by index for both was slower still:
    docs/benchmarks.md). a and b are (weights, importance, min, max, size, RTN's scale
    and zero point, whether to search it, codes and residual buffers); a group not searched
    keeps its start state (RTN's parameters, errors ∞). Returns both final states."""
    xa, wa, la, ha, na, sa, za, run_a, qa, ra = a
    xb, wb, lb, hb, nb, sb, zb, run_b, qb, rb = b
    fmin = np.float32(qmin)
    fmax = np.float32(qmax)
    st_a = _hqq_start(xa, wa, na, sa, za, beta0)
    st_b = _hqq_start(xb, wb, nb, sb, zb, beta0)
    done_a = not run_a
    done_b = not run_b
    while not (done_a and done_b):
        if not done_a:
            st_a = _hqq_step(xa, wa, la, ha, na, kind, symmetric, fmin, fmax, iterations, kappa, skip, qa, ra, st_a)  # fmt: skip
            done_a = st_a.it > iterations
        if not done_b:
            st_b = _hqq_step(xb, wb, lb, hb, nb, kind, symmetric, fmin, fmax, iterations, kappa, skip, qb, rb, st_b)  # fmt: skip
            done_b = st_b.it > iterations
    return st_a, st_b


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _hqq_group_at(raw, keys, j, total, ngroups, g, kind, symmetric, qmin, qmax, imp32, xf, qb, rb):
    """Group j of the block (row-major; j past the end: group total − 1 again, not searched)
    loaded into xf, as `_hqq_pair` takes it, with its row, index, column, size and RTN's
    scale and zero point."""
    cols = raw.shape[1]
    present = j < total
    j = j if present else total - 1
    r, gi = j // ngroups, j % ngroups
    c0 = gi * g
    n = min(g, cols - c0)
    lo, hi = _load_group(raw[r], keys[r], c0, n, kind, xf)
    s0, z0 = _rtn_params(np.float64(lo), np.float64(hi), kind, symmetric, qmin, qmax)
    finite = np.isfinite(lo) and np.isfinite(hi)
    run = present and finite
    group = (xf, imp32[c0 : c0 + n], lo, hi, n, s0, z0, run, qb, rb)
    return group, present and not finite, r, gi, c0, n, s0, z0


@_jit(fastmath=_FASTMATH, error_model="numpy", _nrt=False)
def _hqq_block(raw, keys, kind, g, symmetric, qmin, qmax, iterations, beta0, kappa, skip, passes, imp, imp32, weighted, scale, zero, xf, qb, rb):  # fmt: skip
    """hqq over every group of the block, as `_mse_block`: the groups two at a time
    (`_hqq_pair`), in row-major order; xf, qb, rb hold two groups (`_group_buffers`), qb and rb
    its codes and residuals. It adds the codes passes it runs to passes[0], the targets passes
    to passes[1]."""
    ngroups = scale.shape[1]
    total = raw.shape[0] * ngroups
    fmin = np.float32(qmin)
    fmax = np.float32(qmax)
    xa, xb = xf[:g], xf[g : 2 * g]
    qa, qb2 = qb[:g], qb[g : 2 * g]
    ra, rb2 = rb[:g], rb[g : 2 * g]
    nonfinite = 0
    for j in range(0, total, 2):
        a, bad_a, r_a, gi_a, c_a, n_a, s0_a, z0_a = _hqq_group_at(raw, keys, j, total, ngroups, g, kind, symmetric, qmin, qmax, imp32, xa, qa, ra)  # fmt: skip
        b, bad_b, r_b, gi_b, c_b, n_b, s0_b, z0_b = _hqq_group_at(raw, keys, j + 1, total, ngroups, g, kind, symmetric, qmin, qmax, imp32, xb, qb2, rb2)  # fmt: skip
        nonfinite += int(bad_a) + int(bad_b)
        st_a, st_b = _hqq_pair(a, b, kind, symmetric, qmin, qmax, iterations, beta0, kappa, skip)  # fmt: skip
        passes[0] += st_a.passes + st_b.passes
        passes[1] += st_a.targets + st_b.targets
        _finish(xa, imp[c_a : c_a + n_a], weighted, n_a, kind, s0_a, z0_a, st_a.e0, st_a.bs, st_a.bz, st_a.best, fmin, fmax, scale, zero, r_a, gi_a)  # fmt: skip
        if j + 1 < total:
            _finish(xb, imp[c_b : c_b + n_b], weighted, n_b, kind, s0_b, z0_b, st_b.e0, st_b.bs, st_b.bz, st_b.best, fmin, fmax, scale, zero, r_b, gi_b)  # fmt: skip
    return nonfinite


def _group_buffers(group: int, count: int) -> tuple[np.ndarray, ...]:
    """The searches' group buffers, each room for two groups (hqq runs two at a time; mse
    prepares the next group while it walks one): the widened weights, then (hqq, count 3) its
    codes and residuals."""
    return tuple(np.empty(2 * group, np.float32) for _ in range(count))


_LANES = 8  # `_candidates_at_once` runs 8 candidates per vector


def _walk_buffers(
    factors: np.ndarray, coarse: list[tuple[int, int]], steps: tuple[int, ...]
) -> tuple[np.ndarray, ...]:
    """mse's tables and buffers for `_mse_block`, float32 tables of (factor, cut share
    1 − factor, shift ½·t) per candidate as `_candidates_at_once` reads them, each padded to a
    multiple of `_LANES` (a remainder would run one lane at a time): the coarse candidates'
    (3, m), copies of the last as padding; the steps' (3, m') filled per group (every factor
    within Σ steps of the coarse best); the buffers for the scales, their reciprocals, zero
    points and clipping bounds of either, room for two groups (one walked, the next prepared),
    and for the errors of one."""
    if any(i < 1 or i >= len(factors) for i, _ in coarse):
        raise ValueError(f"coarse candidates index factors 1 to {len(factors) - 1}: {coarse}")
    padded = list(coarse) + coarse[-1:] * (-len(coarse) % _LANES)
    table = np.array(
        [
            [np.float32(factors[i]) for i, _ in padded],
            [np.float32(1.0 - factors[i]) for i, _ in padded],
            [np.float32(0.5) * np.float32(t) for _, t in padded],
        ],
        np.float32,
    ).reshape(3, len(padded))
    near = np.empty((3, -(-(2 * sum(steps) + 1) // _LANES) * _LANES), np.float32)
    m = max(table.shape[1], near.shape[1])
    scales, recips, zeros, bounds = (
        np.empty(2 * m, t) for t in (np.float32, np.float32, np.int64, np.float32)
    )
    errors = np.empty(m, np.float32)
    return table, scales, recips, zeros, bounds, errors, near


def _prepare(
    raw: np.ndarray, kind: int, group: int, importance: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, bool, np.ndarray, np.ndarray]:
    """Checked arguments and the outputs: (the importance per column in float64 and float32,
    ones when there is none; weighted, scale bits, zero points)."""
    _check_raw(raw, kind)
    rows, cols = raw.shape
    if group < 1:
        raise ValueError(f"group must be ≥ 1, got {group}")
    if importance is None:
        imp = np.ones(cols, np.float64)
    else:
        imp = np.ascontiguousarray(importance, dtype=np.float64).reshape(-1)
        if imp.shape != (cols,) or not np.isfinite(imp).all() or (imp < 0).any():
            raise ValueError(f"importance must be {cols} finite non-negative values per column")
    ngroups = -(-cols // group)
    scale = np.empty((rows, ngroups), np.uint16)
    zero = np.zeros((rows, ngroups), np.int8)
    return imp, imp.astype(np.float32), importance is not None, scale, zero


def search_mse_16(
    raw: np.ndarray,
    kind: int,
    group: int,
    symmetric: bool,
    qrange: tuple[int, int],
    factors: np.ndarray,
    path: tuple[list[tuple[int, int]], tuple[int, ...]],
    importance: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """mse's parameters for a (rows, cols) block of 16-bit weight bits (uint16, C order):
    `factors` the shrink factors (1.0 first, as `rounding._shrink_factors`), `path` the walk over
    them (`rounding.mse_path`), `importance` an optional per-column weight. Returns (scale bits
    uint16 (rows, ngroups), int8 zero points or None when symmetric, the number of groups holding
    NaN or ±inf: those keep RTN's parameters, their figures are meaningless and the caller
    refuses the block)."""
    imp, imp32, weighted, scale, zero = _prepare(raw, kind, group, importance)
    qmin, qmax = qrange
    f = np.ascontiguousarray(factors, dtype=np.float64)
    if f.ndim != 1 or not f.size or f[0] != 1.0 or not ((f > 0) & (f <= 1)).all():
        raise ValueError(f"factors must be 1.0 then shrink factors in (0, 1], got {f}")
    coarse, steps = path
    path_i = np.array([i for i, _ in coarse], np.int64)
    path_t = np.array([t for _, t in coarse], np.int64)
    nonfinite = _mse_block(
        raw, raw.view(np.int16), kind, group, symmetric, qmin, qmax, f, path_i, path_t,
        np.array(steps, np.int64), imp, imp32, weighted, scale, zero, *_group_buffers(group, 1),
        *_walk_buffers(f, coarse, steps),
    )  # fmt: skip
    return scale, None if symmetric else zero, int(nonfinite)


def search_hqq_16(
    raw: np.ndarray,
    kind: int,
    group: int,
    symmetric: bool,
    qrange: tuple[int, int],
    iterations: int,
    beta: float,
    kappa: float,
    importance: np.ndarray | None = None,
    skip_repeats: bool = True,
    passes: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """hqq's parameters for a block, as `search_mse_16` returns them: `iterations` steps from
    RTN's parameters, penalty `beta` growing by `kappa` per step. `skip_repeats` leaves out the
    work that would repeat the last pass exactly (`_hqq_step`: the same parameters either way,
    about half the codes passes on the bench's weights); False runs every pass, the reference
    the skipping is tested against. `passes`, an int64 array of two, gets the codes passes and
    the targets passes run added (the last iterate's error pass counts as a codes pass)."""
    imp, imp32, weighted, scale, zero = _prepare(raw, kind, group, importance)
    if passes is not None and (passes.dtype != np.int64 or passes.shape != (2,)):
        raise ValueError(
            f"passes must be an int64 array of shape (2,), got {passes.dtype} {passes.shape}"
        )
    qmin, qmax = qrange
    nonfinite = _hqq_block(
        raw, raw.view(np.int16), kind, group, symmetric, qmin, qmax, iterations, beta, kappa,
        skip_repeats, np.zeros(2, np.int64) if passes is None else passes, imp, imp32, weighted,
        scale, zero, *_group_buffers(group, 3),
    )  # fmt: skip
    return scale, None if symmetric else zero, int(nonfinite)


def warm_up() -> None:
    """Compile or load both searches on a tiny block."""
    raw = np.zeros((1, 32), np.uint16)
    for symmetric in (True, False):
        search_mse_16(raw, BF16, 32, symmetric, (-8, 7), np.array([1.0, 0.8]), ([(1, 0)], (1,)))
        search_hqq_16(raw, F16, 32, symmetric, (-8, 7), 2, 0.3, 1.3, np.ones(32))
