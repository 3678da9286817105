"""`compressor.math.codebook`: NF4 against exact references, and distributed k-means that equals
single-process k-means bit for bit under any split and merge order.

References here use `fractions.Fraction` (exact rational arithmetic), so "nearest" and "sum" mean
the mathematical ones; every float input is a dyadic rational and converts to a Fraction exactly.
"""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressor.math import codebook
from compressor.math.codebook import (
    NF4_CODE,
    KMeansPartial,
    combine_histograms,
    combine_kmeans,
    histogram_counts,
    init_centroids,
    kmeans_assign,
    kmeans_partial,
    kmeans_reference,
    nf4_dequantize,
    nf4_quantize,
    update_centroids,
)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same examples every run: CI never meets a new one by chance
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# bitsandbytes' decision tree thresholds (csrc `dQuantizeNF4`), float32 literals in the source.
BNB_THRESHOLDS = np.array(
    [
        -0.8480964004993439,
        -0.6106329262256622,
        -0.4599952697753906,
        -0.33967943489551544,
        -0.23460740596055984,
        -0.13791173323988914,
        -0.045525018125772476,
        0.03979014977812767,
        0.1202552504837513,
        0.2035212516784668,
        0.2920137718319893,
        0.3893125355243683,
        0.5016634166240692,
        0.6427869200706482,
        0.8614784181118011,
    ],
    dtype=np.float32,
)


