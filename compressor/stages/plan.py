"""Plan: decide what happens to every tensor and validate it all before any heavy work.

Only headers are read. The plan says, per tensor, whether it is quantized (and with which
effective scheme, after group-size fallback) or copied, how quantized tensors are cut into
row-block chunks, and which output shard each output tensor lands in. Any inconsistency is an
error here, in the first seconds, not at shard 91 of 94.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from compressor import __version__
from compressor.calibration.samples import file_digest
from compressor.config import LINEAR, PruneConfig, QuantRule, RunConfig
from compressor.errors import ConfigError, InputError, OutputError
from compressor.formats import dtypes, storage
from compressor.formats.checkpoint import Checkpoint, open_checkpoint
from compressor.formats.compressed import quantized_modules
from compressor.formats.experts import split_fused_experts
from compressor.formats.fp8_source import block_scaled_weights
from compressor.formats.identity import SourceFile, checkpoint_files, source_file
from compressor.formats.layout import (
    CodebookArgs,
    Float4Args,
    Float8Args,
    OutputSpec,
    module_name,
)
from compressor.formats.paths import check_disjoint, check_parent_writable, overlap
from compressor.formats.safetensors_io import TensorInfo
from compressor.math.quant import QuantArgs
from compressor.schemes import Args, BitmaskArgs, Scheme, all_schemes, for_args
from compressor.stages.coverage import check_coverage, family
from compressor.stages.fused import FusedGroup, check_groups, find_groups, rules_for

if TYPE_CHECKING:
    import torch

__all__ = [
    "OutputShard",
    "Plan",
    "PrunePlan",
    "TensorPlan",
    "is_default_linear",
    "lay_out_shards",
    "make_plan",
    "matches",
]

# Chunks are whole rows, in multiples of 32: zero points are packed along rows, and 32 rows of
# any width 1..8 fill a whole number of int32 words, so no word straddles two chunks.
ROW_ALIGN = 32
# The default "Linear" target leaves these alone: transformers cannot load quantized embeddings,
# and lm_head is usually kept dense for accuracy (llm-compressor does the same).
# Not "Linear": embeddings, lm_head, norms, and MoE routers (`coverage.family`: `mlp.gate`,
# Mixtral's `block_sparse_moe.gate`, gpt-oss's `router`, Qwen2-MoE's `shared_expert_gate`),
# which servers keep unquantized (vLLM builds them without a quantization config).
_NOT_LINEAR = re.compile(r".*(embed|lm_head|wte|wpe|norm)")


@dataclass(frozen=True)
class PrunePlan:
    """How one tensor is pruned: the resolved view of the run's PruneConfig for this tensor."""

    sparsity: float
    scope: str  # "global", or the tensor's own name (tensor scope and schedule entries)
    importance: str
    normalize: bool
    structure: str  # unstructured | row | N:M
    nm: tuple[int, int] | None
    bitmask: bool  # store kept values + bitmask (unquantized tensors only)
    gradient: tuple[str, TensorInfo] | None = None  # where this tensor's gradient is
    activation: tuple[str, TensorInfo] | None = None  # where its input-norm vector is
    norms: str | None = None  # or the calibration's staged ‖x‖ (set after the calibrate stage)


