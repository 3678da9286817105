"""Hostile and unusual input beyond the bad-input corpus (issue 14): weights at the dtype's limit,
already-compressed checkpoints, colliding names, FP8 weights, invalid recipe regexes, tampered
compressed checkpoints, a missing eval extra, bad `generate` options, large extra files, and the
messages of shared staging and budgets. Each case runs the real CLI in a subprocess on real
files."""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import assert_same_tensors, ct_decompress, load_dir
from tests.reliability._util import (
    CLI,
    cli_env,
    compress_args,
    leftovers,
    one_line,
    run_cli,
    tree_digest,
)

UP = "model.layers.0.mlp.up_proj.weight"  # (64, 128)
NORM = "model.norm.weight"  # (128,)


def _checkpoint(src: Path, dtype: torch.dtype = torch.bfloat16, **extra: torch.Tensor) -> Path:
    """One shard: an up_proj target, a norm, and whatever `extra` adds; config.json."""
    src.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    tensors = {
        UP: torch.randn(64, 128, generator=g).to(dtype),
        NORM: torch.ones(128, dtype=dtype),
        **extra,
    }
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    torch_dtype = str(dtype).removeprefix("torch.")
    (src / "config.json").write_text(
        json.dumps({"model_type": "llama", "torch_dtype": torch_dtype})
    )
    return src


def _refused(done, code: int, *expect: str) -> str:
    """One message naming what is expected, with a fix, no traceback."""
    message = one_line(done.stderr)
    assert done.returncode == code, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert message.startswith("error: ") and message.count("error: ") == 1, message
    assert "fix: " in message, message
    for text in expect:
        assert text in message, f"{text!r} not in {message!r}"
    return message


# -- codes that would decompress to inf ---------------------------------------------------------
@pytest.mark.parametrize("options", [("--preset", "w4a16-asym"), ("--preset", "w4a16-asym", "--rounding", "mse"), ("--preset", "w8a16")])  # fmt: skip
def test_float16_weight_at_the_limit_decompresses_finite(tmp_path: Path, options) -> None:
    """One float16 weight of −65504 (and one of −65280, which int8 channel scales push past the
    maximum) gave x̂ = −inf with exit 0 and a clean verify; the codes are now kept finite, and
    compressed-tensors' own decompressor reads the same finite values as ours."""
    up = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    up[3, 5] = -65504.0
    up[9, 100] = -65280.0
    src = _checkpoint(tmp_path / "src", torch.float16, **{UP: up})
    out = tmp_path / "out"
    done = run_cli(compress_args(src, out, "--workers", "0", *options))
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "compression.json").read_text())
    (entry,) = [t for t in report["tensors"] if t["name"] == UP]
    assert entry["relative_error"] is not None and math.isfinite(entry["relative_error"])
    assert math.isfinite(entry["max_abs_error"])
    assert run_cli([*CLI, "verify", str(out)]).returncode == 0
    dense = tmp_path / "dense"
    done = run_cli([*CLI, "decompress", str(out), str(dense), "--dtype", "float16"])
    assert done.returncode == 0, done.stderr
    ours = load_dir(dense)
    assert all(torch.isfinite(t).all() for t in ours.values())
    assert ours[UP][3, 5] < -60000  # still the most negative weight of its group
    # compressed-tensors' decompressor writes its dequantized weights in bfloat16: compare ours,
    # rounded the same way, bit for bit.
    theirs = load_dir(ct_decompress(out, tmp_path / "ct"))
    assert_same_tensors({k: v.to(theirs[k].dtype) for k, v in ours.items()}, theirs)
    assert all(torch.isfinite(t).all() for t in theirs.values())


def _refused_by_plan(root: Path, src: Path, code: int, *expect: str, options=()) -> str:
    """Compress `src` into `root/out`: refused with one message before any work, the input
    untouched, nothing created beside the destination."""
    before = tree_digest(root)
    out = root / "out"
    done = run_cli(compress_args(src, out, "--workers", "0", *options))
    message = _refused(done, code, *expect)
    assert tree_digest(root) == before
    assert not out.exists() and leftovers(out) == []
    return message