@st.composite
def weights(draw, max_n: int = 400) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, max_n))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["t", "normal", "grid", "wide", "zeros"]))
    if kind == "t":
        a = rng.standard_t(draw(st.sampled_from([1.0, 3.0, 4.0])), n) * 0.02
    elif kind == "normal":
        a = rng.standard_normal(n) * 2.0 ** draw(st.integers(-20, 5))
    elif kind == "grid":  # few distinct values: exact ties between centroids and data
        a = rng.integers(-6, 7, n) * 0.25
    elif kind == "wide":  # magnitudes across the dtype's range: many exact-sum limbs
        lo, hi = (-14, 14) if dtype == torch.float16 else (-100, 100)
        a = rng.choice([-1.0, 1.0], n) * np.exp2(rng.uniform(lo, hi, n))
    else:
        a = np.zeros(n)
        a[: n // 3] = rng.standard_normal(n // 3)
    return torch.from_numpy(a).to(dtype)


# --------------------------------------------------------------------------------------------
# NF4
# --------------------------------------------------------------------------------------------


def nf4_reference(x: torch.Tensor, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest code of x/absmax (Fractions), ties to the lower index; float64 absmax."""
    flat = x.reshape(-1).to(torch.float64).numpy()
    codes = np.empty(flat.size, dtype=np.int64)
    absmax = []
    table = [Fraction(c) for c in NF4_CODE]
    for start in range(0, flat.size, block):
        blk = flat[start : start + block]
        a = float(np.abs(blk).max())
        absmax.append(a)
        for i, v in enumerate(blk):
            r = Fraction(v) / Fraction(a) if a else Fraction(0)
            dist = [abs(r - c) for c in table]
            codes[start + i] = dist.index(min(dist))  # first minimum: the lower index
    return codes.reshape(x.shape), np.array(absmax)


def test_nf4_code_values_are_bitsandbytes():
    assert len(NF4_CODE) == 16
    assert NF4_CODE[0] == -1.0 and NF4_CODE[7] == 0.0 and NF4_CODE[15] == 1.0
    assert NF4_CODE[1] == -0.6961928009986877 and NF4_CODE[14] == 0.7229568362236023
    assert list(NF4_CODE) == sorted(NF4_CODE)
    assert all(float(np.float32(c)) == c for c in NF4_CODE)  # float32 values, as bnb stores them
    mid = (np.array(NF4_CODE[:-1]) + np.array(NF4_CODE[1:])) / 2
    np.testing.assert_array_equal(mid.astype(np.float32), BNB_THRESHOLDS)


@SETTINGS
@given(weights(), st.sampled_from([(None,), (2,), (3, None)]))
def test_nf4_quantize_matches_exact_reference(x, shape_kind):
    if len(shape_kind) == 2 and x.numel() % 3 == 0:
        x = x.reshape(3, -1)
    elif shape_kind == (2,) and x.numel() % 2 == 0:
        x = x.reshape(-1, 2)
    codes, absmax = nf4_quantize(x)
    ref_codes, ref_absmax = nf4_reference(x)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.dtype == torch.float32 and absmax.shape == (math.ceil(x.numel() / 64),)
    np.testing.assert_array_equal(absmax.to(torch.float64).numpy(), ref_absmax)
    np.testing.assert_array_equal(codes.to(torch.int64).numpy(), ref_codes)


def test_nf4_exact_midpoints_go_to_the_lower_code():
    mid = [(a + b) / 2 for a, b in itertools.pairwise(NF4_CODE)]
    exact = [(i, m) for i, m in enumerate(mid) if float(np.float32(m)) == m]
    assert len(exact) >= 5
    x = torch.tensor([1.0] + [m for _, m in exact], dtype=torch.float32)
    codes, _ = nf4_quantize(x)
    assert codes[1:].tolist() == [i for i, _ in exact]
    # one float32 step above the midpoint goes up
    above = torch.tensor(
        [1.0] + [float(np.nextafter(np.float32(m), np.float32(2))) for _, m in exact]
    )
    assert nf4_quantize(above)[0][1:].tolist() == [i + 1 for i, _ in exact]


def bnb_codes(x: torch.Tensor, block: int = 64) -> np.ndarray:
    """bitsandbytes' arithmetic: float32 x·(1/absmax), compared with float32 thresholds."""
    flat = x.reshape(-1).to(torch.float32).numpy()
    out = np.empty(flat.size, dtype=np.int64)
    for start in range(0, flat.size, block):
        blk = flat[start : start + block]
        inv = np.float32(1.0) / np.abs(blk).max()
        r = blk * inv
        out[start : start + block] = (r[:, None] > BNB_THRESHOLDS[None, :]).sum(axis=1)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_nf4_agrees_with_bitsandbytes_except_within_float32_ulps_of_a_midpoint(dtype):
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal(200_000) * 0.02).to(dtype)
    codes, absmax = nf4_quantize(x)
    ours = codes.to(torch.int64).numpy()
    theirs = bnb_codes(x)
    flat = x.to(torch.float64).numpy()
    ratio = flat / np.repeat(absmax.to(torch.float64).numpy(), 64)[: flat.size]
    mid = (np.array(NF4_CODE[:-1]) + np.array(NF4_CODE[1:])) / 2
    near = np.min(np.abs(ratio[:, None] - mid[None, :]), axis=1) <= 4 * 2.0**-24
    assert np.array_equal(ours[~near], theirs[~near])
    assert np.all(np.abs(ours - theirs) <= 1)


@SETTINGS
@given(weights(max_n=300))
def test_nf4_dequantize_is_float32_code_times_absmax(x):
    codes, absmax = nf4_quantize(x)
    xhat = nf4_dequantize(codes, absmax, x.shape, x.dtype)
    assert xhat.dtype == x.dtype and xhat.shape == x.shape
    table = np.array(NF4_CODE, dtype=np.float32)
    a = np.repeat(absmax.numpy(), 64)[: x.numel()]
    expected = (table[codes.reshape(-1).long().numpy()] * a).astype(np.float32)
    np.testing.assert_array_equal(
        xhat.reshape(-1).to(torch.float32).numpy(),
        torch.from_numpy(expected).to(x.dtype).float().numpy(),
    )
    # nearest code: error at most half the widest gap (0.1519…) times absmax, plus output
    # rounding: relative in the normal range, one subnormal step below it (float16 blocks of
    # absmax ~1e-5 decode to subnormals, whose spacing 2^-24 is not relative)
    err = (xhat.to(torch.float64) - x.to(torch.float64)).abs().reshape(-1).numpy()
    gap = max(b - a_ for a_, b in itertools.pairwise(NF4_CODE)) / 2
    info = torch.finfo(x.dtype)
    subnormal_step = info.smallest_normal * info.eps
    assert np.all(err <= gap * a * (1 + 2.0**-7) + subnormal_step + 1e-30)


def test_nf4_blocks_run_over_the_flattened_tensor_and_zero_blocks():
    x = torch.zeros(3, 50)
    x[2, 10:] = torch.linspace(-2, 3, 40)  # flat elements 110..149: blocks 1 and 2
    codes, absmax = nf4_quantize(x)
    assert absmax.tolist()[0] == 0.0 and absmax.shape == (3,)
    assert torch.all(codes.reshape(-1)[:64] == 7)
    assert torch.equal(nf4_dequantize(codes, absmax, (3, 50), torch.float32)[:1], x[:1])


def test_nf4_rejects_non_finite_and_mismatched_shapes():
    with pytest.raises(ValueError, match="finite"):
        nf4_quantize(torch.tensor([1.0, float("nan")]))
    codes, absmax = nf4_quantize(torch.randn(100))
    with pytest.raises(ValueError, match="codes"):
        nf4_dequantize(codes, absmax, (10, 11), torch.float32)
    with pytest.raises(ValueError, match="absmax"):
        nf4_dequantize(codes, absmax[:1], (100,), torch.float32)


# --------------------------------------------------------------------------------------------
# k-means: the chunk step against exact references
# --------------------------------------------------------------------------------------------


def assign_reference(values: np.ndarray, centroids: list[float]) -> list[int]:
    cs = [Fraction(c) for c in centroids]
    out = []
    for v in values.tolist():
        d = [abs(Fraction(v) - c) for c in cs]
        out.append(d.index(min(d)))
    return out


@st.composite
def centroid_sets(draw, x: torch.Tensor) -> list[float]:
    k = 2 ** draw(st.integers(2, 8))
    vals = x.to(torch.float64).numpy()
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["from_data", "uniform", "midpoints"]))
    if kind == "from_data":  # duplicates and centroids exactly on data values
        c = rng.choice(vals, k)
    elif kind == "uniform":
        lo, hi = float(vals.min()), float(vals.max())
        c = rng.uniform(lo, hi if hi > lo else lo + 1, k)
    else:  # data exactly halfway between two centroids: ties
        c = np.concatenate([vals[:1] - 0.5, vals[:1] + 0.5, rng.standard_normal(k - 2)])
    return [float(v) for v in rng.permutation(c)]  # unsorted


