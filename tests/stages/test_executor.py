"""The Dask executor batches jobs into tasks but keeps every reduction tree's shape: its results
equal the serial executor's exactly, even for a combine that is not associative."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

from compressor.stages.executor import DaskExecutor, SerialExecutor


def _shape(*parts: object) -> tuple[object, ...]:
    """A combine whose result records the tree it was built by (not associative at all)."""
    return tuple(parts)


def _square(job: tuple[str, int]) -> int:
    return job[1] * job[1]


@pytest.fixture(scope="module", params=[1, 2])
def dask_executor(request: pytest.FixtureRequest) -> Iterator[DaskExecutor]:
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=request.param,
            processes=False,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield DaskExecutor(client)


# Keys with 1, 3, 8, 9, 17 and 70 jobs: single-group keys get packed several to a task, larger
# ones span several first-level groups and tree levels.
JOBS = [(key, i) for key, n in [("a", 1), ("b", 3), ("c", 8), ("d", 9), ("e", 17), ("f", 70)]
        for i in range(n)]  # fmt: skip


def test_map_reduce_matches_serial_tree_for_tree(dask_executor):
    seen: list[tuple[str, int, int]] = []

    def progress(stage: str, done: int, total: int) -> None:
        seen.append((stage, done, total))

    key_of = lambda job: job[0]  # noqa: E731
    serial = SerialExecutor().map_reduce(_square, JOBS, key_of, _shape, "t")
    dask = dask_executor.map_reduce(_square, JOBS, key_of, _shape, "t", progress)
    assert dask == serial
    assert list(dask) == ["a", "b", "c", "d", "e", "f"]
    assert seen[0] == ("t", 0, len(JOBS)) and seen[-1] == ("t", len(JOBS), len(JOBS))
    assert [d for _, d, _ in seen] == sorted(d for _, d, _ in seen)


def test_map_keeps_job_order(dask_executor):
    jobs = list(range(101))
    assert dask_executor.map(lambda j: j * 2, jobs, "t") == [j * 2 for j in jobs]
    assert dask_executor.map(lambda j: j, [], "t") == []
    assert dask_executor.map_reduce(_square, [], lambda j: j[0], _shape, "t") == {}


def test_a_failing_job_raises_its_own_error(dask_executor):
    def fail_on_seven(job: int) -> int:
        if job == 7:
            raise ValueError("job 7 is broken")
        return job

    with pytest.raises(ValueError, match="job 7 is broken"):
        dask_executor.map(fail_on_seven, list(range(40)), "t")


def _record_where_it_ran(marks: Path) -> None:
    """Start-up work that writes down whether it ran on an event loop or in a worker's thread."""
    try:
        asyncio.get_running_loop()
        place = "event loop"
    except RuntimeError:
        place = "thread pool"
    name = f"{os.getpid()}-{threading.get_ident()}"
    (marks / name).write_text(place)


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_start_up_work_runs_once_per_worker_off_its_event_loop(tmp_path, processes):
    """On the worker's event loop, minutes of first-time compiling would stall its heartbeats
    until the scheduler dropped it and the stage waited forever (worker-ttl)."""
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=processes,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        DaskExecutor(client).run_everywhere(functools.partial(_record_where_it_ran, tmp_path))
    marks = sorted(p.read_text() for p in tmp_path.iterdir())
    assert marks == ["thread pool", "thread pool"]