# -- already-compressed input, colliding names, FP8 -------------------------------------------
def test_our_own_output_is_decoded_and_compressed_again(tmp_path: Path) -> None:
    """It was refused ("decompress it first"); now its chunks are decoded through the scheme
    registry (tests/formats/test_compressed_input.py pins the bytes)."""
    src = _checkpoint(tmp_path / "src")
    first = tmp_path / "w4"
    assert run_cli(compress_args(src, first, "--workers", "0")).returncode == 0
    before = tree_digest(first)
    done = run_cli(compress_args(first, tmp_path / "again", "--workers", "0"))
    assert done.returncode == 0, done.stderr
    assert tree_digest(first) == before  # the input is never touched


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        ({"model.layers.0.mlp.down_proj.weight_packed": torch.zeros(64, 8, dtype=torch.int32)},
         ("model.layers.0.mlp.down_proj.weight_packed", "no quantization_config to decode it")),
        ({"model.layers.0.mlp.down_proj.weight_scale": torch.ones(64, 1)},
         ("model.layers.0.mlp.down_proj.weight_scale", "already compressed")),
    ],
)  # fmt: skip
def test_packed_tensors_without_config_are_refused(tmp_path: Path, extra, expect) -> None:
    src = _checkpoint(tmp_path / "src", **extra)
    _refused_by_plan(tmp_path, src, 2, *expect)


@pytest.mark.parametrize(
    "name", ["model.layers.0.mlp.up_proj.weight_scale", "model.layers.0.mlp.up_proj.weight_shape"]
)
def test_input_names_the_output_would_write_are_refused(tmp_path: Path, name: str) -> None:
    """They failed only after all the work, blaming "a bug in the caller"."""
    src = _checkpoint(tmp_path / "src", **{name: torch.ones(2, dtype=torch.int64)})
    _refused_by_plan(tmp_path, src, 2, "model.safetensors", name, "collides with a tensor", UP)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_target_weights_are_refused_before_any_work(tmp_path: Path, dtype) -> None:
    up = torch.randn(64, 128, generator=torch.Generator().manual_seed(2)).to(dtype)
    src = _checkpoint(tmp_path / "src", **{UP: up})
    message = _refused_by_plan(tmp_path, src, 2, UP, "weight without block scales")
    assert "ignore" in message and "dequantize" in message


# -- recipes ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("recipe", "where", "pattern"),
    [
        ("quantization:\n  - targets: [Linear, 're:(']\n", "quantization.0.targets", "re:("),
        ("ignore: [lm_head, 're:.*[a']\n", "ignore", "re:.*[a"),
        ("pruning:\n  schedule: {'re:+x': 0.5}\n", "pruning.schedule", "re:+x"),
    ],
)
def test_invalid_recipe_regex_is_refused_at_load(tmp_path: Path, recipe, where, pattern) -> None:
    src = _checkpoint(tmp_path / "src")
    (tmp_path / "recipe.yaml").write_text(recipe)
    options = ("--recipe", str(tmp_path / "recipe.yaml"))
    _refused_by_plan(
        tmp_path, src, 2, "recipe.yaml", where, repr(pattern), "not a valid regular expression",
        options=options,
    )  # fmt: skip


# -- decompress ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A w4a16-asym output (64 x 128 target, group 128) to tamper with."""
    root = tmp_path_factory.mktemp("compressed")
    src = _checkpoint(root / "src")
    done = run_cli(compress_args(src, root / "out", "--workers", "0", "--preset", "w4a16-asym"))
    assert done.returncode == 0, done.stderr
    return root / "out"


