"""Bad input: a corpus of broken checkpoints, recipes and destinations, each run through the real
CLI (`python -m compressor.cli compress ... --workers 0`).

Every case must end with one clear message that names the file (and the tensor, where there is
one) and says what to do, a non-zero exit code, no output directory, no leftovers beside it
(`.partial`, staging, lock) when the problem is found by the plan, and inputs byte-identical to
what they were before the run.

The CLI runs are independent, so the module fixture runs them all concurrently once (each costs
a Python + torch start-up) and every parametrized test checks its own case.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.reliability._util import (
    compress_args,
    leftovers,
    one_line,
    run_cli,
    tree_digest,
    write_raw_safetensors,
)

UP = "model.layers.0.mlp.up_proj.weight"  # (64, 128), shard 1
NORM = "model.norm.weight"  # (128,), shard 1
DOWN = "model.layers.0.mlp.down_proj.weight"  # (128, 64), shard 2
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"
DOWN_BYTES = 128 * 64 * 2


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        UP: torch.randn(64, 128, generator=g).to(torch.bfloat16),
        NORM: torch.ones(128, dtype=torch.bfloat16),
        DOWN: torch.randn(128, 64, generator=g).to(torch.bfloat16),
    }


def _index(src: Path, weight_map: dict[str, str]) -> None:
    (src / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def base_checkpoint(src: Path, down: torch.Tensor | None = None) -> Path:
    """A valid two-shard checkpoint with an index and config.json."""
    src.mkdir(parents=True)
    t = _tensors()
    if down is not None:
        t[DOWN] = down
    save_file({UP: t[UP], NORM: t[NORM]}, str(src / SHARD1), metadata={"format": "pt"})
    save_file({DOWN: t[DOWN]}, str(src / SHARD2), metadata={"format": "pt"})
    _index(src, {UP: SHARD1, NORM: SHARD1, DOWN: SHARD2})
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return src


def _down_entry(**overrides: object) -> dict[str, object]:
    return {"dtype": "BF16", "shape": [128, 64], "data_offsets": [0, DOWN_BYTES], **overrides}


def _replace_shard2(header: dict[str, object] | bytes, data: bytes) -> Callable[[Path], None]:
    def build(src: Path) -> None:
        base_checkpoint(src)
        write_raw_safetensors(src / SHARD2, header, data)

    return build


# -- the corpus -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    build: Callable[[Path], object]  # builds the input under the given path (or not at all)
    expect: tuple[str, ...]  # substrings of the one-line error message
    code: int = 2
    options: tuple[str, ...] = ()
    plan_error: bool = True  # found by the plan: nothing at all may appear beside the output
    source: str = "src"  # the source path, relative to the case directory
    destination: str = "out"
    recipe: str | None = None  # YAML text, written to recipe.yaml and passed as --recipe
    extra: dict[str, str] = field(default_factory=dict)


def _truncated(src: Path) -> None:
    base_checkpoint(src)
    os.truncate(src / SHARD2, (src / SHARD2).stat().st_size - 100)


def _index_edit(**changes: str | None) -> Callable[[Path], None]:
    def build(src: Path) -> None:
        base_checkpoint(src)
        weight_map = {UP: SHARD1, NORM: SHARD1, DOWN: SHARD2}
        for name, file in changes.items():
            key = {"up": UP, "norm": NORM, "down": DOWN}.get(name, name.replace("__", "."))
            if file is None:
                weight_map.pop(key)
            else:
                weight_map[key] = file
        _index(src, weight_map)

    return build


def _escape(absolute: bool) -> Callable[[Path], None]:
    def build(src: Path) -> None:
        base_checkpoint(src)
        evil = src.parent / "evil.safetensors"  # exists, outside the checkpoint
        shutil.copy(src / SHARD2, evil)
        target = str(evil) if absolute else "../evil.safetensors"
        _index(src, {UP: SHARD1, NORM: SHARD1, DOWN: target})

    return build


def _overwrite(file: str, content: bytes) -> Callable[[Path], None]:
    def build(src: Path) -> None:
        base_checkpoint(src)
        (src / file).write_bytes(content)

    return build


def _duplicate(src: Path) -> None:
    base_checkpoint(src)
    t = _tensors()
    save_file({UP: t[UP], NORM: t[NORM], DOWN: t[DOWN]}, str(src / SHARD1))


def _with_value(value: float) -> Callable[[Path], None]:
    def build(src: Path) -> None:
        down = _tensors()[DOWN].clone()
        down[5, 7] = value
        base_checkpoint(src, down=down)

    return build


def _empty_dir(src: Path) -> None:
    src.mkdir()
    (src / "config.json").write_text("{}")


def _no_tensors(src: Path) -> None:
    src.mkdir()
    write_raw_safetensors(src / "model.safetensors", {"__metadata__": {"format": "pt"}})


def _pickle_dir(src: Path) -> None:
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")  # a pickle; never loaded


def _pickle_file(src: Path) -> None:
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(b"\x80\x02}q\x00.")


def _zero_rows(src: Path) -> None:
    base_checkpoint(src)
    t = _tensors()
    empty = "model.layers.0.mlp.empty_proj.weight"
    save_file({DOWN: t[DOWN], empty: torch.zeros(0, 64, dtype=torch.bfloat16)}, str(src / SHARD2))
    _index(src, {UP: SHARD1, NORM: SHARD1, DOWN: SHARD2, empty: SHARD2})


def _existing_destination(src: Path) -> None:
    base_checkpoint(src)
    (src.parent / "out").mkdir()
    (src.parent / "out" / "keep.txt").write_text("someone else's output")


def _duplicate_key_header(src: Path) -> None:
    entry = json.dumps(_down_entry())
    raw = f'{{"{DOWN}": {entry}, "{DOWN}": {entry}}}'.encode()
    _replace_shard2(raw + b" " * (-len(raw) % 8), bytes(DOWN_BYTES))(src)


CASES: dict[str, Case] = {
    # safetensors files
    "truncated_shard": Case(_truncated, (SHARD2, DOWN, "truncated")),
    "header_length_past_end": Case(
        _overwrite(SHARD2, b"\x00\x00\x01\x00\x00\x00\x00\x00{}"),
        (SHARD2, "header length 65536 runs past the end"),
    ),
    "header_not_json": Case(
        _replace_shard2(b'{"model.layers.0": [1, 2' + b" " * 8, bytes(16)),
        (SHARD2, "not valid JSON"),
    ),
    "header_not_object": Case(
        _replace_shard2(b"[1, 2, 3]" + b" " * 7, bytes(16)), (SHARD2, "expected a JSON object")
    ),
    "header_duplicate_key": Case(_duplicate_key_header, (SHARD2, DOWN, "repeats the key")),
    "dtype_unknown": Case(
        _replace_shard2({DOWN: _down_entry(dtype="Q4_K")}, bytes(DOWN_BYTES)),
        (SHARD2, DOWN, "unsupported dtype 'Q4_K'"),
    ),
    "shape_times_dtype_not_span": Case(
        _replace_shard2({DOWN: _down_entry(shape=[100, 64])}, bytes(DOWN_BYTES)),
        (SHARD2, DOWN, "shape [100, 64] of BF16 needs 12800 bytes", "span 16384"),
    ),
    "offsets_overlap": Case(
        _replace_shard2(
            {
                DOWN: _down_entry(),
                "model.layers.0.mlp.down_proj.bias": {
                    "dtype": "BF16",
                    "shape": [64],
                    "data_offsets": [DOWN_BYTES - 64, DOWN_BYTES + 64],
                },
            },
            bytes(DOWN_BYTES + 64),
        ),
        (SHARD2, "model.layers.0.mlp.down_proj.bias", "overlaps"),
    ),
    "offsets_out_of_order": Case(
        _replace_shard2({DOWN: _down_entry(data_offsets=[DOWN_BYTES, 0])}, bytes(DOWN_BYTES)),
        (SHARD2, DOWN, "end before they begin"),
    ),
    "offsets_past_end": Case(
        _replace_shard2({DOWN: _down_entry()}, bytes(8000)), (SHARD2, DOWN, "looks truncated")
    ),
    "hole_between_tensors": Case(
        _replace_shard2(
            {DOWN: _down_entry(data_offsets=[64, DOWN_BYTES + 64])}, bytes(DOWN_BYTES + 64)
        ),
        (SHARD2, DOWN, "belong to no tensor"),
    ),
    # the index
    "index_names_missing_file": Case(
        _index_edit(down="model-00003-of-00003.safetensors"),
        (INDEX, "model-00003-of-00003.safetensors", "missing"),
    ),
    "index_names_absent_tensor": Case(
        _index_edit(**{"model__layers__0__mlp__gate_proj__weight": SHARD1}),
        (INDEX, "model.layers.0.mlp.gate_proj.weight", SHARD1, "does not hold it"),
    ),
    "tensor_missing_from_index": Case(
        _index_edit(norm=None), (SHARD1, NORM, "missing from the index")
    ),
    "index_not_json": Case(
        _overwrite(INDEX, b"{weight_map: "),
        (INDEX, "cannot parse the index"),
    ),
    "same_tensor_in_two_shards": Case(_duplicate, (DOWN, SHARD1, SHARD2, "appears in two shards")),
    "index_escapes_relative": Case(
        _escape(absolute=False), (INDEX, "../evil.safetensors", "outside the checkpoint")
    ),
    "index_escapes_absolute": Case(
        _escape(absolute=True), (INDEX, "evil.safetensors", "outside the checkpoint")
    ),
    # what is in it
    "empty_checkpoint": Case(_empty_dir, ("src", "no .safetensors weights found")),
    "shard_without_tensors": Case(_no_tensors, ("src", "holds no tensors")),
    "nan_in_target": Case(
        _with_value(float("nan")),
        (SHARD2, DOWN, "1 NaN or infinite value", "--skip-nonfinite"),
        plan_error=False,
    ),
    "inf_in_target": Case(
        _with_value(float("-inf")),
        (SHARD2, DOWN, "1 NaN or infinite value", "--skip-nonfinite"),
        plan_error=False,
    ),
    "target_with_zero_rows": Case(
        _zero_rows, (SHARD2, "model.layers.0.mlp.empty_proj.weight", "is empty")
    ),
    "pickle_checkpoint_dir": Case(
        _pickle_dir, ("pytorch_model.bin", "pickle", "safe_serialization=True")
    ),
    "pickle_pt_file": Case(
        _pickle_file, ("model.pt", "pickle", "safe_serialization=True"), source="model.pt"
    ),
    "source_missing": Case(lambda src: None, ("src", "does not exist")),
    # recipes and options
    "recipe_unknown_key": Case(
        base_checkpoint,
        ("recipe.yaml", "quantization.0.bitz", "Extra inputs"),
        recipe="quantization:\n  - targets: [Linear]\n    bitz: 4\n",
    ),
    "recipe_wrong_type": Case(
        base_checkpoint,
        ("recipe.yaml", "quantization.0.bits", "integer"),
        recipe="quantization:\n  - targets: [Linear]\n    bits: four\n",
    ),
    "recipe_not_a_mapping": Case(
        base_checkpoint, ("recipe.yaml", "must be a YAML mapping"), recipe="- just\n- a list\n"
    ),
    "recipe_rule_matches_nothing": Case(
        base_checkpoint,
        ("src", "matches no tensor", "re:"),
        recipe="quantization:\n  - targets: ['re:.*nothing.*']\n",
    ),
    "recipe_targets_1d_tensor": Case(
        base_checkpoint,
        (SHARD1, NORM, "only 2-D float weights"),
        recipe=f"quantization:\n  - targets: ['{NORM}']\n",
    ),
    "group_larger_than_row_strict": Case(
        base_checkpoint,
        (SHARD1, UP, "group size 256 does not divide the input dimension 128"),
        options=("--group-size", "256", "--strict-groups"),
    ),
    "unknown_preset": Case(
        base_checkpoint, ("unknown preset 'w3a7'",), options=("--preset", "w3a7")
    ),
    # destinations
    "destination_inside_source": Case(
        base_checkpoint, ("src/out", "inside the source"), code=3, destination="src/out"
    ),
    "destination_exists": Case(_existing_destination, ("out", "already exists"), code=3),
}


@dataclass
class Outcome:
    returncode: int
    stderr: str
    stdout: str
    before: dict[str, str]
    after: dict[str, str]
    directory: Path


def _run_case(root: Path, name: str, case: Case) -> Outcome:
    directory = root / name
    directory.mkdir()
    case.build(directory / case.source)
    options = list(case.options)
    if case.recipe is not None:
        (directory / "recipe.yaml").write_text(case.recipe)
        options += ["--recipe", str(directory / "recipe.yaml")]
    before = tree_digest(directory)
    done = run_cli(
        compress_args(
            directory / case.source, directory / case.destination, "--workers", "0", *options
        ),
        timeout=240,
    )
    after = tree_digest(directory)
    return Outcome(done.returncode, done.stderr, done.stdout, before, after, directory)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    root = tmp_path_factory.mktemp("bad-input")
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(_run_case, root, name, c) for name, c in CASES.items()}
        return {name: f.result() for name, f in futures.items()}


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 20


# Product gaps this corpus found and that are not fixed yet (strict: they fail once fixed).
KNOWN_GAPS: dict[str, str] = {}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[n]))
        if n in KNOWN_GAPS
        else n
        for n in CASES
    ],
)
def test_bad_input_is_refused_cleanly(name: str, outcomes: dict[str, Outcome]) -> None:
    case, outcome = CASES[name], outcomes[name]
    message = one_line(outcome.stderr)
    assert outcome.returncode == case.code, message
    assert "Traceback" not in outcome.stderr, outcome.stderr
    assert message.startswith("error: "), message
    assert message.count("error: ") == 1, message  # one message, not a cascade
    assert "fix: " in message, message
    for text in case.expect:
        assert text in message, f"{text!r} not in {message!r}"
    # Inputs untouched, nothing new anywhere under the case directory (and so no output), but
    # for the staging store of an error found after ingest.
    destination = outcome.directory / case.destination
    staging = f".{destination.name}.staging/"
    assert {k: v for k, v in outcome.after.items() if not k.startswith(staging)} == outcome.before
    if name == "destination_exists":
        assert sorted(p.name for p in destination.iterdir()) == ["keep.txt"]
    else:
        assert not destination.exists()
    left = leftovers(destination) if destination.parent.exists() else []
    if case.plan_error:
        assert left == [], left
    else:  # found after ingest: only the (resumable) staging store may stay
        assert left == [f".{destination.name}.staging"], left
