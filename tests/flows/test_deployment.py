"""A real Prefect server on loopback, the deployment served by `compressor serve`, a run
triggered through the API, executed by the serve process, and checked through the API."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from compressor import defaults
from compressor.testing.generate import LlamaShape, generate_llama_checkpoint

pytestmark = pytest.mark.slow

SERVER_START_TIMEOUT = 150  # the local API takes 10–20 s here, more when the machine is busy
RUN_TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server not healthy after {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_served_deployment_runs_through_the_api(tmp_path: Path) -> None:
    source = generate_llama_checkpoint(
        tmp_path / "model", LlamaShape(hidden_size=256, intermediate_size=512), shard_mb=0.5
    )
    destination = tmp_path / "out"
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_API_URL": api,
    }
    env.pop("PREFECT_API_KEY", None)
    bin_dir = Path(sys.executable).parent
    server = subprocess.Popen(
        [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={k: v for k, v in env.items() if k != "PREFECT_API_URL"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    serve = None
    try:
        _wait_healthy(api, server, SERVER_START_TIMEOUT)
        serve = subprocess.Popen(
            [sys.executable, "-m", "compressor.cli", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _trigger_and_check(api, source, destination)
    finally:
        if serve is not None:
            _stop(serve)
        _stop(server)


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
        deadline = time.monotonic() + RUN_TIMEOUT
        while True:
            run = client.read_flow_run(run.id)
            if run.state is not None and run.state.is_final():
                break
            assert time.monotonic() < deadline, f"run still {run.state} after {RUN_TIMEOUT} s"
            time.sleep(1)
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
        deadline = time.monotonic() + RUN_TIMEOUT
        while True:
            run2 = client.read_flow_run(run2.id)
            if run2.state is not None and run2.state.is_final():
                break
            assert time.monotonic() < deadline
            time.sleep(1)
        assert run2.state.is_completed(), run2.state
        assert (destination / "model.safetensors").stat().st_mtime_ns == before
