"""A run is bound to the exact bytes it read (issue 14, item 1).

- an input written while a run is in flight is never published (mixed old/new tensors);
- an input edited in place with its size and mtime restored gets a new run key, so a rerun over
  the kept staging cannot publish the old values;
- every option that changes the output bytes is in the run key (--max-shard-mb);
- the manifest records the sha256 of every input file; `verify --source` proves the output came
  from an input, and fails on another one.

The in-flight cases drive the pipeline's stage methods in this process, so the write lands
exactly between two stages: no timing, no race.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import compressor
from compressor.config import build_config
from compressor.pipeline import Pipeline
from compressor.stages.digest import SourceChanged
from compressor.stages.executor import SerialExecutor
from compressor.testing.generate import LlamaShape, generate_llama_checkpoint
from tests.reliability._util import cli_env, compress_args, leftovers, one_line, run_cli

SHAPE = LlamaShape(hidden_size=256, intermediate_size=512, num_hidden_layers=2, vocab_size=1024)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = generate_llama_checkpoint(tmp_path / "src", SHAPE, shard_mb=0.5, seed=3)
    assert len(_shards(root)) >= 2
    return root


def _shards(root: Path) -> list[Path]:
    return sorted(root.glob("*.safetensors"))


def _flip_tail(shard: Path, keep_times: bool = False) -> None:
    """Rewrite the last bytes of a shard in place (they belong to a tensor, not the header)."""
    st = shard.stat()
    with open(shard, "r+b") as f:
        f.seek(-16, os.SEEK_END)
        old = f.read(16)
        f.seek(-16, os.SEEK_END)
        f.write(bytes(b ^ 0x5A for b in old))
    if keep_times:  # what `touch -d` or an rsync -t would do: same size, same mtime
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))


def _pipeline(src: Path, dst: Path, **options: object) -> Pipeline:
    return Pipeline(build_config(str(src), str(dst), preset="w4a16", workers=0, **options))


def _through_compress(pipe: Pipeline) -> SerialExecutor:
    executor = SerialExecutor()
    pipe.make_plan()
    pipe.ingest(executor)
    pipe.stats(executor)
    pipe.thresholds()
    return executor


def test_input_written_after_it_was_digested_is_not_published(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    pipe = _pipeline(src, dst)
    executor = _through_compress(pipe)
    pipe.compress(executor)  # chunks and digests read the original bytes
    pipe.write(executor)
    _flip_tail(_shards(src)[-1])  # then the input changes before publishing
    with pytest.raises(SourceChanged) as raised:
        pipe.publish()
    assert _shards(src)[-1].name in str(raised.value)
    assert not dst.exists()
    assert not [n for n in leftovers(dst) if ".partial-" in n]  # no mixed output lingers


def test_input_written_before_it_was_digested_stops_the_digest(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    pipe = _pipeline(src, dst)
    executor = _through_compress(pipe)
    _flip_tail(_shards(src)[0], keep_times=True)  # after the plan's stamp, same size and mtime
    with pytest.raises(SourceChanged):
        pipe.compress(executor)
    assert not dst.exists()


def test_edit_with_size_and_mtime_restored_is_a_new_input(src: Path, tmp_path: Path) -> None:
    """Rerun over the kept staging after an in-place edit that keeps size and mtime: the output
    is the new input's (byte-identical to a fresh run on it), never the old one's."""
    dst = tmp_path / "out"
    first = run_cli(compress_args(src, dst, "--workers", "0", "--keep-staging"))
    assert first.returncode == 0, first.stderr
    old_key = json.loads((dst / "compression.json").read_text())["run_key"]
    shard = _shards(src)[-1]
    _flip_tail(shard, keep_times=True)
    rerun = run_cli(compress_args(src, dst, "--workers", "0", "--overwrite"))
    assert rerun.returncode == 0, rerun.stderr
    assert "up to date" not in rerun.stdout + rerun.stderr
    assert json.loads((dst / "compression.json").read_text())["run_key"] != old_key

    fresh_src = tmp_path / "fresh-src"
    shutil.copytree(src, fresh_src)
    fresh = tmp_path / "fresh"
    done = run_cli(compress_args(fresh_src, fresh, "--workers", "0"))
    assert done.returncode == 0, done.stderr
    for out_shard in _shards(fresh):
        assert (dst / out_shard.name).read_bytes() == out_shard.read_bytes()
    recorded = json.loads((dst / "manifest.json").read_text())["source"]["files"]
    assert recorded[shard.name]["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()


def test_shard_size_is_part_of_the_run_key(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    assert run_cli(compress_args(src, dst, "--workers", "0")).returncode == 0
    assert len(_shards(dst)) == 1
    again = run_cli(compress_args(src, dst, "--workers", "0", "--max-shard-mb", "1"))
    assert again.returncode != 0  # another output: not "up to date", and no --overwrite
    assert "already exists" in one_line(again.stderr)
    redone = run_cli(
        compress_args(src, dst, "--workers", "0", "--max-shard-mb", "1", "--overwrite")
    )
    assert redone.returncode == 0, redone.stderr
    assert len(_shards(dst)) > 1


def test_manifest_records_every_input_file_and_verify_source_proves_it(
    src: Path, tmp_path: Path
) -> None:
    dst = tmp_path / "out"
    assert run_cli(compress_args(src, dst, "--workers", "0")).returncode == 0
    source = json.loads((dst / "manifest.json").read_text())["source"]
    assert source["location"] == str(src.resolve())
    expected = {
        p.relative_to(src).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in src.rglob("*")
        if p.is_file()
    }
    assert {n: e["sha256"] for n, e in source["files"].items()} == expected

    ok = run_cli([*compress_args(src, dst)[:3], "verify", str(dst), "--source", str(src)])
    assert ok.returncode == 0, ok.stderr
    assert f"{len(expected)} input files match" in ok.stdout

    other = tmp_path / "other"
    shutil.copytree(src, other)
    _flip_tail(_shards(other)[0])
    bad = run_cli([*compress_args(src, dst)[:3], "verify", str(dst), "--source", str(other)])
    assert bad.returncode == 1
    assert _shards(other)[0].name in bad.stderr
    assert "was not made from" in one_line(bad.stderr)
    assert "Traceback" not in bad.stderr

    (other / "extra.txt").write_text("not read by the run")
    _flip_tail(_shards(other)[0])  # back to the original bytes: only the extra file differs
    extra = run_cli([*compress_args(src, dst)[:3], "verify", str(dst), "--source", str(other)])
    assert extra.returncode == 1
    assert "extra.txt" in extra.stderr


def test_other_code_neither_reuses_nor_resumes_an_output(src: Path, tmp_path: Path) -> None:
    """The run key holds a digest of the compressor package's code (a change to the math can
    change the bytes with no new version or option): the same command that the same code finds
    up to date, a changed copy of the package refuses without --overwrite (another output) and
    makes under a key of its own."""
    dst = tmp_path / "out"
    args = compress_args(src, dst, "--workers", "0", "--keep-staging")
    first = run_cli(args)
    assert first.returncode == 0, first.stderr
    old_key = json.loads((dst / "compression.json").read_text())["run_key"]
    same = run_cli(args)  # the same code: up to date, so no --overwrite is needed
    assert same.returncode == 0, same.stderr

    code = tmp_path / "code"
    shutil.copytree(
        Path(compressor.__file__).parent,
        code / "compressor",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    with (code / "compressor" / "math" / "rounding.py").open("a") as f:
        f.write("\n# another build of the same version\n")
    env = cli_env(PYTHONPATH=str(code))
    where = [args[0], "-c", "import compressor; print(compressor.__file__)"]
    shown = subprocess.run(where, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert shown.stdout.strip() == str(code / "compressor" / "__init__.py"), shown.stderr

    other = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert other.returncode != 0  # another output: not "up to date", and no --overwrite
    assert "already exists" in one_line(other.stderr)
    redone = subprocess.run(
        [*args, "--overwrite"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert redone.returncode == 0, redone.stderr
    assert json.loads((dst / "compression.json").read_text())["run_key"] != old_key