@SETTINGS
@given(st.data())
def test_assign_is_the_exact_nearest_centroid_with_ties_to_the_lower_index(data):
    x = data.draw(weights(max_n=200))
    c = data.draw(centroid_sets(x))
    got = kmeans_assign(x, c)
    assert got.dtype == torch.int64 and got.shape == x.shape
    assert got.tolist() == assign_reference(x.to(torch.float64).numpy(), c)


def test_assign_ties_and_duplicates():
    c = [1.0, 0.0, 1.0, -1.0, 0.0]
    x = torch.tensor([0.5, -0.5, 1.0, 0.0, 7.0, -7.0, 0.25])
    # 0.5 ties 1.0 (index 0) and 0.0 (index 1) → 0; −0.5 ties 0.0 (1) and −1.0 (3) → 1
    assert kmeans_assign(x, c).tolist() == [0, 1, 0, 1, 0, 3, 1]


def frac_sums(x: torch.Tensor, idx: list[int], k: int, w: torch.Tensor | None):
    s = [Fraction(0)] * k
    ws = [Fraction(0)] * k
    wv = [1.0] * x.numel() if w is None else w.reshape(-1).to(torch.float64).tolist()
    for v, j, wi in zip(x.reshape(-1).to(torch.float64).tolist(), idx, wv, strict=True):
        s[j] += Fraction(v) * Fraction(wi)
        ws[j] += Fraction(wi)
    return s, ws


@SETTINGS
@given(st.data(), st.booleans())
def test_partial_sums_are_exact(data, weighted):
    x = data.draw(weights(max_n=300))
    c = data.draw(centroid_sets(x))
    w = None
    if weighted:
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
        w = torch.from_numpy(rng.exponential(1.0, x.shape) * (rng.random(x.shape) < 0.9)).float()
    p = kmeans_partial(x, c, w)
    idx = kmeans_assign(x, c).reshape(-1).tolist()
    s, ws = frac_sums(x, idx, len(c), w)
    assert [Fraction(v) * Fraction(2) ** p.sum_exp for v in p.sums] == s
    assert [Fraction(v) * Fraction(2) ** p.weight_exp for v in p.weights] == ws
    assert p.count == x.numel()
    # the update is the correctly rounded quotient
    new = update_centroids(p, c).tolist()
    for j in range(len(c)):
        assert new[j] == (float(s[j] / ws[j]) if ws[j] else c[j])


def test_exact_sums_over_the_whole_float32_range_and_in_slices(monkeypatch):
    x = torch.tensor(
        [2.0**-149, 3.0e38, -3.0e38, 1.0, 2.0**-126, -(2.0**-149), 1.5e-30], dtype=torch.float32
    )
    c = [0.0]
    whole = kmeans_partial(x, c)
    exact = sum(Fraction(v) for v in x.double().tolist())  # 1 + 2^-126 + 1.5e-30: ±3e38 cancel
    assert Fraction(whole.sums[0]) * Fraction(2) ** whole.sum_exp == exact
    assert whole.sums[0] % 2 == 1  # normalised
    monkeypatch.setattr(codebook, "_SLICE", 2)  # force several int64 limb passes
    assert kmeans_partial(x, c) == whole


# --------------------------------------------------------------------------------------------
# k-means: distributed equals single process
# --------------------------------------------------------------------------------------------


