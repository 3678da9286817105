"""Fused groups: modules that inference servers load as one, and so must share one scheme.

vLLM builds one `QKVParallelLinear` from a layer's `q_proj`, `k_proj` and `v_proj`, one
`MergedColumnParallelLinear` from `gate_proj` and `up_proj`, and one `FusedMoE` layer from all
the experts of an MoE block; its weight loaders copy each checkpoint tensor into a slice of the
fused parameter (`assert param_data.shape == loaded_weight.shape`), and its compressed-tensors
config code refuses a fused module whose parts have different schemes ("requires all to use the
same scheme"), a partly ignored one included. A checkpoint that gives q/k/v different group
sizes loads in transformers and fails on the server. So a fused group is a plan-level fact:

- the rules come from config.json's `model_type` (`FUSED_BY_MODEL_TYPE`; the Llama family's for
  an unknown type), or from the recipe's `fused:` entry, which replaces them (`fused: []` turns
  the check off);
- a rule is either a list of sibling module names (``[q_proj, k_proj, v_proj]``: those children
  of one parent module form a group) or the word ``experts`` (every linear under
  ``<block>.experts.<N>.`` of one MoE block forms a group);
- `check_groups` refuses, before any work, a group whose members get different schemes or are
  partly left dense, naming the group and the fix; the automatic budget chooses one scheme per
  group (`stages/budget.py`). Only groups with a member in a format servers load
  (compressed-tensors) are checked: our own layouts (minmax, codebook) are never served.

Modules that are stored already fused (Phi-3's `qkv_proj`, `gate_up_proj`; gpt-oss's 3-D
experts) are one tensor and need no rule.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from compressor.errors import ConfigError

__all__ = [
    "EXPERTS",
    "FUSED_BY_MODEL_TYPE",
    "FusedGroup",
    "check_groups",
    "find_groups",
    "rules_for",
    "shared_ranges",
]

EXPERTS = "experts"
"""The rule word for "every expert linear of one MoE block shares a scheme"."""

_LLAMA: tuple[tuple[str, ...] | str, ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
)
_MOE = (*_LLAMA, EXPERTS)
# DeepSeek-V2/V3's MLA: vLLM fuses q_a_proj and kv_a_proj_with_mqa (when q_lora_rank is set).
_DEEPSEEK = (*_MOE, ("q_a_proj", "kv_a_proj_with_mqa"))
FUSED_BY_MODEL_TYPE: Mapping[str, tuple[tuple[str, ...] | str, ...]] = {
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3",
            "gemma3_text",
            "granite",
            "olmo",
            "olmo2",
            "smollm3",
            "phi3",  # stored fused (qkv_proj, gate_up_proj): nothing matches, nothing to check
        ),
        _LLAMA,
    ),
    **dict.fromkeys(("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"), _MOE),
    **dict.fromkeys(("deepseek_v2", "deepseek_v3", "kimi_k2"), _DEEPSEEK),
}

_EXPERT = re.compile(r"^(?P<block>.*\.experts)\.\d+\.")


@dataclass(frozen=True)
class FusedGroup:
    """Tensors a server loads as one module. `name` is how messages call it, e.g.
    ``model.layers.0.self_attn.{q_proj,k_proj,v_proj}``."""

    name: str
    members: tuple[str, ...]  # tensor names, in checkpoint order
    experts: bool = False  # all expert linears of one MoE block (else sibling modules)


def rules_for(config: Mapping[str, object] | None) -> tuple[tuple[str, ...] | str, ...]:
    """The fused-group rules of an architecture, from config.json (`model_type`, also inside
    `text_config` for multimodal wrappers); the Llama family's when the type is unknown."""
    config = config or {}
    model_type = config.get("model_type")
    text = config.get("text_config")
    if isinstance(text, Mapping) and text.get("model_type") in FUSED_BY_MODEL_TYPE:
        model_type = text.get("model_type")
    if isinstance(model_type, str) and model_type in FUSED_BY_MODEL_TYPE:
        return FUSED_BY_MODEL_TYPE[model_type]
    return _MOE if _is_moe(config) else _LLAMA


