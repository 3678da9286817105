"""The layer-by-layer runner against transformers' own full forward pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compressor.calibration.layers import DecoderRunner
from compressor.errors import ConfigError
from tests.conftest import full_forward_hessians

pytest.importorskip("transformers")


def _weights(src: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_layer_by_layer_equals_the_full_forward(tiny_llama: Path) -> None:
    weights = _weights(tiny_llama)
    read_names: list[str] = []

    def read(name: str) -> torch.Tensor:
        read_names.append(name)
        return weights[name]

    runner = DecoderRunner(tiny_llama, read)
    assert read_names == ["model.embed_tokens.weight"]  # nothing else until a layer runs
    tokens = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(1))
    inputs = runner.layer_inputs(tokens)
    hidden = inputs[0][0]
    stats = {}
    for i in range(len(runner)):
        hidden, layer_stats = runner.run_layer(i, hidden, inputs[i][1])
        for s in layer_stats:
            for m in s.members:
                stats[m] = s
        # the layer's weights are released again: one layer in memory at a time
        assert all(p.is_meta for p in runner.layers[i].parameters())
    expected, model, (out,) = full_forward_hessians(tiny_llama, [tokens])
    last = out.hidden_states[-1]  # after model.norm
    with torch.no_grad():
        assert torch.allclose(model.model.norm(hidden), last, atol=1e-5, rtol=1e-5)
    assert sorted(stats) == sorted(expected)
    for name, h in expected.items():
        got = stats[name]
        assert got.tokens == 3 * 32
        assert torch.allclose(got.hessian.to(torch.float64), h, rtol=1e-4, atol=1e-3), name
    # q/k/v share one input (and one statistic), as do gate/up
    assert stats["model.layers.0.self_attn.q_proj"].members == [
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    assert stats["model.layers.1.mlp.up_proj"] is stats["model.layers.1.mlp.gate_proj"]
    assert len({id(s) for s in stats.values()}) == 3 * 4


def test_a_missing_weight_is_named(tiny_llama: Path) -> None:
    weights = _weights(tiny_llama)
    weights["model.layers.0.mlp.down_proj.weight"] = torch.zeros(3, 3)
    runner = DecoderRunner(tiny_llama, lambda n: weights[n])
    inputs = runner.layer_inputs(torch.zeros((1, 8), dtype=torch.int64))
    with pytest.raises(ConfigError, match=r"down_proj.weight: the checkpoint holds shape \(3, 3\)"):
        runner.run_layer(0, inputs[0][0], inputs[0][1])