@pytest.mark.parametrize(
    ("shape", "expect"),
    [
        ([64, 100], ("up_proj.weight_packed", "has shape [64, 16]", "weight_shape [64, 100]")),
        ([10, 10], ("up_proj.weight_packed", "weight_shape [10, 10]")),
        ([-1, 128], ("up_proj.weight_shape", "[-1, 128]", "positive integers")),
        ([64, 128, 1], ("up_proj.weight_shape", "[64, 128, 1]")),
        ([2**40, 128], ("up_proj.weight_shape", "positive integers")),
    ],
)
def test_decompress_refuses_a_tampered_weight_shape(
    compressed: Path, tmp_path: Path, shape, expect
) -> None:
    tampered = tmp_path / "tampered"
    shutil.copytree(compressed, tampered)
    tensors = load_file(str(tampered / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight_shape"] = torch.tensor(shape, dtype=torch.int64)
    save_file(tensors, str(tampered / "model.safetensors"), metadata={"format": "pt"})
    dense = tmp_path / "dense"
    done = run_cli([*CLI, "decompress", str(tampered), str(dense)])
    _refused(done, 2, "model.safetensors", *expect, "compressor verify")
    assert not dense.exists() and leftovers(dense) == []


def test_decompress_onto_an_existing_file(compressed: Path, tmp_path: Path) -> None:
    """Without --overwrite: one message, the file kept; with it: the file is replaced by the
    dense checkpoint (it failed after all the work, leaving `.dense.partial` behind)."""
    dense = tmp_path / "dense"
    dense.write_text("not a checkpoint")
    done = run_cli([*CLI, "decompress", str(compressed), str(dense)])
    _refused(done, 3, str(dense), "already exists", "--overwrite")
    assert dense.read_text() == "not a checkpoint" and leftovers(dense) == []
    done = run_cli([*CLI, "decompress", str(compressed), str(dense), "--overwrite"])
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in dense.iterdir()) == ["config.json", "model.safetensors"]
    assert leftovers(dense) == []


# -- generate -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "expect"),
    [
        (("--hidden-size", "0"), ("hidden_size must be at least 1", "--hidden-size")),
        (("--layers", "-1"), ("num_hidden_layers must be at least 1", "--layers")),
        (("--dtype", "F8"), ("unsupported dtype 'F8'", "BF16, F16, F32")),
        (("--shard-mb", "0"), ("shard size must be positive", "--shard-mb")),
        (("--hidden-size", "320"), ("5 attention heads cannot share 2 key/value heads",)),
    ],
)
def test_generate_refuses_bad_options_and_creates_nothing(tmp_path: Path, options, expect) -> None:
    done = run_cli([*CLI, "generate", str(tmp_path / "tiny"), *options])
    _refused(done, 2, *expect)
    assert list(tmp_path.iterdir()) == []


# -- eval without the eval extra ----------------------------------------------------------------
_BLOCKER = """
import sys


class _NoEvalExtra:
    # As if the eval extra were not installed: these imports fail.
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("transformers", "compressed_tensors"):
            raise ImportError(f"No module named {name!r}")
        return None


sys.meta_path.insert(0, _NoEvalExtra())
"""


def _without_eval_extra(tmp_path: Path, args: list[str]):
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(_BLOCKER)
    env = cli_env(
        PYTHONPATH=os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    )
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)


def test_evaluate_without_the_eval_extra_fails_before_any_work(tmp_path: Path) -> None:
    """It gave a traceback after compressing, and published anyway."""
    src = _checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    before = tree_digest(tmp_path / "src")
    done = _without_eval_extra(tmp_path, compress_args(src, out, "--workers", "0", "--evaluate"))
    _refused(done, 2, "--evaluate needs transformers and compressed-tensors",
             "pip install 'checkpoint-compressor[eval]'")  # fmt: skip
    assert not out.exists() and leftovers(out) == []
    assert tree_digest(tmp_path / "src") == before
    # the blocker blocks only the extra: compressing without --evaluate works
    done = _without_eval_extra(tmp_path, compress_args(src, out, "--workers", "0"))
    assert done.returncode == 0, done.stderr
    done = _without_eval_extra(tmp_path, [*CLI, "eval", str(src), str(out)])
    _refused(done, 2, "eval needs transformers", "pip install 'checkpoint-compressor[eval]'")


