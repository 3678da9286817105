"""Where stage functions run: in this process (serial) or on a dask.distributed cluster.

Stages hand plain, picklable job records to `map` / `map_reduce`; the same functions run either
way, which is what makes the serial path a faithful debugger of the distributed one.
Reductions run as a tree on the cluster (fan-in 8): only one small record per key ever comes
back to the client, never thousands of partials.
"""

from __future__ import annotations

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

    def _submit_all(self, fn, jobs, stage):
        token = uuid.uuid4().hex[:8]
        resources = {"GPU": 1} if self.has_gpu_workers and stage in self.gpu_stages else None
        return self.client.map(
            fn,
            list(jobs),
            key=[f"{stage}-{token}-{k}" for k in range(len(jobs))],
            pure=False,
            resources=resources,
            retries=2,  # a lost worker's jobs are pure and idempotent: safe to run again
        )

    def _wait(self, futures, stage, progress):
        from distributed import as_completed

        progress = progress or _no_progress
        total = len(futures)
        progress(stage, 0, total)
        done = 0
        try:
            for future in as_completed(futures):
                if future.status == "error":
                    future.result()  # raises the job's own exception, with its message
                done += 1
                progress(stage, done, total)
        except BaseException:
            self.client.cancel(futures)
            raise

    def run_everywhere(self, fn):
        self.client.run(fn)

    def map(self, fn, jobs, stage, progress=None):
        if not jobs:
            return []
        futures = self._submit_all(fn, jobs, stage)
        self._wait(futures, stage, progress)
        return self.client.gather(futures)

    def map_reduce(self, fn, jobs, key_of, combine, stage, progress=None):
        if not jobs:
            return {}
        futures = self._submit_all(fn, jobs, stage)
        by_key: dict[Any, list] = defaultdict(list)
        for job, future in zip(jobs, futures, strict=True):
            by_key[key_of(job)].append(future)
        roots = {}
        for key, level in by_key.items():
            while len(level) > 1:
                level = [
                    self.client.submit(combine, *level[i : i + FAN_IN], pure=False, retries=2)
                    for i in range(0, len(level), FAN_IN)
                ]
            roots[key] = level[0]
        self._wait(futures, stage, progress)
        keys = list(roots)
        values = self.client.gather([roots[k] for k in keys])
        return dict(zip(keys, values, strict=True))
