"""Where stage functions run: in this process (serial) or on a dask.distributed cluster.

Stages hand plain, picklable job records to `map` / `map_reduce`; the same functions run either
way, which is what makes the serial path a faithful debugger of the distributed one.
Reductions run as a tree on the cluster (fan-in 8): only one small record per key ever comes
back to the client, never thousands of partials. Consecutive jobs share a task (up to 8, while
every worker thread still gets ≥ 4 tasks): the scheduler's ~2 ms per task would otherwise be a
tenth of a fused compress chunk's time. Batching never changes a reduction tree's shape.
"""

from __future__ import annotations

import functools
import uuid
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol, TypeVar

__all__ = ["DaskExecutor", "Executor", "Progress", "SerialExecutor"]

J = TypeVar("J")
R = TypeVar("R")
K = TypeVar("K", bound=Hashable)

FAN_IN = 8


class Progress(Protocol):
    def __call__(self, stage: str, done: int, total: int) -> None: ...


def _no_progress(stage: str, done: int, total: int) -> None:
    return None


class Executor(Protocol):
    def map(
        self, fn: Callable[[J], R], jobs: Sequence[J], stage: str, progress: Progress | None = None
    ) -> list[R]: ...

    def map_reduce(
        self,
        fn: Callable[[J], R],
        jobs: Sequence[J],
        key_of: Callable[[J], K],
        combine: Callable[..., R],
        stage: str,
        progress: Progress | None = None,
    ) -> dict[K, R]: ...

    def run_everywhere(self, fn: Callable[[], object]) -> None:
        """Run `fn` once in every worker (imports, compiled kernels: start-up work)."""


class SerialExecutor:
    """Runs every job in this process, in order: the debugging path and the reference."""

    def map(self, fn, jobs, stage, progress=None):
        progress = progress or _no_progress
        results = []
        progress(stage, 0, len(jobs))
        for k, job in enumerate(jobs):
            results.append(fn(job))
            progress(stage, k + 1, len(jobs))
        return results

    def run_everywhere(self, fn):
        fn()

    def map_reduce(self, fn, jobs, key_of, combine, stage, progress=None):
        parts: dict[Any, list] = defaultdict(list)
        for job, result in zip(jobs, self.map(fn, jobs, stage, progress), strict=True):
            parts[key_of(job)].append(result)
        return {key: _tree(combine, values) for key, values in parts.items()}


def _tree(combine: Callable[..., R], values: list[R]) -> R:
    """The same tree shape the cluster uses, so serial and distributed sums agree bit for bit."""
    level = values
    while len(level) > 1:
        level = [combine(*level[i : i + FAN_IN]) for i in range(0, len(level), FAN_IN)]
    return level[0]


