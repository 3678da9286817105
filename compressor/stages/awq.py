"""AWQ: search equivalent input scales per module group on the cluster, fold them in.

Which modules share scales comes from the architecture (the tensor names transformers gives
Llama, Qwen2/3, Mistral, Gemma 1/2/3 and their relatives), layer by layer:

    input norm               → q_proj, k_proj, v_proj   (the norm's weight is divided by s)
    MLP norm                 → gate_proj, up_proj       (post_attention_layernorm, or Gemma 2/3's
                                                         pre_feedforward_layernorm)
    v_proj (its rows)        → o_proj                   (only without grouped-query attention:
                                                         o_proj's inputs are v_proj's outputs)
    up_proj (its rows)       → down_proj

A group is scaled only when every member is an integer rule with scaling awq and has a
calibration statistic; otherwise it is left alone (and counted in the note). One job per group
(`search_group`): read the members' weights, search α with the input's XᵀX
(`compressor.math.awq`). The scales then act in two places: compress multiplies each member's
columns by s (and divides a producing linear's rows by s: a per-row constant changes no
min-max rounding), and the output's norm weights are divided by s: w / s, or for Gemma's
(1 + w) norms, (1 + w) / s − 1, in the norm's dtype. Those norms are small outputs, so in-place
shard assembly (which copies norms as they are) is off for such runs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from compressor.formats import dtypes
from compressor.math.awq import search_scale
from compressor.math.quant import QuantArgs
from compressor.stages.calibrate import (
    Calibration,
    Statistic,
    load_hessian,
    one_thread,
    read_weight,
)
from compressor.stages.executor import Executor, Progress
from compressor.stages.plan import Plan, TensorPlan

__all__ = ["AwqGroup", "Scaling", "groups", "scale", "search_group"]

STAGE = "awq"
_LAYER = re.compile(r"^(.*\.layers\.\d+)\.self_attn\.q_proj\.weight$")


@dataclass(frozen=True)
class AwqGroup:
    """Modules that read one input, and what produces that input (a norm weight, or a linear
    whose rows are divided by the scales)."""

    producer: str
    members: tuple[TensorPlan, ...]
    statistic: Statistic
    producer_is_norm: bool


@dataclass(frozen=True)
class Scaling:
    """The search's result: per weight, its column multipliers and row divisors (float32);
    per norm, its folded values (float32, to be written in the norm's dtype)."""

    columns: dict[str, np.ndarray] = field(default_factory=dict)
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    norms: dict[str, np.ndarray] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)  # producer → α
    notes: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.columns)


def _norm_offset(source: str) -> float:
    """1 for Gemma's RMSNorm, which multiplies by (1 + w); 0 for the others."""
    config = json.loads((Path(source) / "config.json").read_text())
    kind = str(config.get("model_type", "")) + str(
        (config.get("text_config") or {}).get("model_type", "")
    )
    return 1.0 if "gemma" in kind else 0.0


def groups(plan: Plan, calibration: Calibration) -> tuple[list[AwqGroup], int]:
    """The scalable groups of the plan, and how many candidate groups were left alone."""
    by_name = plan.by_name
    found: list[AwqGroup] = []
    skipped = 0
    for name in by_name:
        m = _LAYER.match(name)
        if m is None:
            continue
        p = m.group(1)
        mlp_norm = f"{p}.pre_feedforward_layernorm.weight"
        if mlp_norm not in by_name:
            mlp_norm = f"{p}.post_attention_layernorm.weight"
        v, o = f"{p}.self_attn.v_proj.weight", f"{p}.self_attn.o_proj.weight"
        candidates = [
            (f"{p}.input_layernorm.weight", ("q_proj", "k_proj", "v_proj"), "self_attn", True),
            (mlp_norm, ("gate_proj", "up_proj"), "mlp", True),
            (f"{p}.mlp.up_proj.weight", ("down_proj",), "mlp", False),
        ]
        if v in by_name and o in by_name and by_name[v].info.shape[0] == by_name[o].info.shape[1]:
            candidates.insert(1, (v, ("o_proj",), "self_attn", False))
        for producer, leaves, block, is_norm in candidates:
            members = tuple(by_name.get(f"{p}.{block}.{leaf}.weight") for leaf in leaves)
            stat = calibration.get(f"{p}.{block}.{leaves[0]}.weight")
            source = by_name.get(producer)
            usable = (
                source is not None
                and (is_norm or (source.scaling == "awq" and isinstance(source.args, QuantArgs)))
                and stat is not None
                and stat.path is not None
                and all(
                    t is not None and t.scaling == "awq" and isinstance(t.args, QuantArgs)
                    for t in members
                )
            )
            if not usable:
                skipped += any(t is not None and t.scaling == "awq" for t in members)
                continue
            assert stat is not None
            found.append(AwqGroup(producer, tuple(t for t in members if t), stat, is_norm))
    return found, skipped


@dataclass(frozen=True)
class SearchJob:
    group: AwqGroup
    staging_root: str


def search_group(job: SearchJob) -> dict:
    """α and s of one group (jobs are independent: all read the original weights)."""
    from compressor.formats.staging import Staging

    g = job.group
    with one_thread(), torch.no_grad():
        weights = [read_weight(t) for t in g.members]
        args = [t.args for t in g.members]
        assert all(isinstance(a, QuantArgs) for a in args)
        h = load_hessian(Staging(job.staging_root), g.statistic)
        result = search_scale(
            weights,
            args,  # type: ignore[arg-type]
            h,
            g.statistic.tokens,
            dtypes.torch_dtype(g.members[0].dtype),
        )
    return {
        "scale": result.scale.numpy().tolist(),
        "alpha": result.alpha,
        "gain": 1 - min(result.errors) / result.errors[0] if result.errors[0] > 0 else 0.0,
    }


def scale(
    plan: Plan,
    staging_root: str,
    calibration: Calibration,
    source: str,
    executor: Executor,
    progress: Progress | None = None,
) -> Scaling:
    """Search every group's scales; the column, row and norm changes they imply."""
    found, skipped = groups(plan, calibration)
    results = executor.map(
        search_group, [SearchJob(g, staging_root) for g in found], STAGE, progress
    )
    offset = _norm_offset(source)
    by_name = plan.by_name
    columns: dict[str, np.ndarray] = {}
    rows: dict[str, np.ndarray] = {}
    norms: dict[str, np.ndarray] = {}
    alphas: dict[str, float] = {}
    gains = []
    for g, r in zip(found, results, strict=True):
        s = np.asarray(r["scale"], dtype=np.float32)
        for t in g.members:
            columns[t.name] = s
        if g.producer_is_norm:
            norm = read_weight(by_name[g.producer]).to(torch.float32).numpy()
            norms[g.producer] = ((norm + offset) / s - offset).astype(np.float32)
        else:
            rows[g.producer] = s
        alphas[g.producer] = r["alpha"]
        gains.append(r["gain"])
    notes = []
    if found:
        notes.append(
            f"awq: {len(found)} module groups scaled (mean α {np.mean(list(alphas.values())):.2f}"
            f", output error on the calibration tokens −{100 * float(np.mean(gains)):.1f} % "
            "against plain rounding, mean over groups)"
        )
    if skipped:
        notes.append(
            f"awq: {skipped} module group(s) left unscaled (a member with another rule, or no "
            "calibration statistic)"
        )
    return Scaling(columns, rows, norms, alphas, tuple(notes))
