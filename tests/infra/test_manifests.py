"""Static checks of the deployment files under infra/.

Fast and hermetic: no network, no Docker engine, no Kubernetes, no SLURM. Optional
tools (the `docker compose` plugin, dask-kubernetes' CRDs, dask-jobqueue) add checks
when installed and are skipped with a reason otherwise.
"""

from __future__ import annotations

import ast
import os
import py_compile
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

try:
    from compressor.defaults import (
        DASK_DASHBOARD_PORT,
        DASK_SCHEDULER_PORT,
        DEPLOYMENT_NAME,
        PREFECT_API_PORT,
        WORK_POOL,
    )
except ImportError:
    # TODO: import these from compressor/defaults.py once it exists; it should define
    #   DASK_SCHEDULER_PORT = 8786, DASK_DASHBOARD_PORT = 8787, PREFECT_API_PORT = 4200,
    #   WORK_POOL = "compress-pool", DEPLOYMENT_NAME = "compress-checkpoint"
    DASK_SCHEDULER_PORT = 8786
    DASK_DASHBOARD_PORT = 8787
    PREFECT_API_PORT = 4200
    WORK_POOL = "compress-pool"
    DEPLOYMENT_NAME = "compress-checkpoint"

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
DOCKER = INFRA / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
DASK_CLUSTER_FILE = INFRA / "k8s" / "dask-cluster.yaml"
PREFECT_VALUES_FILE = INFRA / "k8s" / "prefect-worker-values.yaml"
SBATCH_FILE = INFRA / "slurm" / "compress.sbatch"
JOBQUEUE_FILE = INFRA / "slurm" / "dask_jobqueue_cluster.py"
OPERATIONS_DOC = REPO / "docs" / "operations.md"

LOOPBACK = {"127.0.0.1", "::1", "localhost"}
CPU_SERVICES = {"postgres", "prefect-server", "dask-scheduler", "dask-worker", "prefect-worker"}
GPU_SERVICE = "gpu-worker"
DASK_SERVICES = {"dask-worker", GPU_SERVICE}
DATA_SERVICES = {"dask-worker", GPU_SERVICE, "prefect-worker"}

YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml"})


# --------------------------------------------------------------------------- helpers

