"""Codebook ("non-integer") quantization: NF4, and learned codebooks by distributed k-means.

Notation:

    x        weights, any shape, bfloat16 / float16 / float32 (float64 is rounded to float32)
    c        codebook / centroids, float64 (k,); code i stands for the value c[i]
    w        importance per weight, same shape as x, w ≥ 0 (rounded to float32); 1 if absent

NF4 (QLoRA's NormalFloat4, bitsandbytes' `quant_type="nf4"`)
    The flattened (row-major) tensor is cut into blocks of 64 consecutive values (the last may
    be shorter); each block stores absmax a = max|x| in float32, and each value the 4-bit index
    of the code value nearest to x / a. `NF4_CODE` holds bitsandbytes' 16 values verbatim;
    dequantization is `float32(NF4_CODE[i]) · a` in float32, cast to the output dtype.

    Tie rule and exactness: the index is the number of midpoints t_i = (c_i + c_{i+1})/2 (exact
    in float64) strictly below x / a, so an exact midpoint goes to the lower code, as
    bitsandbytes' decision tree (`x > t_i`) does. The quotient is formed in float64; because x
    and a have ≤ 24 significant bits and t_i ≤ 26, x/a ≠ t_i implies |x/a − t_i| > 2^-50·t_i,
    more than float64's rounding, so the index is the exact nearest code of the real x / a.
    bitsandbytes works in float32 (x · (1/a), thresholds rounded to float32), so its index can
    differ only for values within a few float32 ulps of a midpoint (pinned by a test). An
    all-zero block has a = 0 and every index 7 (the code 0.0).

k-means codebooks, distributed
    One Lloyd iteration over a tensor spread across chunks is a chunk/combine/finalize triple:
    `kmeans_partial(chunk, c)` assigns each value to its nearest centroid and accumulates, per
    centroid, Σ w·x and Σ w into a `KMeansPartial`; `combine_kmeans` adds records;
    `update_centroids` divides. Assignment is the exact nearest centroid (ties to the lower
    index), computed with an error-free midpoint test (`kmeans_assign`).

    Exactness: the sums are exact, so any split and any merge order give the same record, and
    the next centroids are bit-identical to single-process k-means (`kmeans_reference`). Every
    x (≤ 24 significant bits) and w (rounded to float32) is a dyadic rational, and w·x is exact
    in float64 (48 bits). Each term m·2^e (|m| < 2^53) is split into two 27-bit halves and
    scattered into int64 limbs of 8 exponent bits (a term adds < 2^35 to a limb; chunks are
    processed 2^27 terms at a time, so limbs never overflow); the limbs are then folded into
    Python integers. A record holds the sums as integers times a power of two, normalised
    (odd gcd) so equal values are equal records. Integer addition is associative, so `combine`
    is exact under any tree. The new centroid Σw·x / Σw is one correctly rounded division of
    Python integers. `sse` (Σ w·(x − c)², a diagnostic) is a float64 sum combined with `fsum`:
    approximate (relative ~n·2^-53) and excluded from record equality.

    Initial centroids are deterministic (`init_centroids`): uniform cell midpoints of [lo, hi]
    or, given a histogram (itself an exact chunk/combine pair: `histogram_counts`,
    `combine_histograms`), the (j + ½)/k quantiles interpolated within bins.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "NF4_BLOCK",
    "NF4_CODE",
    "KMeansPartial",
    "combine_histograms",
    "combine_kmeans",
    "histogram_counts",
    "init_centroids",
    "kmeans_assign",
    "kmeans_partial",
    "kmeans_reference",
    "nf4_dequantize",
    "nf4_quantize",
    "update_centroids",
]

# bitsandbytes' NF4 code values (functional.py / kernels `nf4_dequantization_lut`), verbatim.
NF4_CODE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_BLOCK = 64
_NF4_ZERO_INDEX = 7


# --------------------------------------------------------------------------------------------
# NF4
# --------------------------------------------------------------------------------------------


def _nf4_table(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Code values as float32 and the float64 midpoints between neighbours (exact)."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    c64 = code.to(torch.float64)
    return code, (c64[:-1] + c64[1:]) / 2


def nf4_quantize(x: torch.Tensor, block_size: int = NF4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 indices (uint8 in [0, 15], x's shape) and per-block absmax (float32, (nblocks,)).

    Blocks are `block_size` consecutive values of `x.reshape(-1)`; nblocks = ceil(numel / 64).
    Raises ValueError on NaN or ±inf.

    >>> codes, absmax = nf4_quantize(torch.tensor([[0.5, -1.0], [0.0, 0.04]]))
    >>> codes.tolist(), absmax.tolist()
    ([[12, 0], [7, 8]], [1.0])
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    nblocks = -(-n // block_size)
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=x.device)
        return torch.zeros(x.shape, dtype=torch.uint8, device=x.device), empty
    padded = torch.nn.functional.pad(flat, (0, nblocks * block_size - n)).view(nblocks, block_size)
    absmax = padded.abs().amax(dim=1)
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("NF4 needs finite weights: found NaN or ±inf")
    _, mid = _nf4_table(x.device)
    denom = torch.where(absmax == 0, torch.ones_like(absmax), absmax).to(torch.float64)
    ratio = padded.to(torch.float64) / denom.unsqueeze(1)  # all-zero blocks: 0/1 = 0 → code 7
    codes = torch.bucketize(ratio, mid, right=False)  # #{t_i < ratio}: ties go to the lower code
    return codes.view(-1)[:n].to(torch.uint8).view(x.shape), absmax


def nf4_dequantize(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    shape: Sequence[int],
    dtype: torch.dtype,
    block_size: int = NF4_BLOCK,
) -> torch.Tensor:
    """x̂ of `shape` in `dtype`: float32(NF4_CODE[code]) · absmax[block], rounded to `dtype`."""
    n = math.prod(shape)
    if codes.numel() != n:
        raise ValueError(f"{codes.numel()} codes cannot fill shape {tuple(shape)}")
    nblocks = -(-n // block_size)
    if absmax.numel() != nblocks:
        raise ValueError(f"expected {nblocks} absmax values for {n} weights, got {absmax.numel()}")
    table, _ = _nf4_table(codes.device)
    values = table[codes.reshape(-1).long()]
    scale = absmax.to(torch.float32).repeat_interleave(block_size)[:n]
    return (values * scale).to(dtype).view(tuple(shape))


# --------------------------------------------------------------------------------------------
# k-means: assignment
# --------------------------------------------------------------------------------------------


def _as_values(x: torch.Tensor) -> torch.Tensor:
    """Flattened x as float64 holding float32 values; rejects NaN and ±inf."""
    v = x.reshape(-1).to(torch.float32).to(torch.float64)
    if not bool(torch.isfinite(v).all()):
        raise ValueError("k-means needs finite weights: found NaN or ±inf")
    return v


def _as_centroids(centroids: torch.Tensor | Sequence[float], device: torch.device) -> torch.Tensor:
    c = torch.as_tensor(centroids, dtype=torch.float64).to(device).reshape(-1)
    if c.numel() == 0 or not bool(torch.isfinite(c).all()):
        raise ValueError("centroids must be a non-empty sequence of finite values")
    return c


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Index (int64, x's shape) of the centroid nearest to each value, ties to the lower index.

    Nearest in exact arithmetic: among the two sorted neighbours a < v ≤ b the test is
    sign(2v − (a + b)), evaluated error-free: a + b = s + err exactly (TwoSum), and
    fl(2v − s) compared with err has the sign of 2v − a − b (2v − s is exact when 2v and s are
    within a factor 2 (Sterbenz), and otherwise far larger than |err| ≤ 2^-53·|s|).
    Duplicate centroid values resolve to their lowest index. O(n log k) time, O(n) memory.
    """
    return _assign(_as_values(x), _as_centroids(centroids, x.device)).view(x.shape)


