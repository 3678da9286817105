"""Fused groups: what servers load as one module gets one scheme (stages/fused.py).

The rules per architecture, the plan's refusal of a recipe or `ignore` that splits a group, and
the automatic budget choosing per group (which, left per tensor, splits q/k/v on this model).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from compressor.config import build_config
from compressor.errors import ConfigError
from compressor.pipeline import compress_checkpoint
from compressor.stages.fused import EXPERTS, find_groups, rules_for
from compressor.stages.plan import make_plan
from compressor.testing.generate import LlamaShape, generate_llama_checkpoint


def _llama_names(layers: int = 2) -> list[str]:
    names = ["model.embed_tokens.weight"]
    for i in range(layers):
        p = f"model.layers.{i}"
        names += [f"{p}.self_attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"{p}.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
        names += [f"{p}.input_layernorm.weight", f"{p}.self_attn.q_proj.bias"]
    return [*names, "lm_head.weight"]


def test_llama_groups_are_qkv_and_gate_up_of_each_layer() -> None:
    groups = find_groups(_llama_names(), rules_for({"model_type": "llama"}))
    assert [g.members for g in groups] == [
        tuple(f"model.layers.0.self_attn.{m}_proj.weight" for m in "qkv"),
        tuple(f"model.layers.0.mlp.{m}_proj.weight" for m in ("gate", "up")),
        tuple(f"model.layers.1.self_attn.{m}_proj.weight" for m in "qkv"),
        tuple(f"model.layers.1.mlp.{m}_proj.weight" for m in ("gate", "up")),
    ]
    assert groups[0].name == "model.layers.0.self_attn.{q_proj,k_proj,v_proj}"


def test_moe_experts_of_one_block_form_one_group_and_shared_experts_fuse_gate_up() -> None:
    names = [
        f"model.layers.1.mlp.experts.{e}.{m}.weight"
        for e in range(3)
        for m in ("gate_proj", "up_proj", "down_proj")
    ]
    names += [f"model.layers.1.mlp.shared_experts.{m}.weight" for m in ("gate_proj", "up_proj")]
    names += ["model.layers.1.mlp.gate.weight"]  # the router: alone
    rules = rules_for({"model_type": "deepseek_v3"})
    assert EXPERTS in rules
    groups = find_groups(names, rules)
    assert [len(g.members) for g in groups] == [9, 2]
    assert groups[0].name.startswith("model.layers.1.mlp.experts.*")
    # Mixtral's names, and an unknown MoE architecture recognised by its expert count
    mixtral = [
        f"model.layers.0.block_sparse_moe.experts.{e}.w{k}.weight"
        for e in range(2)
        for k in (1, 2, 3)
    ]
    assert [len(g.members) for g in find_groups(mixtral, rules_for({"num_local_experts": 2}))] == [
        6
    ]


def test_already_fused_modules_and_an_empty_rule_list_give_no_groups() -> None:
    phi3 = ["model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"]
    assert find_groups(phi3, rules_for({"model_type": "phi3"})) == ()
    assert find_groups(_llama_names(), []) == ()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated Llama whose layer-0 v_proj has outliers (1 % of weights x30): measured per
    tensor, it deserves more bits than its q/k siblings."""
    shape = LlamaShape(hidden_size=256, intermediate_size=768, num_hidden_layers=2, vocab_size=256)
    root = generate_llama_checkpoint(tmp_path_factory.mktemp("fused") / "m", shape, shard_mb=1)
    name = "model.layers.0.self_attn.v_proj.weight"
    index = json.loads((root / "model.safetensors.index.json").read_text())
    shard = root / index["weight_map"][name]
    tensors = load_file(shard)
    w = tensors[name]
    g = torch.Generator().manual_seed(0)
    spikes = torch.rand(w.shape, generator=g) < 0.01
    tensors[name] = torch.where(spikes, w * 30, w).to(w.dtype)
    save_file(tensors, shard, metadata={"format": "pt"})
    return root


def _recipe(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"version": 1, **body}))
    return path


def test_a_recipe_that_splits_qkv_is_refused_before_any_work(model: Path, tmp_path: Path) -> None:
    recipe = _recipe(
        tmp_path,
        {
            "quantization": [
                {"targets": ["re:.*v_proj"], "bits": 8, "strategy": "channel"},
                {"targets": ["Linear"], "bits": 4, "strategy": "group", "group_size": 128},
            ]
        },
    )
    config = build_config(str(model), str(tmp_path / "out"), recipe_path=recipe, workers=0)
    with pytest.raises(ConfigError) as raised:
        make_plan(config)
    message = str(raised.value)
    assert "model.layers.0.self_attn.{q_proj,k_proj,v_proj}" in message
    assert "v_proj: int8" in message and "q_proj: int4" in message
    assert "fix:" in message
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))  # nothing staged


def test_ignoring_part_of_a_group_is_refused_and_fused_off_accepts_it(
    model: Path, tmp_path: Path
) -> None:
    body = {
        "quantization": [{"targets": ["Linear"], "bits": 4, "group_size": 128}],
        "ignore": ["re:.*up_proj"],
    }
    config = build_config(
        str(model), str(tmp_path / "out"), recipe_path=_recipe(tmp_path, body), workers=0
    )
    with pytest.raises(ConfigError, match=r"mlp\.\{gate_proj,up_proj\}.*up_proj: dense"):
        make_plan(config)
    off = build_config(
        str(model),
        str(tmp_path / "out"),
        recipe_path=_recipe(tmp_path, {**body, "fused": []}),
        workers=0,
    )
    assert make_plan(off).fused == ()


def _config_groups(out: Path) -> dict[str, str]:
    """module → the config group that targets it."""
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    return {m: g for g, body in qc["config_groups"].items() for m in body["targets"]}


def _split(groups: dict[str, str]) -> list[str]:
    split = []
    for layer in (0, 1):
        for family, members in (("self_attn", "qkv"), ("mlp", ("gate", "up"))):
            names = {groups[f"model.layers.{layer}.{family}.{m}_proj"] for m in members}
            if len(names) > 1:
                split.append(f"{layer}.{family}")
    return split


def test_the_budget_chooses_one_scheme_per_fused_group(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "fused"
    compress_checkpoint(build_config(str(model), str(out), workers=0, budget={"target_bits": 4.5}))
    groups = _config_groups(out)
    assert _split(groups) == []
    assert len(set(groups.values())) > 1  # the budget did mix schemes: the test has teeth

    # Per tensor (fused groups off), the same budget splits a group on this model: the rule
    # above is what keeps the output loadable by servers.
    free = tmp_path / "free"
    recipe = _recipe(
        tmp_path,
        {
            "quantization": [{"targets": ["Linear"], "bits": 4, "group_size": 128}],
            "budget": {"target_bits": 4.5},
            "fused": [],
        },
    )
    compress_checkpoint(build_config(str(model), str(free), recipe_path=recipe, workers=0))
    assert _split(_config_groups(free)) != []
