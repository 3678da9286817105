"""A flow run starts its own Dask cluster as SLURM jobs through dask-jobqueue's API, compresses
on it, and cancels the jobs when it ends. SLURM itself is played by two small scripts on PATH:
`sbatch` keeps a copy of the job script dask-jobqueue wrote, runs it in the background (so the
workers it starts are real `dask worker` processes joining the run's scheduler) and answers as
sbatch does; `scancel` stops a job's processes. Everything else is dask-jobqueue's own code."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from compressor.config import RunConfig

pytest.importorskip("dask_jobqueue")
pytestmark = pytest.mark.slow

SBATCH = """\
    #!/usr/bin/env bash
    # the job script is the last argument; its caller deletes it once we return: keep a copy
    script="${@: -1}"
    id=$$
    cp "$script" "$FAKE_SLURM_DIR/job-$id.sh"
    setsid bash "$FAKE_SLURM_DIR/job-$id.sh" > "$FAKE_SLURM_DIR/job-$id.out" 2>&1 < /dev/null &
    echo $! > "$FAKE_SLURM_DIR/job-$id.pid"
    echo "Submitted batch job $id"
"""
SCANCEL = """\
    #!/usr/bin/env bash
    for id in "$@"; do
      echo "$id" >> "$FAKE_SLURM_DIR/cancelled"
      pid=$(cat "$FAKE_SLURM_DIR/job-$id.pid" 2>/dev/null) && kill -TERM -- "-$pid" 2>/dev/null
    done
    exit 0
"""


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    bin_dir, jobs = tmp_path / "slurm-bin", tmp_path / "slurm-jobs"
    bin_dir.mkdir()
    jobs.mkdir()
    for name, text in (("sbatch", SBATCH), ("scancel", SCANCEL)):
        (bin_dir / name).write_text(textwrap.dedent(text))
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(jobs))
    yield jobs
    for pid_file in jobs.glob("job-*.pid"):  # whatever a failed test left running
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def test_a_flow_run_starts_and_stops_its_own_slurm_cluster(
    prefect_harness, fake_slurm: Path, llama_src: Path, tmp_path: Path
) -> None:
    from flows.compress import compress_checkpoint

    config = RunConfig(
        source=str(llama_src),
        destination=str(tmp_path / "out"),
        slurm={"jobs": 2, "memory": "2GB", "walltime": "00:30:00", "start_timeout_s": 600},
    )
    state = compress_checkpoint(config=config, return_state=True)
    assert state.is_completed(), state
    assert json.loads((tmp_path / "out" / "compression.json").read_text())["totals"]["ratio"] > 2
    scripts = sorted(fake_slurm.glob("job-*.sh"))
    assert len(scripts) == 2  # two SLURM jobs, as written by dask-jobqueue
    text = scripts[0].read_text()
    assert "#SBATCH" in text and "distributed.cli.dask_worker" in text and "--mem=" in text
    logs = "".join(p.read_text() for p in fake_slurm.glob("job-*.out"))
    assert logs.count("Starting established connection") >= 2  # both workers joined
    cancelled = (fake_slurm / "cancelled").read_text().split()
    assert sorted(cancelled) == sorted(p.stem.removeprefix("job-") for p in scripts)
