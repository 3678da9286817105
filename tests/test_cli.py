"""The real console script, run as a subprocess: exit codes, JSON output, files written."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressor.formats.compressed import decompress_checkpoint, inspect_checkpoint
from tests.conftest import assert_same_tensors, ct_decompress, load_dir, tree_digest

SCRIPT = Path(sys.executable).with_name("compressor")


def run_cli(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "compressor.cli"]
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "COLUMNS", "LINES")}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    done = subprocess.run(
        [*command, *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )
    if check:
        assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def cli_compressed(llama_src: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    dest = tmp_path_factory.mktemp("cli") / "w4a16"
    done = run_cli("compress", llama_src, dest, "--preset", "w4a16", "--workers", "0", "--json")
    return dest, json.loads(done.stdout)


def test_compress_json_report(cli_compressed, llama_src):
    dest, report = cli_compressed
    assert report["destination"] == str(dest.resolve())
    assert report["input_bytes"] == sum(t.nbytes for t in load_dir(llama_src).values())
    assert report["output_bytes"] == sum(p.stat().st_size for p in dest.glob("*.safetensors"))
    assert report["ratio"] == pytest.approx(report["input_bytes"] / report["output_bytes"])
    assert report["notes"] == []
    assert {"plan", "ingest", "compress", "write", "publish", "total"} <= set(report["timings_s"])
    rows = {t["name"]: t for t in report["tensors"]}
    assert len(rows) == 21
    assert rows["lm_head.weight"]["scheme"] == "copy" and rows["lm_head.weight"]["sqnr_db"] is None
    assert rows["model.layers.1.mlp.down_proj.weight"]["scheme"] == "int4 sym g128"
    assert 0 < rows["model.layers.1.mlp.down_proj.weight"]["relative_error"] < 0.25
    written = json.loads((dest / "compression.json").read_text())
    assert written["config"]["preset"] == "w4a16" and written["config"]["workers"] == 0
    manifest = json.loads((dest / "manifest.json").read_text())["files"]
    digest = tree_digest(dest)
    assert {rel: f["sha256"] for rel, f in manifest.items()} == {
        rel: sha for rel, sha in digest.items() if rel != "manifest.json"
    }
    assert "generation_config.json" in manifest


def test_inspect_json(cli_compressed, llama_src):
    dest, _ = cli_compressed
    info = json.loads(run_cli("inspect", dest, "--json").stdout)
    assert info["quantized"] == 14
    assert info == json.loads(json.dumps(inspect_checkpoint(dest)))
    dense = json.loads(run_cli("inspect", llama_src, "--json").stdout)
    assert dense["quantized"] == 0 and dense["total_bytes"] == info["dense_bytes"]


def test_decompress_float32(cli_compressed, llama_src, tmp_path):
    dest, _ = cli_compressed
    run_cli("decompress", dest, tmp_path / "dense", "--dtype", "float32")
    dense = load_dir(tmp_path / "dense")
    assert {t.dtype for t in dense.values()} == {torch.float32}
    native = load_dir(decompress_checkpoint(dest, tmp_path / "native"))  # bf16, the scales' dtype
    source = load_dir(llama_src)
    assert sorted(dense) == sorted(native) == sorted(source)
    for name, t in dense.items():
        assert torch.equal(t, native[name].float()), name  # widening bf16 → f32 is exact
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(dense[name], source[name].float()), name
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "float32"
    assert not (tmp_path / "dense" / "compression.json").exists()
    # Decompressing onto an existing directory is refused.
    again = run_cli("decompress", dest, tmp_path / "dense", check=False)
    assert again.returncode != 0 and "already exists" in again.stderr


def _squashed(text: str) -> str:
    """`text` without any whitespace: rich folds long lines at the terminal width (80 when not a
    terminal), at spaces or inside words, so compare messages with whitespace removed."""
    return "".join(text.split())


def _says(output: str, message: str) -> bool:
    return _squashed(message) in _squashed(output)


def test_missing_source(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    done = run_cli("compress", missing, tmp_path / "out", "--workers", "0", check=False)
    assert done.returncode == 2
    assert _says(done.stderr, f"{missing}: does not exist")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_error_message_keeps_long_path_intact(tmp_path):
    missing = tmp_path / ("a-rather-long-directory-name-" * 3) / "no-such-checkpoint"
    done = run_cli("compress", missing, tmp_path / "out", "--workers", "0", check=False)
    assert done.returncode == 2
    assert str(missing) in done.stderr


def test_error_message_keeps_brackets_in_path(tmp_path):
    missing = tmp_path / "model[v2]"
    done = run_cli("compress", missing, tmp_path / "out", "--workers", "0", check=False)
    assert done.returncode == 2
    assert _says(done.stderr, f"{missing}: does not exist")


def test_error_message_with_closing_tag_in_path(tmp_path):
    missing = tmp_path / "ckpt[" / "]v2"  # the path text holds "[/]"
    done = run_cli("compress", missing, tmp_path / "out", "--workers", "0", check=False)
    assert "Traceback" not in done.stderr
    assert done.returncode == 2
    assert _says(done.stderr, f"{missing}: does not exist")


def test_success_with_closing_tag_in_destination(llama_src, tmp_path):
    dest = tmp_path / "runs[" / "]w4a16"  # the path text holds "[/]"
    done = run_cli("compress", llama_src, dest, "--workers", "0", check=False)
    assert (dest / "manifest.json").is_file()  # the output is there either way
    assert done.returncode == 0, done.stderr[-400:]
    assert _says(done.stdout, str(dest.resolve()))


def test_existing_destination(llama_src, tmp_path):
    dest = tmp_path / "exists"
    dest.mkdir()
    done = run_cli("compress", llama_src, dest, "--workers", "0", check=False)
    assert done.returncode == 3
    assert _says(done.stderr, f"{dest}: the destination already exists")
    assert "--overwrite" in done.stderr
    assert list(dest.iterdir()) == []

    run_cli(
        "compress", llama_src, dest, "--preset", "w8a16", "--workers", "0", "--overwrite", "--quiet"
    )
    assert json.loads((dest / "config.json").read_text())["quantization_config"]["config_groups"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left beside


RECIPE = """\
version: 1
quantization:
  - targets: ["re:.*mlp\\\\..*"]
    bits: 4
    strategy: group
    group_size: 64
  - targets: ["re:.*self_attn\\\\..*"]
    bits: 8
    strategy: channel
