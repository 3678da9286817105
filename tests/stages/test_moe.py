"""MoE checkpoints: per-expert 2-D experts (Qwen3-MoE's published layout) and transformers v5's
fused 3-D experts compress with every expert quantized, written per expert as servers load
them; routers stay dense; the coverage table says so; and a `Linear` run that would silently
skip experts it cannot quantize (gpt-oss's input-major 3-D layout) is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compressor.config import build_config
from compressor.errors import ConfigError
from compressor.formats.compressed import decompress_checkpoint
from compressor.formats.verify import verify_checkpoint
from compressor.pipeline import compress_checkpoint
from compressor.stages.coverage import family
from compressor.testing.generate_moe import (
    Qwen3MoeShape,
    generate_qwen3_moe_checkpoint,
    write_checkpoint,
)
from tests.conftest import assert_same_tensors, ct_decompress, load_dir

SHAPE = Qwen3MoeShape()


@pytest.fixture(scope="module")
def fused(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_qwen3_moe_checkpoint(
        tmp_path_factory.mktemp("moe") / "fused", fused_experts=True
    )


@pytest.fixture(scope="module")
def per_expert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_qwen3_moe_checkpoint(tmp_path_factory.mktemp("moe") / "split")


def test_module_families() -> None:
    assert family("model.layers.0.self_attn.q_proj.weight") == "attention"
    assert family("model.layers.0.mlp.gate_proj.weight") == "dense MLP"
    assert family("model.layers.3.mlp.experts.7.down_proj.weight") == "experts"
    assert family("model.layers.3.mlp.experts.gate_up_proj") == "experts"
    assert family("model.layers.3.mlp.shared_experts.up_proj.weight") == "shared experts"
    assert family("model.layers.3.mlp.gate.weight") == "router"
    assert family("model.layers.3.mlp.gate.e_score_correction_bias") == "router"
    assert family("model.embed_tokens.weight") == "embeddings"
    assert family("model.layers.0.input_layernorm.weight") == "other"


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
def test_every_expert_is_quantized_and_written_per_expert(
    layout: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    src: Path = request.getfixturevalue(layout)
    out = tmp_path / "w4a16"
    compress_checkpoint(build_config(str(src), str(out), preset="w4a16", workers=0))
    assert verify_checkpoint(out).ok
    stored = load_dir(out)
    for layer in range(SHAPE.num_hidden_layers):
        for j in range(SHAPE.num_experts):
            for leaf in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{layer}.mlp.experts.{j}.{leaf}.weight_packed" in stored
        assert stored[f"model.layers.{layer}.mlp.gate.weight"].dtype == torch.bfloat16
    assert not [n for n in stored if n.endswith(("gate_up_proj", "experts.down_proj"))]
    report = json.loads((out / "compression.json").read_text())
    table = report["coverage"]
    assert table["experts"]["quantized"] == table["experts"]["total"] > 0
    assert table["attention"]["quantized"] == table["attention"]["total"]
    assert table["router"]["quantized"] == 0 and table["embeddings"]["quantized"] == 0
    ours = load_dir(decompress_checkpoint(out, tmp_path / "ours"))
    assert_same_tensors(ours, load_dir(ct_decompress(out, tmp_path / "ct")))


def test_fused_experts_split_in_the_orientation_transformers_uses(
    fused: Path, tmp_path: Path
) -> None:
    """Unquantized (preset dense), the split checkpoint is the same model: transformers gives
    exactly the logits of the fused original. A gate/up swap or a transposition would not."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dense"
    compress_checkpoint(build_config(str(fused), str(out), preset="dense", workers=0))
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in load_dir(out)
    ids = torch.tensor([[1, 5, 9, 22, 7, 100, 3, 40]])

    def logits(path: Path) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            return model(ids).logits

    assert torch.equal(logits(out), logits(fused))


def _gpt_oss_like(path: Path) -> Path:
    """gpt-oss's expert layout: (E, H, 2I) input-major with interleaved gate/up, and biases."""
    e, h, i = 2, 64, 32
    specs = [
        ("model.layers.0.self_attn.q_proj.weight", "BF16", (h, h)),
        ("model.layers.0.mlp.router.weight", "BF16", (e, h)),
        ("model.layers.0.mlp.experts.gate_up_proj", "BF16", (e, h, 2 * i)),
        ("model.layers.0.mlp.experts.gate_up_proj_bias", "BF16", (e, 2 * i)),
        ("model.layers.0.mlp.experts.down_proj", "BF16", (e, i, h)),
    ]
    g = torch.Generator().manual_seed(0)
    tensors = ((n, torch.randn(d, generator=g).bfloat16()) for n, _, d in specs)
    return write_checkpoint(path, specs, tensors, {"model_type": "gpt_oss"}, 1.0)


def test_a_linear_run_that_would_skip_experts_is_refused(tmp_path: Path) -> None:
    src = _gpt_oss_like(tmp_path / "gpt-oss")
    with pytest.raises(ConfigError, match="leaves 2 weight\\(s\\) of the experts") as e:
        compress_checkpoint(build_config(str(src), str(tmp_path / "out"), preset="w4a16"))
    assert "model.layers.0.mlp.experts.gate_up_proj (2x64x64)" in str(e.value)
    assert not (tmp_path / "out").exists()
    # the recipe may say so: ignored experts stay dense on purpose
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text('version: 1\nquantization: {group_size: 32}\nignore: ["re:.*experts.*"]\n')
    compress_checkpoint(build_config(str(src), str(tmp_path / "ok"), recipe_path=recipe, workers=0))
    table = json.loads((tmp_path / "ok" / "compression.json").read_text())["coverage"]
    assert table["experts"] == {"quantized": 0, "total": 2 * 64 * 64 + 2 * 64 + 2 * 32 * 64}
    assert table["attention"]["quantized"] == 64 * 64


def test_transformers_loads_the_compressed_moe_as_our_decompressed_model(
    fused: Path, tmp_path: Path
) -> None:
    """The per-expert compressed-tensors output of a fused-experts input: transformers loads it
    (mapping the per-expert weights onto its fused experts) and gives exactly the logits of our
    decompressed model."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "w4a16"
    compress_checkpoint(build_config(str(fused), str(out), preset="w4a16", workers=0))
    dense = decompress_checkpoint(out, tmp_path / "dense")
    ids = torch.tensor([[1, 5, 9, 22, 7, 100, 3, 40]])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.bfloat16)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)(ids).logits
    assert torch.equal(got, ref)
