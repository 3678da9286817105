"""FP8 (compressed-tensors `float-quantized`): compressed-tensors' own decompressor reads our
bytes back to exactly our decompression, the error figures agree with float64 math, and the
codes are the nearest E4M3 values of x / s."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compressor.config import build_config
from compressor.formats.compressed import decompress_checkpoint
from compressor.formats.verify import verify_checkpoint
from compressor.pipeline import compress_checkpoint
from compressor.schemes.float8 import FP8_MAX, dequantize_fp8, fp8_scale, quantize_fp8
from compressor.testing.generate import LlamaShape, generate_llama_checkpoint
from tests.conftest import (
    assert_same_tensors,
    ct_decompress,
    load_dir,
    reported_vs_float64,
)

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


@pytest.mark.parametrize("preset", ["fp8", "fp8a16", "fp8-block"])
def test_compressed_tensors_decompresses_fp8_to_exactly_ours(
    src: Path, tmp_path: Path, preset: str
) -> None:
    out = tmp_path / preset
    compress_checkpoint(build_config(str(src), str(out), preset=preset, workers=0))
    assert verify_checkpoint(out).ok
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "float-quantized"
    group = qc["config_groups"]["group_0"]
    strategy = "block" if preset == "fp8-block" else "channel"
    assert group["weights"]["type"] == "float" and group["weights"]["strategy"] == strategy
    assert (group["input_activations"] is not None) == (preset != "fp8a16")
    stored = load_dir(out)
    assert stored["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    ours = load_dir(decompress_checkpoint(out, tmp_path / f"ours-{preset}"))
    theirs = load_dir(ct_decompress(out, tmp_path / f"ct-{preset}"))
    assert_same_tensors(ours, theirs)


def test_error_figures_agree_with_float64(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "fp8"
    compress_checkpoint(build_config(str(src), str(out), preset="fp8", workers=0))
    for name, reported, expected in reported_vs_float64(src, out, tmp_path / "dense"):
        assert reported == pytest.approx(expected, rel=1e-9), name
        assert reported < 0.05  # FP8 E4M3 per channel: a few percent at most


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


def test_fp8_block_with_partial_blocks_and_several_chunks(tmp_path: Path) -> None:
    """A height that 128 does not divide (2880 rows: 22.5 blocks) cut into two chunks (2048 +
    832 rows): block scales of partial blocks, chunks aligned to 128 rows, and compressed-tensors'
    decompression equal to ours. A width that 128 does not divide (down_proj's 2880 inputs)
    falls back to per-channel, noted (compressed-tensors cannot decompress a partial column
    block, and servers split inputs by block)."""
    shape = LlamaShape(hidden_size=256, intermediate_size=2880, num_hidden_layers=1, vocab_size=64)
    src = generate_llama_checkpoint(tmp_path / "src", shape, seed=4)
    out = tmp_path / "out"
    report = compress_checkpoint(
        build_config(str(src), str(out), preset="fp8-block", workers=0, chunk_mb=1)
    )
    assert any(
        "down_proj.weight: fp8 block 128 → per-channel (2880 inputs)" in n for n in report.notes
    )
    assert verify_checkpoint(out).ok
    stored = load_dir(out)
    assert stored["model.layers.0.mlp.gate_proj.weight_scale"].shape == (23, 2)
    assert stored["model.layers.0.mlp.down_proj.weight_scale"].shape == (256, 1)
    ours = load_dir(decompress_checkpoint(out, tmp_path / "ours"))
    theirs = load_dir(ct_decompress(out, tmp_path / "ct"))
    assert_same_tensors(ours, theirs)
    # each block's scale is its own absmax / 448 (float32 math, one rounding)
    x = load_dir(src)["model.layers.0.mlp.gate_proj.weight"]
    block = x[2816:2880, 128:256].float()  # the partial last row block, in the second chunk
    expected = (block.abs().max() / FP8_MAX).to(x.dtype)
    assert stored["model.layers.0.mlp.gate_proj.weight_scale"][22, 1] == expected


@pytest.mark.parametrize("preset", ["fp8a16", "fp8-block"])
def test_transformers_loads_fp8a16_and_fp8_block(src: Path, tmp_path: Path, preset: str) -> None:
    """A plain `from_pretrained` of the weight-only and the block-scaled outputs: close to our
    dense model (fp8-block also runs its activations in FP8, per group of 128)."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    out = tmp_path / preset
    compress_checkpoint(build_config(str(src), str(out), preset=preset, workers=0))
    dense = decompress_checkpoint(out, tmp_path / "dense")
    ids = torch.tensor([[1, 5, 9, 22, 7, 100]])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.bfloat16)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)(ids).logits
    assert torch.isfinite(got).all()
    assert (got - ref).float().norm() / ref.float().norm() < 0.1