def _is_moe(config: Mapping[str, object]) -> bool:
    keys = ("num_local_experts", "num_experts", "n_routed_experts")
    return any(isinstance(config.get(k), int) and config.get(k) for k in keys)


def find_groups(
    names: Iterable[str], rules: Sequence[tuple[str, ...] | str]
) -> tuple[FusedGroup, ...]:
    """The fused groups among `names` (weight tensor names) under `rules`: only groups with at
    least two members present, members in the order given."""
    found: dict[str, list[str]] = {}
    labels: dict[str, str] = {}
    siblings = [r for r in rules if not isinstance(r, str)]
    experts = EXPERTS in rules
    for name in names:
        if not name.endswith(".weight"):
            continue
        module = name.removesuffix(".weight")
        parent, _, leaf = module.rpartition(".")
        if experts and (m := _EXPERT.match(module)):
            key = f"experts:{m['block']}"
            labels[key] = f"{m['block']}.* (the experts of one MoE block)"
            found.setdefault(key, []).append(name)
            continue
        for k, rule in enumerate(siblings):
            if leaf in rule:
                key = f"{k}:{parent}"
                labels[key] = f"{parent}.{{{','.join(rule)}}}"
                found.setdefault(key, []).append(name)
                break
    return tuple(
        FusedGroup(labels[key], tuple(members), key.startswith("experts:"))
        for key, members in found.items()
        if len(members) > 1
    )


# Within one expert, the projections a server fuses into its w13 (gate and up).
_EXPERT_PAIR = (("gate_proj", "up_proj"), ("w1", "w3"))


def shared_ranges(groups: Iterable[FusedGroup]) -> dict[str, tuple[str, ...]]:
    """Tensor → the tensors whose value range it shares, for schemes with a per-tensor
    parameter that a fused module keeps once (NVFP4's global scale: vLLM keeps one for q/k/v
    and for gate/up, and one per expert for its gate/up pair; `down_proj` keeps its own)."""
    shared: dict[str, tuple[str, ...]] = {}
    for group in groups:
        if not group.experts:
            for name in group.members:
                shared[name] = group.members
            continue
        pairs: dict[tuple[str, int], list[str]] = {}
        for name in group.members:
            module = name.removesuffix(".weight")
            expert, _, leaf = module.rpartition(".")
            pair = next((k for k, p in enumerate(_EXPERT_PAIR) if leaf in p), None)
            if pair is not None:
                pairs.setdefault((expert, pair), []).append(name)
        for members in pairs.values():
            for name in members:
                shared[name] = tuple(members)
    return shared


def check_groups(
    groups: Iterable[FusedGroup], scheme_of: Mapping[str, str | None], source: str
) -> None:
    """Refuse a group whose members do not share one scheme. `scheme_of` maps a tensor name to
    its scheme's description, None when it stays dense.

    Raises:
        ConfigError: naming the group, the differing members and the fix.
    """
    for group in groups:
        schemes = {name: scheme_of.get(name) for name in group.members}
        if len(set(schemes.values())) <= 1:
            continue
        shown = ", ".join(
            f"{_leaf(n)}: {s or 'dense (ignored or not targeted)'}" for n, s in schemes.items()
        )
        raise ConfigError(
            f"servers load {group.name} as one fused module, which needs one scheme, but the "
            f"recipe gives {shown}",
            path=source,
            hint="give the members one rule (or ignore all of them); if your server does not "
            "fuse them, set `fused: []` (or your own groups) in the recipe",
        )


def _leaf(tensor_name: str) -> str:
    module = tensor_name.removesuffix(".weight")
    m = _EXPERT.match(module)
    return module[len(m["block"]) + 1 :] if m else module.rpartition(".")[2]