# -- large extra files, --overwrite of a file ----------------------------------------------------
_PEAK_RSS = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
assert done.returncode == 0, done.stderr
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # KiB on Linux
"""


def _peak_rss_mib(args: list[str]) -> float:
    """Peak resident memory of one CLI run, measured by a fresh parent process (so no other
    child of the test process counts)."""
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, *args], capture_output=True, text=True, env=cli_env()
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1]) / 1024


def test_large_extra_files_are_streamed_not_held_in_memory(tmp_path: Path) -> None:
    """A 256 MiB extra file (sparse: no disk or page cache needed to read it) raised the peak
    memory of a run by its whole size (read whole, then hashed); it is now copied in blocks.
    The check compares peaks, not times: with and without the file, same run otherwise."""
    small = _checkpoint(tmp_path / "small")
    large = _checkpoint(tmp_path / "large")
    with open(large / "tokenizer.model", "wb") as f:
        f.truncate(256 * 2**20)
    base = _peak_rss_mib(compress_args(small, tmp_path / "out-small", "--workers", "0"))
    peak = _peak_rss_mib(compress_args(large, tmp_path / "out-large", "--workers", "0"))
    assert peak - base < 64, f"peak {peak:.0f} MiB with the file, {base:.0f} MiB without"
    copied = tmp_path / "out-large" / "tokenizer.model"
    assert copied.stat().st_size == 256 * 2**20
    assert run_cli([*CLI, "verify", str(tmp_path / "out-large")]).returncode == 0


def test_overwrite_of_a_destination_that_is_a_file_leaves_nothing_behind(tmp_path: Path) -> None:
    """It left a hidden `.out.old-<key>` beside the output (rmtree cannot remove a file)."""
    src = _checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    out.write_text("an old file")
    done = run_cli(compress_args(src, out, "--workers", "0", "--overwrite"))
    assert done.returncode == 0, done.stderr
    assert out.is_dir() and (out / "manifest.json").is_file()
    assert leftovers(out) == []


# -- messages -----------------------------------------------------------------------------------
def test_second_run_on_a_shared_staging_directory_is_refused_clearly(tmp_path: Path) -> None:
    """Two runs of the same input and config with one --staging (different destinations) wrote
    into the same run-key directory and failed late, blaming the disk or a missing chunk. A live
    run's lock on that directory now refuses the second; a finished or dead one does not."""
    src = _checkpoint(tmp_path / "src")
    staging = tmp_path / "staging"
    first = compress_args(src, tmp_path / "a", "--workers", "0", "--staging", str(staging))
    assert run_cli([*first, "--keep-staging"]).returncode == 0
    (key_dir,) = [p for p in staging.iterdir() if p.is_dir()]
    second = compress_args(src, tmp_path / "b", "--workers", "0", "--staging", str(staging))
    # A live run: this test's process holds the lock, as a run does from ingest to publish.
    with open(key_dir / "lock", "r+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(b"testhost:4242")
        held.flush()
        done = run_cli(second)
    _refused(done, 3, str(key_dir), "another run (testhost:4242)",
             "using this staging directory", "--staging")  # fmt: skip
    assert not (tmp_path / "b").exists()
    # Released (the kernel does it however the holder ends): the next run proceeds.
    done = run_cli(second)
    assert done.returncode == 0, done.stderr


def test_unreachable_budget_is_stated_in_bits_per_weight(tmp_path: Path) -> None:
    """It said "budget of 16384 bits is infeasible ... needs 43520 bits"."""
    src = _checkpoint(tmp_path / "src")
    done = run_cli(compress_args(src, tmp_path / "out", "--workers", "0", "--target-bits", "1"))
    message = _refused(done, 2, "the budget --target-bits 1 cannot be met", "bits per weight",
                       "raise --target-bits to at least")  # fmt: skip
    assert "bits is infeasible" not in message
    done = run_cli(compress_args(src, tmp_path / "out", "--workers", "0", "--max-error", "1e-6"))
    _refused(done, 2, "the budget --max-error 1e-06 cannot be met", "relative error of",
             "raise --max-error to at least")  # fmt: skip