def random_tree_reduce(parts: list[KMeansPartial], rng: random.Random) -> KMeansPartial:
    """Combine in a random order and a random tree shape (arity 1 to 4)."""
    parts = parts[:]
    while len(parts) > 1:
        rng.shuffle(parts)
        n = rng.randint(1, min(4, len(parts)))
        merged = combine_kmeans(*parts[:n])
        parts = [*parts[n:], merged]
    return combine_kmeans(parts[0])


def split(n: int, rng: random.Random) -> list[tuple[int, int]]:
    cuts = sorted(rng.randint(0, n) for _ in range(rng.randint(0, 8)))  # empty chunks allowed
    bounds = [0, *cuts, n]
    return list(itertools.pairwise(bounds))


@settings(SETTINGS, max_examples=25)
@given(weights(max_n=1500), st.integers(2, 8), st.booleans(), st.integers(0, 2**32 - 1))
def test_distributed_kmeans_equals_single_process_bit_for_bit(x, b, weighted, seed):
    rng = random.Random(seed)
    k = 2**b
    w = None
    if weighted:
        nrng = np.random.default_rng(seed)
        w = torch.from_numpy(nrng.exponential(1.0, x.shape)).to(torch.float32)
    lo, hi = float(x.min()), float(x.max())
    c0 = init_centroids(lo, hi, k)
    iterations = 4
    reference = kmeans_reference(x, c0, iterations, w)

    c = c0
    for _ in range(iterations):
        parts = [
            kmeans_partial(x[a:z], c, None if w is None else w[a:z])
            for a, z in split(x.numel(), rng)
        ]
        total = random_tree_reduce(parts, rng)
        assert total == kmeans_partial(x, c, w)  # the record itself is split-invariant
        c = update_centroids(total, c)
    assert torch.equal(c, reference)


def test_distributed_row_blocks_of_a_matrix():
    """The planner's chunks are row blocks of 2-D tensors: same result as the flat reference."""
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.standard_t(4, (96, 130)) * 0.02).to(torch.bfloat16)
    hist = combine_histograms(
        *(
            histogram_counts(x[r : r + 17], float(x.min()), float(x.max()), 512)
            for r in range(0, 96, 17)
        )
    )
    assert hist == histogram_counts(x, float(x.min()), float(x.max()), 512)
    c = init_centroids(float(x.min()), float(x.max()), 16, hist)
    reference = kmeans_reference(x, c, 6)
    for _ in range(6):
        total = combine_kmeans(*(kmeans_partial(x[r : r + 17], c) for r in range(0, 96, 17)))
        c = update_centroids(total, c)
    assert torch.equal(c, reference)


def test_lloyd_steps_do_not_increase_the_error():
    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.standard_t(4, 20_000) * 0.02).to(torch.bfloat16)
    c = init_centroids(float(x.min()), float(x.max()), 16)
    sse = []
    for _ in range(8):
        p = kmeans_partial(x, c)
        sse.append(p.sse)
        c = update_centroids(p, c)
    assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(sse))
    assert sse[-1] < 0.8 * sse[0]


def test_empty_clusters_keep_their_centroid():
    x = torch.tensor([0.0, 0.25, 0.5, 10.0])
    c = torch.tensor([0.0, 5.0, 100.0, 10.0], dtype=torch.float64)
    new = update_centroids(kmeans_partial(x, c), c)
    assert new.tolist() == [0.25, 5.0, 100.0, 10.0]


def test_combine_rejects_nothing_and_mismatched_k():
    with pytest.raises(ValueError, match="at least one"):
        combine_kmeans()
    with pytest.raises(ValueError, match="different"):
        combine_kmeans(
            kmeans_partial(torch.ones(3), [0.0, 1.0]), kmeans_partial(torch.ones(3), [0.0])
        )


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------


def test_init_centroids_uniform_and_quantile():
    assert init_centroids(-1.0, 1.0, 4).tolist() == [-0.75, -0.25, 0.25, 0.75]
    # all mass in bin 1 of 4 over [0, 4]: quantiles spread linearly inside that bin
    assert init_centroids(0.0, 4.0, 2, histogram=[0, 10, 0, 0]).tolist() == [1.25, 1.75]
    c = init_centroids(0.0, 0.0, 8)  # a constant tensor: still strictly increasing
    assert bool((c[1:] > c[:-1]).all())
    for b in range(2, 9):
        c = init_centroids(-0.1, 0.3, 2**b, histogram=[5, 0, 0, 100, 3])
        assert c.shape == (2**b,) and bool((c[1:] > c[:-1]).all())
        assert torch.equal(c, init_centroids(-0.1, 0.3, 2**b, histogram=[5, 0, 0, 100, 3]))
