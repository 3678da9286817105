"""Stats for pruning: exact per-scope importance thresholds, without gathering any importance.

Passes over the staged chunks (each a map + tree reduction of small records, see
`compressor/math/prune.py` for why they are exact):

    0. (with `normalize`) sum and count of importance per tensor → mean, the tensor's divisor
    1. high-16-bit histogram per scope → the bin holding the k-th smallest score
    2. low-16-bit histogram of that bin per scope → the exact score t and its rank r among ties
    3. per-chunk count of scores equal to t (one integer per chunk) → each chunk's tie quota

With an automatic budget, one more map-reduce measures each target's squared error under every
candidate scheme (`candidate_errors`), so the thresholds stage can choose schemes globally.

k-means codebooks (`kmeans_codebooks`): per tensor, starting centroids from its ingest range
(uniform cells, or quantiles of one histogram pass), then Lloyd iterations, each one map-reduce
of exact per-centroid sums over all k-means tensors' chunks (`math/codebook.py`) and a tiny update
on the client. The result is bit-identical to single-process k-means from the same start
(`kmeans_reference`), whatever the chunking and the reduction tree.

Scopes: one per tensor (`scope: tensor`, and every tensor named in a `schedule`), or one for all
remaining targets (`scope: global`). Row and N:M structures decide locally and skip this stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from compressor.formats import dtypes
from compressor.formats.layout import CodebookArgs
from compressor.formats.safetensors_io import read_tensor
from compressor.formats.staging import Staging
from compressor.math.codebook import (
    KMeansPartial,
    combine_kmeans,
    histogram_counts,
    init_centroids,
    kmeans_partial,
    update_centroids,
)
from compressor.math.codebook import combine_histograms as combine_counts
from compressor.math.prune import (
    Histogram,
    combine_histograms,
    high_histogram,
    importance,
    importance_bits,
    low_histogram,
    select,
)
from compressor.math.quant import QuantArgs
from compressor.math.rounding import RoundingMode, quantize_rows
from compressor.math.stats import RangeStats, error_stats
from compressor.stages.calibrate import Calibration, Statistic, load_hessian
from compressor.stages.executor import Executor, Progress
from compressor.stages.plan import Plan, TensorPlan

__all__ = [
    "CandidateErrors",
    "ChunkPrune",
    "Codebook",
    "ScopeThreshold",
    "applicable",
    "candidate_errors",
    "chunk_importance",
    "kmeans_codebooks",
    "prune_thresholds",
    "staged_rows",
]

HISTOGRAM_BINS = 4096  # bins of the histogram that places k-means' starting centroids

STAGE = "stats"


@dataclass(frozen=True)
class ChunkPrune:
    """What one chunk prunes: scores with bits < t_bits, and its first `quota` ties at t_bits.

    `t_bits = -1` prunes nothing by threshold (structured patterns, or k = 0). `scale` divides
    the scores (per-tensor normalisation), None when not normalising.
    """

    t_bits: int = -1
    quota: int = 0
    scale: float | None = None


@dataclass(frozen=True)
class ScopeThreshold:
    """Reported per scope: size, how many are pruned, and the threshold score."""

    scope: str
    elements: int
    pruned: int
    threshold: float


@dataclass(frozen=True)
class _Job:
    staging: Staging
    tensor: TensorPlan
    chunk: int
    scale: float | None = None
    param: int = 0  # the selected high bin (pass 2) or t_bits (pass 3)


def staged_rows(staging: Staging, t: TensorPlan, chunk: int) -> torch.Tensor:
    """The staged input rows of chunk `chunk` of `t`, as a tensor of its dtype."""
    r0, r1 = t.chunks[chunk]
    return dtypes.to_torch(staging.read_rows(f"in/{t.key}", r0, r1), t.dtype)


def chunk_importance(
    staging: Staging,
    t: TensorPlan,
    chunk: int,
    w: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Importance scores of one staged chunk (reads the weights unless given, and side inputs)."""
    assert t.prune is not None
    r0, r1 = t.chunks[chunk]
    if w is None:
        w = staged_rows(staging, t, chunk)
    grad = act = None
    if t.prune.importance == "gradient":
        assert t.prune.gradient is not None
        grad = dtypes.to_torch(
            staging.read_rows(f"in/{t.key}.grad", r0, r1), t.prune.gradient[1].dtype
        )
    elif t.prune.importance == "activation":
        if t.prune.activation is not None:  # one small vector (in_features,), read where needed
            file, info = t.prune.activation
            act = dtypes.to_torch(read_tensor(file, info), info.dtype)
        else:
            assert t.prune.norms is not None, "the calibrate stage gives every input its norms"
            act = torch.from_numpy(staging.read_rows(t.prune.norms, 0, t.info.shape[1]))
    return importance(w, t.prune.importance, grad, act, scale)


