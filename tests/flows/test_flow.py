"""The Prefect flow, run for real against a throwaway Prefect server (the session harness)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compressor.config import PRESETS, RunConfig

pytestmark = pytest.mark.slow


def _artifacts(flow_run_id, keys: list[str]) -> dict[str, list]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        )
    by_key: dict[str, list] = {}
    for artifact in found:
        by_key.setdefault(artifact.key, []).append(artifact)
    return by_key


def test_flow_compresses_and_publishes_artifacts(prefect_harness, llama_src: Path, tmp_path: Path):
    from flows.compress import compress_checkpoint

    dest = tmp_path / "flow-out"
    config = RunConfig(
        source=str(llama_src),
        destination=str(dest),
        preset="w4a16",
        recipe=PRESETS["w4a16"],
        workers=0,
    )
    state = compress_checkpoint(config=config, return_state=True)
    assert state.is_completed(), state
    report = state.result()
    assert isinstance(report, dict)
    assert report["destination"] == str(dest.resolve())
    assert report["ratio"] > 2.5
    assert len(report["tensors"]) == 21
    assert sum(t["scheme"] != "copy" for t in report["tensors"]) == 14
    assert (dest / "config.json").is_file() and list(dest.glob("*.safetensors"))
    written = json.loads((dest / "compression.json").read_text())
    assert written["totals"]["output_bytes"] == report["output_bytes"]

    artifacts = _artifacts(
        state.state_details.flow_run_id, ["compression-summary", "compression-tensors"]
    )
    (summary,) = artifacts["compression-summary"]
    (table,) = artifacts["compression-tensors"]
    assert summary.type == "markdown" and str(dest.resolve()) in summary.data
    assert table.type == "table"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {r["tensor"] for r in rows} == {t["name"] for t in report["tensors"]}
