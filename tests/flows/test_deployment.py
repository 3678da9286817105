"""A real Prefect server on loopback, the deployment served by `compressor serve`, a run
triggered through the API, executed by the serve process, and checked through the API."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from compressor import defaults
from compressor.testing.generate import LlamaShape, generate_llama_checkpoint
from tests.flows._processes import prefect_env, prefect_server, stop, wait_final

pytestmark = pytest.mark.slow

RUN_TIMEOUT = 240


def test_served_deployment_runs_through_the_api(tmp_path: Path) -> None:
    source = generate_llama_checkpoint(
        tmp_path / "model", LlamaShape(hidden_size=256, intermediate_size=512), shard_mb=0.5
    )
    destination = tmp_path / "out"
    home = tmp_path / "prefect-home"
    with prefect_server(home) as api:
        serve = subprocess.Popen(
            [sys.executable, "-m", "compressor.cli", "serve"],
            env=prefect_env(home, api),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            _trigger_and_check(api, source, destination)
        finally:
            stop(serve)


def _trigger_and_check(api: str, source: Path, destination: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    name = f"compress-checkpoint/{defaults.SERVE_DEPLOYMENT_NAME}"
    with (
        temporary_settings({PREFECT_API_URL: api}),
        get_client(sync_client=True) as client,
    ):
        deadline = time.monotonic() + 60
        while True:  # the serve process registers the deployment when it starts
            try:
                deployment = client.read_deployment_by_name(name)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        config = {
            "source": str(source),
            "destination": str(destination),
            "preset": "w4a16",
            "workers": 0,
        }
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"config": config})
        run = wait_final(client, run.id, RUN_TIMEOUT)
        assert run.state.is_completed(), run.state
        assert run.name == f"{source.name}-w4a16"
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
        keys = {a.key for a in artifacts}
        assert {"compression-summary", "compression-tensors", "compress-progress"} <= keys
        assert (destination / "manifest.json").is_file()

        # The same input and config again: idempotent, the run completes without recomputing.
        before = (destination / "model.safetensors").stat().st_mtime_ns
        run2 = client.create_flow_run_from_deployment(deployment.id, parameters={"config": config})
        run2 = wait_final(client, run2.id, RUN_TIMEOUT)
        assert run2.state.is_completed(), run2.state
        assert (destination / "model.safetensors").stat().st_mtime_ns == before
