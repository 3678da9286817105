"""Real Prefect processes for the deployment tests: a server on loopback with its own PREFECT_HOME,
the environment an operator's shell would have, and a teardown that leaves no process behind.

Every wait is on a state (a health endpoint, a flow run's state) with a generous upper bound."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

SERVER_START_TIMEOUT = 150  # the local API takes 10–20 s here, more when the machine is busy
STOP_TIMEOUT = 30  # a worker whose server has gone retries for a while before it exits

PREFECT = Path(sys.executable).parent / "prefect"  # the CLI of the environment under test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prefect_env(home: Path, api: str | None) -> dict[str, str]:
    """This process's environment with Prefect pointed at `home` and `api` (no API URL: a server's
    own environment), analytics and the UI off, no Cloud key."""
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_KEY", None)
    env.pop("PREFECT_API_URL", None)
    if api is not None:
        env["PREFECT_API_URL"] = api
    return env


@contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """`prefect server start` on a free loopback port with its database under `home`; yields the
    API URL once /health answers, and stops the server (and its children) on exit."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    server = subprocess.Popen(
        [str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=prefect_env(home, None),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_healthy(api, server, SERVER_START_TIMEOUT)
        yield api
    finally:
        stop(server)


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


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process's group (it was started with start_new_session), then SIGKILL if it
    has not exited after STOP_TIMEOUT; descendants that left the group (a worker's flow-run
    process may get a session of its own) are terminated and killed the same way."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    alive = [p for p in descendants if p.is_running()]
    for p in alive:
        p.terminate()
    _, alive = psutil.wait_procs(alive, timeout=STOP_TIMEOUT)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=STOP_TIMEOUT)


def wait_final(
    client: Any, run_id: Any, timeout: float, check: Callable[[], None] | None = None
) -> Any:
    """Poll the API until flow run `run_id` is in a final state and return it; `check` runs on
    every poll (e.g. to fail at once when the process that should execute the run has died)."""
    deadline = time.monotonic() + timeout
    while True:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.is_final():
            return run
        if check is not None:
            check()
        assert time.monotonic() < deadline, f"run still {run.state} after {timeout} s"
        time.sleep(1)
