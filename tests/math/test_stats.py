"""`compressor.math.stats`: chunk → combine in any tree and order equals the whole array's
statistic (exactly for counts and extrema, to 1e-12 for float64 sums); finalize formulas
against numpy."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from compressor.math.stats import (
    EMPTY_RANGE,
    ErrorStats,
    RangeStats,
    combine_errors,
    combine_ranges,
    error_stats,
    range_stats,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

SPECIAL = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, -1e-45, 5e-324, 3e38, -3e38, 65504.0]


@st.composite
def arrays(draw, *, nonfinite: bool = True, max_n: int = 400) -> torch.Tensor:
    """1-D tensors mixing Gaussian data, specials and (optionally) NaN / ±inf."""
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(0, max_n))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = rng.standard_normal(n) * 2.0 ** draw(st.integers(-20, 20))
    specials = SPECIAL if nonfinite else [v for v in SPECIAL if math.isfinite(v)]
    if n:
        for _ in range(draw(st.integers(0, 8))):
            a[draw(st.integers(0, n - 1))] = draw(st.sampled_from(specials))
        if draw(st.booleans()):  # some all-special or constant stretches
            lo = draw(st.integers(0, n - 1))
            a[lo : lo + draw(st.integers(1, 50))] = draw(st.sampled_from(specials))
    t = torch.from_numpy(a).to(dtype)
    if not nonfinite:  # 3e38 etc. overflow float16 / bfloat16 to inf: keep the data finite
        t = torch.where(torch.isfinite(t), t, torch.zeros((), dtype=dtype))
    return t


def split_points(draw, n: int) -> list[int]:
    """Cut positions for a split into chunks; empty chunks allowed."""
    cuts = draw(st.lists(st.integers(0, n), max_size=12))
    return sorted(cuts)


def chunks_of(t: torch.Tensor, cuts: list[int]) -> list[torch.Tensor]:
    bounds = [0, *cuts, t.numel()]
    return [t[a:b] for a, b in itertools.pairwise(bounds)]


def merge_tree(parts: list, combine, rnd: random.Random):
    """Combine `parts` by a random binary tree over a random permutation (n-ary at times)."""
    items = list(parts)
    rnd.shuffle(items)

    def build(xs):
        if len(xs) == 1:
            return xs[0]
        if len(xs) >= 3 and rnd.random() < 0.2:  # an n-ary node: combine(a, b, c, …)
            k = rnd.randint(2, len(xs))
            return combine(*xs[:k], build(xs[k:])) if k < len(xs) else combine(*xs)
        cut = rnd.randint(1, len(xs) - 1)
        return combine(build(xs[:cut]), build(xs[cut:]))

    return build(items) if items else combine()


def np_range(t: torch.Tensor) -> tuple[int, int, float, float]:
    a = t.to(torch.float64).numpy()
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return 0, int(a.size), math.inf, -math.inf
    return int(finite.size), int(a.size - finite.size), float(finite.min()), float(finite.max())


def as_tuple(r: RangeStats) -> tuple[int, int, float, float]:
    return r.count, r.nonfinite, r.min, r.max


@SETTINGS
@given(arrays(), st.data(), st.integers(0, 2**32 - 1))
def test_range_stats_merge_in_any_tree_equals_whole(t, data, seed):
    parts = [range_stats(c) for c in chunks_of(t, split_points(data.draw, t.numel()))]
    merged = merge_tree(parts, combine_ranges, random.Random(seed))
    whole = range_stats(t)
    assert as_tuple(merged) == as_tuple(whole) == np_range(t)
    assert merged.absmax == whole.absmax
    if whole.count:
        assert whole.absmax == max(abs(whole.min), abs(whole.max))
    else:
        assert whole.absmax == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_range_stats_counts_every_kind_of_nonfinite(dtype):
    t = torch.tensor([1.0, math.nan, -2.0, math.inf, -math.inf, 0.5], dtype=dtype)
    assert as_tuple(range_stats(t)) == (3, 3, -2.0, 1.0)
    only_bad = torch.tensor([math.nan, math.inf], dtype=dtype)
    assert as_tuple(range_stats(only_bad)) == (0, 2, math.inf, -math.inf)
    # a 2-D block counts elements, not rows
    assert as_tuple(range_stats(t.reshape(2, 3))) == (3, 3, -2.0, 1.0)


def test_empty_ranges():
    assert range_stats(torch.empty(0)) == EMPTY_RANGE
    assert range_stats(torch.empty((0, 5), dtype=torch.bfloat16)) == EMPTY_RANGE
    assert combine_ranges() == EMPTY_RANGE
    assert combine_ranges(EMPTY_RANGE, EMPTY_RANGE) == EMPTY_RANGE
    r = range_stats(torch.tensor([3.0, -1.0]))
    assert combine_ranges(EMPTY_RANGE, r, EMPTY_RANGE) == r
    assert EMPTY_RANGE.absmax == 0.0 and EMPTY_RANGE.count == 0


@st.composite
def pairs(draw):
    """(x, x̂) of equal shape and dtype, finite; x̂ sometimes exact, sometimes with zeros."""
    x = draw(arrays(nonfinite=False))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    how = draw(st.sampled_from(["noisy", "exact", "zeros", "pruned"]))
    xd = x.to(torch.float64).numpy()
    if how == "noisy":
        xh = xd + rng.standard_normal(xd.shape) * 2.0 ** draw(st.integers(-30, 0)) * np.abs(xd)
    elif how == "exact":
        xh = xd.copy()
    elif how == "zeros":
        xh = np.zeros_like(xd)
    else:
        xh = np.where(rng.random(xd.shape) < 0.5, 0.0, xd)
    xhat = torch.from_numpy(xh).to(x.dtype)
    xhat = torch.where(torch.isfinite(xhat), xhat, x)  # noise may overflow float16
    return x, xhat


def np_errors(x: torch.Tensor, xhat: torch.Tensor) -> tuple[int, float, float, float, int]:
    a = x.to(torch.float64).numpy()
    b = xhat.to(torch.float64).numpy()
    d = b - a
    mx = float(np.abs(d).max()) if d.size else 0.0
    return a.size, float(np.sum(d * d)), float(np.sum(a * a)), mx, int(np.sum(b == 0))


def close(a: float, b: float) -> bool:
    return a == b or math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)


@SETTINGS
@given(pairs(), st.data(), st.integers(0, 2**32 - 1))
def test_error_stats_merge_in_any_tree_equals_whole(pair, data, seed):
    x, xhat = pair
    cuts = split_points(data.draw, x.numel())
    rnd = random.Random(seed)
    pieces = list(zip(chunks_of(x, cuts), chunks_of(xhat, cuts), strict=True))
    pruned = [rnd.randint(0, a.numel()) for a, _ in pieces]  # the caller's count, summed as is
    parts = [error_stats(a, b, k) for (a, b), k in zip(pieces, pruned, strict=True)]
    merged = merge_tree(parts, combine_errors, rnd)
    whole = error_stats(x, xhat, sum(pruned))
    count, sq_error, sq_signal, max_abs, zeros = np_errors(x, xhat)
    for e in (merged, whole):
        assert e.count == count
        assert e.zeros == zeros
        assert e.max_abs_error == max_abs
        assert close(e.sq_error, sq_error)
        assert close(e.sq_signal, sq_signal)
    assert close(merged.relative_error, whole.relative_error)
    assert merged.sqnr_db == whole.sqnr_db or math.isclose(
        merged.sqnr_db, whole.sqnr_db, rel_tol=1e-12, abs_tol=1e-11
    )
    assert merged.pruned == whole.pruned == sum(pruned)
    assert merged.sparsity == whole.sparsity == (sum(pruned) / count if count else 0.0)


@given(
    st.floats(0, 1e300, allow_nan=False) | st.just(0.0),
    st.floats(0, 1e300, allow_nan=False) | st.just(0.0),
)
def test_relative_error_and_sqnr_formulas(sq_error, sq_signal):
    # a ratio that underflows to 0 crashes sqnr_db: see test_sqnr_db_when_the_ratio_underflows
    assume(sq_error == 0 or sq_signal == 0 or sq_signal / sq_error > 0)
    e = ErrorStats(count=1, sq_error=sq_error, sq_signal=sq_signal, max_abs_error=0.0)
    if sq_signal == 0:
        assert e.relative_error == (0.0 if sq_error == 0 else math.inf)
    else:
        with np.errstate(over="ignore", under="ignore"):
            expected = float(np.sqrt(np.float64(sq_error) / np.float64(sq_signal)))
        assert close(e.relative_error, expected)
    if sq_error == 0:
        assert e.sqnr_db == math.inf
    elif sq_signal == 0:
        assert e.sqnr_db == -math.inf
    else:
        with np.errstate(over="ignore", under="ignore", divide="ignore"):
            expected = float(10.0 * np.log10(np.float64(sq_signal) / np.float64(sq_error)))
        assert e.sqnr_db == expected or math.isclose(
            e.sqnr_db, expected, rel_tol=1e-12, abs_tol=1e-12
        )


@pytest.mark.parametrize(
    ("sq_error", "sq_signal"), [(math.inf, 1.0), (2.0, 5e-324), (1e300, 1e-300)]
)
def test_sqnr_db_when_the_ratio_underflows(sq_error, sq_signal):
    e = ErrorStats(count=1, sq_error=sq_error, sq_signal=sq_signal, max_abs_error=0.0)
    with np.errstate(divide="ignore", under="ignore"):
        expected = float(10.0 * np.log10(np.float64(sq_signal) / np.float64(sq_error)))
    assert expected == -math.inf
    assert e.sqnr_db == -math.inf


@settings(max_examples=100, deadline=None)
@given(pairs())
def test_finalized_metrics_against_numpy(pair):
    x, xhat = pair
    e = error_stats(x, xhat)
    a = x.to(torch.float64).numpy()
    b = xhat.to(torch.float64).numpy()
    num = np.linalg.norm(b - a)
    den = np.linalg.norm(a)
    if den == 0:
        assert e.relative_error == (0.0 if num == 0 else math.inf)
    else:
        assert math.isclose(e.relative_error, num / den, rel_tol=1e-12)
    if num == 0:
        assert e.sqnr_db == math.inf
    elif den == 0:
        assert e.sqnr_db == -math.inf
    else:
        expected = 10 * np.log10(np.sum(a * a) / np.sum((b - a) ** 2))
        assert math.isclose(e.sqnr_db, expected, rel_tol=1e-12, abs_tol=1e-10)


def test_known_values():
    x = torch.tensor([3.0, 4.0, 0.0])
    xhat = torch.tensor([3.0, 4.0 + 2**-10, 0.0])
    e = error_stats(x, xhat)
    assert (e.count, e.zeros, e.max_abs_error) == (3, 1, 2**-10)
    assert e.sq_error == 2**-20 and e.sq_signal == 25.0
    assert e.relative_error == 2**-10 / 5
    assert math.isclose(e.sqnr_db, 10 * math.log10(25 * 2**20))
    assert e.pruned == 0 and e.sparsity == 0.0  # zeros in x̂ are not pruning
    pruned = error_stats(x, xhat, pruned=1)
    assert pruned.zeros == 1 and pruned.sparsity == 1 / 3


def test_empty_errors():
    empty = torch.empty((0, 3))
    e = error_stats(empty, empty)
    assert (e.count, e.sq_error, e.sq_signal, e.max_abs_error, e.zeros, e.pruned) == (
        0,
        0.0,
        0.0,
        0.0,
        0,
        0,
    )
    assert e.relative_error == 0.0 and e.sqnr_db == math.inf and e.sparsity == 0.0
    none = combine_errors()
    assert none == e
    some = error_stats(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]))
    assert combine_errors(e, some, e) == some


def test_sqnr_db_of_an_overflowed_reconstruction():
    """An infinite x̂ (the quantizers now keep codes finite, see below; other inputs may not)
    gives an infinite error and -inf dB, not NaN."""
    x = torch.tensor([[-65280.0, 1.0]], dtype=torch.float16)
    e = error_stats(x, torch.tensor([[-math.inf, 1.0]], dtype=torch.float16))
    assert e.sq_error == math.inf and e.sq_signal > 0
    assert e.sqnr_db == -math.inf and e.relative_error == math.inf


def test_int8_reconstruction_of_the_float16_extreme_stays_finite():
    from compressor.math.quant import (
        QuantArgs,
        dequantize,
        group_ranges,
        qparams_from_range,
        quantize,
    )

    args = QuantArgs(8, "int", True, "channel")
    x = torch.tensor([[-65280.0, 1.0]], dtype=torch.float16)
    scale, zero = qparams_from_range(*group_ranges(x, args), args, x.dtype)
    xhat = dequantize(quantize(x, scale, zero, args), scale, zero, args, x.dtype)
    assert torch.isfinite(xhat).all()
    e = error_stats(x, xhat)
    assert math.isfinite(e.sq_error) and math.isfinite(e.sqnr_db)
