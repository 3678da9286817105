"""In-place assembly (`stages.assemble`) writes the same bytes as staging outputs in Zarr.

Each case compresses the generated checkpoint twice, serially: once with the shard files
assembled in place (the default for a local run) and once through Zarr output staging (what a
run on an external scheduler does), and compares every output file byte for byte.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import compressor.stages.assemble as assemble
from compressor.config import build_config
from compressor.formats.staging import Staging
from compressor.formats.verify import verify_checkpoint
from compressor.pipeline import Pipeline, compress_checkpoint
from compressor.stages.executor import SerialExecutor


def _digests(root: Path) -> dict[str, str]:
    skip = {"compression.json", "manifest.json"}  # timings differ between runs
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.iterdir())
        if p.name not in skip
    }


def _run(src: Path, dest: Path, in_place: bool, monkeypatch, **options) -> Path:
    with monkeypatch.context() as m:
        m.setattr(assemble, "assembles_in_place", lambda *args: in_place)
        report = compress_checkpoint(build_config(str(src), str(dest), workers=0, **options))
    assert verify_checkpoint(dest).ok
    assert report.output_bytes > 0
    return dest


@pytest.mark.parametrize(
    "preset,options",
    [
        ("w4a16", {}),
        ("w4a16-asym", {"chunk_mb": 1, "max_shard_mb": 1}),  # several chunks and shards
        ("w8a16", {}),
        ("nf4", {}),
    ],
)
def test_in_place_equals_zarr_staging(llama_src, tmp_path, monkeypatch, preset, options):
    a = _run(llama_src, tmp_path / "in-place", True, monkeypatch, preset=preset, **options)
    b = _run(llama_src, tmp_path / "zarr", False, monkeypatch, preset=preset, **options)
    assert _digests(a) == _digests(b)


def test_buffered_copy_equals_copy_file_range(llama_src, tmp_path, monkeypatch):
    """Where `copy_file_range` is unsupported (other file systems), copies go through a buffer."""
    a = _run(llama_src, tmp_path / "kernel-copy", True, monkeypatch)
    monkeypatch.setattr(assemble, "_copy_in_kernel", lambda *args: False)
    b = _run(llama_src, tmp_path / "buffered", True, monkeypatch)
    assert _digests(a) == _digests(b)


def test_lost_shard_file_is_rebuilt_not_trusted(llama_src, tmp_path):
    """A shard file that disappears after compress is created again and its chunks redone:
    markers alone never make the write stage publish a file of zeros."""
    config = build_config(
        str(llama_src), str(tmp_path / "out"), preset="w4a16", workers=0, chunk_mb=1
    )
    first = Pipeline(config)
    plan = first.make_plan()
    executor = SerialExecutor()
    first.ingest(executor)
    first.stats(executor)
    first.thresholds()
    first.compress(executor)
    assert first.in_place
    staging = Staging(plan.staging_root)
    done = staging.count_done(assemble.STAGE)
    assert done == plan.chunk_count
    lost = assemble.staged_shard(staging, plan.shards[0].file_name)
    lost.unlink()

    again = Pipeline(config)
    again.make_plan()
    again.ingest(executor)
    again.stats(executor)
    again.thresholds()
    again.compress(executor)
    again.write(executor)
    again.publish()
    assert verify_checkpoint(tmp_path / "out").ok
    reference = _run(llama_src, tmp_path / "reference", False, pytest.MonkeyPatch(), chunk_mb=1)
    assert _digests(tmp_path / "out") == _digests(reference)


def test_bitmask_and_external_scheduler_stage_in_zarr(llama_src, tmp_path):
    plan_dir = tmp_path / "out"
    pruned = Pipeline(
        build_config(
            str(llama_src),
            str(plan_dir),
            preset="dense",
            workers=0,
            pruning={"sparsity": 0.5, "sparse_format": "bitmask"},
        )
    )
    plan = pruned.make_plan()
    staging = Staging(plan.staging_root)
    assert not assemble.assembles_in_place(plan, staging, None)  # kept sizes unknown up front
    plain = Pipeline(build_config(str(llama_src), str(plan_dir), workers=0))
    plan = plain.make_plan()
    assert assemble.assembles_in_place(plan, Staging(plan.staging_root), None)
    assert not assemble.assembles_in_place(plan, Staging(plan.staging_root), "tcp://host:8786")
