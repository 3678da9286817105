"""Better rounding end to end: same pack-quantized format (compressed-tensors reads it), and no
tensor's error above round-to-nearest's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compressor.config import build_config
from compressor.formats.compressed import decompress_checkpoint
from compressor.pipeline import compress_checkpoint
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
