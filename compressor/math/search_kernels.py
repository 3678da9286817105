"""Fused CPU kernels for the data-free rounding searches (`rounding.search_qparams`'s mse and hqq
for int schemes on 16-bit weights): one compiled loop per group instead of ~8 torch passes per
candidate over the whole block.

Each group's weights are widened once into a small buffer, then every candidate is evaluated
there, in cache:

    mse   the same candidate set as `rounding._mse_candidates` (each clipped range's parameters
          from `kernels._rtn_params`, the float64 steps of `quant.qparams_from_range`), ranked by
          Σ w·(x − x̂)² in float32. A candidate is skipped when clipping the group's two extremes
          alone costs the best error so far, and its sum stops as soon as it reaches that error
          (every term is ≥ 0, so it could not win); neither changes what is chosen.
    hqq   the iteration of `rounding._hqq` (shrunk residual, weighted least squares fit of scale
          and offset, β annealed), each iterate snapped to the format and ranked the same way; an
          iterate equal to the last one offered is not evaluated again.

x̂ is what the stored format reconstructs: `kernels._quantize_pack`'s codes (one float32
division, rint, the finite code range) and its product narrowed once to the 16-bit dtype.

Guarantee, as the torch search: RTN's parameters are always a candidate, and the final choice
between the best candidate and RTN compares float64 errors, keeping RTN unless the candidate is
strictly better, so for every group E(chosen) ≤ E(rtn) in float64. Against the torch search:
the candidates are the same (mse) or the same iteration (hqq), but sums run in another order, so
where two candidates' float32 errors agree to rounding the two may keep different ones, and hqq's
iterates move a little (tested: at most max(2, 1 %) of the groups differ; the total error
agrees to 1e-5 relative for mse, 1e-3 for hqq).
"""

from __future__ import annotations

import numpy as np

from compressor.math.kernels import (
    BF16,
    F16,
    _bits16,
    _check_raw,
    _finite_codes,
    _jit,
    _narrow,
    _range_of,
    _rtn_params,
    _widen,
)

__all__ = ["search_hqq_16", "search_mse_16"]

_FASTMATH = {"reassoc"}
_BLOCK = 32  # weights summed between two checks against the best error (mse's early stop)


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _error32(xf, wf, weighted, n, s, z, glo, ghi, kind, best):
    """Σ w·(x − x̂)² of one group in float32 for parameters (s, z); stops once it reaches
    `best` (then the value returned is ≥ best and the candidate loses)."""
    acc = np.float32(0.0)
    k0 = 0
    while k0 < n:
        k1 = min(k0 + _BLOCK, n)
        part = np.float32(0.0)
        for k in range(k0, k1):
            y = np.rint(xf[k] / s) + z
            y = glo if y < glo else y
            y = ghi if y > ghi else y
            d = _narrow((y - z) * s, kind) - xf[k]
            dw = d * wf[k] if weighted else d
            part += dw * d
        acc += part
        if acc >= best:
            return acc
        k0 = k1
    return acc


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
def _load_group(xr, kr, c0, n, kind, imp, weighted, xf, wf, wd):
    for k in range(n):
        xf[k] = _widen(xr[c0 + k], kind)
        if weighted:
            wd[k] = imp[c0 + k]
            wf[k] = np.float32(imp[c0 + k])
    return _range_of(kr[c0 : c0 + n], kind)


@_jit(inline="always")
def _extremes(xf, wf, n):
    """The weights of the group's largest and smallest weight (what clipping costs first)."""
    i_hi = 0
    i_lo = 0
    for k in range(1, n):
        if xf[k] > xf[i_hi]:
            i_hi = k
        if xf[k] < xf[i_lo]:
            i_lo = k
    return wf[i_hi], wf[i_lo]


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _clip_bound(lo, hi, w_lo, w_hi, s, z, glo, ghi, kind):
    """A lower bound of a candidate's error: what clipping the two extremes alone costs (no
    code reconstructs above narrow((ghi − z)·s) or below narrow((glo − z)·s))."""
    top = _narrow((ghi - z) * s, kind)
    bottom = _narrow((glo - z) * s, kind)
    bound = np.float32(0.0)
    if hi > top:
        bound += w_hi * (hi - top) * (hi - top)
    if lo < bottom:
        bound += w_lo * (bottom - lo) * (bottom - lo)
    return bound


