"""The watcher flow against a real (throwaway) Prefect server: checkpoints that land in a folder
or under an S3 prefix (moto) are compressed with no human action, each exactly once; one still
being written waits for the next pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from compressor.testing.generate import LlamaShape, generate_llama_checkpoint
from tests.conftest import upload_dir

pytestmark = pytest.mark.slow

SHAPE = LlamaShape(hidden_size=128, intermediate_size=256, num_hidden_layers=1, vocab_size=64)


def _outcomes(result: list[dict]) -> dict[str, str]:
    return {Path(r["destination"]).name: r["outcome"] for r in result}


def test_a_watched_folder_compresses_each_checkpoint_once(prefect_harness, tmp_path: Path) -> None:
    from flows.watch import watch_checkpoints

    landing, out = tmp_path / "landing", tmp_path / "compressed"
    generate_llama_checkpoint(landing / "step-100", SHAPE, shard_mb=0.05, seed=1)
    partial = generate_llama_checkpoint(landing / "step-200", SHAPE, shard_mb=0.05, seed=2)
    shard = sorted(partial.glob("*.safetensors"))[-1]
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])  # still being written

    first = watch_checkpoints(str(landing), str(out))
    assert _outcomes(first) == {"step-100-w4a16": "compressed"}
    report = out / "step-100-w4a16" / "compression.json"
    written = report.read_bytes()

    second = watch_checkpoints(str(landing), str(out))  # the event repeats: nothing redone
    assert _outcomes(second) == {"step-100-w4a16": "up to date"}
    assert report.read_bytes() == written

    shard.write_bytes(whole)  # the training job finished writing step-200
    third = watch_checkpoints(str(landing), str(out), presets=["w4a16", "w8a16"])
    assert _outcomes(third) == {
        "step-100-w4a16": "up to date",
        "step-100-w8a16": "compressed",
        "step-200-w4a16": "compressed",
        "step-200-w8a16": "compressed",
    }
    config = json.loads((out / "step-200-w8a16" / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 8


def test_an_s3_prefix_is_watched_too(prefect_harness, s3: str, tmp_path: Path) -> None:
    from flows.watch import watch_checkpoints

    local = generate_llama_checkpoint(tmp_path / "step-1", SHAPE, shard_mb=0.05, seed=3)
    upload_dir(local, f"{s3}/landing/step-1")
    shutil.rmtree(local)
    out = tmp_path / "compressed"
    first = watch_checkpoints(f"{s3}/landing", str(out))
    assert _outcomes(first) == {"step-1-w4a16": "compressed"}
    assert (out / "step-1-w4a16" / "manifest.json").is_file()
    again = watch_checkpoints(f"{s3}/landing", str(out))
    assert _outcomes(again) == {"step-1-w4a16": "up to date"}