def _sum_chunk(job: _Job) -> tuple[float, int]:
    imp = chunk_importance(job.staging, job.tensor, job.chunk)
    return float(imp.sum(dtype=torch.float64)), imp.numel()


def _combine_sums(*parts: tuple[float, int]) -> tuple[float, int]:
    return math.fsum(p[0] for p in parts), sum(p[1] for p in parts)


def _high_chunk(job: _Job) -> Histogram:
    return high_histogram(chunk_importance(job.staging, job.tensor, job.chunk, scale=job.scale))


def _low_chunk(job: _Job) -> Histogram:
    imp = chunk_importance(job.staging, job.tensor, job.chunk, scale=job.scale)
    return low_histogram(imp, job.param)


def _ties_chunk(job: _Job) -> int:
    imp = chunk_importance(job.staging, job.tensor, job.chunk, scale=job.scale)
    return int((importance_bits(imp) == job.param).sum())


def prune_thresholds(
    plan: Plan, staging: Staging, executor: Executor, progress: Progress | None = None
) -> tuple[dict[tuple[str, int], ChunkPrune], list[ScopeThreshold]]:
    """Each pruned chunk's `ChunkPrune`, and the per-scope figures for the report."""
    pruned = [t for t in plan.tensors if t.prune is not None]
    scales: dict[str, float | None] = {t.name: None for t in pruned}
    normalized = [t for t in pruned if t.prune and t.prune.normalize]
    if normalized:
        jobs = [_Job(staging, t, k) for t in normalized for k in range(len(t.chunks))]
        sums = executor.map_reduce(
            _sum_chunk, jobs, lambda j: j.tensor.name, _combine_sums, f"{STAGE}:mean", progress
        )
        for name, (total, count) in sums.items():
            mean = total / count if count else 0.0
            scales[name] = mean if mean > 0 else None

    decisions: dict[tuple[str, int], ChunkPrune] = {
        (t.name, k): ChunkPrune(scale=scales[t.name]) for t in pruned for k in range(len(t.chunks))
    }
    by_scope: dict[str, list[TensorPlan]] = {}
    for t in pruned:
        assert t.prune is not None
        if t.prune.structure == "unstructured":
            by_scope.setdefault(t.prune.scope, []).append(t)
    if not by_scope:
        return decisions, []

    def jobs_for(scopes: dict[str, int] | None = None) -> list[_Job]:
        return [
            _Job(staging, t, k, scales[t.name], scopes[scope] if scopes else 0)
            for scope, members in by_scope.items()
            for t in members
            for k in range(len(t.chunks))
        ]

    def scope_of(job: _Job) -> str:
        assert job.tensor.prune is not None
        return job.tensor.prune.scope

    targets: dict[str, int] = {}  # scope → k, the number of weights to prune
    for scope, members in by_scope.items():
        n = sum(t.info.numel for t in members)
        assert members[0].prune is not None
        targets[scope] = math.floor(members[0].prune.sparsity * n)
    active = {s: k for s, k in targets.items() if k > 0}
    reports = [
        ScopeThreshold(s, sum(t.info.numel for t in by_scope[s]), 0, 0.0)
        for s in targets
        if s not in active
    ]
    if not active:
        return decisions, reports
    by_scope = {s: m for s, m in by_scope.items() if s in active}

    highs = executor.map_reduce(
        _high_chunk, jobs_for(), scope_of, combine_histograms, f"{STAGE}:hist", progress
    )
    high_bins = {s: select(highs[s], k) for s, k in active.items()}
    lows = executor.map_reduce(
        _low_chunk,
        jobs_for({s: b for s, (b, _) in high_bins.items()}),
        scope_of,
        combine_histograms,
        f"{STAGE}:refine",
        progress,
    )
    t_bits: dict[str, int] = {}
    rank: dict[str, int] = {}
    for s, (b, r_high) in high_bins.items():
        low, r = select(lows[s], r_high)
        t_bits[s] = (b << 16) | low
        rank[s] = r
    tie_jobs = jobs_for(t_bits)
    ties = executor.map(_ties_chunk, tie_jobs, f"{STAGE}:ties", progress)
    taken: dict[str, int] = dict.fromkeys(active, 0)
    for job, count in zip(tie_jobs, ties, strict=True):  # jobs are in global (plan) order
        s = scope_of(job)
        quota = min(count, max(0, rank[s] - taken[s]))
        taken[s] += quota
        decisions[(job.tensor.name, job.chunk)] = ChunkPrune(t_bits[s], quota, job.scale)
    for s, k in active.items():
        value = float(np.array([t_bits[s]], dtype=np.int32).view(np.float32)[0])
        reports.append(ScopeThreshold(s, sum(t.info.numel for t in by_scope[s]), k, value))
    return decisions, reports