@_jit(inline="always")
def _finish(xf, wd, weighted, n, kind, s0, z0, bs, bz, fmin, fmax, scale, zero, r, gi):
    """Store the best candidate if it beats RTN in float64, else RTN's parameters."""
    if bs != s0 or bz != z0:
        lo0, hi0 = _finite_codes(s0, np.float32(z0), kind, fmin, fmax)
        lo1, hi1 = _finite_codes(bs, np.float32(bz), kind, fmin, fmax)
        e0 = _error64(xf, wd, weighted, n, s0, np.float32(z0), lo0, hi0, kind)
        e1 = _error64(xf, wd, weighted, n, bs, np.float32(bz), lo1, hi1, kind)
        if not e1 < e0:
            bs, bz = s0, z0
    scale[r, gi] = _bits16(bs, kind)
    zero[r, gi] = bz


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _offer(xf, wf, weighted, n, lo, hi, w_lo, w_hi, s, z, kind, fmin, fmax, best, bs, bz):
    """(best error, scale, zero) after measuring candidate (s, z) against the best so far,
    unless clipping the extremes alone already costs as much."""
    zf = np.float32(z)
    glo, ghi = _finite_codes(s, zf, kind, fmin, fmax)
    if _clip_bound(lo, hi, w_lo, w_hi, s, zf, glo, ghi, kind) >= best:
        return best, bs, bz
    e = _error32(xf, wf, weighted, n, s, zf, glo, ghi, kind, best)
    if e < best:
        return e, s, z
    return best, bs, bz


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _mse_group(xf, wf, weighted, n, lo, hi, s0, z0, best, kind, symmetric, qmin, qmax, factors):
    """mse's best candidate of one group (RTN's (s0, z0) with error `best` to beat)."""
    fmin = np.float32(qmin)
    fmax = np.float32(qmax)
    bs, bz = s0, z0
    w_hi, w_lo = _extremes(xf, wf, n)
    if symmetric:
        for a in factors[1:]:
            fa = np.float32(a)
            s, z = _rtn_params(np.float64(lo * fa), np.float64(hi * fa), kind, True, qmin, qmax)
            if s != bs:
                best, bs, bz = _offer(xf, wf, weighted, n, lo, hi, w_lo, w_hi, s, z, kind, fmin, fmax, best, bs, bz)  # fmt: skip
        return bs, bz
    clo = min(lo, np.float32(0.0))  # the int asymmetric range always holds 0
    chi = max(hi, np.float32(0.0))
    width = chi - clo
    for a in factors[1:]:
        cut = width * np.float32(1.0 - a)
        for t in (np.float32(0.0), np.float32(0.5), np.float32(1.0)):  # keep lo, centred, keep hi
            c_lo = clo + cut * t
            c_hi = chi - cut * (np.float32(1.0) - t)
            s, z = _rtn_params(np.float64(c_lo), np.float64(c_hi), kind, False, qmin, qmax)
            if s != bs or z != bz:
                best, bs, bz = _offer(xf, wf, weighted, n, lo, hi, w_lo, w_hi, s, z, kind, fmin, fmax, best, bs, bz)  # fmt: skip
    return bs, bz


@_jit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _hqq_group(xf, wf, weighted, n, s0, z0, best, kind, symmetric, qmin, qmax, iterations, beta0, kappa):  # fmt: skip
    """hqq's best iterate of one group, snapped to the format (RTN's (s0, z0), error `best`)."""
    fmin = np.float32(qmin)
    fmax = np.float32(qmax)
    bs, bz = s0, z0
    nw = np.float32(0.0)  # Σ w
    for k in range(n):
        nw += wf[k]
    s = s0
    o = np.float32(0.0) if symmetric else -np.float32(z0) * s0
    last_s, last_z = s0, z0
    beta = np.float32(beta0)
    for _ in range(iterations):
        sqq = np.float32(0.0)
        sqy = np.float32(0.0)
        sq = np.float32(0.0)
        sy = np.float32(0.0)
        for k in range(n):
            u = (xf[k] - o) / s  # code units
            q = np.rint(u)
            q = fmin if q < fmin else q
            q = fmax if q > fmax else q
            res = u - q
            a = abs(res)  # shrink_p(res, β), p = ½: sign·max(|r| − |r|^(−½)/β, 0)
            shrunk = a - np.float32(1.0) / (np.sqrt(max(a, np.float32(1e-8))) * beta)
            shrunk = shrunk if shrunk > 0 else np.float32(0.0)
            e = shrunk if res >= 0 else -shrunk
            target = xf[k] - e * s
            qw = q * wf[k]
            sqq += qw * q
            sqy += qw * target
            sq += qw
            sy += target * wf[k]
        beta *= np.float32(kappa)
        if symmetric:  # weighted least squares of target on q: s (and the offset o)
            new_s = sqy / sqq
            if sqq > 0 and new_s > 0 and np.isfinite(new_s):
                s = new_s
        else:
            det = nw * sqq - sq * sq
            new_s = (nw * sqy - sq * sy) / det
            new_o = (sy - new_s * sq) / nw
            if det > 0 and new_s > 0 and np.isfinite(new_s) and np.isfinite(new_o):
                s = new_s
                o = new_o
        # snap to the format: the scale narrowed to 16 bits, an integer zero point
        cs = _narrow(s, kind)
        if cs == 0:
            cs = np.float32(1.0)
        cz = 0
        if not symmetric:
            zf = np.rint(-o / cs)
            zf = np.float32(0.0) if zf != zf else zf
            zf = fmin if zf < fmin else zf
            zf = fmax if zf > fmax else zf
            cz = int(zf)
        if cs == last_s and cz == last_z:  # the same candidate again: nothing to measure
            continue
        last_s, last_z = cs, cz
        czf = np.float32(cz)
        glo, ghi = _finite_codes(cs, czf, kind, fmin, fmax)
        e = _error32(xf, wf, weighted, n, cs, czf, glo, ghi, kind, best)
        if e < best:
            best, bs, bz = e, cs, cz
    return bs, bz


