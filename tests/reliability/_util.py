"""Helpers for the reliability tests: run the real CLI as a subprocess, hash trees, find the
processes and staging markers of a running compression, compare two outputs byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

CLI = [sys.executable, "-m", "compressor.cli"]
# Files whose bytes legitimately differ between two runs with the same output: timings and the
# resolved config (worker count) in our report, and the manifest's line for that report.
RUN_SPECIFIC = ("compression.json", "manifest.json")


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)  # never talk to a Prefect server from these tests
    env.update(
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # One torch thread per process: on a busy 2-core machine oversubscribed intra-op threads
        # make a serial run 10x slower; results do not depend on it.
        OMP_NUM_THREADS="1",
        PYTHONDONTWRITEBYTECODE="1",
        COLUMNS="400",  # rich wraps stderr at the terminal width; keep messages on one line
        NO_COLOR="1",
        TERM="dumb",
    )
    env.update(extra)
    return env


def compress_args(source: Path, destination: Path, *options: str) -> list[str]:
    return [*CLI, "compress", str(source), str(destination), "--quiet", *options]


def run_cli(
    args: Sequence[str], timeout: float = 300, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, env=cli_env(), timeout=timeout, **kwargs
    )


def start_cli(args: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
    """The CLI in its own session (process group), so a test can kill it and its workers."""
    return subprocess.Popen(
        list(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        start_new_session=True,
        **kwargs,
    )


def one_line(text: str) -> str:
    return " ".join(text.split())


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (hidden ones included), by relative path."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def wait_for(condition: Callable[[], Any], timeout: float, what: str, poll: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def markers(destination: Path, stage: str) -> dict[str, tuple[int, bytes]]:
    """Completion markers of the default staging store beside `destination`:
    relative path → (mtime_ns, content)."""
    root = destination.parent / f".{destination.name}.staging"
    out = {}
    for path in root.glob(f"*/done/{stage}/*.json"):
        try:
            out[path.relative_to(root).as_posix()] = (path.stat().st_mtime_ns, path.read_bytes())
        except FileNotFoundError:  # pragma: no cover - replaced between glob and stat
            continue
    return out


def worker_processes(pid: int) -> list[psutil.Process]:
    """The Dask worker processes a CLI run started (multiprocessing spawn children)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def assert_same_output(expected: Path, actual: Path) -> None:
    """Every file byte-identical except our run-specific report; same per-tensor figures."""
    a, b = tree_digest(expected), tree_digest(actual)
    assert sorted(a) == sorted(b)
    differing = [rel for rel in a if a[rel] != b[rel] and rel not in RUN_SPECIFIC]
    assert not differing, f"files differ from the clean run: {differing}"
    ra = json.loads((expected / "compression.json").read_text())
    rb = json.loads((actual / "compression.json").read_text())
    for key in ("run_key", "input_fingerprint", "tensors", "totals", "version"):
        assert ra[key] == rb[key], key
    ma = json.loads((expected / "manifest.json").read_text())["files"]
    mb = json.loads((actual / "manifest.json").read_text())["files"]
    ma.pop("compression.json")
    mb.pop("compression.json")
    assert ma == mb


def leftovers(destination: Path) -> list[str]:
    """Entries beside `destination` that a run leaves (.partial, .staging, .lock, .old)."""
    prefix = f".{destination.name}."
    return sorted(p.name for p in destination.parent.iterdir() if p.name.startswith(prefix))


def write_raw_safetensors(path: Path, header: dict[str, Any] | bytes, data: bytes = b"") -> None:
    """A safetensors file with exactly this header (dict → compact JSON) and data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    if not isinstance(header, bytes):
        text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


# A run held inside a stage (tests/reliability/_hold_cli.py): the test acts on a state it has
# waited for, never on a run it hopes is still going.
HOLD_CLI = [sys.executable, str(Path(__file__).with_name("_hold_cli.py"))]


def start_held_cli(
    args: Sequence[str],
    hold: Path,
    stage: str = "",
    after: int = 1,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    """`start_cli(args)` (args as for run_cli, starting with CLI) through _hold_cli.py: each
    process of the run waits once it has finished `after` chunks of `stage` (any stage if ""),
    until `hold`/release exists; `held(hold)` lists the processes waiting."""
    assert list(args[: len(CLI)]) == CLI, args
    hold.mkdir(parents=True, exist_ok=True)
    env = cli_env(
        COMPRESSOR_TEST_HOLD_DIR=str(hold),
        COMPRESSOR_TEST_HOLD_STAGE=stage,
        COMPRESSOR_TEST_HOLD_AFTER=str(after),
        **(extra_env or {}),
    )
    return subprocess.Popen(
        [*HOLD_CLI, *args[len(CLI) :]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def held(hold: Path) -> list[int]:
    """The pids of the processes of a held run that are waiting (see start_held_cli)."""
    return sorted(int(p.name.split("-", 1)[1]) for p in hold.glob("held-*"))


def release(hold: Path) -> None:
    (hold / "release").touch()


def wait_held(proc: subprocess.Popen[str], hold: Path, timeout: float = 300) -> list[int]:
    """Wait until some process of the run is held (failing early, with its stderr, if the run
    ends first); the held pids."""
    wait_for(
        lambda: held(hold) or proc.poll() is not None, timeout=timeout, what="the run to be held"
    )
    if not held(hold):
        _, err = proc.communicate()
        raise AssertionError(f"the run ended (exit {proc.returncode}) before it was held: {err}")
    return held(hold)


def kill_run(proc: subprocess.Popen[str]) -> None:
    """SIGKILL a run's whole process group at once (the CLI, the cluster, its workers) and
    wait until every one of them is gone."""
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, alive