class Encoded(Protocol):
    """An input weight stored in an encoded layout: an FP8 block-scaled weight
    (`fp8_source.BlockScaled`) or a compressed module of any registered scheme
    (`schemes.CompressedModule`, e.g. our own or llm-compressor's outputs, compressed again)."""

    @property
    def dtype(self) -> str:
        """The dtype of the decoded weight."""

    @property
    def consumed(self) -> tuple[str, ...]:
        """Input tensors read with it, which the output does not carry."""

    def decode(self, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of the dense weight."""


@dataclass(frozen=True)
class TensorPlan:
    """One input tensor: where it is, and what happens to it."""

    index: int
    name: str
    source: str
    info: TensorInfo
    args: QuantArgs | CodebookArgs | Float8Args | Float4Args | None  # None: not quantized
    chunks: tuple[tuple[int, int], ...] = ()
    note: str | None = None  # e.g. the group-size fallback, shown in the summary
    prune: PrunePlan | None = None  # None: not pruned
    rounding: str = "rtn"  # how scales are chosen (same format either way)
    # An input weight stored encoded (FP8 block-scaled, or any layout a registered scheme
    # reads): chunks decode their rows, and it is never copied as is.
    encoded: Encoded | None = None
    scaling: str = "none"  # "awq": its columns take equivalent scales first (stages/awq.py)

    @property
    def staged(self) -> bool:
        """Quantized, pruned or decoded: its chunks go through staging; otherwise it is copied
        as is."""
        return self.args is not None or self.prune is not None or self.encoded is not None

    @property
    def dtype(self) -> str:
        """The dtype of the weights the chunks work on (the input's, or bfloat16 once an FP8
        input is decoded)."""
        return self.encoded.dtype if self.encoded is not None else self.info.dtype

    @property
    def stored(self) -> Args | None:
        """How the output stores it, as scheme arguments (None: a plain dense tensor)."""
        if self.args is not None:
            return self.args
        if self.prune is not None and self.prune.bitmask:
            return BitmaskArgs()
        return None

    @property
    def scheme(self) -> Scheme | None:
        """The scheme module that stores it (None: copied or written dense)."""
        stored = self.stored
        return None if stored is None else for_args(stored)

    @property
    def key(self) -> str:
        """Staging name: an index, never the tensor name (names can hold '/' or '..')."""
        return f"t{self.index:05d}"

    @property
    def shape2d(self) -> tuple[int, int]:
        rows, cols = self.info.shape
        return rows, cols


@dataclass(frozen=True)
class OutputShard:
    file_name: str
    entries: tuple[OutputSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


@dataclass(frozen=True)
class Plan:
    config: RunConfig
    checkpoint: Checkpoint
    tensors: tuple[TensorPlan, ...]
    shards: tuple[OutputShard, ...]
    run_key: str
    notes: tuple[str, ...] = field(default=())
    # The destination already holds the output of this exact input and config: nothing to do.
    # This is what makes a scheduled deployment's rerun idempotent.
    up_to_date: bool = False
    # Every file the output depends on, stamped at plan time (formats/identity.py): checked
    # again before publishing, digested during the run, recorded in the manifest.
    sources: tuple[SourceFile, ...] = ()
    # Tensors that servers load as one module (stages/fused.py): one scheme each.
    fused: tuple[FusedGroup, ...] = ()

    @property
    def quantized(self) -> tuple[TensorPlan, ...]:
        return tuple(t for t in self.tensors if t.args is not None)

    @property
    def staged(self) -> tuple[TensorPlan, ...]:
        return tuple(t for t in self.tensors if t.staged)

    def with_args(self, chosen: Mapping[str, QuantArgs]) -> Plan:
        """A new plan whose named targets use the given schemes (the automatic budget's choice),
        with output shards laid out again. Chunks stay: they do not depend on the scheme."""
        tensors = tuple(
            replace(t, args=chosen[t.name], note=None) if t.name in chosen else t
            for t in self.tensors
        )
        shards = lay_out_shards(tensors, self.config.max_shard_mb * 2**20)
        return replace(self, tensors=tensors, shards=shards)

    @property
    def by_name(self) -> dict[str, TensorPlan]:
        return {t.name: t for t in self.tensors}

    @property
    def staging_root(self) -> Path | storage.UrlPath:
        """`<staging_dir>/<run key>`, by default `.<dest>.staging/<run key>` beside the
        destination: a `Path` when local, a `storage.UrlPath` for an fsspec URL."""
        if self.config.staging_dir:
            return storage.as_path(self.config.staging_dir) / self.run_key
        dest = storage.as_path(self.config.destination)
        return dest.parent / f".{dest.name}.staging" / self.run_key

    @property
    def chunk_count(self) -> int:
        return sum(len(t.chunks) for t in self.tensors)

    def demote(self, reasons: Mapping[str, str]) -> Plan:
        """A new plan in which the named targets (quantized or pruned) are plain copies.

        Used for `skip_nonfinite`, right after ingest has found NaN/Inf, before anything else
        looks at the targets. `reasons` maps tensor name → the note shown in the report. The run
        key stays: the staged chunks are still valid.
        """
        if not reasons:
            return self
        dropped = {t.note for t in self.tensors if t.name in reasons and t.note}
        tensors = tuple(
            replace(t, args=None, prune=None, chunks=(), note=reasons[t.name])
            if t.name in reasons
            else t
            for t in self.tensors
        )
        notes = (*(n for n in self.notes if n not in dropped), *reasons.values())
        shards = lay_out_shards(tensors, self.config.max_shard_mb * 2**20)
        return replace(self, tensors=tensors, shards=shards, notes=notes)


def matches(patterns: list[str], tensor_name: str) -> bool:
    """True if any pattern names the tensor or its module ("re:" patterns match from the start,
    as compressed-tensors matches them)."""
    candidates = (tensor_name, module_name(tensor_name))
    for pattern in patterns:
        if pattern.startswith("re:"):
            regex = re.compile(pattern[3:])
            if any(regex.match(c) for c in candidates):
                return True
        elif pattern in candidates:
            return True
    return False


def is_default_linear(name: str, info: TensorInfo) -> bool:
    """What the "Linear" target means: a 2-D float `*.weight` that is not an embedding,
    lm_head or norm."""
    return (
        name.endswith(".weight")
        and len(info.shape) == 2
        and dtypes.is_float(info.dtype)
        and not _NOT_LINEAR.match(name)
        and family(name) != "router"
    )


def _rule_for(
    rule_list: list[QuantRule], ignore: list[str], name: str, info: TensorInfo
) -> tuple[int, QuantRule] | None:
    if matches(ignore, name):
        return None
    for k, rule in enumerate(rule_list):
        explicit = [t for t in rule.targets if t != LINEAR]
        if (LINEAR in rule.targets and is_default_linear(name, info)) or matches(explicit, name):
            return k, rule
    return None


def _effective_args(
    rule: QuantRule, name: str, source: str, cols: int, strict: bool
) -> tuple[QuantArgs | CodebookArgs | Float8Args | Float4Args | None, str | None]:
    """The scheme actually used for a tensor with `cols` inputs, after its scheme's width
    fallback (`Scheme.for_width`: a group size that does not divide the width, an FP8 block
    width), noted in the report; `strict` refuses instead."""
    args = rule.args()
    narrowed = for_args(args).for_width(args, cols)
    if narrowed is None:
        return args, None
    fallback, note, why = narrowed  # fallback None: the weight stays dense
    if strict:
        raise ConfigError(
            why,
            path=source,
            tensor=name,
            hint=f"drop --strict-groups to fall back ({note}), or pick a size that divides {cols}",
        )
    assert not isinstance(fallback, BitmaskArgs)  # a quantizing scheme narrows to its own
    return fallback, f"{name}: {note} ({cols} inputs)"


def _row_chunks(
    rows: int, row_bytes: int, chunk_bytes: int, align: int = ROW_ALIGN
) -> tuple[tuple[int, int], ...]:
    """Row blocks of about `chunk_bytes`, each a multiple of `align` rows (a multiple of 32; a
    scheme may ask for more, e.g. FP8's 128-row blocks, so no block straddles two chunks)."""
    per_chunk = max(align, (chunk_bytes // max(row_bytes, 1)) // align * align)
    return tuple((r, min(r + per_chunk, rows)) for r in range(0, rows, per_chunk))


def make_plan(config: RunConfig) -> Plan:
    """Read headers, match rules, validate, and lay out chunks and output shards."""
    _check_destination(config)
    checkpoint = open_checkpoint(config.source)
    encoded = _encoded_inputs(checkpoint)
    _refuse_unsupported_input(checkpoint, config, encoded)
    # Tensors read to decode an encoded weight (scales, zero points...): not carried over.
    consumed = {n for _, e, _ in encoded.values() for n in e.consumed}
    rules = config.recipe.quantization
    ignore = list(config.recipe.ignore)
    pruning = config.recipe.pruning
    sides = _side_inputs(pruning) if pruning else _SideInputs(None, None)
    used_rules: set[int] = set()
    tensors: list[TensorPlan] = []
    notes: list[str] = []
    chunk_bytes = config.chunk_mb * 2**20
    for index, (name, (source, info)) in enumerate(_input_tensors(checkpoint)):
        if name in consumed:
            continue
        decoded = None
        if name in encoded:  # its plan name (the dense weight's) and a dense view of it
            name, decoded, info = encoded[name]
        found = _rule_for(rules, ignore, name, info)
        prune = _prune_for(pruning, ignore, name, info, source, sides) if pruning else None
        if found is None and prune is None and decoded is None:
            tensors.append(TensorPlan(index, name, source, info, None))
            continue
        what = f"quantization rule {found[0]}" if found else "the pruning targets"
        if len(info.shape) != 2 or not dtypes.is_float(info.dtype):
            raise ConfigError(
                f"matches {what} but is a {len(info.shape)}-D {info.dtype} tensor; only 2-D "
                "float weights can be compressed",
                path=source,
                tensor=name,
                hint="narrow the targets or add the tensor to ignore",
            )
        rows, cols = info.shape
        if rows == 0 or cols == 0:
            raise InputError(
                "is empty (a zero dimension)", path=source, tensor=name, hint="add it to ignore"
            )
        args, note = None, None
        if found is not None:
            k, rule = found
            used_rules.add(k)
            args, note = _effective_args(rule, name, source, cols, config.strict_groups)
            if note:
                notes.append(note)
            if prune is not None and args is not None and not for_args(args).exact_zero:
                raise ConfigError(
                    f"pruning with the {for_args(args).format} layout: it cannot represent 0 "
                    "exactly, so pruned weights would not decompress to 0.0",
                    path=source,
                    tensor=name,
                    hint="use --preset w4a16-asym (its integer zero point represents 0 exactly) "
                    "or w4a16",
                )
        align = for_args(args).row_align(args) if args is not None else ROW_ALIGN
        dtype = decoded.dtype if decoded is not None else info.dtype
        chunks = _row_chunks(rows, cols * dtypes.itemsize(dtype), chunk_bytes, align)
        rounding = found[1].rounding if found is not None else "rtn"
        scaling = found[1].scaling if found is not None else "none"
        tensors.append(
            TensorPlan(
                index, name, source, info, args, chunks, note, prune, rounding, decoded, scaling
            )
        )
    for k, rule in enumerate(rules):
        if k not in used_rules:
            raise ConfigError(
                f"quantization rule {k} (targets {rule.targets}) matches no tensor",
                path=str(checkpoint.root),
                hint="check the names with `compressor inspect SRC`; patterns need the "
                "'re:' prefix to be regular expressions",
            )
    if pruning is not None:
        if not any(t.prune for t in tensors) and pruning.sparsity > 0:
            raise ConfigError(
                f"the pruning targets {pruning.targets} match no tensor",
                path=str(checkpoint.root),
                hint="check the names with `compressor inspect SRC`",
            )
        if pruning.sparse_format == "bitmask" and any(t.prune and t.args for t in tensors):
            notes.append(
                "bitmask storage applies to pruned tensors that are not quantized; quantized "
                "ones keep the pack-quantized layout with their zeros"
            )
    shards = lay_out_shards(tensors, config.max_shard_mb * 2**20)
    _refuse_name_collisions(tensors, shards)
    _refuse_split_expert_collisions(tensors)
    check_coverage(config, tensors, lambda name: matches(ignore, name))
    fused = _fused_groups(config, checkpoint, tensors)
    sources = source_files(checkpoint, config.source, sides, pruning)
    run_key = _run_key(checkpoint, config, sources)
    up_to_date = _already_published(config, run_key)
    return Plan(
        config,
        checkpoint,
        tuple(tensors),
        shards,
        run_key,
        tuple(notes),
        up_to_date,
        sources,
        fused,
    )


def _fused_groups(
    config: RunConfig, checkpoint: Checkpoint, tensors: list[TensorPlan]
) -> tuple[FusedGroup, ...]:
    """The fused groups among the targets (recipe `fused`, else config.json's architecture),
    refusing one that the recipe splits."""
    given = config.recipe.fused
    rules = rules_for(checkpoint.config) if given is None else given
    found = find_groups(
        [t.name for t in tensors], [r if isinstance(r, str) else tuple(r) for r in rules]
    )
    # Only what servers load matters: our own layouts (minmax, codebook) are not served.
    served = {t.name for t in tensors if t.scheme is not None and t.scheme.served}
    groups = tuple(g for g in found if served.intersection(g.members))
    scheme_of = {t.name: t.args.describe() if t.args is not None else None for t in tensors}
    check_groups(groups, scheme_of, str(checkpoint.root))
    return tuple(g for g in groups if scheme_of.get(g.members[0]) is not None)


# Tensors only a compressed checkpoint holds: each scheme's root parts (packed codes, code
# indices, a sparse bitmask).
_PACKED_SUFFIXES = tuple(sorted({f".{p}" for s in all_schemes() for p in s.root_parts}))


def _input_tensors(checkpoint: Checkpoint) -> list[tuple[str, tuple[str, TensorInfo]]]:
    """The checkpoint's tensors as the plan sees them: fused 3-D expert tensors become their
    per-expert 2-D views (formats/experts.py), everything else as stored."""
    out: list[tuple[str, tuple[str, TensorInfo]]] = []
    for name, (source, info) in checkpoint.tensors.items():
        views = split_fused_experts(name, info, checkpoint.config)
        if views is None:
            out.append((name, (source, info)))
        else:
            out.extend((view_name, (source, view)) for view_name, view in views)
    return out


def _refuse_split_expert_collisions(tensors: list[TensorPlan]) -> None:
    """A checkpoint holding both fused 3-D experts and per-expert tensors of the same names
    cannot be written: refuse it, naming both."""
    seen: set[str] = set()
    for t in tensors:
        if t.name in seen:
            raise InputError(
                "appears twice once the fused 3-D expert tensors are split per expert (the "
                "checkpoint holds both layouts)",
                path=t.source,
                tensor=t.name,
                hint="keep one layout of the experts in the checkpoint",
            )
        seen.add(t.name)


def _encoded_inputs(checkpoint: Checkpoint) -> dict[str, tuple[str, Encoded, TensorInfo]]:
    """The input's encoded weights, by the tensor that stands for each in the checkpoint's
    order (the FP8 weight; a compressed module's root part): the name the plan gives it (the
    dense weight's), how it decodes, and a dense view of it (dtype and 2-D shape of the decoded
    weight; its byte range covers the stored parts, for the report's sizes).

    Raises:
        InputError: a compressed checkpoint whose config or parts are inconsistent.
    """
    found: dict[str, tuple[str, Encoded, TensorInfo]] = {
        name: (name, scaled, checkpoint.tensors[name][1])
        for name, scaled in block_scaled_weights(checkpoint).items()
    }
    for module in quantized_modules(checkpoint).values():
        root = f"{module.module}.{module.root}"
        _, root_info = module.parts[module.root]
        dense = TensorInfo(
            f"{module.module}.weight",
            module.dtype,
            module.shape,
            root_info.start,
            root_info.start + module.nbytes,
        )
        found[root] = (dense.name, module, dense)
    return found


def _refuse_unsupported_input(
    checkpoint: Checkpoint,
    config: RunConfig,
    encoded: Mapping[str, tuple[str, Encoded, TensorInfo]],
) -> None:
    """Refuse, before any work, an input that would come out broken: FP8 weights among the
    targets that are not block-scaled, or a checkpoint compressed in a way no registered scheme
    reads (its packed tensors would be copied as opaque data). Encoded weights that decode
    (`encoded`) are fine: they are compressed again from their dense values."""
    rules, ignore, pruning = config.recipe.quantization, config.recipe.ignore, config.recipe.pruning
    decodable = set(encoded) | {n for _, e, _ in encoded.values() for n in e.consumed}
    for name, (source, info) in checkpoint.tensors.items():
        if not info.dtype.startswith("F8_") or name in decodable:
            continue
        pruned = (
            pruning is not None
            and not matches(ignore, name)
            and (
                (LINEAR in pruning.targets and is_default_linear(name, info))
                or matches([t for t in pruning.targets if t != LINEAR], name)
            )
        )
        if pruned or _rule_for(rules, ignore, name, info) is not None:
            raise InputError(
                f"is an {info.dtype} (FP8) weight without block scales (no FP8 "
                "quantization_config with weight_block_size and weight_scale_inv tensors, no "
                "compressed-tensors block); it cannot be decoded",
                path=source,
                tensor=name,
                hint="dequantize the checkpoint to bfloat16 first, or keep the FP8 tensors as "
                "they are with a --recipe whose `ignore` lists them",
            )
    qc = (
        checkpoint.config.get("quantization_config")
        if isinstance(checkpoint.config, dict)
        else None
    )
    names = set(checkpoint.tensors)
    packed = next(
        (n for n in checkpoint.tensors if n.endswith(_PACKED_SUFFIXES) and n not in decodable),
        None,
    ) or next(
        (
            n
            for n in checkpoint.tensors
            if n.endswith(".weight_scale") and n[:-6] not in names and n not in decodable
        ),
        None,
    )
    if packed is None and (qc is None or encoded):
        return  # dense, or every compressed weight decodes
    if qc is not None:
        method = (qc.get("quant_method") or qc.get("tool")) if isinstance(qc, dict) else None
        what = f"its quantization_config says {method or 'an unknown method'}"
        path = str(checkpoint.root / "config.json")
        ours = method in ("compressed-tensors", "checkpoint-compressor")
    else:
        what = f"it holds {packed!r}, a tensor of a compressed checkpoint"
        path = checkpoint.tensors[str(packed)][0]
        ours = True
    raise InputError(
        f"the checkpoint is already compressed ({what}); compressing it again would give a "
        "broken output",
        path=path,
        hint="decompress it first (`compressor decompress SRC DENSE`), then compress DENSE"
        if ours
        else "start from the original (unquantized) checkpoint",
    )


def _refuse_name_collisions(tensors: list[TensorPlan], shards: tuple[OutputShard, ...]) -> None:
    """Refuse an input tensor whose name the output also gives to a tensor it writes (e.g. an
    input `x.weight_scale` beside a quantized `x.weight`): the output cannot hold both."""
    seen: dict[str, str] = {}
    sources = {t.name: t.source for t in tensors}
    for spec in (e for shard in shards for e in shard.entries):
        if spec.name in seen:
            made_by = seen[spec.name] if seen[spec.name] != spec.name else spec.source
            raise InputError(
                f"collides with a tensor of the same name that the output writes for the "
                f"compressed {made_by!r}",
                path=sources.get(spec.name, sources[spec.source]),
                tensor=spec.name,
                hint=f"rename {spec.name!r} in the input, or keep {made_by!r} uncompressed "
                "with a --recipe whose `ignore` lists it",
            )
        seen[spec.name] = spec.source


@dataclass(frozen=True)
class _SideInputs:
    gradients: Checkpoint | None
    activations: Checkpoint | None


def _side_inputs(pruning: PruneConfig) -> _SideInputs:
    """Open (headers only) the side checkpoints the importance measure needs."""
    grads = (
        open_checkpoint(pruning.gradients)
        if pruning.importance == "gradient" and pruning.gradients
        else None
    )
    acts = (
        open_checkpoint(pruning.activations)
        if pruning.importance == "activation" and pruning.activations
        else None
    )
    return _SideInputs(grads, acts)


def _prune_for(
    pruning: PruneConfig,
    ignore: list[str],
    name: str,
    info: TensorInfo,
    source: str,
    sides: _SideInputs,
) -> PrunePlan | None:
    """The pruning of one tensor, or None; validates its side inputs against its shape."""
    if matches(ignore, name):
        return None
    explicit = [t for t in pruning.targets if t != LINEAR]
    if not (
        (LINEAR in pruning.targets and is_default_linear(name, info)) or matches(explicit, name)
    ):
        return None
    scheduled = next((v for p, v in pruning.schedule.items() if matches([p], name)), None)
    sparsity = pruning.sparsity if scheduled is None else scheduled
    nm = pruning.nm()
    if sparsity <= 0 and nm is None:
        return None
    if nm is not None and len(info.shape) == 2 and info.shape[1] % nm[1]:
        raise ConfigError(
            f"{pruning.structure} pruning needs the input dimension ({info.shape[1]}) to be a "
            f"multiple of {nm[1]}",
            path=source,
            tensor=name,
            hint="add the tensor to ignore, or use unstructured or row pruning",
        )
    gradient = activation = None
    if sides.gradients is not None:
        found = sides.gradients.tensors.get(name)
        if (
            found is None
            or tuple(found[1].shape) != tuple(info.shape)
            or not dtypes.is_float(found[1].dtype)
        ):
            raise InputError(
                "has no gradient of the same shape in the gradients checkpoint"
                + (f" (found {found[1].dtype} {list(found[1].shape)})" if found else ""),
                path=str(sides.gradients.root),
                tensor=name,
                hint=f"the gradients checkpoint must hold {name} as a float tensor of shape "
                f"{list(info.shape)}",
            )
        gradient = found
    if sides.activations is not None:
        module = module_name(name)
        found = sides.activations.tensors.get(module) or sides.activations.tensors.get(name)
        cols = info.shape[1] if len(info.shape) == 2 else -1
        if found is None or tuple(found[1].shape) != (cols,) or not dtypes.is_float(found[1].dtype):
            raise InputError(
                "has no activation-norm vector of the right length in the calibration file"
                + (f" (found {found[1].dtype} {list(found[1].shape)})" if found else ""),
                path=str(sides.activations.root),
                tensor=module,
                hint=f"the calibration file must hold {module!r}: a float vector of {cols} "
                "input-channel norms",
            )
        activation = found
    scope = pruning.scope if scheduled is None and pruning.scope == "global" else name
    return PrunePlan(
        sparsity=sparsity,
        scope=scope,
        importance=pruning.importance,
        normalize=pruning.normalize,
        structure="unstructured"
        if pruning.structure == "unstructured"
        else ("row" if pruning.structure == "row" else "nm"),
        nm=nm,
        bitmask=pruning.sparse_format == "bitmask",
        gradient=gradient,
        activation=activation,
    )


def output_specs(t: TensorPlan, kept: int | None = None) -> list[OutputSpec]:
    """The output tensors one input tensor becomes (`kept`: values a bitmask tensor keeps; an
    upper bound until the values are counted)."""
    stored = t.stored
    if stored is not None:
        n = t.info.numel if kept is None else kept
        return for_args(stored).outputs(t.name, t.shape2d, t.dtype, stored, n)
    if not t.staged:
        return [OutputSpec(t.name, t.info.dtype, t.info.shape, "copy", t.name)]
    return [OutputSpec(t.name, t.dtype, t.info.shape, "dense", t.name)]  # pruned or decoded


def lay_out_shards(
    tensors: list[TensorPlan] | tuple[TensorPlan, ...],
    limit: int,
    kept: dict[str, int] | None = None,
) -> tuple[OutputShard, ...]:
    """Greedy size-based shards in input order; a tensor's outputs stay in one shard.

    Bitmask tensors' sizes depend on how many values pruning keeps: the plan lays shards out
    with an upper bound, and the write stage lays them out again with the counts (`kept`).
    """
    groups: list[list[OutputSpec]] = [[]]
    size = 0
    for t in tensors:
        specs = output_specs(t, (kept or {}).get(t.name))
        nbytes = sum(s.nbytes for s in specs)
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].extend(specs)
        size += nbytes
    n = len(groups)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    )
    return tuple(OutputShard(name, tuple(g)) for name, g in zip(names, groups, strict=True))


def source_files(
    checkpoint: Checkpoint,
    source: str,
    sides: _SideInputs | None = None,
    pruning: PruneConfig | None = None,
) -> tuple[SourceFile, ...]:
    """Every file of `checkpoint` that a run reads (shards, index, config.json and the files it
    carries over), then those of the side inputs, each stamped now.

    Raises:
        InputError: a file vanished or cannot be stat'ed since the checkpoint was opened.
    """
    found = checkpoint_files(checkpoint, source)
    if sides is not None and pruning is not None:
        if sides.gradients is not None and pruning.gradients:
            found += checkpoint_files(sides.gradients, pruning.gradients, "gradients/", False)
        if sides.activations is not None and pruning.activations:
            found += checkpoint_files(sides.activations, pruning.activations, "activations/", False)
    files = []
    for name, location in found:
        try:
            files.append(source_file(name, location))
        except OSError as e:
            raise InputError(
                f"cannot be read: {e.strerror or e}",
                path=location,
                hint="check that the input is complete and readable, then rerun",
            ) from e
    return tuple(files)


def _run_key(checkpoint: Checkpoint, config: RunConfig, sources: tuple[SourceFile, ...]) -> str:
    """Staging and idempotence key: the input's headers and the stamps of every file the output
    depends on (a rewritten file never resumes another input's chunks), the tool (its version
    and the digest of its code: the bytes it writes) and every option that changes them."""
    payload = json.dumps(
        {
            "input": checkpoint.fingerprint(),
            "sources": [[f.name, f.size, f.stamp] for f in sources],
            "tool": [__version__, code_digest()],
            "config": config.output_affecting(),
            "calibration": (
                file_digest(config.calibration.path) if config.calibration is not None else None
            ),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@functools.cache
def code_digest(package: Path = Path(__file__).resolve().parent.parent) -> str:
    """sha256 over the compressor package's Python sources (relative paths and bytes, in path
    order). A change to the math changes the bytes written without changing the version or
    any option (hqq's schedule, mse's walk did), so the run key holds this too: staging left by
    other code is never resumed into one output, and an output other code published is made
    again."""
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(path.relative_to(package).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def _check_destination(config: RunConfig) -> None:
    """Refuse, before any work, a destination or staging directory that overlaps an input
    (formats/paths.py: equal, inside, containing, or the same files under other names) or that
    cannot be created."""
    inputs: dict[str, str] = {"the source checkpoint": config.source}
    pruning = config.recipe.pruning
    if pruning is not None and pruning.gradients:
        inputs["the gradients checkpoint"] = pruning.gradients
    if pruning is not None and pruning.activations:
        inputs["the activations file"] = pruning.activations
    if config.calibration is not None:
        inputs["the calibration file"] = config.calibration.path
    dest = storage.as_path(config.destination)
    staging = config.staging_dir or str(dest.parent / f".{dest.name}.staging")
    check_disjoint(
        inputs,
        {"the destination": config.destination, "the staging directory": staging},
        may_contain={"the staging directory"},  # it writes only <staging>/<run key>/
    )
    found = overlap(config.destination, staging)
    if found is not None and found.kind in ("equal", "inside"):
        raise OutputError(
            "the staging directory "
            + ("is the destination" if found.kind == "equal" else "lies inside the destination"),
            path=staging,
            hint="choose a --staging directory outside the destination (publishing replaces "
            "the destination)",
        )
    check_parent_writable(config.destination)
    if config.staging_dir:
        check_parent_writable(config.staging_dir, "the staging directory")


def _already_published(config: RunConfig, run_key: str) -> bool:
    """True if the destination holds this run's output; an error if it holds something else."""
    dest = config.destination
    if not storage.exists(dest):
        return False
    try:
        published = storage.read_json(storage.join(dest, "compression.json")).get("run_key")
    except (OSError, ValueError, AttributeError):
        published = None
    # On an object store the manifest, uploaded last, is what marks a complete output.
    if published == run_key and storage.isfile(storage.join(dest, "manifest.json")):
        return True
    if config.overwrite:
        return False
    raise OutputError(
        "the destination already exists (and holds another input's or config's output)",
        path=str(dest),
        hint="pass --overwrite to replace it, or choose another destination",
    )