_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Resolve compose `${VAR:-default}` references to their defaults.

    The environment is ignored on purpose so the checks see what a fresh checkout
    without an .env file deploys.
    """
    if isinstance(value, str):

        def repl(m: re.Match[str]) -> str:
            op = m.group("op") or ""
            return m.group("arg") if op in {"-", ":-"} else ""

        return _VAR.sub(repl, value).replace("$$", "$")
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def load_all(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (doc,) = load_all(COMPOSE_FILE)
    return interpolate(doc)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def command_of(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return [str(c) for c in cmd] if isinstance(cmd, list) else str(cmd).split()


def option(cmd: list[str], name: str) -> str | None:
    """Value of `--name VALUE` or `--name=VALUE` in an argv list."""
    for i, arg in enumerate(cmd):
        if arg == name and i + 1 < len(cmd):
            return cmd[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def published_ports(service: dict[str, Any]) -> list[tuple[str | None, int | None, int]]:
    """(host_ip, published, target) for each entry of a compose `ports:` list."""
    out: list[tuple[str | None, int | None, int]] = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            published = entry.get("published")
            out.append(
                (
                    entry.get("host_ip"),
                    int(published) if published is not None else None,
                    int(entry["target"]),
                )
            )
            continue
        parts = str(entry).split("/")[0].split(":")
        if len(parts) == 1:
            out.append((None, None, int(parts[0])))
        elif len(parts) == 2:
            out.append((None, int(parts[0]), int(parts[1])))
        else:
            out.append((":".join(parts[:-2]), int(parts[-2]), int(parts[-1])))
    return out


def environment_of(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return {e.split("=", 1)[0]: (e.split("=", 1)[1] if "=" in e else None) for e in env}
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def healthcheck_text(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def k8s_docs() -> list[dict[str, Any]]:
    return load_all(DASK_CLUSTER_FILE)


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_spec["spec"]["containers"]


# --------------------------------------------------------------------------- all YAML


def test_infra_has_the_expected_files() -> None:
    for path in (
        DOCKER / "Dockerfile",
        DOCKER / "Dockerfile.cuda",
        COMPOSE_FILE,
        DASK_CLUSTER_FILE,
        PREFECT_VALUES_FILE,
        SBATCH_FILE,
        JOBQUEUE_FILE,
        INFRA / "README.md",
    ):
        assert path.is_file(), f"missing {path.relative_to(REPO)}"
    assert COMPOSE_FILE in YAML_FILES


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_yaml_parses(path: Path) -> None:
    docs = load_all(path)  # multi-document aware
    assert docs, f"{path} has no YAML documents"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: top-level document is not a mapping"


@pytest.mark.parametrize(
    "path",
    [p for p in YAML_FILES if p.parent.name == "k8s" and "values" not in p.name],
    ids=lambda p: p.name,
)
def test_k8s_documents_have_kind_and_name(path: Path) -> None:
    for doc in load_all(path):
        assert doc.get("apiVersion"), doc
        assert doc.get("kind"), doc
        assert doc.get("metadata", {}).get("name"), doc


# --------------------------------------------------------------------------- compose


def test_compose_has_expected_services(services: dict[str, Any]) -> None:
    assert CPU_SERVICES | {GPU_SERVICE} <= set(services)


def test_gpu_worker_only_in_gpu_profile(services: dict[str, Any]) -> None:
    assert services[GPU_SERVICE].get("profiles") == ["gpu"]
    for name in CPU_SERVICES:
        assert not services[name].get("profiles"), f"{name} must start without a profile"
    # anything that reserves a GPU or declares the GPU resource is gated by the profile
    for name, svc in services.items():
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {})
        wants_gpu = bool(devices.get("devices")) or option(command_of(svc), "--resources")
        if wants_gpu:
            assert "gpu" in svc.get("profiles", []), name


def test_gpu_worker_reserves_one_gpu_and_declares_it(services: dict[str, Any]) -> None:
    svc = services[GPU_SERVICE]
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    assert int(device.get("count", len(device.get("device_ids", [])))) == 1
    assert option(command_of(svc), "--resources") == "GPU=1"
    assert svc["build"]["dockerfile"].endswith("Dockerfile.cuda")


def test_compose_ports_match_defaults_and_bind_loopback(services: dict[str, Any]) -> None:
    expected = {
        "prefect-server": {PREFECT_API_PORT},
        "dask-scheduler": {DASK_SCHEDULER_PORT, DASK_DASHBOARD_PORT},
    }
    for name, svc in services.items():
        ports = published_ports(svc)
        assert {target for _, _, target in ports} == expected.get(name, set()), name
        for host_ip, published, target in ports:
            assert published == target, f"{name}: {published}->{target}"
            assert host_ip in LOOPBACK, f"{name} publishes {target} on {host_ip!r} by default"


def test_compose_commands(services: dict[str, Any]) -> None:
    scheduler = command_of(services["dask-scheduler"])
    assert scheduler[:2] == ["dask", "scheduler"]
    assert option(scheduler, "--port") in {None, str(DASK_SCHEDULER_PORT)}
    assert option(scheduler, "--dashboard-address") in {None, f":{DASK_DASHBOARD_PORT}"}

    address = f"tcp://dask-scheduler:{DASK_SCHEDULER_PORT}"
    for name in DASK_SERVICES:
        cmd = command_of(services[name])
        assert cmd[:3] == ["dask", "worker", address], name
        assert option(cmd, "--nworkers") == "1", name
        assert option(cmd, "--nthreads") == "1", name
        assert option(cmd, "--memory-limit"), name
    assert option(command_of(services["dask-worker"]), "--resources") is None

    replicas = services["dask-worker"]["deploy"]["replicas"]
    assert int(replicas) >= 1

    prefect_worker = command_of(services["prefect-worker"])
    assert prefect_worker[:3] == ["prefect", "worker", "start"]
    assert option(prefect_worker, "--pool") == WORK_POOL
    assert option(prefect_worker, "--type") == "process"

    server = command_of(services["prefect-server"])
    assert server[:3] == ["prefect", "server", "start"]
    assert option(server, "--port") in {None, str(PREFECT_API_PORT)}


def test_compose_prefect_wiring(services: dict[str, Any]) -> None:
    server_env = environment_of(services["prefect-server"])
    db_url = server_env["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert db_url and db_url.startswith("postgresql+asyncpg://")
    assert "@postgres:5432/" in db_url
    assert "postgres" in services["prefect-server"]["depends_on"]

    worker_env = environment_of(services["prefect-worker"])
    assert worker_env["PREFECT_API_URL"] == f"http://prefect-server:{PREFECT_API_PORT}/api"

    # Auth strings are pass-through (unset unless the operator sets them): an empty
    # string would switch basic auth on with an empty password.
    for name, key in (
        ("prefect-server", "PREFECT_SERVER_API_AUTH_STRING"),
        ("prefect-worker", "PREFECT_API_AUTH_STRING"),
    ):
        env = environment_of(services[name])
        if key in env:
            assert env[key] is None, f"{name}: {key} must not have a default value"


def test_compose_shared_volume(compose: dict[str, Any], services: dict[str, Any]) -> None:
    mounts: dict[str, set[tuple[str, str]]] = {}
    for name in DATA_SERVICES:
        found = set()
        for vol in services[name].get("volumes", []):
            if isinstance(vol, dict):
                found.add((vol["source"], vol["target"]))
            else:
                source, target = str(vol).split(":")[:2]
                found.add((source, target))
        mounts[name] = found
    shared = set.intersection(*mounts.values())
    assert shared, f"no volume mounted by all of {sorted(DATA_SERVICES)}: {mounts}"
    for source, _target in shared:
        assert source in (compose.get("volumes") or {}), f"volume {source} not declared"


def test_compose_healthchecks(services: dict[str, Any]) -> None:
    for name in CPU_SERVICES | {GPU_SERVICE}:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert f":{PREFECT_API_PORT}/api/health" in healthcheck_text(services["prefect-server"])
    assert f":{DASK_DASHBOARD_PORT}/health" in healthcheck_text(services["dask-scheduler"])
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in DASK_SERVICES | {"prefect-worker"}:
        dep = services[name]["depends_on"]["dask-scheduler"]
        assert dep["condition"] == "service_healthy", name


def test_compose_build_contexts_exist(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        build = svc.get("build")
        if not build:
            continue
        context = (COMPOSE_FILE.parent / build["context"]).resolve()
        assert context == REPO, f"{name}: build context must be the repository root"
        assert (context / build["dockerfile"]).is_file(), name


# --------------------------------------------------------------------------- Dockerfiles


def _dockerfile(name: str) -> str:
    return (DOCKER / name).read_text(encoding="utf-8")


def test_cpu_dockerfile() -> None:
    text = _dockerfile("Dockerfile")
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, re.M)
    assert "download.pytorch.org/whl/cpu" in text
    torch_at = text.index('"torch==${TORCH_VERSION}"')
    project_at = text.index("pip install --no-deps /app")
    assert torch_at < project_at, "CPU torch must be installed before the project"


def test_cuda_dockerfile() -> None:
    text = _dockerfile("Dockerfile.cuda")
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)$", text, re.M)
    assert base and base.group(1).startswith("nvidia/cuda:")
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}$", text, re.M)
    assert re.search(r"download\.pytorch\.org/whl/cu\d+", text)
    assert "[gpu]" in text
    assert text.index('TORCH_INDEX_URL}" "torch') < text.index("/app[gpu]")


# --------------------------------------------------------------------------- Kubernetes


def test_dask_cluster_manifest() -> None:
    docs = k8s_docs()
    clusters = [d for d in docs if d["kind"] == "DaskCluster"]
    groups = [d for d in docs if d["kind"] == "DaskWorkerGroup"]
    assert len(clusters) == 1
    cluster = clusters[0]
    for doc in clusters + groups:
        assert doc["apiVersion"] == "kubernetes.dask.org/v1"

    spec = cluster["spec"]
    service_ports = {p["port"] for p in spec["scheduler"]["service"]["ports"]}
    assert service_ports == {DASK_SCHEDULER_PORT, DASK_DASHBOARD_PORT}
    (scheduler,) = containers(spec["scheduler"])
    assert {p["containerPort"] for p in scheduler["ports"]} == service_ports
    assert scheduler["args"][:2] == ["dask", "scheduler"]

    (cpu_worker,) = containers(spec["worker"])
    assert cpu_worker["args"][:2] == ["dask", "worker"]
    assert "--resources" not in cpu_worker["args"]
    assert "nvidia.com/gpu" not in cpu_worker.get("resources", {}).get("limits", {})


def test_dask_gpu_worker_group() -> None:
    docs = k8s_docs()
    cluster_name = next(d for d in docs if d["kind"] == "DaskCluster")["metadata"]["name"]
    gpu_groups = []
    for group in (d for d in docs if d["kind"] == "DaskWorkerGroup"):
        assert group["spec"]["cluster"] == cluster_name
        for c in containers(group["spec"]["worker"]):
            limits = c.get("resources", {}).get("limits", {})
            if "nvidia.com/gpu" in limits:
                gpu_groups.append(group)
                assert int(limits["nvidia.com/gpu"]) == 1
                args = [str(a) for a in c["args"]]
                assert args[:2] == ["dask", "worker"]
                assert option(args, "--resources") == "GPU=1"
                assert option(args, "--nthreads") == "1"
    assert gpu_groups, "no DaskWorkerGroup requests nvidia.com/gpu"


def test_k8s_workers_share_a_rwx_claim() -> None:
    docs = k8s_docs()
    claims = {
        d["metadata"]["name"]: d
        for d in docs
        if d["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in d["spec"]["accessModes"]
    }
    pods = [d["spec"]["worker"] for d in docs if d["kind"] in {"DaskCluster", "DaskWorkerGroup"}]
    for pod in pods:
        used = {
            v["persistentVolumeClaim"]["claimName"]
            for v in pod["spec"].get("volumes", [])
            if "persistentVolumeClaim" in v
        }
        assert used & set(claims), "worker pods must mount a ReadWriteMany claim"


def test_dask_manifests_match_operator_crds() -> None:
    """Validate against the CRD schemas shipped in dask-kubernetes, when installed."""
    dask_kubernetes = pytest.importorskip("dask_kubernetes", reason="dask-kubernetes not installed")
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed")
    # generated CRDs (the ones under operator/customresources are templates)
    crd_dir = (
        Path(dask_kubernetes.__file__).parent
        / "operator/deployment/helm/dask-kubernetes-operator/crds"
    )
    schemas: dict[str, Any] = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        for doc in load_all(path):
            if doc.get("kind") == "CustomResourceDefinition":
                for version in doc["spec"]["versions"]:
                    if version["name"] == "v1" and "schema" in version:
                        schemas[doc["spec"]["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    if not {"DaskCluster", "DaskWorkerGroup"} <= set(schemas):
        pytest.skip(f"CRD schemas not found under {crd_dir}")

    def int_or_string(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("x-kubernetes-int-or-string"):
                node.pop("type", None)
                node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            for value in node.values():
                int_or_string(value)
        elif isinstance(node, list):
            for value in node:
                int_or_string(value)

    for doc in k8s_docs():
        if doc["kind"] in schemas:
            schema = schemas[doc["kind"]]
            int_or_string(schema)
            jsonschema.validate(doc, schema)


def test_prefect_worker_helm_values() -> None:
    (values,) = load_all(PREFECT_VALUES_FILE)
    worker = values["worker"]
    assert worker["config"]["workPool"] == WORK_POOL
    assert worker["config"]["type"] == "process"
    assert worker["apiConfig"] == "selfHostedServer"
    api_url = worker["selfHostedServerApiConfig"]["apiUrl"]
    assert re.fullmatch(rf"https?://[^/]+:{PREFECT_API_PORT}/api", api_url), api_url
    mounts = {m["name"] for m in worker.get("extraVolumeMounts", [])}
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in worker.get("extraVolumes", [])
        if "persistentVolumeClaim" in v
    }
    assert mounts & {v["name"] for v in worker.get("extraVolumes", [])}
    k8s_claims = {d["metadata"]["name"] for d in k8s_docs() if d["kind"] == "PersistentVolumeClaim"}
    assert claims <= k8s_claims, "the worker must mount the Dask workers' claim"


# --------------------------------------------------------------------------- SLURM


def test_sbatch_script_syntax() -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not installed")
    result = subprocess.run(
        [bash, "-n", str(SBATCH_FILE)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


def test_sbatch_script_content() -> None:
    text = SBATCH_FILE.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash\n")
    assert re.search(r"^#SBATCH --nodes=", text, re.M)
    assert re.search(r"^set -euo pipefail$", text, re.M)
    assert "dask scheduler" in text and "dask worker" in text
    assert text.count("srun") >= 2
    assert "--resources GPU=1" in text
    assert re.search(r"SCHEDULER_PORT=\"\$\{SCHEDULER_PORT:-(\d+)\}\"", text).group(1) == str(
        DASK_SCHEDULER_PORT
    )
    assert re.search(r"DASHBOARD_PORT=\"\$\{DASHBOARD_PORT:-(\d+)\}\"", text).group(1) == str(
        DASK_DASHBOARD_PORT
    )
    compress = re.search(r"^compressor compress .*?(?=\n\S|\Z)", text, re.M | re.S)
    assert compress, "the script must run `compressor compress`"
    assert "--scheduler" in compress.group(0)
    assert "--preset" in compress.group(0)


def test_jobqueue_example_compiles(tmp_path: Path) -> None:
    py_compile.compile(str(JOBQUEUE_FILE), cfile=str(tmp_path / "example.pyc"), doraise=True)


def test_jobqueue_example_content() -> None:
    tree = ast.parse(JOBQUEUE_FILE.read_text(encoding="utf-8"))
    constants = {
        t.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        for t in node.targets
        if isinstance(t, ast.Name)
    }
    assert constants["DASK_SCHEDULER_PORT"] == DASK_SCHEDULER_PORT
    assert constants["DASK_DASHBOARD_PORT"] == DASK_DASHBOARD_PORT
    calls = {
        node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
    }
    assert "SLURMCluster" in calls
    keywords = {
        kw.arg for node in ast.walk(tree) if isinstance(node, ast.Call) for kw in node.keywords
    }
    assert {"cores", "memory", "processes", "job_extra_directives"} <= keywords
    source = ast.unparse(tree)
    assert "scheduler_address" in source and "--gres=gpu:1" in source
    assert "GPU=1" in source


def test_jobqueue_example_job_script(tmp_path: Path) -> None:
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue not installed")
    result = subprocess.run(
        [
            sys.executable,
            str(JOBQUEUE_FILE),
            "--dry-run",
            "--gpu",
            "--scheduler-port",
            "0",
            "--dashboard-port",
            "0",
            "--log-directory",
            str(tmp_path / "logs"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --gres=gpu:1" in result.stdout
    assert "--resources GPU=1" in result.stdout
    assert "--nthreads 1" in result.stdout


# --------------------------------------------------------------------------- docker compose CLI


def _docker_compose() -> list[str]:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker binary not installed")
    try:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"`docker compose` not usable: {exc}")
    if probe.returncode != 0:
        reason = (probe.stderr or probe.stdout).strip().splitlines()[:1]
        pytest.skip(f"docker compose plugin not available: {reason}")
    return [docker, "compose", "-f", str(COMPOSE_FILE)]


def _run_compose(args: list[str]) -> subprocess.CompletedProcess[str]:
    # `config` only parses, interpolates and validates: it needs no Docker engine.
    env = {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "DOCKER_CONFIG"}}
    return subprocess.run(
        [*_docker_compose(), *args], capture_output=True, text=True, timeout=60, env=env
    )


@pytest.mark.parametrize("profiles", [[], ["--profile", "gpu"]], ids=["default", "gpu"])
def test_docker_compose_config_validates(profiles: list[str]) -> None:
    result = _run_compose([*profiles, "config", "-q"])
    assert result.returncode == 0, result.stderr


def test_docker_compose_profiles_select_services() -> None:
    default = _run_compose(["config", "--services"])
    assert default.returncode == 0, default.stderr
    assert set(default.stdout.split()) == CPU_SERVICES
    gpu = _run_compose(["--profile", "gpu", "config", "--services"])
    assert gpu.returncode == 0, gpu.stderr
    assert set(gpu.stdout.split()) == CPU_SERVICES | {GPU_SERVICE}


# --------------------------------------------------------------------------- docs


def test_operations_doc_covers_the_defaults() -> None:
    if not OPERATIONS_DOC.is_file():
        pytest.fail("docs/operations.md is missing")
    text = OPERATIONS_DOC.read_text(encoding="utf-8")
    for needle in (
        WORK_POOL,
        DEPLOYMENT_NAME,
        str(PREFECT_API_PORT),
        str(DASK_SCHEDULER_PORT),
        str(DASK_DASHBOARD_PORT),
        "PREFECT_SERVER_API_AUTH_STRING",
        "distributed.comm.tls",
        "s3://",
    ):
        assert needle in text, f"docs/operations.md does not mention {needle!r}"
