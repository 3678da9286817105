"""Coverage: which share of each module family a run quantizes, and the check that a run meant
to quantize every linear layer did not silently skip some.

Peers' users keep meeting the same failure: a "quantize all Linear layers" run over an MoE model
whose experts are stored in a shape the tool does not treat as linear layers (fused 3-D tensors)
leaves them dense, with no message, and the output is barely smaller. Here the plan counts
parameters per family (`coverage`), the report shows the table, and `check_coverage` refuses,
before any work, a run with a `Linear` rule that leaves weights of the attention, MLP or expert
families unquantized without the recipe saying so (its `ignore` list) or the plan noting why
(a width fallback that keeps a weight dense).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Protocol

from compressor.config import LINEAR, RunConfig
from compressor.errors import ConfigError
from compressor.formats import dtypes
from compressor.formats.safetensors_io import TensorInfo

__all__ = ["FAMILIES", "LINEAR_FAMILIES", "Planned", "check_coverage", "coverage", "family"]

FAMILIES = (
    "attention",
    "dense MLP",
    "experts",
    "shared experts",
    "router",
    "embeddings",
    "other",
)
LINEAR_FAMILIES = ("attention", "dense MLP", "experts", "shared experts")

_RULES = (
    (
        "router",
        re.compile(r".*\.(gate|router|shared_expert_gate)\.(weight|bias)$|.*e_score_correction"),
    ),
    ("shared experts", re.compile(r".*\.shared_experts?\.")),
    ("experts", re.compile(r".*\.experts(\.|$)")),
    ("embeddings", re.compile(r".*(embed|wte|wpe|lm_head)")),
    ("other", re.compile(r".*norm")),
    ("attention", re.compile(r".*(self_attn|attention|\.attn)\.")),
    ("dense MLP", re.compile(r".*(\.mlp\.|feed_forward|block_sparse_moe|\.ffn\.)")),
)


def family(tensor_name: str) -> str:
    """The module family a tensor belongs to, from its name."""
    return next((fam for fam, rule in _RULES if rule.match(tensor_name)), "other")


class Planned(Protocol):
    """What coverage reads of a planned tensor (`plan.TensorPlan`)."""

    @property
    def name(self) -> str: ...

    @property
    def info(self) -> TensorInfo: ...

    @property
    def args(self) -> object: ...

    @property
    def note(self) -> str | None: ...


def coverage(tensors: Iterable[Planned]) -> dict[str, dict[str, int]]:
    """Per family: parameters quantized and in total (families without tensors left out)."""
    table: dict[str, dict[str, int]] = {}
    for t in tensors:
        row = table.setdefault(family(t.name), {"quantized": 0, "total": 0})
        row["total"] += t.info.numel
        if t.args is not None:
            row["quantized"] += t.info.numel
    return {fam: table[fam] for fam in FAMILIES if fam in table}


def check_coverage(
    config: RunConfig, tensors: Iterable[Planned], ignored: Callable[[str], bool]
) -> None:
    """With a rule targeting `Linear`, refuse weights of the linear families that no rule
    quantized, unless `ignored(name)` (the recipe's ignore list) or the plan noted why.

    Raises:
        ConfigError: naming the families, a few of the weights, and the two fixes.
    """
    if not any(LINEAR in rule.targets for rule in config.recipe.quantization):
        return
    missed = [
        t
        for t in tensors
        if t.args is None
        and t.note is None
        and family(t.name) in LINEAR_FAMILIES
        and len(t.info.shape) >= 2
        and not t.name.endswith("bias")  # biases stay dense everywhere (gpt-oss's are 2-D)
        and dtypes.is_float(t.info.dtype)
        and not ignored(t.name)
    ]
    if not missed:
        return
    params = sum(t.info.numel for t in missed)
    families = sorted({family(t.name) for t in missed})
    shown = ", ".join(f"{t.name} ({'x'.join(str(d) for d in t.info.shape)})" for t in missed[:3])
    more = f" and {len(missed) - 3} more" if len(missed) > 3 else ""
    raise ConfigError(
        f"the Linear rule leaves {len(missed)} weight(s) of the {', '.join(families)} "
        f"({params:,} parameters) unquantized, as they are not 2-D linear weights this tool "
        f"can quantize: {shown}{more}",
        hint="add them to the recipe's `ignore` to keep them dense on purpose, or convert them "
        "to per-expert 2-D weights (or to transformers v5's (E, 2I, H) fused layout) first",
    )
