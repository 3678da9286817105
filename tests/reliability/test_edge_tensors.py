"""Unusual but valid tensors, through the real CLI: all zeros, one element, a huge dimension, a
row narrower than the group, and NaN/Inf with `--skip-nonfinite`. The output must load with
compressed-tensors' own decompressor (`convert_checkpoint` + `CompressedTensorsDequantizer`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from compressor.formats.verify import verify_checkpoint
from tests.reliability._util import compress_args, leftovers, one_line, run_cli, tree_digest

P = "model.layers.0.mlp"
DENSE = f"{P}.up_proj.weight"  # an ordinary (256, 512) weight
ZEROS = f"{P}.zero_proj.weight"  # all zeros: scale must stay finite and non-zero
ONE = f"{P}.tiny_proj.weight"  # (1, 1)
WIDE = f"{P}.wide_proj.weight"  # (32, 200000): 200000 inputs, g128 → g64
NARROW = f"{P}.narrow_proj.weight"  # (64, 96): rows narrower than the group of 128 → g32
NAN = f"{P}.down_proj.weight"  # holds a NaN and an Inf
NORM = "model.norm.weight"


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    nan = torch.randn(512, 256, generator=g)
    nan[3, 5] = float("nan")
    nan[100, 0] = float("inf")
    return {
        DENSE: torch.randn(256, 512, generator=g).to(torch.bfloat16),
        ZEROS: torch.zeros(64, 256, dtype=torch.bfloat16),
        ONE: torch.tensor([[-0.75]], dtype=torch.bfloat16),
        WIDE: (torch.randn(32, 200_000, generator=g) * 0.02).to(torch.bfloat16),
        NARROW: torch.randn(64, 96, generator=g).to(torch.bfloat16),
        NAN: nan.to(torch.bfloat16),
        NORM: torch.ones(256, dtype=torch.bfloat16),
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("edge")
    src = root / "src"
    src.mkdir()
    tensors = _inputs()
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    before = tree_digest(src)
    dest = root / "out"
    done = run_cli(compress_args(src, dest, "--workers", "0", "--skip-nonfinite", "--json"))
    assert done.returncode == 0, done.stderr
    assert tree_digest(src) == before
    assert leftovers(dest) == []
    return dest, src, tensors


@pytest.fixture(scope="module")
def ct_dense(run: tuple[Path, Path, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The output decompressed by compressed-tensors alone (no code of ours)."""
    from compressed_tensors.entrypoints.convert import (
        CompressedTensorsDequantizer,
        convert_checkpoint,
    )

    out = run[0]
    dense = out.parent / "ct-dense"
    convert_checkpoint(
        str(out), str(dense), CompressedTensorsDequantizer(str(out)), max_workers=1, device="cpu"
    )
    return load_file(str(dense / "model.safetensors"))


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy()


def test_refused_without_the_option(run: tuple[Path, Path, dict[str, torch.Tensor]]) -> None:
    _, src, _ = run
    dest = src.parent / "refused"
    done = run_cli(compress_args(src, dest, "--workers", "0"))
    message = one_line(done.stderr)
    assert done.returncode == 2 and NAN in message and "2 NaN or infinite" in message
    assert "--skip-nonfinite" in message and not dest.exists()


def test_nonfinite_tensor_is_copied_and_noted(
    run: tuple[Path, Path, dict[str, torch.Tensor]],
) -> None:
    out, _, inputs = run
    tensors = load_file(str(out / "model.safetensors"))
    assert f"{P}.down_proj.weight_packed" not in tensors
    assert np.array_equal(_bits(tensors[NAN]), _bits(inputs[NAN]))  # bit for bit, NaN included
    report = json.loads((out / "compression.json").read_text())
    assert report["config"]["skip_nonfinite"] is True
    (row,) = [t for t in report["tensors"] if t["name"] == NAN]
    assert row["scheme"] == "copy" and "--skip-nonfinite" in row["note"]
    assert any(NAN in note and "NaN" in note for note in report["notes"])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert f"{P}.down_proj" in qc["ignore"]  # loaders must treat it as a dense layer
    assert all(f"{P}.down_proj" not in g["targets"] for g in qc["config_groups"].values())
    assert verify_checkpoint(out).ok


def test_all_zero_tensor_decompresses_to_zeros(
    run: tuple[Path, Path, dict[str, torch.Tensor]], ct_dense: dict[str, torch.Tensor]
) -> None:
    out, _, _ = run
    scale = load_file(str(out / "model.safetensors"))[f"{P}.zero_proj.weight_scale"].float()
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(ct_dense[ZEROS], torch.zeros(64, 256, dtype=torch.bfloat16))


@pytest.mark.parametrize("name", [DENSE, ONE, WIDE, NARROW])
def test_quantized_within_half_a_step(
    name: str,
    run: tuple[Path, Path, dict[str, torch.Tensor]],
    ct_dense: dict[str, torch.Tensor],
) -> None:
    out, _, inputs = run
    module = name.removesuffix(".weight")
    parts = load_file(str(out / "model.safetensors"))
    scale = parts[f"{module}.weight_scale"].float()
    x, y = inputs[name].float(), ct_dense[name].float()
    assert y.shape == x.shape
    groups = scale.shape[1]
    step = scale.repeat_interleave(-(-x.shape[1] // groups), dim=1)[:, : x.shape[1]]
    # round-to-nearest: at most half a step, plus bf16 rounding of the dequantized value
    assert ((y - x).abs() <= step / 2 + x.abs() * 2**-7 + 1e-6).all()


def test_group_fallbacks_are_noted(run: tuple[Path, Path, dict[str, torch.Tensor]]) -> None:
    out, _, _ = run
    notes = json.loads((out / "compression.json").read_text())["notes"]
    assert f"{WIDE}: group 128 → 64 (200000 inputs)" in notes
    assert f"{NARROW}: group 128 → 32 (96 inputs)" in notes
    assert f"{ONE}: group 128 → per-channel (1 inputs)" in notes
