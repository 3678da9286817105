"""`compressor verify`: every kind of tampering with a published checkpoint is detected and
reported naming the file; an untouched checkpoint passes."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from compressor.config import build_config
from compressor.formats.safetensors_io import read_header
from compressor.formats.verify import verify_checkpoint
from compressor.pipeline import compress_checkpoint
from compressor.testing.generate import LlamaShape, generate_llama_checkpoint
from tests.reliability._util import CLI, one_line, run_cli

INDEX = "model.safetensors.index.json"
SMALL = LlamaShape(hidden_size=256, intermediate_size=768, num_hidden_layers=2, vocab_size=1024)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A w4a16-asym output in several shards (so it has an index and zero points)."""
    root = tmp_path_factory.mktemp("verify")
    src = generate_llama_checkpoint(root / "src", SMALL, dtype="BF16", shard_mb=1, seed=5)
    dest = root / "out"
    config = build_config(str(src), str(dest), preset="w4a16-asym", workers=0, max_shard_mb=1)
    compress_checkpoint(config)
    assert len(list(dest.glob("*.safetensors"))) >= 2
    return dest


def _copy(published: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(published, target)
    return target


def _shards(root: Path) -> list[Path]:
    return sorted(root.glob("*.safetensors"))


def _reseal(root: Path) -> None:
    """Rewrite manifest.json for the files as they are now (a tamperer who knows the format)."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json"):
        data = path.read_bytes()
        files[path.relative_to(root).as_posix()] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
        }
    (root / "manifest.json").write_text(json.dumps({"version": 1, "files": files}))


def _flip_data_byte(root: Path) -> str:
    shard = _shards(root)[0]
    header = read_header(shard)
    data = bytearray(shard.read_bytes())
    data[header.data_start + 100] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard.name


def _flip_header_byte(root: Path) -> str:
    shard = next(s for s in _shards(root) if b'"I32"' in s.read_bytes()[:4096])
    shard.write_bytes(shard.read_bytes().replace(b'"I32"', b'"I31"', 1))  # same length
    return shard.name


def _truncate(root: Path) -> str:
    shard = _shards(root)[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    return shard.name


def _delete_extra(root: Path) -> str:
    (root / "generation_config.json").unlink()
    return "generation_config.json"


def _delete_shard(root: Path) -> str:
    shard = _shards(root)[-1]
    shard.unlink()
    return shard.name


def _add_file(root: Path) -> str:
    (root / "notes.txt").write_text("added later")
    return "notes.txt"


def _add_shard(root: Path) -> str:
    shutil.copy(_shards(root)[0], root / "model-extra.safetensors")
    _reseal(root)
    return "model-extra.safetensors"


def _edit_index(root: Path) -> str:
    index = json.loads((root / INDEX).read_text())
    names = sorted(index["weight_map"])
    first, last = index["weight_map"][names[0]], _shards(root)[-1].name
    index["weight_map"][names[0]] = last if first != last else _shards(root)[0].name
    (root / INDEX).write_text(json.dumps(index, indent=2) + "\n")  # same size: only bytes move
    return INDEX


def _edit_index_and_reseal(root: Path) -> str:
    _edit_index(root)
    _reseal(root)
    return INDEX


def _drop_from_index_and_reseal(root: Path) -> str:
    index = json.loads((root / INDEX).read_text())
    index["weight_map"].pop("model.norm.weight")
    (root / INDEX).write_text(json.dumps(index))
    _reseal(root)
    return "model.norm.weight"


def _remove_scale_and_reseal(root: Path) -> str:
    index = json.loads((root / INDEX).read_text())
    name = "model.layers.1.mlp.up_proj.weight_scale"
    shard = root / index["weight_map"].pop(name)
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (root / INDEX).write_text(json.dumps(index))
    _reseal(root)
    return name.removesuffix(".weight_scale")


def _bad_quantization_config(root: Path) -> str:
    config = json.loads((root / "config.json").read_text())
    group = next(iter(config["quantization_config"]["config_groups"].values()))
    group["weights"]["num_bits"] = "four"
    (root / "config.json").write_text(json.dumps(config))
    _reseal(root)
    return "num_bits"


def _wrong_bits_and_reseal(root: Path) -> str:
    config = json.loads((root / "config.json").read_text())
    group = next(iter(config["quantization_config"]["config_groups"].values()))
    group["weights"]["num_bits"] = 8  # valid for compressed-tensors, wrong for these tensors
    (root / "config.json").write_text(json.dumps(config))
    _reseal(root)
    return "weight_packed"


def _delete_manifest(root: Path) -> str:
    (root / "manifest.json").unlink()
    return "manifest.json"


def _escaping_manifest(root: Path) -> str:
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"]["../outside.txt"] = {"sha256": "0" * 64, "size": 1}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return "../outside.txt"


TAMPER: dict[str, tuple[Callable[[Path], str], str]] = {
    # name: (tamper → the name the problem must mention, a phrase of the message)
    "data_byte_flipped": (_flip_data_byte, "sha256 differs"),
    "header_byte_flipped": (_flip_header_byte, "unsupported dtype"),
    "shard_truncated": (_truncate, "bytes but manifest.json records"),
    "file_deleted": (_delete_extra, "missing"),
    "shard_deleted": (_delete_shard, "missing"),
    "file_added": (_add_file, "not listed in manifest.json"),
    "shard_added_and_resealed": (_add_shard, "does not reference"),
    "index_edited": (_edit_index, "sha256 differs"),
    "index_edited_and_resealed": (_edit_index_and_reseal, "does not hold it"),
    "index_entry_dropped_and_resealed": (_drop_from_index_and_reseal, "missing from the index"),
    "scale_removed_and_resealed": (_remove_scale_and_reseal, "has no weight_scale"),
    "quantization_config_invalid": (_bad_quantization_config, "num_bits"),
    "quantization_config_wrong_bits": (_wrong_bits_and_reseal, "needs I32"),
    "manifest_deleted": (_delete_manifest, "is missing"),
    "manifest_escapes": (_escaping_manifest, "outside the checkpoint directory"),
}


def test_untouched_checkpoint_passes(published: Path) -> None:
    result = verify_checkpoint(published)
    assert result.ok, [str(p) for p in result.problems]
    assert result.files == len(list(published.iterdir())) - 1  # all but manifest.json
    assert result.modules == 14


@pytest.mark.parametrize("name", list(TAMPER))
def test_tampering_is_detected(name: str, published: Path, tmp_path: Path) -> None:
    tamper, phrase = TAMPER[name]
    root = _copy(published, tmp_path)
    named = tamper(root)
    problems = [str(p) for p in verify_checkpoint(root).problems]
    assert problems, "tampering went unnoticed"
    assert any(named in p and phrase in p for p in problems), problems


def test_cli_verify(published: Path, tmp_path: Path) -> None:
    root = _copy(published, tmp_path)
    shard = _flip_data_byte(root)
    # A broken config.json too: every problem is reported, not just the first.
    (root / "config.json").write_text("{")
    with ThreadPoolExecutor(2) as pool:  # each start imports torch (and compressed-tensors)
        ok_run = pool.submit(run_cli, [*CLI, "verify", str(published)])
        bad_run = pool.submit(run_cli, [*CLI, "verify", str(root)])
        ok, bad = ok_run.result(), bad_run.result()
    assert ok.returncode == 0, ok.stderr
    assert "ok: " in ok.stdout
    message = one_line(bad.stderr)
    assert bad.returncode == 1, message
    assert f"{root / shard}: sha256 differs" in message
    assert f"{root / 'config.json'}: cannot be parsed" in message
    assert "problem(s): this checkpoint was damaged" in message and "fix:" in message
    missing = run_cli([*CLI, "verify", str(tmp_path / "nothing")])
    assert missing.returncode == 2 and "does not exist" in missing.stderr


@pytest.fixture(scope="module")
def pruned_bitmask(published: Path) -> Path:
    """Pruned, unquantized weights in our sparse-bitmask layout."""
    from compressor.config import PruneConfig, Recipe

    src = published.parent / "src"
    dest = published.parent / "pruned"
    recipe = Recipe(quantization=[], pruning=PruneConfig(sparsity=0.5, sparse_format="bitmask"))
    config = build_config(str(src), str(dest), workers=0)
    compress_checkpoint(config.model_copy(update={"recipe": recipe, "preset": "recipe"}))
    return dest


def test_bitmask_layout_is_checked(pruned_bitmask: Path, tmp_path: Path) -> None:
    result = verify_checkpoint(pruned_bitmask)
    assert result.ok, [str(p) for p in result.problems]
    assert result.modules == 14
    root = _copy(pruned_bitmask, tmp_path)
    name = "model.layers.0.mlp.up_proj.weight_bitmask"
    (shard,) = [s for s in _shards(root) if name in read_header(s).tensors]
    tensors = load_file(str(shard))
    tensors[name][0, 0] ^= 1  # one weight more or less in row 0, the offsets unchanged
    save_file(tensors, str(shard), metadata={"format": "pt"})
    _reseal(root)
    problems = [str(p) for p in verify_checkpoint(root).problems]
    assert any(shard.name in p and "disagree" in p for p in problems), problems
