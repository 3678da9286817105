"""Network exposure: what a run listens on, measured on the real CLI.

A run is held inside its compress stage (tests/reliability/_hold_cli.py), and the listening
sockets of the CLI process and all its children (the local workers, Prefect's temporary API
server) are read with psutil: every one must be on loopback unless `--listen` opens them. An
unreachable `--scheduler` fails at once with one message.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest

from compressor.testing.generate import LlamaShape, generate_llama_checkpoint
from tests.reliability._util import (
    compress_args,
    leftovers,
    release,
    run_cli,
    start_held_cli,
    wait_held,
)

LOOPBACK = {"127.0.0.1", "::1"}
TINY = LlamaShape(hidden_size=128, intermediate_size=256, num_hidden_layers=2, vocab_size=256)


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("network-src") / "llama"
    return generate_llama_checkpoint(root, TINY, dtype="BF16", shard_mb=1, seed=5)


class Listener(NamedTuple):
    pid: int
    command: str
    ip: str
    port: int


def _listening(pid: int) -> list[Listener]:
    """Every listening TCP socket of `pid` and its descendants."""
    root = psutil.Process(pid)
    found = []
    for process in [root, *root.children(recursive=True)]:
        try:
            command = " ".join(process.cmdline())
            connections = process.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        found += [
            Listener(process.pid, command, c.laddr.ip, c.laddr.port)
            for c in connections
            if c.status == psutil.CONN_LISTEN
        ]
    return found


def _sockets_of_held_run(src: Path, tmp_path: Path, *options: str, **env: str) -> list[Listener]:
    """The listening sockets of a compress run while it is inside its compress stage; the run
    is then let go and must succeed."""
    dest, hold = tmp_path / "out", tmp_path / "hold"
    proc = start_held_cli(
        compress_args(src, dest, "--chunk-mb", "1", *options), hold, extra_env=env
    )
    try:
        wait_held(proc, hold)
        sockets = _listening(proc.pid)
        release(hold)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (dest / "manifest.json").is_file()
    return sockets


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_local_cluster_listens_on_loopback_only(tiny_src: Path, tmp_path: Path, kind: str) -> None:
    sockets = _sockets_of_held_run(tiny_src, tmp_path, "--workers", "2", "--worker-kind", kind)
    assert sockets, "nothing listened: the cluster was not measured"
    exposed = [s for s in sockets if s.ip not in LOOPBACK]
    assert not exposed, f"listening beyond loopback: {exposed}"
    if kind == "processes":  # the worker processes were measured too, not only the CLI's
        assert len({s.pid for s in sockets}) >= 3, sockets


@pytest.mark.slow
def test_prefect_run_listens_on_loopback_only(tiny_src: Path, tmp_path: Path) -> None:
    """`--prefect` without PREFECT_API_URL: Prefect's temporary API server (a uvicorn child) and
    the local cluster, all on loopback."""
    sockets = _sockets_of_held_run(
        tiny_src,
        tmp_path,
        "--prefect",
        "--workers",
        "2",
        PREFECT_HOME=str(tmp_path / "prefect-home"),  # a throwaway database
    )
    server = [s for s in sockets if "uvicorn" in s.command]
    assert server, f"Prefect's temporary API server was not found: {sockets}"
    exposed = [s for s in sockets if s.ip not in LOOPBACK]
    assert not exposed, f"listening beyond loopback: {exposed}"


@pytest.mark.slow
def test_listen_opens_the_cluster_on_purpose(tiny_src: Path, tmp_path: Path) -> None:
    sockets = _sockets_of_held_run(
        tiny_src, tmp_path, "--workers", "2", "--worker-kind", "threads", "--listen", "0.0.0.0"
    )
    assert sockets and all(s.ip == "0.0.0.0" for s in sockets), sockets


def test_listen_and_dashboard_reach_the_config(tiny_src: Path, tmp_path: Path) -> None:
    from compressor.config import RunConfig, build_config

    assert RunConfig(source="s", destination="d").listen == "127.0.0.1"
    assert not RunConfig(source="s", destination="d").dashboard
    config = build_config(str(tiny_src), str(tmp_path / "o"), listen="0.0.0.0", dashboard=True)
    assert (config.listen, config.dashboard) == ("0.0.0.0", True)
    refused = run_cli(compress_args(tiny_src, tmp_path / "out", "--listen", "tcp://0.0.0.0:1"))
    assert refused.returncode == 2
    assert "listen" in refused.stderr and "not an interface" in refused.stderr
    assert "Traceback" not in refused.stderr


def _closed_port() -> int:
    """A loopback port nothing listens on: bound by us, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:{port}", "127.0.0.1:{port}"])
def test_unreachable_scheduler_is_one_message(tiny_src: Path, tmp_path: Path, address: str) -> None:
    address = address.format(port=_closed_port())
    dest = tmp_path / "out"
    # Without the check, distributed retries the refused connection for its 30 s timeout and
    # then raises: the subprocess timeout bounds the test, the assertions do not time anything.
    done = run_cli(compress_args(tiny_src, dest, "--scheduler", address), timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2, done.stderr
    assert lines[0].startswith("error: ") and f"Dask scheduler at {address}" in lines[0]
    assert "Connection refused" in lines[0]
    assert lines[1].lstrip().startswith("fix:") and "--scheduler" in lines[1]
    assert not dest.exists() and leftovers(dest) == []
