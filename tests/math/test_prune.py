"""Pruning math against plain numpy references: exact thresholds under any split, masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compressor.math.prune import (
    combine_histograms,
    high_histogram,
    importance,
    importance_bits,
    low_histogram,
    nm_mask,
    row_mask,
    select,
    threshold_mask,
)


def _threshold_by_histograms(chunks: list[torch.Tensor], k: int) -> tuple[int, list[int]]:
    """The distributed algorithm, run on a list of chunks in order (merge order shuffled)."""
    rng = np.random.default_rng(k)
    highs = [high_histogram(c) for c in chunks]
    order = rng.permutation(len(highs))
    high = combine_histograms(*[highs[i] for i in order])
    b, r_high = select(high, k)
    lows = [low_histogram(c, b) for c in chunks]
    low = combine_histograms(*[lows[i] for i in rng.permutation(len(lows))])
    lo, r = select(low, r_high)
    t_bits = (b << 16) | lo
    quotas, taken = [], 0
    for c in chunks:
        ties = int((importance_bits(c) == t_bits).sum())
        q = min(ties, max(0, r - taken))
        taken += q
        quotas.append(q)
    return t_bits, quotas


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3000),
    sparsity=st.floats(0.0, 0.999),
    splits=st.lists(st.integers(1, 2999), max_size=6),
    ties=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_exact_threshold_under_any_chunking(n, sparsity, splits, ties, seed):
    rng = np.random.default_rng(seed)
    values = np.abs(rng.standard_t(3, size=n)).astype(np.float32)
    if ties:  # many exact ties: a coarse grid
        values = np.round(values * 4) / 4
    k = int(np.floor(sparsity * n))
    cuts = sorted({s for s in splits if s < n})
    chunks = [torch.from_numpy(c) for c in np.split(values, cuts)]
    if k == 0:
        return
    t_bits, quotas = _threshold_by_histograms(chunks, k)
    t = np.array([t_bits], dtype=np.int32).view(np.float32)[0]
    # The threshold is the k-th smallest value: numpy's quantile with the inverted-CDF rule.
    assert t == np.sort(values)[k - 1]
    assert t == np.quantile(
        values, (k - 0.5) / n, method="inverted_cdf"
    )  # (k-½)/n: no float round-up past the k-th
    masks = [threshold_mask(c, t_bits, q) for c, q in zip(chunks, quotas, strict=True)]
    mask = np.concatenate([m.numpy() for m in masks])
    assert mask.sum() == k  # exactly k pruned, whatever the chunking
    if k < n:
        assert values[mask].max() <= values[~mask].min()
    # Ties are pruned in position order: the pruned ties are the first ones.
    tie_positions = np.flatnonzero(values == t)
    pruned_ties = np.flatnonzero(mask & (values == t))
    assert np.array_equal(pruned_ties, tie_positions[: len(pruned_ties)])


def test_importance_kinds_match_numpy():
    rng = np.random.default_rng(0)
    w = torch.from_numpy(rng.standard_normal((8, 16)).astype(np.float32)).to(torch.bfloat16)
    g = torch.from_numpy(rng.standard_normal((8, 16)).astype(np.float32)).to(torch.float16)
    a = torch.from_numpy(np.abs(rng.standard_normal(16)).astype(np.float32))
    wf, gf, af = w.float().numpy(), g.float().numpy(), a.numpy()
    np.testing.assert_array_equal(importance(w).numpy(), np.abs(wf))
    np.testing.assert_array_equal(importance(w, "gradient", grad=g).numpy(), np.abs(wf * gf))
    np.testing.assert_array_equal(
        importance(w, "activation", act_norm=a).numpy(),
        (np.abs(wf) * af[None, :]).astype(np.float32),
    )
    np.testing.assert_array_equal(importance(w, scale=2.0).numpy(), np.abs(wf) / np.float32(2.0))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9),
    groups=st.integers(1, 12),
    nm=st.sampled_from([(2, 4), (1, 4), (4, 8), (3, 8)]),
    seed=st.integers(0, 999),
)
def test_nm_mask_keeps_the_n_largest_of_every_m(rows, groups, nm, seed):
    n, m = nm
    rng = np.random.default_rng(seed)
    imp = np.round(np.abs(rng.standard_normal((rows, groups * m))) * 3).astype(np.float32)  # ties
    mask = nm_mask(torch.from_numpy(imp), n, m).numpy()
    for r in range(rows):
        for g in range(groups):
            block = imp[r, g * m : (g + 1) * m]
            pruned = mask[r, g * m : (g + 1) * m]
            assert (~pruned).sum() == n  # at most (exactly) N survive
            keep = np.argsort(-block, kind="stable")[:n]  # reference: ties keep the lower index
            assert set(np.flatnonzero(~pruned)) == set(keep)


def test_nm_rejects_a_width_not_multiple_of_m():
    with pytest.raises(ValueError):
        nm_mask(torch.ones(2, 6), 2, 4)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 50),
    sparsity=st.floats(0, 0.99),
    seed=st.integers(0, 999),
)
def test_row_mask_prunes_the_same_count_in_every_row(rows, cols, sparsity, seed):
    rng = np.random.default_rng(seed)
    imp = np.round(np.abs(rng.standard_normal((rows, cols))) * 2).astype(np.float32)
    mask = row_mask(torch.from_numpy(imp), sparsity).numpy()
    k = int(np.floor(sparsity * cols))
    for r in range(rows):
        assert mask[r].sum() == k
        order = np.argsort(imp[r], kind="stable")
        assert set(np.flatnonzero(mask[r])) == set(order[:k])