"""


def test_recipe_mixed_precision(llama_src, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    dest = tmp_path / "mixed"
    done = run_cli("compress", llama_src, dest, "--recipe", recipe, "--workers", "0", "--json")
    rows = {t["name"]: t["scheme"] for t in json.loads(done.stdout)["tensors"]}
    assert rows["model.layers.0.mlp.gate_proj.weight"] == "int4 sym g64"
    assert rows["model.layers.1.self_attn.o_proj.weight"] == "int8 sym channel"
    assert rows["lm_head.weight"] == rows["model.norm.weight"] == "copy"

    qc = json.loads((dest / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == "mixed-precision"
    assert len(qc["config_groups"]) == 2
    by_bits = {g["weights"]["num_bits"]: g for g in qc["config_groups"].values()}
    assert (
        by_bits[4]["weights"]["group_size"] == 64 and by_bits[4]["weights"]["strategy"] == "group"
    )
    assert (
        by_bits[8]["weights"]["strategy"] == "channel"
        and by_bits[8]["weights"]["group_size"] is None
    )
    assert sorted(by_bits[4]["targets"]) == sorted(
        f"model.layers.{k}.mlp.{p}" for k in range(2) for p in ("gate_proj", "up_proj", "down_proj")
    )
    assert sorted(by_bits[8]["targets"]) == sorted(
        f"model.layers.{k}.self_attn.{p}_proj" for k in range(2) for p in "qkvo"
    )
    assert json.loads((dest / "compression.json").read_text())["config"]["preset"] == "recipe"

    ours = load_dir(decompress_checkpoint(dest, tmp_path / "ours"))
    assert_same_tensors(load_dir(ct_decompress(dest, tmp_path / "ct")), ours)


# -- every compress option reaches the config -------------------------------------------------
class _Captured(Exception):
    def __init__(self, config: object) -> None:
        self.config = config


def _config_of(monkeypatch, *args: str | Path):
    """The RunConfig `compressor compress ARGS` builds (the pipeline is replaced by a catcher)."""
    from typer.testing import CliRunner

    import compressor.pipeline
    from compressor.cli import app

    def capture(config, progress=None):
        raise _Captured(config)

    monkeypatch.setattr(compressor.pipeline, "compress_checkpoint", capture)
    result = CliRunner().invoke(app, ["compress", *map(str, args)])
    assert isinstance(result.exception, _Captured), result.output
    return result.exception.config


def test_every_compress_option_reaches_the_config(monkeypatch, llama_src, tmp_path):
    config = _config_of(
        monkeypatch, llama_src, tmp_path / "out",
        "--preset", "w4a16", "--bits", "3", "--strategy", "group", "--group-size", "64",
        "--rounding", "mse", "--target-bits", "4.25",
        "--sparsity", "0.3", "--sparsity-scope", "global", "--importance", "magnitude",
        "--structure", "row", "--normalize-importance",
        "--workers", "1", "--worker-kind", "processes", "--staging", tmp_path / "stg",
        "--chunk-mb", "3", "--max-shard-mb", "7", "--strict-groups", "--overwrite",
        "--keep-staging", "--skip-nonfinite", "--evaluate", "--eval-tokens", "64",
    )  # fmt: skip
    (rule,) = config.recipe.quantization
    assert (rule.bits, rule.strategy, rule.group_size, rule.rounding) == (3, "group", 64, "mse")
    p = config.recipe.pruning
    assert (p.sparsity, p.scope, p.importance, p.structure, p.normalize) == (
        0.3, "global", "magnitude", "row", True,
    )  # fmt: skip
    assert config.recipe.budget.target_bits == 4.25 and config.recipe.budget.max_error is None
    assert (config.workers, config.worker_kind, config.staging_dir) == (
        1, "processes", str(tmp_path / "stg"),
    )  # fmt: skip
    assert (config.chunk_mb, config.max_shard_mb, config.eval_tokens) == (3, 7, 64)
    assert config.strict_groups and config.overwrite and config.keep_staging
    assert config.skip_nonfinite and config.evaluate


def test_side_inputs_sparse_format_and_error_budget_reach_the_config(
    monkeypatch, llama_src, tmp_path
):
    config = _config_of(
        monkeypatch, llama_src, tmp_path / "out", "--preset", "dense",
        "--importance", "gradient", "--gradients", llama_src, "--sparse-format", "bitmask",
        "--structure", "2:4", "--max-error", "0.1",
    )  # fmt: skip
    p = config.recipe.pruning
    assert (p.importance, p.gradients, p.sparse_format, p.structure) == (
        "gradient", str(llama_src), "bitmask", "2:4",
    )  # fmt: skip
    assert config.recipe.budget.max_error == 0.1 and config.recipe.budget.target_bits is None
    config = _config_of(
        monkeypatch, llama_src, tmp_path / "out", "--importance", "activation",
        "--activations", tmp_path / "norms.safetensors",
    )  # fmt: skip
    assert config.recipe.pruning.activations == str(tmp_path / "norms.safetensors")


def test_run_form_preset_decides_unless_the_recipe_brings_rules() -> None:
    """Issue 15: the form sends a recipe object with every run; preset w8a16 with a recipe of
    no rules produced int4 (the default recipe's) while named w8a16."""
    from pydantic import ValidationError

    from compressor.config import PRESETS, RunConfig

    base = {"source": "/x", "destination": "/y", "preset": "w8a16"}
    form = RunConfig.model_validate({**base, "recipe": {"version": 1, "pruning": None}})
    assert form.recipe.quantization == PRESETS["w8a16"].quantization
    pruned = RunConfig.model_validate({**base, "recipe": {"pruning": {"sparsity": 0.3}}})
    assert pruned.recipe.quantization == PRESETS["w8a16"].quantization
    assert pruned.recipe.pruning is not None and pruned.recipe.pruning.sparsity == 0.3
    rules = [{"targets": ["Linear"], "bits": 4, "strategy": "group", "group_size": 64}]
    with pytest.raises(ValidationError, match="disagree"):
        RunConfig.model_validate({**base, "recipe": {"quantization": rules}})
    own = RunConfig.model_validate({**base, "preset": "recipe", "recipe": {"quantization": rules}})
    assert own.recipe.quantization[0].group_size == 64
    same = RunConfig.model_validate(
        {**base, "recipe": {"quantization": PRESETS["w8a16"].model_dump()["quantization"]}}
    )
    assert same.recipe.quantization == PRESETS["w8a16"].quantization


def test_quiet_prints_only_where_the_output_is(tmp_path: Path) -> None:
    """A script needs the output's location; --quiet printed nothing at all."""
    from compressor.testing.generate import LlamaShape, generate_llama_checkpoint

    shape = LlamaShape(hidden_size=128, intermediate_size=256, num_hidden_layers=1, vocab_size=64)
    src = generate_llama_checkpoint(tmp_path / "src", shape)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "compressor.cli", "compress", str(src), str(out), "--quiet",
         "--workers", "0"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out) and done.stderr == ""