class DaskExecutor:
    """Runs jobs on a dask.distributed cluster through `client`.

    When the cluster's workers declare a "GPU" resource, jobs of the stages in `gpu_stages` are
    annotated with `resources={"GPU": 1}` so they land on GPU workers.
    """

    def __init__(self, client: Any, gpu_stages: frozenset[str] = frozenset({"compress"})) -> None:
        self.client = client
        workers = client.scheduler_info().get("workers", {})
        self.has_gpu_workers = any(w.get("resources", {}).get("GPU") for w in workers.values())
        self.gpu_stages = gpu_stages

    def _submit_all(self, fn, batches, stage):
        if not batches:
            return []
        token = uuid.uuid4().hex[:8]
        resources = {"GPU": 1} if self.has_gpu_workers and stage in self.gpu_stages else None
        return self.client.map(
            fn,
            list(batches),
            key=[f"{stage}-{token}-{k}" for k in range(len(batches))],
            pure=False,
            resources=resources,
            retries=2,  # a lost worker's jobs are pure and idempotent: safe to run again
        )

    def _batch_size(self, jobs: Sequence[Any]) -> int:
        """Jobs per task: up to FAN_IN, while leaving ≥ 4 tasks per worker thread. A task costs
        the scheduler ~2 ms; a chunk of fused compress work ~10-30 ms."""
        threads = sum(self.client.nthreads().values()) or 1
        return max(1, min(FAN_IN, len(jobs) // (4 * threads)))

    def _wait(self, futures, sizes, stage, progress):
        from distributed import as_completed

        progress = progress or _no_progress
        total = sum(sizes)
        size_of = {f.key: n for f, n in zip(futures, sizes, strict=True)}
        progress(stage, 0, total)
        done = 0
        try:
            for future in as_completed(futures):
                if future.status == "error":
                    future.result()  # raises the job's own exception, with its message
                done += size_of[future.key]
                progress(stage, done, total)
        except BaseException:
            self.client.cancel(futures)
            raise

    def run_everywhere(self, fn):
        """One task pinned to each worker, run in its thread pool. Not `client.run`: that calls a
        plain function on the worker's event loop, and a first-time compile of the search
        kernels (minutes on 2 cores) would then stall the worker's heartbeats until the
        scheduler dropped it (`distributed.scheduler.worker-ttl`, 5 minutes), leaving the stage
        waiting forever for workers that no longer exist. The restriction is loose, so a worker
        that leaves meanwhile hands its copy to another instead of leaving it unrunnable."""
        token = uuid.uuid4().hex[:8]
        workers = list(self.client.nthreads())
        futures = [
            self.client.submit(
                fn,
                key=f"start-{token}-{k}",
                workers=[address],
                allow_other_workers=True,
                pure=False,
            )
            for k, address in enumerate(workers)
        ]
        self.client.gather(futures)

    def map(self, fn, jobs, stage, progress=None):
        if not jobs:
            return []
        size = self._batch_size(jobs)
        batches = [list(jobs[i : i + size]) for i in range(0, len(jobs), size)]
        futures = self._submit_all(functools.partial(_run_batch, fn), batches, stage)
        self._wait(futures, [len(b) for b in batches], stage, progress)
        return [r for rs in self.client.gather(futures) for r in rs]

    def map_reduce(self, fn, jobs, key_of, combine, stage, progress=None):
        """Per key, the tree of `_tree` (groups of FAN_IN consecutive results, level by level),
        so sums agree bit for bit with the serial path. A task runs one first-level group; keys
        whose whole tree is one group are packed several to a task (their roots come back in
        one dict), so small chunks do not each pay the scheduler's per-task cost."""
        if not jobs:
            return {}
        by_key: dict[Any, list] = defaultdict(list)
        for job in jobs:
            by_key[key_of(job)].append(job)
        size = self._batch_size(jobs)
        packs: list[list] = [[]]  # keys of ≤ FAN_IN jobs, packed in order
        groups: list[tuple[Any, list]] = []  # (key, one first-level group) of the larger keys
        for key, key_jobs in by_key.items():
            if len(key_jobs) <= FAN_IN:
                if packs[-1] and sum(len(j) for _, j in packs[-1]) + len(key_jobs) > size:
                    packs.append([])
                packs[-1].append((key, key_jobs))
            else:
                groups.extend(
                    (key, key_jobs[i : i + FAN_IN]) for i in range(0, len(key_jobs), FAN_IN)
                )
        packs = [p for p in packs if p]
        pack_futures = self._submit_all(functools.partial(_reduce_pack, fn, combine), packs, stage)
        group_futures = self._submit_all(
            functools.partial(_reduce_group, fn, combine), [g for _, g in groups], stage
        )
        levels: dict[Any, list] = defaultdict(list)
        for (key, _), future in zip(groups, group_futures, strict=True):
            levels[key].append(future)
        roots = {}
        for key, level in levels.items():
            while len(level) > 1:
                level = [
                    self.client.submit(combine, *level[i : i + FAN_IN], pure=False, retries=2)
                    for i in range(0, len(level), FAN_IN)
                ]
            roots[key] = level[0]
        sizes = [sum(len(j) for _, j in p) for p in packs] + [len(g) for _, g in groups]
        self._wait([*pack_futures, *group_futures], sizes, stage, progress)
        results: dict[Any, Any] = {}
        for found in self.client.gather(pack_futures):
            results.update(found)
        keys = list(roots)
        results.update(zip(keys, self.client.gather([roots[k] for k in keys]), strict=True))
        return {key: results[key] for key in by_key}  # in the order keys first appear


def _run_batch(fn: Callable[[J], R], jobs: list[J]) -> list[R]:
    return [fn(job) for job in jobs]


def _reduce_group(fn: Callable[[J], R], combine: Callable[..., R], jobs: list[J]) -> R:
    """One first-level node of a key's tree: `combine` of its jobs' results, as in `_tree`."""
    return combine(*[fn(job) for job in jobs])


def _reduce_pack(
    fn: Callable[[J], R], combine: Callable[..., R], keyed: list[tuple[Any, list[J]]]
) -> dict[Any, R]:
    """The roots of several small keys (each tree is a single group; `_tree` returns a lone
    result as it is)."""
    return {
        key: fn(jobs[0]) if len(jobs) == 1 else _reduce_group(fn, combine, jobs)
        for key, jobs in keyed
    }
