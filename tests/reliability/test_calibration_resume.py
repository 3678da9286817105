"""The calibration stage survives SIGKILL of the whole run: the rerun resumes every shard at
its next layer (finished layers are not recomputed) and publishes the clean run's bytes."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from compressor.stages.calibrate import STAGE as CALIBRATED
from tests.reliability._util import (
    assert_same_output,
    compress_args,
    kill_run,
    markers,
    run_cli,
    start_held_cli,
    wait_held,
)

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")


def _kill_group(proc) -> None:  # type: ignore[no-untyped-def]
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)


def test_run_killed_in_calibration_then_resumed(
    tiny_llama: Path, token_file: Path, tmp_path: Path
) -> None:
    options = ("--method", "gptq", "--calibration", str(token_file))
    options += ("--calibration-samples", "20", "--calibration-seq-len", "32")
    reference = tmp_path / "reference"
    clean = run_cli(compress_args(tiny_llama, reference, "--workers", "0", *options))
    assert clean.returncode == 0, clean.stderr

    dest, hold = tmp_path / "out", tmp_path / "hold"
    args = compress_args(tiny_llama, dest, "--workers", "2", "--keep-staging", *options)
    proc = start_held_cli(args, hold, stage=CALIBRATED, after=2)  # never released
    try:
        wait_held(proc, hold)
        kill_run(proc)
    finally:
        _kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not dest.exists()
    before = markers(dest, CALIBRATED)
    layers_total = 3 * 3  # 3 shards × 3 layers
    assert 0 < len(before) < layers_total, sorted(before)

    done = run_cli(args)
    assert done.returncode == 0, done.stderr
    after = markers(dest, CALIBRATED)
    assert len(after) == layers_total
    assert {k: after[k] for k in before} == before  # finished layers were not run again
    assert_same_output(reference, dest)
