"""FP4 (compressed-tensors `nvfp4-pack-quantized`, `mxfp4-pack-quantized`): the codes and scales
agree with compressed-tensors' own rounding functions, its decompressor and transformers read
our bytes back to exactly our decompression, fused groups share NVFP4's global scale, and the
error figures agree with float64 math."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.config import QuantRule, Recipe, build_config
from compressor.errors import ConfigError
from compressor.formats.compressed import decompress_checkpoint
from compressor.formats.verify import verify_checkpoint
from compressor.pipeline import compress_checkpoint
from compressor.schemes.float4 import (
    decode_fp4,
    encode_fp4,
    mx_exponents,
    pack_fp4,
    unpack_fp4,
)
from compressor.testing.generate import LlamaShape, generate_llama_checkpoint
from tests.conftest import (
    assert_same_tensors,
    ct_decompress,
    input_float64,
    load_dir,
    reported_vs_float64,
)

SHAPE = LlamaShape(hidden_size=256, intermediate_size=512, num_hidden_layers=2, vocab_size=256)
PRESETS = ["nvfp4a16", "mxfp4a16"]


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_llama_checkpoint(tmp_path_factory.mktemp("fp4") / "src", SHAPE, shard_mb=1)


@pytest.fixture(scope="module")
def outputs(src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp4-out")
    made = {}
    for preset in PRESETS:
        made[preset] = root / preset
        compress_checkpoint(build_config(str(src), str(made[preset]), preset=preset, workers=0))
    return made


def test_codes_round_to_the_nearest_e2m1_value_as_compressed_tensors_does() -> None:
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

    g = torch.Generator().manual_seed(0)
    v = torch.randn(4096, generator=g) * 3
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    v = torch.cat([v, midpoints, -midpoints, torch.tensor([0.0, 6.0, 7.5, -100.0])])
    ours = decode_fp4(encode_fp4(v))
    theirs = cast_to_fp4(v.clamp(-6, 6).clone())
    assert torch.equal(ours, theirs)
    # ties go to the even code: 0.25 → 0, 0.75 → 1, 1.25 → 1, 1.75 → 2, 2.5 → 2, 3.5 → 4, 5 → 4
    assert decode_fp4(encode_fp4(midpoints)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert encode_fp4(torch.tensor([-0.1])).item() == 0  # zero is code 0, never −0


def test_pack_puts_even_columns_in_the_low_nibble() -> None:
    codes = torch.randint(0, 16, (5, 32), dtype=torch.uint8)
    packed = pack_fp4(codes)
    assert packed.shape == (5, 16)
    assert torch.equal(packed[:, 0] & 0xF, codes[:, 0]) and torch.equal(
        packed[:, 0] >> 4, codes[:, 1]
    )
    assert torch.equal(unpack_fp4(packed), codes)


def test_mx_exponents_match_compressed_tensors() -> None:
    from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(64, 256, generator=g) * torch.rand(64, 1, generator=g) * 4).bfloat16()
    x[3, :32] = 0  # an all-zero group
    x[4:6, :32] = 0.01
    x[4, 0] = 1.75  # a group's absmax exactly at the rounding-up point: 2^1
    x[5, 0] = 1.7421875  # just below it (the largest bf16 < 1.75): 2^0
    ours = mx_exponents(x)
    absmax = x.abs().reshape(64, 8, 32).amax(-1)
    theirs = generate_mx_scales(absmax).clamp(0, 255).to(torch.uint8)
    nonzero = absmax > 0
    assert torch.equal(ours[nonzero], theirs[nonzero])
    assert ours[3, 0] == 0
    assert ours[4, 0] == 127 + 1 - 2 and ours[5, 0] == 127 + 0 - 2


@pytest.mark.parametrize("preset", PRESETS)
def test_compressed_tensors_decompresses_fp4_to_exactly_ours(
    outputs: dict[str, Path], tmp_path: Path, preset: str
) -> None:
    out = outputs[preset]
    assert verify_checkpoint(out).ok
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == f"{preset[:5]}-pack-quantized"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (weights["type"], weights["num_bits"]) == ("float", 4)
    assert weights["group_size"] == (16 if preset == "nvfp4a16" else 32)
    stored = load_dir(out)
    packed = stored["model.layers.0.mlp.up_proj.weight_packed"]
    assert packed.dtype == torch.uint8 and packed.shape == (512, 128)
    ours = load_dir(decompress_checkpoint(out, tmp_path / "ours"))
    theirs = load_dir(ct_decompress(out, tmp_path / "ct"))
    assert_same_tensors(ours, theirs)


def test_fused_groups_share_one_nvfp4_global_scale(src: Path, outputs: dict[str, Path]) -> None:
    """vLLM keeps one global scale for q/k/v and one for gate/up: each is 448·6 over the
    absmax of the whole group; o_proj and down_proj have their own."""
    stored = load_dir(outputs["nvfp4a16"])
    original = input_float64(src)
    layer = "model.layers.1"
    groups = [
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("self_attn.o_proj",),
        ("mlp.down_proj",),
    ]
    for members in groups:
        absmax = max(np.abs(original[f"{layer}.{m}.weight"]).max() for m in members)
        expected = np.float32(np.float32(2688.0) / np.float32(absmax))
        for m in members:
            g = stored[f"{layer}.{m}.weight_global_scale"]
            assert g.dtype == torch.float32 and g.shape == (1,)
            assert g.item() == expected, (m, g.item(), expected)


@pytest.mark.parametrize("preset", PRESETS)
def test_error_figures_agree_with_float64(
    src: Path, outputs: dict[str, Path], tmp_path: Path, preset: str
) -> None:
    for name, reported, expected in reported_vs_float64(src, outputs[preset], tmp_path / "d"):
        assert reported == pytest.approx(expected, rel=1e-9), name
        assert 0.02 < reported < 0.2  # 4-bit floats with small groups


@pytest.mark.parametrize("preset", PRESETS)
def test_transformers_loads_fp4_and_gives_our_decompressed_logits(
    outputs: dict[str, Path], tmp_path: Path, preset: str
) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    out = outputs[preset]
    dense = decompress_checkpoint(out, tmp_path / "dense")
    ids = torch.tensor([[1, 5, 9, 22, 7, 100]])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.bfloat16)(ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)(ids).logits
    assert torch.equal(loaded, ref)


def test_a_width_no_group_divides_stays_dense_and_is_noted(tmp_path: Path) -> None:
    """down_proj with 520 inputs (520 % 16 = 8): the format has no partial groups, so it stays
    dense, listed in `ignore`; --strict-groups refuses instead."""
    shape = LlamaShape(hidden_size=256, intermediate_size=520, num_hidden_layers=1, vocab_size=64)
    src = generate_llama_checkpoint(tmp_path / "src", shape, seed=3)
    out = tmp_path / "out"
    report = compress_checkpoint(build_config(str(src), str(out), preset="nvfp4a16", workers=0))
    assert any("down_proj.weight: nvfp4 → left dense (520 inputs)" in n for n in report.notes)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.down_proj" in qc["ignore"]
    stored = load_dir(out)
    assert stored["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert verify_checkpoint(out).ok
    with pytest.raises(ConfigError, match="nvfp4 groups of 16 do not divide the input dimension"):
        compress_checkpoint(
            build_config(
                str(src), str(tmp_path / "strict"), preset="nvfp4a16", workers=0, strict_groups=True
            )
        )


def test_recipes_refuse_what_fp4_cannot_store() -> None:
    with pytest.raises(ValueError, match="method nvfp4 has fixed 4-bit E2M1 codes"):
        QuantRule(method="nvfp4", bits=8)
    with pytest.raises(ValueError, match="drop group_size 64"):
        QuantRule(method="mxfp4", group_size=64)
    with pytest.raises(ValueError, match="cannot be mixed with method int"):
        Recipe(quantization=[QuantRule(method="nvfp4"), QuantRule(targets=["lm_head"])])


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_kernel_gives_the_torch_paths_bytes(name: str, dtype: torch.dtype) -> None:
    """CPU chunks of 16-bit weights take `kernels.fp4_pack_16`; GPU workers and 32-bit
    weights the torch path. Same packed codes and scales, same error figures."""
    from compressor.schemes import ChunkInput, by_name
    from compressor.schemes.float4 import nvfp4_global_scale

    g = torch.Generator().manual_seed(7)
    x = (torch.randn(96, 512, generator=g) * torch.rand(96, 1, generator=g) * 0.1).to(dtype)
    x[4, :64] = 0  # all-zero groups
    pruned = x.clone()
    pruned[10:20, ::3] = 0  # pruning: error measured against x
    scheme = by_name(name)
    global_scale = nvfp4_global_scale(float(x.float().abs().max())) if name == "nvfp4" else None
    chunk = ChunkInput(x, pruned, 0, 0, 0, scale=global_scale, tensor="t")
    fused_packed, fused_scale, fused_error = scheme._encode_fused(chunk)  # type: ignore[attr-defined]
    torch_packed, torch_scale, torch_error = scheme._encode_torch(  # type: ignore[attr-defined]
        chunk, torch.device("cpu")
    )
    assert np.array_equal(fused_packed, torch_packed)
    assert torch.equal(fused_scale.view(torch.uint8), torch_scale.view(torch.uint8))
    assert fused_error.max_abs_error == torch_error.max_abs_error
    assert fused_error.sq_error == pytest.approx(torch_error.sq_error, rel=1e-12)
    assert fused_error.sq_signal == pytest.approx(torch_error.sq_signal, rel=1e-12)
    bad = x.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        scheme._encode_fused(ChunkInput(bad, bad, 0, 0, 0, scale=global_scale, tensor="t"))  # type: ignore[attr-defined]
