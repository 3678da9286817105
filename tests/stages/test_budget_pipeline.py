"""The automatic budget end to end: the written bytes meet it, the output is ordinary
compressed-tensors mixed precision, and it does at least as well as the uniform preset of the
same size."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from compressor.config import build_config
from compressor.errors import ConfigError
from compressor.formats.compressed import decompress_checkpoint
from compressor.pipeline import compress_checkpoint
from compressor.testing.generate import LlamaShape, generate_llama_checkpoint
from tests.conftest import assert_same_tensors, ct_decompress, load_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    shape = LlamaShape(hidden_size=256, intermediate_size=768, num_hidden_layers=2, vocab_size=256)
    return generate_llama_checkpoint(tmp_path_factory.mktemp("budget") / "m", shape, shard_mb=1)


def _target_bits_from_files(out: Path) -> tuple[float, int]:
    """Stored bits per target weight, counted from the written tensors themselves."""
    bits, weights = 0, 0
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not iterable
                if name.rsplit(".", 1)[-1] in (
                    "weight_packed",
                    "weight_scale",
                    "weight_zero_point",
                    "weight_shape",
                ):
                    t = st.get_tensor(name)
                    bits += t.numel() * t.element_size() * 8
                    if name.endswith("weight_shape"):
                        weights += int(t.prod())
    return bits / weights, weights


def test_target_bits_is_met_by_the_written_bytes(model, tmp_path):
    for target in (4.25, 4.5):
        out = tmp_path / f"b{target}"
        compress_checkpoint(
            build_config(str(model), str(out), workers=0, budget={"target_bits": target})
        )
        measured, _ = _target_bits_from_files(out)
        summary = json.loads((out / "compression.json").read_text())["budget"]
        assert measured <= target
        assert math.isclose(measured, summary["bits_per_weight"], rel_tol=1e-12)
        config = json.loads((out / "config.json").read_text())["quantization_config"]
        ct = ct_decompress(out, tmp_path / f"ct{target}")
        ours = decompress_checkpoint(out, tmp_path / f"ours{target}")
        assert_same_tensors(load_dir(ours), load_dir(ct))
        assert config["format"] in ("pack-quantized", "mixed-precision")


def test_budget_of_uniform_size_does_no_worse_than_uniform(model, tmp_path):
    uniform = tmp_path / "uniform"
    compress_checkpoint(build_config(str(model), str(uniform), preset="w4a16", workers=0))
    bits, _ = _target_bits_from_files(uniform)
    auto = tmp_path / "auto"
    compress_checkpoint(
        build_config(str(model), str(auto), workers=0, budget={"target_bits": bits})
    )
    base = json.loads((uniform / "compression.json").read_text())["tensors"]
    mine = json.loads((auto / "compression.json").read_text())["tensors"]

    def squared(rows):  # Σ ‖W − Ŵ‖², from each tensor's relative error and its norm
        return {t["name"]: t["relative_error"] for t in rows if t["scheme"] != "copy"}

    weights = {}
    for f in model.glob("*.safetensors"):
        weights.update(load_file(f))
    norm = {n: float(weights[n].double().pow(2).sum()) for n in squared(base)}
    err_uniform = sum(e**2 * norm[n] for n, e in squared(base).items())
    err_auto = sum(e**2 * norm[n] for n, e in squared(mine).items())
    assert err_auto <= err_uniform * (1 + 1e-9)


def test_max_error_and_infeasible_budget(model, tmp_path):
    out = tmp_path / "err"
    compress_checkpoint(build_config(str(model), str(out), workers=0, budget={"max_error": 0.2}))
    summary = json.loads((out / "compression.json").read_text())["budget"]
    assert summary["relative_error"] <= 0.2
    with pytest.raises(ConfigError, match=r"budget --target-bits 1 cannot be met") as caught:
        compress_checkpoint(
            build_config(str(model), str(tmp_path / "x"), workers=0, budget={"target_bits": 1.0})
        )
    # said in the user's units: bits per weight, not the run's total bit count
    assert re.search(r"already stores \d\.\d{4} bits per weight", str(caught.value))
    assert "raise --target-bits to at least" in str(caught.value)
    assert not (tmp_path / "x").exists()
