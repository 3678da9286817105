"""Faults, with real processes: a Dask worker killed mid-stage, the whole run killed and resumed,
SIGTERM/SIGINT stops, the input changed between a crash and the rerun, a full or size-limited
destination, and two runs to one destination at once.

Every run is the real CLI (`python -m compressor.cli compress`) in its own process group; results
are compared byte for byte with a clean serial run of the same command. A run a test interrupts
is held inside its compress stage first (`start_held_cli`, tests/reliability/_hold_cli.py): each
of its processes stops after a known number of finished chunks until the test releases it, so the
test acts on a run it knows is mid-stage, however fast or loaded the machine (waiting for markers
to appear and then signalling raced a run that finishes its stage in under a second).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from compressor.config import build_config
from compressor.formats.safetensors_io import read_header
from compressor.formats.verify import verify_checkpoint
from compressor.stages.assemble import STAGE as ASSEMBLED
from compressor.stages.plan import make_plan
from compressor.testing.generate import LlamaShape, generate_llama_checkpoint
from tests.reliability._util import (
    assert_same_output,
    cli_env,
    compress_args,
    kill_run,
    leftovers,
    markers,
    one_line,
    release,
    run_cli,
    start_held_cli,
    wait_held,
    worker_processes,
)

# ~50 MB of bf16 weights cut into 1 MB chunks: about 70 chunks per stage, so a stage lasts long
# enough to be interrupted in the middle, and the checkpoint has several input shards.
BIG = LlamaShape(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, vocab_size=1024)
SMALL = LlamaShape(hidden_size=256, intermediate_size=768, num_hidden_layers=2, vocab_size=1024)
OPTIONS = ("--chunk-mb", "1")
CHANGED = "model.layers.1.mlp.down_proj"  # the module whose input weight a test doubles


@pytest.fixture(scope="module")
def big_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults-src") / "llama"
    return generate_llama_checkpoint(root, BIG, dtype="BF16", shard_mb=16, seed=3)


@pytest.fixture(scope="module")
def small_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults-small") / "llama"
    return generate_llama_checkpoint(root, SMALL, dtype="BF16", shard_mb=1, seed=4)


def _chunks(source: Path, *options: str) -> int:
    """How many chunks each stage has (the number of completion markers a full run leaves)."""
    chunk_mb = int(options[1]) if options else 32
    config = build_config(str(source), str(source.parent / "nowhere"), chunk_mb=chunk_mb)
    return make_plan(config).chunk_count


@pytest.fixture(scope="module")
def reference(big_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean serial run of the same command: what every interrupted run must reproduce."""
    dest = tmp_path_factory.mktemp("faults-ref") / "out"
    done = run_cli(compress_args(big_src, dest, "--workers", "0", *OPTIONS))
    assert done.returncode == 0, done.stderr
    assert verify_checkpoint(dest).ok
    return dest


def _kill_group(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)


