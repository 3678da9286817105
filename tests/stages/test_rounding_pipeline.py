"""Better rounding end to end: same pack-quantized format (compressed-tensors reads it), and no
tensor's error above round-to-nearest's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compressor.config import build_config
from compressor.formats.compressed import decompress_checkpoint
from compressor.math import kernels, search_kernels
from compressor.pipeline import Pipeline, compress_checkpoint
from compressor.stages import compress as compress_stage
from compressor.stages.executor import SerialExecutor
from compressor.testing.generate import LlamaShape, generate_llama_checkpoint
from tests.conftest import assert_same_tensors, ct_decompress, load_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    shape = LlamaShape(hidden_size=256, intermediate_size=512, num_hidden_layers=1, vocab_size=256)
    return generate_llama_checkpoint(tmp_path_factory.mktemp("rounding") / "m", shape, shard_mb=1)


def _errors(out: Path) -> dict[str, float]:
    report = json.loads((out / "compression.json").read_text())
    return {t["name"]: t["relative_error"] for t in report["tensors"] if t["scheme"] != "copy"}


@pytest.mark.parametrize("preset", ["w4a16", "w4a16-asym"])
def test_search_modes_never_lose_to_rtn_and_stay_loadable(model, tmp_path, preset):
    rtn = tmp_path / "rtn"
    compress_checkpoint(build_config(str(model), str(rtn), preset=preset, workers=0))
    for mode in ("mse", "hqq"):
        out = tmp_path / mode
        compress_checkpoint(
            build_config(str(model), str(out), preset=preset, workers=0, rounding=mode)
        )
        base, better = _errors(rtn), _errors(out)
        assert all(better[n] <= base[n] for n in base), (mode, better, base)
        assert sum(better.values()) < sum(base.values())
        ours = decompress_checkpoint(out, tmp_path / f"{mode}-ours")
        theirs = ct_decompress(out, tmp_path / f"{mode}-ct")
        assert_same_tensors(load_dir(ours), load_dir(theirs))  # every shard, every tensor


@pytest.mark.parametrize(("rounding", "loaded"), [("rtn", ["rtn"]), ("hqq", ["rtn", "search"])])
def test_workers_load_the_search_kernels_only_for_a_plan_that_searches(
    model, tmp_path, monkeypatch, rounding, loaded
):
    """The searches' compile is the larger one (about a minute on 2 cores the first time on a
    machine): a run that does not search its scales never loads it."""
    calls: list[str] = []
    monkeypatch.setattr(kernels, "warm_up", lambda: calls.append("rtn"))
    monkeypatch.setattr(search_kernels, "warm_up", lambda: calls.append("search"))
    config = build_config(str(model), str(tmp_path / "out"), preset="w4a16", rounding=rounding)
    pipeline = Pipeline(config)
    pipeline.make_plan()
    assert any(compress_stage.takes_fused_kernels(t) for t in pipeline.plan.staged)
    pipeline.start_workers(SerialExecutor())
    assert calls == loaded
