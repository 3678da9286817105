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


def _logs(flow_run_id) -> list[str]:
    """The run's logs as the API has them, once every queued log record has been sent (the
    log worker sends in batches: drain it first, waiting for that, not for time to pass)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()

    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    return [log.message for log in logs]


def test_progress_says_chunks_gb_rate_and_time_left(
    prefect_harness, llama_src: Path, tmp_path: Path
) -> None:
    """The compress stage's progress artifact ends with its chunks, GB, GB/s and time; the run
    log has the same lines, and when the cluster started."""
    from flows.compress import compress_checkpoint, progress_line

    config = RunConfig(source=str(llama_src), destination=str(tmp_path / "out"), workers=0)
    state = compress_checkpoint(config=config, return_state=True)
    assert state.is_completed(), state
    run_id = state.state_details.flow_run_id
    (progress,) = _artifacts(run_id, ["compress-progress"])["compress-progress"]
    assert progress.type == "progress" and float(progress.data) == 100.0
    assert progress.description.startswith("compress: ")
    assert " chunks (100.0 %)" in progress.description and " GB" in progress.description
    logs = _logs(run_id)
    assert any(m.startswith("compress: ") and "done in" in m for m in logs), logs
    assert any(m.startswith("cluster started in ") for m in logs), logs
    # the line itself, mid-stage: rate and time left from the chunks done so far
    line = progress_line("compress", 120, 480, 30.0, 8_000_000_000)
    assert line == (
        "compress: 120/480 chunks (25.0 %), 2.0 of 8.0 GB, 0.07 GB/s, about 1 min 30 s left"
    )


def test_a_failed_run_says_why_and_the_fix(prefect_harness, tmp_path: Path) -> None:
    """The failed state's message is the CLI's one line with its fix, a markdown artifact says
    the same, and no traceback-only failure is left to decode."""
    from flows.compress import compress_checkpoint

    missing = tmp_path / "no-such-checkpoint"
    config = RunConfig(source=str(missing), destination=str(tmp_path / "out"), workers=0)
    state = compress_checkpoint(config=config, return_state=True)
    assert state.is_failed()
    assert str(missing) in state.message and "fix: " in state.message, state.message
    (artifact,) = _artifacts(state.state_details.flow_run_id, ["compression-failure"])[
        "compression-failure"
    ]
    assert (
        artifact.type == "markdown" and "fix: " in artifact.data and str(missing) in artifact.data
    )
    assert not (tmp_path / "out").exists()
    logs = _logs(state.state_details.flow_run_id)
    assert any("fix: " in m for m in logs) and not any("Traceback" in m for m in logs), logs


def test_history_keeps_one_row_per_run_per_model(
    prefect_harness, llama_src: Path, tmp_path: Path
) -> None:
    """Two runs of one model: its `compression-history-<model>` artifact's latest version holds
    both rows, and `compressor history` reads them back through the API."""
    from typer.testing import CliRunner

    from compressor.cli import app
    from flows.compress import compress_checkpoint
    from flows.history import history_key, read_history

    model = f"{llama_src}"
    before = len(read_history(model))  # the session's other flow tests compress it too
    for preset in ("w8a16", "w4a16"):
        config = RunConfig(
            source=model, destination=str(tmp_path / preset), preset=preset, workers=0
        )
        assert compress_checkpoint(config=config, return_state=True).is_completed()
    rows = read_history(model)[before:]
    assert [r["preset"] for r in rows] == ["w8a16", "w4a16"]
    assert rows[0]["bits_per_weight"] > 7.9 and 4.0 < rows[1]["bits_per_weight"] < 4.5
    assert rows[1]["ratio"] > rows[0]["ratio"] > 1.5
    assert rows[1]["destination"] == str((tmp_path / "w4a16").resolve())
    assert history_key(model) == "compression-history-llama-512"
    done = CliRunner().invoke(app, ["history", model, "--json"])
    assert done.exit_code == 0, done.output
    assert [r["preset"] for r in json.loads(done.output)[before:]] == ["w8a16", "w4a16"]


def _form_payload(schema: dict, node: dict) -> object:
    """What the UI's run form submits for a schema node left at its defaults: each property's
    default, nested objects filled the same way (it sends e.g. {"version": 1, "pruning": null,
    "budget": null} for an untouched recipe)."""
    if "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
    if "default" in node:
        return node["default"]
    if node.get("type") == "object" or "properties" in node:
        return {
            name: _form_payload(schema, prop)
            for name, prop in node.get("properties", {}).items()
            if "default" in prop or "$ref" in prop
        }
    return None


@pytest.mark.parametrize(("preset", "bits"), [("w8a16", 8), ("w4a16", 4)])
def test_the_run_form_produces_the_chosen_preset(
    prefect_harness, llama_src: Path, tmp_path: Path, preset: str, bits: int
) -> None:
    """A run submitted as the UI does: every default the deployment's parameter schema holds,
    the preset picked from the choice, source and destination typed in. The output has the
    preset's bits, and the form shows no constants to fill in."""
    from prefect.utilities.callables import parameter_schema

    from flows.compress import compress_checkpoint

    schema = parameter_schema(compress_checkpoint.fn).model_dump()
    form = schema["definitions"]["RunConfig"]
    assert "version" not in form["properties"]
    assert "version" not in schema["definitions"]["Recipe"]["properties"]
    assert preset in form["properties"]["preset"]["enum"]
    payload = _form_payload(schema, schema["properties"]["config"])
    assert isinstance(payload, dict) and isinstance(payload.get("recipe"), dict)
    payload |= {
        "source": str(llama_src),
        "destination": str(tmp_path / "out"),
        "preset": preset,
        "workers": 0,
    }
    state = compress_checkpoint(config=payload, return_state=True)
    assert state.is_completed(), state
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert {g["weights"]["num_bits"] for g in qc["config_groups"].values()} == {bits}


