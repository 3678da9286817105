"""The repository's `prefect.yaml`, used the way docs/operations.md ("Schedule") says, from a clean
copy of the repository: a real Prefect server, the work pool created with the CLI, `prefect
deploy --all` run in the copy, a real process worker started elsewhere, a run started with
`prefect deployment run`, executed by that worker and followed through the API. The deployed name is not the one `compressor serve` registers, and a
served deployment made before `prefect deploy` is still there, untouched, after it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from compressor import defaults
from compressor.testing.generate import LlamaShape, generate_llama_checkpoint
from tests.flows._processes import PREFECT, prefect_env, prefect_server, stop, wait_final

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SHAPE = LlamaShape(hidden_size=128, intermediate_size=256, num_hidden_layers=1, vocab_size=64)
CLI_TIMEOUT = 180  # one `prefect` command (it imports the flows); seconds on an idle machine
RUN_TIMEOUT = 300  # the worker's poll, a fresh Python importing torch and Prefect, the run
WORKER_START = ["worker", "start", "--pool", defaults.WORK_POOL, "--type", "process"]


def _clean_copy(destination: Path) -> Path:
    """What a clone of the working tree would hold once committed: its tracked files and the new
    ones git does not ignore (in CI's clean clone, the tracked files alone), and nothing else: no
    virtual environment, no build output, no git-ignored file that could hide a missing one."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: cannot tell which files a clone holds")
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=False,
    )
    if listed.returncode != 0:
        pytest.skip(f"{REPO} is not a git checkout: {listed.stderr.decode().strip()}")
    for name in listed.stdout.decode().split("\0"):
        source = REPO / name
        if name and source.is_file():  # a tracked file deleted in the working tree is not copied
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def _prefect(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    """One `prefect` command as an operator types it; its output, or a failure that shows it."""
    done = subprocess.run(
        [str(PREFECT), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, (
        f"prefect {' '.join(args)}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


def test_prefect_yaml_deploys_and_a_process_worker_runs_it(tmp_path: Path) -> None:
    clone = _clean_copy(tmp_path / "clone").resolve()
    spec = yaml.safe_load((clone / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert defaults.DEPLOYMENT_NAME in deployments
    assert defaults.SERVE_DEPLOYMENT_NAME != defaults.DEPLOYMENT_NAME
    assert defaults.SERVE_DEPLOYMENT_NAME not in deployments
    assert {d["work_pool"]["name"] for d in spec["deployments"]} == {defaults.WORK_POOL}

    source = generate_llama_checkpoint(tmp_path / "model", SHAPE, shard_mb=0.05, seed=0)
    destination = tmp_path / "out"
    home = tmp_path / "prefect-home"
    with prefect_server(home) as api:
        env = prefect_env(home, api)
        served = _register_served_deployment(api)

        _prefect(["work-pool", "create", defaults.WORK_POOL, "--type", "process"], clone, env)
        _prefect(["--no-prompt", "deploy", "--all"], clone, env)

        log = tmp_path / "worker.log"
        with log.open("w") as out:  # the worker starts elsewhere: the deployment says where to go
            worker = subprocess.Popen(
                [str(PREFECT), *WORKER_START],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            _check_deployments(api, clone, served)
            run = _run_deployed(env, source, destination, worker, log)
        finally:
            stop(worker)

    assert run.state.is_completed(), f"{run.state}\n{log.read_text()}"
    assert (destination / "manifest.json").is_file()
    config = json.loads((destination / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 8


def _register_served_deployment(api: str) -> Any:
    """The deployment `compressor serve` registers (its name and no work pool), without keeping
    a serve process running."""
    from prefect.client.orchestration import get_client
    from prefect.deployments.runner import RunnerDeployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.compress import compress_checkpoint

    with temporary_settings({PREFECT_API_URL: api}):
        deployment = compress_checkpoint.to_deployment(name=defaults.SERVE_DEPLOYMENT_NAME)
        assert isinstance(deployment, RunnerDeployment)  # called from sync code: not a coroutine
        deployment.apply()
        with get_client(sync_client=True) as client:
            return client.read_deployment_by_name(
                f"{defaults.FLOW_NAME}/{defaults.SERVE_DEPLOYMENT_NAME}"
            )


def _check_deployments(api: str, clone: Path, served: Any) -> None:
    """Both of prefect.yaml's deployments are registered on the pool, loading their flows from
    the copy; the served deployment kept its id, its settings and its last update."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    pull = [{"prefect.deployments.steps.set_working_directory": {"directory": str(clone)}}]
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        deployed = client.read_deployment_by_name(
            f"{defaults.FLOW_NAME}/{defaults.DEPLOYMENT_NAME}"
        )
        assert deployed.work_pool_name == defaults.WORK_POOL
        assert deployed.entrypoint == "flows/compress.py:compress_checkpoint"
        assert deployed.pull_steps == pull
        watch = client.read_deployment_by_name("watch-checkpoints/watch-checkpoints")
        assert (watch.work_pool_name, watch.pull_steps) == (defaults.WORK_POOL, pull)

        after = client.read_deployment_by_name(
            f"{defaults.FLOW_NAME}/{defaults.SERVE_DEPLOYMENT_NAME}"
        )
        assert after.id == served.id != deployed.id
        assert after.work_pool_name is None
        assert (after.entrypoint, after.updated) == (served.entrypoint, served.updated)


def _run_deployed(
    env: dict[str, str], source: Path, destination: Path, worker: subprocess.Popen, log: Path
) -> Any:
    """`prefect deployment run` of the deployed deployment with the whole `config` replaced
    (prefect.yaml's default points at /data and a compose network's scheduler): serial, on this
    machine. The run is then found and waited on through the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    name = f"{defaults.FLOW_NAME}/{defaults.DEPLOYMENT_NAME}"
    config = {
        "source": str(source),
        "destination": str(destination),
        "preset": "w8a16",
        "workers": 0,
    }
    _prefect(
        ["deployment", "run", name, "--params", json.dumps({"config": config})], log.parent, env
    )

    def worker_alive() -> None:
        assert worker.poll() is None, f"worker exited with {worker.returncode}\n{log.read_text()}"

    with (
        temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}),
        get_client(sync_client=True) as client,
    ):
        deployment = client.read_deployment_by_name(name)
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        )
        assert len(runs) == 1, runs  # the schedule in prefect.yaml is inactive
        assert runs[0].parameters == {"config": config}
        return wait_final(client, runs[0].id, RUN_TIMEOUT, check=worker_alive)