def _assign(v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """`kmeans_assign` on values and centroids already checked and converted (flat indices)."""
    order = torch.argsort(c, stable=True)  # equal values keep index order: first = lowest index
    sc = c[order]
    first = torch.ones_like(sc, dtype=torch.bool)
    first[1:] = sc[1:] != sc[:-1]
    uv, ui = sc[first], order[first]  # distinct sorted values and the index each one answers to
    pos = torch.searchsorted(uv, v)  # #{uv < v}
    last = uv.numel() - 1
    lo_pos = (pos - 1).clamp_(0, last)
    hi_pos = pos.clamp_(0, last)  # at either end both neighbours are the same centroid
    a, b = uv[lo_pos], uv[hi_pos]
    s = a + b
    bb = s - a
    err = (a - (s - bb)) + (b - bb)
    d = 2 * v - s
    lo_i, hi_i = ui[lo_pos], ui[hi_pos]
    take_hi = (d > err) | ((d == err) & (hi_i < lo_i))
    return torch.where(take_hi, hi_i, lo_i)


# --------------------------------------------------------------------------------------------
# k-means: exact accumulation
# --------------------------------------------------------------------------------------------

_LIMB_BITS = 8  # exponent bits per int64 limb
_HALF_BITS = 26  # a 53-bit mantissa is split into parts below 2^27
_SLICE = 1 << 27  # terms per scatter: 2^27 · 2^(27 + 8) = 2^62 < 2^63


def _normalise(ints: list[int], exp: int) -> tuple[tuple[int, ...], int]:
    """Strip common factors of two so one value has one representation (all zero → exp 0)."""
    tz = min(((v & -v).bit_length() - 1 for v in ints if v), default=None)
    if tz is None:
        return tuple(0 for _ in ints), 0
    return tuple(v >> tz for v in ints), exp + tz


def _exact_segment_sums(
    values: torch.Tensor, index: torch.Tensor, k: int
) -> tuple[tuple[int, ...], int]:
    """Exact Σ values[index == j] for j < k, as (integers, exponent): sum_j = ints[j]·2^exp.

    `values` is float64 (any finite values: each is m·2^e with |m| < 2^53); `index` int64.
    """
    nonzero = values != 0
    values, index = values[nonzero], index[nonzero]
    if values.numel() == 0:
        return _normalise([0] * k, 0)
    frac, e32 = torch.frexp(values)  # values = frac·2^e, 0.5 ≤ |frac| < 1
    mant = (frac * 2.0**53).to(torch.int64)  # exact: an integer below 2^53 in magnitude
    e = e32.to(torch.int64) - 53  # values = mant·2^e
    exp0 = int(e.min())
    sign = torch.sign(mant)
    mag = mant.abs()
    # two parts below 2^27, each placed at its own exponent offset from exp0
    parts = (
        (sign * (mag >> _HALF_BITS), e + (_HALF_BITS - exp0)),
        (sign * (mag & ((1 << _HALF_BITS) - 1)), e - exp0),
    )
    totals = [0] * k
    for piece, offset in parts:
        nlimbs = int(offset.max()) // _LIMB_BITS + 1
        shifted = piece << (offset % _LIMB_BITS)  # < 2^35 in magnitude
        target = index * nlimbs + offset // _LIMB_BITS
        for start in range(0, values.numel(), _SLICE):  # ≤ 2^27 terms per int64 limb sum
            acc = torch.zeros(k * nlimbs, dtype=torch.int64, device=values.device)
            acc.index_add_(0, target[start : start + _SLICE], shifted[start : start + _SLICE])
            for j, row in enumerate(acc.view(k, nlimbs).tolist()):
                totals[j] += sum(v << (_LIMB_BITS * i) for i, v in enumerate(row) if v)
    return _normalise(totals, exp0)


@dataclass(frozen=True)
class KMeansPartial:
    """One chunk's (or several chunks') contribution to a Lloyd step, exact.

    Per centroid j: Σ w·x = sums[j]·2^sum_exp and Σ w = weights[j]·2^weight_exp (Python
    integers, normalised); `count` values seen; `sse` = Σ w·(x − c_assigned)², approximate
    (float64) and not compared by `==`.
    """

    sums: tuple[int, ...]
    weights: tuple[int, ...]
    sum_exp: int
    weight_exp: int
    count: int
    sse: float = field(default=0.0, compare=False)

    def __post_init__(self) -> None:
        if len(self.sums) != len(self.weights):
            raise ValueError("sums and weights must have one entry per centroid")

    @property
    def k(self) -> int:
        return len(self.sums)

    def totals(self) -> tuple[list[float], list[float]]:
        """(Σ w·x, Σ w) per centroid as floats (for reports; the record itself is exact)."""
        return (
            [math.ldexp(float(v), self.sum_exp) if v else 0.0 for v in self.sums],
            [math.ldexp(float(v), self.weight_exp) if v else 0.0 for v in self.weights],
        )


def kmeans_partial(
    x: torch.Tensor,
    centroids: torch.Tensor | Sequence[float],
    importance: torch.Tensor | None = None,
) -> KMeansPartial:
    """Chunk step: assign every value of `x` (any shape) and accumulate exact per-centroid sums.

    `importance` (x's shape, finite, ≥ 0) is rounded to float32 first; without it every value
    weighs 1 and `weights` are counts.
    """
    v = _as_values(x)
    c = _as_centroids(centroids, v.device)
    k = c.numel()
    idx = _assign(v, c).reshape(-1)  # v and c are checked and converted once, here
    diff = v - c[idx]
    if importance is None:
        sums, sum_exp = _exact_segment_sums(v, idx, k)
        counts = torch.bincount(idx, minlength=k).tolist()
        weights, weight_exp = _normalise(counts, 0)
        sse = float(torch.sum(diff * diff)) if v.numel() else 0.0
    else:
        if importance.shape != x.shape:
            raise ValueError(
                f"importance shape {tuple(importance.shape)} != x shape {tuple(x.shape)}"
            )
        w = importance.reshape(-1).to(torch.float32).to(torch.float64)
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError("importance must be finite and non-negative")
        sums, sum_exp = _exact_segment_sums(v * w, idx, k)  # exact: 24-bit × 24-bit
        weights, weight_exp = _exact_segment_sums(w, idx, k)
        sse = float(torch.sum(w * diff * diff)) if v.numel() else 0.0
    return KMeansPartial(sums, weights, sum_exp, weight_exp, int(v.numel()), sse)


def _align(pairs: Sequence[tuple[tuple[int, ...], int]]) -> tuple[tuple[int, ...], int]:
    """Exact sum of integer vectors with exponents."""
    exp = min(e for _, e in pairs)
    k = len(pairs[0][0])
    total = [0] * k
    for ints, e in pairs:
        shift = e - exp
        for j, v in enumerate(ints):
            total[j] += v << shift
    return _normalise(total, exp)


def combine_kmeans(*parts: KMeansPartial) -> KMeansPartial:
    """Combine step: exact, associative and commutative."""
    if not parts:
        raise ValueError("combine_kmeans needs at least one partial")
    k = parts[0].k
    if any(p.k != k for p in parts):
        raise ValueError("cannot combine partials for different numbers of centroids")
    sums, sum_exp = _align([(p.sums, p.sum_exp) for p in parts])
    weights, weight_exp = _align([(p.weights, p.weight_exp) for p in parts])
    return KMeansPartial(
        sums,
        weights,
        sum_exp,
        weight_exp,
        sum(p.count for p in parts),
        math.fsum(p.sse for p in parts),
    )


def update_centroids(
    partial: KMeansPartial, centroids: torch.Tensor | Sequence[float]
) -> torch.Tensor:
    """Finalize step: c_j = Σw·x / Σw correctly rounded to float64 (k,); empty clusters keep c_j."""
    old = _as_centroids(centroids, torch.device("cpu"))
    if old.numel() != partial.k:
        raise ValueError(f"{old.numel()} centroids for a partial of {partial.k}")
    device = centroids.device if isinstance(centroids, torch.Tensor) else torch.device("cpu")
    out = old.tolist()
    d = partial.sum_exp - partial.weight_exp
    for j, (s, w) in enumerate(zip(partial.sums, partial.weights, strict=True)):
        if w == 0:
            continue
        out[j] = (s << d) / w if d >= 0 else s / (w << -d)  # int / int rounds correctly
    return torch.tensor(out, dtype=torch.float64, device=device)


def kmeans_reference(
    x: torch.Tensor,
    init: torch.Tensor | Sequence[float],
    iterations: int,
    importance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Single-process Lloyd's algorithm: `iterations` steps from `init`; float64 (k,)."""
    c = _as_centroids(init, x.device)
    for _ in range(iterations):
        c = update_centroids(kmeans_partial(x, c, importance), c)
    return c


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------


def histogram_counts(x: torch.Tensor, lo: float, hi: float, bins: int) -> tuple[int, ...]:
    """Chunk step: counts of x in `bins` equal bins of [lo, hi] (values outside go to the end
    bins). Bin of v: floor((v − lo) / (hi − lo) · bins) in float64, clamped: per value, so the
    counts of any split add up exactly (`combine_histograms`)."""
    if bins < 1 or not hi >= lo:
        raise ValueError(f"need bins ≥ 1 and lo ≤ hi, got {bins}, [{lo}, {hi}]")
    v = _as_values(x)
    width = hi - lo
    if width == 0:
        b = torch.zeros_like(v, dtype=torch.int64)
    else:
        b = torch.floor((v - lo) / width * bins).clamp_(0, bins - 1).to(torch.int64)
    return tuple(torch.bincount(b, minlength=bins).tolist())


def combine_histograms(*parts: Sequence[int]) -> tuple[int, ...]:
    """Combine step for `histogram_counts`: element-wise sums (exact)."""
    if not parts:
        raise ValueError("combine_histograms needs at least one histogram")
    if len({len(p) for p in parts}) != 1:
        raise ValueError("histograms must have the same number of bins")
    return tuple(sum(col) for col in zip(*parts, strict=True))


def init_centroids(
    lo: float, hi: float, k: int, histogram: Sequence[int] | None = None
) -> torch.Tensor:
    """Deterministic k starting centroids in [lo, hi], float64 (k,), strictly increasing where
    the range allows.

    Without a histogram: the midpoints lo + (hi − lo)·(j + ½)/k of k equal cells. With one
    (counts over equal bins of [lo, hi], e.g. `histogram_counts`): the (j + ½)/k quantiles of
    the binned distribution, linear inside a bin. Coinciding quantiles are pulled apart by one
    float64 ulp each, so no centroid starts as a copy of another.
    """
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
        raise ValueError(f"need a finite range lo ≤ hi, got [{lo}, {hi}]")
    width = hi - lo
    if histogram is None or sum(histogram) == 0:
        out = [lo + width * (j + 0.5) / k for j in range(k)]
    else:
        bins = len(histogram)
        total = sum(histogram)
        out = []
        cum = 0
        b = 0
        for j in range(k):
            target = total * (j + 0.5) / k
            while b < bins - 1 and cum + histogram[b] < target:
                cum += histogram[b]
                b += 1
            frac = (target - cum) / histogram[b] if histogram[b] else 0.5
            out.append(lo + width * (b + min(max(frac, 0.0), 1.0)) / bins)
    for j in range(1, k):
        if out[j] <= out[j - 1]:
            out[j] = math.nextafter(out[j - 1], math.inf)
    return torch.tensor(out, dtype=torch.float64)