@dataclass(frozen=True)
class _CandidateJob:
    staging: Staging
    tensor: TensorPlan
    chunk: int
    candidates: tuple[QuantArgs | None, ...]  # None: the tensor's shape cannot take it
    statistic: Statistic | None = None  # calibration: measure the output error instead


@dataclass(frozen=True)
class CandidateErrors:
    """Squared reconstruction error of one tensor under each candidate scheme (nan where the
    candidate does not apply), and the tensor's squared norm. Mergeable by addition."""

    errors: tuple[float, ...]
    signal: float


def _candidate_chunk(job: _CandidateJob) -> CandidateErrors:
    """Without calibration: Σ (w − ŵ)² per candidate, and Σ w². With the input's XᵀX (as H, per
    calibration token): the output error Σ_rows (w − ŵ) H (w − ŵ)ᵀ, and Σ_rows w H wᵀ; the
    rounding then weights inputs by diag H, as compress will (gptq is measured by its weighted
    mse search, which sets its group scales: GPTQ's own error feedback only lowers the error
    further, by a similar factor for every candidate)."""
    t = job.tensor
    x = staged_rows(job.staging, t, job.chunk)
    h = importance = None
    if job.statistic is not None:
        h = load_hessian(job.staging, job.statistic).to(torch.float64) / job.statistic.tokens
        importance = torch.diagonal(h).clamp_min(0.0)
    rounding = cast(RoundingMode, "mse" if t.rounding == "gptq" else t.rounding)

    def measure(b: torch.Tensor, b_hat: torch.Tensor) -> float:
        if h is None:
            return error_stats(b, b_hat, count_zeros=False).sq_error
        d = b_hat.to(torch.float64) - b.to(torch.float64)
        return float(((d @ h) * d).sum())

    errors = []
    for args in job.candidates:
        if args is None:
            errors.append(math.nan)
            continue
        blocks = (x[b0 : b0 + 64] for b0 in range(0, x.shape[0], 64))  # cache-sized, as compress
        errors.append(
            math.fsum(
                measure(b, quantize_rows(b, args, rounding, importance=importance)[3])
                for b in blocks
            )
        )
    if h is None:
        signal = float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2
    else:
        w = x.to(torch.float64)
        signal = float(((w @ h) * w).sum())
    return CandidateErrors(tuple(errors), signal)


def _combine_candidates(*parts: CandidateErrors) -> CandidateErrors:
    return CandidateErrors(
        tuple(math.fsum(values) for values in zip(*(p.errors for p in parts), strict=True)),
        math.fsum(p.signal for p in parts),
    )


def applicable(args: QuantArgs, cols: int) -> bool:
    """Whether a (·, cols) weight can be stored with `args` in the compressed-tensors layout."""
    return args.strategy != "group" or cols % args.group_size == 0


def candidate_errors(
    plan: Plan,
    staging: Staging,
    candidates: list[QuantArgs],
    executor: Executor,
    progress: Progress | None = None,
    calibration: Calibration | None = None,
) -> dict[str, CandidateErrors]:
    """Each target's error under every candidate, measured chunk by chunk, reduced per tensor:
    the output error on the calibration tokens where `calibration` has the tensor's input,
    the weights' squared error otherwise."""
    jobs = [
        _CandidateJob(
            staging,
            t,
            k,
            tuple(a if applicable(a, t.shape2d[1]) else None for a in candidates),
            calibration.get(t.name) if calibration is not None else None,
        )
        for t in plan.quantized
        for k in range(len(t.chunks))
    ]
    return executor.map_reduce(
        _candidate_chunk,
        jobs,
        lambda j: j.tensor.name,
        _combine_candidates,
        f"{STAGE}:budget",
        progress,
    )


