"""Paths: a run never writes where it reads, and reads the layouts users have.

Every case runs the real CLI on real files. A refused case must exit non-zero before any work
with one message whose first line names the path, no traceback, and leave its whole directory
(inputs included) byte-identical. Accepted layouts (a Hugging Face hub-cache snapshot, shards
in subfolders with equal names) must compress end to end into an output that verifies.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors import safe_open

from compressor.config import build_config
from compressor.formats.checkpoint import INDEX_NAME, open_checkpoint
from compressor.pipeline import compress_checkpoint
from compressor.testing.generate import LlamaShape, generate_llama_checkpoint
from tests.reliability._util import CLI, compress_args, one_line, run_cli, tree_digest

_SHAPE = LlamaShape(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=1,
    num_key_value_heads=1,
    vocab_size=128,
)
FIRST = "model-00001-of-00004.safetensors"


def _source(path: Path) -> Path:
    """A tiny four-shard checkpoint with an index, config.json and generation_config.json."""
    generate_llama_checkpoint(path, _SHAPE, shard_mb=0.05, seed=1)
    assert (path / FIRST).is_file() and (path / INDEX_NAME).is_file()
    return path


@dataclass(frozen=True)
class Refusal:
    """A run that must be refused up front: `build(case_dir)` makes the files and returns the
    CLI arguments (after `python -m compressor.cli`), the path the message must name (relative
    to the case directory) and a phrase it must hold."""

    build: Callable[[Path], tuple[list[str], str, str]]


def _compress(*args: str) -> list[str]:
    return ["compress", *args, "--workers", "0", "--quiet"]


def _compressed(d: Path) -> Path:
    """A compressed checkpoint `q` (in process: faster than one more CLI start-up)."""
    _source(d / "src")
    compress_checkpoint(build_config(str(d / "src"), str(d / "q"), workers=0))
    shutil.rmtree(d / "src")
    return d / "q"


def _hard_linked(d: Path) -> tuple[list[str], str, str]:
    _source(d / "src")
    (d / "out").mkdir()
    os.link(d / "src" / FIRST, d / "out" / "old.safetensors")
    return _compress("src", "out", "--overwrite"), "out", "hard link"


def _outer(d: Path) -> tuple[list[str], str, str]:
    _source(d / "outer" / "src")
    return _compress("outer/src", "outer", "--overwrite"), "outer", "source checkpoint lies inside"


def _symlinked(d: Path) -> tuple[list[str], str, str]:
    _source(d / "src")
    (d / "link").symlink_to("src")
    return _compress("src", "link", "--overwrite"), "link", "is the source checkpoint"


def _gradients_in_destination(d: Path) -> tuple[list[str], str, str]:
    _source(d / "src")
    _source(d / "out" / "grads")
    args = _compress("src", "out", "--overwrite", "--sparsity", "0.5", "--importance", "gradient")
    return [*args, "--gradients", "out/grads"], "out", "gradients checkpoint lies"


def _with_src(args: list[str], named: str, text: str) -> Callable[[Path], tuple]:
    def build(d: Path) -> tuple[list[str], str, str]:
        _source(d / "src")
        return args, named, text

    return build


def _with_q(args: list[str], named: str, text: str) -> Callable[[Path], tuple]:
    def build(d: Path) -> tuple[list[str], str, str]:
        _compressed(d)
        return args, named, text

    return build


def _parent_is_file(d: Path) -> tuple[list[str], str, str]:
    _source(d / "src")
    (d / "afile").write_text("not a directory")
    return _compress("src", "afile/out"), "afile/out", "is not a directory"


def _decompress_symlink(d: Path) -> tuple[list[str], str, str]:
    _compressed(d)
    (d / "link").symlink_to("q")
    return ["decompress", "q", "link", "--overwrite"], "link", "is the compressed checkpoint"


SHARD = f"src/{FIRST}"
REFUSALS: dict[str, Refusal] = {
    "destination_is_the_source_file": Refusal(
        _with_src(_compress(SHARD, SHARD, "--overwrite"), SHARD, "is the source checkpoint")
    ),
    "destination_is_the_source": Refusal(
        _with_src(_compress("src", "src", "--overwrite"), "src", "is the source checkpoint")
    ),
    "destination_through_dotdot": Refusal(
        _with_src(
            _compress("src", "src/../src", "--overwrite"), "src/../src", "is the source checkpoint"
        )
    ),
    "destination_inside_the_source": Refusal(
        _with_src(_compress("src", "src/out"), "src/out", "lies inside the source checkpoint")
    ),
    "destination_contains_the_source": Refusal(_outer),
    "destination_contains_the_source_file": Refusal(
        _with_src(_compress(SHARD, "src", "--overwrite"), "src", "source checkpoint lies inside")
    ),
    "destination_is_a_link_to_the_source": Refusal(_symlinked),
    "destination_holds_a_hard_link": Refusal(_hard_linked),
    "staging_is_the_destination": Refusal(
        _with_src(_compress("src", "out", "--staging", "out"), "out", "is the destination")
    ),
    "staging_inside_the_destination": Refusal(
        _with_src(
            _compress("src", "out", "--staging", "out/stg"), "out/stg", "inside the destination"
        )
    ),
    "staging_inside_the_source": Refusal(
        _with_src(_compress("src", "out", "--staging", "src/stg"), "src/stg", "inside the source")
    ),
    "gradients_inside_the_destination": Refusal(_gradients_in_destination),
    "destination_parent_is_a_file": Refusal(_parent_is_file),
    # root may write anywhere a mode allows, so the unwritable parent is /proc (no new files
    # there for anyone); the probe creates a file instead of trusting permission bits.
    "destination_parent_not_writable": Refusal(
        _with_src(_compress("src", "/proc/compressor-out"), "/proc/compressor-out", "not writable")
    ),
    "decompress_onto_its_source": Refusal(
        _with_q(["decompress", "q", "q", "--overwrite"], "q", "is the compressed checkpoint")
    ),
    "decompress_inside_its_source": Refusal(
        _with_q(["decompress", "q", "q/dense"], "q/dense", "inside the compressed checkpoint")
    ),
    "decompress_onto_a_link_to_its_source": Refusal(_decompress_symlink),
}


@dataclass
class Outcome:
    returncode: int
    output: str
    named: str
    text: str
    before: dict[str, str]
    after: dict[str, str]


def _run_refusal(root: Path, name: str, case: Refusal) -> Outcome:
    directory = root / name
    directory.mkdir()
    args, named, text = case.build(directory)
    before = tree_digest(directory)
    done = run_cli([*CLI, *args], timeout=240, cwd=directory)
    after = tree_digest(directory)
    return Outcome(done.returncode, done.stderr + done.stdout, named, text, before, after)


@pytest.fixture(scope="module")
def refusals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    root = tmp_path_factory.mktemp("paths")
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(_run_refusal, root, name, c) for name, c in REFUSALS.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_overlapping_output_is_refused_before_any_work(
    name: str, refusals: dict[str, Outcome]
) -> None:
    outcome = refusals[name]
    first = outcome.output.strip().splitlines()[0] if outcome.output.strip() else ""
    assert outcome.returncode == 3, outcome.output
    assert "Traceback" not in outcome.output, outcome.output
    assert first.startswith(f"error: {outcome.named}: "), outcome.output
    assert outcome.text in first, outcome.output
    assert one_line(outcome.output).count("error: ") == 1, outcome.output
    assert outcome.after == outcome.before  # nothing read was touched, nothing was written


# -- layouts users have ---------------------------------------------------------------------


def _hub_snapshot(root: Path, source: Path) -> Path:
    """`huggingface-cli download`'s cache layout for `source`: every file of the snapshot is a
    relative link to `../../blobs/<sha256>` (one more `../` per subfolder)."""
    import hashlib

    store = root / "models--org--tiny"
    (store / "refs").mkdir(parents=True)
    (store / "refs" / "main").write_text("0123abcd")
    snapshot = store / "snapshots" / "0123abcd"
    (store / "blobs").mkdir()
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        rel = path.relative_to(source)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, store / "blobs" / digest)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(rel.parts) + 1), "blobs", digest))
    return snapshot


def _links(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): os.readlink(p) for p in root.rglob("*") if p.is_symlink()
    }


def test_hub_cache_snapshot_compresses_end_to_end(tmp_path: Path) -> None:
    source = _source(tmp_path / "plain")
    (source / "tokenizer").mkdir()
    (source / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0"}')
    snapshot = _hub_snapshot(tmp_path / "hub", source)
    hub = tmp_path / "hub"
    before, links = tree_digest(hub), _links(hub)

    out = tmp_path / "out"
    done = run_cli(compress_args(snapshot, out, "--workers", "0"), timeout=240)
    assert done.returncode == 0, done.stderr
    assert tree_digest(hub) == before and _links(hub) == links  # the cache is untouched

    for rel in ("generation_config.json", "tokenizer/tokenizer.json"):
        carried = out / rel
        assert carried.is_file() and not carried.is_symlink(), rel  # a regular file, its name
        assert carried.read_bytes() == (source / rel).read_bytes(), rel
    assert not any(p.is_symlink() for p in out.rglob("*"))
    assert json.loads((out / "config.json").read_text())["quantization_config"]
    verified = run_cli([*CLI, "verify", str(out)], timeout=240)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def _escaping_extra(snapshot: Path, outside: Path) -> str:
    (outside / "secret.txt").write_text("not part of any model")
    (snapshot / "notes.txt").symlink_to(outside / "secret.txt")
    return "notes.txt"


def _shard_into_another_repo(snapshot: Path, outside: Path) -> str:
    other = outside / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    shard = snapshot / FIRST
    target = other / "abc"
    shutil.copyfile(shard, target)
    shard.unlink()
    shard.symlink_to(os.path.relpath(target, shard.parent))
    return FIRST


@pytest.mark.parametrize("escape", [_escaping_extra, _shard_into_another_repo])
def test_snapshot_link_escaping_its_repository_is_refused(
    tmp_path: Path, escape: Callable[[Path, Path], str]
) -> None:
    snapshot = _hub_snapshot(tmp_path / "hub", _source(tmp_path / "plain"))
    (tmp_path / "elsewhere").mkdir()
    rel = escape(snapshot, tmp_path / "elsewhere")
    before = tree_digest(tmp_path)
    out = tmp_path / "out"
    done = run_cli(compress_args(snapshot, out, "--workers", "0"), timeout=240)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    first = done.stderr.strip().splitlines()[0]
    assert first.startswith(f"error: {snapshot / rel}: ") and "outside the checkpoint" in first
    assert tree_digest(tmp_path) == before and not out.exists()


def test_index_with_equal_shard_names_in_subfolders(tmp_path: Path) -> None:
    plain = _source(tmp_path / "plain")
    src = tmp_path / "src"
    src.mkdir()
    index = json.loads((plain / INDEX_NAME).read_text())
    folders = {}
    for k, shard in enumerate(sorted(plain.glob("*.safetensors"))):
        folders[shard.name] = f"part{k}/model.safetensors"
        (src / f"part{k}").mkdir()
        shutil.copyfile(shard, src / folders[shard.name])
    index["weight_map"] = {t: folders[f] for t, f in index["weight_map"].items()}
    (src / INDEX_NAME).write_text(json.dumps(index))
    shutil.copyfile(plain / "config.json", src / "config.json")
    checkpoint = open_checkpoint(src)
    assert {t: Path(p).relative_to(src).as_posix() for t, (p, _) in checkpoint.tensors.items()} == (
        index["weight_map"]
    )

    out = tmp_path / "out"
    done = run_cli(compress_args(src, out, "--workers", "0"), timeout=240)
    assert done.returncode == 0, done.stderr
    # Every tensor the recipe copies comes out with the bytes of its own subfolder's shard.
    copied = 0
    for shard in out.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if name in index["weight_map"]:
                    with safe_open(src / index["weight_map"][name], "pt") as g:
                        assert f.get_tensor(name).equal(g.get_tensor(name)), name
                    copied += 1
    assert copied >= 3


# -- input validation --------------------------------------------------------------------------


def _refused(src: Path, out: Path) -> str:
    done = run_cli(compress_args(src, out, "--workers", "0"), timeout=240)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return done.stderr.strip().splitlines()[0]


def test_nul_byte_in_an_index_file_name_is_one_message(tmp_path: Path) -> None:
    src = _source(tmp_path / "src")
    index = json.loads((src / INDEX_NAME).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "model\x00.safetensors"
    (src / INDEX_NAME).write_text(json.dumps(index))
    before = tree_digest(src)
    line = _refused(src, tmp_path / "out")
    assert line.startswith(f"error: {src / INDEX_NAME}: ") and "not a valid file name" in line
    assert tree_digest(src) == before


@pytest.mark.parametrize("config", ["[1, 2]", '"llama"', "7"])
def test_config_json_that_is_not_an_object_is_refused_at_open(tmp_path: Path, config: str) -> None:
    src = _source(tmp_path / "src")
    (src / "config.json").write_text(config)
    line = _refused(src, tmp_path / "out")
    assert line.startswith(f"error: {src / 'config.json'}: ") and "not an object" in line


def test_our_own_manifest_and_report_are_never_carried(tmp_path: Path) -> None:
    src = _source(tmp_path / "src")
    (src / "manifest.json").write_text('{"version": 1, "files": {"gone.bin": {"size": 1}}}')
    (src / "compression.json").write_text('{"run_key": "someone else"}')
    assert {"manifest.json", "compression.json"}.isdisjoint(open_checkpoint(src).extra_files)
    out = tmp_path / "out"
    done = run_cli(compress_args(src, out, "--workers", "0"), timeout=240)
    assert done.returncode == 0, done.stderr
    assert "gone.bin" not in (out / "manifest.json").read_text()
    verified = run_cli([*CLI, "verify", str(out)], timeout=240)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_staging_directory_may_contain_the_source(tmp_path: Path) -> None:
    """`--staging /scratch` with the source in /scratch/model: staging writes only
    `<staging>/<run key>/`, so this is allowed, and the source is untouched."""
    scratch = tmp_path / "scratch"
    src = _source(scratch / "src")
    before = tree_digest(src)
    done = run_cli(
        compress_args(src, tmp_path / "out", "--workers", "0", "--staging", str(scratch))
    )
    assert done.returncode == 0, done.stderr
    assert tree_digest(src) == before
    assert sorted(p.name for p in scratch.iterdir()) == ["src"]  # its run-key dir is gone
