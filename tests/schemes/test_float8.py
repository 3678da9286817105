"""FP8 (compressed-tensors `float-quantized`): compressed-tensors' own decompressor reads our
bytes back to exactly our decompression, the error figures agree with float64 math, and the
codes are the nearest E4M3 values of x / s."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.config import build_config
from compressor.formats.compressed import decompress_checkpoint
from compressor.formats.verify import verify_checkpoint
from compressor.pipeline import compress_checkpoint
from compressor.schemes.float8 import FP8_MAX, dequantize_fp8, fp8_scale, quantize_fp8
from compressor.testing.generate import LlamaShape, generate_llama_checkpoint
from tests.conftest import assert_same_tensors, ct_decompress, input_float64, load_dir

SHAPE = LlamaShape(hidden_size=256, intermediate_size=512, num_hidden_layers=2, vocab_size=256)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_llama_checkpoint(tmp_path_factory.mktemp("fp8") / "src", SHAPE, shard_mb=1)


def _all_e4m3_values() -> torch.Tensor:
    """Every finite float8_e4m3fn value, ascending."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return codes[torch.isfinite(codes)].unique()


def test_codes_are_the_nearest_e4m3_values_of_x_over_s() -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 300, generator=g) * torch.rand(64, 1, generator=g) * 3).to(torch.bfloat16)
    x[5] = 0  # an all-zero row: scale 1, codes 0, exact zeros back
    scale = fp8_scale(x)
    assert scale[5].item() == 1.0
    codes = quantize_fp8(x, scale).float()
    ratio = (x.double() / scale.double()).clamp(-FP8_MAX, FP8_MAX)
    grid = _all_e4m3_values().double()
    distance = (ratio.unsqueeze(-1) - grid).abs()
    best = distance.min(dim=-1).values
    mine = (ratio - codes.double()).abs()
    assert torch.all(mine <= best + 1e-12)  # never farther than the nearest code
    assert codes.abs().max() <= FP8_MAX
    x_hat = dequantize_fp8(quantize_fp8(x, scale), scale, torch.bfloat16)
    assert torch.all(x_hat[5] == 0)


@pytest.mark.parametrize("preset", ["fp8", "fp8a16"])
def test_compressed_tensors_decompresses_fp8_to_exactly_ours(
    src: Path, tmp_path: Path, preset: str
) -> None:
    out = tmp_path / preset
    compress_checkpoint(build_config(str(src), str(out), preset=preset, workers=0))
    assert verify_checkpoint(out).ok
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "float-quantized"
    group = qc["config_groups"]["group_0"]
    assert group["weights"]["type"] == "float" and group["weights"]["strategy"] == "channel"
    assert (group["input_activations"] is not None) == (preset == "fp8")
    stored = load_dir(out)
    assert stored["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    ours = load_dir(decompress_checkpoint(out, tmp_path / f"ours-{preset}"))
    theirs = load_dir(ct_decompress(out, tmp_path / f"ct-{preset}"))
    assert_same_tensors(ours, theirs)


def test_error_figures_agree_with_float64(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "fp8"
    compress_checkpoint(build_config(str(src), str(out), preset="fp8", workers=0))
    report = {t["name"]: t for t in json.loads((out / "compression.json").read_text())["tensors"]}
    original = input_float64(src)
    dense = load_dir(decompress_checkpoint(out, tmp_path / "dense", dtype="float32"))
    for name, row in report.items():
        if row["scheme"] == "copy":
            continue
        x = original[name]
        x_hat = dense[name].double().numpy()
        expected = math.sqrt(((x - x_hat) ** 2).sum() / (x**2).sum())
        assert row["relative_error"] == pytest.approx(expected, rel=1e-9), name
        assert row["relative_error"] < 0.05  # FP8 E4M3 per channel: a few percent at most
        assert np.isfinite(x_hat).all()


def test_transformers_loads_fp8_and_gives_our_decompressed_logits(
    src: Path, tmp_path: Path
) -> None:
    """transformers + compressed-tensors, dequantizing on load: exactly our dense model's logits.
    A plain load runs W8A8 (activations quantized to FP8 per token): close, not equal."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    out = tmp_path / "fp8"
    compress_checkpoint(build_config(str(src), str(out), preset="fp8", workers=0))
    dense = decompress_checkpoint(out, tmp_path / "dense")
    ids = torch.tensor([[1, 5, 9, 22, 7, 100]])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.bfloat16)(ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(dequantize=True)
        )
        assert torch.equal(loaded(ids).logits, ref)
        w8a8 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)(ids).logits
    assert torch.isfinite(w8a8).all()
    assert (w8a8 - ref).float().norm() / ref.float().norm() < 0.1
