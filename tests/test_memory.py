"""Memory stays flat when the checkpoint grows: the pipeline streams chunks, never whole shards.

Two checkpoints, the second with twice the layers (~60 MB and ~120 MB of bf16, tensors of 2-4 MB),
are compressed by the real console script with two Dask workers, as threads of the CLI (the
default for this preset) and as worker processes; the resident memory of every process in the
tree (client and workers) is sampled every 50 ms.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from compressor.testing.generate import LlamaShape, generate_llama_checkpoint

pytestmark = pytest.mark.slow

SCRIPT = Path(sys.executable).with_name("compressor")
SLACK_BYTES = 60 * 2**20


def _peak_rss(args: list[str]) -> tuple[int, int, dict[int, int]]:
    """Run a command; return (exit code, largest single-process peak RSS, peak per pid)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    root = psutil.Process(proc.pid)
    peaks: dict[int, int] = {}
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in tree:
            try:
                rss = p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            peaks[p.pid] = max(peaks.get(p.pid, 0), rss)
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    _, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    return proc.returncode, max(peaks.values()), peaks


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_peak_memory_does_not_grow_with_checkpoint_size(tmp_path, kind):
    base = {
        "hidden_size": 1024,
        "intermediate_size": 2048,
        "vocab_size": 1024,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    }
    command = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "compressor.cli"]
    results = {}
    for layers in (3, 6):
        src = generate_llama_checkpoint(
            tmp_path / f"src{layers}", LlamaShape(num_hidden_layers=layers, **base), shard_mb=16
        )
        size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        dest = tmp_path / f"out{layers}"
        _, peak, peaks = _peak_rss(
            [
                *command,
                "compress",
                str(src),
                str(dest),
                "--preset",
                "w4a16",
                "--workers",
                "2",
                "--worker-kind",
                kind,
                "--chunk-mb",
                "4",
                "--quiet",
            ]
        )
        assert (dest / "config.json").is_file()
        # The client and two worker processes were sampled (threads: the client alone).
        assert len(peaks) >= (3 if kind == "processes" else 1)
        results[layers] = (size, peak)
        print(
            f"{layers} layers: input {size / 2**20:.0f} MB, largest process peak RSS "
            f"{peak / 2**20:.0f} MB over {len(peaks)} processes"
        )
    (small_size, small_peak), (big_size, big_peak) = results[3], results[6]
    assert big_size > 1.8 * small_size
    assert big_peak <= 1.3 * small_peak + SLACK_BYTES, (small_peak, big_peak)