def _load(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _double_in_place(src: Path, name: str) -> None:
    """Multiply one bf16 tensor by 2 inside its shard (header unchanged, so only the shard's
    mtime tells the change): exact in bf16, so its scales double and its codes stay."""
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    shard = src / weight_map[name]
    info = read_header(shard).tensors[name]
    with open(shard, "r+b") as f:
        f.seek(info.start)
        raw = bytearray(f.read(info.nbytes))
        doubled = torch.frombuffer(raw, dtype=torch.bfloat16) * 2
        f.seek(info.start)
        f.write(doubled.view(torch.int16).numpy().tobytes())


# -- a worker dies ----------------------------------------------------------------------------
@pytest.mark.slow
def test_worker_killed_mid_stage(big_src: Path, reference: Path, tmp_path: Path) -> None:
    total = _chunks(big_src, *OPTIONS)
    dest, hold = tmp_path / "out", tmp_path / "hold"
    # Worker processes (the default for this preset is threads, which cannot die alone); each
    # waits after its second compressed chunk, so at most 4 of ~70 are done at the kill.
    args = compress_args(big_src, dest, "--workers", "2", "--worker-kind", "processes", *OPTIONS)
    proc = start_held_cli(args, hold, stage=ASSEMBLED, after=2)
    try:
        victim_pid = wait_held(proc, hold)[0]  # a worker inside a compress task
        workers = worker_processes(proc.pid)
        assert len(workers) == 2, workers
        (victim,) = [w for w in workers if w.pid == victim_pid]
        done_at_kill = len(markers(dest, ASSEMBLED))
        victim.send_signal(signal.SIGKILL)
        release(hold)  # the other worker, and the one the nanny starts instead, go on
        _, err = proc.communicate(timeout=300)
    finally:
        _kill_group(proc)
    assert 0 < done_at_kill < total
    assert proc.returncode == 0, err
    assert not victim.is_running()
    assert_same_output(reference, dest)
    assert leftovers(dest) == []


# -- the whole run dies, then resumes ---------------------------------------------------------
@pytest.mark.slow
def test_run_killed_then_resumed(big_src: Path, reference: Path, tmp_path: Path) -> None:
    total = _chunks(big_src, *OPTIONS)
    dest, hold = tmp_path / "out", tmp_path / "hold"
    # --keep-staging on both runs (the same command twice) so the markers can be inspected.
    args = compress_args(big_src, dest, "--workers", "2", "--keep-staging", *OPTIONS)
    proc = start_held_cli(args, hold, stage=ASSEMBLED, after=3)  # never released
    try:
        wait_held(proc, hold)
        kill_run(proc)
    finally:
        _kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not dest.exists()
    compressed, ingested = markers(dest, ASSEMBLED), markers(dest, "ingest")
    assert 0 < len(compressed) < total, (len(compressed), total)

    done = run_cli(args)
    assert done.returncode == 0, done.stderr
    compressed_after, ingested_after = markers(dest, ASSEMBLED), markers(dest, "ingest")
    assert len(compressed_after) == total
    assert len(ingested_after) in (0, total)  # channel/group presets skip ingest entirely
    # Finished chunks were not recomputed: their markers (written after the chunk's data) are
    # untouched, same mtime and same recorded result; only the missing ones were added.
    assert {k: compressed_after[k] for k in compressed} == compressed
    assert {k: ingested_after[k] for k in ingested} == ingested
    recomputed = set(compressed_after) - set(compressed)
    assert len(recomputed) == total - len(compressed)
    assert_same_output(reference, dest)
    assert verify_checkpoint(dest).ok


# -- SIGTERM: a clean stop; then the input changes before the rerun ---------------------------
@pytest.mark.slow
def test_sigterm_stops_cleanly_and_changed_input_restarts(
    big_src: Path, reference: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    shutil.copytree(big_src, src)
    dest, hold = tmp_path / "out", tmp_path / "hold"
    # Worker processes, so the test can check that none outlives the CLI.
    args = compress_args(src, dest, "--workers", "2", "--worker-kind", "processes", *OPTIONS)
    proc = start_held_cli(args, hold, stage=ASSEMBLED, after=2)  # never released
    try:
        wait_held(proc, hold)
        workers = worker_processes(proc.pid)
        assert workers
        proc.send_signal(signal.SIGTERM)  # the CLI only, as a scheduler or `kill` would
        _, err = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    assert proc.returncode == 143, err
    assert "stopped: nothing was published" in one_line(err)
    # No traceback of ours. (A worker busy in a task may still log Dask's "Failed to
    # communicate with scheduler during heartbeat" when the scheduler closes before it.)
    assert "KeyboardInterrupt" not in err and "_Terminated" not in err
    assert "compressor/" not in err, err
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, "the local cluster's workers outlived the CLI"
    assert not dest.exists()
    assert leftovers(dest) == [".out.staging"]  # staging kept for a resume; no lock, no partial
    old_keys = {p.name for p in (tmp_path / ".out.staging").iterdir()}
    assert len(old_keys) == 1 and markers(dest, ASSEMBLED)

    # The input changes before the rerun: the fingerprint (shard mtime) changes, so the run key
    # and the staging store are new; the stale store must not be used, and is removed at the end.
    _double_in_place(src, f"{CHANGED}.weight")
    done = run_cli(args)
    assert done.returncode == 0, done.stderr
    assert leftovers(dest) == []
    report = json.loads((dest / "compression.json").read_text())
    assert report["run_key"] not in old_keys
    expected, actual = _load(reference), _load(dest)
    assert sorted(expected) == sorted(actual)
    for name, value in expected.items():
        want = value * 2 if name == f"{CHANGED}.weight_scale" else value
        assert torch.equal(actual[name], want), name
    assert verify_checkpoint(dest).ok


# -- SIGINT, and a second run to the same destination -----------------------------------------
def test_second_run_refused_then_sigint_stops(big_src: Path, tmp_path: Path) -> None:
    dest, hold = tmp_path / "out", tmp_path / "hold"
    args = compress_args(big_src, dest, "--workers", "0", *OPTIONS)
    # The first run (serial: in the CLI process) waits after its first chunk, holding the lock,
    # until the SIGINT: never released, so it cannot finish before the second run meets it.
    first = start_held_cli(args, hold)
    try:
        assert wait_held(first, hold) == [first.pid]
        assert first.poll() is None and not dest.exists()
        lock = tmp_path / ".out.lock"
        assert lock.read_text().endswith(f":{first.pid}")
        second = run_cli(args)
        assert second.returncode == 3, second.stderr
        message = one_line(second.stderr)
        assert "another run" in message and f":{first.pid}" in message and "fix:" in message
        assert lock.read_text().endswith(f":{first.pid}")  # the refused run left the lock alone

        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        _kill_group(first)
    assert first.returncode == 130, err
    assert "stopped: nothing was published" in one_line(err)
    assert not dest.exists()
    assert leftovers(dest) == [".out.staging"]  # kept for a resume; lock released


# -- the destination's disk is full or the file size limited ----------------------------------
def _can_mount_tmpfs() -> list[str] | None:
    """The unshare prefix that lets this user mount a private tmpfs, or None."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "--mount"], ["unshare", "--map-root-user", "--mount"]):
        probe = subprocess.run(
            [
                *prefix,
                "sh",
                "-c",
                'd=$(mktemp -d) && mount -t tmpfs tmpfs "$d"; r=$?; umount "$d"; rmdir "$d"; exit $r',
            ],
            capture_output=True,
        )
        if probe.returncode == 0:
            return prefix
    return None


def test_disk_full_on_destination(small_src: Path, tmp_path: Path) -> None:
    prefix = _can_mount_tmpfs()
    if prefix is None:
        pytest.skip("cannot mount a tmpfs here (needs root or user namespaces)")
    mnt, staging, listing = tmp_path / "mnt", tmp_path / "staging", tmp_path / "listing"
    mnt.mkdir()
    # The destination's directory is a 256 KB tmpfs in a private mount namespace: the lock and
    # the temporary directory fit, the first output shard does not. Staging is on normal disk.
    script = (
        'mount -t tmpfs -o size=256k tmpfs "$1" || exit 97\n'
        '"$2" -m compressor.cli compress "$3" "$1/out" --workers 0 --quiet --staging "$4"\n'
        'rc=$?; find "$1" -mindepth 1 -printf "%y %P\\n" > "$5"; exit $rc\n'
    )
    positional = [str(mnt), sys.executable, str(small_src), str(staging), str(listing)]
    done = subprocess.run(
        [*prefix, "sh", "-c", script, "sh", *positional],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
    )
    if done.returncode == 97:
        pytest.skip("mounting a tmpfs is not permitted here")
    message = one_line(done.stderr)
    assert done.returncode == 3, message
    assert "No space left on device" in message and "fix:" in message, message
    assert "Traceback" not in done.stderr
    entries = listing.read_text().split("\n")
    assert not any(e.endswith(" out") for e in entries), entries  # nothing published
    assert not [e for e in entries if e.startswith("f ")], entries  # no bytes left behind
    # Staging kept: every chunk is compressed and recorded, ready for a rerun.
    (key,) = list(staging.iterdir())
    assert len(list((key / "done" / ASSEMBLED).glob("*.json"))) == _chunks(small_src)


def test_file_size_limit_then_resume(small_src: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    args = compress_args(small_src, dest, "--workers", "0", "--keep-staging")
    limit = 1 << 20  # bigger than any staging chunk, smaller than the output shard

    def limit_file_size() -> None:  # SIGXFSZ is ignored by Python: writes fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    failed = run_cli(args, preexec_fn=limit_file_size)
    message = one_line(failed.stderr)
    assert failed.returncode == 3, message
    assert "File too large" in message and "fix:" in message, message
    assert not dest.exists()
    # The shard files are reserved in full before compress: it fails before any chunk is done.
    assert markers(dest, ASSEMBLED) == {}

    done = run_cli(args)
    assert done.returncode == 0, done.stderr
    assert len(markers(dest, ASSEMBLED)) == _chunks(small_src)
    assert verify_checkpoint(dest).ok
    assert leftovers(dest) == [".out.staging"]  # --keep-staging; the failed run's .partial is gone