_MSE = 0
_HQQ = 1


@_jit(fastmath=_FASTMATH, error_model="numpy")
def _search(raw, keys, kind, g, symmetric, qmin, qmax, mode, factors, iterations, beta0, kappa, imp, weighted, scale, zero):  # fmt: skip
    """Every group of the block: RTN's parameters, then mode's search, then the float64 choice.
    Returns the number of groups holding NaN or ±inf (left at RTN's parameters)."""
    rows, cols = raw.shape
    ngroups = scale.shape[1]
    fmin = np.float32(qmin)
    fmax = np.float32(qmax)
    xf = np.empty(g, np.float32)
    wf = np.ones(g, np.float32)
    wd = np.ones(g, np.float64)
    nonfinite = 0
    for r in range(rows):
        for gi in range(ngroups):
            c0 = gi * g
            n = min(g, cols - c0)
            lo, hi = _load_group(raw[r], keys[r], c0, n, kind, imp, weighted, xf, wf, wd)
            s0, z0 = _rtn_params(np.float64(lo), np.float64(hi), kind, symmetric, qmin, qmax)
            bs, bz = s0, z0
            if not (np.isfinite(lo) and np.isfinite(hi)):
                nonfinite += 1
            else:
                glo, ghi = _finite_codes(s0, np.float32(z0), kind, fmin, fmax)
                best = _error32(xf, wf, weighted, n, s0, np.float32(z0), glo, ghi, kind, np.inf)
                if mode == _MSE:
                    bs, bz = _mse_group(
                        xf, wf, weighted, n, lo, hi, s0, z0, best, kind, symmetric, qmin, qmax,
                        factors,
                    )  # fmt: skip
                else:
                    bs, bz = _hqq_group(
                        xf, wf, weighted, n, s0, z0, best, kind, symmetric, qmin, qmax,
                        iterations, beta0, kappa,
                    )  # fmt: skip
            _finish(xf, wd, weighted, n, kind, s0, z0, bs, bz, fmin, fmax, scale, zero, r, gi)
    return nonfinite


def _prepare(
    raw: np.ndarray, kind: int, group: int, importance: np.ndarray | None
) -> tuple[np.ndarray, bool, np.ndarray, np.ndarray]:
    """Checked arguments and the outputs: (importance or a placeholder, weighted, scale bits,
    zero points)."""
    _check_raw(raw, kind)
    rows, cols = raw.shape
    if group < 1:
        raise ValueError(f"group must be ≥ 1, got {group}")
    if importance is None:
        imp = np.zeros(1, np.float64)
    else:
        imp = np.ascontiguousarray(importance, dtype=np.float64).reshape(-1)
        if imp.shape != (cols,) or not np.isfinite(imp).all() or (imp < 0).any():
            raise ValueError(f"importance must be {cols} finite non-negative values per column")
    ngroups = -(-cols // group)
    scale = np.empty((rows, ngroups), np.uint16)
    zero = np.zeros((rows, ngroups), np.int8)
    return imp, importance is not None, scale, zero


def search_mse_16(
    raw: np.ndarray,
    kind: int,
    group: int,
    symmetric: bool,
    qrange: tuple[int, int],
    factors: np.ndarray,
    importance: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """mse's parameters for a (rows, cols) block of 16-bit weight bits (uint16, C order):
    `factors` the shrink factors (1.0 first, as `rounding._shrink_factors`), `importance` an
    optional per-column weight. Returns (scale bits uint16 (rows, ngroups), int8 zero points or
    None when symmetric, the number of groups holding NaN or ±inf: those keep RTN's parameters,
    their figures are meaningless and the caller refuses the block)."""
    imp, weighted, scale, zero = _prepare(raw, kind, group, importance)
    qmin, qmax = qrange
    f = np.ascontiguousarray(factors, dtype=np.float64)
    nonfinite = _search(
        raw, raw.view(np.int16), kind, group, symmetric, qmin, qmax, _MSE, f, 0, 0.0, 1.0,
        imp, weighted, scale, zero,
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
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """hqq's parameters for a block, as `search_mse_16` returns them: `iterations` steps from
    RTN's parameters, penalty `beta` growing by `kappa` per step."""
    imp, weighted, scale, zero = _prepare(raw, kind, group, importance)
    qmin, qmax = qrange
    nonfinite = _search(
        raw, raw.view(np.int16), kind, group, symmetric, qmin, qmax, _HQQ, np.ones(1),
        iterations, beta, kappa, imp, weighted, scale, zero,
    )  # fmt: skip
    return scale, None if symmetric else zero, int(nonfinite)


def warm_up() -> None:
    """Compile or load both searches on a tiny block."""
    raw = np.zeros((1, 32), np.uint16)
    for symmetric in (True, False):
        search_mse_16(raw, BF16, 32, symmetric, (-8, 7), np.array([1.0, 0.8]))
        search_hqq_16(raw, F16, 32, symmetric, (-8, 7), 2, 0.3, 1.3, np.ones(32))
