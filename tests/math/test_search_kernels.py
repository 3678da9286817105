"""The fused mse/hqq searches (`math.search_kernels`, through `rounding.fused_search`) against the
torch search they replace on the CPU: never worse than RTN per group in float64, the same total
error, and (away from float32 ties) the same parameters."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

from compressor.math import kernels, search_kernels
from compressor.math.quant import QuantArgs, quantized_range
from compressor.math.rounding import (
    _HQQ_BETA,
    _HQQ_KAPPA,
    HQQ_ITERATIONS,
    MSE_GRID,
    _shrink_factors,
    fused_search,
    mse_path,
    reconstruction_error,
    search_qparams,
)

KINDS = {torch.bfloat16: kernels.BF16, torch.float16: kernels.F16}
ARGS = [
    QuantArgs(bits=4, symmetric=True, strategy="group", group_size=128),
    QuantArgs(bits=4, symmetric=False, strategy="group", group_size=64),
    QuantArgs(bits=3, symmetric=False, strategy="group", group_size=48),  # 200 % 48: a tail
    QuantArgs(bits=8, symmetric=True, strategy="channel"),
]


def _weights(dtype: torch.dtype, rows: int = 96, cols: int = 200) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)  # Student-t with 4 degrees of freedom: z / sqrt(χ²₄/4)
    chi2 = torch.randn((4, rows, cols), generator=g).pow(2).sum(0)
    t = torch.randn((rows, cols), generator=g) / (chi2 / 4).sqrt() * 0.02
    t = t * torch.rand(1, cols, generator=g) * 3  # columns of different scales
    return t.to(dtype)


def _fused(x: torch.Tensor, args: QuantArgs, mode: str, importance: torch.Tensor | None):
    raw = x.contiguous().view(torch.int16).numpy().view(np.uint16)
    bits16, zeros, bad = fused_search(raw, KINDS[x.dtype], args, mode, importance)  # type: ignore[arg-type]
    assert bad == int((~torch.isfinite(x)).any(dim=1).sum())  # one group per bad row here
    scale = torch.from_numpy(bits16.view(np.int16)).view(x.dtype)
    return scale, None if zeros is None else torch.from_numpy(zeros)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("args", ARGS, ids=lambda a: a.describe())
@pytest.mark.parametrize("mode", ["mse", "hqq"])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_search_matches_the_torch_search(dtype, args, mode, weighted):
    x = _weights(dtype)
    g = torch.Generator().manual_seed(7)  # not the global generator: the same in every run
    importance = torch.rand(x.shape[1], dtype=torch.float64, generator=g) ** 4 * 1e3
    importance = importance if weighted else None
    scale, zero = _fused(x, args, mode, importance)
    ts, tz = search_qparams(x, args, dtype, mode, importance)  # type: ignore[arg-type]
    rs, rz = search_qparams(x, args, dtype, "rtn")
    assert scale.shape == ts.shape and scale.dtype == ts.dtype
    fused_e = reconstruction_error(x, scale, zero, args, importance)
    rtn_e = reconstruction_error(x, rs, rz, args, importance)
    torch_e = reconstruction_error(x, ts, tz, args, importance)
    assert bool((fused_e <= rtn_e).all())  # the guarantee, group by group, in float64
    if args.bits < 8:  # and the search does search (8 bits leave it little to find)
        assert float(fused_e.sum()) < 0.97 * float(rtn_e.sum())
    # the same candidates (mse) or iteration (hqq, its fit in float64), so the same choice but
    # where two float32 errors tie to rounding: a few groups at most (measured over 3 importance
    # draws × these 16 cases: hqq 1 group in 2 cases, mse ≤ 1 of 96 per-channel groups)
    assert float(fused_e.sum()) == pytest.approx(float(torch_e.sum()), rel=1e-5)
    same = scale == ts if zero is None else (scale == ts) & (zero == tz)
    assert int((~same).sum()) <= max(2, same.numel() // 100)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("args", ARGS[:3], ids=lambda a: a.describe())
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(
    ("schedule", "share"),
    [((HQQ_ITERATIONS, _HQQ_BETA, _HQQ_KAPPA), 1.0), ((15, 0.3, 1.3), 0.8)],
    ids=["default", "long"],
)
def test_hqq_skips_only_work_that_changes_nothing(dtype, args, weighted, schedule, share):
    """Codes passes left out for an iterate equal to the last one, and targets left out where
    no residual is shrunk either (`_repeats`), change no parameter: every group's scale and
    zero point equal those of the search that runs every pass, while fewer codes passes run
    (measured here: 34 to 69 % fewer on the 15-iteration schedule hqq had until 2026-12-05,
    whose small β repeat often; 3 to 10 % on today's 5)."""
    iterations, beta, kappa = schedule
    x = _weights(dtype, rows=64, cols=400)
    raw = x.contiguous().view(torch.int16).numpy().view(np.uint16)
    g = torch.Generator().manual_seed(11)
    importance = (torch.rand(x.shape[1], dtype=torch.float64, generator=g) ** 4).numpy()
    imp = importance if weighted else None
    counted = {}
    found = {}
    for skip in (True, False):
        counted[skip] = np.zeros(2, np.int64)
        found[skip] = search_kernels.search_hqq_16(
            raw, KINDS[dtype], args.group_size, args.symmetric, quantized_range(args),
            iterations, beta, kappa, imp, skip_repeats=skip, passes=counted[skip],
        )  # fmt: skip
    ngroups = x.shape[0] * -(-x.shape[1] // args.group_size)
    assert int(counted[False][0]) == (1 + iterations) * ngroups  # RTN's pass, the iterations
    assert int(counted[True][0]) < share * int(counted[False][0])
    np.testing.assert_array_equal(found[True][0], found[False][0])
    if not args.symmetric:
        np.testing.assert_array_equal(found[True][1], found[False][1])


def test_repeats_only_where_no_residual_is_shrunk():
    """The condition for leaving out the targets too: amax^1.5·β below 1, with a margin."""
    repeats = search_kernels._repeats
    assert repeats(np.float32(0.5), np.float32(2.0))  # 0.354 · 2 = 0.71
    assert not repeats(np.float32(0.5), np.float32(2.83))  # 0.354 · 2.83 > 1 − 1e-4
    assert not repeats(np.float32(np.inf), np.float32(1.0))  # before the first pass


@numba.njit(fastmath={"reassoc"}, error_model="numpy")
def _over_sqrt_each(c, a, out):
    """`_over_sqrt` in a loop LLVM vectorises, as the targets pass calls it."""
    for k in range(a.shape[0]):
        out[k] = search_kernels._over_sqrt(c, a[k])


@numba.njit(error_model="numpy")
def _over_sqrt_one(c, a):
    """`_over_sqrt` on one value (the scalar estimate: on x86 `rsqrtss`, 12 bits before the
    Newton step)."""
    return search_kernels._over_sqrt(c, a)


@numba.njit(fastmath={"reassoc"}, error_model="numpy")
def _codes_apart(kind, scales, xs):
    """For every scale s that `_by_reciprocal` admits and every x: the pairs whose code
    clamp(rint(x·r), ±255), r = `_reciprocal(s)`, differs from clamp(rint(x/s), ±255), and of
    those the pairs whose two codes do not reconstruct at the same distance from x."""
    scales_checked = apart = unequal = 0
    lim = np.float32(255.0)
    for i in range(scales.shape[0]):
        s = scales[i]
        if not search_kernels._by_reciprocal(s, kind):
            continue
        scales_checked += 1
        r = search_kernels._reciprocal(s)
        for j in range(xs.shape[0]):
            x = xs[j]
            m1 = min(max(np.rint(search_kernels._quotient(x, s, r, True)), -lim), lim)
            m0 = min(max(np.rint(search_kernels._quotient(x, s, r, False)), -lim), lim)
            if m1 != m0:
                apart += 1
                d1 = kernels._narrow(m1 * s, kind) - x
                d0 = kernels._narrow(m0 * s, kind) - x
                unequal += abs(d1) != abs(d0)
    return scales_checked, apart, unequal


@pytest.mark.parametrize("kind", [kernels.BF16, kernels.F16])
def test_codes_by_the_reciprocal_have_the_divisions_error_terms(kind):
    """The error passes round x·(1/s) where `_by_reciprocal` admits s: for every finite 16-bit
    x and every positive finite 16-bit scale it admits (all of float16's, bfloat16's from
    2^-100 to 2^126), the code (clamped to ±255, the widest code range) is the division's, or x/s
    is an exact tie and both codes lie at the same distance from x: the same error term. Ties
    do occur (the check is not vacuous: the product is not folded back into a division)."""
    bits = np.arange(65536, dtype=np.uint32)
    if kind == kernels.BF16:
        values = (bits << 16).view(np.float32)
    else:
        values = bits.astype(np.uint16).view(np.float16).astype(np.float32)
    values = values[np.isfinite(values)]
    scales = values[values > 0]
    checked, apart, unequal = _codes_apart(kind, scales, values)
    assert checked == (28929 if kind == kernels.BF16 else 31743)
    assert unequal == 0
    assert apart > 1000  # the exact ties k + ½, where x·r may round the other way


@pytest.mark.parametrize("c", [2 / 3, 1 / 6, 1 / 24, 1e-3, 7.0])
def test_shrink_threshold_estimate_is_within_a_few_ulp(c):
    """The estimate of c/√a the targets pass takes (vectorised and alone) is within 2^-20 of
    float64's c/√a relative, for every 97th float32 from 1e-8 (the shrink's clamp) to 1e8."""
    lo, hi = np.array([1e-8, 1e8], np.float32).view(np.uint32)
    a = np.arange(lo, hi, 97, dtype=np.uint32).view(np.float32)
    c32 = np.float32(c)
    exact = np.float64(c32) / np.sqrt(a.astype(np.float64))
    out = np.empty_like(a)
    _over_sqrt_each(c32, a, out)
    assert np.max(np.abs(out / exact - 1.0)) < 2.0**-20
    for v in a[:: len(a) // 1000]:
        assert (
            abs(_over_sqrt_one(c32, v) / (np.float64(c32) / np.sqrt(np.float64(v))) - 1) < 2.0**-20
        )


@pytest.mark.parametrize("weighted", [False, True])
def test_targets_are_the_weights_where_no_residual_is_shrunk(weighted):
    """The targets pass returns Σ w·q·e and Σ w·e of the shrunk residuals e (the fit's target
    sums are Σ w·q·x − s·Σ w·q·e and Σ w·x − s·Σ w·e), as float64 math on the residuals it was
    given makes them. Where `_repeats` holds every e is 0, so the targets are the weights and
    hqq leaves the pass out; at a β that shrinks the largest residual they are not 0."""
    xf = _weights(torch.bfloat16, rows=1, cols=128).float().numpy()[0]
    wf = np.ones(128, np.float32)
    if weighted:
        wf = (np.random.default_rng(3).random(128) ** 4).astype(np.float32)
    qmin, qmax = quantized_range(ARGS[0])
    s0, z0 = kernels._rtn_params(float(xf.min()), float(xf.max()), kernels.BF16, True, qmin, qmax)
    s = np.float32(s0 * 0.8)  # a clipping scale: the extremes' residuals exceed ½
    qb, rb = np.empty(128, np.float32), np.empty(128, np.float32)
    glo, ghi = np.float32(qmin), np.float32(qmax)
    z = np.float32(z0)
    search_kernels._hqq_codes(xf, wf, True, 128, s, z, glo, ghi, kernels.BF16, qb, rb)
    lo, hi = np.float32(xf.min()), np.float32(xf.max())
    amax = search_kernels._largest_residual(lo, hi, s, z, glo, ghi)
    assert float(np.abs(rb).max()) > 0.5 and amax == pytest.approx(
        float(np.abs(rb).max()), rel=1e-4
    )
    kept = np.float32(0.9 / amax**1.5)  # amax^1.5·β = 0.9: nothing shrunk
    shrinking = np.float32(1.1 / amax**1.5)
    assert search_kernels._repeats(amax, kept) and not search_kernels._repeats(amax, shrinking)
    targets = search_kernels._hqq_targets
    assert targets(wf, True, 128, kept, qb, rb) == (0.0, 0.0)
    assert targets(wf, False, 128, kept, qb, rb) == (0.0, 0.0)

    r, q, w = rb.astype(np.float64), qb.astype(np.float64), wf.astype(np.float64)
    a = np.abs(r)
    with np.errstate(divide="ignore"):  # |r| = 0 gives 0 − ∞, so e = 0, as in the kernel
        e = np.sign(r) * np.maximum(a - 1.0 / (float(shrinking) * np.sqrt(a)), 0.0)
    assert np.count_nonzero(e) > 0
    sqe, se = targets(wf, False, 128, shrinking, qb, rb)
    np.testing.assert_allclose([sqe, se], [np.sum(w * q * e), np.sum(w * e)], rtol=1e-5, atol=1e-7)
    assert targets(wf, True, 128, shrinking, qb, rb) == (sqe, 0.0)  # Σ w·e: asymmetric
    # the fit's sums from them equal those of the targets themselves
    y = xf.astype(np.float64) - e * float(s)
    sqx, swx = np.sum(w * q * xf), np.sum(w * xf)
    np.testing.assert_allclose(sqx - float(s) * sqe, np.sum(w * q * y), rtol=1e-5)
    np.testing.assert_allclose(swx - float(s) * se, np.sum(w * y), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", [kernels.BF16, kernels.F16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_codes_pass_sums_and_residual_bound(kind, symmetric, weighted):
    """Each variant of the codes loop (16-bit kind and symmetry made constants), weighted or not
    (all ones), gives the format's codes, residuals and sums as float64 math on the same codes
    does, and `_largest_residual`, from the group's extremes alone, bounds every |residual|
    (equal to the largest where a weight is clipped, ½ where none is): scales from RTN's
    (nothing clipped) to a third of it (many clipped), zero points across the code range."""
    dtype = torch.bfloat16 if kind == kernels.BF16 else torch.float16
    x = _weights(dtype, rows=12, cols=128).float().numpy()
    rng = np.random.default_rng(4)
    qmin, qmax = (-8, 7) if symmetric else (0, 15)
    glo, ghi = np.float32(qmin), np.float32(qmax)
    qb, rb = np.empty(128, np.float32), np.empty(128, np.float32)
    for xf in x:
        wf = (rng.random(128) ** 4).astype(np.float32) if weighted else np.ones(128, np.float32)
        lo, hi = np.float32(xf.min()), np.float32(xf.max())
        s0, z0 = kernels._rtn_params(float(lo), float(hi), kind, symmetric, qmin, qmax)
        for f in (1.0, 0.9, 0.6, 0.33):
            s = np.float32(kernels._round_to(float(s0) * f, kind))
            for z in [z0] if symmetric else [z0, qmin + 3, qmax - 2]:
                zf = np.float32(z)
                err, sqq, sq, sqx = search_kernels._hqq_codes(
                    xf, wf, symmetric, 128, s, zf, glo, ghi, kind, qb, rb
                )
                t = xf / s  # float32, as the format's codes
                q = np.clip(np.rint(t), qmin - z, qmax - z) + z
                np.testing.assert_array_equal(qb, q)
                xhat = torch.from_numpy((q - z) * s).to(dtype).double().numpy()
                w, q64 = wf.astype(np.float64), q.astype(np.float64)
                want = [
                    np.sum(w * (xhat - xf) ** 2),
                    np.sum(w * q64 * q64),
                    0.0 if symmetric else np.sum(w * q64),
                    np.sum(w * q64 * xf),
                ]
                np.testing.assert_allclose([err, sqq, sq, sqx], want, rtol=2e-5, atol=1e-12)
                largest = float(np.abs(rb).max())
                bound = search_kernels._largest_residual(lo, hi, s, zf, glo, ghi)
                clipped = bool(((t + z > qmax + 0.5) | (t + z < qmin - 0.5)).any())
                if clipped:  # the largest, with a slack of 2^-20·(|t| + |z| + 1) at most
                    slack = 2.0**-19 * (float(np.abs(t).max()) + abs(z) + 1)
                    assert largest < bound <= largest + slack
                else:
                    assert bound == 0.5 >= largest


def test_hqq_pairs_of_groups_search_each_as_alone():
    """hqq runs a block's groups two at a time (`_hqq_pair`): every group gets the parameters it
    gets searched alone, whatever its partner (the next group in row-major order, across rows,
    a non-finite one, or none after an odd count's last)."""
    args = QuantArgs(bits=4, symmetric=False, strategy="group", group_size=64)
    qrange = quantized_range(args)
    x = _weights(torch.bfloat16, rows=5, cols=192)  # 15 groups: pairs cross rows, one alone
    x[1, 70] = float("nan")  # group 4, the first of a pair
    x[3, 0] = float("inf")  # group 9, the second of one
    raw = x.contiguous().view(torch.int16).numpy().view(np.uint16)
    imp = (np.random.default_rng(6).random(192) ** 4).astype(np.float64)
    for w in (None, imp):
        scale, zero, bad = search_kernels.search_hqq_16(
            raw, kernels.BF16, 64, False, qrange, HQQ_ITERATIONS, _HQQ_BETA, _HQQ_KAPPA, w
        )
        assert bad == 2 and zero is not None
        for r in range(5):
            for gi in range(3):
                one = np.ascontiguousarray(raw[r : r + 1, 64 * gi : 64 * (gi + 1)])
                part = None if w is None else w[64 * gi : 64 * (gi + 1)]
                s1, z1, _ = search_kernels.search_hqq_16(
                    one, kernels.BF16, 64, False, qrange, HQQ_ITERATIONS, _HQQ_BETA, _HQQ_KAPPA,
                    part,
                )  # fmt: skip
                assert z1 is not None
                assert (scale[r, gi], zero[r, gi]) == (s1[0, 0], z1[0, 0]), (r, gi)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_candidates_made_at_once_equal_those_made_one_by_one(dtype, symmetric):
    """`_candidates_at_once` (one vectorised loop) gives each coarse candidate the scale, zero
    point and clipping bound that `_mse_candidate`, `_finite_codes` and `_clip_bound` give it one
    at a time, and every code of each is finite, as `_every_code_finite` promises."""
    kind = KINDS[dtype]
    args = QuantArgs(bits=4, symmetric=symmetric, strategy="group", group_size=64)
    qmin, qmax = quantized_range(args)
    fmin, fmax = np.float32(qmin), np.float32(qmax)
    factors = np.array(_shrink_factors(MSE_GRID))
    coarse, _ = mse_path(MSE_GRID, 1 if symmetric else 3)
    table, cs, cr, cz, cb, *_ = search_kernels._walk_buffers(factors, coarse, (2, 1))
    assert table.shape[1] % 8 == 0 and table.shape[1] >= len(coarse)
    x = _weights(dtype, rows=24, cols=64).float().numpy()
    x[3] = np.abs(x[3])  # a group above 0 and one below: the asymmetric range always holds 0
    x[4] = -np.abs(x[4])
    rng = np.random.default_rng(5)
    for row in x:
        lo, hi = np.float32(row.min()), np.float32(row.max())
        w_lo, w_hi = np.float32(rng.random()), np.float32(rng.random())
        s0, z0 = kernels._rtn_params(float(lo), float(hi), kind, symmetric, qmin, qmax)
        assert search_kernels._every_code_finite(s0, kind, qmin, qmax)
        search_kernels._candidates_at_once(
            lo, hi, w_lo, w_hi, kind, symmetric, qmin, qmax, table, cs, cr, cz, cb
        )
        for k, (i, t) in enumerate(coarse):
            s, z = search_kernels._mse_candidate(
                lo, hi, i, t, factors, s0, z0, kind, symmetric, qmin, qmax
            )
            glo, ghi = kernels._finite_codes(s, np.float32(z), kind, fmin, fmax)
            bound = search_kernels._clip_bound(lo, hi, w_lo, w_hi, s, np.float32(z), glo, ghi, kind)
            assert (cs[k], cz[k], cb[k]) == (s, z, bound) and (glo, ghi) == (fmin, fmax)
            assert cr[k] == np.float32(1.0) / s
        # the steps' table can reach factor index 0 (factor 1, no cut): RTN's own parameters
        # at every shift, as `_mse_candidate` gives them for i = 0
        rtn = np.zeros((3, 8), np.float32)
        rtn[0], rtn[2] = 1.0, np.float32(0.5) * np.arange(8, dtype=np.float32) % 1.5
        search_kernels._candidates_at_once(
            lo, hi, w_lo, w_hi, kind, symmetric, qmin, qmax, rtn, cs, cr, cz, cb
        )
        assert (cs[:8] == s0).all() and (cz[:8] == z0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("args", ARGS[:3], ids=lambda a: a.describe())
@pytest.mark.parametrize("importance", ["none", "u4", "zeros"])
def test_mse_errors_first_choose_as_one_pass_after_another(dtype, args, importance):
    """The search sums a stage's errors before choosing (a pass gated by RTN's error, or by the
    best before a step, so more pass than the walk needs; `_mse_block`); `_mse_one_by_one` is
    the walk one candidate at a time, each gated by the best so far. Both choose the same
    parameters, tie for tie, on every group (ties are common: placements sharing a scale and
    clipping nothing reconstruct alike)."""
    kind = KINDS[dtype]
    qmin, qmax = quantized_range(args)
    sym = args.symmetric
    factors = np.array(_shrink_factors(MSE_GRID))
    coarse, steps = mse_path(MSE_GRID, 1 if sym else 3)
    path_i = np.array([i for i, _ in coarse], np.int64)
    path_t = np.array([t for _, t in coarse], np.int64)
    x = _weights(dtype, rows=48, cols=args.group_size * 2)
    x[3] = x[3].abs()  # groups wholly above or below 0
    x[4] = -x[4].abs()
    rng = np.random.default_rng(11)
    if importance == "none":
        w = np.ones(x.shape[1])
    elif importance == "u4":
        w = rng.random(x.shape[1]) ** 4
    else:  # every 5th column weighs nothing
        w = np.where(np.arange(x.shape[1]) % 5 == 0, 0.0, 1.0)
    raw = x.contiguous().view(torch.int16).numpy().view(np.uint16)
    scale, zero, _ = search_kernels.search_mse_16(
        raw, kind, args.group_size, sym, (qmin, qmax), factors, (coarse, steps), w
    )
    fmin, fmax = np.float32(qmin), np.float32(qmax)
    one_s, one_z = np.empty((1, 1), np.uint16), np.zeros((1, 1), np.int8)
    differ = 0
    for r, row in enumerate(x.float().numpy()):
        for gi, c0 in enumerate(range(0, x.shape[1], args.group_size)):
            xf = np.ascontiguousarray(row[c0 : c0 + args.group_size], np.float32)
            wd = np.ascontiguousarray(w[c0 : c0 + args.group_size])
            wf = wd.astype(np.float32)
            n = xf.shape[0]
            lo, hi = np.float32(xf.min()), np.float32(xf.max())
            s0, z0 = kernels._rtn_params(float(lo), float(hi), kind, sym, qmin, qmax)
            glo, ghi = kernels._finite_codes(s0, np.float32(z0), kind, fmin, fmax)
            r0 = np.float32(1.0) / s0
            e0 = search_kernels._error32(xf, wf, True, n, s0, r0, np.float32(z0), glo, ghi, kind)
            w_hi, w_lo = search_kernels._extremes(xf, wf, True, n, lo, hi)
            args_ = (xf, wf, True, n, lo, hi, s0, z0, e0, kind, sym, qmin, qmax, factors)
            e1, bs, bz = search_kernels._mse_one_by_one(*args_, path_i, path_t, np.array(steps, np.int64), w_lo, w_hi)  # fmt: skip
            search_kernels._finish(xf, wd, True, n, kind, s0, z0, e0, bs, bz, e1, fmin, fmax, one_s, one_z, 0, 0)  # fmt: skip
            got = (scale[r, gi], 0 if zero is None else zero[r, gi])
            differ += got != (one_s[0, 0], 0 if sym else one_z[0, 0])
    assert differ == 0


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_mse_prepares_the_next_group_and_searches_each_as_alone(symmetric, weighted):
    """mse prepares the next group (row-major, across rows) while it walks one, in the other
    half of its buffers (`_mse_block`): every group gets the parameters it gets searched
    alone, whichever way its neighbours are walked (batched, one by one near the 16-bit limit,
    or not at all: non-finite)."""
    args = QuantArgs(bits=4, symmetric=symmetric, strategy="group", group_size=64)
    qrange = quantized_range(args)
    g = _weights(torch.float32, rows=5, cols=192).view(15, 64)
    g = g / g.abs().amax(dim=1, keepdim=True)
    g[[2, 3, 7, 12]] *= 65504  # walked one by one (`_every_code_finite` false)
    g[[0, 1, 4, 5, 6, 8, 9, 10, 11, 13, 14]] *= 64
    x = g.view(5, 192).to(torch.float16)
    x[1, 70] = float("nan")  # group 4, after a group walked one by one
    x[3, 0] = float("inf")  # group 9, the first of a row
    raw = x.contiguous().view(torch.int16).numpy().view(np.uint16)
    imp = np.random.default_rng(6).random(192) ** 4 if weighted else None
    factors = np.array(_shrink_factors(MSE_GRID))
    path = mse_path(MSE_GRID, 1 if symmetric else 3)
    scale, zero, bad = search_kernels.search_mse_16(
        raw, kernels.F16, 64, symmetric, qrange, factors, path, imp
    )
    assert bad == 2
    for r in range(5):
        for gi in range(3):
            one = np.ascontiguousarray(raw[r : r + 1, 64 * gi : 64 * (gi + 1)])
            part = None if imp is None else imp[64 * gi : 64 * (gi + 1)]
            s1, z1, _ = search_kernels.search_mse_16(
                one, kernels.F16, 64, symmetric, qrange, factors, path, part
            )
            assert scale[r, gi] == s1[0, 0], (r, gi)
            if not symmetric:
                assert zero is not None and z1 is not None
                assert zero[r, gi] == z1[0, 0], (r, gi)


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_near_the_16_bit_limit_makes_its_candidates_one_by_one(symmetric):
    """float16 groups reaching 65504 (the largest float16): RTN's scale is too large for
    `_every_code_finite` to promise finite codes for every candidate, so those groups make them
    one by one with their code range (`_finite_codes`); the fused search still finds what the
    torch search finds, and stays within RTN's error. Groups just under the promise's bound
    (~1/4 of the limit) are batched: there every candidate, at every factor and shift, keeps
    the whole code range, which is what the batch assumes."""
    args = QuantArgs(bits=4, symmetric=symmetric, strategy="group", group_size=64)
    qmin, qmax = quantized_range(args)
    g = _weights(torch.float32, rows=16, cols=128).view(32, 64)  # its groups, each |x| ≤ 1
    g = g / g.abs().amax(dim=1, keepdim=True)
    g[:16] *= 65504  # at the limit
    g[16:24] *= 15300  # just under `_every_code_finite`'s bound
    g[24:] *= 64  # ordinary groups beside them
    x = g.view(16, 128).to(torch.float16)
    factors = np.array(_shrink_factors(MSE_GRID))
    every = [(i, t) for i in range(1, MSE_GRID) for t in range(1 if symmetric else 3)]
    table, cs, cr, cz, cb, *_ = search_kernels._walk_buffers(factors, every, ())
    fmin, fmax = np.float32(qmin), np.float32(qmax)
    near = batched_near = 0
    for r, row in enumerate(x.float().view(32, 64)):
        lo, hi = np.float32(row.min()), np.float32(row.max())
        s0, _ = kernels._rtn_params(float(lo), float(hi), kernels.F16, symmetric, qmin, qmax)
        if not search_kernels._every_code_finite(s0, kernels.F16, qmin, qmax):
            near += 1
            continue
        batched_near += 16 <= r < 24
        search_kernels._candidates_at_once(
            lo, hi, np.float32(1), np.float32(1), kernels.F16, symmetric, qmin, qmax, table, cs,
            cr, cz, cb,
        )  # fmt: skip
        for k in range(len(every)):
            codes = kernels._finite_codes(cs[k], np.float32(cz[k]), kernels.F16, fmin, fmax)
            assert codes == (fmin, fmax)
    assert near == 16 and batched_near == 8
    scale, zero = _fused(x, args, "mse", None)
    ts, tz = search_qparams(x, args, torch.float16, "mse")
    rs, rz = search_qparams(x, args, torch.float16, "rtn")
    fused_e = reconstruction_error(x, scale, zero, args, None)
    assert bool((fused_e <= reconstruction_error(x, rs, rz, args, None)).all())
    torch_e = reconstruction_error(x, ts, tz, args, None)
    assert float(fused_e.sum()) == pytest.approx(float(torch_e.sum()), rel=1e-5)


def test_degenerate_groups():
    """Groups of zeros keep RTN's scale 1; groups of one or two values are searched like any
    other, and the torch search finds the same parameters."""
    x = torch.zeros(4, 128, dtype=torch.bfloat16)
    x[1] = 0.5
    x[2, :64] = -1.25
    for args in ARGS[:2]:
        for mode in ("mse", "hqq"):
            scale, zero = _fused(x, args, mode, None)
            rs, rz = search_qparams(x, args, torch.bfloat16, "rtn")
            ts, tz = search_qparams(x, args, torch.bfloat16, mode)  # type: ignore[arg-type]
            assert torch.equal(scale[[0, 3]], rs[[0, 3]]) and bool((rs[[0, 3]] == 1).all())
            assert torch.equal(scale, ts)
            assert zero is None if rz is None else torch.equal(zero, tz)


@pytest.mark.parametrize("shape", [(0, 64), (3, 0)])
def test_an_empty_block_has_no_groups(shape):
    """No group to search (mse prepares its first group before its loop: not here)."""
    raw = np.zeros(shape, np.uint16)
    factors = np.array(_shrink_factors(MSE_GRID))
    scale, zero, bad = search_kernels.search_mse_16(
        raw, kernels.BF16, 32, False, (0, 15), factors, mse_path(MSE_GRID, 3)
    )
    assert zero is not None and scale.shape == zero.shape == (shape[0], 2 if shape[1] else 0)
    assert bad == 0
    scale, _, bad = search_kernels.search_hqq_16(
        raw, kernels.BF16, 32, True, (-8, 7), HQQ_ITERATIONS, _HQQ_BETA, _HQQ_KAPPA
    )
    assert scale.shape == (shape[0], 2 if shape[1] else 0) and bad == 0


def test_a_non_finite_group_is_counted_and_the_others_are_searched():
    x = _weights(torch.bfloat16, rows=2, cols=256)
    x[0, 5] = float("nan")
    args = QuantArgs(bits=4, symmetric=True, strategy="group", group_size=128)
    rs, _ = search_qparams(x, args, torch.bfloat16, "rtn")
    for mode in ("mse", "hqq"):
        scale, _ = _fused(x, args, mode, None)  # asserts the count
        assert not torch.equal(scale[1:], rs[1:])


def test_bad_arguments_are_refused():
    PATH = ([(1, 0)], (1,))
    raw = np.zeros((2, 64), np.uint16)
    with pytest.raises(ValueError, match="64 finite non-negative"):
        search_kernels.search_mse_16(
            raw, kernels.BF16, 32, True, (-8, 7), np.ones(2), PATH, -np.ones(64)
        )
    with pytest.raises(ValueError, match="uint16"):
        search_kernels.search_hqq_16(raw.astype(np.int32), kernels.BF16, 32, True, (-8, 7), 2, 0.3, 1.3)  # fmt: skip
    with pytest.raises(ValueError, match="group"):
        search_kernels.search_mse_16(raw, kernels.BF16, 0, True, (-8, 7), np.ones(2), PATH)
