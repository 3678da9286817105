"""The pipeline against an existing cluster: `dask scheduler` and two `dask worker` processes
started with the real CLI on loopback, used through `compressor compress --scheduler`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compressor.testing.generate import LlamaShape, generate_llama_checkpoint

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wait_for_workers(address: str, n: int, timeout: float = 90) -> None:
    from distributed import Client

    with Client(address, timeout="30s") as client:
        client.wait_for_workers(n, timeout=timeout)


def test_compress_on_an_external_cluster(tmp_path: Path) -> None:
    source = generate_llama_checkpoint(
        tmp_path / "model", LlamaShape(hidden_size=256, intermediate_size=768), shard_mb=0.5
    )
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    bin_dir = Path(sys.executable).parent
    procs = [
        subprocess.Popen(
            [
                str(bin_dir / "dask"),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--dashboard-address",
                "127.0.0.1:0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    ]
    try:
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [
                        str(bin_dir / "dask"),
                        "worker",
                        address,
                        "--nthreads",
                        "1",
                        "--host",
                        "127.0.0.1",
                        "--dashboard-address",
                        "127.0.0.1:0",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        _wait_for_workers(address, 2)
        out = tmp_path / "out"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "compressor.cli",
                "compress",
                str(source),
                str(out),
                "--preset",
                "w4a16",
                "--scheduler",
                address,
                "--chunk-mb",
                "1",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["ratio"] > 2

        # The same job in-process (serial) writes the same bytes.
        serial = tmp_path / "serial"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "compressor.cli",
                "compress",
                str(source),
                str(serial),
                "--preset",
                "w4a16",
                "--workers",
                "0",
                "--chunk-mb",
                "1",
                "--quiet",
            ],
            check=True,
            timeout=300,
        )
        shards = sorted(p.name for p in out.glob("*.safetensors"))
        assert shards == sorted(p.name for p in serial.glob("*.safetensors"))
        for name in shards:
            assert _digest(out / name) == _digest(serial / name)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.1)