@pytest.mark.slow
def test_a_prefect_run_prints_no_distributed_chatter(tmp_path: Path) -> None:
    """`--prefect` with a real Dask cluster: Prefect shows the run's log in the terminal, and
    distributed's ~35 INFO lines per run (scheduler start, worker registration...) used to
    drown it. With --quiet the output is the destination only."""
    from compressor.testing.generate import LlamaShape, generate_llama_checkpoint

    shape = LlamaShape(hidden_size=128, intermediate_size=256, num_hidden_layers=1, vocab_size=64)
    src = generate_llama_checkpoint(tmp_path / "src", shape)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "compressor.cli", "compress", str(src), str(out), "--prefect",
         "--workers", "1", "--quiet"],
        capture_output=True, text=True, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    chatter = [line for line in (done.stdout + done.stderr).splitlines() if "distributed." in line]
    assert not chatter, chatter
    assert done.stdout.strip().splitlines()[-1] == str(out)


def test_verbose_brings_the_clusters_info_lines_back(tmp_path: Path) -> None:
    """The embedded cluster's INFO lines are off by default; --verbose shows them (on stderr),
    for whoever debugs the cluster itself."""
    from compressor.testing.generate import LlamaShape, generate_llama_checkpoint

    shape = LlamaShape(hidden_size=128, intermediate_size=256, num_hidden_layers=1, vocab_size=64)
    src = generate_llama_checkpoint(tmp_path / "src", shape)
    chatter = {}
    for flag in ("--no-verbose", "--verbose"):
        done = run_cli(
            "compress", src, tmp_path / flag, "--workers", "1", "--worker-kind", "processes",
            "--quiet", flag,
        )  # fmt: skip
        assert done.stdout.strip() == str(tmp_path / flag)
        chatter[flag] = [line for line in done.stderr.splitlines() if "distributed." in line]
    assert chatter["--no-verbose"] == []
    assert any(" - INFO - " in line for line in chatter["--verbose"]), chatter["--verbose"]


def test_history_with_the_prefect_api_down_is_one_clear_message() -> None:
    """Not "this is a bug": the API at PREFECT_API_URL refuses the connection."""
    with socket.socket() as s:  # a loopback port nothing listens on once released
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    done = subprocess.run(
        [sys.executable, "-m", "compressor.cli", "history", "/models/x"],
        capture_output=True, text=True, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    out = done.stdout + done.stderr
    assert "cannot read the history from Prefect" in out and f"127.0.0.1:{port}" in out, out
    assert "this is a bug" not in out and "Traceback" not in out
