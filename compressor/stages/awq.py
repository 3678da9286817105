"""AWQ: search equivalent input scales per module group on the cluster, fold them in.

Which modules share scales comes from the architecture (the tensor names transformers gives
Llama, Qwen2/3, Mistral, Gemma 1/2/3 and their relatives), layer by layer:

    input norm               → q_proj, k_proj, v_proj   (the norm's weight is divided by s)
    MLP norm                 → gate_proj, up_proj       (post_attention_layernorm, or Gemma 2/3's
                                                         pre_feedforward_layernorm)
    v_proj (its rows)        → o_proj                   (only without grouped-query attention:
                                                         o_proj's inputs are v_proj's outputs)
    up_proj (its rows)       → down_proj

A group is scaled only when every member (and a producing linear) is an integer rule with
scaling awq and has a calibration statistic; weights with scaling awq in no scaled group (MoE
experts, architectures without these names, a group split between rules) are rounded without
scales and counted in a note. A run where no group exists at all is refused at plan time
(`check`), before the model runs. One job per group
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

from compressor.errors import ConfigError
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

__all__ = ["AwqGroup", "Scaling", "check", "groups", "scale", "search_group"]

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


def _norm_offset(source: str) -> float:
    """1 for Gemma's RMSNorm, which multiplies by (1 + w); 0 for the others."""
    config = json.loads((Path(source) / "config.json").read_text())
    kind = str(config.get("model_type", "")) + str(
        (config.get("text_config") or {}).get("model_type", "")
    )
    return 1.0 if "gemma" in kind else 0.0


def _candidates(plan: Plan) -> list[tuple[str, tuple[str, ...], bool]]:
    """(producer, member weight names, whether the producer is a norm) of every group the
    architecture's names give, whatever the rules."""
    by_name = plan.by_name
    found = []
    for name in by_name:
        m = _LAYER.match(name)
        if m is None:
            continue
        p = m.group(1)
        mlp_norm = f"{p}.pre_feedforward_layernorm.weight"
        if mlp_norm not in by_name:
            mlp_norm = f"{p}.post_attention_layernorm.weight"
        v, o = f"{p}.self_attn.v_proj.weight", f"{p}.self_attn.o_proj.weight"
        attention = tuple(f"{p}.self_attn.{leaf}.weight" for leaf in ("q_proj", "k_proj", "v_proj"))
        mlp = (f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight")
        found += [
            (f"{p}.input_layernorm.weight", attention, True),
            (mlp_norm, mlp, True),
            (mlp[1], (f"{p}.mlp.down_proj.weight",), False),
        ]
        if v in by_name and o in by_name and by_name[v].info.shape[0] == by_name[o].info.shape[1]:
            found.append((v, (o,), False))
    return found


def _awq(t: TensorPlan | None) -> bool:
    return t is not None and t.scaling == "awq" and isinstance(t.args, QuantArgs)


def check(plan: Plan) -> None:
    """Before any work: a run with scaling awq has at least one group to scale."""
    by_name = plan.by_name
    for _, members, _ in _candidates(plan):
        if all(_awq(by_name.get(m)) for m in members):
            return
    first = next(t.name for t in plan.tensors if t.scaling == "awq")
    raise ConfigError(
        "awq finds no module group to scale: it knows the transformers names of Llama-like "
        "decoders (input_layernorm → self_attn.q/k/v_proj, post_attention_layernorm or "
        "pre_feedforward_layernorm → mlp.gate/up_proj, mlp.up_proj → down_proj)",
        path=str(plan.checkpoint.root),
        tensor=first,
        hint="drop --method awq (use --method gptq), or give awq the whole group of modules",
    )


def groups(plan: Plan, calibration: Calibration) -> tuple[list[AwqGroup], list[str]]:
    """The groups to scale, and the weights with scaling awq that are in none of them."""
    by_name = plan.by_name
    found: list[AwqGroup] = []
    for producer, names, is_norm in _candidates(plan):
        members = tuple(by_name.get(m) for m in names)
        stat = calibration.get(names[0])
        source = by_name.get(producer)
        if (
            source is not None
            and (is_norm or _awq(source))
            and stat is not None
            and stat.path is not None
            and all(_awq(t) for t in members)
        ):
            found.append(AwqGroup(producer, tuple(t for t in members if t), stat, is_norm))
    covered = {t.name for g in found for t in g.members}
    left = [t.name for t in plan.staged if t.scaling == "awq" and t.name not in covered]
    return found, left


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
    found, left = groups(plan, calibration)
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
    if left:
        notes.append(
            f"awq: {len(left)} weight(s) in no scaled group (e.g. {left[0]}: an MoE expert, a "
            "group split between rules, or no calibration statistic) are rounded without scales"
        )
    return Scaling(columns, rows, norms, alphas, tuple(notes))