def test_the_run_form_takes_the_recipe_as_yaml(
    prefect_harness, llama_src: Path, tmp_path: Path
) -> None:
    """The form's recipe_yaml field: a recipe written out (here 8-bit rules, with preset
    'recipe') replaces the recipe fields the form sends at their defaults."""
    from prefect.utilities.callables import parameter_schema

    from flows.compress import compress_checkpoint

    schema = parameter_schema(compress_checkpoint.fn).model_dump()
    payload = _form_payload(schema, schema["properties"]["config"])
    assert isinstance(payload, dict)
    payload |= {
        "source": str(llama_src),
        "destination": str(tmp_path / "out"),
        "preset": "recipe",
        "recipe_yaml": "quantization:\n  - bits: 8\n    strategy: channel\n",
        "workers": 0,
    }
    state = compress_checkpoint(config=payload, return_state=True)
    assert state.is_completed(), state
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert {g["weights"]["num_bits"] for g in qc["config_groups"].values()} == {8}


def test_a_relative_path_is_refused_when_the_run_is_submitted(prefect_harness) -> None:
    """The server checks a submitted run's parameters against the deployment's schema: a
    relative source (which the worker would resolve against its own directory) is refused
    before any run exists; absolute paths are accepted."""
    from prefect import get_client

    from flows.compress import compress_checkpoint

    deployment_id = compress_checkpoint.to_deployment(name="form-validation").apply()
    with get_client(sync_client=True) as client:
        with pytest.raises(Exception, match="source") as refused:
            client.create_flow_run_from_deployment(
                deployment_id,
                parameters={"config": {"source": "models/llama", "destination": "/data/out"}},
            )
        assert "pattern" in str(refused.value) or "does not match" in str(refused.value)
        run = client.create_flow_run_from_deployment(
            deployment_id,
            parameters={"config": {"source": "/data/llama", "destination": "s3://b/out"}},
        )
        client.delete_flow_run(run.id)  # nobody serves it: it would only wait
        client.delete_deployment(deployment_id)