@dataclass(frozen=True)
class Codebook:
    """One tensor's fitted k-means codebook and how the fit went (for the report).

    `centroids`: the float64 result of Lloyd's algorithm; `stored`: the same rounded to float32,
    as written (`<m>.weight_codebook`) and as compress assigns against. `sse` is the weighted
    squared error of the last iteration's assignment (approximate, float64).
    """

    centroids: tuple[float, ...]
    iterations: int  # Lloyd iterations run (fewer than asked when a fixed point came first)
    converged: bool
    sse: float

    @property
    def stored(self) -> tuple[float, ...]:
        return tuple(float(v) for v in torch.tensor(self.centroids).to(torch.float32).tolist())


@dataclass(frozen=True)
class _KMeansJob:
    staging: Staging
    tensor: TensorPlan
    chunk: int
    centroids: tuple[float, ...] = ()
    lo: float = 0.0
    hi: float = 0.0


def _kmeans_histogram_chunk(job: _KMeansJob) -> tuple[int, ...]:
    return histogram_counts(
        staged_rows(job.staging, job.tensor, job.chunk), job.lo, job.hi, HISTOGRAM_BINS
    )


def _kmeans_chunk(job: _KMeansJob) -> KMeansPartial:
    return kmeans_partial(staged_rows(job.staging, job.tensor, job.chunk), job.centroids)


def kmeans_codebooks(
    plan: Plan,
    staging: Staging,
    ranges: dict[str, RangeStats],
    executor: Executor,
    progress: Progress | None = None,
) -> dict[str, Codebook]:
    """Fit every k-means target's codebook over its staged chunks (see the module docstring).

    `ranges` are the tensors' ingest ranges (finite: non-finite targets were refused or demoted
    before this stage). Each iteration is one map-reduce over the chunks of the tensors still
    moving; a tensor whose centroids did not change has reached a fixed point of Lloyd's map,
    so stopping there gives the same codebook as running all its iterations.
    """
    targets = [
        t
        for t in plan.quantized
        if t.scheme is not None and t.stored is not None and t.scheme.fits_codebook(t.stored)
    ]
    if not targets:
        return {}
    args = {t.name: t.args for t in targets if isinstance(t.args, CodebookArgs)}
    bounds = {t.name: (ranges[t.name].min, ranges[t.name].max) for t in targets}
    histograms: dict[str, tuple[int, ...]] = {}
    by_histogram = [t for t in targets if args[t.name].init == "histogram"]
    if by_histogram:
        jobs = [
            _KMeansJob(staging, t, k, (), *bounds[t.name])
            for t in by_histogram
            for k in range(len(t.chunks))
        ]
        histograms = executor.map_reduce(
            _kmeans_histogram_chunk,
            jobs,
            lambda j: j.tensor.name,
            combine_counts,
            f"{STAGE}:kmeans-init",
            progress,
        )
    centroids = {
        t.name: init_centroids(*bounds[t.name], args[t.name].levels, histograms.get(t.name))
        for t in targets
    }
    done = dict.fromkeys(centroids, 0)
    sse = dict.fromkeys(centroids, math.nan)
    converged: set[str] = set()
    for step in range(max(a.iterations for a in args.values())):
        moving = [t for t in targets if t.name not in converged and args[t.name].iterations > step]
        if not moving:
            break
        jobs = [
            _KMeansJob(staging, t, k, tuple(centroids[t.name].tolist()))
            for t in moving
            for k in range(len(t.chunks))
        ]
        partials = executor.map_reduce(
            _kmeans_chunk,
            jobs,
            lambda j: j.tensor.name,
            combine_kmeans,
            f"{STAGE}:kmeans-{step + 1}",
            progress,
        )
        for name, partial in partials.items():
            new = update_centroids(partial, centroids[name])
            done[name] += 1
            sse[name] = partial.sse
            if torch.equal(new, centroids[name]):
                converged.add(name)
            centroids[name] = new
    return {
        name: Codebook(tuple(c.tolist()), done[name], name in converged, sse[name])
        for name, c in centroids.items()
    }
